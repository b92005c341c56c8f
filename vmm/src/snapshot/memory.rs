//! Guest memory in a snapshot: which pages changed (KVM's dirty log plus
//! the VMM's own writes), writing them to the sparse memory file, and
//! reading them back.
//!
//! The memory file is laid out by guest-physical address: byte `gpa` of
//! the guest is at offset `gpa` of the file, so the 32-bit MMIO hole of
//! large guests is a hole in the file too. Zero pages are never written
//! (they stay holes), so a 1 GiB guest that touched 80 MiB takes 80 MiB.
//!
//! Two sources of writes to guest RAM exist and both are tracked while a
//! live snapshot copies: the vCPUs' writes, through KVM's dirty log
//! (`KVM_MEM_LOG_DIRTY_PAGES` on each memory slot, `KVM_GET_DIRTY_LOG`
//! returns and clears it), and the VMM's devices (virtio descriptors,
//! received frames, disk reads), which KVM never sees: vm-memory's
//! `AtomicBitmap` marks every page the VMM writes through `GuestMemory`.
//! Writes by another process through the shared memfd (the monitor) are
//! tracked by neither; a monitor writes with the VM paused or accepts
//! that a snapshot taken meanwhile may miss them (docs/snapshots.md).
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::SnapshotError;
use crate::memory::GuestMemory;

pub const PAGE_SIZE: u64 = 4096;

/// A set of guest pages, one bit per 4 KiB page of guest-physical
/// address space (bit i = the page at i * 4096).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageSet {
    pub words: Vec<u64>,
}

impl PageSet {
    pub fn with_pages(pages: u64) -> PageSet {
        PageSet { words: vec![0; pages.div_ceil(64) as usize] }
    }

    pub fn insert(&mut self, page: u64) {
        if let Some(w) = self.words.get_mut((page / 64) as usize) {
            *w |= 1 << (page % 64);
        }
    }

    pub fn contains(&self, page: u64) -> bool {
        self.words.get((page / 64) as usize).is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn clear(&mut self) {
        self.words.iter_mut().for_each(|w| *w = 0);
    }

    /// Adds a bitmap whose bit 0 is the page at `first_page`.
    pub fn merge_at(&mut self, first_page: u64, bits: &[u64]) {
        for (i, &w) in bits.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                let b = u64::from(w.trailing_zeros());
                self.insert(first_page + i as u64 * 64 + b);
                w &= w - 1;
            }
        }
    }

    pub fn union(&mut self, other: &PageSet) {
        if self.words.len() < other.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= b;
        }
    }

    /// Pages in ascending order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(i, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = u64::from(w.trailing_zeros());
                w &= w - 1;
                Some(i as u64 * 64 + b)
            })
        })
    }
}

/// One RAM range of the guest, as the snapshot records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
}

/// The RAM ranges of `mem`, in slot order (slot i = range i).
pub fn ram_ranges(mem: &GuestMemory) -> Vec<RamRange> {
    mem.iter().map(|r| RamRange { gpa: r.start_addr().0, size: r.len() }).collect()
}

/// Every page of `ranges`.
pub fn all_pages(ranges: &[RamRange]) -> PageSet {
    let end = ranges.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
    let mut set = PageSet::with_pages(end / PAGE_SIZE);
    for r in ranges {
        for p in r.gpa / PAGE_SIZE..(r.gpa + r.size) / PAGE_SIZE {
            set.insert(p);
        }
    }
    set
}

/// Turns KVM's dirty logging on or off for every RAM slot (slot i is
/// RAM range i, as `vm.rs` registers them). Changing a slot's flags while
/// vCPUs run is allowed: it is how migration starts.
pub fn set_dirty_logging(vm: &VmFd, mem: &GuestMemory, on: bool) -> Result<(), SnapshotError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the same mapping as registered at boot, owned by the
        // boot's GuestRam, which outlives the VM; only the flags change.
        unsafe { vm.set_user_memory_region(r) }.map_err(|e| SnapshotError::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// The pages written since the last call: by the vCPUs (KVM's dirty log,
/// which the call clears) and by the VMM (vm-memory's bitmap, reset too).
pub fn take_dirty(vm: &VmFd, mem: &GuestMemory, into: &mut PageSet) -> Result<(), SnapshotError> {
    for (slot, region) in mem.iter().enumerate() {
        let first = region.start_addr().0 / PAGE_SIZE;
        let log = vm
            .get_dirty_log(slot as u32, region.len() as usize)
            .map_err(|e| SnapshotError::Kvm("KVM_GET_DIRTY_LOG", e))?;
        into.merge_at(first, &log);
        let own = std::ops::Deref::deref(region).bitmap().get_and_reset();
        into.merge_at(first, &own);
    }
    Ok(())
}

/// Forgets what the VMM wrote so far (before a first full copy).
pub fn reset_own_writes(mem: &GuestMemory) {
    for region in mem.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

/// Counts of one copy pass.
#[derive(Clone, Copy, Debug, Default)]
pub struct CopyStats {
    pub pages: u64,
    pub data_pages: u64,
    pub bytes_written: u64,
}

fn is_zero(page: &[u8]) -> bool {
    let (pre, words, post) = {
        // SAFETY: u64 has no invalid bit patterns; align_to splits off any
        // unaligned head and tail.
        unsafe { page.align_to::<u64>() }
    };
    pre.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

/// Writes `pages` of guest memory to `file` at their guest-physical
/// offsets. Zero pages are left as (or punched into) holes when
/// `fresh` is false, skipped when the file is new. Calls `progress`
/// with the bytes handled so far.
pub fn write_pages(
    mem: &GuestMemory,
    file: &File,
    pages: &PageSet,
    fresh: bool,
    progress: &mut dyn FnMut(u64),
) -> Result<CopyStats, SnapshotError> {
    let mut stats = CopyStats::default();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // Runs of consecutive data pages go out in one write.
    let mut run: Vec<u8> = Vec::with_capacity(256 * PAGE_SIZE as usize);
    let mut run_start = 0u64;
    let flush = |run: &mut Vec<u8>, start: u64, stats: &mut CopyStats| -> Result<(), SnapshotError> {
        if !run.is_empty() {
            file.write_all_at(run, start).map_err(|e| SnapshotError::Io("writing the memory file".into(), e))?;
            stats.bytes_written += run.len() as u64;
            run.clear();
        }
        Ok(())
    };
    for page in pages.iter() {
        let gpa = page * PAGE_SIZE;
        if mem.read_slice(&mut buf, GuestAddress(gpa)).is_err() {
            // Not RAM (a hole page of the layout): nothing to save.
            continue;
        }
        stats.pages += 1;
        if stats.pages % 4096 == 0 {
            progress(stats.pages * PAGE_SIZE);
        }
        if is_zero(&buf) {
            flush(&mut run, run_start, &mut stats)?;
            if !fresh {
                punch_hole(file, gpa)?;
            }
            continue;
        }
        stats.data_pages += 1;
        if run.is_empty() {
            run_start = gpa;
        } else if run_start + run.len() as u64 != gpa || run.len() >= run.capacity() {
            flush(&mut run, run_start, &mut stats)?;
            run_start = gpa;
        }
        run.extend_from_slice(&buf);
    }
    flush(&mut run, run_start, &mut stats)?;
    progress(stats.pages * PAGE_SIZE);
    Ok(stats)
}

/// Makes the page at `gpa` a hole (it became all zeros since it was
/// written). File systems without hole punching get the zeros written.
fn punch_hole(file: &File, gpa: u64) -> Result<(), SnapshotError> {
    // SAFETY: fallocate on an fd this File owns, with a range inside the
    // file's size; it only deallocates blocks.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            gpa as libc::off_t,
            PAGE_SIZE as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    file.write_all_at(&[0u8; PAGE_SIZE as usize], gpa)
        .map_err(|e| SnapshotError::Io("writing the memory file".into(), e))
}

/// The data extents of `file` (SEEK_DATA / SEEK_HOLE), as (offset, len).
pub fn data_extents(file: &File, len: u64) -> Result<Vec<(u64, u64)>, SnapshotError> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        // SAFETY: lseek on an owned fd; the result is checked.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            // No SEEK_DATA support: treat the whole file as data.
            return Ok(vec![(0, len)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len as i64 } else { hole.min(len as i64) };
        if hole > data {
            out.push((data as u64, (hole - data) as u64));
        }
        pos = hole;
    }
    Ok(out)
}

/// One layer of a snapshot chain for loading: the memory file and, for an
/// incremental snapshot, the pages it holds (a full one holds all).
pub struct Layer {
    pub file: File,
    pub pages: Option<PageSet>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sets_merge_and_iterate() {
        let mut s = PageSet::with_pages(200);
        s.merge_at(64, &[0b101, 1 << 63]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![64, 66, 191]);
        assert_eq!(s.count(), 3);
        let mut t = PageSet::with_pages(10);
        t.insert(3);
        s.union(&t);
        assert!(s.contains(3) && s.contains(191) && !s.contains(4));
    }

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
