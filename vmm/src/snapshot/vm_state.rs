//! The VM-wide state KVM keeps in the kernel: the two 8259 PICs, the
//! IOAPIC, the PIT and the kvmclock base.
//!
//! The clock: `KVM_GET_CLOCK` at the snapshot and `KVM_SET_CLOCK` with the
//! same value at restore make the guest's kvmclock continue from where it
//! stood, so the guest's monotonic time neither jumps backwards nor leaps
//! over the time the snapshot spent on disk (its wall clock is behind by
//! that time afterwards, as after a suspend; NTP or a clock step in the
//! guest corrects it). The vCPUs' TSC MSRs are restored with them, which
//! keeps the kvmclock's TSC offsets consistent.
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::SnapshotError;

#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").field("clock_ns", &self.clock.clock).finish_non_exhaustive()
    }
}

fn chip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, SnapshotError> {
    let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.get_irqchip(&mut c).map_err(|e| SnapshotError::Kvm("KVM_GET_IRQCHIP", e))?;
    Ok(c)
}

impl VmState {
    /// Reads the state of a VM whose vCPUs are all stopped.
    pub fn save(vm: &VmFd) -> Result<VmState, SnapshotError> {
        Ok(VmState {
            pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(|e| SnapshotError::Kvm("KVM_GET_PIT2", e))?,
            clock: vm.get_clock().map_err(|e| SnapshotError::Kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// Loads it into a fresh VM (irqchip and PIT created, no vCPU run).
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        for (c, id, name) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
        ] {
            if c.chip_id != id {
                return Err(SnapshotError::Invalid(format!("{name} state has chip id {}", c.chip_id)));
            }
            vm.set_irqchip(c).map_err(|e| SnapshotError::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&self.pit).map_err(|e| SnapshotError::Kvm("KVM_SET_PIT2", e))?;
        // Only the clock value: KVM_CLOCK_TSC_STABLE and the host-time
        // fields describe the old host's moment, not a request.
        let clock = kvm_clock_data { clock: self.clock.clock, ..Default::default() };
        vm.set_clock(&clock).map_err(|e| SnapshotError::Kvm("KVM_SET_CLOCK", e))
    }
}
