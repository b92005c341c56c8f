//! A support-API client: one connection to a VMM, requests matched to
//! replies by id, events handed to whoever subscribed.
use std::collections::HashMap;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::fdpass::recv_with_fds;
use crate::protocol::{
    encode_line, ApiError, Envelope, ErrorCode, Event, EventKind, MemoryRegion, Msr, Request, PROTOCOL_VERSION,
};

/// What can go wrong on a support-API connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {0}: {1} (is the VM running? start it with `dvisor run`, or pass the right --attach/--vm)")]
    Connect(PathBuf, std::io::Error),
    #[error("the VMM at {0} closed the connection (the VM stopped?)")]
    Disconnected(PathBuf),
    #[error("the VMM refused: {0}")]
    Api(ApiError),
    #[error("support API protocol error: {0}")]
    Protocol(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// The guest-RAM memfd as the `memory` reply hands it over, with the
/// layout to map it by.
pub struct MemoryGrant {
    pub fd: OwnedFd,
    pub size: u64,
    pub regions: Vec<MemoryRegion>,
    /// The boot this memory belongs to: a reboot gets a new memfd.
    pub boot: u64,
}

/// How long a reply may take. Generous: `keys` replies only after typing.
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// One server line, loosely typed: the request id says what `ok` holds.
/// The monitor's control socket speaks the same shape (without ids).
#[derive(Debug, Deserialize)]
pub struct RawMessage {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub ok: Option<serde_json::Value>,
    #[serde(default)]
    pub error: Option<ApiError>,
    #[serde(default)]
    pub event: Option<Event>,
}

struct Pending {
    tx: SyncSender<(Result<serde_json::Value, ApiError>, Vec<OwnedFd>)>,
}

type PendingMap = Arc<Mutex<HashMap<u64, Pending>>>;
/// An error the server sent with no request id before it hung up (not
/// your user, too many connections): the reason every later call fails.
/// `true` once the reader has seen the connection end.
type Refusal = Arc<Mutex<(Option<ApiError>, bool)>>;

pub struct VmmClient {
    path: PathBuf,
    writer: Mutex<UnixStream>,
    next_id: AtomicU64,
    pending: PendingMap,
    shared_events: Arc<Mutex<Option<Sender<Event>>>>,
    refused: Refusal,
    pub features: Vec<String>,
}

impl VmmClient {
    /// Connects and says hello.
    pub fn connect(path: &Path, client_name: &str) -> Result<VmmClient, ClientError> {
        let stream = UnixStream::connect(path).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
        // Never talk to a socket another user put in the VMM's place.
        crate::owner::check_server(&stream, path).map_err(|e| ClientError::Connect(path.to_owned(), e))?;
        let reader = stream.try_clone().map_err(|e| ClientError::Io("cloning the API socket".into(), e))?;
        let pending: PendingMap = Arc::default();
        let shared_events: Arc<Mutex<Option<Sender<Event>>>> = Arc::default();
        let refused: Refusal = Arc::default();
        {
            let (pending, events, refused) = (pending.clone(), shared_events.clone(), refused.clone());
            std::thread::Builder::new()
                .name("api-reader".into())
                .spawn(move || read_loop(reader, pending, events, refused))
                .map_err(|e| ClientError::Io("starting the API reader".into(), e))?;
        }
        let mut client = VmmClient {
            path: path.to_owned(),
            writer: Mutex::new(stream),
            next_id: AtomicU64::new(1),
            pending,
            shared_events,
            refused,
            features: Vec::new(),
        };
        #[derive(Deserialize)]
        struct Hello {
            features: Vec<String>,
        }
        let hello: Hello =
            client.call(Request::Hello { version: PROTOCOL_VERSION, client: client_name.into() })?;
        client.features = hello.features;
        Ok(client)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sends a request and waits for its reply, decoded as `T`.
    pub fn call<T: DeserializeOwned>(&self, request: Request) -> Result<T, ClientError> {
        let (value, _fds) = self.call_raw(request)?;
        serde_json::from_value(value).map_err(|e| ClientError::Protocol(format!("unexpected reply: {e}")))
    }

    /// Like `call`, also returning descriptors that came with the reply.
    pub fn call_raw(&self, request: Request) -> Result<(serde_json::Value, Vec<OwnedFd>), ClientError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::sync_channel(1);
        self.lock_pending().insert(id, Pending { tx });
        let line = encode_line(&Envelope { id, request });
        let sent = self.writer.lock().map(|mut w| w.write_all(&line));
        if !matches!(sent, Ok(Ok(()))) {
            self.lock_pending().remove(&id);
            return Err(self.closed());
        }
        match rx.recv_timeout(REPLY_TIMEOUT) {
            Ok((Ok(v), fds)) => Ok((v, fds)),
            Ok((Err(e), _)) => Err(ClientError::Api(e)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(self.closed()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.lock_pending().remove(&id);
                Err(ClientError::Protocol(format!("no reply within {REPLY_TIMEOUT:?}")))
            }
        }
    }

    /// Asks for the guest-RAM memfd. `Ok(None)` between boots.
    pub fn memory(&self) -> Result<Option<MemoryGrant>, ClientError> {
        #[derive(Deserialize)]
        struct MemoryReply {
            size: u64,
            regions: Vec<MemoryRegion>,
            boot: u64,
        }
        let (value, fds) = match self.call_raw(Request::Memory) {
            Ok(v) => v,
            Err(ClientError::Api(e)) if e.code == ErrorCode::WrongState => return Ok(None),
            Err(e) => return Err(e),
        };
        let r: MemoryReply =
            serde_json::from_value(value).map_err(|e| ClientError::Protocol(format!("memory reply: {e}")))?;
        let fd = fds.into_iter().next().ok_or_else(|| ClientError::Protocol("memory reply came without a memfd".into()))?;
        Ok(Some(MemoryGrant { fd, size: r.size, regions: r.regions, boot: r.boot }))
    }

    /// One MSR of one vCPU.
    pub fn read_msr(&self, vcpu: u32, index: u32) -> Result<u64, ClientError> {
        #[derive(Deserialize)]
        struct Msrs {
            msrs: Vec<Msr>,
        }
        let m: Msrs = self.call(Request::GetMsrs { vcpu, indices: vec![index] })?;
        m.msrs.first().map(|m| m.value).ok_or_else(|| ClientError::Protocol(format!("MSR {index:#x} missing from the reply")))
    }

    /// Sends raw bytes (for tests of the server's error handling).
    pub fn send_raw(&self, bytes: &[u8]) -> Result<(), ClientError> {
        self.writer
            .lock()
            .map_err(|_| ClientError::Disconnected(self.path.clone()))?
            .write_all(bytes)
            .map_err(|_| ClientError::Disconnected(self.path.clone()))
    }

    /// Subscribes; events arrive on the returned receiver until the
    /// connection ends (then it disconnects).
    pub fn subscribe(&self, kinds: &[EventKind]) -> Result<Receiver<Event>, ClientError> {
        let (tx, rx) = mpsc::channel();
        if let Ok(mut e) = self.shared_events.lock() {
            *e = Some(tx);
        }
        let _: serde_json::Value = self.call(Request::Subscribe { kinds: kinds.to_vec() })?;
        Ok(rx)
    }

    /// Why the connection is gone: the server's refusal when it sent one
    /// (the reader may still be parsing it when a write already failed,
    /// so it is given a moment), else a plain disconnect.
    fn closed(&self) -> ClientError {
        for _ in 0..20 {
            let (why, ended) = self.refused.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(e) = why {
                return ClientError::Api(e);
            }
            if ended {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ClientError::Disconnected(self.path.clone())
    }

    fn lock_pending(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for VmmClient {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn read_loop(stream: UnixStream, pending: PendingMap, events: Arc<Mutex<Option<Sender<Event>>>>, refused: Refusal) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut line = Vec::new();
    let mut fds: Vec<OwnedFd> = Vec::new();
    loop {
        let (n, got) = match recv_with_fds(&stream, &mut buf) {
            Ok((0, _)) | Err(_) => break,
            Ok(v) => v,
        };
        fds.extend(got);
        let mut start = 0;
        for i in 0..n {
            if buf[i] != b'\n' {
                continue;
            }
            line.extend_from_slice(&buf[start..i]);
            start = i + 1;
            deliver(&std::mem::take(&mut line), &mut fds, &pending, &events, &refused);
        }
        line.extend_from_slice(&buf[start..n]);
    }
    // Wake every waiter: the VMM is gone (saying why first, if it did).
    refused.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
    if let Ok(mut e) = events.lock() {
        e.take();
    }
}

fn deliver(
    line: &[u8],
    fds: &mut Vec<OwnedFd>,
    pending: &PendingMap,
    events: &Arc<Mutex<Option<Sender<Event>>>>,
    refused: &Refusal,
) {
    let msg: RawMessage = match serde_json::from_slice(line) {
        Ok(m) => m,
        Err(e) => {
            tracing::warn!("support API sent a line we cannot parse: {e}");
            return;
        }
    };
    if let Some(ev) = msg.event {
        if let Ok(e) = events.lock() {
            if let Some(tx) = e.as_ref() {
                let _ = tx.send(ev);
            }
        }
        return;
    }
    let result = match (msg.ok, msg.error) {
        (Some(v), _) => Ok(v),
        (None, Some(e)) => Err(e),
        (None, None) => Err(ApiError::new(ErrorCode::Failed, "reply with neither ok nor error")),
    };
    let Some(id) = msg.id else {
        if let Err(e) = result {
            tracing::warn!("support API error without a request id: {e}");
            if matches!(e.code, ErrorCode::PermissionDenied | ErrorCode::Busy) {
                refused.lock().unwrap_or_else(|p| p.into_inner()).0 = Some(e);
            }
        }
        return;
    };
    let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    if let Some(p) = waiter {
        let _ = p.tx.send((result, std::mem::take(fds)));
    }
}
