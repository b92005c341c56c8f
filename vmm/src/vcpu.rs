//! The vCPU thread: runs KVM_RUN and routes exits to devices or to the VM
//! loop.
use std::sync::Arc;

use kvm_bindings::kvm_debug_exit_arch;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::api::protocol::{DebugReason, Event};
use crate::api::EventHub;
use crate::cpu;
use dvisor_api::monotonic_ns;
use crate::devices::{MmioBus, PioBus};
use crate::lifecycle::{EventSender, VmEvent};
use crate::signals;
use crate::vcpu_control::VcpuControl;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

pub struct VcpuRunner {
    pub id: u32,
    pub fd: VcpuFd,
    pub pio: Arc<PioBus>,
    pub mmio: Arc<MmioBus>,
    pub control: Arc<VcpuControl>,
    pub events: EventSender,
    pub hub: EventHub,
}

/// #DB and #BP, as KVM reports them in a debug exit.
const DB_VECTOR: u32 = 1;
const BP_VECTOR: u32 = 3;
/// DR6.BS: the #DB came from single-stepping.
const DR6_BS: u64 = 1 << 14;

impl VcpuRunner {
    pub fn run(mut self) {
        self.control.register_thread(self.id as usize);
        let flag = &mut self.fd.get_kvm_run().immediate_exit as *mut u8;
        signals::set_immediate_exit_target(flag);
        while self.control.checkpoint(self.id as usize, &self.fd) {
            if let Some(reason) = self.step() {
                let registers = cpu::dump_registers(&self.fd);
                let _ = self.events.send(VmEvent::Fatal { vcpu: self.id, reason, registers });
                break;
            }
        }
        signals::set_immediate_exit_target(std::ptr::null_mut());
    }

    /// A breakpoint or single step: the whole VM stops and the monitor
    /// hears about it; it resumes the VM when it is done.
    fn debug_exit(&self, d: &kvm_debug_exit_arch) {
        let reason = match d.exception {
            BP_VECTOR => DebugReason::Breakpoint,
            DB_VECTOR if d.dr6 & DR6_BS != 0 => DebugReason::SingleStep,
            _ => DebugReason::HwBreakpoint,
        };
        tracing::debug!(vcpu = self.id, ?reason, rip = d.pc, "debug exit");
        self.control.request_pause();
        self.hub.publish(Event::Debug { t_ns: monotonic_ns(), vcpu: self.id, reason, rip: d.pc, dr6: d.dr6 });
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
            VcpuExit::Debug(d) => self.debug_exit(&d),
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
