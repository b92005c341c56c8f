//! Loading a bzImage with the Linux 64-bit boot protocol: kernel, initrd,
//! command line, zero page with the e820 map, and the identity page tables
//! and GDT the 64-bit entry point expects.
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{self, bzimage::BzImage, KernelLoader};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::error::VmmError;
use crate::layout;
use crate::memory::GuestMemory;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// The 64-bit entry point sits 0x200 past the protected-mode kernel start.
const STARTUP_64_OFFSET: u64 = 0x200;
const XLF_KERNEL_64: u16 = 1 << 0;
const MIN_BOOT_PROTOCOL: u16 = 0x020c; // 2.12: xloadflags and 64-bit entry

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a plain C struct of integers and arrays; every bit
// pattern is valid.
unsafe impl ByteValued for ZeroPage {}

/// What the vCPU setup needs from a loaded kernel.
#[derive(Debug, Clone, Copy)]
pub struct BootEntry {
    pub rip: u64,
    pub zero_page: u64,
}

/// Reads and checks the setup header of a bzImage before anything touches a
/// VM, so that a missing or corrupt kernel is a clear error up front.
pub fn check_bzimage(path: &Path) -> Result<(), VmmError> {
    let hdr = read_setup_header(path)?;
    validate_header(path, &hdr)
}

fn read_setup_header(path: &Path) -> Result<setup_header, VmmError> {
    let mut f = File::open(path).map_err(|e| VmmError::KernelOpen(path.to_owned(), e))?;
    let mut hdr = setup_header::default();
    // SAFETY: setup_header is plain old data; we fill its bytes from the file.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            &mut hdr as *mut setup_header as *mut u8,
            std::mem::size_of::<setup_header>(),
        )
    };
    f.seek(SeekFrom::Start(0x1f1))
        .and_then(|_| f.read_exact(bytes))
        .map_err(|_| VmmError::BadKernel(path.to_owned(), "file too short for a bzImage setup header".into()))?;
    Ok(hdr)
}

fn validate_header(path: &Path, hdr: &setup_header) -> Result<(), VmmError> {
    let bad = |why: String| Err(VmmError::BadKernel(path.to_owned(), why));
    let magic = hdr.header;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    let boot_flag = hdr.boot_flag;
    if boot_flag != KERNEL_BOOT_FLAG_MAGIC || magic != KERNEL_HDR_MAGIC {
        return bad("no bzImage boot signature (0xAA55 / \"HdrS\"); is this a vmlinuz?".into());
    }
    if version < MIN_BOOT_PROTOCOL {
        return bad(format!("boot protocol {version:#06x} is older than 2.12"));
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return bad("kernel has no 64-bit entry point".into());
    }
    Ok(())
}

/// Loads kernel, initrd and command line; returns where the BSP starts.
pub fn load_linux(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp_addr: u64,
) -> Result<BootEntry, VmmError> {
    check_bzimage(kernel)?;
    let mut kf = File::open(kernel).map_err(|e| VmmError::KernelOpen(kernel.to_owned(), e))?;
    let loaded = BzImage::load(mem, None, &mut kf, Some(GuestAddress(layout::HIMEM_START)))
        .map_err(|e| VmmError::BadKernel(kernel.to_owned(), e.to_string()))?;
    let Some(mut hdr) = loaded.setup_header else {
        return Err(VmmError::BadKernel(kernel.to_owned(), "no setup header".into()));
    };

    let mut cl = Cmdline::new(layout::CMDLINE_MAX)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline).map_err(|e| VmmError::Cmdline(e.to_string()))?;
    loader::load_cmdline(mem, GuestAddress(layout::CMDLINE), &cl)
        .map_err(|e| VmmError::Cmdline(e.to_string()))?;

    hdr.type_of_loader = KERNEL_LOADER_OTHER;
    hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    hdr.header = KERNEL_HDR_MAGIC;
    hdr.cmd_line_ptr = layout::CMDLINE as u32;
    hdr.cmdline_size = cmdline.len() as u32 + 1;
    if let Some(path) = initrd {
        let (addr, size) = load_initrd(mem, path, &hdr, loaded.kernel_end)?;
        hdr.ramdisk_image = addr as u32;
        hdr.ramdisk_size = size as u32;
    }

    let mut params = boot_params { hdr, ..Default::default() };
    params.acpi_rsdp_addr = rsdp_addr;
    let e820 = e820_map(mem);
    if e820.len() > params.e820_table.len() {
        return Err(VmmError::Boot("too many e820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&e820) {
        *slot = *e;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&ZeroPage(params), GuestAddress(layout::ZERO_PAGE)),
        mem,
    )
    .map_err(|e| VmmError::Boot(format!("writing the zero page: {e}")))?;

    write_page_tables(mem)?;
    write_gdt(mem)?;
    write_reset_stub(mem)?;
    Ok(BootEntry {
        rip: loaded.kernel_load.0 + STARTUP_64_OFFSET,
        zero_page: layout::ZERO_PAGE,
    })
}

/// Places the initrd as high as the kernel allows, page aligned, clear of
/// the kernel image.
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    hdr: &setup_header,
    kernel_end: u64,
) -> Result<(u64, u64), VmmError> {
    let mut f = File::open(path).map_err(|e| VmmError::InitrdOpen(path.to_owned(), e))?;
    let size = f
        .metadata()
        .map_err(|e| VmmError::InitrdOpen(path.to_owned(), e))?
        .len();
    let low_ram_end = mem.iter().next().map(|r| r.len()).unwrap_or(0);
    let limit = (u64::from(hdr.initrd_addr_max) + 1).min(low_ram_end);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= kernel_end)
        .ok_or_else(|| {
            VmmError::Boot(format!(
                "initrd {} ({} MiB) does not fit in guest RAM: give the VM more memory (--mem)",
                path.display(),
                size >> 20
            ))
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| VmmError::Boot(format!("reading initrd {}: {e}", path.display())))?;
    Ok((addr, size))
}

fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, size: u64, r#type: u32| boot_e820_entry { addr, size, r#type };
    let mut map = vec![
        entry(0, layout::EBDA_START, E820_RAM),
        entry(layout::EBDA_START, layout::HIMEM_START - layout::EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        if start == 0 {
            map.push(entry(layout::HIMEM_START, len - layout::HIMEM_START, E820_RAM));
        } else {
            map.push(entry(start, len, E820_RAM));
        }
    }
    map
}

/// The x86 reset vector, where real-mode code starts after a reset.
const RESET_VECTOR: u64 = 0xffff0;

/// There is no BIOS, but Linux may still jump to the reset vector to reboot:
/// with a hardware-reduced FADT it prefers EFI reboot, and without EFI it
/// falls back to `machine_real_restart`, a far jump to F000:FFF0. The stub
/// there pulses the i8042 reset line, so every reboot path ends in a reset
/// the VMM sees: `mov al, 0xfe; out 0x64, al; cli; hlt; jmp $-2`.
fn write_reset_stub(mem: &GuestMemory) -> Result<(), VmmError> {
    const STUB: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfc];
    mem.write_slice(&STUB, GuestAddress(RESET_VECTOR))
        .map_err(|e| VmmError::Boot(format!("writing the reset stub: {e}")))
}

/// Identity-maps the first GiB with 2 MiB pages: enough for the
/// decompressor, which builds its own tables right away.
fn write_page_tables(mem: &GuestMemory) -> Result<(), VmmError> {
    let w = |val: u64, addr: u64| {
        mem.write_obj(val, GuestAddress(addr))
            .map_err(|e| VmmError::Boot(format!("writing page tables: {e}")))
    };
    w(layout::PDPT | 0x03, layout::PML4)?;
    w(layout::PD | 0x03, layout::PDPT)?;
    for i in 0..512u64 {
        w((i << 21) | 0x83, layout::PD + i * 8)?;
    }
    Ok(())
}

/// GDT entries: null, 64-bit code, data, TSS (the 64-bit entry reloads its
/// own GDT; these only have to be valid until then).
pub const GDT: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const GDT_CODE: u16 = 1;
pub const GDT_DATA: u16 = 2;
pub const GDT_TSS: u16 = 3;

const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn write_gdt(mem: &GuestMemory) -> Result<(), VmmError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::BOOT_GDT + i as u64 * 8))
            .map_err(|e| VmmError::Boot(format!("writing the GDT: {e}")))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT))
        .map_err(|e| VmmError::Boot(format!("writing the IDT: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_kernel_encoding() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn rejects_files_that_are_not_bzimages() {
        let dir = std::env::temp_dir().join(format!("dvisor-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("junk");
        std::fs::write(&p, vec![0x5au8; 4096]).unwrap();
        let e = check_bzimage(&p).unwrap_err().to_string();
        assert!(e.contains("boot signature"), "{e}");
        std::fs::write(&p, b"short").unwrap();
        assert!(check_bzimage(&p).unwrap_err().to_string().contains("too short"));
        assert!(check_bzimage(&dir.join("missing")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
