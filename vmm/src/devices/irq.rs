//! Interrupt lines from devices to the guest.
use std::io;

use vmm_sys_util::eventfd::EventFd;

/// The interrupt line of one device. The VMM backs it with a KVM irqfd, so
/// raising it never takes a VM exit. Every trigger is one edge.
pub trait IrqLine: Send {
    fn trigger(&self) -> io::Result<()>;
}

/// An irqfd: register the inner EventFd with `VmFd::register_irqfd` on the
/// device's GSI.
pub struct EventFdIrq(pub EventFd);

impl IrqLine for EventFdIrq {
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
