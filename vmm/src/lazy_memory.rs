//! Lazy loading of a snapshot's guest memory with userfaultfd.
//!
//! Restoring a VM must not wait for its whole memory file to be read: the
//! guest starts at once and its RAM is filled behind it. Guest RAM stays the
//! one shareable memfd (`memory.rs`), so the monitor, which maps the same
//! memfd in its own process, sees the same pages once loading is done.
//!
//! # How
//! The RAM mappings are registered with a userfaultfd in missing-page mode
//! (`UFFD_FEATURE_MISSING_SHMEM`, since a memfd is shmem). Two threads:
//! - the *fault handler* answers each missing-page fault with the page from
//!   the newest layer that holds it (`UFFDIO_COPY`), or with a zero page
//!   (`UFFDIO_ZEROPAGE`);
//! - the *prefetcher* reads every page that holds data, in pieces of up to
//!   1 MiB, copies them in with one `UFFDIO_COPY` per [`BATCH_BYTES`],
//!   then unregisters the mappings. Pages left absent are zero pages:
//!   after the unregister shmem itself fills them with zeros on first
//!   touch, so they cost neither a read nor memory.
//!
//! `UFFDIO_COPY` places the page in the memfd's page cache, not only in
//! this process's page tables, which is why another mapping of the memfd
//! sees the loaded contents. That mapping is outside the userfaultfd, so
//! the monitor must map the memfd only after [`LazyLoader::wait_loaded`]:
//! before, it would read zeros where pages are not in yet (and a write of
//! its own would keep the page from ever being loaded).
//!
//! Neither thread ever touches a registered mapping itself: a fault there
//! would wait on the very thread that should serve it.
//!
//! # Snapshot layout
//! Each [`Layer`] is a file laid out by guest-physical address (file offset
//! == gpa). The layers are given oldest first; a page's content comes from
//! the newest layer that holds it. A full layer (`pages: None`) holds every
//! page; an incremental one holds the pages set in its bitmap. A page that
//! a layer holds but whose file range is a hole is a zero page. A page no
//! layer holds is a zero page too. The holes are found once, up front, with
//! `lseek(SEEK_DATA/SEEK_HOLE)`; from then on each page's source is one
//! byte in a table, so a fault costs one `pread` and one ioctl.
//!
//! # Untrusted input
//! Layer files and bitmaps come from disk. What is checked, and how:
//! - before anything starts ([`LazyLoader::start`] and [`load_eager`] both
//!   return an error): a bitmap too short to cover guest RAM
//!   ([`LazyError::BitmapTooShort`]); a file shorter than a page it holds
//!   ([`LazyError::LayerTooShort`]; a full layer holds every page, so its
//!   file must reach the end of RAM: a writer sets its length even when
//!   the end is a hole); more layers than [`MAX_LAYERS`]; bitmap bits for
//!   addresses that are not RAM (the MMIO hole, past the end) are ignored;
//! - while loading lazily (a layer file that shrinks or fails to read after
//!   the start): a fault can't be failed, so the page is zero-filled, the
//!   error is recorded, and [`LazyLoader::wait_loaded`] returns
//!   [`LazyError::ZeroFilled`]. A faulting vCPU never waits on a file that
//!   cannot deliver.
//! - [`load_eager`] has no vCPU waiting on it, so it just returns the error.
//!
//! If a userfaultfd ioctl itself fails (not `EEXIST`, which only means the
//! other thread got there first), the loader cannot go on: it records the
//! error, unregisters the mappings so that no vCPU stays blocked (absent
//! pages then read as zeros), and `wait_loaded` returns
//! [`LazyError::Aborted`]. The guest's memory is then wrong and the VM must
//! not be resumed.
//!
//! # Why not the `userfaultfd` crate
//! `userfaultfd` 0.9 (bytecodealliance) does support shmem, but its
//! `userfaultfd-sys` generates its bindings with bindgen at build time,
//! which needs libclang; this machine (and so CI) has none, and the build
//! fails there. The part we need is five ioctls and four small structs,
//! written below from `include/uapi/linux/userfaultfd.h` and checked in a
//! test against numbers compiled from that header.
//!
//! # Limits
//! [`LazyLoader::start`] builds the page table before it returns, which
//! is linear in RAM and in the number of data extents (about 0.1 s for
//! 4 GiB with a data page in every 16). A page faulted in before the
//! prefetcher reaches it is read twice (the prefetcher's copy then finds
//! it present). Dropping the loader before it finishes leaves the pages
//! not yet in as zeros.
//!
//! 4 KiB pages only (no huge pages). The memory must be fresh: a page
//! already present in the memfd would keep its old contents, since
//! missing-page mode never sees it; both loaders check with `mincore` and
//! refuse. [`Region`]s are raw host addresses: the caller vouches that each
//! is a live `MAP_SHARED` mapping that stays mapped while loading (see
//! [`regions_of`] to take them from a [`GuestMemory`]).
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::memory::GuestMemory;

/// The only page size the loader handles.
pub const PAGE_SIZE: usize = 4096;
const PAGE: u64 = PAGE_SIZE as u64;
/// Largest single `UFFDIO_COPY` the prefetcher issues: big enough to make
/// the ioctl cost small per page, small enough that a fault waiting behind
/// it is not delayed long.
pub const BATCH_BYTES: usize = 64 * 1024;
const BATCH_PAGES: usize = BATCH_BYTES / PAGE_SIZE;
/// Largest single `pread` of the prefetcher (and of [`load_eager`]): reads
/// from a cold file are several times faster in 1 MiB pieces than in
/// 64 KiB ones, so the prefetcher reads this much, then copies it in
/// [`BATCH_BYTES`] pieces.
const READ_BYTES: usize = 1 << 20;
const READ_PAGES: usize = READ_BYTES / PAGE_SIZE;
/// Layers are numbered by one byte in the page table; `u8::MAX` means zero.
pub const MAX_LAYERS: usize = u8::MAX as usize;
const ZERO: u8 = u8::MAX;
/// `EAGAIN`/`EINTR` from an ioctl are retried this many times before they
/// count as a failure (they are not expected without non-cooperative
/// events, which are not enabled).
const RETRIES: u32 = 1000;

/// The kernel's userfaultfd ABI, from `include/uapi/linux/userfaultfd.h`.
mod uapi {
    /// `UFFD_API`.
    pub const UFFD_API: u64 = 0xAA;
    /// `UFFD_FEATURE_MISSING_SHMEM` (Linux 4.11).
    pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
    pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
    /// `UFFD_EVENT_PAGEFAULT`.
    pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
    /// The `_UFFDIO_*` command numbers, also the bit numbers of the
    /// `ioctls` masks the kernel answers with.
    pub const NR_REGISTER: u64 = 0x00;
    pub const NR_UNREGISTER: u64 = 0x01;
    pub const NR_WAKE: u64 = 0x02;
    pub const NR_COPY: u64 = 0x03;
    pub const NR_ZEROPAGE: u64 = 0x04;
    pub const NR_API: u64 = 0x3F;
    /// `UFFDIO`, the ioctl type byte, also `USERFAULTFD_IOC`.
    const UFFDIO: u64 = 0xAA;

    /// `_IOC(dir, type, nr, size)` of `asm-generic/ioctl.h` (x86 and arm64).
    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
    }
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    pub const UFFDIO_API: u64 = ioc(READ | WRITE, NR_API, size_of::<UffdioApi>());
    pub const UFFDIO_REGISTER: u64 = ioc(READ | WRITE, NR_REGISTER, size_of::<UffdioRegister>());
    /// `_IOR`, not `_IOW`: the header explains this historical slip.
    pub const UFFDIO_UNREGISTER: u64 = ioc(READ, NR_UNREGISTER, size_of::<UffdioRange>());
    pub const UFFDIO_WAKE: u64 = ioc(READ, NR_WAKE, size_of::<UffdioRange>());
    pub const UFFDIO_COPY: u64 = ioc(READ | WRITE, NR_COPY, size_of::<UffdioCopy>());
    pub const UFFDIO_ZEROPAGE: u64 = ioc(READ | WRITE, NR_ZEROPAGE, size_of::<UffdioZeropage>());
    /// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (Linux 6.1): `_IO(0xAA, 0)`.
    pub const USERFAULTFD_IOC_NEW: u64 = ioc(0, 0, 0);

    /// `struct uffd_msg` is 32 bytes: `event` at 0, then a union at 8
    /// whose page-fault arm is `flags` (8..16) and `address` (16..24).
    pub const MSG_SIZE: usize = 32;
    pub const MSG_EVENT: usize = 0;
    pub const MSG_ADDRESS: usize = 16;

    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioApi {
        pub api: u64,
        pub features: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Default, Clone, Copy)]
    pub struct UffdioRange {
        pub start: u64,
        pub len: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioRegister {
        pub range: UffdioRange,
        pub mode: u64,
        pub ioctls: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioCopy {
        pub dst: u64,
        pub src: u64,
        pub len: u64,
        pub mode: u64,
        /// Bytes copied, or a negated errno; written by the kernel.
        pub copy: i64,
    }

    #[repr(C)]
    #[derive(Default)]
    pub struct UffdioZeropage {
        pub range: UffdioRange,
        pub mode: u64,
        /// Bytes zeroed, or a negated errno; written by the kernel.
        pub zeropage: i64,
    }
}

/// An errno, shown with its name so that an error message can be searched
/// for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    fn last() -> Errno {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }

    fn name(self) -> &'static str {
        match self.0 {
            libc::EPERM => "EPERM",
            libc::ENOENT => "ENOENT",
            libc::ESRCH => "ESRCH",
            libc::EINTR => "EINTR",
            libc::EIO => "EIO",
            libc::ENXIO => "ENXIO",
            libc::EBADF => "EBADF",
            libc::EAGAIN => "EAGAIN",
            libc::ENOMEM => "ENOMEM",
            libc::EACCES => "EACCES",
            libc::EFAULT => "EFAULT",
            libc::EBUSY => "EBUSY",
            libc::EEXIST => "EEXIST",
            libc::ENODEV => "ENODEV",
            libc::EINVAL => "EINVAL",
            libc::EMFILE => "EMFILE",
            libc::ENOSPC => "ENOSPC",
            libc::ENOSYS => "ENOSYS",
            _ => "errno",
        }
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = std::io::Error::from_raw_os_error(self.0);
        write!(f, "{} {} ({text})", self.name(), self.0)
    }
}

/// Why loading could not start, or did not end well.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LazyError {
    /// userfaultfd cannot be used here: fall back to [`load_eager`] and
    /// tell the user this reason.
    #[error("userfaultfd is unavailable: {call} failed with {errno}{hint}")]
    Unavailable {
        call: &'static str,
        errno: Errno,
        hint: String,
    },
    /// The kernel's userfaultfd lacks a feature the loader needs; fall back
    /// to [`load_eager`] as for [`LazyError::Unavailable`].
    #[error("userfaultfd is unavailable: the kernel did not grant {feature} (granted features {granted:#x})")]
    FeatureMissing { feature: &'static str, granted: u64 },
    #[error("{call} failed with {errno}")]
    Syscall { call: &'static str, errno: Errno },
    #[error("region {index} ({region:x?}): {reason}")]
    InvalidRegion {
        index: usize,
        region: Region,
        reason: &'static str,
    },
    #[error("region {index} already holds the page at gpa {gpa:#x}: lazy and eager loading need fresh memory (the page would keep its old contents)")]
    AlreadyPopulated { index: usize, gpa: u64 },
    #[error("{count} layers given, at most {MAX_LAYERS} supported")]
    TooManyLayers { count: usize },
    #[error("layer {layer}: its page bitmap has {bits} bits but guest RAM needs {needed} (one per page up to its end)")]
    BitmapTooShort {
        layer: usize,
        bits: u64,
        needed: u64,
    },
    #[error("layer {layer}: the file has {len} bytes but holds the page at gpa {gpa:#x}, which needs {needed}")]
    LayerTooShort {
        layer: usize,
        len: u64,
        gpa: u64,
        needed: u64,
    },
    #[error("layer {layer}: pread at gpa {gpa:#x} failed with {errno}")]
    LayerRead {
        layer: usize,
        gpa: u64,
        errno: Errno,
    },
    #[error("layer {layer}: the file ended inside the page at gpa {gpa:#x} (it shrank after the loader started?)")]
    LayerShortRead { layer: usize, gpa: u64 },
    /// Loading finished, but these pages could not be read from their
    /// layer and were filled with zeros instead; the guest memory is wrong.
    #[error("{pages} page(s) could not be read and were zero-filled; first: {first}")]
    ZeroFilled { pages: u64, first: Box<LazyError> },
    /// Loading stopped before every page was in; absent pages read as
    /// zeros, and the VM must not be resumed.
    #[error("lazy loading stopped before every page was loaded: {0}")]
    Aborted(Box<LazyError>),
    #[error("the loader was dropped before loading finished")]
    Stopped,
    #[error("a loader thread panicked")]
    ThreadPanicked,
    #[error("cannot start the {thread} thread: {errno}")]
    Thread { thread: &'static str, errno: Errno },
}

impl LazyError {
    /// True when userfaultfd itself is missing here, so that the caller
    /// should load eagerly instead.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            LazyError::Unavailable { .. } | LazyError::FeatureMissing { .. }
        )
    }
}

/// One layer of a snapshot's memory.
pub struct Layer {
    /// The memory file: file offset == guest-physical address; holes read
    /// as zero pages.
    pub file: File,
    /// None: holds every page (a full snapshot). Some(bits): bit i set =
    /// holds the page at gpa i*4096 (bit i%64 of word i/64).
    pub pages: Option<Vec<u64>>,
}

/// One `MAP_SHARED` memfd mapping of guest RAM in this process.
///
/// The loaders write through `host_addr` (by syscalls), so a region must
/// be a live mapping of guest RAM that stays mapped while loading; the
/// loaders check that it is mapped and empty, not whose it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub host_addr: usize,
    pub len: usize,
    pub gpa: u64,
}

/// The regions of a vm-memory guest memory, for [`LazyLoader::start`] and
/// [`load_eager`].
pub fn regions_of(memory: &GuestMemory) -> Vec<Region> {
    memory
        .iter()
        .map(|r| Region {
            host_addr: r.as_ptr() as usize,
            len: r.len() as usize,
            gpa: r.start_addr().0,
        })
        .collect()
}

/// What a load did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadStats {
    /// Missing-page faults served by the fault handler (lazy only).
    pub faults: u64,
    /// Pages copied in by the prefetcher (lazy; pages a fault brought in
    /// first are not counted) or read (eager).
    pub pages_prefetched: u64,
    /// Pages whose content is zero: never read, left to shmem (or given a
    /// zero page when faulted).
    pub zero_pages: u64,
    /// Bytes read from the layer files.
    pub bytes: u64,
    /// From the start of loading to every page being in.
    pub elapsed: Duration,
}

/// A mapping to load, and where its pages are in the page table.
#[derive(Debug, Clone, Copy)]
struct PlannedRegion {
    host: usize,
    len: usize,
    gpa: u64,
    /// Index of its first page in [`Plan::source`].
    first: usize,
}

impl PlannedRegion {
    fn pages(&self) -> usize {
        self.len / PAGE_SIZE
    }

    fn contains(&self, addr: usize) -> bool {
        addr >= self.host && addr - self.host < self.len
    }
}

/// Where every page of guest RAM comes from, decided once up front.
struct Plan {
    regions: Vec<PlannedRegion>,
    /// Per page of RAM, region by region: the layer to read it from, or
    /// [`ZERO`].
    source: Vec<u8>,
    data_pages: u64,
    zero_pages: u64,
}

fn is_aligned(v: u64) -> bool {
    v.is_multiple_of(PAGE)
}

fn bit(bits: &[u64], page: u64) -> bool {
    let word = (page / 64) as usize;
    bits.get(word).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Checks the regions: page-aligned, not empty, not overlapping, within
/// the address ranges the syscalls take.
fn check_regions(regions: &[Region]) -> Result<(), LazyError> {
    let invalid = |index: usize, reason| LazyError::InvalidRegion {
        index,
        region: regions[index],
        reason,
    };
    for (i, r) in regions.iter().enumerate() {
        if r.len == 0 {
            return Err(invalid(i, "empty"));
        }
        if !is_aligned(r.host_addr as u64) || !is_aligned(r.len as u64) || !is_aligned(r.gpa) {
            return Err(invalid(
                i,
                "host address, length and gpa must be 4 KiB aligned",
            ));
        }
        if r.host_addr.checked_add(r.len).is_none() {
            return Err(invalid(i, "host range wraps around"));
        }
        match r.gpa.checked_add(r.len as u64) {
            // File offsets are signed.
            Some(end) if end <= i64::MAX as u64 => {}
            _ => return Err(invalid(i, "gpa range past the largest file offset")),
        }
    }
    let mut order: Vec<usize> = (0..regions.len()).collect();
    order.sort_by_key(|&i| regions[i].host_addr);
    for w in order.windows(2) {
        if regions[w[0]].host_addr + regions[w[0]].len > regions[w[1]].host_addr {
            return Err(invalid(w[1], "host range overlaps another region"));
        }
    }
    order.sort_by_key(|&i| regions[i].gpa);
    for w in order.windows(2) {
        if regions[w[0]].gpa + regions[w[0]].len as u64 > regions[w[1]].gpa {
            return Err(invalid(w[1], "gpa range overlaps another region"));
        }
    }
    Ok(())
}

/// The data extents `[start, end)` of a file, by `SEEK_DATA`/`SEEK_HOLE`.
/// A file system without hole support reports all of the file as data.
fn data_extents(file: &File, len: u64) -> Result<Vec<(u64, u64)>, LazyError> {
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut off = 0u64;
    while off < len {
        // SAFETY: lseek on a descriptor we hold; it only moves the file
        // position, which nothing here uses (all reads are pread).
        let data = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let errno = Errno::last();
            if errno.0 == libc::ENXIO {
                break; // no data past `off`
            }
            return Err(LazyError::Syscall {
                call: "lseek(SEEK_DATA)",
                errno,
            });
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(LazyError::Syscall {
                call: "lseek(SEEK_HOLE)",
                errno: Errno::last(),
            });
        }
        let (data, hole) = (data as u64, (hole as u64).min(len));
        if data >= len {
            break;
        }
        if hole <= data {
            // A file changing under us; take the rest as data rather than loop.
            extents.push((data, len));
            break;
        }
        extents.push((data, hole));
        off = hole;
    }
    Ok(extents)
}

/// Validates the regions and layers and decides every page's source.
fn plan(regions: &[Region], layers: &[Layer]) -> Result<Plan, LazyError> {
    check_regions(regions)?;
    if layers.len() > MAX_LAYERS {
        return Err(LazyError::TooManyLayers {
            count: layers.len(),
        });
    }
    let ram_end = regions
        .iter()
        .map(|r| r.gpa + r.len as u64)
        .max()
        .unwrap_or(0);
    let ram_end_page = ram_end / PAGE;

    // Per layer, a bitmap of the RAM pages that hold data in its file.
    let mut data_bits = Vec::with_capacity(layers.len());
    for (l, layer) in layers.iter().enumerate() {
        let len = layer
            .file
            .metadata()
            .map_err(|e| LazyError::Syscall {
                call: "fstat(layer)",
                errno: Errno(e.raw_os_error().unwrap_or(0)),
            })?
            .len();
        match &layer.pages {
            None => {
                if len < ram_end {
                    return Err(LazyError::LayerTooShort {
                        layer: l,
                        len,
                        gpa: len / PAGE * PAGE,
                        needed: ram_end,
                    });
                }
            }
            Some(bits) => {
                let have = bits.len() as u64 * 64;
                if have < ram_end_page {
                    return Err(LazyError::BitmapTooShort {
                        layer: l,
                        bits: have,
                        needed: ram_end_page,
                    });
                }
                for r in regions {
                    let first = r.gpa / PAGE;
                    let last_held = (first..first + (r.len / PAGE_SIZE) as u64)
                        .rev()
                        .find(|&p| bit(bits, p));
                    if let Some(p) = last_held {
                        let needed = (p + 1) * PAGE;
                        if len < needed {
                            return Err(LazyError::LayerTooShort {
                                layer: l,
                                len,
                                gpa: p * PAGE,
                                needed,
                            });
                        }
                    }
                }
            }
        }
        let mut data = vec![0u64; ram_end_page.div_ceil(64) as usize];
        for (start, end) in data_extents(&layer.file, len)? {
            // A page that is partly data is data.
            let first = start / PAGE;
            let end = end.div_ceil(PAGE).min(ram_end_page);
            for p in first..end {
                data[(p / 64) as usize] |= 1 << (p % 64);
            }
        }
        data_bits.push(data);
    }

    let mut planned = Vec::with_capacity(regions.len());
    let total: usize = regions.iter().map(|r| r.len / PAGE_SIZE).sum();
    let mut source = Vec::with_capacity(total);
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    for r in regions {
        planned.push(PlannedRegion {
            host: r.host_addr,
            len: r.len,
            gpa: r.gpa,
            first: source.len(),
        });
        let first = r.gpa / PAGE;
        for p in first..first + (r.len / PAGE_SIZE) as u64 {
            let newest = layers
                .iter()
                .enumerate()
                .rev()
                .find(|(_, layer)| layer.pages.as_deref().is_none_or(|bits| bit(bits, p)));
            let src = match newest {
                Some((l, _)) if bit(&data_bits[l], p) => l as u8,
                _ => ZERO,
            };
            if src == ZERO {
                zero_pages += 1;
            } else {
                data_pages += 1;
            }
            source.push(src);
        }
    }
    Ok(Plan {
        regions: planned,
        source,
        data_pages,
        zero_pages,
    })
}

/// Refuses memory that already holds pages: missing-page mode would never
/// see them, so they would keep their old contents.
fn check_unpopulated(plan: &Plan) -> Result<(), LazyError> {
    for (index, r) in plan.regions.iter().enumerate() {
        let mut resident = vec![0u8; r.pages()];
        // SAFETY: mincore only writes one byte per page of the range into
        // `resident`, which has exactly that many; an unmapped range is an
        // ENOMEM error, not a fault.
        let rc =
            unsafe { libc::mincore(r.host as *mut libc::c_void, r.len, resident.as_mut_ptr()) };
        if rc != 0 {
            let errno = Errno::last();
            if errno.0 == libc::ENOMEM {
                return Err(LazyError::InvalidRegion {
                    index,
                    region: Region {
                        host_addr: r.host,
                        len: r.len,
                        gpa: r.gpa,
                    },
                    reason: "not mapped in this process",
                });
            }
            return Err(LazyError::Syscall {
                call: "mincore",
                errno,
            });
        }
        if let Some(k) = resident.iter().position(|b| b & 1 != 0) {
            return Err(LazyError::AlreadyPopulated {
                index,
                gpa: r.gpa + k as u64 * PAGE,
            });
        }
    }
    Ok(())
}

/// Why a read from a layer did not deliver.
fn read_error(layer: usize, gpa: u64, errno: Option<Errno>) -> LazyError {
    match errno {
        Some(errno) => LazyError::LayerRead { layer, gpa, errno },
        None => LazyError::LayerShortRead { layer, gpa },
    }
}

/// Reads `len` bytes at file offset `gpa` of a layer into `dst`.
///
/// `dst` must be writable memory of `len` bytes that no Rust reference
/// covers; the kernel reports a bad address as EFAULT.
fn pread_exact(
    layers: &[File],
    layer: u8,
    dst: *mut u8,
    len: usize,
    gpa: u64,
) -> Result<(), LazyError> {
    let l = layer as usize;
    let Some(file) = layers.get(l) else {
        return Err(read_error(l, gpa, Some(Errno(libc::EBADF))));
    };
    let mut done = 0usize;
    while done < len {
        let off = gpa + done as u64;
        // SAFETY: reads into dst[done..len], which the caller vouches for;
        // the kernel checks the range and answers EFAULT rather than fault.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                dst.add(done) as *mut libc::c_void,
                len - done,
                off as libc::off_t,
            )
        };
        if n < 0 {
            let errno = Errno::last();
            if errno.0 == libc::EINTR {
                continue;
            }
            return Err(read_error(l, off / PAGE * PAGE, Some(errno)));
        }
        if n == 0 {
            return Err(read_error(l, off / PAGE * PAGE, None));
        }
        done += n as usize;
    }
    Ok(())
}

/// Reads every page now, straight into the regions: the fallback when
/// userfaultfd is unavailable, and the benchmark's baseline.
///
/// The regions must be live, fresh (no page present) `MAP_SHARED`
/// mappings, as for [`LazyLoader::start`]. Zero pages are not written:
/// fresh shmem reads as zeros already. Any read error or short file is
/// returned at once (nothing is waiting on this one page).
pub fn load_eager(regions: &[Region], layers: &[Layer]) -> Result<LoadStats, LazyError> {
    let started = Instant::now();
    let plan = plan(regions, layers)?;
    check_unpopulated(&plan)?;
    let files: Vec<File> = layers
        .iter()
        .map(|l| l.file.try_clone())
        .collect::<Result<_, _>>()
        .map_err(|e| LazyError::Syscall {
            call: "dup(layer)",
            errno: Errno(e.raw_os_error().unwrap_or(0)),
        })?;
    let mut stats = LoadStats {
        zero_pages: plan.zero_pages,
        ..LoadStats::default()
    };
    for r in &plan.regions {
        for (k, n, src) in runs(&plan.source[r.first..r.first + r.pages()], READ_PAGES) {
            let len = n * PAGE_SIZE;
            let dst = (r.host + k * PAGE_SIZE) as *mut u8;
            // Allocate the run's pages in one call rather than one fault per
            // page inside pread. Only an optimisation: a kernel without
            // MADV_POPULATE_WRITE (before 5.14) says EINVAL and pread
            // faults them in instead.
            // SAFETY: populating a range of a region the caller vouches is
            // mapped; it changes no contents (fresh shmem stays zero).
            unsafe { libc::madvise(dst as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE) };
            pread_exact(&files, src, dst, len, r.gpa + (k * PAGE_SIZE) as u64)?;
            stats.pages_prefetched += n as u64;
            stats.bytes += len as u64;
        }
    }
    stats.elapsed = started.elapsed();
    Ok(stats)
}

/// The runs `(first page, pages, layer)` of data pages in a region's slice
/// of the page table: contiguous, from one layer, at most `max` pages.
fn runs(source: &[u8], max: usize) -> impl Iterator<Item = (usize, usize, u8)> + '_ {
    let mut k = 0;
    std::iter::from_fn(move || {
        while k < source.len() && source[k] == ZERO {
            k += 1;
        }
        let src = *source.get(k)?;
        let start = k;
        while k < source.len() && k - start < max && source[k] == src {
            k += 1;
        }
        Some((start, k - start, src))
    })
}

/// A page-aligned buffer (UFFDIO_COPY's source), outside any registered
/// mapping.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct PageBuf([u8; PAGE_SIZE]);

/// Knobs for tests only.
#[derive(Debug, Clone, Copy, Default)]
struct Tuning {
    /// The prefetcher waits this long before it starts, so that a test can
    /// fault pages in before it gets to them.
    prefetch_delay: Duration,
}

/// What both threads share.
struct Shared {
    uffd: OwnedFd,
    /// Written to wake the fault handler's poll: at the end, and on drop.
    wake: OwnedFd,
    plan: Plan,
    files: Vec<File>,
    has_zeropage: bool,
    started: Instant,
    tuning: Tuning,
    /// Set by drop: both threads leave.
    stop: AtomicBool,
    /// Set once the regions are unregistered: no fault can come any more.
    unregistered: AtomicBool,
    faults: AtomicU64,
    prefetched: AtomicU64,
    bytes: AtomicU64,
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Default)]
struct State {
    /// The regions are registered with the userfaultfd.
    registered: bool,
    /// Loading is over, well or not; wait_loaded returns.
    finished: bool,
    elapsed: Duration,
    /// Set when loading could not go on.
    fatal: Option<LazyError>,
    zero_filled: u64,
    first_read_error: Option<LazyError>,
}

/// What happened to a `UFFDIO_COPY`/`UFFDIO_ZEROPAGE`.
enum Fill {
    /// All of it is in.
    Done,
    /// The first `copied` bytes are in, then `errno`.
    Failed { copied: u64, errno: Errno },
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means a thread panicked; the state is still
        // consistent (each update is one assignment) and must stay readable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn signal_wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a local array to our eventfd. A full
        // counter (EAGAIN) already means "wake up", so the result is moot.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                one.as_ptr() as *const libc::c_void,
                one.len(),
            )
        };
    }

    fn ioctl_range(&self, request: u64, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = uapi::UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER/UFFDIO_WAKE read one uffdio_range, which
        // `range` is.
        let rc = unsafe { libc::ioctl(self.uffd.as_raw_fd(), request as _, &mut range) };
        if rc == 0 {
            Ok(())
        } else {
            Err(Errno::last())
        }
    }

    /// Unregisters every region (once). On failure the regions stay
    /// registered and the fault handler keeps serving them.
    fn unregister_locked(&self, st: &mut State) -> Result<(), LazyError> {
        if !st.registered {
            return Ok(());
        }
        let mut result = Ok(());
        for r in &self.plan.regions {
            if let Err(errno) =
                self.ioctl_range(uapi::UFFDIO_UNREGISTER, r.host as u64, r.len as u64)
            {
                result = Err(LazyError::Syscall {
                    call: "ioctl(UFFDIO_UNREGISTER)",
                    errno,
                });
            }
        }
        if result.is_ok() {
            st.registered = false;
            self.unregistered.store(true, Ordering::Release);
        }
        result
    }

    /// Every page is in: unregister, and wake wait_loaded and the handler.
    fn finish(&self) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        if let Err(e) = self.unregister_locked(&mut st) {
            tracing::error!("lazy memory: {e}");
            st.fatal.get_or_insert(e);
        }
        st.finished = true;
        st.elapsed = self.started.elapsed();
        drop(st);
        self.done.notify_all();
        self.signal_wake();
    }

    /// Loading cannot go on: record why, and unregister so that no vCPU
    /// stays blocked on a fault nobody will serve.
    fn abort(&self, err: LazyError) {
        let mut st = self.lock();
        if st.finished {
            return;
        }
        tracing::error!("lazy memory: {err}; unregistering, absent pages now read as zeros");
        st.fatal = Some(err);
        if let Err(e) = self.unregister_locked(&mut st) {
            tracing::error!("lazy memory: {e}");
        }
        st.finished = true;
        st.elapsed = self.started.elapsed();
        drop(st);
        self.done.notify_all();
        self.signal_wake();
    }

    /// One `UFFDIO_COPY` of `len` bytes from `src` to `dst`, retrying
    /// EINTR/EAGAIN where nothing was copied.
    fn copy(&self, dst: u64, src: *const u8, len: u64) -> Fill {
        let mut copied = 0u64;
        let mut tries = 0;
        loop {
            let mut arg = uapi::UffdioCopy {
                dst: dst + copied,
                src: src as u64 + copied,
                len: len - copied,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `len` bytes at `src`, a buffer this
            // thread owns, and writes only `arg.copy`; the destination is
            // filled by the kernel in a registered range, never through a
            // Rust reference.
            let rc =
                unsafe { libc::ioctl(self.uffd.as_raw_fd(), uapi::UFFDIO_COPY as _, &mut arg) };
            if rc == 0 {
                return Fill::Done;
            }
            let errno = Errno::last();
            if arg.copy > 0 {
                copied += arg.copy as u64;
            }
            if copied >= len {
                return Fill::Done;
            }
            // A partial copy also answers EAGAIN: go on from where it stopped.
            if (errno.0 == libc::EAGAIN || errno.0 == libc::EINTR) && tries < RETRIES {
                tries += 1;
                continue;
            }
            return Fill::Failed { copied, errno };
        }
    }

    /// One zero page at `dst`.
    fn zeropage(&self, dst: u64, zeros: &PageBuf) -> Fill {
        if !self.has_zeropage {
            return self.copy(dst, zeros.0.as_ptr(), PAGE);
        }
        let mut tries = 0;
        loop {
            let mut arg = uapi::UffdioZeropage {
                range: uapi::UffdioRange {
                    start: dst,
                    len: PAGE,
                },
                mode: 0,
                zeropage: 0,
            };
            // SAFETY: UFFDIO_ZEROPAGE reads the struct and writes only
            // `arg.zeropage`.
            let rc =
                unsafe { libc::ioctl(self.uffd.as_raw_fd(), uapi::UFFDIO_ZEROPAGE as _, &mut arg) };
            if rc == 0 {
                return Fill::Done;
            }
            let errno = Errno::last();
            if (errno.0 == libc::EAGAIN || errno.0 == libc::EINTR) && tries < RETRIES {
                tries += 1;
                continue;
            }
            return Fill::Failed { copied: 0, errno };
        }
    }

    /// Judges a fill that failed. `EEXIST`: the other thread filled the
    /// page first, fine. After the unregister (`ENOENT`/`EINVAL`: the range
    /// is no longer ours), or while stopping, errors are moot. Anything
    /// else ends the load.
    fn fill_failed(&self, call: &'static str, errno: Errno) -> Result<(), ()> {
        if errno.0 == libc::EEXIST {
            return Ok(());
        }
        if self.stop.load(Ordering::Acquire) || self.unregistered.load(Ordering::Acquire) {
            return Err(());
        }
        self.abort(LazyError::Syscall { call, errno });
        Err(())
    }

    /// Fills a zero page at `dst` (the handler's answer for a hole, or for
    /// a page whose layer could not be read). True if this call put it in.
    fn fill_zero(&self, dst: u64, zeros: &PageBuf) -> Result<bool, ()> {
        match self.zeropage(dst, zeros) {
            Fill::Done => Ok(true),
            Fill::Failed { errno, .. } => self
                .fill_failed("ioctl(UFFDIO_ZEROPAGE)", errno)
                .map(|()| false),
        }
    }

    /// A page could not be read from its layer: zero-fill it and record
    /// why (the first error, and how many pages were zero-filled). True if
    /// this call put the page in.
    fn zero_fill_unreadable(&self, dst: u64, err: LazyError, zeros: &PageBuf) -> Result<bool, ()> {
        let placed = self.fill_zero(dst, zeros)?;
        let mut st = self.lock();
        if placed {
            tracing::warn!("lazy memory: {err}; zero-filled the page");
            st.zero_filled += 1;
        }
        st.first_read_error.get_or_insert(err);
        Ok(placed)
    }

    /// Copies `pages` pages from `buf` to `dst` in one ioctl, then page by
    /// page for whatever that did not do (a page another thread filled
    /// stops a batch). Returns the pages this call put in.
    fn fill_pages(&self, dst: u64, buf: *const u8, pages: usize) -> Result<u64, ()> {
        let len = (pages * PAGE_SIZE) as u64;
        let copied = match self.copy(dst, buf, len) {
            Fill::Done => return Ok(pages as u64),
            Fill::Failed { copied, errno } if pages == 1 => {
                self.fill_failed("ioctl(UFFDIO_COPY)", errno)?;
                return Ok(copied / PAGE);
            }
            Fill::Failed { copied, .. } => copied / PAGE,
        };
        let mut put = copied;
        for k in copied..pages as u64 {
            // SAFETY: k < pages, so the page is inside `buf`.
            let src = unsafe { buf.add((k * PAGE) as usize) };
            match self.copy(dst + k * PAGE, src, PAGE) {
                Fill::Done => put += 1,
                Fill::Failed { errno, .. } => self.fill_failed("ioctl(UFFDIO_COPY)", errno)?,
            }
        }
        Ok(put)
    }

    /// Serves one missing-page fault at `addr`.
    fn serve(&self, addr: u64, page: &mut PageBuf, zeros: &PageBuf) -> Result<(), ()> {
        let addr = addr & !(PAGE - 1);
        let Some(r) = self.plan.regions.iter().find(|r| r.contains(addr as usize)) else {
            // Not ours (cannot happen: only our regions are registered);
            // wake the thread rather than leave it.
            let _ = self.ioctl_range(uapi::UFFDIO_WAKE, addr, PAGE);
            return Ok(());
        };
        self.faults.fetch_add(1, Ordering::Relaxed);
        let k = (addr as usize - r.host) / PAGE_SIZE;
        let gpa = r.gpa + (k * PAGE_SIZE) as u64;
        let src = self.plan.source.get(r.first + k).copied().unwrap_or(ZERO);
        let placed = if src == ZERO {
            self.fill_zero(addr, zeros)?
        } else {
            match pread_exact(&self.files, src, page.0.as_mut_ptr(), PAGE_SIZE, gpa) {
                Ok(()) => {
                    self.bytes.fetch_add(PAGE, Ordering::Relaxed);
                    self.fill_pages(addr, page.0.as_ptr(), 1)? == 1
                }
                Err(e) => self.zero_fill_unreadable(addr, e, zeros)?,
            }
        };
        if !placed {
            // The prefetcher's copy woke the threads waiting then; wake
            // once more in case this one queued just after (cheap, and a
            // missed wake would be a hung vCPU).
            let _ = self.ioctl_range(uapi::UFFDIO_WAKE, addr, PAGE);
        }
        Ok(())
    }

    /// The fault handler thread: poll the userfaultfd and the wake eventfd,
    /// serve every page fault, leave once the regions are unregistered or
    /// on drop.
    fn handle_faults(&self) {
        let mut page = Box::new(PageBuf([0; PAGE_SIZE]));
        let zeros = Box::new(PageBuf([0; PAGE_SIZE]));
        let mut msgs = [0u8; uapi::MSG_SIZE * 16];
        loop {
            if self.stop.load(Ordering::Acquire) || self.unregistered.load(Ordering::Acquire) {
                return;
            }
            let mut fds = [
                libc::pollfd {
                    fd: self.uffd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll on two pollfds of a local array, its length given.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc < 0 {
                let errno = Errno::last();
                if errno.0 == libc::EINTR {
                    continue;
                }
                self.abort(LazyError::Syscall {
                    call: "poll(userfaultfd)",
                    errno,
                });
                return;
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let mut counter = [0u8; 8];
                // SAFETY: reads the 8-byte eventfd counter into a local
                // array, resetting it; the descriptor is non-blocking.
                unsafe {
                    libc::read(
                        self.wake.as_raw_fd(),
                        counter.as_mut_ptr() as *mut libc::c_void,
                        8,
                    )
                };
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                self.abort(LazyError::Syscall {
                    call: "poll(userfaultfd)",
                    errno: Errno(libc::EIO),
                });
                return;
            }
            if fds[0].revents & libc::POLLIN == 0 {
                continue;
            }
            loop {
                // SAFETY: reads whole uffd_msg records into a local array of
                // that many bytes; the descriptor is non-blocking.
                let n = unsafe {
                    libc::read(
                        self.uffd.as_raw_fd(),
                        msgs.as_mut_ptr() as *mut libc::c_void,
                        msgs.len(),
                    )
                };
                if n < 0 {
                    let errno = Errno::last();
                    if errno.0 == libc::EAGAIN {
                        break;
                    }
                    if errno.0 == libc::EINTR {
                        continue;
                    }
                    if self.fill_failed("read(userfaultfd)", errno).is_err() {
                        return;
                    }
                    break;
                }
                for msg in msgs[..n as usize].chunks_exact(uapi::MSG_SIZE) {
                    if msg[uapi::MSG_EVENT] != uapi::UFFD_EVENT_PAGEFAULT {
                        continue; // no other events were asked for
                    }
                    let mut addr = [0u8; 8];
                    addr.copy_from_slice(&msg[uapi::MSG_ADDRESS..uapi::MSG_ADDRESS + 8]);
                    let addr = u64::from_ne_bytes(addr);
                    if self.serve(addr, &mut page, &zeros).is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The prefetcher thread: copy every data page in, then unregister.
    fn prefetch(&self) {
        let delay_end = Instant::now() + self.tuning.prefetch_delay;
        while Instant::now() < delay_end {
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut buf = vec![PageBuf([0; PAGE_SIZE]); READ_PAGES];
        let zeros = Box::new(PageBuf([0; PAGE_SIZE]));
        let bufp = buf.as_mut_ptr() as *mut u8;
        for r in &self.plan.regions {
            for (k, n, src) in runs(&self.plan.source[r.first..r.first + r.pages()], READ_PAGES) {
                if self.stop.load(Ordering::Acquire) || self.lock().finished {
                    return;
                }
                let dst = (r.host + k * PAGE_SIZE) as u64;
                let gpa = r.gpa + (k * PAGE_SIZE) as u64;
                let result = match pread_exact(&self.files, src, bufp, n * PAGE_SIZE, gpa) {
                    Ok(()) => {
                        self.bytes
                            .fetch_add((n * PAGE_SIZE) as u64, Ordering::Relaxed);
                        (0..n).step_by(BATCH_PAGES).try_for_each(|c| {
                            let m = BATCH_PAGES.min(n - c);
                            // SAFETY: c < n, so the batch is inside the read.
                            let src = unsafe { bufp.add(c * PAGE_SIZE) };
                            let put = self.fill_pages(dst + (c * PAGE_SIZE) as u64, src, m)?;
                            self.prefetched.fetch_add(put, Ordering::Relaxed);
                            Ok(())
                        })
                    }
                    Err(e) => {
                        // Fill what can be read page by page; zero the rest.
                        self.prefetch_pages_one_by_one(dst, gpa, n, src, e, bufp, &zeros)
                    }
                };
                if result.is_err() {
                    return;
                }
            }
        }
        self.finish();
    }

    /// A batch read failed: read its pages singly, so that one bad page
    /// does not zero its neighbours.
    #[allow(clippy::too_many_arguments)]
    fn prefetch_pages_one_by_one(
        &self,
        dst: u64,
        gpa: u64,
        n: usize,
        src: u8,
        batch_err: LazyError,
        bufp: *mut u8,
        zeros: &PageBuf,
    ) -> Result<(), ()> {
        let mut reported = false;
        for k in 0..n as u64 {
            match pread_exact(&self.files, src, bufp, PAGE_SIZE, gpa + k * PAGE) {
                Ok(()) => {
                    self.bytes.fetch_add(PAGE, Ordering::Relaxed);
                    let put = self.fill_pages(dst + k * PAGE, bufp, 1)?;
                    self.prefetched.fetch_add(put, Ordering::Relaxed);
                }
                Err(e) => {
                    reported = true;
                    self.zero_fill_unreadable(dst + k * PAGE, e, zeros)?;
                }
            }
        }
        if !reported {
            // The batch failed yet every page read singly: a file in flux.
            // Nothing was zero-filled, so this is only worth a log line.
            tracing::warn!("lazy memory: {batch_err}; the pages read singly");
        }
        Ok(())
    }
}

/// Ends a loader thread's life: if it panicked, the load is aborted so that
/// neither wait_loaded nor a vCPU waits for it.
struct PanicGuard<'a>(&'a Shared);

impl Drop for PanicGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort(LazyError::ThreadPanicked);
        }
    }
}

/// Creates the userfaultfd: the syscall, or `/dev/userfaultfd` (Linux 6.1)
/// where the syscall is refused to this user.
fn open_uffd() -> Result<OwnedFd, LazyError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: a syscall that takes one integer and returns a new descriptor
    // or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        // SAFETY: a fresh descriptor that nothing else owns.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) });
    }
    let errno = Errno::last();
    match errno.0 {
        libc::ENOSYS => Err(LazyError::Unavailable {
            call: "userfaultfd(2)",
            errno,
            hint: " (kernel built without CONFIG_USERFAULTFD)".into(),
        }),
        libc::EPERM => {
            // Kernel-mode faults (KVM's) need a full userfaultfd, which an
            // unprivileged process gets only through /dev/userfaultfd.
            let dev = match std::fs::OpenOptions::new().read(true).write(true).open("/dev/userfaultfd") {
                Ok(dev) => dev,
                Err(e) => {
                    return Err(LazyError::Unavailable {
                        call: "userfaultfd(2)",
                        errno,
                        hint: format!(
                            " (vm.unprivileged_userfaultfd is 0 and this process lacks CAP_SYS_PTRACE; \
                             /dev/userfaultfd: {e})"
                        ),
                    })
                }
            };
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags as its integer
            // argument and returns a new descriptor or -1.
            let fd = unsafe { libc::ioctl(dev.as_raw_fd(), uapi::USERFAULTFD_IOC_NEW as _, flags) };
            if fd < 0 {
                return Err(LazyError::Unavailable {
                    call: "ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)",
                    errno: Errno::last(),
                    hint: " (after userfaultfd(2) gave EPERM)".into(),
                });
            }
            // SAFETY: a fresh descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        _ => Err(LazyError::Syscall {
            call: "userfaultfd(2)",
            errno,
        }),
    }
}

/// Handshakes the API and checks that shmem is supported.
fn uffd_api(uffd: &OwnedFd) -> Result<(), LazyError> {
    let mut api = uapi::UffdioApi {
        api: uapi::UFFD_API,
        features: uapi::UFFD_FEATURE_MISSING_SHMEM,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one uffdio_api, which `api` is.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), uapi::UFFDIO_API as _, &mut api) };
    if rc != 0 {
        let errno = Errno::last();
        return Err(LazyError::Unavailable {
            call: "ioctl(UFFDIO_API)",
            errno,
            hint: if errno.0 == libc::EINVAL {
                " (the kernel lacks UFFD_FEATURE_MISSING_SHMEM, Linux 4.11+)".into()
            } else {
                String::new()
            },
        });
    }
    if api.features & uapi::UFFD_FEATURE_MISSING_SHMEM == 0 {
        return Err(LazyError::FeatureMissing {
            feature: "UFFD_FEATURE_MISSING_SHMEM",
            granted: api.features,
        });
    }
    let needed = (1 << uapi::NR_REGISTER) | (1 << uapi::NR_UNREGISTER);
    if api.ioctls & needed != needed {
        return Err(LazyError::FeatureMissing {
            feature: "UFFDIO_REGISTER/UNREGISTER",
            granted: api.ioctls,
        });
    }
    Ok(())
}

/// Registers a region for missing-page faults; returns the range ioctls
/// the kernel allows on it.
fn uffd_register(uffd: &OwnedFd, r: &PlannedRegion) -> Result<u64, Errno> {
    let mut reg = uapi::UffdioRegister {
        range: uapi::UffdioRange {
            start: r.host as u64,
            len: r.len as u64,
        },
        mode: uapi::UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes one uffdio_register, which
    // `reg` is; it changes no memory, only how faults on it are handled.
    let rc = unsafe { libc::ioctl(uffd.as_raw_fd(), uapi::UFFDIO_REGISTER as _, &mut reg) };
    if rc == 0 {
        Ok(reg.ioctls)
    } else {
        Err(Errno::last())
    }
}

/// Loads guest memory lazily: the guest may run while it loads.
pub struct LazyLoader {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl LazyLoader {
    /// Registers `regions` with a userfaultfd (missing-page mode on shmem),
    /// starts one thread that serves faults and one that fills every
    /// non-zero page in the background (newest layer wins), and returns at
    /// once.
    ///
    /// `layers` are oldest first. The regions must be live, fresh (no page
    /// present) `MAP_SHARED` memfd mappings that stay mapped until the
    /// loader is dropped, and no other mapping of the memfd may be made
    /// before [`Self::wait_loaded`]. [`LazyError::is_unavailable`] tells
    /// when to fall back to [`load_eager`].
    pub fn start(regions: &[Region], layers: Vec<Layer>) -> Result<LazyLoader, LazyError> {
        Self::start_tuned(regions, layers, Tuning::default())
    }

    fn start_tuned(
        regions: &[Region],
        layers: Vec<Layer>,
        tuning: Tuning,
    ) -> Result<LazyLoader, LazyError> {
        let started = Instant::now();
        let plan = plan(regions, &layers)?;
        check_unpopulated(&plan)?;
        let files: Vec<File> = layers.into_iter().map(|l| l.file).collect();

        let uffd = open_uffd()?;
        uffd_api(&uffd)?;
        let mut has_zeropage = true;
        for (i, r) in plan.regions.iter().enumerate() {
            let ioctls = match uffd_register(&uffd, r) {
                Ok(ioctls) => ioctls,
                // Closing `uffd` on the way out unregisters what was done.
                Err(errno) if errno.0 == libc::EINVAL => {
                    return Err(LazyError::Unavailable {
                        call: "ioctl(UFFDIO_REGISTER)",
                        errno,
                        hint: format!(" (region {i}: not memory userfaultfd can handle here)"),
                    })
                }
                Err(errno) => {
                    return Err(LazyError::Syscall {
                        call: "ioctl(UFFDIO_REGISTER)",
                        errno,
                    })
                }
            };
            if ioctls & (1 << uapi::NR_COPY) == 0 {
                return Err(LazyError::FeatureMissing {
                    feature: "UFFDIO_COPY on the region",
                    granted: ioctls,
                });
            }
            has_zeropage &= ioctls & (1 << uapi::NR_ZEROPAGE) != 0;
        }

        // SAFETY: eventfd takes two integers and returns a new descriptor
        // or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if wake < 0 {
            return Err(LazyError::Syscall {
                call: "eventfd",
                errno: Errno::last(),
            });
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };

        let shared = Arc::new(Shared {
            uffd,
            wake,
            plan,
            files,
            has_zeropage,
            started,
            tuning,
            stop: AtomicBool::new(false),
            unregistered: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            prefetched: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            state: Mutex::new(State {
                registered: true,
                ..State::default()
            }),
            done: Condvar::new(),
        });
        let mut loader = LazyLoader {
            shared,
            threads: Vec::new(),
        };
        // If a spawn fails, dropping `loader` stops what was started and
        // unregisters.
        loader.spawn("uffd-fault", Shared::handle_faults)?;
        loader.spawn("uffd-prefetch", Shared::prefetch)?;
        Ok(loader)
    }

    fn spawn(&mut self, name: &'static str, body: fn(&Shared)) -> Result<(), LazyError> {
        let shared = Arc::clone(&self.shared);
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _guard = PanicGuard(&shared);
                body(&shared);
            })
            .map_err(|e| LazyError::Thread {
                thread: name,
                errno: Errno(e.raw_os_error().unwrap_or(0)),
            })?;
        self.threads.push(handle);
        Ok(())
    }

    /// Blocks until every page is in the memfd and the regions are
    /// unregistered (after that, the memfd is complete: another process
    /// may map it).
    pub fn wait_loaded(&self) -> Result<LoadStats, LazyError> {
        let s = &self.shared;
        let mut st = s.lock();
        while !st.finished {
            st = s.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(fatal) = &st.fatal {
            return Err(LazyError::Aborted(Box::new(fatal.clone())));
        }
        if let Some(first) = &st.first_read_error {
            return Err(LazyError::ZeroFilled {
                pages: st.zero_filled,
                first: Box::new(first.clone()),
            });
        }
        Ok(LoadStats {
            faults: s.faults.load(Ordering::Relaxed),
            pages_prefetched: s.prefetched.load(Ordering::Relaxed),
            zero_pages: s.plan.zero_pages,
            bytes: s.bytes.load(Ordering::Relaxed),
            elapsed: st.elapsed,
        })
    }

    /// True once every page is in the memfd and the regions are
    /// unregistered (including when some pages had to be zero-filled:
    /// [`Self::wait_loaded`] says so); false while loading, or if loading
    /// was aborted.
    pub fn is_loaded(&self) -> bool {
        let st = self.shared.lock();
        st.finished && st.fatal.is_none()
    }

    /// Pages that hold data and are read from the layers.
    pub fn data_pages(&self) -> u64 {
        self.shared.plan.data_pages
    }
}

impl Drop for LazyLoader {
    /// Stops both threads. If loading had not finished, the regions are
    /// unregistered and the pages not yet in read as zeros from then on.
    fn drop(&mut self) {
        let s = &self.shared;
        s.stop.store(true, Ordering::Release);
        s.signal_wake();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let mut st = s.lock();
        if let Err(e) = s.unregister_locked(&mut st) {
            // Closing the userfaultfd (when `shared` drops) unregisters too.
            tracing::warn!("lazy memory: {e}");
        }
        if !st.finished {
            st.finished = true;
            st.fatal = Some(LazyError::Stopped);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const MIB: usize = 1 << 20;

    /// Guest RAM as `memory.rs` makes it: one memfd, one MAP_SHARED mapping
    /// per range, the ranges laid one after another in the memfd.
    struct Ram {
        memfd: File,
        size: usize,
        regions: Vec<Region>,
        /// Each region's offset in the memfd.
        offsets: Vec<u64>,
    }

    fn mmap_shared(fd: &File, off: u64, len: usize) -> usize {
        // SAFETY: a new shared mapping of our memfd; the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off as libc::off_t,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        p as usize
    }

    fn munmap(addr: usize, len: usize) {
        // SAFETY: unmaps a mapping this test made and no longer reads.
        unsafe { libc::munmap(addr as *mut libc::c_void, len) };
    }

    impl Ram {
        fn new(ranges: &[(u64, usize)]) -> Ram {
            let name = c"lazy-test-ram";
            // SAFETY: memfd_create with a NUL-terminated name; checked.
            let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0);
            // SAFETY: a fresh descriptor that nothing else owns.
            let memfd = unsafe { File::from_raw_fd(fd) };
            let size: usize = ranges.iter().map(|r| r.1).sum();
            memfd.set_len(size as u64).unwrap();
            let (mut regions, mut offsets, mut off) = (Vec::new(), Vec::new(), 0u64);
            for &(gpa, len) in ranges {
                regions.push(Region {
                    host_addr: mmap_shared(&memfd, off, len),
                    len,
                    gpa,
                });
                offsets.push(off);
                off += len as u64;
            }
            Ram {
                memfd,
                size,
                regions,
                offsets,
            }
        }

        fn pages(&self) -> impl Iterator<Item = u64> + '_ {
            self.regions
                .iter()
                .flat_map(|r| r.gpa / PAGE..(r.gpa + r.len as u64) / PAGE)
        }

        /// Reads the page at `page` (a gpa page number) through `base`, a
        /// mapping laid out like `regions` (this process's own, or another).
        fn read_page_via(&self, bases: &[usize], page: u64) -> Vec<u8> {
            let gpa = page * PAGE;
            for (r, &base) in self.regions.iter().zip(bases) {
                if gpa >= r.gpa && gpa < r.gpa + r.len as u64 {
                    let mut out = vec![0u8; PAGE_SIZE];
                    let src = base + (gpa - r.gpa) as usize;
                    // SAFETY: src is inside a live mapping of `len` bytes;
                    // copying through a raw pointer creates no reference
                    // to memory the kernel fills.
                    unsafe {
                        std::ptr::copy_nonoverlapping(src as *const u8, out.as_mut_ptr(), PAGE_SIZE)
                    };
                    return out;
                }
            }
            panic!("page {page:#x} is not RAM");
        }

        fn read_page(&self, page: u64) -> Vec<u8> {
            let bases: Vec<usize> = self.regions.iter().map(|r| r.host_addr).collect();
            self.read_page_via(&bases, page)
        }

        /// Maps the memfd a second time, as the monitor would, and checks
        /// every page there.
        fn check_second_mapping(&self, expect: &dyn Fn(u64) -> Option<u8>) {
            let whole = mmap_shared(&self.memfd, 0, self.size);
            let bases: Vec<usize> = self.offsets.iter().map(|&o| whole + o as usize).collect();
            for page in self.pages() {
                assert_eq!(
                    self.read_page_via(&bases, page),
                    content(page, expect(page)),
                    "page {page:#x} (second mapping)"
                );
            }
            munmap(whole, self.size);
        }

        fn check_all(&self, expect: &dyn Fn(u64) -> Option<u8>) {
            for page in self.pages() {
                assert_eq!(
                    self.read_page(page),
                    content(page, expect(page)),
                    "page {page:#x}"
                );
            }
        }
    }

    impl Drop for Ram {
        fn drop(&mut self) {
            for r in &self.regions {
                munmap(r.host_addr, r.len);
            }
        }
    }

    /// A page's bytes: a pattern of `page` and `salt` that has no zero
    /// byte, or all zeros for None.
    fn content(page: u64, salt: Option<u8>) -> Vec<u8> {
        match salt {
            None => vec![0; PAGE_SIZE],
            Some(s) => (0..PAGE_SIZE)
                .map(|i| (((page * 7 + i as u64) % 251) as u8 ^ s) | 1)
                .collect(),
        }
    }

    /// A layer file of `len` bytes: `Some(salt)` pages hold the pattern,
    /// `None` pages hold explicit zeros (data, not a hole), the rest are
    /// holes.
    fn layer_file(len: u64, pages: &[(u64, Option<u8>)]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        for &(page, salt) in pages {
            f.write_all_at(&content(page, salt), page * PAGE).unwrap();
        }
        f
    }

    fn bitmap(ram_end: u64, pages: &[u64]) -> Vec<u64> {
        let mut bits = vec![0u64; (ram_end / PAGE).div_ceil(64) as usize];
        for &p in pages {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        bits
    }

    /// Starts a loader, or None (and says why) where userfaultfd is
    /// unavailable to this process.
    fn start(ram: &Ram, layers: Vec<Layer>, delay_ms: u64) -> Option<LazyLoader> {
        match LazyLoader::start_tuned(
            &ram.regions,
            layers,
            Tuning {
                prefetch_delay: Duration::from_millis(delay_ms),
            },
        ) {
            Ok(l) => Some(l),
            Err(e) if e.is_unavailable() => {
                eprintln!("SKIPPED: {e}");
                None
            }
            Err(e) => panic!("start: {e}"),
        }
    }

    /// A small random order (xorshift), so that reads jump about.
    fn shuffled(mut v: Vec<u64>, mut seed: u64) -> Vec<u64> {
        for i in (1..v.len()).rev() {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            v.swap(i, (seed % (i as u64 + 1)) as usize);
        }
        v
    }

    /// Reads every page in random order from `threads` threads at once,
    /// checking each.
    fn read_concurrently(ram: &Ram, threads: u64, expect: &(dyn Fn(u64) -> Option<u8> + Sync)) {
        let pages: Vec<u64> = ram.pages().collect();
        let bases: Vec<usize> = ram.regions.iter().map(|r| r.host_addr).collect();
        std::thread::scope(|s| {
            for t in 0..threads {
                let order = shuffled(pages.clone(), 0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                let bases = &bases;
                s.spawn(move || {
                    for page in order {
                        assert_eq!(
                            ram.read_page_via(bases, page),
                            content(page, expect(page)),
                            "page {page:#x}"
                        );
                    }
                });
            }
        });
    }

    /// 8 MiB of RAM split around a hole, as the layout splits it around the
    /// MMIO hole: gpa 0..6 MiB and 16..18 MiB.
    const RANGES: [(u64, usize); 2] = [(0, 6 * MIB), (16 << 20, 2 * MIB)];
    const RAM_END: u64 = 18 << 20;

    /// The full layer of most tests: long data runs, long holes, scattered
    /// pages, explicit zero pages; and a page in the hole between the
    /// regions, which is not RAM.
    fn full_layer_pages(salt: u8) -> Vec<(u64, Option<u8>)> {
        let mut pages = Vec::new();
        for p in 0..RAM_END / PAGE {
            let data =
                p < 300 || (p >= 1024 && p % 7 < 4) || (4096..4608).contains(&p) && p % 3 == 0;
            if data {
                pages.push((p, Some(salt)));
            } else if p % 97 == 0 {
                pages.push((p, None));
            }
        }
        pages.push((2000, Some(salt))); // in the gap (gpa 8 MiB): not RAM, ignored
        pages
    }

    #[test]
    fn lazy_faults_in_random_order_then_memfd_is_complete() {
        let pages = full_layer_pages(0x5a);
        let lookup: std::collections::HashMap<u64, Option<u8>> = pages.iter().copied().collect();
        let expect = |p: u64| lookup.get(&p).copied().flatten();
        let ram = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: layer_file(RAM_END, &pages),
            pages: None,
        }];
        // The prefetcher waits, so that the readers' faults come first.
        let Some(loader) = start(&ram, layers, 300) else {
            return;
        };
        read_concurrently(&ram, 2, &expect);
        let stats = loader.wait_loaded().unwrap();
        assert!(loader.is_loaded());
        assert!(stats.faults > 0, "{stats:?}");
        let total = ram.pages().count() as u64;
        assert_eq!(stats.zero_pages + loader.data_pages(), total);
        assert!(stats.pages_prefetched <= loader.data_pages());
        // Zero pages are never read: each data page is read once by the
        // prefetcher, plus once per fault.
        assert!(
            stats.bytes <= (loader.data_pages() + stats.faults) * PAGE,
            "{stats:?}"
        );
        ram.check_all(&expect);
        ram.check_second_mapping(&expect);
    }

    /// Writes made while loading (the guest's) land on the loaded page and
    /// survive the prefetcher, on data pages and zero pages alike.
    #[test]
    fn writes_during_load_survive() {
        let pages = full_layer_pages(0x21);
        let lookup: std::collections::HashMap<u64, Option<u8>> = pages.iter().copied().collect();
        let expect = |p: u64| lookup.get(&p).copied().flatten();
        let ram = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: layer_file(RAM_END, &pages),
            pages: None,
        }];
        let Some(loader) = start(&ram, layers, 200) else {
            return;
        };
        let written: Vec<u64> = ram.pages().filter(|p| p % 5 == 0).collect();
        let bases: Vec<usize> = ram.regions.iter().map(|r| r.host_addr).collect();
        for &p in &written {
            let r = ram
                .regions
                .iter()
                .zip(&bases)
                .find(|(r, _)| p * PAGE >= r.gpa && p * PAGE < r.gpa + r.len as u64);
            let (r, &base) = r.unwrap();
            // SAFETY: a byte inside a live mapping of the test's RAM.
            unsafe { *((base + (p * PAGE - r.gpa) as usize + 100) as *mut u8) = 0xee };
        }
        loader.wait_loaded().unwrap();
        let want = |p: u64| {
            let mut c = content(p, expect(p));
            if written.contains(&p) {
                c[100] = 0xee;
            }
            c
        };
        let whole = mmap_shared(&ram.memfd, 0, ram.size);
        let other: Vec<usize> = ram.offsets.iter().map(|&o| whole + o as usize).collect();
        for p in ram.pages() {
            assert_eq!(ram.read_page(p), want(p), "page {p:#x}");
            assert_eq!(
                ram.read_page_via(&other, p),
                want(p),
                "page {p:#x} (second mapping)"
            );
        }
        munmap(whole, ram.size);
    }

    /// A fault taken by the kernel itself (copy_from_user in a syscall, as
    /// KVM and vhost take them) waits for the page like a user one.
    #[test]
    fn kernel_mode_faults_are_served() {
        let pages = full_layer_pages(0x44);
        let ram = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: layer_file(RAM_END, &pages),
            pages: None,
        }];
        let Some(loader) = start(&ram, layers, 200) else {
            return;
        };
        let out = tempfile::tempfile().unwrap();
        let src = ram.regions[0].host_addr + 5 * PAGE_SIZE;
        // SAFETY: write(2) reads one page of a live mapping; the kernel
        // faults on it, which the loader serves.
        let n = unsafe { libc::pwrite(out.as_raw_fd(), src as *const libc::c_void, PAGE_SIZE, 0) };
        assert_eq!(n, PAGE_SIZE as isize, "{}", std::io::Error::last_os_error());
        let mut got = vec![0u8; PAGE_SIZE];
        out.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got, content(5, Some(0x44)));
        assert!(!loader.is_loaded());
        assert!(loader.wait_loaded().unwrap().faults >= 1);
    }

    #[test]
    fn lazy_prefetch_alone_fills_the_memfd() {
        let pages = full_layer_pages(0x33);
        let lookup: std::collections::HashMap<u64, Option<u8>> = pages.iter().copied().collect();
        let expect = |p: u64| lookup.get(&p).copied().flatten();
        let ram = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: layer_file(RAM_END, &pages),
            pages: None,
        }];
        let Some(loader) = start(&ram, layers, 0) else {
            return;
        };
        let stats = loader.wait_loaded().unwrap();
        assert_eq!(stats.faults, 0);
        assert_eq!(stats.pages_prefetched, loader.data_pages());
        assert_eq!(stats.bytes, loader.data_pages() * PAGE);
        // Check through the other mapping first: nothing was faulted in
        // this process, so it shows what the memfd itself holds.
        ram.check_second_mapping(&expect);
        ram.check_all(&expect);
    }

    /// A base full layer and two increments: the newest layer holding a
    /// page wins, including when it holds the page as zeros (a hole, or
    /// written zeros).
    fn layered_layers() -> (Vec<Layer>, impl Fn(u64) -> Option<u8> + Sync) {
        let base: Vec<(u64, Option<u8>)> = (0..RAM_END / PAGE)
            .filter(|p| p.is_multiple_of(2))
            .map(|p| (p, Some(1)))
            .collect();
        // Layer 1 holds pages 0..200 (new data, except 10..20: held as a
        // hole, and 20..30: held as written zeros) and 4100..4200.
        let held1: Vec<u64> = (0..200).chain(4100..4200).collect();
        let data1: Vec<(u64, Option<u8>)> = held1
            .iter()
            .filter(|&&p| !(10..20).contains(&p))
            .map(|&p| (p, if (20..30).contains(&p) { None } else { Some(2) }))
            .collect();
        // Layer 2 holds 150..160 and 4150..4160, and a page in the gap.
        let held2: Vec<u64> = (150..160).chain(4150..4160).chain([2000]).collect();
        let data2: Vec<(u64, Option<u8>)> = held2.iter().map(|&p| (p, Some(3))).collect();
        let layers = vec![
            Layer {
                file: layer_file(RAM_END, &base),
                pages: None,
            },
            // Increments are only as long as their last page.
            Layer {
                file: layer_file(4200 * PAGE, &data1),
                pages: Some(bitmap(RAM_END, &held1)),
            },
            Layer {
                file: layer_file(4160 * PAGE, &data2),
                pages: Some(bitmap(RAM_END, &held2)),
            },
        ];
        let expect = move |p: u64| {
            if held2.contains(&p) {
                Some(3)
            } else if held1.contains(&p) {
                if (10..30).contains(&p) {
                    None
                } else {
                    Some(2)
                }
            } else if p.is_multiple_of(2) {
                Some(1)
            } else {
                None
            }
        };
        (layers, expect)
    }

    #[test]
    fn newest_layer_wins_lazily() {
        let (layers, expect) = layered_layers();
        let ram = Ram::new(&RANGES);
        let Some(loader) = start(&ram, layers, 100) else {
            return;
        };
        read_concurrently(&ram, 2, &expect);
        loader.wait_loaded().unwrap();
        ram.check_all(&expect);
        ram.check_second_mapping(&expect);
    }

    #[test]
    fn newest_layer_wins_eagerly() {
        let (layers, expect) = layered_layers();
        let ram = Ram::new(&RANGES);
        let stats = load_eager(&ram.regions, &layers).unwrap();
        assert_eq!(stats.faults, 0);
        ram.check_all(&expect);
        ram.check_second_mapping(&expect);
    }

    #[test]
    fn eager_gives_the_same_bytes() {
        let pages = full_layer_pages(0x77);
        let lookup: std::collections::HashMap<u64, Option<u8>> = pages.iter().copied().collect();
        let expect = |p: u64| lookup.get(&p).copied().flatten();
        let file = layer_file(RAM_END, &pages);
        let eager = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: file.try_clone().unwrap(),
            pages: None,
        }];
        let stats = load_eager(&eager.regions, &layers).unwrap();
        eager.check_second_mapping(&expect);
        let lazy = Ram::new(&RANGES);
        let Some(loader) = start(&lazy, layers, 0) else {
            return;
        };
        let lazy_stats = loader.wait_loaded().unwrap();
        assert_eq!(stats.pages_prefetched, lazy_stats.pages_prefetched);
        assert_eq!(stats.zero_pages, lazy_stats.zero_pages);
        for page in eager.pages() {
            assert_eq!(
                eager.read_page(page),
                lazy.read_page(page),
                "page {page:#x}"
            );
        }
    }

    fn both_fail(ram: &Ram, make: &dyn Fn() -> Vec<Layer>) -> (LazyError, LazyError) {
        let eager = load_eager(&ram.regions, &make()).unwrap_err();
        let lazy = match LazyLoader::start(&ram.regions, make()) {
            Ok(_) => panic!("start accepted bad input"),
            Err(e) => e,
        };
        (eager, lazy)
    }

    #[test]
    fn increment_shorter_than_a_page_it_holds_is_an_error() {
        let ram = Ram::new(&RANGES);
        let make = || {
            vec![
                Layer {
                    file: layer_file(RAM_END, &[]),
                    pages: None,
                },
                // Holds page 300, but the file ends half-way through it.
                Layer {
                    file: layer_file(300 * PAGE + 100, &[]),
                    pages: Some(bitmap(RAM_END, &[5, 300])),
                },
            ]
        };
        for e in <[LazyError; 2]>::from(both_fail(&ram, &make)) {
            assert!(
                matches!(e, LazyError::LayerTooShort { layer: 1, gpa, .. } if gpa == 300 * PAGE),
                "{e}"
            );
        }
    }

    #[test]
    fn full_layer_shorter_than_ram_is_an_error() {
        let ram = Ram::new(&RANGES);
        let make = || {
            vec![Layer {
                file: layer_file(RAM_END - PAGE, &[(3, Some(1))]),
                pages: None,
            }]
        };
        for e in <[LazyError; 2]>::from(both_fail(&ram, &make)) {
            assert!(
                matches!(
                    e,
                    LazyError::LayerTooShort {
                        layer: 0,
                        needed: RAM_END,
                        ..
                    }
                ),
                "{e}"
            );
        }
    }

    #[test]
    fn bitmap_too_short_is_an_error() {
        let ram = Ram::new(&RANGES);
        let make = || {
            vec![
                Layer {
                    file: layer_file(RAM_END, &[]),
                    pages: None,
                },
                // Covers 6 MiB, but RAM reaches 18 MiB.
                Layer {
                    file: layer_file(RAM_END, &[]),
                    pages: Some(vec![u64::MAX; 6 * MIB / PAGE_SIZE / 64]),
                },
            ]
        };
        for e in <[LazyError; 2]>::from(both_fail(&ram, &make)) {
            assert!(
                matches!(e, LazyError::BitmapTooShort { layer: 1, .. }),
                "{e}"
            );
        }
        // No bitmap words at all.
        let e = load_eager(
            &ram.regions,
            &[Layer {
                file: layer_file(RAM_END, &[]),
                pages: Some(Vec::new()),
            }],
        )
        .unwrap_err();
        assert!(
            matches!(e, LazyError::BitmapTooShort { bits: 0, .. }),
            "{e}"
        );
    }

    #[test]
    fn bad_regions_are_errors() {
        let ram = Ram::new(&RANGES);
        let layer = || {
            vec![Layer {
                file: layer_file(RAM_END, &[]),
                pages: None,
            }]
        };
        let r = ram.regions[0];
        let cases = [
            vec![Region {
                host_addr: r.host_addr + 8,
                ..r
            }],
            vec![Region {
                len: r.len - 8,
                ..r
            }],
            vec![Region { gpa: 100, ..r }],
            vec![Region { len: 0, ..r }],
            vec![r, Region { gpa: RAM_END, ..r }],
            vec![
                r,
                Region {
                    host_addr: ram.regions[1].host_addr,
                    gpa: 1 << 20,
                    len: ram.regions[1].len,
                },
            ],
        ];
        for regions in cases {
            let e = load_eager(&regions, &layer()).unwrap_err();
            assert!(
                matches!(e, LazyError::InvalidRegion { .. }),
                "{regions:x?}: {e}"
            );
            let e = LazyLoader::start(&regions, layer()).err().unwrap();
            assert!(
                matches!(e, LazyError::InvalidRegion { .. }),
                "{regions:x?}: {e}"
            );
        }
        // An address range that is not mapped: below vm.mmap_min_addr
        // nothing can be (an unmapped range of our own could be reused by a
        // test running beside this one).
        let regions = [Region {
            host_addr: PAGE_SIZE,
            len: 2 * PAGE_SIZE,
            gpa: 0,
        }];
        let e = load_eager(&regions, &layer()).unwrap_err();
        assert!(
            matches!(
                e,
                LazyError::InvalidRegion {
                    reason: "not mapped in this process",
                    ..
                }
            ),
            "{e}"
        );
        let e = LazyLoader::start(&regions, layer()).err().unwrap();
        assert!(
            matches!(
                e,
                LazyError::InvalidRegion {
                    reason: "not mapped in this process",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn populated_memory_is_refused() {
        let ram = Ram::new(&RANGES);
        // SAFETY: writes one byte inside the first live mapping.
        unsafe { *((ram.regions[1].host_addr + 3 * PAGE_SIZE) as *mut u8) = 7 };
        let layer = || {
            vec![Layer {
                file: layer_file(RAM_END, &[]),
                pages: None,
            }]
        };
        let e = load_eager(&ram.regions, &layer()).unwrap_err();
        assert!(
            matches!(e, LazyError::AlreadyPopulated { index: 1, gpa } if gpa == (16 << 20) + 3 * PAGE),
            "{e}"
        );
        let e = LazyLoader::start(&ram.regions, layer()).err().unwrap();
        assert!(matches!(e, LazyError::AlreadyPopulated { .. }), "{e}");
    }

    #[test]
    fn file_shrinking_after_start_zero_fills_and_reports() {
        let pages: Vec<(u64, Option<u8>)> = (0..RAM_END / PAGE).map(|p| (p, Some(9))).collect();
        let file = layer_file(RAM_END, &pages);
        let shrink = file.try_clone().unwrap();
        let ram = Ram::new(&RANGES);
        let Some(loader) = start(&ram, vec![Layer { file, pages: None }], 200) else {
            return;
        };
        shrink.set_len(1 << 20).unwrap();
        // A fault past the new end: zeros, at once, not a hang.
        assert_eq!(ram.read_page(512), content(512, None));
        // Before it: the data.
        assert_eq!(ram.read_page(3), content(3, Some(9)));
        match loader.wait_loaded() {
            Err(LazyError::ZeroFilled { pages, first }) => {
                let memory_pages = ram.pages().count() as u64;
                assert_eq!(pages, memory_pages - 256, "{first}");
                assert!(
                    matches!(*first, LazyError::LayerShortRead { layer: 0, .. }),
                    "{first}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(loader.is_loaded());
        ram.check_second_mapping(&|p| if p < 256 { Some(9) } else { None });
    }

    #[test]
    fn drop_before_loaded_stops_at_once() {
        let pages = full_layer_pages(0x11);
        let ram = Ram::new(&RANGES);
        let layers = vec![Layer {
            file: layer_file(RAM_END, &pages),
            pages: None,
        }];
        let Some(loader) = start(&ram, layers, 60_000) else {
            return;
        };
        assert_eq!(ram.read_page(1), content(1, Some(0x11)));
        assert!(!loader.is_loaded());
        let t = Instant::now();
        drop(loader);
        assert!(t.elapsed() < Duration::from_secs(5));
        // Unregistered: a page not loaded now reads as zeros, no hang.
        assert_eq!(ram.read_page(2), content(2, None));
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_header() {
        // Printed by a C program including <linux/userfaultfd.h> (6.1).
        assert_eq!(uapi::UFFDIO_API, 0xc018_aa3f);
        assert_eq!(uapi::UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(uapi::UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(uapi::UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(uapi::UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(uapi::UFFDIO_ZEROPAGE, 0xc020_aa04);
        assert_eq!(uapi::USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(size_of::<uapi::UffdioApi>(), 24);
        assert_eq!(size_of::<uapi::UffdioRegister>(), 32);
        assert_eq!(size_of::<uapi::UffdioCopy>(), 40);
        assert_eq!(size_of::<uapi::UffdioZeropage>(), 32);
    }

    #[test]
    fn errors_name_the_call_and_errno() {
        let e = LazyError::Unavailable {
            call: "userfaultfd(2)",
            errno: Errno(libc::EPERM),
            hint: String::new(),
        };
        let text = e.to_string();
        assert!(
            text.contains("userfaultfd(2)") && text.contains("EPERM 1"),
            "{text}"
        );
        assert!(e.is_unavailable());
        assert!(!LazyError::Stopped.is_unavailable());
    }

    #[test]
    fn runs_split_by_layer_gap_and_length() {
        let src = [ZERO, 0, 0, 0, 1, 1, ZERO, 0, 0, 0, 0, 0];
        let got: Vec<_> = runs(&src, 3).collect();
        assert_eq!(got, vec![(1, 3, 0), (4, 2, 1), (7, 3, 0), (10, 2, 0)]);
    }

    /// Load times for 256 MiB, three quarters data: eager vs lazy time to
    /// start vs lazy time to loaded, with the layer file in the page cache
    /// (warm) and dropped from it (cold). Run with
    /// `cargo test -p dvisor-vmm --release --lib lazy_bench -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn lazy_bench_256mib() {
        const SIZE: usize = 256 * MIB;
        let pages = (SIZE / PAGE_SIZE) as u64;
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("mem");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(SIZE as u64).unwrap();
        // Runs of 48 data pages then 16 holes: 3/4 data.
        let mut run = Vec::with_capacity(48 * PAGE_SIZE);
        for p in 0..pages {
            if p % 64 < 48 {
                run.extend_from_slice(&content(p, Some(0x42)));
            }
            if p % 64 == 47 {
                file.write_all_at(&run, (p - 47) * PAGE).unwrap();
                run.clear();
            }
        }
        file.sync_all().unwrap();
        let cold = |f: &File| {
            // SAFETY: an advice call on our file; it changes no memory.
            unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        };
        let layer = || Layer {
            file: File::open(&path).unwrap(),
            pages: None,
        };
        // Time to start grows with RAM size (the page table is built up
        // front): 4 GiB split around the MMIO hole, 1 page in 16 data.
        {
            let big = tempfile::tempfile_in("/var/tmp").unwrap();
            let ranges = [(0u64, 3 << 30), (4u64 << 30, 1 << 30)];
            big.set_len(5 << 30).unwrap();
            for p in (0..(5u64 << 30) / PAGE).step_by(16) {
                if !(3 << 30..4 << 30).contains(&(p * PAGE)) {
                    big.write_all_at(&content(p, Some(1)), p * PAGE).unwrap();
                }
            }
            let ram = Ram::new(&ranges);
            let t = Instant::now();
            let loader = LazyLoader::start(
                &ram.regions,
                vec![Layer {
                    file: big,
                    pages: None,
                }],
            )
            .unwrap();
            let to_start = t.elapsed();
            let t = Instant::now();
            drop(loader);
            eprintln!("4 GiB RAM (1/16 data, scattered): start returned in {to_start:?}; drop (stopping the load) took {:?}", t.elapsed());
        }
        for (label, drop_cache) in [
            ("warm", false),
            ("cold", true),
            ("warm", false),
            ("cold", true),
        ] {
            let ram = Ram::new(&[(0, SIZE)]);
            if drop_cache {
                cold(&file);
            }
            let stats = load_eager(&ram.regions, &[layer()]).unwrap();
            eprintln!(
                "{label} eager: loaded in {:?} ({} MiB read)",
                stats.elapsed,
                stats.bytes >> 20
            );
            drop(ram);

            let ram = Ram::new(&[(0, SIZE)]);
            if drop_cache {
                cold(&file);
            }
            let t = Instant::now();
            let loader = LazyLoader::start(&ram.regions, vec![layer()]).unwrap();
            let to_start = t.elapsed();
            let stats = loader.wait_loaded().unwrap();
            eprintln!(
                "{label} lazy:  start returned in {to_start:?}, loaded in {:?} ({} faults, {} MiB read)",
                stats.elapsed,
                stats.faults,
                stats.bytes >> 20
            );
            drop(loader);
            drop(ram);

            // First-touch latency while the prefetcher runs: 2000 random
            // pages read from another thread right after start.
            let ram = Ram::new(&[(0, SIZE)]);
            if drop_cache {
                cold(&file);
            }
            let loader = LazyLoader::start(&ram.regions, vec![layer()]).unwrap();
            let order = shuffled((0..pages).collect(), 7);
            let t = Instant::now();
            let mut worst = Duration::ZERO;
            for &p in order.iter().take(2000) {
                let t1 = Instant::now();
                let _ = ram.read_page(p);
                worst = worst.max(t1.elapsed());
            }
            let touched = t.elapsed();
            let stats = loader.wait_loaded().unwrap();
            eprintln!(
                "{label} lazy touch: 2000 random pages in {touched:?} (mean {:?}, worst {worst:?}), {} of them faults; loaded in {:?}",
                touched / 2000,
                stats.faults,
                stats.elapsed
            );
        }
    }
}
