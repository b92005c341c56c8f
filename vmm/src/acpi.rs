//! ACPI tables: RSDP, XSDT, FADT (hardware-reduced), MADT and a DSDT.
//!
//! The Debian cloud kernel has no MP-table parser (`X86_MPPARSE` off), so
//! ACPI is the only way it learns about more than one CPU and the IOAPIC.
//! A hardware-reduced FADT spares us the PM1 event/control blocks and the
//! SCI: power-off goes through the sleep control register and reboot
//! through the reset register, both served by `devices::acpi_pm`.
//!
//! Tables are built with rust-vmm's `acpi_tables`: its generic `Sdt`
//! (header, length, checksum), `Rsdp` and `GenericAddress`, and its AML
//! encoder for the DSDT (`aml.rs`). Its typed FADT, MADT and XSDT builders
//! are not used: they write the crate's own creator ID and revision into
//! the header (the MADT's header is private and its revision fixed at 1,
//! ours is 4), and the FADT builder sets either the 32- or the 64-bit DSDT
//! address while we fill both, so they would change what the guest reads.
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::{GenericAddress, Sdt};
use acpi_tables::Aml;
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

/// A system description table: `acpi_tables`' generic builder (header,
/// length, checksum) with our creator ID and revision in its header, which
/// the crate otherwise fills with its own.
fn sdt(signature: &[u8; 4], revision: u8, length: u32) -> Sdt {
    let mut t = Sdt::new(*signature, length, revision, *OEM_ID, *OEM_TABLE_ID, 1);
    t.write_bytes(28, CREATOR_ID);
    t.write_u32(32, 1); // creator revision
    t
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    t.to_aml_bytes(&mut out);
    out
}

/// An ACPI Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u16) -> GenericAddress {
    GenericAddress::io_port_address::<u8>(port)
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
    let mut t = sdt(b"DSDT", 2, 36);
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
    t.append_slice(&aml::scope("\\_SB_", &devices));
    // The sleep type the kernel writes into the sleep control register to
    // power off.
    t.append_slice(&aml::name("_S5_", aml::package(&[aml::integer(5)])));
    bytes(&t)
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const FADT_LEN: usize = 276;
    const HW_REDUCED_ACPI: u32 = 1 << 20;
    const RESET_REG_SUP: u32 = 1 << 10;
    const IAPC_8042: u16 = 1 << 1;
    const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
    const IAPC_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
    let mut t = sdt(b"FACP", 6, FADT_LEN as u32);
    t.write_u32(40, dsdt_addr as u32);
    // IAPC_8042: there is a keyboard controller (also named in the DSDT).
    t.write_u16(109, IAPC_8042 | IAPC_VGA_NOT_PRESENT | IAPC_CMOS_RTC_NOT_PRESENT);
    t.write_u32(112, HW_REDUCED_ACPI | RESET_REG_SUP);
    t.write(116, gas_io_byte(ACPI_PM_PORT + RESET_OFFSET));
    t.write_u8(128, RESET_VALUE);
    t.write_u8(131, 3); // FADT minor version (ACPI 6.3)
    t.write_u64(140, dsdt_addr);
    t.write(244, gas_io_byte(ACPI_PM_PORT + SLEEP_CONTROL_OFFSET));
    t.write(256, gas_io_byte(ACPI_PM_PORT + SLEEP_STATUS_OFFSET));
    t.write_bytes(268, b"DVISORHV");
    bytes(&t)
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = sdt(b"APIC", 4, 36);
    t.append_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    t.append_slice(&0u32.to_le_bytes()); // flags: no 8259s for the guest to use
    for id in 0..vcpus {
        // Processor Local APIC: type 0, length 8, UID, APIC ID, enabled.
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    t.append_slice(&[1, 12, vcpus, 0]);
    t.append_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    t.append_slice(&0u32.to_le_bytes());
    bytes(&t)
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = sdt(b"XSDT", 1, 36);
    for e in entries {
        t.append_slice(&e.to_le_bytes());
    }
    bytes(&t)
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    bytes(&Rsdp::new(*OEM_ID, xsdt_addr))
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

    /// The whole tables, byte for byte, as the hand-written encoder made
    /// them before `acpi_tables` did (acpi.golden, one table a line in hex:
    /// DSDT with two virtio slots, DSDT without, FADT, MADT, XSDT, RSDP).
    /// A deliberate change of a table regenerates it.
    #[test]
    fn tables_are_unchanged_byte_for_byte() {
        let v = [VirtioSlot { base: 0xd000_0000, gsi: 16 }, VirtioSlot { base: 0xd000_0200, gsi: 17 }];
        let tables = [dsdt(&v), dsdt(&[]), fadt(0xe0040), madt(3), xsdt(&[0xe0100, 0xe0200]), rsdp(0xe0300)];
        let golden: Vec<&str> = include_str!("acpi.golden").lines().collect();
        assert_eq!(golden.len(), tables.len());
        for (t, g) in tables.iter().zip(golden) {
            assert_eq!(hex::encode(t), g);
        }
    }
}
