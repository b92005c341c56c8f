//! The support API wire format (version 1): newline-delimited JSON over a
//! UNIX stream socket. Shared by the VMM (server) and any monitor (client);
//! docs/support-api.md is the reference.
//!
//! Every request is one line `{"id": N, "op": "...", ...}`; every reply is
//! one line `{"id": N, "ok": {...}}` or `{"id": N, "error": {...}}`.
//! Subscribed events arrive as `{"event": {...}}` lines in between. The
//! `memory` reply carries the guest-RAM memfd as SCM_RIGHTS ancillary data.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest request line accepted. Nothing legitimate comes near it; a
/// longer line gets a `too_large` error and is skipped.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest guest-memory read through the socket (the zero-copy path is the
/// memfd; this exists for clients that cannot map it, and as a baseline).
pub const MAX_READ_BYTES: u64 = 1 << 20;
/// Features this server offers, announced in the `hello` reply.
pub const FEATURES: &[&str] = &[
    "memfd", "pause", "pause_with_state", "regs", "sregs", "msrs", "debug", "irq", "nmi", "keys", "stats", "events",
    "read_memory", "snapshot", "restore", "dirty_log", "regenerate_vm_id",
];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// First request on a connection; the server refuses a version it
    /// does not speak.
    Hello { version: u32, client: String },
    /// VM shape: vCPUs, memory regions, devices, run state.
    Status,
    /// The guest-RAM memfd (SCM_RIGHTS) plus the layout to map it.
    Memory,
    Pause,
    /// Pause, and reply with every vCPU's registers as they stopped: what
    /// an inspection of the stopped guest needs first, without a round
    /// trip per vCPU while the guest waits.
    PauseWithState,
    Resume,
    GetRegs { vcpu: u32 },
    SetRegs { vcpu: u32, regs: Regs },
    GetSregs { vcpu: u32 },
    /// Sets the fields given; the rest keep their current value.
    SetSregs { vcpu: u32, sregs: SregsUpdate },
    GetMsrs { vcpu: u32, indices: Vec<u32> },
    SetMsrs { vcpu: u32, msrs: Vec<Msr> },
    /// Guest debug for one vCPU, or all when `vcpu` is absent. Software
    /// breakpoints are int3 bytes the client writes into guest memory;
    /// with `sw_breakpoints` they stop the VM instead of reaching the guest.
    SetDebug {
        #[serde(default)]
        vcpu: Option<u32>,
        #[serde(default)]
        single_step: bool,
        #[serde(default)]
        sw_breakpoints: bool,
        #[serde(default)]
        hw_breakpoints: Vec<HwBreakpoint>,
    },
    /// Pulses an IOAPIC input (edge).
    Irq { gsi: u32 },
    Nmi { vcpu: u32 },
    /// Types `text` (US layout) or plays raw `events` on the PS/2 keyboard;
    /// the reply comes when the last key is delivered.
    Keys {
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        events: Option<Vec<KeyEvent>>,
        #[serde(default = "default_hold_ms")]
        hold_ms: u32,
        #[serde(default = "default_gap_ms")]
        gap_ms: u32,
    },
    /// Per-device I/O totals.
    Stats,
    /// Guest physical memory copied through the socket (hex).
    ReadMemory { gpa: u64, len: u64 },
    Subscribe { kinds: Vec<EventKind> },
    Unsubscribe,
    /// Writes a live snapshot of this VM into directory `out` (which must
    /// not exist; absolute, or relative to the VMM's working directory).
    /// With `parent`, only the pages that differ from that snapshot.
    /// Progress goes out as `progress` events.
    Snapshot {
        out: std::path::PathBuf,
        #[serde(default)]
        parent: Option<std::path::PathBuf>,
        /// A clone point: the snapshot's writable disks become fresh
        /// overlays for a clone named `clone.name`, and this VM moves onto
        /// overlays of its own; both are created in `clone.dir`.
        #[serde(default)]
        clone: Option<CloneSpec>,
    },
    /// In-place restore: replaces this VM's memory, vCPUs and devices with
    /// the snapshot's; the VMM process, this socket, the taps and disks
    /// stay. The reply comes once the restored VM runs (or is parked, with
    /// `paused`).
    Restore {
        dir: std::path::PathBuf,
        #[serde(default)]
        paused: bool,
        /// The snapshot is another VM's of the same shape (a ShadowReboot
        /// shadow): this VM keeps its disk files and taps (their identity
        /// is not compared) and runs the snapshot's kernel, initrd and
        /// command line from now on, reboots included.
        #[serde(default)]
        adopt: bool,
    },
    /// KVM's dirty-page log: `start` turns it on, `take` returns the pages
    /// written since the last take (or start) and clears them, `stop`
    /// turns it off.
    DirtyLog { action: DirtyLogAction },
    /// Writes a new random VM generation ID and notifies the guest, whose
    /// vmgenid driver then reseeds its RNG: what a restore or clone does.
    RegenerateVmId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneSpec {
    pub dir: std::path::PathBuf,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyLogAction {
    Start,
    Take,
    Stop,
}

fn default_hold_ms() -> u32 {
    10
}
fn default_gap_ms() -> u32 {
    10
}

/// The general-purpose registers (KVM_GET_REGS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    #[serde(rename = "type")]
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// One stopped vCPU (`pause_with_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuState {
    pub vcpu: u32,
    pub regs: Regs,
    pub sregs: Sregs,
}

/// The special registers (KVM_GET_SREGS).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sregs {
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub tr: Segment,
    pub ldt: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The control registers a client may change; segments and tables are
/// left alone (changing them from outside is how guests get wedged).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SregsUpdate {
    pub cr0: Option<u64>,
    pub cr2: Option<u64>,
    pub cr3: Option<u64>,
    pub cr4: Option<u64>,
    pub cr8: Option<u64>,
    pub efer: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub value: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HwBreakpointKind {
    Execute,
    Write,
    ReadWrite,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HwBreakpoint {
    pub addr: u64,
    pub kind: HwBreakpointKind,
    /// 1, 2, 4 or 8 bytes (ignored for execute).
    #[serde(default = "one")]
    pub len: u8,
}

fn one() -> u8 {
    1
}

/// One key transition; `delay_ms` is the wait before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyEvent {
    /// A Linux key name ("KEY_A", "enter", "leftshift") or code ("30").
    pub key: String,
    pub press: bool,
    #[serde(default)]
    pub delay_ms: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Console,
    Io,
    Lifecycle,
    Debug,
    Progress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
    /// Between boots (reboot in progress) or shutting down.
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRegion {
    /// Guest physical address of the region.
    pub gpa: u64,
    pub size: u64,
    /// Where the region starts in the memfd.
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    pub name: String,
    pub kind: String,
}

/// Successful replies. Untagged on the wire: the request id says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Reply {
    Hello { version: u32, features: Vec<String>, vmm: String },
    Status(Status),
    Memory { size: u64, regions: Vec<MemoryRegion>, boot: u64 },
    /// Before `Paused`: untagged decoding takes the first variant that fits.
    PausedWithState { already: bool, stop_ns: u64, vcpus: Vec<VcpuState> },
    Paused { already: bool, stop_ns: u64 },
    Resumed { already: bool },
    Regs(Regs),
    Sregs(Sregs),
    Msrs { msrs: Vec<Msr> },
    Keys { delivered: u32, elapsed_ms: u64 },
    Stats { devices: Vec<DeviceStats> },
    Bytes { gpa: u64, hex: String },
    Subscribed { kinds: Vec<EventKind> },
    Snapshot(CreateReport),
    /// `switch_ns`: from the old guest's pause to the restored guest's
    /// start (its downtime as the VMM sees it).
    Restored {
        restored: bool,
        boot: u64,
        #[serde(default)]
        switch_ns: u64,
    },
    /// Dirty pages as runs of (first page, count); page = gpa / 4096.
    DirtyPages { runs: Vec<(u64, u64)>, pages: u64 },
    /// The new VM generation ID, 32 hex digits in guest memory order.
    /// Before `Done`, which would match any object.
    VmId { vm_id: String },
    Done {},
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub state: RunState,
    pub vcpus: u32,
    pub mem_bytes: u64,
    /// Counts boots of this VMM process: a reboot means a new memfd.
    pub boot: u64,
    pub devices: Vec<DeviceInfo>,
    /// The kernel image the VM booted (a monitor finds its profile
    /// beside it).
    #[serde(default)]
    pub kernel: String,
    /// How this VM boots and what it is attached to: what a ShadowReboot
    /// shadow of it needs to be of the same shape.
    #[serde(default)]
    pub shape: Option<VmShape>,
}

/// The configuration a VM's next boot uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub mem_mib: u64,
    pub disks: Vec<DiskShape>,
    /// Each interface's MAC address, as 12 hex digits.
    pub nets: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    pub path: PathBuf,
    pub read_only: bool,
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStats {
    pub name: String,
    pub kind: String,
    pub totals: IoTotals,
}

/// Per-device I/O accounting as `stats` and `io` events report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoKind {
    Read,
    Write,
    Flush,
    Rx,
    Tx,
}

/// One operation. `t_ns` is CLOCK_MONOTONIC, the clock the monitor and the
/// VMM share on one host, so times compare across processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoRecord {
    pub t_ns: u64,
    pub kind: IoKind,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoTotals {
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Requests that failed: malformed chains, I/O errors, refused writes.
    pub errors: u64,
    /// Frames lost: no room in the guest's buffer, or the host refused.
    pub dropped: u64,
}

/// How a `snapshot` went (also what `dvisor snapshot` prints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreateReport {
    pub dir: PathBuf,
    pub id: String,
    pub kind: SnapshotKind,
    pub was_paused: bool,
    pub pause_ns: u64,
    pub total_ns: u64,
    pub precopy_rounds: u32,
    pub pages_in_layer: u64,
    pub bytes_written: u64,
    pub last_round_pages: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    Full,
    Incremental,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not a request this version knows.
    BadRequest,
    TooLarge,
    /// A value outside what this VM has (vCPU index, GSI, address).
    OutOfRange,
    /// Valid, but not now (e.g. no guest between boots, hello missing).
    WrongState,
    VersionMismatch,
    /// KVM or the host refused.
    Failed,
    /// The client is neither the VM's user nor root (`SO_PEERCRED`).
    PermissionDenied,
    /// The socket already serves as many connections as it takes.
    Busy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError { code, message: message.into() }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({:?})", self.message, self.code)
    }
}

impl std::error::Error for ApiError {}

/// One line from the server. Built, encoded and dropped at once, so the
/// size of the register variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ServerMessage {
    Ok { id: Option<u64>, ok: Reply },
    Err { id: Option<u64>, error: ApiError },
    Event { event: Event },
}

/// Something that happened in the VM, time-stamped with CLOCK_MONOTONIC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    Console { t_ns: u64, line: String },
    Io { t_ns: u64, device: String, records: Vec<IoRecord>, lost: u64 },
    Lifecycle { t_ns: u64, what: Lifecycle, detail: String },
    Debug { t_ns: u64, vcpu: u32, reason: DebugReason, rip: u64, dr6: u64 },
    /// Long work (a snapshot) advanced: `done` of `total` bytes.
    Progress { t_ns: u64, what: String, done: u64, total: u64 },
    /// The subscriber fell behind and this many events were dropped.
    Lost { count: u64 },
}

impl Event {
    pub fn kind(&self) -> Option<EventKind> {
        match self {
            Event::Console { .. } => Some(EventKind::Console),
            Event::Io { .. } => Some(EventKind::Io),
            Event::Lifecycle { .. } => Some(EventKind::Lifecycle),
            Event::Debug { .. } => Some(EventKind::Debug),
            Event::Progress { .. } => Some(EventKind::Progress),
            Event::Lost { .. } => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lifecycle {
    Boot,
    Reboot,
    Shutdown,
    Crash,
    Paused,
    Resumed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DebugReason {
    Breakpoint,
    HwBreakpoint,
    SingleStep,
}

/// Parses one request line. Never panics, whatever the bytes.
pub fn decode_request(line: &[u8]) -> Result<Envelope, (Option<u64>, ApiError)> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err((None, ApiError::new(ErrorCode::TooLarge, format!("request of {} bytes; the limit is {MAX_REQUEST_BYTES}", line.len()))));
    }
    let text = std::str::from_utf8(line)
        .map_err(|e| (None, ApiError::new(ErrorCode::BadRequest, format!("request is not UTF-8: {e}"))))?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| (None, ApiError::new(ErrorCode::BadRequest, format!("request is not JSON: {e}"))))?;
    // The id is recovered first so that even a bad request gets a reply
    // the client can match.
    let id = value.get("id").and_then(serde_json::Value::as_u64);
    if id.is_none() {
        return Err((None, ApiError::new(ErrorCode::BadRequest, "request has no numeric \"id\"")));
    }
    serde_json::from_value(value)
        .map_err(|e| (id, ApiError::new(ErrorCode::BadRequest, format!("bad request: {e}"))))
}

/// Encodes a message as one line (with the newline).
pub fn encode_line<T: Serialize>(msg: &T) -> Vec<u8> {
    // Our own types always serialize; a failure would be a bug, reported
    // to the peer rather than panicking the VMM.
    let mut v = serde_json::to_vec(msg)
        .unwrap_or_else(|e| format!("{{\"error\":{{\"code\":\"failed\",\"message\":\"encode: {e}\"}}}}").into_bytes());
    v.push(b'\n');
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Hello { version: 1, client: "t".into() },
            Request::GetRegs { vcpu: 1 },
            Request::SetDebug { vcpu: None, single_step: true, sw_breakpoints: false, hw_breakpoints: vec![] },
            Request::Keys { text: Some("hi\n".into()), events: None, hold_ms: 5, gap_ms: 5 },
            Request::Subscribe { kinds: vec![EventKind::Console, EventKind::Lifecycle] },
            Request::RegenerateVmId,
        ];
        for (i, r) in reqs.into_iter().enumerate() {
            let env = Envelope { id: i as u64, request: r };
            let line = encode_line(&env);
            assert_eq!(decode_request(&line[..line.len() - 1]).unwrap(), env);
        }
    }

    #[test]
    fn bad_requests_keep_their_id_when_they_have_one() {
        let (id, e) = decode_request(br#"{"id":7,"op":"get_regs","vcpu":"x"}"#).unwrap_err();
        assert_eq!(id, Some(7));
        assert_eq!(e.code, ErrorCode::BadRequest);
        let (id, e) = decode_request(br#"{"id":8,"op":"launch_missiles"}"#).unwrap_err();
        assert_eq!((id, e.code), (Some(8), ErrorCode::BadRequest));
        let (id, _) = decode_request(b"\xff\xfe").unwrap_err();
        assert_eq!(id, None);
        let (_, e) = decode_request(&vec![b'{'; MAX_REQUEST_BYTES + 1]).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
    }

    #[test]
    fn server_messages_parse_back() {
        let msgs = [
            ServerMessage::Ok { id: Some(1), ok: Reply::Paused { already: false, stop_ns: 42 } },
            ServerMessage::Ok { id: Some(2), ok: Reply::VmId { vm_id: "00112233445566778899aabbccddeeff".into() } },
            ServerMessage::Err { id: None, error: ApiError::new(ErrorCode::TooLarge, "x") },
            ServerMessage::Event { event: Event::Console { t_ns: 1, line: "heartbeat 1 v1".into() } },
        ];
        for m in msgs {
            let line = encode_line(&m);
            let back: ServerMessage = serde_json::from_slice(&line).unwrap();
            assert_eq!(back, m);
        }
    }

    mod fuzz {
        use super::super::*;
        use proptest::prelude::*;

        /// Valid request lines to mutate.
        const SEEDS: &[&str] = &[
            r#"{"id":1,"op":"hello","version":1,"client":"x"}"#,
            r#"{"id":2,"op":"get_regs","vcpu":0}"#,
            r#"{"id":3,"op":"set_debug","vcpu":1,"single_step":true,"hw_breakpoints":[{"addr":4096,"kind":"write","len":4}]}"#,
            r#"{"id":4,"op":"keys","events":[{"key":"a","press":true,"delay_ms":5}]}"#,
            r#"{"id":5,"op":"read_memory","gpa":1048576,"len":4096}"#,
            r#"{"id":6,"op":"set_msrs","vcpu":0,"msrs":[{"index":3221225600,"value":1}]}"#,
        ];

        proptest! {
            #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = decode_request(&bytes);
            }

            #[test]
            fn mutated_requests_decode_or_fail_cleanly(
                seed in 0..SEEDS.len(),
                edits in proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 1..8),
            ) {
                let mut b = SEEDS[seed].as_bytes().to_vec();
                for (pos, byte, how) in edits {
                    let at = pos % (b.len() + 1);
                    match how {
                        0 if at < b.len() => b[at] = byte,
                        1 => b.insert(at, byte),
                        _ if at < b.len() => { b.remove(at); }
                        _ => {}
                    }
                }
                match decode_request(&b) {
                    // Whatever decodes must encode and decode to itself.
                    Ok(env) => {
                        let line = encode_line(&env);
                        prop_assert_eq!(decode_request(&line[..line.len() - 1]).ok(), Some(env));
                    }
                    Err((_, e)) => prop_assert!(!e.message.is_empty()),
                }
            }

            #[test]
            fn any_numbers_in_valid_shapes_decode(id in any::<u64>(), vcpu in any::<u32>(), gpa in any::<u64>(), len in any::<u64>()) {
                let line = format!(r#"{{"id":{id},"op":"read_memory","gpa":{gpa},"len":{len}}}"#);
                prop_assert_eq!(decode_request(line.as_bytes()).unwrap().request, Request::ReadMemory { gpa, len });
                let line = format!(r#"{{"id":{id},"op":"nmi","vcpu":{vcpu}}}"#);
                prop_assert_eq!(decode_request(line.as_bytes()).unwrap().id, id);
            }
        }
    }
}
