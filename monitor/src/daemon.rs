//! `dvisor monitor`: attach to a VMM, map its memory, follow its events
//! and serve the operator's control socket. The guest never depends on
//! this process: kill it and the VM runs on; start it again and it
//! re-attaches.
//!
//! The monitor is a builder (`attach`) and a runtime (`serve`) around the
//! core (the VMM connection and guest memory, `crate::core`) and its
//! services (`crate::services`), each with its own state; here they are
//! only wired to the control socket and the event stream.
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dvisor_api::protocol::{
    encode_line, ApiError, ErrorCode, Event, EventKind, Lifecycle, Reply, Request, ServerMessage,
    Status, MAX_READ_BYTES,
};
use dvisor_api::{monotonic_ns, owner, ClientError, EventHub, VmmClient};

use crate::control::{ControlEnvelope, ControlRequest, MonitorStatus, VcpuRegs, MAX_CONTROL_LINE};
use crate::core::Core;
use crate::error::MonitorError;
use crate::services::patching::PatchService;
use crate::services::update::{Launcher, UpdateService};
use crate::services::vmi::{VmiService, MAX_ACCESS};
use crate::services::{inject, Live};

/// Events kept for `dvisor events --recent N`.
const RECENT_EVENTS: usize = 1000;
/// How long to wait for a VMM that is still starting.
const ATTACH_WAIT: Duration = Duration::from_secs(60);
const ALL_KINDS: &[EventKind] =
    &[EventKind::Console, EventKind::Io, EventKind::Lifecycle, EventKind::Debug, EventKind::Progress];

pub struct Monitor {
    core: Core,
    vmi: VmiService,
    patches: PatchService,
    update: UpdateService,
    /// The VM's name (its runtime directory's), for naming its shadows.
    name: String,
    recent: Mutex<VecDeque<Event>>,
    hub: EventHub,
    events_seen: AtomicU64,
    attached_ns: u64,
}

impl Monitor {
    /// Connects to the VMM's support API (waiting for it to appear) and
    /// maps guest memory. Kernel profiles are cached under `cache_root`
    /// when they cannot be kept beside their vmlinux.
    /// `launcher` starts ShadowReboot's shadow VMs (None: no updates).
    pub fn attach(
        api: &Path,
        vmlinux: Option<PathBuf>,
        cache_root: PathBuf,
        launcher: Option<Launcher>,
    ) -> Result<Arc<Monitor>, MonitorError> {
        let start = Instant::now();
        let vmm = loop {
            match VmmClient::connect(api, "dvisor-monitor") {
                Ok(c) => break c,
                Err(e @ ClientError::Connect(..)) if start.elapsed() < ATTACH_WAIT => {
                    tracing::debug!("waiting for the VMM: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let monitor = Arc::new(Monitor {
            core: Core::new(vmm),
            vmi: VmiService::new(vmlinux, cache_root),
            patches: PatchService::default(),
            update: UpdateService::new(launcher, api.parent().unwrap_or(Path::new(".")).to_path_buf()),
            name: api
                .parent()
                .and_then(|d| d.file_name())
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "vm".into()),
            recent: Mutex::new(VecDeque::new()),
            hub: EventHub::default(),
            events_seen: AtomicU64::new(0),
            attached_ns: monotonic_ns(),
        });
        monitor.core.remap()?;
        Ok(monitor)
    }

    /// A reboot or restore: new memory, kernel found again, patches of the
    /// old boot forgotten. Idempotent for the same boot.
    fn after_new_boot(&self) {
        let old = self.core.boot();
        if let Err(e) = self.core.remap() {
            tracing::warn!("remapping guest memory after a reboot or restore: {e}");
        }
        let boot = self.core.boot();
        if boot != old || boot.is_none() {
            self.vmi.forget_kernel_view();
            self.patches.reset(boot.unwrap_or(0));
        }
    }

    pub fn vmm(&self) -> &VmmClient {
        self.core.vmm()
    }

    /// The guest as the services act on it.
    fn live(&self) -> Live<'_> {
        Live { core: &self.core, vmi: &self.vmi }
    }

    fn with_vmi<T>(
        &self,
        consistent: bool,
        f: impl FnOnce(&crate::vmi::Vmi<'_, crate::GuestMemoryMap>) -> Result<T, crate::vmi::VmiError>,
    ) -> Result<T, MonitorError> {
        self.vmi.with_vmi(&self.core, consistent, f)
    }

    /// Serves `control` until the VMM goes away. Returns Ok when it does.
    pub fn serve(self: &Arc<Self>, control: &Path) -> Result<(), MonitorError> {
        let events = self.vmm().subscribe(ALL_KINDS)?;
        // A boot that began between attach and subscribe sent its Boot
        // event before we listened.
        if self.core.boot().is_none() {
            if let Err(e) = self.core.remap() {
                tracing::warn!("mapping guest memory: {e}");
            }
        }
        let listener = bind_control(control)?;
        let boot = self.core.boot().unwrap_or(0);
        self.patches.load(control.with_file_name("patches.json"), boot);
        let _cleanup = RemoveOnDrop(control.to_owned());
        {
            let me = self.clone();
            std::thread::Builder::new()
                .name("control-accept".into())
                .spawn(move || {
                    let slots = owner::Slots::default();
                    for conn in listener.incoming().flatten() {
                        // Another user, or one connection too many: told why, closed.
                        let Some(slot) = slots.admit(&conn) else { continue };
                        let me = me.clone();
                        let _ = std::thread::Builder::new().name("control-conn".into()).spawn(move || {
                            let _slot = slot;
                            me.serve_client(conn)
                        });
                    }
                })
                .map_err(|e| MonitorError::Io("starting the control thread".into(), e))?;
        }
        // The event stream ends exactly when the VMM connection does.
        for ev in events {
            self.events_seen.fetch_add(1, Ordering::Relaxed);
            if let Event::Lifecycle { what: Lifecycle::Boot, .. } = &ev {
                self.after_new_boot();
            }
            {
                let mut r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
                if r.len() == RECENT_EVENTS {
                    r.pop_front();
                }
                r.push_back(ev.clone());
            }
            self.hub.publish(ev);
        }
        eprintln!("dvisor monitor: the VMM at {} closed the support API; exiting", self.vmm().path().display());
        Ok(())
    }

    fn serve_client(&self, conn: UnixStream) {
        let Ok(mut writer) = conn.try_clone() else { return };
        let mut reader = BufReader::new(conn);
        loop {
            // A line longer than the limit is refused and the connection
            // closed: nothing it sends can make the monitor hold more.
            let mut line = Vec::new();
            match (&mut reader).take(MAX_CONTROL_LINE as u64 + 1).read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line.len() > MAX_CONTROL_LINE {
                let error = ApiError::new(ErrorCode::TooLarge, format!("request longer than {MAX_CONTROL_LINE} bytes; closing"));
                let _ = writer.write_all(&encode_line(&ServerMessage::Err { id: None, error }));
                return;
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let env: ControlEnvelope = match serde_json::from_slice(&line) {
                Ok(e) => e,
                Err(e) => {
                    let error = ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}"));
                    if writer.write_all(&encode_line(&ServerMessage::Err { id: None, error })).is_err() {
                        return;
                    }
                    continue;
                }
            };
            let id = Some(env.id);
            if let ControlRequest::Events { kinds, recent } = env.request {
                return self.stream_events(writer, id, kinds, recent);
            }
            let msg = match self.handle(env.request) {
                Ok(v) => serde_json::json!({ "id": id, "ok": v }),
                Err(e) => serde_json::json!({ "id": id, "error": to_api_error(e) }),
            };
            if writer.write_all(&encode_line(&msg)).is_err() {
                return;
            }
        }
    }

    /// Passes a request on to the VMM and its reply back.
    fn forward(&self, request: Request) -> Result<serde_json::Value, MonitorError> {
        Ok(self.vmm().call(request)?)
    }

    fn handle(&self, req: ControlRequest) -> Result<serde_json::Value, MonitorError> {
        let v = match req {
            ControlRequest::Status => {
                let vm: Status = self.vmm().call(Request::Status)?;
                serde_json::to_value(MonitorStatus {
                    monitor_pid: std::process::id(),
                    api_socket: self.vmm().path().display().to_string(),
                    vm,
                    events_seen: self.events_seen.load(Ordering::Relaxed),
                    attached_ns: self.attached_ns,
                })
            }
            ControlRequest::Pause => return self.forward(Request::Pause),
            ControlRequest::Snapshot { out, parent, clone } => {
                return self.forward(Request::Snapshot { out, parent, clone })
            }
            ControlRequest::Restore { dir, paused } => {
                let reply: serde_json::Value = self.vmm().call(Request::Restore { dir, paused, adopt: false })?;
                // The restored VM has a new memfd and maybe another kernel
                // layout. The boot event says so too, but later: a request
                // right after this reply must not read the old memory.
                self.after_new_boot();
                return Ok(reply);
            }
            ControlRequest::Resume => return self.forward(Request::Resume),
            ControlRequest::Regs { vcpu } => {
                let vcpus = match vcpu {
                    Some(v) => vec![v],
                    None => {
                        let s: Status = self.vmm().call(Request::Status)?;
                        (0..s.vcpus).collect()
                    }
                };
                let mut all = Vec::new();
                for v in vcpus {
                    let regs = self.vmm().call(Request::GetRegs { vcpu: v })?;
                    let sregs = self.vmm().call(Request::GetSregs { vcpu: v })?;
                    all.push(VcpuRegs { vcpu: v, regs, sregs });
                }
                serde_json::to_value(all)
            }
            ControlRequest::Keys { text, events, hold_ms, gap_ms } => {
                return self.forward(Request::Keys {
                    text,
                    events,
                    hold_ms: hold_ms.unwrap_or(10),
                    gap_ms: gap_ms.unwrap_or(10),
                })
            }
            ControlRequest::Stats => return self.forward(Request::Stats),
            ControlRequest::ReadPhys { gpa, len } => {
                if len > MAX_READ_BYTES {
                    return Err(MonitorError::Api(ApiError::new(ErrorCode::TooLarge, format!("read_phys is limited to {MAX_READ_BYTES} bytes"))));
                }
                let mut buf = vec![0u8; len as usize];
                self.core.with_memory(|m| m.read(gpa, &mut buf))?;
                serde_json::to_value(Reply::Bytes { gpa, hex: hex(&buf) })
            }
            ControlRequest::Ps { consistent } => serde_json::to_value(self.with_vmi(consistent, |v| v.processes())?),
            ControlRequest::Maps { pid, consistent } => {
                serde_json::to_value(self.with_vmi(consistent, |v| v.memory_map(pid))?)
            }
            ControlRequest::Mem { pid, addr, len, write, consistent } => {
                let data = write.as_deref().map(unhex).transpose()?;
                check_len(data.as_ref().map_or(len, |d| d.len() as u64))?;
                let bytes = self.with_vmi(consistent, |v| {
                    let p = v.process_by_pid(pid)?;
                    if p.mm == 0 {
                        return Err(crate::vmi::VmiError::KernelThread(pid));
                    }
                    let pgd = v.mm_pgd(p.mm)?;
                    match &data {
                        Some(d) => v.write_user(pgd, addr, d).map(|_| d.clone()),
                        None => {
                            let mut buf = vec![0u8; len as usize];
                            v.read_user(pgd, addr, &mut buf).map(|_| buf)
                        }
                    }
                })?;
                serde_json::to_value(Reply::Bytes { gpa: addr, hex: hex(&bytes) })
            }
            ControlRequest::Kmem { target, len, write } => {
                let addr = self.vmi.kernel_address(&self.core, &target)?;
                let data = write.as_deref().map(unhex).transpose()?;
                check_len(data.as_ref().map_or(len, |d| d.len() as u64))?;
                let bytes = self.with_vmi(false, |v| match &data {
                    Some(d) => v.write_kernel(addr, d).map(|_| d.clone()),
                    None => {
                        let mut buf = vec![0u8; len as usize];
                        v.read_kernel(addr, &mut buf).map(|_| buf)
                    }
                })?;
                serde_json::to_value(Reply::Bytes { gpa: addr, hex: hex(&bytes) })
            }
            ControlRequest::Ksym { query } => serde_json::to_value(self.vmi.ksym(&self.core, &query)?),
            ControlRequest::PatchApply { pid, object, commands, binary, unsafe_mode } => {
                serde_json::to_value(self.patches.apply_patch(&self.live(), pid, &object, &commands, &binary, unsafe_mode)?)
            }
            ControlRequest::PatchList => serde_json::to_value(self.patches.patches()),
            ControlRequest::PatchRevert { patch } => serde_json::to_value(self.patches.revert_patch(&self.live(), patch)?),
            ControlRequest::Syscall { pid, nr, args } => {
                let mut a = [0u64; 6];
                for (d, s) in a.iter_mut().zip(&args) {
                    *d = *s;
                }
                serde_json::to_value(serde_json::json!({ "rax": inject::inject_syscall(&self.live(), pid, nr, a)? }))
            }
            ControlRequest::Update(req) => {
                let dropped = self.patches.patches().len();
                let report = self.update.update(&self.core, &self.name, &req, dropped);
                if report.is_ok() {
                    // As after a restore: new memory, maybe a new kernel.
                    self.after_new_boot();
                    if dropped > 0 {
                        tracing::info!("update: {dropped} process patches of the old guest are gone with it");
                    }
                }
                serde_json::to_value(report?)
            }
            ControlRequest::Events { .. } => unreachable!("streamed by serve_client"),
        };
        v.map_err(|e| MonitorError::Protocol(e.to_string()))
    }

    fn stream_events(&self, mut w: UnixStream, id: Option<u64>, kinds: Vec<EventKind>, recent: usize) {
        let kinds = if kinds.is_empty() { ALL_KINDS.to_vec() } else { kinds };
        // Subscribe before copying the backlog so nothing falls between.
        let sub = self.hub.subscribe(&kinds);
        let backlog: Vec<Event> = {
            let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            let matching: Vec<_> = r.iter().filter(|e| e.kind().is_some_and(|k| kinds.contains(&k))).cloned().collect();
            matching[matching.len().saturating_sub(recent)..].to_vec()
        };
        let ack = serde_json::json!({ "id": id, "ok": { "kinds": kinds } });
        if w.write_all(&encode_line(&ack)).is_err() {
            return;
        }
        for ev in backlog {
            if w.write_all(&encode_line(&ServerMessage::Event { event: ev })).is_err() {
                return;
            }
        }
        for ev in sub.rx {
            let lost = sub.lost.swap(0, Ordering::Relaxed);
            if lost > 0 && w.write_all(&encode_line(&ServerMessage::Event { event: Event::Lost { count: lost } })).is_err() {
                return;
            }
            if w.write_all(&encode_line(&ServerMessage::Event { event: (*ev).clone() })).is_err() {
                return;
            }
        }
    }
}

fn hex(data: &[u8]) -> String {
    hex::encode(data)
}

fn unhex(s: &str) -> Result<Vec<u8>, MonitorError> {
    hex::decode(s).map_err(|_| MonitorError::Api(ApiError::new(ErrorCode::BadRequest, format!("{s:?} is not an even number of hex digits"))))
}

fn check_len(len: u64) -> Result<(), MonitorError> {
    if len == 0 || len > MAX_ACCESS {
        return Err(MonitorError::Api(ApiError::new(
            ErrorCode::OutOfRange,
            format!("length {len}: use 1 to {} bytes", MAX_ACCESS),
        )));
    }
    Ok(())
}

fn to_api_error(e: MonitorError) -> ApiError {
    match e {
        MonitorError::Api(e) => e,
        MonitorError::OutOfRange { .. } | MonitorError::Vmi(_) => ApiError::new(ErrorCode::OutOfRange, e.to_string()),
        MonitorError::Patch(m) => ApiError::new(ErrorCode::Failed, m),
        MonitorError::PatchInput(m) => ApiError::new(ErrorCode::BadRequest, m),
        other => ApiError::new(ErrorCode::Failed, other.to_string()),
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds the control socket, replacing a stale one left by a killed
/// monitor; refuses if a live monitor answers there.
fn bind_control(path: &Path) -> Result<UnixListener, MonitorError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty() && !d.exists()) {
        owner::private_dir(dir).map_err(|e| MonitorError::Io(format!("creating {}", dir.display()), e))?;
    }
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(MonitorError::Io(
                format!("{} exists and is not a socket", path.display()),
                std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            ));
        }
        if let Ok(mut c) = crate::control::ControlClient::connect(path) {
            let pid = c
                .call::<MonitorStatus>(ControlRequest::Status)
                .map(|s| s.monitor_pid.to_string())
                .unwrap_or_else(|_| "unknown".into());
            return Err(MonitorError::MonitorRunning(path.to_owned(), pid));
        }
        let _ = std::fs::remove_file(path);
    }
    owner::bind_private(path).map_err(|e| MonitorError::Io(format!("binding {}", path.display()), e))
}
