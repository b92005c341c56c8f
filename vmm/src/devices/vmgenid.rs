//! The VM Generation ID: 16 random bytes in guest memory that change
//! whenever the VM is restored from a snapshot or cloned, so that the guest
//! kernel reseeds its random number generator instead of handing the same
//! "random" numbers to two VMs (docs/vmm.md, "VM generation ID").
//!
//! The guest finds the bytes through the `VGEN` device in the DSDT (its
//! `ADDR` method returns their address) and learns of a change through an
//! ACPI Notify(VGEN, 0x80), which the Generic Event Device (`GED_`) raises
//! when its interrupt, `layout::GED_GSI`, fires. `regenerate` writes a new
//! ID and then pulses that interrupt; the order matters, since the guest
//! reads the ID as soon as it sees the notification.
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use crate::devices::irq::IrqLine;
use crate::layout;
use crate::memory::GuestMemory;

/// Size of the generation ID in bytes (a 128-bit GUID).
pub const VMGENID_LEN: usize = 16;

/// What can go wrong while writing or announcing a generation ID.
#[derive(Debug, thiserror::Error)]
pub enum VmGenIdError {
    #[error("reading random bytes (getrandom): {0}")]
    Random(#[source] std::io::Error),
    #[error("writing the generation ID at guest address {addr:#x}: {source}")]
    Write {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("raising the GED interrupt (GSI {gsi}): {source}")]
    Irq {
        gsi: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The device's state in a snapshot: the ID the guest last saw. A restore
/// puts it back and then calls `regenerate`, so that each clone of the
/// snapshot gets an ID of its own and the guest reseeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmGenIdState {
    pub id: [u8; VMGENID_LEN],
}

/// The generation ID of one boot and the interrupt that announces changes.
pub struct VmGenId {
    id: [u8; VMGENID_LEN],
    addr: GuestAddress,
    irq: Box<dyn IrqLine>,
}

impl std::fmt::Debug for VmGenId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmGenId").field("id", &self.hex_id()).field("addr", &self.addr).finish_non_exhaustive()
    }
}

impl VmGenId {
    /// A fresh random ID at `layout::VMGENID_ADDR`, written into guest
    /// memory before the guest runs. `irq` must raise `layout::GED_GSI`.
    /// No interrupt: the guest's driver reads the first ID when it probes.
    pub fn new(mem: &GuestMemory, irq: Box<dyn IrqLine>) -> Result<VmGenId, VmGenIdError> {
        let dev = VmGenId { id: random_id()?, addr: GuestAddress(layout::VMGENID_ADDR), irq };
        dev.write(mem)?;
        Ok(dev)
    }

    /// Rebuilds the device of a snapshot: `state.id` goes back into guest
    /// memory (where a restored RAM image already has it), with no
    /// interrupt. Call `regenerate` once the guest's interrupt controllers
    /// are restored too, so that the restored guest sees a new ID.
    pub fn restore(mem: &GuestMemory, irq: Box<dyn IrqLine>, state: &VmGenIdState) -> Result<VmGenId, VmGenIdError> {
        let dev = VmGenId { id: state.id, addr: GuestAddress(layout::VMGENID_ADDR), irq };
        dev.write(mem)?;
        Ok(dev)
    }

    /// Writes a new random ID and pulses the GED interrupt, whose _EVT
    /// method notifies the guest's vmgenid driver. Works on a paused VM as
    /// well: the edge waits in the interrupt controller until it resumes.
    /// Returns the new ID.
    pub fn regenerate(&mut self, mem: &GuestMemory) -> Result<[u8; VMGENID_LEN], VmGenIdError> {
        let mut id = random_id()?;
        // A new ID equal to the old one would be ignored by the guest
        // (vmgenid_notify compares them); 2^-128, but cheap to rule out.
        while id == self.id {
            id = random_id()?;
        }
        self.id = id;
        self.write(mem)?;
        self.irq.trigger().map_err(|source| VmGenIdError::Irq { gsi: layout::GED_GSI, source })?;
        Ok(id)
    }

    /// The ID the guest can read now.
    pub fn id(&self) -> [u8; VMGENID_LEN] {
        self.id
    }

    /// The ID as 32 lowercase hex digits, in memory order.
    pub fn hex_id(&self) -> String {
        hex::encode(self.id)
    }

    /// Guest-physical address of the 16 bytes.
    pub fn addr(&self) -> u64 {
        self.addr.0
    }

    pub fn state(&self) -> VmGenIdState {
        VmGenIdState { id: self.id }
    }

    fn write(&self, mem: &GuestMemory) -> Result<(), VmGenIdError> {
        mem.write_slice(&self.id, self.addr).map_err(|source| VmGenIdError::Write { addr: self.addr.0, source })
    }
}

/// 16 bytes from the kernel's CSPRNG.
fn random_id() -> Result<[u8; VMGENID_LEN], VmGenIdError> {
    let mut id = [0u8; VMGENID_LEN];
    let mut filled = 0;
    while filled < id.len() {
        let rest = &mut id[filled..];
        // SAFETY: the pointer and length describe `rest`, a live, writable
        // slice of `id`; getrandom writes at most that many bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(VmGenIdError::Random(e));
        }
        filled += n as usize;
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    /// Counts its pulses.
    struct CountingIrq(Arc<AtomicU32>);

    impl IrqLine for CountingIrq {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    fn low_memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), layout::HIMEM_START as usize)]).unwrap()
    }

    fn in_guest(mem: &GuestMemory) -> [u8; VMGENID_LEN] {
        let mut b = [0u8; VMGENID_LEN];
        mem.read_slice(&mut b, GuestAddress(layout::VMGENID_ADDR)).unwrap();
        b
    }

    #[test]
    fn new_writes_a_random_id_without_an_interrupt() {
        let mem = low_memory();
        let pulses = Arc::new(AtomicU32::new(0));
        let a = VmGenId::new(&mem, Box::new(CountingIrq(pulses.clone()))).unwrap();
        assert_eq!(in_guest(&mem), a.id());
        assert_ne!(a.id(), [0; VMGENID_LEN]);
        assert_eq!(pulses.load(Ordering::SeqCst), 0);
        assert_eq!(a.addr(), layout::VMGENID_ADDR);
        let b = VmGenId::new(&low_memory(), Box::new(CountingIrq(pulses))).unwrap();
        assert_ne!(a.id(), b.id());
        assert_eq!(a.hex_id().len(), 32);
        assert!(a.hex_id().bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn regenerate_changes_the_id_in_memory_then_pulses() {
        let mem = low_memory();
        let pulses = Arc::new(AtomicU32::new(0));
        let mut dev = VmGenId::new(&mem, Box::new(CountingIrq(pulses.clone()))).unwrap();
        let mut seen = vec![dev.id()];
        for n in 1..=3 {
            let id = dev.regenerate(&mem).unwrap();
            assert_eq!(id, dev.id());
            assert_eq!(in_guest(&mem), id);
            assert!(!seen.contains(&id));
            seen.push(id);
            assert_eq!(pulses.load(Ordering::SeqCst), n);
        }
    }

    #[test]
    fn state_round_trips_through_serde_and_restore() {
        let mem = low_memory();
        let pulses = Arc::new(AtomicU32::new(0));
        let dev = VmGenId::new(&mem, Box::new(CountingIrq(pulses.clone()))).unwrap();
        let json = serde_json::to_string(&dev.state()).unwrap();
        let state: VmGenIdState = serde_json::from_str(&json).unwrap();
        assert_eq!(state, dev.state());

        let fresh = low_memory();
        let mut restored = VmGenId::restore(&fresh, Box::new(CountingIrq(pulses.clone())), &state).unwrap();
        assert_eq!(restored.id(), dev.id());
        assert_eq!(in_guest(&fresh), dev.id());
        assert_eq!(pulses.load(Ordering::SeqCst), 0);
        // The clone then moves on to an ID of its own.
        restored.regenerate(&fresh).unwrap();
        assert_ne!(restored.id(), dev.id());
        assert_eq!(pulses.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_write_outside_guest_memory_is_an_error() {
        // RAM that ends below the ID's page.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let pulses = Arc::new(AtomicU32::new(0));
        let e = VmGenId::new(&mem, Box::new(CountingIrq(pulses))).unwrap_err();
        assert!(matches!(e, VmGenIdError::Write { addr, .. } if addr == layout::VMGENID_ADDR), "{e}");
    }
}
