//! PCI configuration mechanism #1 (ports 0xCF8-0xCFF) in front of a bus 0
//! that holds only a host bridge at 00:00.0.
//!
//! D-Visor's devices are virtio-mmio, so the guest needs no PCI device; but
//! a kernel built with PCI probes for configuration-space access at boot
//! and, finding none, prints `PCI: Fatal: No config space access function
//! found` (Linux `arch/x86/pci/init.c`), which reads as a failure. `pci=off`
//! does not help: it only forbids the probe, and the message follows. A
//! host bridge is what Linux's type-1 probe looks for before trusting the
//! ports on a machine without a dated BIOS (`pci_sanity_check` in
//! `arch/x86/pci/direct.c`: class "host bridge" on bus 0). The bridge has
//! no BARs and no interrupts; every other bus, device and function reads
//! as absent (all ones), and configuration writes are dropped.
//!
//! No rust-vmm crate fits: `vm-device` has no PCI, and the PCI crates of
//! cloud-hypervisor and Firecracker bring a whole bus with BAR allocation
//! that nothing here needs.
use serde::{Deserialize, Serialize};

use crate::devices::PioDevice;

pub const PCI_CONFIG_PORT: u16 = 0xcf8;
pub const PCI_CONFIG_LEN: u16 = 8;
/// Offset of CONFIG_DATA from CONFIG_ADDRESS.
const DATA: u16 = 4;
const ENABLE: u32 = 1 << 31;
/// Bus, device, function and dword-aligned register of CONFIG_ADDRESS.
const ADDRESS_MASK: u32 = ENABLE | 0x00ff_fffc;

/// The host bridge's vendor and device: Red Hat's ID for a generic
/// virtual host bridge (the one QEMU's `gpex` host uses), class 06/00/00.
const VENDOR: u16 = 0x1b36;
const DEVICE: u16 = 0x0008;
const CLASS_HOST_BRIDGE: [u8; 3] = [0x00, 0x00, 0x06]; // prog-if, subclass, class

#[derive(Debug, Default)]
pub struct PciHost {
    /// CONFIG_ADDRESS as the guest last wrote it (a dword write to 0xCF8).
    address: u32,
}

/// The latch, for snapshots: a guest paused between writing the address
/// and reading the data reads the same register after a restore.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciHostState {
    pub config_address: u32,
}

impl PciHost {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn state(&self) -> PciHostState {
        PciHostState { config_address: self.address }
    }

    /// Any value is one the guest could have written; the reserved bits
    /// are masked as on a write.
    pub fn from_state(state: &PciHostState) -> Self {
        PciHost { address: state.config_address & ADDRESS_MASK }
    }

    /// The host bridge's 256-byte configuration header.
    fn bridge_header() -> [u8; 256] {
        let mut h = [0u8; 256];
        h[0..2].copy_from_slice(&VENDOR.to_le_bytes());
        h[2..4].copy_from_slice(&DEVICE.to_le_bytes());
        // 0x08: revision 0, then prog-if, subclass, class.
        h[9..12].copy_from_slice(&CLASS_HOST_BRIDGE);
        // 0x0e header type 0 (single function); 0x34 no capabilities.
        h
    }

    /// Reads `data.len()` bytes of configuration space at byte `offset`
    /// (0..4) of the register CONFIG_ADDRESS selects.
    fn read_data(&self, offset: u16, data: &mut [u8]) {
        let bus = (self.address >> 16) & 0xff;
        let devfn = (self.address >> 8) & 0xff;
        if self.address & ENABLE == 0 || bus != 0 || devfn != 0 {
            data.fill(0xff);
            return;
        }
        let header = Self::bridge_header();
        let start = (self.address & 0xfc) as usize + usize::from(offset);
        for (i, b) in data.iter_mut().enumerate() {
            *b = header.get(start + i).copied().unwrap_or(0xff);
        }
    }
}

impl PioDevice for PciHost {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            DATA.. => self.read_data(offset - DATA, data),
            // Byte and word reads of 0xCF8-0xCFB are not CONFIG_ADDRESS.
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        // Only a dword write to 0xCF8 is CONFIG_ADDRESS (Linux's probe for
        // mechanism #2 writes a byte to 0xCFB, which must not change it).
        if offset == 0 {
            if let Ok(v) = <[u8; 4]>::try_from(data) {
                self.address = u32::from_le_bytes(v) & ADDRESS_MASK;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(p: &mut PciHost, bus: u32, dev: u32, func: u32, reg: u32) {
        p.write(0, &(ENABLE | bus << 16 | dev << 11 | func << 8 | reg).to_le_bytes());
    }

    fn dword(p: &mut PciHost, offset: u16) -> u32 {
        let mut d = [0u8; 4];
        p.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn address_latches_as_linux_probes_it() {
        // Linux's pci_check_type1: a byte to 0xCFB, then 0x80000000 to
        // 0xCF8 must read back.
        let mut p = PciHost::new();
        p.write(3, &[1]);
        p.write(0, &0x8000_0000u32.to_le_bytes());
        assert_eq!(dword(&mut p, 0), 0x8000_0000);
        p.write(3, &[1]);
        assert_eq!(dword(&mut p, 0), 0x8000_0000, "a byte write to 0xCFB changed CONFIG_ADDRESS");
        p.write(0, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(dword(&mut p, 0), ADDRESS_MASK, "reserved bits latched");
    }

    #[test]
    fn bus_zero_has_a_host_bridge_and_nothing_else() {
        let mut p = PciHost::new();
        select(&mut p, 0, 0, 0, 0);
        assert_eq!(dword(&mut p, DATA), u32::from(DEVICE) << 16 | u32::from(VENDOR));
        select(&mut p, 0, 0, 0, 8);
        assert_eq!(dword(&mut p, DATA) >> 8, 0x06_00_00, "class code");
        // Word read of the class (what pci_sanity_check does): 0x0600.
        let mut w = [0u8; 2];
        p.read(DATA + 2, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        for (bus, dev, func) in [(0, 1, 0), (0, 0, 1), (1, 0, 0), (0, 31, 7)] {
            select(&mut p, bus, dev, func, 0);
            assert_eq!(dword(&mut p, DATA), 0xffff_ffff, "{bus}:{dev}.{func} should be absent");
        }
        // Disabled: nothing answers.
        p.write(0, &0u32.to_le_bytes());
        assert_eq!(dword(&mut p, DATA), 0xffff_ffff);
    }

    #[test]
    fn writes_to_configuration_space_are_dropped() {
        let mut p = PciHost::new();
        select(&mut p, 0, 0, 0, 4);
        p.write(DATA, &0xffffu32.to_le_bytes());
        assert_eq!(dword(&mut p, DATA), 0, "command/status of the bridge");
    }

    #[test]
    fn state_round_trips() {
        let mut p = PciHost::new();
        select(&mut p, 0, 0, 0, 8);
        let back = PciHost::from_state(&p.state());
        assert_eq!(back.address, p.address);
    }
}
