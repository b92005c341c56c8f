//! Errors of guest virtual-address translation, each naming the virtual
//! address and the paging level where the walk stopped.
use std::fmt;

/// One level of the x86-64 paging hierarchy, top (PML5) to bottom (PT).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Level {
    Pml5,
    Pml4,
    Pdpt,
    Pd,
    Pt,
}

impl Level {
    /// The lowest virtual-address bit that indexes this level's table.
    pub fn shift(self) -> u32 {
        match self {
            Level::Pml5 => 48,
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        }
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PagingError {
    #[error("virtual address {0:#x} is not canonical (the bits above the top translated bit must all equal it)")]
    NonCanonical(u64),
    #[error("virtual address {va:#x}: the {level} entry {entry:#x} is not present")]
    NotPresent { va: u64, level: Level, entry: u64 },
    #[error("virtual address {va:#x}: the {level} entry {entry:#x} sets reserved bits {bits:#x}")]
    ReservedBits { va: u64, level: Level, entry: u64, bits: u64 },
    #[error("virtual address {va:#x}: the {level} table at guest-physical {table:#x} is not guest RAM")]
    TableOutsideRam { va: u64, level: Level, table: u64 },
    #[error("virtual address {va:#x}: its {level} entry maps guest-physical {pa:#x}+{len:#x}, which is not guest RAM")]
    PageOutsideRam { va: u64, level: Level, pa: u64, len: u64 },
    #[error("guest-physical range {gpa:#x}+{len:#x} is not guest RAM")]
    PhysOutOfRange { gpa: u64, len: u64 },
    #[error("virtual range {va:#x}+{len:#x} wraps around the end of the address space")]
    RangeWraps { va: u64, len: u64 },
}
