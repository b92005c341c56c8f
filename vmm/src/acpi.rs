//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT.
//!
//! The Debian cloud kernel has no MP-table parser (`X86_MPPARSE` off), so
//! ACPI is the only way it learns about more than one CPU and the IOAPIC.
//! A hardware-reduced FADT spares us the PM1 event/control blocks and the
//! SCI: power-off goes through the sleep control register and reboot
//! through the reset register, both served by `devices::acpi_pm`.
use vm_memory::{Bytes, GuestAddress};

use crate::devices::acpi_pm::{ACPI_PM_PORT, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET};
use crate::aml;
use crate::devices::i8042::{I8042_LEN, I8042_PORT, KEYBOARD_GSI};
use crate::devices::serial::{COM1_GSI, COM1_LEN, COM1_PORT};
use crate::error::VmmError;
use crate::layout;
use crate::memory::GuestMemory;

const OEM_ID: &[u8; 6] = b"DVISOR";
const OEM_TABLE_ID: &[u8; 8] = b"DVISORVM";
const CREATOR_ID: &[u8; 4] = b"DVSR";

/// A system description table under construction.
struct Sdt {
    bytes: Vec<u8>,
}

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut bytes = Vec::with_capacity(256);
        bytes.extend_from_slice(signature);
        bytes.extend_from_slice(&0u32.to_le_bytes()); // length, fixed in finish()
        bytes.push(revision);
        bytes.push(0); // checksum
        bytes.extend_from_slice(OEM_ID);
        bytes.extend_from_slice(OEM_TABLE_ID);
        bytes.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        bytes.extend_from_slice(CREATOR_ID);
        bytes.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Sdt { bytes }
    }

    fn put(&mut self, data: &[u8]) -> &mut Self {
        self.bytes.extend_from_slice(data);
        self
    }

    fn write_at(&mut self, offset: usize, data: &[u8]) {
        self.bytes[offset..offset + data.len()].copy_from_slice(data);
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.bytes.len() as u32;
        self.write_at(4, &len.to_le_bytes());
        let sum = checksum(&self.bytes);
        self.bytes[9] = sum;
        self.bytes
    }
}

/// The byte that makes `data` sum to zero modulo 256.
fn checksum(data: &[u8]) -> u8 {
    0u8.wrapping_sub(data.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// An ACPI Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O space
    g[1] = 8; // register bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// The VM generation ID device's path in the namespace, which the GED's
/// _EVT notifies.
const VMGENID_PATH: &str = "\\_SB_.VGEN";

/// A virtio-mmio device as the DSDT announces it.
#[derive(Debug, Clone, Copy)]
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
}

fn dsdt(virtio: &[VirtioSlot]) -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 2);
    let com1 = aml::device(
        "COM1",
        &[
            aml::name("_HID", aml::eisa_id("PNP0501")),
            aml::name("_UID", aml::integer(0)),
            aml::name(
                "_CRS",
                aml::resource_template(&[
                    aml::io_port(COM1_PORT, COM1_LEN as u8),
                    aml::isa_irq(COM1_GSI as u8),
                ]),
            ),
        ],
    );
    // The i8042 at 0x60 (data) and 0x64 (status/command), IRQ 1.
    let ps2k = aml::ps2_keyboard(I8042_PORT, I8042_PORT + I8042_LEN - 1, KEYBOARD_GSI as u8);
    let mut devices = vec![com1, ps2k];
    for (i, v) in virtio.iter().enumerate() {
        devices.push(aml::virtio_mmio_device(i as u8, v.base as u32, v.gsi));
    }
    // The VM generation ID and the event device that announces its changes
    // (devices/vmgenid.rs). The GED's pin is an IOAPIC input the MADT
    // already covers (one IOAPIC, GSI base 0, 24 pins).
    devices.push(aml::vmgenid_device(layout::VMGENID_ADDR));
    devices.push(aml::ged_device(layout::GED_GSI, VMGENID_PATH));
    t.put(&aml::scope("\\_SB_", &devices));
    // The sleep type the kernel writes into the sleep control register to
    // power off.
    t.put(&aml::name("_S5_", aml::package(&[aml::integer(5)])));
    t.finish()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const FADT_LEN: usize = 276;
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const IAPC_8042: u16 = 1 << 1;
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut t = Sdt::new(b"FACP", 6);
    t.bytes.resize(FADT_LEN, 0);
    t.write_at(40, &(dsdt_addr as u32).to_le_bytes());
    // IAPC_8042: there is a keyboard controller (also named in the DSDT).
    t.write_at(109, &(IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT).to_le_bytes());
    t.write_at(112, &(HW_REDUCED_ACPI | RESET_REG_SUP).to_le_bytes());
    t.write_at(116, &gas_io_byte(ACPI_PM_PORT + RESET_OFFSET));
    t.write_at(128, &[RESET_VALUE]);
    t.write_at(131, &[3]); // FADT minor version (ACPI 6.3)
    t.write_at(140, &dsdt_addr.to_le_bytes());
    t.write_at(244, &gas_io_byte(ACPI_PM_PORT + SLEEP_CONTROL_OFFSET));
    t.write_at(256, &gas_io_byte(ACPI_PM_PORT + SLEEP_STATUS_OFFSET));
    t.write_at(268, b"DVISORHV");
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(b"APIC", 4);
    t.put(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    t.put(&0u32.to_le_bytes()); // flags: no 8259s for the guest to use
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, enabled.
        t.put(&[0, 8, id, id]).put(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    t.put(&[1, 12, vcpus, 0])
        .put(&(layout::IOAPIC_ADDR as u32).to_le_bytes())
        .put(&0u32.to_le_bytes());
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.put(&e.to_le_bytes());
    }
    t.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut r = Vec::with_capacity(36);
    r.extend_from_slice(b"RSD PTR ");
    r.push(0); // checksum over the first 20 bytes
    r.extend_from_slice(OEM_ID);
    r.push(2); // revision: ACPI 2.0+
    r.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    r.extend_from_slice(&36u32.to_le_bytes());
    r.extend_from_slice(&xsdt_addr.to_le_bytes());
    r.push(0); // extended checksum
    r.extend_from_slice(&[0, 0, 0]);
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    r
}

/// Writes all tables into the BIOS area and returns the RSDP address.
pub fn write_tables(mem: &GuestMemory, vcpus: u8, virtio: &[VirtioSlot]) -> Result<u64, VmmError> {
    let rsdp_addr = layout::ACPI_START;
    let mut next = rsdp_addr + 64;
    let mut place = |bytes: &[u8]| -> Result<u64, VmmError> {
        let addr = next;
        if addr + bytes.len() as u64 > layout::ACPI_END {
            return Err(VmmError::Acpi("ACPI tables do not fit below 1 MiB".into()));
        }
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| VmmError::Acpi(e.to_string()))?;
        next = (addr + bytes.len() as u64 + 15) & !15;
        Ok(addr)
    };
    let dsdt_addr = place(&dsdt(virtio))?;
    let fadt_addr = place(&fadt(dsdt_addr))?;
    let madt_addr = place(&madt(vcpus))?;
    let xsdt_addr = place(&xsdt(&[fadt_addr, madt_addr]))?;
    mem.write_slice(&rsdp(xsdt_addr), GuestAddress(rsdp_addr))
        .map_err(|e| VmmError::Acpi(e.to_string()))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sums_to_zero(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x)) == 0
    }

    #[test]
    fn tables_checksum_and_lengths() {
        let v = [VirtioSlot { base: 0xd000_0000, gsi: 16 }];
        for t in [dsdt(&[]), dsdt(&v), fadt(0x1234), madt(4), xsdt(&[1, 2])] {
            assert!(sums_to_zero(&t));
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len());
        }
        assert_eq!(fadt(0).len(), 276);
        assert_eq!(madt(2).len(), 36 + 8 + 2 * 8 + 12);
        let r = rsdp(0xe0100);
        assert!(sums_to_zero(&r[..20]));
        assert!(sums_to_zero(&r));
    }

    #[test]
    fn keyboard_controller_is_announced() {
        let d = dsdt(&[]);
        let ps2k = aml::ps2_keyboard(0x60, 0x64, 1);
        assert!(d.windows(ps2k.len()).any(|w| w == ps2k));
        let f = fadt(0);
        assert_ne!(u16::from_le_bytes([f[109], f[110]]) & (1 << 1), 0);
    }

    #[test]
    fn vmgenid_and_its_event_device_are_announced() {
        let d = dsdt(&[VirtioSlot { base: 0xd000_0000, gsi: 16 }]);
        let has = |needle: &[u8]| d.windows(needle.len()).any(|w| w == needle);
        assert!(has(&aml::vmgenid_device(layout::VMGENID_ADDR)));
        assert!(has(&aml::ged_device(layout::GED_GSI, VMGENID_PATH)));
        assert!(has(b"ACPI0013") && has(b"VMGENCTR"));
        // The GED's GSI is an input of the one IOAPIC (GSI base 0, 24 pins)
        // and is not a virtio device's.
        let m = madt(1);
        let ioapic = &m[m.len() - 12..];
        assert_eq!(ioapic[0], 1);
        assert_eq!(u32::from_le_bytes([ioapic[8], ioapic[9], ioapic[10], ioapic[11]]), 0);
        let virtio_gsis = layout::VIRTIO_GSI_BASE..layout::VIRTIO_GSI_BASE + layout::MAX_VIRTIO_DEVICES as u32;
        assert!(!virtio_gsis.contains(&layout::GED_GSI));
    }
}
