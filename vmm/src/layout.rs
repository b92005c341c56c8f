//! Guest physical address map of a D-Visor VM (x86-64).
//!
//! The low megabyte follows the PC conventions the Linux boot protocol and
//! the kernel's ACPI scan expect; everything else is RAM up to the 32-bit
//! MMIO hole, then RAM again above 4 GiB.

/// GDT used for the 64-bit boot entry.
pub const BOOT_GDT: u64 = 0x500;
/// IDT (empty) for the 64-bit boot entry.
pub const BOOT_IDT: u64 = 0x520;
/// The Linux "zero page" (struct boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack for the boot CPU, below the zero page.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for the first GiB: PML4, PDPT, PD.
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 0x10000;
/// Start of the EBDA; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables live in the BIOS area the kernel scans for the RSDP.
pub const ACPI_START: u64 = 0xe0000;
pub const ACPI_END: u64 = VMGENID_ADDR;
/// The 16-byte VM generation ID (`devices/vmgenid.rs`): a page of its own
/// above the ACPI tables and below the reset vector's page. The e820 map
/// reserves everything from the EBDA to 1 MiB, so the guest never takes
/// this page as RAM and its vmgenid driver maps it (`memremap`) instead.
pub const VMGENID_ADDR: u64 = 0xfe000;
/// Where the protected-mode kernel is loaded (bzImage code32_start).
pub const HIMEM_START: u64 = 0x100000;
/// The 32-bit MMIO hole: IOAPIC, LAPIC and (later) virtio-mmio devices.
pub const MMIO_HOLE_START: u64 = 0xd000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices, one 0x200-byte window each, at the bottom of the hole.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_HOLE_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;
/// Their interrupts: IOAPIC pins above the ISA range, as QEMU microvm does.
pub const VIRTIO_GSI_BASE: u32 = 16;
pub const MAX_VIRTIO_DEVICES: usize = 8;
/// The ACPI Generic Event Device's interrupt (`acpi.rs`): an ISA pin no
/// device uses (0 PIT, 1 keyboard, 4 COM1), since 16-23 go to virtio.
/// Edge-triggered and active-high, the ISA default, so the MADT needs no
/// interrupt source override for it.
pub const GED_GSI: u32 = 5;

// Checked at compile time: the ID's page is page-aligned, above the ACPI
// tables, inside the range boot.rs reserves in e820 (EBDA_START to 1 MiB)
// and below the page of the reset stub at 0xffff0; the GED's pin is one of
// the IOAPIC's 24 and not a virtio device's.
const _: () = {
    assert!(VMGENID_ADDR & 0xfff == 0);
    assert!(VMGENID_ADDR >= ACPI_END && ACPI_END > ACPI_START);
    assert!(VMGENID_ADDR >= EBDA_START && VMGENID_ADDR + 0x1000 <= 0xff000);
    assert!(GED_GSI < 24 && GED_GSI < VIRTIO_GSI_BASE);
};
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (Intel),
/// inside the hole but clear of the IOAPIC and LAPIC.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// RAM ranges (guest address, size) for a VM with `mem_bytes` of memory.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_HOLE_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, mem_bytes - MMIO_HOLE_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (0, MMIO_HOLE_START));
        assert_eq!(r[1].0, MMIO_HOLE_END);
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }
}
