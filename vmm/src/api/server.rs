//! The VMM side of the support API: a listener thread, one thread per
//! connection, requests answered against the current boot.
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VmFd;
use dvisor_api::fdpass::send_with_fd;
use dvisor_api::monotonic_ns;
use dvisor_api::owner;
use dvisor_api::protocol::*;
use crate::devices::set::lock;
use vm_memory::{Bytes, GuestAddress};

use super::convert;
use super::events::EventHub;
use crate::devices::i8042::I8042;
use crate::devices::keymap;
use crate::devices::virtio::stats::StatsHandle;
use crate::memory::GuestMemory;
use crate::vcpu_control::VcpuControl;

/// Highest GSI of the in-kernel IOAPIC.
const MAX_GSI: u32 = 23;
/// Most MSRs in one request.
const MAX_MSRS: usize = 256;
/// Most key events in one request, and the longest delay between two.
const MAX_KEYS: usize = 4096;
const MAX_KEY_DELAY_MS: u32 = 10_000;

/// A device as the API reports it.
pub struct DeviceHandle {
    pub info: DeviceInfo,
    pub stats: StatsHandle,
}

/// What the API needs of one boot; replaced on every reboot.
pub struct BootHandles {
    pub boot: u64,
    pub vm: Arc<VmFd>,
    pub control: Arc<VcpuControl>,
    pub memfd: File,
    pub memory: GuestMemory,
    pub regions: Vec<MemoryRegion>,
    pub mem_bytes: u64,
    pub keyboard: Arc<Mutex<I8042>>,
    pub devices: Vec<DeviceHandle>,
    /// The VM generation ID (`regenerate_vm_id`).
    pub kernel: PathBuf,
    /// Every device, for snapshots.
    pub device_set: Arc<crate::devices::set::DeviceSet>,
    pub config: crate::config::VmConfig,
    /// The disk files in use now: a clone point moves a VM onto overlays,
    /// and later boots (a reboot) open those.
    pub disks: Arc<Mutex<Vec<crate::config::DiskConfig>>>,
    /// The MSRs a snapshot saves (KVM's list, read once per VMM).
    pub msr_indices: Arc<Vec<u32>>,
    /// One snapshot (or dirty-log user) at a time: both own the dirty log.
    pub snapshot_lock: Mutex<()>,
    /// Whether a client turned the dirty log on (`dirty_log start`).
    pub dirty_log_on: AtomicBool,
    /// In-place restore requests go to the VM loop through this.
    pub restore: crate::vm::RestoreSlot,
    pub events: crate::lifecycle::EventSender,
    /// A restore still filling guest memory in the background; the memfd
    /// is handed out only once it is complete.
    pub lazy: Mutex<Option<crate::lazy_memory::LazyLoader>>,
}

/// The boot the API talks to; `None` between boots.
#[derive(Clone, Default)]
pub struct CurrentBoot(Arc<Mutex<Option<Arc<BootHandles>>>>);

impl CurrentBoot {
    pub fn set(&self, b: Option<Arc<BootHandles>>) {
        if let Ok(mut g) = self.0.lock() {
            *g = b;
        }
    }

    pub fn get(&self) -> Option<Arc<BootHandles>> {
        self.0.lock().ok().and_then(|g| g.clone())
    }
}

/// The listening socket; dropping it removes the socket file and stops
/// accepting (open connections end with the process).
pub struct ApiServer {
    path: PathBuf,
    closed: Arc<AtomicBool>,
}

impl ApiServer {
    pub fn start(path: &Path, current: CurrentBoot, hub: EventHub) -> std::io::Result<ApiServer> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
            // Ours to make: only its owner may enter it. (A directory that
            // exists is the caller's choice; the socket itself is 0600.)
            owner::private_dir(dir)?;
        }
        remove_stale_socket(path)?;
        let listener = owner::bind_private(path)?;
        let closed = Arc::new(AtomicBool::new(false));
        let c2 = closed.clone();
        let current_for_io = current.clone();
        let hub_for_conns = hub.clone();
        let slots = owner::Slots::default();
        std::thread::Builder::new().name("api-accept".into()).spawn(move || {
            for conn in listener.incoming() {
                if c2.load(Ordering::Acquire) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                // Another user, or one connection too many: told why, closed.
                let Some(slot) = slots.admit(&conn) else { continue };
                let (current, hub) = (current.clone(), hub_for_conns.clone());
                let _ = std::thread::Builder::new().name("api-conn".into()).spawn(move || {
                    let _slot = slot;
                    Connection::new(conn, current, hub).serve()
                });
            }
        })?;
        spawn_io_sampler(closed.clone(), hub, current_for_io);
        Ok(ApiServer { path: path.to_owned(), closed })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag and ends, then remove
        // the socket (connecting after the unlink would find nothing and
        // leave the accept thread blocked for the life of the process).
        let _ = UnixStream::connect(&self.path);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A socket file nobody listens on is left over from a dead VMM: remove
/// it. A live one means another VMM owns the path.
fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("{} is served by another running VMM: pick another --api path or --name", path.display()),
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket: remove it or pick another --api path", path.display()),
        )),
    }
}

/// Publishes device I/O records every 100 ms while someone listens.
fn spawn_io_sampler(closed: Arc<AtomicBool>, hub: EventHub, current: CurrentBoot) {
    let _ = std::thread::Builder::new().name("api-io".into()).spawn(move || {
        while !closed.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            if !hub.has_subscribers(EventKind::Io) {
                continue;
            }
            let Some(b) = current.get() else { continue };
            for d in &b.devices {
                let s = d.stats.take_records();
                if !s.records.is_empty() || s.records_lost > 0 {
                    hub.publish(Event::Io {
                        t_ns: monotonic_ns(),
                        device: d.info.name.clone(),
                        records: s.records.into_iter().collect(),
                        lost: s.records_lost,
                    });
                }
            }
        }
    });
}

struct Connection {
    stream: UnixStream,
    writer: Arc<Mutex<UnixStream>>,
    current: CurrentBoot,
    hub: EventHub,
    greeted: bool,
    subscribed: Option<Arc<AtomicBool>>,
}

type Outcome = Result<(Reply, Option<File>), ApiError>;

impl Connection {
    fn new(stream: UnixStream, current: CurrentBoot, hub: EventHub) -> Connection {
        let writer = Arc::new(Mutex::new(stream.try_clone().unwrap_or_else(|_| {
            // try_clone only fails when out of descriptors; the connection
            // then answers nothing and closes.
            let (a, _) = UnixStream::pair().expect("socketpair");
            a
        })));
        Connection { stream, writer, current, hub, greeted: false, subscribed: None }
    }

    fn serve(mut self) {
        let mut buf = vec![0u8; 16 * 1024];
        let mut line = Vec::new();
        let mut skipping = false;
        loop {
            let n = match self.stream.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            for &b in &buf[..n] {
                if b == b'\n' {
                    if !skipping {
                        let l = std::mem::take(&mut line);
                        if !self.handle_line(&l) {
                            return self.close();
                        }
                    }
                    skipping = false;
                    line.clear();
                } else if !skipping {
                    line.push(b);
                    if line.len() > MAX_REQUEST_BYTES {
                        let e = ApiError::new(ErrorCode::TooLarge, format!("request longer than {MAX_REQUEST_BYTES} bytes; skipped to the next newline"));
                        if !self.send(&ServerMessage::Err { id: None, error: e }, None) {
                            return self.close();
                        }
                        skipping = true;
                        line.clear();
                    }
                }
            }
        }
        self.close();
    }

    fn close(&mut self) {
        if let Some(flag) = self.subscribed.take() {
            flag.store(true, Ordering::Release);
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Returns false when the peer is gone.
    fn handle_line(&mut self, line: &[u8]) -> bool {
        if line.iter().all(u8::is_ascii_whitespace) {
            return true;
        }
        let (id, outcome) = match decode_request(line) {
            Ok(env) => (Some(env.id), self.dispatch(env.request)),
            Err((id, e)) => (id, Err(e)),
        };
        match outcome {
            Ok((reply, fd)) => self.send(&ServerMessage::Ok { id, ok: reply }, fd.as_ref()),
            Err(error) => self.send(&ServerMessage::Err { id, error }, None),
        }
    }

    fn send(&self, msg: &ServerMessage, fd: Option<&File>) -> bool {
        let bytes = encode_line(msg);
        let Ok(w) = self.writer.lock() else { return false };
        match fd {
            Some(f) => send_with_fd(&w, &bytes, f.as_raw_fd()).is_ok(),
            None => (&*w).write_all(&bytes).is_ok(),
        }
    }

    fn dispatch(&mut self, req: Request) -> Outcome {
        if let Request::Hello { version, client } = &req {
            if *version != PROTOCOL_VERSION {
                return Err(ApiError::new(
                    ErrorCode::VersionMismatch,
                    format!("client {client:?} speaks version {version}; this VMM speaks {PROTOCOL_VERSION}"),
                ));
            }
            self.greeted = true;
            let reply = Reply::Hello {
                version: PROTOCOL_VERSION,
                features: FEATURES.iter().map(|s| s.to_string()).collect(),
                vmm: format!("dvisor {}", env!("CARGO_PKG_VERSION")),
            };
            return Ok((reply, None));
        }
        if !self.greeted {
            return Err(ApiError::new(ErrorCode::WrongState, "send {\"op\":\"hello\",\"version\":1,...} first"));
        }
        if let Request::Subscribe { kinds } = &req {
            return self.subscribe(kinds);
        }
        if let Request::Unsubscribe = req {
            if let Some(f) = self.subscribed.take() {
                f.store(true, Ordering::Release);
            }
            return Ok((Reply::Done {}, None));
        }
        let boot = self
            .current
            .get()
            .ok_or_else(|| ApiError::new(ErrorCode::WrongState, "no guest is running (it is rebooting or shutting down)"))?;
        dispatch_vm(&boot, &self.hub, req)
    }

    fn subscribe(&mut self, kinds: &[EventKind]) -> Outcome {
        if let Some(f) = self.subscribed.take() {
            f.store(true, Ordering::Release);
        }
        let sub = self.hub.subscribe(kinds);
        let done = Arc::new(AtomicBool::new(false));
        self.subscribed = Some(done.clone());
        let writer = self.writer.clone();
        std::thread::Builder::new()
            .name("api-events".into())
            .spawn(move || forward_events(sub, writer, done))
            .map_err(|e| ApiError::new(ErrorCode::Failed, format!("starting the event thread: {e}")))?;
        Ok((Reply::Subscribed { kinds: kinds.to_vec() }, None))
    }
}

fn forward_events(sub: super::events::Subscription, writer: Arc<Mutex<UnixStream>>, done: Arc<AtomicBool>) {
    while !done.load(Ordering::Acquire) {
        let ev = match sub.rx.recv_timeout(Duration::from_millis(200)) {
            Ok(ev) => ev,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(_) => return,
        };
        let lost = sub.lost.swap(0, Ordering::Relaxed);
        let Ok(w) = writer.lock() else { return };
        if lost > 0 {
            let m = ServerMessage::Event { event: Event::Lost { count: lost } };
            if (&*w).write_all(&encode_line(&m)).is_err() {
                return;
            }
        }
        let m = ServerMessage::Event { event: (*ev).clone() };
        if (&*w).write_all(&encode_line(&m)).is_err() {
            return;
        }
    }
}

fn failed(what: &str, e: impl std::fmt::Display) -> ApiError {
    ApiError::new(ErrorCode::Failed, format!("{what} failed: {e}"))
}

fn check_vcpu(b: &BootHandles, vcpu: u32) -> Result<usize, ApiError> {
    let n = b.control.vcpus();
    if (vcpu as usize) < n {
        Ok(vcpu as usize)
    } else {
        Err(ApiError::new(ErrorCode::OutOfRange, format!("no vCPU {vcpu}: this VM has {n} (0 to {})", n - 1)))
    }
}

fn require_paused(b: &BootHandles, what: &str) -> Result<(), ApiError> {
    if b.control.is_paused() {
        Ok(())
    } else {
        Err(ApiError::new(ErrorCode::WrongState, format!("{what} needs a paused VM: send pause first")))
    }
}

/// Runs `job` on a vCPU thread, mapping KVM errors.
fn on_vcpu<T: Send + 'static>(
    b: &BootHandles,
    vcpu: u32,
    what: &'static str,
    job: impl FnOnce(&kvm_ioctls::VcpuFd) -> Result<T, kvm_ioctls::Error> + Send + 'static,
) -> Result<T, ApiError> {
    let id = check_vcpu(b, vcpu)?;
    match b.control.run_on(id, job) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(failed(what, e)),
        None => Err(ApiError::new(ErrorCode::WrongState, "the guest stopped while the request was queued")),
    }
}

fn dispatch_vm(b: &BootHandles, hub: &EventHub, req: Request) -> Outcome {
    let reply = match req {
        Request::Status => Reply::Status(status(b)),
        Request::Memory => {
            wait_memory_loaded(b)?;
            let fd = b.memfd.try_clone().map_err(|e| failed("duplicating the memfd", e))?;
            let reply = Reply::Memory { size: b.mem_bytes, regions: b.regions.clone(), boot: b.boot };
            return Ok((reply, Some(fd)));
        }
        Request::Pause | Request::PauseWithState => {
            let with_state = matches!(req, Request::PauseWithState);
            let (already, took, snaps) = b.control.pause_capturing(with_state);
            if !already {
                hub.lifecycle(Lifecycle::Paused, "support API");
            }
            let stop_ns = took.as_nanos() as u64;
            if !with_state {
                return Ok((Reply::Paused { already, stop_ns }, None));
            }
            let mut vcpus = Vec::new();
            for (vcpu, snap) in (0..).zip(snaps) {
                // Parked before the pause (or it failed there): ask it now.
                let snap = match snap {
                    Some(Ok(s)) => s,
                    _ => on_vcpu(b, vcpu, "KVM_GET_REGS/KVM_GET_SREGS", |fd| Ok((fd.get_regs()?, fd.get_sregs()?)))?,
                };
                vcpus.push(VcpuState { vcpu, regs: convert::regs_from_kvm(&snap.0), sregs: convert::sregs_from_kvm(&snap.1) });
            }
            Reply::PausedWithState { already, stop_ns, vcpus }
        }
        Request::Resume => {
            let already = b.control.resume();
            if !already {
                hub.lifecycle(Lifecycle::Resumed, "support API");
            }
            Reply::Resumed { already }
        }
        Request::GetRegs { vcpu } => Reply::Regs(on_vcpu(b, vcpu, "KVM_GET_REGS", |fd| {
            fd.get_regs().map(|r| convert::regs_from_kvm(&r))
        })?),
        Request::SetRegs { vcpu, regs } => {
            check_vcpu(b, vcpu)?;
            require_paused(b, "set_regs")?;
            let r = convert::regs_to_kvm(&regs);
            on_vcpu(b, vcpu, "KVM_SET_REGS", move |fd| fd.set_regs(&r))?;
            Reply::Done {}
        }
        Request::GetSregs { vcpu } => Reply::Sregs(on_vcpu(b, vcpu, "KVM_GET_SREGS", |fd| {
            fd.get_sregs().map(|s| convert::sregs_from_kvm(&s))
        })?),
        Request::SetSregs { vcpu, sregs } => {
            check_vcpu(b, vcpu)?;
            require_paused(b, "set_sregs")?;
            on_vcpu(b, vcpu, "KVM_SET_SREGS", move |fd| {
                let mut s = fd.get_sregs()?;
                convert::apply_sregs(&mut s, &sregs);
                fd.set_sregs(&s)
            })?;
            Reply::Done {}
        }
        Request::GetMsrs { vcpu, indices } => {
            check_msr_count(indices.len())?;
            let entries: Vec<_> = indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            let msrs = on_vcpu(b, vcpu, "KVM_GET_MSRS", move |fd| {
                let mut m = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
                let n = fd.get_msrs(&mut m)?;
                Ok(m.as_slice()[..n].iter().map(|e| Msr { index: e.index, value: e.data }).collect::<Vec<_>>())
            })?;
            if msrs.len() < indices.len() {
                let bad = indices[msrs.len()];
                return Err(ApiError::new(ErrorCode::OutOfRange, format!("MSR {bad:#x} cannot be read on this vCPU")));
            }
            Reply::Msrs { msrs }
        }
        Request::SetMsrs { vcpu, msrs } => {
            check_msr_count(msrs.len())?;
            check_vcpu(b, vcpu)?;
            require_paused(b, "set_msrs")?;
            let entries: Vec<_> =
                msrs.iter().map(|m| kvm_msr_entry { index: m.index, data: m.value, ..Default::default() }).collect();
            let n = on_vcpu(b, vcpu, "KVM_SET_MSRS", move |fd| {
                let m = Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
                fd.set_msrs(&m)
            })?;
            if n < msrs.len() {
                let bad = msrs[n].index;
                return Err(ApiError::new(
                    ErrorCode::OutOfRange,
                    format!("MSR {bad:#x} refused its value; the first {n} were written"),
                ));
            }
            Reply::Done {}
        }
        Request::SetDebug { vcpu, single_step, sw_breakpoints, hw_breakpoints } => {
            let dbg = convert::guest_debug(single_step, sw_breakpoints, &hw_breakpoints)?;
            let targets: Vec<u32> = match vcpu {
                Some(v) => vec![check_vcpu(b, v)? as u32],
                None => (0..b.control.vcpus() as u32).collect(),
            };
            for v in targets {
                on_vcpu(b, v, "KVM_SET_GUEST_DEBUG", move |fd| fd.set_guest_debug(&dbg))?;
            }
            Reply::Done {}
        }
        Request::Irq { gsi } => {
            if gsi > MAX_GSI {
                return Err(ApiError::new(ErrorCode::OutOfRange, format!("GSI {gsi}: the IOAPIC has 0 to {MAX_GSI}")));
            }
            b.vm.set_irq_line(gsi, true).map_err(|e| failed("KVM_IRQ_LINE", e))?;
            b.vm.set_irq_line(gsi, false).map_err(|e| failed("KVM_IRQ_LINE", e))?;
            Reply::Done {}
        }
        Request::Nmi { vcpu } => {
            on_vcpu(b, vcpu, "KVM_NMI", |fd| fd.nmi())?;
            Reply::Done {}
        }
        Request::Keys { text, events, hold_ms, gap_ms } => type_keys(b, text, events, hold_ms, gap_ms)?,
        Request::Stats => Reply::Stats {
            devices: b
                .devices
                .iter()
                .map(|d| DeviceStats { name: d.info.name.clone(), kind: d.info.kind.clone(), totals: d.stats.totals() })
                .collect(),
        },
        Request::ReadMemory { gpa, len } => {
            if len > MAX_READ_BYTES {
                return Err(ApiError::new(
                    ErrorCode::TooLarge,
                    format!("read of {len} bytes; the limit is {MAX_READ_BYTES} (map the memfd for more)"),
                ));
            }
            let mut data = vec![0u8; len as usize];
            b.memory.read_slice(&mut data, GuestAddress(gpa)).map_err(|_| {
                ApiError::new(ErrorCode::OutOfRange, format!("{gpa:#x}+{len:#x} is not entirely guest RAM"))
            })?;
            Reply::Bytes { gpa, hex: hex(&data) }
        }
        Request::Snapshot { out, parent, clone } => snapshot(b, hub, out, parent, clone)?,
        Request::Restore { dir, paused, adopt } => restore_in_place(b, dir, paused, adopt)?,
        Request::DirtyLog { action } => dirty_log(b, action)?,
        Request::RegenerateVmId => {
            let mut dev = b.device_set.vmgenid.lock().map_err(|_| failed("VM generation ID", "lock poisoned"))?;
            dev.regenerate(&b.memory).map_err(|e| failed("regenerate_vm_id", e))?;
            Reply::VmId { vm_id: dev.hex_id() }
        }
        Request::Hello { .. } | Request::Subscribe { .. } | Request::Unsubscribe => {
            return Err(ApiError::new(ErrorCode::BadRequest, "handled per connection"))
        }
    };
    Ok((reply, None))
}

fn check_msr_count(n: usize) -> Result<(), ApiError> {
    if n == 0 || n > MAX_MSRS {
        return Err(ApiError::new(ErrorCode::OutOfRange, format!("{n} MSRs in one request: use 1 to {MAX_MSRS}")));
    }
    Ok(())
}

/// A restored VM's memfd is complete only once its lazy loader is done;
/// another process mapping it earlier would see zeros where the snapshot
/// has data.
fn wait_memory_loaded(b: &BootHandles) -> Result<(), ApiError> {
    let guard = b.lazy.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = guard.as_ref() {
        l.wait_loaded().map_err(|e| failed("loading the snapshot's memory", e))?;
    }
    Ok(())
}

/// Publishes snapshot progress at most every 100 ms (and the last one).
struct ProgressEvents<'a> {
    hub: &'a EventHub,
    last: Option<Instant>,
}

impl ProgressEvents<'_> {
    fn report(&mut self, p: crate::snapshot::create::Progress) {
        let due = self.last.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) || p.bytes_done >= p.bytes_total;
        if due {
            self.last = Some(Instant::now());
            self.hub.publish(Event::Progress { t_ns: monotonic_ns(), what: p.phase.into(), done: p.bytes_done, total: p.bytes_total });
        }
    }
}

fn snapshot(
    b: &BootHandles,
    hub: &EventHub,
    out: PathBuf,
    parent: Option<PathBuf>,
    clone: Option<CloneSpec>,
) -> Result<Reply, ApiError> {
    use crate::snapshot::{create, SavedConfig};
    let _one = b.snapshot_lock.try_lock().map_err(|_| {
        ApiError::new(ErrorCode::WrongState, "another snapshot of this VM is in progress: wait for it to finish")
    })?;
    if b.dirty_log_on.load(Ordering::Acquire) {
        return Err(ApiError::new(ErrorCode::WrongState, "a client is using the dirty log (dirty_log start): stop it first"));
    }
    wait_memory_loaded(b)?;
    let c = &b.config;
    let config = SavedConfig {
        vm_name: c.name.clone(),
        kernel: b.kernel.clone(),
        initrd: c.initrd.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
        cmdline: c.cmdline.clone(),
        vcpus: c.vcpus,
        mem_mib: c.mem_mib,
        // Read with the VM paused, from the disks in use (create.rs).
        disks: Vec::new(),
        nets: c.nets.clone(),
    };
    let src = create::Source {
        vm: &b.vm,
        control: &b.control,
        memory: &b.memory,
        devices: &b.device_set,
        config,
        msr_indices: &b.msr_indices,
        disks: &b.disks,
    };
    let clone = clone.map(|c| create::CloneDisks { dir: c.dir, origin: c.name.clone(), clone: c.name }).map(|mut c| {
        c.origin = if b.config.name.is_empty() { "origin".into() } else { b.config.name.clone() };
        c
    });
    let mut progress = ProgressEvents { hub, last: None };
    let report = create::create(&src, &create::CreateOptions { out, parent, clone }, &mut |p| progress.report(p))
        .map_err(|e| {
            let code = match &e {
                crate::snapshot::SnapshotError::Exists(_) => ErrorCode::WrongState,
                e if e.is_bad_snapshot() => ErrorCode::OutOfRange,
                _ => ErrorCode::Failed,
            };
            ApiError::new(code, format!("snapshot: {e}"))
        })?;
    Ok(Reply::Snapshot(report))
}

fn restore_in_place(b: &BootHandles, dir: PathBuf, paused: bool, adopt: bool) -> Result<Reply, ApiError> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let from = crate::vm::RestoreFrom { dir, paused, new_generation: true, adopt };
    b.restore
        .put(crate::vm::RestoreRequest { from, reply: tx })
        .map_err(|_| ApiError::new(ErrorCode::WrongState, "another restore of this VM is in progress"))?;
    if b.events.send(crate::lifecycle::VmEvent::Restore).is_err() {
        return Err(ApiError::new(ErrorCode::WrongState, "the VM is shutting down"));
    }
    match rx.recv_timeout(Duration::from_secs(600)) {
        Ok(Ok(r)) => Ok(Reply::Restored { restored: true, boot: r.boot, switch_ns: r.switch_ns }),
        Ok(Err(e)) => Err(ApiError::new(ErrorCode::Failed, format!("restore: {e}"))),
        Err(_) => Err(ApiError::new(ErrorCode::Failed, "restore: the VM loop did not answer")),
    }
}

fn dirty_log(b: &BootHandles, action: DirtyLogAction) -> Result<Reply, ApiError> {
    use crate::snapshot::memory;
    let _one = b.snapshot_lock.try_lock().map_err(|_| {
        ApiError::new(ErrorCode::WrongState, "a snapshot of this VM is in progress: wait for it to finish")
    })?;
    let fail = |e: crate::snapshot::SnapshotError| failed("dirty log", e);
    match action {
        DirtyLogAction::Start => {
            memory::set_dirty_logging(&b.vm, &b.memory, true).map_err(fail)?;
            let mut scratch = memory::PageSet::default();
            memory::take_dirty(&b.vm, &b.memory, &mut scratch).map_err(fail)?;
            b.dirty_log_on.store(true, Ordering::Release);
            Ok(Reply::Done {})
        }
        DirtyLogAction::Stop => {
            memory::set_dirty_logging(&b.vm, &b.memory, false).map_err(fail)?;
            b.dirty_log_on.store(false, Ordering::Release);
            Ok(Reply::Done {})
        }
        DirtyLogAction::Take => {
            if !b.dirty_log_on.load(Ordering::Acquire) {
                return Err(ApiError::new(ErrorCode::WrongState, "the dirty log is off: send dirty_log start first"));
            }
            let end = b.regions.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
            let mut set = memory::PageSet::with_pages(end / memory::PAGE_SIZE);
            memory::take_dirty(&b.vm, &b.memory, &mut set).map_err(fail)?;
            let mut runs: Vec<(u64, u64)> = Vec::new();
            for p in set.iter() {
                match runs.last_mut() {
                    Some((first, n)) if *first + *n == p => *n += 1,
                    _ => runs.push((p, 1)),
                }
            }
            Ok(Reply::DirtyPages { pages: set.count(), runs })
        }
    }
}

fn status(b: &BootHandles) -> Status {
    Status {
        state: if b.control.is_paused() { RunState::Paused } else { RunState::Running },
        vcpus: b.control.vcpus() as u32,
        mem_bytes: b.mem_bytes,
        boot: b.boot,
        devices: b.devices.iter().map(|d| d.info.clone()).collect(),
        kernel: b.kernel.display().to_string(),
        shape: Some(VmShape {
            initrd: b.config.initrd.as_ref().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())),
            cmdline: b.config.cmdline.clone(),
            mem_mib: b.config.mem_mib,
            // The size the guest sees (an overlay's file is smaller).
            disks: lock(&b.disks)
                .iter()
                .zip(&b.device_set.blocks)
                .map(|(d, blk)| DiskShape {
                    path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
                    read_only: d.read_only,
                    size: lock(blk).device().capacity_sectors() * 512,
                })
                .collect(),
            nets: b.config.nets.iter().map(|n| hex::encode(n.mac)).collect(),
        }),
    }
}

fn hex(data: &[u8]) -> String {
    hex::encode(data)
}

fn type_keys(
    b: &BootHandles,
    text: Option<String>,
    events: Option<Vec<KeyEvent>>,
    hold_ms: u32,
    gap_ms: u32,
) -> Result<Reply, ApiError> {
    let bad = |m: String| ApiError::new(ErrorCode::BadRequest, m);
    if hold_ms > MAX_KEY_DELAY_MS || gap_ms > MAX_KEY_DELAY_MS {
        return Err(ApiError::new(ErrorCode::OutOfRange, format!("hold_ms and gap_ms go up to {MAX_KEY_DELAY_MS}")));
    }
    let plan: Vec<keymap::KeyEvent> = match (text, events) {
        (Some(t), None) => keymap::text_to_events(&t, hold_ms, gap_ms).map_err(|e| bad(e.to_string()))?,
        (None, Some(evs)) => evs
            .iter()
            .map(|e| {
                let code = e
                    .key
                    .parse::<u16>()
                    .ok()
                    .or_else(|| keymap::key_by_name(&e.key))
                    .ok_or_else(|| bad(format!("unknown key {:?}: use a Linux key name such as KEY_A or enter", e.key)))?;
                if e.delay_ms > MAX_KEY_DELAY_MS {
                    return Err(ApiError::new(ErrorCode::OutOfRange, format!("delay_ms goes up to {MAX_KEY_DELAY_MS}")));
                }
                Ok(keymap::KeyEvent { code, press: e.press, delay_ms: e.delay_ms })
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad("keys needs exactly one of \"text\" or \"events\"".into())),
    };
    if plan.len() > MAX_KEYS {
        return Err(ApiError::new(ErrorCode::TooLarge, format!("{} key events; the limit is {MAX_KEYS}", plan.len())));
    }
    let start = Instant::now();
    let mut delivered = 0u32;
    for ev in &plan {
        if ev.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(u64::from(ev.delay_ms)));
        }
        let mut kbd = b.keyboard.lock().map_err(|_| failed("keyboard", "lock poisoned"))?;
        kbd.key(ev.code, ev.press).map_err(|e| ApiError::new(ErrorCode::WrongState, e.to_string()))?;
        delivered += 1;
    }
    Ok(Reply::Keys { delivered, elapsed_ms: start.elapsed().as_millis() as u64 })
}
