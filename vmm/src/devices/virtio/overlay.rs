//! Copy-on-write overlays: a file that holds only the clusters a VM wrote,
//! over a base image that stays frozen.
//!
//! A clone of a VM needs its own disk without copying the parent's: both
//! get an overlay over the disk as it was at the clone point. We write our
//! own format rather than qcow2 because we need little of qcow2 (no
//! compression, encryption, internal snapshots or refcounts) and more
//! checking than it gives (a checksummed header, a base pinned by identity,
//! crash safety we can state in a paragraph), with no C dependency. When
//! this was written, rust-vmm had no qcow2 crate at all (its `virtio-blk`
//! serves plain files); the pure-Rust qcow2 crates on crates.io (`qcow`,
//! `qcow2`, `qcow2-core`) read images but do not write them, and the
//! qcow writer that cloud-hypervisor and crosvm carry lives inside their own
//! block crates, which their maintainers describe as having no one actively
//! working on it.
//!
//! # Layout (all integers little-endian; `docs/disks.md` has every byte)
//!
//! ```text
//! 0       header slot 0 (4 KiB)
//! 4096    header slot 1 (4 KiB)
//! 8192    bitmap copy 0 (one bit per cluster, padded to 4 KiB)
//! ...     bitmap copy 1
//! D       data: cluster i at D + i * cluster_size (D cluster-aligned),
//!         present only once allocated: the file is sparse
//! ```
//!
//! A header holds the magic, format version, flags, a generation number,
//! the cluster size, the virtual size, the geometry (so a reader can check
//! it), the CRC-64 of its bitmap copy, the base's path and identity (size,
//! device, inode, mtime in ns), and a CRC-64 over itself. Slot *k* always
//! describes bitmap copy *k*.
//!
//! # Crash safety
//!
//! The invariant: a cluster's bit is set on disk only once its data is
//! durable. Data is never at risk the other way round: a cluster written
//! but not marked reads from the base, and is overwritten whole when next
//! allocated.
//!
//! - The first write to a cluster reads the base's cluster, merges the
//!   guest's bytes, writes the whole cluster into the overlay and sets its
//!   bit **in memory only**. Writes to allocated clusters go straight to
//!   the file. Reads take allocated clusters from the overlay and the rest
//!   from the base.
//! - A flush (the guest's, or closing the image) `fdatasync`s the data,
//!   then writes the whole bitmap into the copy the current header does not
//!   describe, then the header of that slot with generation + 1 and the
//!   bitmap's CRC, then `fdatasync`s again. The first sync orders data
//!   before bits; the second makes the flush durable.
//! - Opening reads both slots and uses the valid one with the highest
//!   generation; valid means magic, version, header CRC, sane fields, and a
//!   bitmap copy matching its CRC. A crash during a flush leaves the slot
//!   being written torn (its CRC or its bitmap's fails), so the previous
//!   generation is used: the writes of that flush are lost, but the guest
//!   never saw that flush complete, which is what a disk's write cache
//!   promises. Writes after the last flush are lost the same way if the
//!   VMM dies without closing the image (a clean exit flushes). Such a
//!   fallback is reported (`Overlay::recovered`, logged, shown by `dvisor
//!   disk info`) and repaired by the next flush, which overwrites the bad
//!   slot.
//! - There is no clean/dirty flag: with two generations every state on
//!   disk is consistent, and a flag rewritten at every open and close would
//!   change the file (and so its identity) even when the guest wrote
//!   nothing, breaking the identity checks of snapshots and of overlays
//!   made over this one.
//! - Opening never writes, read-only or not.
//! - Creation writes a temporary file in the target directory, syncs it,
//!   and renames it into place (refusing to replace an existing file).
//!
//! # Base identity
//!
//! The base must not change under an overlay: the header records its size,
//! device, inode and mtime, and opening compares them with the base's and
//! refuses with the list of what changed. A base may itself be an overlay
//! (a VM cloned twice); bases are always opened read-only and hold a shared
//! lock, so nothing in dvisor writes a base while an overlay over it is
//! open.
//!
//! # Commit
//!
//! [`commit`] folds an overlay's clusters into its base and then replaces
//! the overlay, atomically, with an empty one over the base as it now is,
//! so the overlay path stays usable. It takes exclusive locks on the
//! overlay and the base (refusing if a VM uses either), checks the base's
//! identity, marks the overlay COMMITTING (a new generation), copies, syncs
//! the base, and renames the fresh overlay into place. A crash in between
//! leaves the flag set: opening then refuses with "run commit again", and
//! commit resumes without the identity check (the base changed because of
//! the interrupted commit itself) and copies everything again, which is
//! idempotent. Other overlays over the same base are invalidated by a
//! commit, as by any write to their base: opening them names the change.
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::disk::{self, check_range, guard_probe, lock_file, open_locked, DiskError, DiskIdentity, DiskImage, ImageFormat, Lock};

/// The first 8 bytes of each header slot. The high first byte and the CR LF
/// make it unlikely in text and let a text-mode transfer show as damage.
pub const MAGIC: [u8; 8] = *b"\x89DVOVL\r\n";
/// The only format version this code reads and writes.
pub const VERSION: u32 = 1;
/// The cluster size `create` uses: the copy-on-write unit. 64 KiB keeps the
/// bitmap small (2 KiB per GiB) while a first small write copies little.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 << 10;
/// The smallest cluster: a page, below which the bitmap grows for nothing.
pub const MIN_CLUSTER_SIZE: u32 = 4 << 10;
/// The largest cluster: bounds the copy a first small write costs.
pub const MAX_CLUSTER_SIZE: u32 = 2 << 20;
/// Each header slot is this long; the second starts here.
pub const HEADER_SLOT_LEN: u64 = 4096;
/// Bounds the bitmap (64 MiB, so 32 TiB at 64 KiB clusters) read into memory.
pub const MAX_CLUSTERS: u64 = 1 << 29;

/// Flag: a commit into the base started and has not finished.
pub const FLAG_COMMITTING: u32 = 1;
const KNOWN_FLAGS: u32 = FLAG_COMMITTING;

/// Where each header field lives in a slot (byte offsets).
pub mod field {
    pub const MAGIC: usize = 0; // [u8; 8]
    pub const VERSION: usize = 8; // u32
    pub const FLAGS: usize = 12; // u32
    pub const GENERATION: usize = 16; // u64
    pub const CLUSTER_SIZE: usize = 24; // u32
    pub const RESERVED: usize = 28; // u32, zero
    pub const VIRTUAL_SIZE: usize = 32; // u64
    pub const CLUSTER_COUNT: usize = 40; // u64
    pub const BITMAP_OFFSET: usize = 48; // u64
    pub const BITMAP_LEN: usize = 56; // u64
    pub const DATA_OFFSET: usize = 64; // u64
    pub const BITMAP_CRC: usize = 72; // u64
    pub const BASE_SIZE: usize = 80; // u64
    pub const BASE_DEV: usize = 88; // u64
    pub const BASE_INO: usize = 96; // u64
    pub const BASE_MTIME_NS: usize = 104; // i64
    pub const BASE_PATH_LEN: usize = 112; // u16
    pub const BASE_PATH: usize = 114; // [u8; BASE_PATH_LEN], then zeros
    pub const HEADER_CRC: usize = 4088; // u64, CRC-64 of bytes 0..4088
}

/// The longest base path a header holds.
pub const MAX_BASE_PATH: usize = field::HEADER_CRC - field::BASE_PATH;

const SLOT: usize = HEADER_SLOT_LEN as usize;

/// CRC-64/XZ (the ECMA-182 polynomial, reflected, all-ones initial value
/// and final XOR): a standard CRC with published check values, so the
/// header can be verified by other tools. Twenty lines are cheaper than a
/// dependency.
pub fn crc64(data: &[u8]) -> u64 {
    const POLY: u64 = 0xC96C_5795_D787_0F42;
    const TABLE: [u64; 256] = {
        let mut table = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u64;
    for &b in data {
        crc = TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// Whether `file` is an overlay: the magic at the start of either header
/// slot (slot 0's may be the one a crash tore).
pub fn probe(file: &File) -> io::Result<bool> {
    for at in [0, HEADER_SLOT_LEN] {
        let mut m = [0u8; 8];
        match file.read_exact_at(&mut m, at) {
            Ok(()) if m == MAGIC => return Ok(true),
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Where things are, derived from the cluster and virtual sizes alone so
/// that a header's stored copies can be checked against it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    cluster_size: u64,
    virtual_size: u64,
    clusters: u64,
    bitmap_len: u64,
    /// `bitmap_len` rounded up to 4 KiB: the room for each copy.
    bitmap_room: u64,
    data_offset: u64,
}

impl Geometry {
    /// `Err` says why the sizes cannot make an overlay, naming the field.
    fn new(cluster_size: u32, virtual_size: u64) -> Result<Self, (&'static str, String)> {
        if !cluster_size.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&cluster_size) {
            return Err(("cluster_size", format!("{cluster_size} is not a power of two from {MIN_CLUSTER_SIZE} to {MAX_CLUSTER_SIZE}")));
        }
        if !virtual_size.is_multiple_of(disk::SECTOR_SIZE) {
            return Err(("virtual_size", format!("{virtual_size} is not a multiple of 512")));
        }
        let cs = u64::from(cluster_size);
        let clusters = virtual_size.div_ceil(cs);
        if clusters > MAX_CLUSTERS {
            return Err(("virtual_size", format!("{virtual_size} bytes need {clusters} clusters of {cs} bytes; at most {MAX_CLUSTERS} fit")));
        }
        let bitmap_len = clusters.div_ceil(8);
        let bitmap_room = bitmap_len.div_ceil(HEADER_SLOT_LEN).max(1) * HEADER_SLOT_LEN;
        let data_offset = (2 * HEADER_SLOT_LEN + 2 * bitmap_room).div_ceil(cs) * cs;
        Ok(Geometry { cluster_size: cs, virtual_size, clusters, bitmap_len, bitmap_room, data_offset })
    }

    fn bitmap_offset(&self, slot: usize) -> u64 {
        2 * HEADER_SLOT_LEN + slot as u64 * self.bitmap_room
    }

    /// The length of cluster `c` (the last one may be short).
    fn cluster_len(&self, c: u64) -> u64 {
        self.cluster_size.min(self.virtual_size - c * self.cluster_size)
    }

    fn data_at(&self, virtual_offset: u64) -> u64 {
        self.data_offset + virtual_offset
    }
}

/// The base as a header records it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BaseRef {
    /// As stored: absolute when dvisor made it; a relative one would be
    /// resolved against the overlay's directory.
    path: Vec<u8>,
    size: u64,
    dev: u64,
    ino: u64,
    mtime_ns: i64,
}

impl BaseRef {
    fn identity(&self, overlay: &Path) -> DiskIdentity {
        DiskIdentity { path: self.resolve(overlay), size: self.size, dev: self.dev, ino: self.ino, mtime_ns: self.mtime_ns }
    }

    fn resolve(&self, overlay: &Path) -> PathBuf {
        let p = PathBuf::from(std::ffi::OsString::from_vec(self.path.clone()));
        if p.is_absolute() {
            p
        } else {
            overlay.parent().unwrap_or(Path::new(".")).join(p)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Header {
    flags: u32,
    generation: u64,
    cluster_size: u32,
    virtual_size: u64,
    bitmap_crc: u64,
    base: BaseRef,
}

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Why a slot cannot be used.
enum SlotError {
    /// No magic: never written (slot 1 of a new overlay) or not ours.
    Empty,
    Bad(DiskError),
}

impl Header {
    fn encode(&self, g: &Geometry, slot: usize) -> Vec<u8> {
        use field::*;
        let mut b = vec![0u8; SLOT];
        put(&mut b, MAGIC, &self::MAGIC);
        put(&mut b, VERSION, &self::VERSION.to_le_bytes());
        put(&mut b, FLAGS, &self.flags.to_le_bytes());
        put(&mut b, GENERATION, &self.generation.to_le_bytes());
        put(&mut b, CLUSTER_SIZE, &self.cluster_size.to_le_bytes());
        put(&mut b, VIRTUAL_SIZE, &self.virtual_size.to_le_bytes());
        put(&mut b, CLUSTER_COUNT, &g.clusters.to_le_bytes());
        put(&mut b, BITMAP_OFFSET, &g.bitmap_offset(slot).to_le_bytes());
        put(&mut b, BITMAP_LEN, &g.bitmap_len.to_le_bytes());
        put(&mut b, DATA_OFFSET, &g.data_offset.to_le_bytes());
        put(&mut b, BITMAP_CRC, &self.bitmap_crc.to_le_bytes());
        put(&mut b, BASE_SIZE, &self.base.size.to_le_bytes());
        put(&mut b, BASE_DEV, &self.base.dev.to_le_bytes());
        put(&mut b, BASE_INO, &self.base.ino.to_le_bytes());
        put(&mut b, BASE_MTIME_NS, &self.base.mtime_ns.to_le_bytes());
        // Paths longer than MAX_BASE_PATH are refused at creation.
        put(&mut b, BASE_PATH_LEN, &(self.base.path.len() as u16).to_le_bytes());
        put(&mut b, BASE_PATH, &self.base.path);
        let crc = crc64(&b[..HEADER_CRC]);
        put(&mut b, HEADER_CRC, &crc.to_le_bytes());
        b
    }

    /// Parses and checks slot `slot`, the 4 KiB in `b`. Checks run in the
    /// order that gives the most useful message: magic, version (a newer
    /// version may lay the header out differently), checksum, then each
    /// field, which only a buggy writer can get wrong with a valid CRC.
    fn decode(b: &[u8], slot: usize, path: &Path) -> Result<(Header, Geometry), SlotError> {
        use field::*;
        let bad = |field: &'static str, problem: String| SlotError::Bad(DiskError::HeaderField { path: path.to_owned(), field, problem });
        if b[MAGIC..MAGIC + 8] != self::MAGIC {
            return Err(SlotError::Empty);
        }
        let version = get_u32(b, VERSION);
        if version != self::VERSION {
            return Err(SlotError::Bad(DiskError::Version { path: path.to_owned(), found: version, supported: self::VERSION }));
        }
        let stored = get_u64(b, HEADER_CRC);
        let computed = crc64(&b[..HEADER_CRC]);
        if stored != computed {
            return Err(SlotError::Bad(DiskError::HeaderChecksum { path: path.to_owned(), slot, stored, computed }));
        }
        let flags = get_u32(b, FLAGS);
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad("flags", format!("{flags:#x} has bits this dvisor does not know (it knows {KNOWN_FLAGS:#x})")));
        }
        let generation = get_u64(b, GENERATION);
        if generation == 0 {
            return Err(bad("generation", "0 (generations start at 1)".into()));
        }
        if get_u32(b, RESERVED) != 0 {
            return Err(bad("reserved", format!("{:#x}, not 0", get_u32(b, RESERVED))));
        }
        let cluster_size = get_u32(b, CLUSTER_SIZE);
        let virtual_size = get_u64(b, VIRTUAL_SIZE);
        let g = Geometry::new(cluster_size, virtual_size).map_err(|(f, p)| bad(f, p))?;
        for (name, at, want) in [
            ("cluster_count", CLUSTER_COUNT, g.clusters),
            ("bitmap_len", BITMAP_LEN, g.bitmap_len),
            ("bitmap_offset", BITMAP_OFFSET, g.bitmap_offset(slot)),
            ("data_offset", DATA_OFFSET, g.data_offset),
        ] {
            let got = get_u64(b, at);
            if got != want {
                return Err(bad(name, format!("{got}, but cluster size {cluster_size} and virtual size {virtual_size} make it {want}")));
            }
        }
        let len = usize::from(get_u16(b, BASE_PATH_LEN));
        if len == 0 || len > MAX_BASE_PATH {
            return Err(bad("base_path_len", format!("{len}, not 1 to {MAX_BASE_PATH}")));
        }
        let path_bytes = &b[BASE_PATH..BASE_PATH + len];
        if path_bytes.contains(&0) {
            return Err(bad("base_path", "contains a NUL byte".into()));
        }
        if b[BASE_PATH + len..HEADER_CRC].iter().any(|&x| x != 0) {
            return Err(bad("padding", "bytes after the base path are not zero".into()));
        }
        let header = Header {
            flags,
            generation,
            cluster_size,
            virtual_size,
            bitmap_crc: get_u64(b, BITMAP_CRC),
            base: BaseRef {
                path: path_bytes.to_vec(),
                size: get_u64(b, BASE_SIZE),
                dev: get_u64(b, BASE_DEV),
                ino: get_u64(b, BASE_INO),
                mtime_ns: get_u64(b, BASE_MTIME_NS) as i64,
            },
        };
        Ok((header, g))
    }
}

/// A header slot with its geometry and bitmap copy, or why it is unusable.
type SlotRead = Result<(Header, Geometry, Vec<u8>), SlotError>;

/// One overlay file: header, bitmap and data, without its base. `commit`
/// works at this level, so that it can open the base for writing itself.
struct Layer {
    file: File,
    path: PathBuf,
    header: Header,
    geom: Geometry,
    /// The slot the current header was read from or last written to.
    slot: usize,
    /// In memory: includes bits not yet persisted.
    bitmap: Vec<u8>,
    recovered: Option<String>,
}

impl Layer {
    /// Locks and reads the newest valid generation (see the module comment).
    fn load(file: File, path: &Path, lock: Lock) -> Result<Layer, DiskError> {
        // Lock before reading, so a commit in progress is never half seen.
        lock_file(&file, path, lock)?;
        let len = file.metadata().map_err(DiskError::io("read the metadata of", path))?.len();
        let mut head = vec![0u8; 2 * SLOT];
        let avail = len.min(2 * HEADER_SLOT_LEN) as usize;
        file.read_exact_at(&mut head[..avail], 0).map_err(DiskError::io("read", path))?;

        let mut found: [SlotRead; 2] = [Err(SlotError::Empty), Err(SlotError::Empty)];
        for (slot, out) in found.iter_mut().enumerate() {
            *out = Header::decode(&head[slot * SLOT..(slot + 1) * SLOT], slot, path)
                .and_then(|(h, g)| Self::read_bitmap(&file, path, len, &h, &g, slot).map(|bm| (h, g, bm)).map_err(SlotError::Bad));
        }
        let generation = |r: &SlotRead| r.as_ref().ok().map(|(h, _, _)| h.generation);
        let best = match (generation(&found[0]), generation(&found[1])) {
            (Some(a), Some(b)) => usize::from(b > a),
            (Some(_), None) => 0,
            (None, Some(_)) => 1,
            (None, None) => {
                // Report slot 0's problem unless it is merely empty.
                let [a, b] = found;
                return Err(match (a, b) {
                    (Err(SlotError::Bad(e)), _) | (_, Err(SlotError::Bad(e))) => e,
                    _ => DiskError::NotOverlay { path: path.to_owned() },
                });
            }
        };
        let other = 1 - best;
        let [a, b] = found;
        let (chosen, rest) = if best == 0 { (a, b) } else { (b, a) };
        let Ok((header, geom, bitmap)) = chosen else {
            return Err(DiskError::NotOverlay { path: path.to_owned() });
        };
        let recovered = match rest {
            Err(SlotError::Bad(e)) => Some(format!(
                "header slot {other} is unusable ({e}); using generation {} from slot {best}: a flush was cut short, or the slot was damaged",
                header.generation
            )),
            _ => None,
        };
        let layer = Layer { file, path: path.to_owned(), header, geom, slot: best, bitmap, recovered };
        if let Some(last) = layer.last_allocated() {
            let needed = geom.data_at(last * geom.cluster_size) + geom.cluster_len(last);
            if len < needed {
                return Err(DiskError::Truncated { path: path.to_owned(), len, needed });
            }
        }
        Ok(layer)
    }

    fn read_bitmap(file: &File, path: &Path, len: u64, h: &Header, g: &Geometry, slot: usize) -> Result<Vec<u8>, DiskError> {
        let at = g.bitmap_offset(slot);
        if len < at + g.bitmap_len {
            return Err(DiskError::Truncated { path: path.to_owned(), len, needed: at + g.bitmap_len });
        }
        let mut bm = vec![0u8; g.bitmap_len as usize];
        file.read_exact_at(&mut bm, at).map_err(DiskError::io("read", path))?;
        let computed = crc64(&bm);
        if computed != h.bitmap_crc {
            return Err(DiskError::BitmapChecksum { path: path.to_owned(), copy: slot, stored: h.bitmap_crc, computed });
        }
        let tail_bits = g.clusters % 8;
        if tail_bits != 0 && bm.last().is_some_and(|&last| last >> tail_bits != 0) {
            return Err(DiskError::HeaderField {
                path: path.to_owned(),
                field: "bitmap",
                problem: format!("bits are set past the last of {} clusters", g.clusters),
            });
        }
        Ok(bm)
    }

    /// Bit `c % 8` of byte `c / 8` (least significant first) is cluster `c`.
    fn allocated(&self, c: u64) -> bool {
        self.bitmap[(c / 8) as usize] & (1 << (c % 8)) != 0
    }

    fn mark(&mut self, c: u64) {
        self.bitmap[(c / 8) as usize] |= 1 << (c % 8);
    }

    fn allocated_clusters(&self) -> u64 {
        self.bitmap.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The highest allocated cluster, found a byte at a time (a bitmap
    /// can have 2^29 bits).
    fn last_allocated(&self) -> Option<u64> {
        let (i, &byte) = self.bitmap.iter().enumerate().rev().find(|(_, &b)| b != 0)?;
        Some(i as u64 * 8 + u64::from(7 - byte.leading_zeros()))
    }

    fn allocated_bytes(&self) -> u64 {
        let full = self.allocated_clusters() * self.geom.cluster_size;
        // Only the last cluster can be short.
        match self.geom.clusters.checked_sub(1) {
            Some(last) if self.allocated(last) => full - self.geom.cluster_size + self.geom.cluster_len(last),
            _ => full,
        }
    }

    fn base_path(&self) -> PathBuf {
        self.header.base.resolve(&self.path)
    }

    /// Persists the in-memory bitmap as a new generation with `flags`, in
    /// the other slot. Callers have synced the data first.
    fn write_generation(&mut self, flags: u32) -> io::Result<()> {
        let slot = 1 - self.slot;
        let mut h = self.header.clone();
        h.generation += 1;
        h.flags = flags;
        h.bitmap_crc = crc64(&self.bitmap);
        self.file.write_all_at(&self.bitmap, self.geom.bitmap_offset(slot))?;
        self.file.write_all_at(&h.encode(&self.geom, slot), slot as u64 * HEADER_SLOT_LEN)?;
        self.file.sync_data()?;
        self.header = h;
        self.slot = slot;
        Ok(())
    }
}

/// An open overlay over its base (itself possibly an overlay).
pub struct Overlay {
    layer: Layer,
    read_only: bool,
    /// Bits set in memory since the last generation was written.
    pending: bool,
    base: Box<dyn DiskImage>,
    /// One cluster, for merging a partial first write with the base.
    scratch: Vec<u8>,
}

impl Overlay {
    /// Makes `out`, an empty overlay over `base` with the default cluster
    /// size. `out` must not exist; `base` must be a valid image (raw, or an
    /// overlay whose chain opens).
    pub fn create(base: &Path, out: &Path) -> Result<(), DiskError> {
        Self::create_with_cluster_size(base, out, DEFAULT_CLUSTER_SIZE)
    }

    /// [`Overlay::create`] with another cluster size (a power of two from
    /// 4 KiB to 2 MiB).
    pub fn create_with_cluster_size(base: &Path, out: &Path, cluster_size: u32) -> Result<(), DiskError> {
        create_file(base, out, cluster_size, false)
    }

    /// Opens the overlay at `path` and its chain of bases (read-only), and
    /// checks every base against the identity its overlay recorded.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let file = super::disk::open_file(path, read_only)?;
        if !probe(&file).map_err(DiskError::io("read", path))? {
            return Err(DiskError::NotOverlay { path: path.to_owned() });
        }
        Self::from_file(file, path, read_only, Lock::Shared, 0)
    }

    pub(crate) fn from_file(file: File, path: &Path, read_only: bool, lock: Lock, depth: usize) -> Result<Self, DiskError> {
        let layer = Layer::load(file, path, lock)?;
        let base_path = layer.base_path();
        if layer.header.flags & FLAG_COMMITTING != 0 {
            return Err(DiskError::CommitInterrupted { path: path.to_owned(), base: base_path });
        }
        let base = open_locked(&base_path, true, Lock::Shared, depth + 1)
            .map_err(|e| DiskError::Base { path: path.to_owned(), base: base_path.clone(), source: Box::new(e) })?;
        check_base(&layer, base.as_ref())?;
        if let Some(note) = &layer.recovered {
            tracing::warn!("overlay {}: {note}", path.display());
        }
        let scratch = vec![0u8; layer.geom.cluster_size as usize];
        Ok(Overlay { layer, read_only, pending: false, base, scratch })
    }

    /// The base image this overlay reads unallocated clusters from.
    pub fn base(&self) -> &dyn DiskImage {
        self.base.as_ref()
    }

    /// The base's path as the header names it (absolute when dvisor wrote it).
    pub fn base_path(&self) -> PathBuf {
        self.layer.base_path()
    }

    /// The copy-on-write unit, in bytes.
    pub fn cluster_size(&self) -> u32 {
        self.layer.header.cluster_size
    }

    /// Clusters held by the overlay, including ones not yet flushed.
    pub fn allocated_clusters(&self) -> u64 {
        self.layer.allocated_clusters()
    }

    /// The generation in use (one more for each flush that allocated).
    pub fn generation(&self) -> u64 {
        self.layer.header.generation
    }

    /// Set when opening fell back to the older header slot: why, in words.
    pub fn recovered(&self) -> Option<&str> {
        self.layer.recovered.as_deref()
    }

    /// Writes cluster `c`'s first write: the base's bytes with `piece`
    /// (at `within` in the cluster) merged in, then marks it in memory.
    fn copy_on_write(&mut self, c: u64, within: usize, piece: &[u8]) -> io::Result<()> {
        let g = self.layer.geom;
        let start = c * g.cluster_size;
        let len = g.cluster_len(c) as usize;
        if within == 0 && piece.len() == len {
            self.layer.file.write_all_at(piece, g.data_at(start))?;
        } else {
            let buf = &mut self.scratch[..len];
            self.base.read_at(buf, start)?;
            buf[within..within + piece.len()].copy_from_slice(piece);
            self.layer.file.write_all_at(buf, g.data_at(start))?;
        }
        self.layer.mark(c);
        self.pending = true;
        Ok(())
    }
}

/// Fails unless `base` is the file `layer` was made over.
fn check_base(layer: &Layer, base: &dyn DiskImage) -> Result<(), DiskError> {
    let base_path = layer.base_path();
    let now = base.identity().map_err(DiskError::io("read the metadata of", &base_path))?;
    let changes = layer.header.base.identity(&layer.path).changes(&now);
    if !changes.is_empty() {
        return Err(DiskError::BaseChanged { path: layer.path.clone(), base: base_path, changes: changes.join("; ") });
    }
    if base.size() != layer.geom.virtual_size {
        return Err(DiskError::HeaderField {
            path: layer.path.clone(),
            field: "virtual_size",
            problem: format!("{}, but the base {} is {} bytes", layer.geom.virtual_size, base_path.display(), base.size()),
        });
    }
    Ok(())
}

impl DiskImage for Overlay {
    fn size(&self) -> u64 {
        self.layer.geom.virtual_size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(buf.len(), offset, self.size())?;
        let g = &self.layer.geom;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        // Whole runs of clusters with the same source in one call each.
        while at < end {
            let alloc = self.layer.allocated(at / g.cluster_size);
            let mut run_end = ((at / g.cluster_size + 1) * g.cluster_size).min(end);
            while run_end < end && self.layer.allocated(run_end / g.cluster_size) == alloc {
                run_end = (run_end + g.cluster_size).min(end);
            }
            let piece = &mut buf[(at - offset) as usize..(run_end - offset) as usize];
            if alloc {
                self.layer.file.read_exact_at(piece, g.data_at(at))?;
            } else {
                self.base.read_at(piece, at)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the overlay is open read-only"));
        }
        check_range(buf.len(), offset, self.size())?;
        guard_probe(buf, offset, self.size(), |b, o| self.read_at(b, o))?;
        let g = self.layer.geom;
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let c = at / g.cluster_size;
            let run_end = ((c + 1) * g.cluster_size).min(end);
            let piece = &buf[(at - offset) as usize..(run_end - offset) as usize];
            if self.layer.allocated(c) {
                self.layer.file.write_all_at(piece, g.data_at(at))?;
            } else {
                self.copy_on_write(c, (at - c * g.cluster_size) as usize, piece)?;
            }
            at = run_end;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // Data before bits: see "Crash safety" in the module comment.
        self.layer.file.sync_data()?;
        if self.pending {
            let flags = self.layer.header.flags;
            self.layer.write_generation(flags)?;
            self.pending = false;
        }
        Ok(())
    }

    fn path(&self) -> &Path {
        &self.layer.path
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Overlay
    }

    fn identity(&self) -> io::Result<DiskIdentity> {
        DiskIdentity::of_file(&self.layer.file, &self.layer.path)
    }
}

impl Drop for Overlay {
    /// A clean close keeps the writes since the last flush; a failure here
    /// loses only those, as a crash would.
    fn drop(&mut self) {
        if self.pending && !self.read_only {
            if let Err(e) = self.flush() {
                tracing::warn!("overlay {}: writes since the last flush are lost: {e}", self.layer.path.display());
            }
        }
    }
}

/// Removes a temporary file unless told it was renamed into place.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Writes a new empty overlay over `base` at a temporary name beside `out`
/// and renames it to `out`: over an existing file only when `replace`
/// (a commit resetting its overlay), else refusing if `out` exists.
fn create_file(base: &Path, out: &Path, cluster_size: u32, replace: bool) -> Result<(), DiskError> {
    let field_err = |(field, problem): (&'static str, String)| DiskError::HeaderField { path: out.to_owned(), field, problem };
    Geometry::new(cluster_size, 0).map_err(field_err)?;
    let base_abs = std::fs::canonicalize(base).map_err(DiskError::io("find", base))?;
    // Held open until the rename, so that a commit cannot change the base
    // between taking its identity and the overlay existing.
    let img = open_locked(&base_abs, true, Lock::Shared, 1)
        .map_err(|e| DiskError::Base { path: out.to_owned(), base: base_abs.clone(), source: Box::new(e) })?;
    let id = img.identity().map_err(DiskError::io("read the metadata of", &base_abs))?;
    let geom = Geometry::new(cluster_size, img.size()).map_err(field_err)?;
    let path_bytes = base_abs.as_os_str().as_bytes().to_vec();
    if path_bytes.len() > MAX_BASE_PATH {
        return Err(field_err(("base_path", format!("{} is {} bytes; at most {MAX_BASE_PATH} fit", base_abs.display(), path_bytes.len()))));
    }
    if !replace && std::fs::symlink_metadata(out).is_ok() {
        return Err(DiskError::Exists { path: out.to_owned() });
    }
    let header = Header {
        flags: 0,
        generation: 1,
        cluster_size,
        virtual_size: geom.virtual_size,
        bitmap_crc: crc64(&vec![0u8; geom.bitmap_len as usize]),
        base: BaseRef { path: path_bytes, size: id.size, dev: id.dev, ino: id.ino, mtime_ns: id.mtime_ns },
    };

    let name = out.file_name().ok_or_else(|| DiskError::Io {
        op: "create",
        path: out.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
    })?;
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp_path = dir.join(tmp_name);
    let mut tmp = TempFile(Some(tmp_path.clone()));
    // Errors name `out`: the temporary name is ours, not the user's.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&tmp_path)
        .map_err(DiskError::io("create", out))?;
    // Zeros everywhere but slot 0: an empty slot 1 and empty bitmaps.
    file.set_len(geom.data_offset).map_err(DiskError::io("write", out))?;
    file.write_all_at(&header.encode(&geom, 0), 0).map_err(DiskError::io("write", out))?;
    file.sync_all().map_err(DiskError::io("sync", out))?;
    drop(file);
    if replace {
        std::fs::rename(&tmp_path, out).map_err(DiskError::io("replace", out))?;
    } else {
        rename_noreplace(&tmp_path, out)?;
    }
    tmp.0 = None;
    // Make the rename durable; a directory that cannot be synced (some
    // network file systems) still has the file.
    if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
        tracing::debug!("cannot sync directory {}: {e}", dir.display());
    }
    drop(img);
    Ok(())
}

/// Renames `from` to `to` unless `to` exists, atomically where the file
/// system supports it.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), DiskError> {
    let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|_| DiskError::Io {
        op: "create",
        path: p.to_owned(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"),
    });
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both pointers are NUL-terminated strings that live across the call.
    let rc = unsafe { libc::renameat2(libc::AT_FDCWD, cf.as_ptr(), libc::AT_FDCWD, ct.as_ptr(), libc::RENAME_NOREPLACE) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Err(DiskError::Exists { path: to.to_owned() }),
        // No RENAME_NOREPLACE here: check, then rename (a race with
        // another creator of the same name is the price).
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(DiskError::Exists { path: to.to_owned() });
            }
            std::fs::rename(from, to).map_err(DiskError::io("create", to))
        }
        _ => Err(DiskError::Io { op: "create", path: to.to_owned(), source: err }),
    }
}

/// What [`commit`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommitReport {
    pub overlay: PathBuf,
    /// The file the clusters went into.
    pub base: PathBuf,
    /// Clusters copied, and their bytes (the last cluster may be short).
    pub clusters: u64,
    pub bytes: u64,
    /// The commit finished one that had been interrupted.
    pub resumed: bool,
}

/// Folds the overlay at `path` into its base, then resets it to an empty
/// overlay over the updated base (see "Commit" in the module comment).
/// Refuses, changing nothing, if either file is in use, the base cannot be
/// written, or the base changed since the overlay was made.
pub fn commit(path: &Path) -> Result<CommitReport, DiskError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(DiskError::io("open for writing", path))?;
    if !probe(&file).map_err(DiskError::io("read", path))? {
        return Err(DiskError::NotOverlay { path: path.to_owned() });
    }
    let mut layer = Layer::load(file, path, Lock::Exclusive)?;
    let base_path = layer.base_path();
    let resumed = layer.header.flags & FLAG_COMMITTING != 0;
    let wrap = |e: DiskError| DiskError::Base { path: path.to_owned(), base: base_path.clone(), source: Box::new(e) };
    let mut base = open_locked(&base_path, false, Lock::Exclusive, 1).map_err(wrap)?;
    if resumed {
        // The base changed because of the interrupted commit; only its
        // size must still fit.
        if base.size() != layer.geom.virtual_size {
            return Err(DiskError::BaseChanged {
                path: path.to_owned(),
                base: base_path,
                changes: format!("its size is {} bytes, the overlay's {}", base.size(), layer.geom.virtual_size),
            });
        }
    } else {
        check_base(&layer, base.as_ref())?;
    }
    let report = CommitReport {
        overlay: path.to_owned(),
        base: base_path.clone(),
        clusters: layer.allocated_clusters(),
        bytes: layer.allocated_bytes(),
        resumed,
    };
    if report.clusters == 0 && !resumed {
        return Ok(report);
    }
    if !resumed {
        layer.write_generation(layer.header.flags | FLAG_COMMITTING).map_err(DiskError::io("write", path))?;
    }
    let g = layer.geom;
    let mut buf = vec![0u8; (g.cluster_size as usize).max(1 << 20)];
    let mut c = 0;
    while c < g.clusters {
        if layer.bitmap[(c / 8) as usize] == 0 {
            c = (c / 8 + 1) * 8; // eight free clusters at once
            continue;
        }
        if !layer.allocated(c) {
            c += 1;
            continue;
        }
        // A run of allocated clusters, at most one buffer long.
        let start = c * g.cluster_size;
        let mut end = start + g.cluster_len(c);
        c += 1;
        while c < g.clusters && layer.allocated(c) && end - start + g.cluster_len(c) <= buf.len() as u64 {
            end += g.cluster_len(c);
            c += 1;
        }
        let chunk = &mut buf[..(end - start) as usize];
        layer.file.read_exact_at(chunk, g.data_at(start)).map_err(DiskError::io("read", path))?;
        base.write_at(chunk, start).map_err(DiskError::io("write", &base_path))?;
    }
    base.flush().map_err(DiskError::io("sync", &base_path))?;
    drop(base);
    create_file(&base_path, path, layer.header.cluster_size, true)?;
    Ok(report)
}

/// What `dvisor disk info` shows of one overlay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverlayInfo {
    pub path: PathBuf,
    /// The disk's size as the guest sees it, in bytes.
    pub virtual_size: u64,
    pub cluster_size: u32,
    /// Clusters the overlay holds, and their bytes.
    pub allocated_clusters: u64,
    pub allocated_bytes: u64,
    /// The overlay file's length (sparse: its blocks on disk may be fewer).
    pub file_size: u64,
    /// How many headers have been written (1 for a new overlay).
    pub generation: u64,
    pub base: PathBuf,
    pub base_format: ImageFormat,
    /// The base as the overlay recorded it (opening checked it still is).
    pub base_identity: DiskIdentity,
    /// Set when the newer header slot was unusable: why, in words.
    pub recovered: Option<String>,
}

/// Opens the overlay at `path` read-only (so its whole chain is checked)
/// and describes it.
pub fn info(path: &Path) -> Result<OverlayInfo, DiskError> {
    let ov = Overlay::open(path, true)?;
    let file_size = ov.layer.file.metadata().map_err(DiskError::io("read the metadata of", path))?.len();
    Ok(OverlayInfo {
        path: path.to_owned(),
        virtual_size: ov.size(),
        cluster_size: ov.cluster_size(),
        allocated_clusters: ov.allocated_clusters(),
        allocated_bytes: ov.layer.allocated_bytes(),
        file_size,
        generation: ov.generation(),
        base: ov.base_path(),
        base_format: ov.base.format(),
        base_identity: ov.layer.header.base.identity(path),
        recovered: ov.layer.recovered.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::disk::open_image;

    const CS: u32 = 4096;

    struct Env {
        dir: tempfile::TempDir,
    }

    impl Env {
        fn new() -> Self {
            Env { dir: tempfile::tempdir().unwrap() }
        }
        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }
        /// A raw base of `len` bytes, every byte a function of its offset.
        fn base(&self, name: &str, len: usize) -> PathBuf {
            let p = self.path(name);
            std::fs::write(&p, pattern(0, len, 1)).unwrap();
            p
        }
        fn overlay(&self, base: &Path, name: &str) -> PathBuf {
            let p = self.path(name);
            Overlay::create_with_cluster_size(base, &p, CS).unwrap();
            p
        }
        /// Every file in the directory and its bytes, to show nothing changed.
        fn files(&self) -> Vec<(PathBuf, Vec<u8>)> {
            let mut v: Vec<_> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| {
                    let p = e.unwrap().path();
                    let bytes = std::fs::read(&p).unwrap();
                    (p, bytes)
                })
                .collect();
            v.sort();
            v
        }
    }

    fn pattern(offset: usize, len: usize, seed: u8) -> Vec<u8> {
        (offset..offset + len).map(|i| ((i / 7) as u8).wrapping_mul(13).wrapping_add(seed) ^ (i >> 12) as u8).collect()
    }

    fn read(img: &dyn DiskImage, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        img.read_at(&mut b, offset).unwrap();
        b
    }

    /// Writes one byte of `p` in place (same size) and moves its mtime an
    /// hour on, so the change shows whatever the clock's granularity.
    fn touch_write(p: &Path, at: u64) {
        let f = OpenOptions::new().write(true).open(p).unwrap();
        f.write_all_at(&[1], at).unwrap();
        let t = f.metadata().unwrap().modified().unwrap() + std::time::Duration::from_secs(3600);
        f.set_times(std::fs::FileTimes::new().set_modified(t)).unwrap();
    }

    /// Waits past the file systems' timestamp granularity (a jiffy, at most
    /// 10 ms), so that a write now gets another mtime than one just before.
    fn later() {
        std::thread::sleep(std::time::Duration::from_millis(25));
    }

    fn open_err(p: &Path) -> DiskError {
        Overlay::open(p, true).err().expect("open must fail")
    }

    #[test]
    fn crc64_matches_the_published_check_value() {
        assert_eq!(crc64(b"123456789"), 0x995D_C9BB_DF19_39FA);
        assert_eq!(crc64(b""), 0);
    }

    #[test]
    fn geometry_places_bitmaps_and_data() {
        let g = Geometry::new(65536, 1 << 30).unwrap();
        assert_eq!((g.clusters, g.bitmap_len, g.bitmap_room), (16384, 2048, 4096));
        assert_eq!((g.bitmap_offset(0), g.bitmap_offset(1), g.data_offset), (8192, 12288, 65536));
        let g = Geometry::new(4096, 5 * 512).unwrap();
        assert_eq!((g.clusters, g.cluster_len(0), g.data_offset), (1, 2560, 16384));
        assert!(Geometry::new(3000, 4096).is_err());
        assert!(Geometry::new(4096, 1000).is_err());
        assert!(Geometry::new(4096, u64::MAX / 2).is_err());
    }

    #[test]
    fn reads_come_from_the_base_until_written() {
        let env = Env::new();
        let base = env.base("base.raw", 64 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let base_bytes = std::fs::read(&base).unwrap();
        let ov = Overlay::open(&ovl, false).unwrap();
        assert_eq!(ov.size(), 64 * 1024);
        assert_eq!(ov.allocated_clusters(), 0);
        assert_eq!(read(&ov, 0, 64 * 1024), base_bytes);
        assert_eq!(read(&ov, 4000, 300), &base_bytes[4000..4300]);
        assert_eq!(ov.base_path(), std::fs::canonicalize(&base).unwrap());
        assert!(open_image(&ovl, true).unwrap().format() == ImageFormat::Overlay);
    }

    #[test]
    fn a_partial_write_copies_the_whole_cluster_and_leaves_the_base() {
        let env = Env::new();
        let base = env.base("base.raw", 64 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let base_bytes = std::fs::read(&base).unwrap();
        let mut ov = Overlay::open(&ovl, false).unwrap();
        // 512 bytes in the middle of cluster 2, and a write across 3|4.
        let a = vec![0xaa; 512];
        ov.write_at(&a, 2 * 4096 + 1024).unwrap();
        let b = vec![0xbb; 1024];
        ov.write_at(&b, 4 * 4096 - 512).unwrap();
        assert_eq!(ov.allocated_clusters(), 3);
        let mut want = base_bytes.clone();
        want[2 * 4096 + 1024..2 * 4096 + 1536].copy_from_slice(&a);
        want[4 * 4096 - 512..4 * 4096 + 512].copy_from_slice(&b);
        assert_eq!(read(&ov, 0, want.len()), want);
        // Rewriting an allocated cluster goes in place.
        ov.write_at(&[0xcc; 512], 2 * 4096).unwrap();
        want[2 * 4096..2 * 4096 + 512].fill(0xcc);
        assert_eq!(ov.allocated_clusters(), 3);
        ov.flush().unwrap();
        drop(ov);
        assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "the base is untouched");
        let ov = Overlay::open(&ovl, true).unwrap();
        assert_eq!(read(&ov, 0, want.len()), want, "survives reopening");
        assert_eq!(ov.generation(), 2);
        let inf = info(&ovl).unwrap();
        assert_eq!((inf.allocated_clusters, inf.allocated_bytes, inf.cluster_size), (3, 3 * 4096, CS));
        assert_eq!(inf.base_format, ImageFormat::Raw);
    }

    #[test]
    fn allocation_scans_find_the_last_cluster_and_count_a_short_one() {
        let env = Env::new();
        let base = env.base("base.raw", 20 * 4096 + 512);
        let ovl = env.overlay(&base, "a.ovl");
        let mut ov = Overlay::open(&ovl, false).unwrap();
        assert_eq!(ov.layer.last_allocated(), None);
        for c in [0u64, 9, 13] {
            ov.write_at(&[1u8; 512], c * 4096).unwrap();
            assert_eq!(ov.layer.last_allocated(), Some(c));
        }
        assert_eq!(ov.layer.allocated_bytes(), 3 * 4096);
        ov.write_at(&[1u8; 512], 20 * 4096).unwrap();
        assert_eq!((ov.layer.last_allocated(), ov.layer.allocated_bytes()), (Some(20), 3 * 4096 + 512));
    }

    /// One step of the model test.
    #[derive(Debug, Clone)]
    enum Op {
        Write { at: u64, len: usize, seed: u8 },
        Read { at: u64, len: usize },
        Flush,
        Reopen,
    }

    fn op(size: u64) -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let span = (0..size, 1..3 * CS as usize).prop_map(move |(at, len)| (at, len.min((size - at) as usize)));
        prop_oneof![
            4 => (span.clone(), any::<u8>()).prop_map(|((at, len), seed)| Op::Write { at, len, seed }),
            3 => span.prop_map(|(at, len)| Op::Read { at, len }),
            1 => Just(Op::Flush),
            1 => Just(Op::Reopen),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Any mix of unaligned writes, reads, flushes and reopens reads back
        /// like a plain byte array, and never touches the base.
        #[test]
        fn an_overlay_behaves_like_a_byte_array(ops in proptest::collection::vec(op(10 * 4096 + 1536), 1..40)) {
            let env = Env::new();
            let size = 10 * 4096 + 1536;
            let base = env.base("base.raw", size);
            let ovl = env.overlay(&base, "a.ovl");
            let base_bytes = std::fs::read(&base).unwrap();
            let mut model = base_bytes.clone();
            let mut ov = Overlay::open(&ovl, false).unwrap();
            for op in ops {
                match op {
                    Op::Write { at, len, seed } => {
                        let data = pattern(at as usize, len, seed);
                        // The probe guard may refuse a write; the model then keeps its bytes.
                        if ov.write_at(&data, at).is_ok() {
                            model[at as usize..at as usize + len].copy_from_slice(&data);
                        }
                    }
                    Op::Read { at, len } => {
                        proptest::prop_assert_eq!(read(&ov, at, len), &model[at as usize..at as usize + len]);
                    }
                    Op::Flush => ov.flush().unwrap(),
                    Op::Reopen => {
                        drop(ov);
                        ov = Overlay::open(&ovl, false).unwrap();
                    }
                }
            }
            proptest::prop_assert_eq!(read(&ov, 0, size), model);
            drop(ov);
            proptest::prop_assert_eq!(std::fs::read(&base).unwrap(), base_bytes);
        }
    }

    #[test]
    fn a_short_last_cluster_works() {
        let env = Env::new();
        let base = env.base("base.raw", 4096 + 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let mut ov = Overlay::open(&ovl, false).unwrap();
        ov.write_at(&[9u8; 512], 4096 + 512).unwrap();
        assert!(ov.write_at(&[9u8; 512], 4096 + 1024).is_err(), "past the end");
        let mut want = std::fs::read(&base).unwrap();
        want[4096 + 512..].fill(9);
        assert_eq!(read(&ov, 0, want.len()), want);
        drop(ov);
        assert_eq!(info(&ovl).unwrap().allocated_bytes, 1024);
    }

    #[test]
    fn chains_of_two_overlays() {
        let env = Env::new();
        let base = env.base("base.raw", 32 * 1024);
        let first = env.overlay(&base, "first.ovl");
        let mut want = std::fs::read(&base).unwrap();
        {
            let mut ov = Overlay::open(&first, false).unwrap();
            ov.write_at(&[1u8; 4096], 0).unwrap();
            ov.write_at(&[2u8; 512], 8192).unwrap();
        } // closing flushes
        want[..4096].fill(1);
        want[8192..8704].fill(2);
        let first_bytes = std::fs::read(&first).unwrap();
        let second = env.overlay(&first, "second.ovl");
        let mut ov = open_image(&second, false).unwrap();
        assert_eq!(read(ov.as_ref(), 0, want.len()), want);
        ov.write_at(&[3u8; 1024], 8192 + 256).unwrap();
        ov.write_at(&[4u8; 512], 20480).unwrap();
        ov.flush().unwrap();
        want[8192 + 256..8192 + 1280].fill(3);
        want[20480..20992].fill(4);
        assert_eq!(read(ov.as_ref(), 0, want.len()), want);
        drop(ov);
        assert_eq!(std::fs::read(&first).unwrap(), first_bytes, "the middle layer is untouched");
        let inf = info(&second).unwrap();
        assert_eq!((inf.base_format, inf.allocated_clusters), (ImageFormat::Overlay, 2));

        // Writing the middle layer now invalidates the top one.
        later();
        {
            let mut mid = Overlay::open(&first, false).unwrap();
            mid.write_at(&[5u8; 512], 4096).unwrap();
        }
        let msg = open_err(&second).to_string();
        assert!(msg.contains("second.ovl") && msg.contains("first.ovl") && msg.contains("changed"), "{msg}");
    }

    #[test]
    fn commit_folds_into_the_base_and_resets_the_overlay() {
        let env = Env::new();
        let base = env.base("base.raw", 64 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let mut want = std::fs::read(&base).unwrap();
        {
            let mut ov = Overlay::open(&ovl, false).unwrap();
            for (i, at) in [0u64, 4096, 5 * 4096 + 512, 15 * 4096].into_iter().enumerate() {
                ov.write_at(&[0x10 + i as u8; 512], at).unwrap();
                want[at as usize..at as usize + 512].fill(0x10 + i as u8);
            }
        }
        let report = commit(&ovl).unwrap();
        assert_eq!((report.clusters, report.bytes, report.resumed), (4, 4 * 4096, false));
        assert_eq!(std::fs::read(&base).unwrap(), want, "the base holds the overlay's writes");
        let inf = info(&ovl).unwrap();
        assert_eq!((inf.allocated_clusters, inf.generation), (0, 1), "an empty overlay again");
        let ov = Overlay::open(&ovl, false).unwrap();
        assert_eq!(read(&ov, 0, want.len()), want);
        drop(ov);
        // Nothing to fold: nothing changes.
        let before = env.files();
        assert_eq!(commit(&ovl).unwrap().clusters, 0);
        assert_eq!(env.files(), before);
    }

    #[test]
    fn commit_into_an_overlay_base() {
        let env = Env::new();
        let base = env.base("base.raw", 16 * 1024);
        let first = env.overlay(&base, "first.ovl");
        let second = env.overlay(&first, "second.ovl");
        let base_bytes = std::fs::read(&base).unwrap();
        {
            let mut ov = Overlay::open(&second, false).unwrap();
            ov.write_at(&[7u8; 512], 4096).unwrap();
        }
        commit(&second).unwrap();
        assert_eq!(std::fs::read(&base).unwrap(), base_bytes, "the raw bottom is untouched");
        let mid = Overlay::open(&first, true).unwrap();
        assert_eq!(mid.allocated_clusters(), 1);
        assert_eq!(read(&mid, 4096, 512), vec![7u8; 512]);
        drop(mid);
        assert_eq!(read(&Overlay::open(&second, true).unwrap(), 4096, 512), vec![7u8; 512]);
    }

    #[test]
    fn commit_refuses_a_base_in_use_a_changed_base_and_a_read_only_base() {
        let env = Env::new();
        let base = env.base("base.raw", 16 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        {
            let mut ov = Overlay::open(&ovl, false).unwrap();
            ov.write_at(&[7u8; 512], 0).unwrap();
        }
        let before = env.files();

        let running = open_image(&base, false).unwrap();
        let err = commit(&ovl).unwrap_err();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(running);
        let user = Overlay::open(&ovl, true).unwrap();
        assert!(matches!(commit(&ovl), Err(DiskError::InUse { .. })));
        drop(user);
        assert_eq!(env.files(), before);

        let mut perms = std::fs::metadata(&base).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o444);
        std::fs::set_permissions(&base, perms.clone()).unwrap();
        // Root ignores file modes, so this case only shows for other users.
        if OpenOptions::new().write(true).open(&base).is_err() {
            let msg = commit(&ovl).unwrap_err().to_string();
            assert!(msg.contains("open for writing") && msg.contains("base.raw"), "{msg}");
            assert_eq!(env.files(), before);
        }
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o644);
        std::fs::set_permissions(&base, perms).unwrap();

        touch_write(&base, 9000);
        let before = env.files();
        let msg = commit(&ovl).unwrap_err().to_string();
        assert!(msg.contains("changed") && msg.contains("modified at"), "{msg}");
        assert_eq!(env.files(), before);
    }

    #[test]
    fn an_interrupted_commit_is_refused_then_resumed() {
        let env = Env::new();
        let base = env.base("base.raw", 16 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let mut want = std::fs::read(&base).unwrap();
        {
            let mut ov = Overlay::open(&ovl, false).unwrap();
            ov.write_at(&[7u8; 4096], 0).unwrap();
            ov.write_at(&[8u8; 4096], 8192).unwrap();
        }
        want[..4096].fill(7);
        want[8192..12288].fill(8);
        // What commit does up to a crash after the first cluster.
        {
            let f = OpenOptions::new().read(true).write(true).open(&ovl).unwrap();
            let mut layer = Layer::load(f, &ovl, Lock::Exclusive).unwrap();
            layer.write_generation(FLAG_COMMITTING).unwrap();
            std::fs::OpenOptions::new().write(true).open(&base).unwrap().write_all_at(&[7u8; 4096], 0).unwrap();
        }
        let err = open_err(&ovl);
        assert!(matches!(err, DiskError::CommitInterrupted { .. }), "{err}");
        assert!(err.to_string().contains("dvisor disk commit"), "{err}");
        let report = commit(&ovl).unwrap();
        assert!(report.resumed);
        assert_eq!(std::fs::read(&base).unwrap(), want);
        assert_eq!(Overlay::open(&ovl, true).unwrap().allocated_clusters(), 0);
    }

    #[test]
    fn a_modified_or_replaced_base_is_refused_by_name() {
        let env = Env::new();
        let base = env.base("base.raw", 8192);
        let ovl = env.overlay(&base, "a.ovl");
        std::fs::OpenOptions::new().write(true).open(&base).unwrap().set_len(16384).unwrap();
        let before = env.files();
        for rw in [true, false] {
            let msg = Overlay::open(&ovl, !rw).err().expect("refused").to_string();
            assert!(msg.contains("a.ovl") && msg.contains("base.raw"), "{msg}");
            assert!(msg.contains("size changed from 8192 to 16384 bytes"), "{msg}");
        }
        assert_eq!(env.files(), before, "refusing changes no file");

        let ovl2 = env.overlay(&base, "b.ovl");
        let copy = env.base("copy.raw", 16384);
        std::fs::rename(&copy, &base).unwrap();
        let msg = open_err(&ovl2).to_string();
        assert!(msg.contains("another file"), "{msg}");

        std::fs::remove_file(&base).unwrap();
        let msg = open_err(&ovl2).to_string();
        assert!(msg.contains("base.raw") && msg.contains("No such file"), "{msg}");
    }

    /// XORs `mask` into byte `at` of slot 0, optionally recomputing the
    /// header CRC so that the checks after it are reached.
    fn corrupt(p: &Path, at: usize, mask: u8, reseal: bool) {
        let mut bytes = std::fs::read(p).unwrap();
        bytes[at] ^= mask;
        if reseal {
            let crc = crc64(&bytes[..field::HEADER_CRC]);
            bytes[field::HEADER_CRC..field::HEADER_CRC + 8].copy_from_slice(&crc.to_le_bytes());
        }
        std::fs::write(p, bytes).unwrap();
    }

    #[test]
    fn each_corrupt_header_field_gives_its_named_error_and_changes_nothing() {
        use field::*;
        // (field, byte, XOR mask, error with the old CRC, error once resealed)
        let cases: &[(&str, usize, u8, &str, &str)] = &[
            ("magic", MAGIC + 1, 0x40, "not a dvisor overlay", "not a dvisor overlay"),
            ("version", VERSION, 0x40, "format version 65", "format version 65"),
            ("flags", FLAGS + 1, 0x40, "checksum mismatch", "`flags`"),
            ("generation", GENERATION, 0x01, "checksum mismatch", "`generation`"),
            ("cluster_size", CLUSTER_SIZE + 1, 0x40, "checksum mismatch", "`cluster_size`"),
            ("reserved", RESERVED, 0x40, "checksum mismatch", "`reserved`"),
            ("virtual_size", VIRTUAL_SIZE, 0x01, "checksum mismatch", "`virtual_size`"),
            ("virtual_size (whole sectors)", VIRTUAL_SIZE + 1, 0x40, "checksum mismatch", "`cluster_count`"),
            ("cluster_count", CLUSTER_COUNT, 0x40, "checksum mismatch", "`cluster_count`"),
            ("bitmap_offset", BITMAP_OFFSET + 1, 0x40, "checksum mismatch", "`bitmap_offset`"),
            ("bitmap_len", BITMAP_LEN, 0x40, "checksum mismatch", "`bitmap_len`"),
            ("data_offset", DATA_OFFSET + 1, 0x40, "checksum mismatch", "`data_offset`"),
            ("bitmap_crc", BITMAP_CRC, 0x40, "checksum mismatch", "allocation bitmap 0 is corrupt"),
            ("base_size", BASE_SIZE + 1, 0x40, "checksum mismatch", "size changed from 24576 to 8192 bytes"),
            ("base_dev", BASE_DEV, 0x40, "checksum mismatch", "another file"),
            ("base_ino", BASE_INO, 0x40, "checksum mismatch", "another file"),
            ("base_mtime_ns", BASE_MTIME_NS + 3, 0x40, "checksum mismatch", "modified at"),
            ("base_path_len", BASE_PATH_LEN + 1, 0x40, "checksum mismatch", "`base_path_len`"),
            ("base_path", BASE_PATH + 1, 0x40, "checksum mismatch", "cannot be used"),
            ("base_path NUL", BASE_PATH + 1, 0xff, "checksum mismatch", "`base_path`"),
            ("padding", HEADER_CRC - 1, 0x40, "checksum mismatch", "`padding`"),
            ("header_crc", HEADER_CRC, 0x40, "checksum mismatch", ""),
        ];
        for &(name, at, mask, raw_err, sealed_err) in cases {
            for (reseal, want) in [(false, raw_err), (true, sealed_err)] {
                let env = Env::new();
                let base = env.base("base.raw", 8192);
                let ovl = env.overlay(&base, "a.ovl");
                if name == "base_path NUL" {
                    // The byte that makes the path's second byte NUL.
                    let b = std::fs::read(&ovl).unwrap()[at];
                    corrupt(&ovl, at, b, reseal);
                } else {
                    corrupt(&ovl, at, mask, reseal);
                }
                let before = env.files();
                for read_only in [true, false] {
                    let result = Overlay::open(&ovl, read_only);
                    if want.is_empty() {
                        // Resealing a damaged CRC repairs it.
                        assert!(result.is_ok(), "{name}");
                        continue;
                    }
                    let msg = result.err().map(|e| e.to_string()).unwrap_or_default();
                    assert!(msg.contains(want), "{name} (resealed {reseal}): {msg}");
                    assert!(msg.contains("a.ovl"), "{name}: {msg}");
                    assert!(commit(&ovl).is_err(), "{name}");
                }
                assert_eq!(env.files(), before, "{name}: no file changed");
            }
        }
    }

    #[test]
    fn a_corrupt_bitmap_is_named() {
        let env = Env::new();
        let base = env.base("base.raw", 8192);
        let ovl = env.overlay(&base, "a.ovl");
        let mut bytes = std::fs::read(&ovl).unwrap();
        bytes[8192] = 1; // cluster 0 "allocated", without a matching CRC
        std::fs::write(&ovl, &bytes).unwrap();
        let msg = open_err(&ovl).to_string();
        assert!(msg.contains("allocation bitmap 0 is corrupt") && msg.contains("a.ovl"), "{msg}");
        // A bit past the last cluster, with a matching CRC.
        bytes[8192] = 1 << 3;
        let crc = crc64(&bytes[8192..8193]);
        bytes[field::BITMAP_CRC..field::BITMAP_CRC + 8].copy_from_slice(&crc.to_le_bytes());
        let hcrc = crc64(&bytes[..field::HEADER_CRC]);
        bytes[field::HEADER_CRC..field::HEADER_CRC + 8].copy_from_slice(&hcrc.to_le_bytes());
        std::fs::write(&ovl, &bytes).unwrap();
        let msg = open_err(&ovl).to_string();
        assert!(msg.contains("`bitmap`") && msg.contains("past the last"), "{msg}");
        assert_eq!(std::fs::read(&ovl).unwrap(), bytes);
    }

    #[test]
    fn a_truncated_overlay_is_named() {
        let env = Env::new();
        let base = env.base("base.raw", 16384);
        let ovl = env.overlay(&base, "a.ovl");
        {
            let mut ov = Overlay::open(&ovl, false).unwrap();
            ov.write_at(&[1u8; 512], 8192).unwrap();
        }
        let len = std::fs::metadata(&ovl).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&ovl).unwrap().set_len(len - 4096).unwrap();
        let msg = open_err(&ovl).to_string();
        assert!(msg.contains("truncated") && msg.contains("a.ovl"), "{msg}");
        // Cut into the header itself.
        std::fs::OpenOptions::new().write(true).open(&ovl).unwrap().set_len(100).unwrap();
        let msg = open_err(&ovl).to_string();
        assert!(msg.contains("a.ovl"), "{msg}");
    }

    #[test]
    fn a_crash_before_the_bitmap_update_loses_only_unflushed_writes() {
        let env = Env::new();
        let base = env.base("base.raw", 32 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let base_bytes = std::fs::read(&base).unwrap();
        let mut ov = Overlay::open(&ovl, false).unwrap();
        ov.write_at(&[1u8; 4096], 0).unwrap();
        ov.flush().unwrap();
        // Data reaches the file, the bits only memory; then the VMM dies.
        ov.write_at(&[2u8; 512], 8192 + 512).unwrap();
        ov.write_at(&[3u8; 512], 0).unwrap(); // in place, allocated cluster
        std::mem::forget(ov);
        let ov = Overlay::open(&ovl, false).unwrap();
        assert_eq!(ov.allocated_clusters(), 1);
        let mut want = base_bytes.clone();
        want[..4096].fill(1);
        want[..512].fill(3); // the in-place write was in the file already
        assert_eq!(read(&ov, 0, want.len()), want, "cluster 2 reads the base, not the orphaned data");
        drop(ov);
        // The orphaned cluster is rewritten whole when next allocated.
        let mut ov = Overlay::open(&ovl, false).unwrap();
        ov.write_at(&[4u8; 512], 8192).unwrap();
        want[8192..8704].fill(4);
        assert_eq!(read(&ov, 0, want.len()), want);
    }

    #[test]
    fn a_torn_flush_falls_back_to_the_previous_generation() {
        let env = Env::new();
        let base = env.base("base.raw", 32 * 1024);
        let ovl = env.overlay(&base, "a.ovl");
        let mut ov = Overlay::open(&ovl, false).unwrap();
        ov.write_at(&[1u8; 512], 0).unwrap();
        ov.flush().unwrap(); // generation 2, slot 1
        ov.write_at(&[2u8; 512], 8192).unwrap();
        ov.flush().unwrap(); // generation 3, slot 0
        drop(ov);
        // Tear generation 3's header as a power cut mid-write would.
        let mut bytes = std::fs::read(&ovl).unwrap();
        bytes[100..2000].fill(0);
        std::fs::write(&ovl, &bytes).unwrap();
        let ov = Overlay::open(&ovl, true).unwrap();
        assert_eq!((ov.generation(), ov.allocated_clusters()), (2, 1));
        let note = ov.recovered().unwrap_or_default().to_string();
        assert!(note.contains("slot 0") && note.contains("generation 2"), "{note}");
        drop(ov);
        assert_eq!(std::fs::read(&ovl).unwrap(), bytes, "opening read-only repairs nothing");
        // The next flush writes over the torn slot.
        let mut ov = Overlay::open(&ovl, false).unwrap();
        ov.write_at(&[3u8; 512], 16384).unwrap();
        ov.flush().unwrap();
        drop(ov);
        let ov = Overlay::open(&ovl, true).unwrap();
        assert_eq!((ov.generation(), ov.recovered()), (3, None));
        // A torn bitmap copy has the same effect as a torn header.
        drop(ov);
        let mut bytes = std::fs::read(&ovl).unwrap();
        bytes[8192] ^= 0xff; // copy 0, described by slot 0, generation 3
        std::fs::write(&ovl, &bytes).unwrap();
        let ov = Overlay::open(&ovl, true).unwrap();
        assert_eq!(ov.generation(), 2);
        assert!(ov.recovered().unwrap_or_default().contains("bitmap"));
    }

    #[test]
    fn create_refuses_existing_files_and_bad_bases_and_leaves_no_temporary() {
        let env = Env::new();
        let base = env.base("base.raw", 8192);
        let ovl = env.overlay(&base, "a.ovl");
        let before = env.files();
        assert!(matches!(Overlay::create(&base, &ovl), Err(DiskError::Exists { .. })));
        assert!(matches!(Overlay::create(&base, &base), Err(DiskError::Exists { .. })));
        let odd = env.path("odd.raw");
        std::fs::write(&odd, [0u8; 1000]).unwrap();
        let msg = Overlay::create(&odd, &env.path("b.ovl")).unwrap_err().to_string();
        assert!(msg.contains("1000 bytes"), "{msg}");
        std::fs::remove_file(&odd).unwrap();
        assert!(Overlay::create(&env.path("missing.raw"), &env.path("b.ovl")).is_err());
        assert!(Overlay::create_with_cluster_size(&base, &env.path("b.ovl"), 1000).is_err());
        assert_eq!(env.files(), before, "no overlay, no temporary file left");
    }

    #[test]
    fn chains_are_bounded() {
        let env = Env::new();
        let mut below = env.base("base.raw", 4096);
        for i in 0..disk::MAX_CHAIN_DEPTH - 1 {
            below = env.overlay(&below, &format!("{i}.ovl"));
        }
        assert!(Overlay::open(&below, true).is_ok());
        let err = Overlay::create(&below, &env.path("too-deep.ovl")).unwrap_err();
        assert!(err.to_string().contains("deeper than"), "{err}");
    }

    #[test]
    fn an_overlay_refuses_the_probe_magic_at_offset_zero() {
        let env = Env::new();
        let base = env.base("base.raw", 8192);
        let ovl = env.overlay(&base, "a.ovl");
        let mut ov = Overlay::open(&ovl, false).unwrap();
        let mut sector = [0u8; 512];
        sector[..8].copy_from_slice(&MAGIC);
        assert!(ov.write_at(&sector, 0).is_err());
        assert_eq!(ov.allocated_clusters(), 0);
    }
}
