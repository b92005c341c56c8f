//! Synthetic page tables in a vector-backed guest memory, for the unit
//! tests of the walker and of the services that read guest processes.
use super::*;

/// Page tables built in the first MiB of a VecMemory; data pages above.
pub(crate) struct Tables {
    pub(crate) mem: VecMemory,
    pub(crate) next: u64,
    pub(crate) root: u64,
    pub(crate) mode: PagingMode,
}

pub(crate) const TABLE_AREA_END: u64 = 0x10_0000;
/// A present, writable user page.
pub(crate) const USER_RW: u64 = PTE_PRESENT | PTE_WRITABLE | PTE_USER;

impl Tables {
    pub(crate) fn new(mode: PagingMode, size: usize) -> Self {
        let mut t = Tables { mem: VecMemory::new(size), next: 0x1000, root: 0, mode };
        t.root = t.alloc();
        t
    }

    pub(crate) fn alloc(&mut self) -> u64 {
        let p = self.next;
        assert!(p < TABLE_AREA_END, "test table area full");
        self.next += 0x1000;
        p
    }

    pub(crate) fn cr3(&self) -> u64 {
        self.root
    }

    /// Map one page of `size` at `va` to `pa`; new intermediate entries get
    /// P|RW|US, the leaf gets `flags` (PS added for large pages).
    pub(crate) fn map(&mut self, va: u64, pa: u64, size: PageSize, flags: u64) {
        let leaf = size.leaf_level();
        let mut table = self.root;
        for &level in self.mode.levels() {
            let slot = table + ((va >> level.shift()) & 0x1ff) * 8;
            if level == leaf {
                let ps = if leaf == Level::Pt { 0 } else { PTE_PS };
                self.mem.write_u64(slot, pa | flags | ps).unwrap();
                return;
            }
            let mut e = self.mem.read_u64(slot).unwrap();
            if e & PTE_PRESENT == 0 {
                e = self.alloc() | PTE_PRESENT | PTE_WRITABLE | PTE_USER;
                self.mem.write_u64(slot, e).unwrap();
            }
            table = e & PHYS_ADDR_MASK;
        }
    }

    /// The guest-physical address of the entry for `va` at `level`.
    pub(crate) fn slot(&self, va: u64, level: Level) -> u64 {
        let mut table = self.root;
        for &l in self.mode.levels() {
            let slot = table + ((va >> l.shift()) & 0x1ff) * 8;
            if l == level {
                return slot;
            }
            table = self.mem.read_u64(slot).unwrap() & PHYS_ADDR_MASK;
        }
        panic!("no {level} in {:?}", self.mode)
    }

    pub(crate) fn modify(&self, va: u64, level: Level, set: u64, clear: u64) -> u64 {
        let slot = self.slot(va, level);
        let e = (self.mem.read_u64(slot).unwrap() | set) & !clear;
        self.mem.write_u64(slot, e).unwrap();
        e
    }

    pub(crate) fn tr(&self, va: u64) -> Result<Translation, PagingError> {
        translate(&self.mem, self.cr3(), self.mode, va)
    }
}

