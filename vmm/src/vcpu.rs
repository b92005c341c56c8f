//! The vCPU thread: runs KVM_RUN and routes exits to devices or to the VM
//! loop.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::cpu;
use crate::devices::{MmioBus, PioBus};
use crate::lifecycle::{EventSender, VmEvent};

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

pub struct VcpuRunner {
    pub id: u32,
    pub fd: VcpuFd,
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub stop: Arc<AtomicBool>,
    pub events: EventSender,
}

impl VcpuRunner {
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            if let Some(reason) = self.step() {
                let registers = cpu::dump_registers(&self.fd);
                let _ = self.events.send(VmEvent::Fatal { vcpu: self.id, reason, registers });
                return;
            }
        }
    }

    /// Runs the vCPU until its next exit; returns a reason when it must stop.
    fn step(&mut self) -> Option<String> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => return Some(format!("KVM_RUN failed: {e}")),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.pio.read(port, data);
                tracing::trace!(vcpu = self.id, port, ?data, "pio in");
            }
            VcpuExit::IoOut(port, data) => {
                tracing::trace!(vcpu = self.id, port, ?data, "pio out");
                self.pio.write(port, data)
            }
            VcpuExit::MmioRead(addr, data) => self.mmio.read(addr, data),
            VcpuExit::MmioWrite(addr, data) => self.mmio.write(addr, data),
            VcpuExit::Intr | VcpuExit::Hlt | VcpuExit::IrqWindowOpen => {}
            VcpuExit::Shutdown => {
                return Some("triple fault (KVM_EXIT_SHUTDOWN): the guest kernel crashed".into())
            }
            VcpuExit::SystemEvent(kind, _) => {
                let ev = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmEvent::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VmEvent::Reset { source: "KVM system event" },
                    KVM_SYSTEM_EVENT_CRASH => return Some("guest reported a crash".into()),
                    other => return Some(format!("unknown KVM system event {other}")),
                };
                let _ = self.events.send(ev);
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Some(format!(
                    "VM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
                ))
            }
            VcpuExit::InternalError => {
                return Some("KVM internal error (emulation failure)".into())
            }
            other => return Some(format!("unexpected VM exit {other:?}")),
        }
        None
    }
}
