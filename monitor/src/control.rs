//! The operator's control socket: what `dvisor pause`, `regs`, `keys`,
//! `stats`, `events` and `status` talk to. Same framing as the support
//! API (one JSON object per line, `{"id", "ok"|"error"}` replies), with the
//! monitor's own operations.
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use dvisor_api::protocol::{Event, EventKind, KeyEvent, Regs, Sregs};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use dvisor_api::client::RawMessage;
use crate::error::MonitorError;

/// The longest request line the control socket takes: a memory write of
/// the largest size VMI allows (1 MiB) as hex, with room to spare. A
/// longer line is refused and its connection closed.
pub const MAX_CONTROL_LINE: usize = 4 << 20;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ControlEnvelope {
    pub id: u64,
    #[serde(flatten)]
    pub request: ControlRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    Status,
    Pause,
    Resume,
    Regs {
        #[serde(default)]
        vcpu: Option<u32>,
    },
    Keys {
        #[serde(default)]
        text: Option<String>,
        #[serde(default)]
        events: Option<Vec<KeyEvent>>,
        #[serde(default)]
        hold_ms: Option<u32>,
        #[serde(default)]
        gap_ms: Option<u32>,
    },
    Stats,
    /// Streams events: first the `recent` latest the monitor kept, then
    /// live ones, until the client hangs up.
    Events {
        #[serde(default)]
        kinds: Vec<EventKind>,
        #[serde(default)]
        recent: usize,
    },
    /// Guest-physical memory through the monitor's shared mapping (hex).
    ReadPhys { gpa: u64, len: u64 },
    /// The guest's processes (VMI).
    Ps {
        #[serde(default)]
        consistent: bool,
    },
    /// A process's memory map (VMI).
    Maps {
        pid: u32,
        #[serde(default)]
        consistent: bool,
    },
    /// Reads (or with `write`, hex bytes, writes) a process's virtual memory.
    Mem {
        pid: u32,
        addr: u64,
        #[serde(default)]
        len: u64,
        #[serde(default)]
        write: Option<String>,
        #[serde(default)]
        consistent: bool,
    },
    /// The same for kernel virtual memory; `target` is a symbol or address.
    Kmem {
        target: String,
        #[serde(default)]
        len: u64,
        #[serde(default)]
        write: Option<String>,
    },
    /// Kernel symbol lookup: a name gives its runtime address, an address
    /// gives symbol+offset.
    Ksym { query: String },
    /// Applies a live patch to a process (paths are on the monitor's host).
    PatchApply {
        pid: u32,
        object: std::path::PathBuf,
        commands: std::path::PathBuf,
        binary: std::path::PathBuf,
        #[serde(default)]
        unsafe_mode: bool,
    },
    PatchList,
    PatchRevert { patch: u32 },
    /// A live snapshot of the VM into `out` (a path on the VMM's host),
    /// incremental over `parent` if given.
    Snapshot {
        out: std::path::PathBuf,
        #[serde(default)]
        parent: Option<std::path::PathBuf>,
        /// A clone point (see the support API's `snapshot`).
        #[serde(default)]
        clone: Option<dvisor_api::protocol::CloneSpec>,
    },
    /// In-place restore of the VM from snapshot `dir`.
    Restore {
        dir: std::path::PathBuf,
        #[serde(default)]
        paused: bool,
    },
    /// Runs a system call inside a process (used by the patcher for its
    /// space; exposed for debugging).
    Syscall {
        pid: u32,
        nr: u64,
        #[serde(default)]
        args: Vec<u64>,
    },
    /// ShadowReboot: update (or rejuvenate) the guest through a shadow VM
    /// (docs/shadowreboot.md). The reply is an `UpdateReport`.
    Update(crate::services::update::UpdateRequest),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MonitorStatus {
    pub monitor_pid: u32,
    pub api_socket: String,
    pub vm: dvisor_api::protocol::Status,
    /// Events the monitor has seen since it attached.
    pub events_seen: u64,
    pub attached_ns: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuRegs {
    pub vcpu: u32,
    pub regs: Regs,
    pub sregs: Sregs,
}

/// A connection from the operator's CLI to a monitor.
pub struct ControlClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl ControlClient {
    pub fn connect(path: &Path) -> Result<ControlClient, MonitorError> {
        let stream = UnixStream::connect(path).map_err(|e| MonitorError::NoMonitor(path.to_owned(), e))?;
        // Never send commands to a socket another user put in our place.
        dvisor_api::owner::check_server(&stream, path).map_err(|e| MonitorError::Io("checking the monitor's owner".into(), e))?;
        let writer = stream.try_clone().map_err(|e| MonitorError::Io("cloning the control socket".into(), e))?;
        Ok(ControlClient { reader: BufReader::new(stream), writer, next_id: 1 })
    }

    pub fn call<T: DeserializeOwned>(&mut self, request: ControlRequest) -> Result<T, MonitorError> {
        self.send(request)?;
        loop {
            let r = self.read_line()?;
            if r.event.is_some() {
                continue;
            }
            return match (r.ok, r.error) {
                (Some(v), _) => serde_json::from_value(v).map_err(|e| MonitorError::Protocol(format!("unexpected reply: {e}"))),
                (None, Some(e)) => Err(MonitorError::Monitor(e)),
                (None, None) => Err(MonitorError::Protocol("reply with neither ok nor error".into())),
            };
        }
    }

    /// Starts an event stream; call `next_event` for each event.
    pub fn follow(&mut self, kinds: Vec<EventKind>, recent: usize) -> Result<(), MonitorError> {
        let _: serde_json::Value = self.call(ControlRequest::Events { kinds, recent })?;
        Ok(())
    }

    /// The next streamed event; `None` when the monitor hung up.
    pub fn next_event(&mut self) -> Result<Option<Event>, MonitorError> {
        loop {
            match self.read_line() {
                Ok(r) => {
                    if let Some(e) = r.event {
                        return Ok(Some(e));
                    }
                }
                Err(MonitorError::Disconnected(_)) => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn set_read_timeout(&self, t: Option<Duration>) {
        let _ = self.reader.get_ref().set_read_timeout(t);
    }

    fn send(&mut self, request: ControlRequest) -> Result<(), MonitorError> {
        let id = self.next_id;
        self.next_id += 1;
        let line = dvisor_api::protocol::encode_line(&ControlEnvelope { id, request });
        self.writer.write_all(&line).map_err(|e| MonitorError::Io("writing to the monitor".into(), e))
    }

    fn read_line(&mut self) -> Result<RawMessage, MonitorError> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err(MonitorError::Disconnected("the monitor".into())),
            Ok(_) => serde_json::from_str(&line).map_err(|e| MonitorError::Protocol(format!("bad line from the monitor: {e}"))),
            Err(e) => Err(MonitorError::Io("reading from the monitor".into(), e)),
        }
    }
}
