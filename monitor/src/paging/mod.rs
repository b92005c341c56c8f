//! x86-64 guest virtual → guest-physical translation, done from outside the
//! VM by walking the guest's page tables in its RAM (docs/vmi-paging.md).
//!
//! The walk follows the hardware: 4-level or 5-level paging (CR4.LA57),
//! 1 GiB and 2 MiB pages (PS at the PDPTE and PDE), permissions that
//! accumulate across levels, and at most one 8-byte read per level, so a
//! corrupted or cyclic table gives a bounded result or an error, never a
//! hang or a panic.
mod access;
mod bench;
mod cache;
mod error;
mod phys;
#[cfg(test)]
mod tests;
#[cfg(test)]
pub(crate) mod test_tables;

pub use access::{read_virt, write_virt};
pub use bench::bench_translations;
pub use cache::TranslationCache;
pub use error::{Level, PagingError};
pub use phys::{PhysRead, PhysWrite, VecMemory};

/// Physical-address bits 12..51 of CR3 and of table entries (MAXPHYADDR 52).
pub const PHYS_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PTE_USER: u64 = 1 << 2;
const PTE_PS: u64 = 1 << 7;
const PTE_GLOBAL: u64 = 1 << 8;
const PTE_NX: u64 = 1 << 63;

/// CR4.LA57: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;
/// CR3 bits 0-11: the PCID (with CR4.PCIDE) or PWT/PCD.
pub const CR3_PCID_MASK: u64 = 0xfff;
/// The bit that tells the kernel PGD (clear) from the PTI user PGD (set).
pub const PTI_USER_PGTABLE_BIT: u64 = 1 << 12;

/// Which paging the guest uses: from CR4.LA57 (bit 12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct PagingMode {
    pub la57: bool,
}

impl PagingMode {
    pub const FOUR_LEVEL: PagingMode = PagingMode { la57: false };
    pub const FIVE_LEVEL: PagingMode = PagingMode { la57: true };

    pub fn from_cr4(cr4: u64) -> Self {
        PagingMode { la57: cr4 & CR4_LA57 != 0 }
    }

    /// The levels walked, top first.
    pub fn levels(self) -> &'static [Level] {
        if self.la57 {
            &[Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]
        } else {
            &[Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt]
        }
    }

    /// Translated virtual-address bits: 48 or 57.
    pub fn va_bits(self) -> u32 {
        if self.la57 {
            57
        } else {
            48
        }
    }

    /// Whether bits 63..va_bits-1 of `va` are all equal.
    pub fn is_canonical(self, va: u64) -> bool {
        let shift = 64 - self.va_bits();
        (((va << shift) as i64) >> shift) as u64 == va
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PageSize {
    Size4K,
    Size2M,
    Size1G,
}

impl PageSize {
    pub fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// The level whose entry maps a page of this size.
    pub fn leaf_level(self) -> Level {
        match self {
            PageSize::Size4K => Level::Pt,
            PageSize::Size2M => Level::Pd,
            PageSize::Size1G => Level::Pdpt,
        }
    }
}

/// The result of one walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the byte at the translated `va`.
    pub pa: u64,
    /// The size of the page that maps it.
    pub page_size: PageSize,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// XD (bit 63) set at any level.
    pub nx: bool,
    /// G set in the leaf entry.
    pub global: bool,
    /// The entries read, top level first; `levels[..nlevels]` are valid.
    pub levels: [u64; 5],
    pub nlevels: usize,
}

impl Translation {
    /// The entries read, top level first.
    pub fn entries(&self) -> &[u64] {
        &self.levels[..self.nlevels.min(5)]
    }

    /// The guest-physical address of the start of the mapping page.
    pub fn page_base(&self) -> u64 {
        self.pa & !(self.page_size.bytes() - 1)
    }
}

/// Bits that must be zero in a present entry at `level` (MAXPHYADDR 52 and
/// EFER.NXE=1 assumed, as on every Linux x86-64 guest with NX).
fn reserved_bits(level: Level, entry: u64) -> u64 {
    match level {
        // PS is reserved in PML5Es and PML4Es.
        Level::Pml5 | Level::Pml4 => entry & PTE_PS,
        // A 1 GiB page's address bits 13..29 are reserved (bit 12 is PAT).
        Level::Pdpt if entry & PTE_PS != 0 => entry & 0x3fff_e000,
        // A 2 MiB page's address bits 13..20 are reserved (bit 12 is PAT).
        Level::Pd if entry & PTE_PS != 0 => entry & 0x001f_e000,
        _ => 0,
    }
}

/// Translate `va` through the page tables rooted at `cr3`, as the CPU would
/// in `mode`. Reads at most one entry per level (4 or 5 reads in all).
pub fn translate(mem: &impl PhysRead, cr3: u64, mode: PagingMode, va: u64) -> Result<Translation, PagingError> {
    if !mode.is_canonical(va) {
        return Err(PagingError::NonCanonical(va));
    }
    let mut t = Translation {
        pa: 0,
        page_size: PageSize::Size4K,
        writable: true,
        user: true,
        nx: false,
        global: false,
        levels: [0; 5],
        nlevels: 0,
    };
    let mut table = cr3 & PHYS_ADDR_MASK;
    for (i, &level) in mode.levels().iter().enumerate() {
        let index = (va >> level.shift()) & 0x1ff;
        let mut raw = [0u8; 8];
        mem.read_phys(table + index * 8, &mut raw).map_err(|_| PagingError::TableOutsideRam { va, level, table })?;
        let entry = u64::from_le_bytes(raw);
        t.levels[i] = entry;
        t.nlevels = i + 1;
        if entry & PTE_PRESENT == 0 {
            return Err(PagingError::NotPresent { va, level, entry });
        }
        let bits = reserved_bits(level, entry);
        if bits != 0 {
            return Err(PagingError::ReservedBits { va, level, entry, bits });
        }
        t.writable &= entry & PTE_WRITABLE != 0;
        t.user &= entry & PTE_USER != 0;
        t.nx |= entry & PTE_NX != 0;
        let size = match level {
            Level::Pt => Some(PageSize::Size4K),
            Level::Pd if entry & PTE_PS != 0 => Some(PageSize::Size2M),
            Level::Pdpt if entry & PTE_PS != 0 => Some(PageSize::Size1G),
            _ => None,
        };
        if let Some(size) = size {
            let offset_mask = size.bytes() - 1;
            t.pa = (entry & PHYS_ADDR_MASK & !offset_mask) | (va & offset_mask);
            t.page_size = size;
            t.global = entry & PTE_GLOBAL != 0;
            return Ok(t);
        }
        table = entry & PHYS_ADDR_MASK;
    }
    // Not reached: the PT level always ends the walk above. Report it as a
    // missing PT entry rather than panic.
    Err(PagingError::NotPresent { va, level: Level::Pt, entry: 0 })
}

/// The kernel PGD's physical address for a CR3 value: drops the PCID (bits
/// 0-11), the PTI user-PGD bit 12 and the bits above 51 (no-flush bit 63,
/// LAM bits). With PTI the user PGD is the 4 KiB page after the kernel PGD
/// in one 8 KiB-aligned pair, and the kernel PGD maps both halves.
pub fn kernel_pgd_from_cr3(cr3: u64) -> u64 {
    cr3 & PHYS_ADDR_MASK & !PTI_USER_PGTABLE_BIT
}

/// The guest-physical address behind a kernel direct-map ("physmap")
/// address: `va - page_offset_base`, if `va` lies in the direct map's
/// largest possible extent (64 TiB with 4-level paging, 2^52 bytes with
/// 5-level). No page walk; the caller still checks the result is RAM.
pub fn direct_map_to_phys(va: u64, page_offset_base: u64, mode: PagingMode) -> Option<u64> {
    let max = if mode.la57 { 1u64 << 52 } else { 1u64 << 46 };
    va.checked_sub(page_offset_base).filter(|&pa| pa < max)
}
