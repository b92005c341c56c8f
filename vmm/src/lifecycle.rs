//! Lifecycle events that devices and vCPU threads report to the VM loop.
use std::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmEvent {
    /// The guest powered itself off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset; `source` names the device or exit.
    Reset { source: &'static str },
    /// A vCPU stopped in a way the guest cannot recover from.
    Fatal { vcpu: u32, reason: String, registers: String },
    /// The VMM process received a termination signal.
    Signal(i32),
    /// The support API put an in-place restore request in the boot's
    /// `RestoreSlot`.
    Restore,
}

pub type EventSender = mpsc::Sender<VmEvent>;
pub type EventReceiver = mpsc::Receiver<VmEvent>;

pub fn channel() -> (EventSender, EventReceiver) {
    mpsc::channel()
}
