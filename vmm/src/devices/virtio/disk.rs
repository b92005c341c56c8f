//! Disk images behind virtio-blk: raw files and copy-on-write overlays.
//!
//! `Block` serves a [`DiskImage`]; it does not care whether the bytes come
//! from one raw file or from an overlay chain (`overlay.rs`). This module
//! holds what every image kind shares: the trait, the raw image, the
//! identity of an image file ([`DiskIdentity`], so that a snapshot or an
//! overlay can tell when a file changed under it), advisory locks, and the
//! errors.
//!
//! Formats are told apart by probing: a file that starts with the overlay
//! magic (at offset 0, or at 4096 where the second header copy lives) is an
//! overlay, anything else is raw. Probing is a known hole when a guest can
//! write the probed bytes (it could turn its raw disk into an "overlay"
//! whose base is any host file), so no image accepts a write that would
//! put the overlay magic at virtual offset 0 or 4096: a guest cannot make
//! its disk look like an overlay, and a commit cannot carry such content
//! into a base.
//!
//! Locks: every open image holds a shared `flock` on its file, a commit
//! takes an exclusive one on the overlay and its base. Shared locks never
//! conflict with each other (a VM may run on a raw file while clones run on
//! overlays over it), but a commit cannot fold data into a base that a
//! running VM still reads. File systems without `flock` support (some 9p
//! mounts) are served unlocked.
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::overlay::{self, Overlay};

/// Guest disks are addressed in 512-byte sectors, so every image size is a
/// multiple of this.
pub const SECTOR_SIZE: u64 = 512;

/// How deep an overlay chain may go (a VM cloned this many times without a
/// commit). A bound keeps a looping or absurd chain from exhausting file
/// descriptors or the stack.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Virtual offsets at which no image accepts the overlay magic: where
/// probing looks for it (see the module comment).
const GUARDED_OFFSETS: [u64; 2] = [0, overlay::HEADER_SLOT_LEN];

/// The bytes a guest sees, whatever file they come from.
///
/// Offsets and lengths are in bytes; callers (virtio-blk) keep requests
/// inside `size()`. Reads take `&self` because they never change the
/// image, so an overlay can read through its base without owning it
/// mutably.
pub trait DiskImage: Send {
    /// The virtual size in bytes (a multiple of [`SECTOR_SIZE`]).
    fn size(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Fills `buf` from `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`. Durable only after [`DiskImage::flush`],
    /// as with a disk's write cache.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// The file this image was opened from (the top of an overlay chain).
    fn path(&self) -> &Path;
    /// What kind of file it is.
    fn format(&self) -> ImageFormat;
    /// The identity of the open file (not of whatever its path names now).
    fn identity(&self) -> io::Result<DiskIdentity>;
}

/// The on-disk format of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// The file's bytes are the disk's bytes.
    Raw,
    /// A dvisor copy-on-write overlay (`overlay.rs`).
    Overlay,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Overlay => "overlay",
        })
    }
}

/// Everything that can go wrong opening, creating or committing an image.
/// Each names the file and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a multiple of the 512-byte sector size (resize it, e.g. `truncate -s %512 {path}`)")]
    Size { path: PathBuf, size: u64 },
    #[error("{path} is not a dvisor overlay (no overlay magic at offset 0 or 4096)")]
    NotOverlay { path: PathBuf },
    #[error("overlay {path} has format version {found}; this dvisor reads version {supported} only (use the dvisor that made it)")]
    Version { path: PathBuf, found: u32, supported: u32 },
    #[error("overlay {path}: header slot {slot} is corrupt: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}); the file was damaged or not written by dvisor")]
    HeaderChecksum { path: PathBuf, slot: usize, stored: u64, computed: u64 },
    #[error("overlay {path}: header field `{field}` is invalid: {problem}")]
    HeaderField { path: PathBuf, field: &'static str, problem: String },
    #[error("overlay {path}: allocation bitmap {copy} is corrupt: checksum mismatch (stored {stored:#018x}, computed {computed:#018x})")]
    BitmapChecksum { path: PathBuf, copy: usize, stored: u64, computed: u64 },
    #[error("overlay {path} is truncated: it is {len} bytes but its allocated clusters reach {needed}")]
    Truncated { path: PathBuf, len: u64, needed: u64 },
    #[error("overlay {path}: its base {base} changed since the overlay was made: {changes}. The overlay only makes sense over that exact file: put the original base back, or make a new overlay")]
    BaseChanged { path: PathBuf, base: PathBuf, changes: String },
    #[error("overlay {path}: its base {base} cannot be used: {source}")]
    Base {
        path: PathBuf,
        base: PathBuf,
        #[source]
        source: Box<DiskError>,
    },
    #[error("overlay {path}: a commit into its base {base} was interrupted, so the base holds part of the overlay's data; run `dvisor disk commit {path}` again to finish it")]
    CommitInterrupted { path: PathBuf, base: PathBuf },
    #[error("{path} is in use by another process or open file (a running VM, a commit, or an overlay over it); stop that first")]
    InUse { path: PathBuf },
    #[error("{path} already exists; remove it or choose another name")]
    Exists { path: PathBuf },
    #[error("overlay chain at {path} is deeper than {max} levels (or loops); commit some overlays into their bases first")]
    ChainTooDeep { path: PathBuf, max: usize },
    #[error("{path} changed since it was recorded: {changes}")]
    Changed { path: PathBuf, changes: String },
}

impl DiskError {
    /// The `map_err` for an I/O error doing `op` ("open", "read"...) on `path`.
    pub(crate) fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DiskError {
        let path = path.to_owned();
        move |source| DiskError::Io { op, path, source }
    }
}

/// Which file a disk is, and in what state: enough to notice that it was
/// replaced, resized or written since it was recorded.
///
/// Snapshots keep one per disk and restore refuses a disk whose identity
/// changed; an overlay keeps its base's (without the path, which it stores
/// on its own). Device and inode catch a file replaced by a copy, size and
/// modification time catch writes. The modification time is the only check
/// that a same-sized write in place was made, so tools that write a base and
/// then reset its mtime defeat it; nothing in dvisor does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskIdentity {
    pub path: PathBuf,
    /// The file's size in bytes (for an overlay, its file, not its virtual size).
    pub size: u64,
    /// Device and inode: which file, whatever its name.
    pub dev: u64,
    pub ino: u64,
    /// Last modification, in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// Opens an image file for reading, and for writing unless `read_only`
/// (then without write access, so not even a VMM bug can change it).
pub(crate) fn open_file(path: &Path, read_only: bool) -> Result<File, DiskError> {
    OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(DiskError::io(if read_only { "open" } else { "open for writing" }, path))
}

impl std::fmt::Display for DiskIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, device:inode {}:{}, mtime {} ns", self.size, self.dev, self.ino, self.mtime_ns)
    }
}

impl DiskIdentity {
    /// The identity of the file at `path` now (symbolic links followed).
    pub fn of(path: &Path) -> Result<Self, DiskError> {
        let meta = std::fs::metadata(path).map_err(DiskError::io("read the metadata of", path))?;
        Ok(Self::from_metadata(path, &meta))
    }

    /// The identity of an open file, which `path` names in messages.
    pub fn of_file(file: &File, path: &Path) -> io::Result<Self> {
        Ok(Self::from_metadata(path, &file.metadata()?))
    }

    fn from_metadata(path: &Path, meta: &std::fs::Metadata) -> Self {
        DiskIdentity {
            path: path.to_owned(),
            size: meta.size(),
            dev: meta.dev(),
            ino: meta.ino(),
            mtime_ns: meta.mtime().saturating_mul(1_000_000_000).saturating_add(meta.mtime_nsec()),
        }
    }

    /// `changes` as one sentence, or `None` when the file is the same.
    pub fn differs(&self, now: &DiskIdentity) -> Option<String> {
        let c = self.changes(now);
        (!c.is_empty()).then(|| c.join("; "))
    }

    /// What differs between this (recorded) identity and `now`, in words,
    /// one entry per change; empty when the file is the same. Compares
    /// the files, not their names.
    pub fn changes(&self, now: &DiskIdentity) -> Vec<String> {
        let mut out = Vec::new();
        if (self.dev, self.ino) != (now.dev, now.ino) {
            out.push(format!(
                "it is another file now (device:inode {}:{} was {}:{}; copied or replaced?)",
                now.dev, now.ino, self.dev, self.ino
            ));
        }
        if self.size != now.size {
            out.push(format!("size changed from {} to {} bytes", self.size, now.size));
        }
        if self.mtime_ns != now.mtime_ns {
            out.push(format!("modified at {} (recorded {})", format_time(now.mtime_ns), format_time(self.mtime_ns)));
        }
        out
    }

    /// Fails with [`DiskError::Changed`] unless the file at `self.path` is
    /// still the one recorded.
    pub fn check(&self) -> Result<(), DiskError> {
        let now = DiskIdentity::of(&self.path)?;
        let changes = self.changes(&now);
        if changes.is_empty() {
            Ok(())
        } else {
            Err(DiskError::Changed { path: self.path.clone(), changes: changes.join("; ") })
        }
    }
}

/// `2024-05-01 10:00:00.123456789 UTC`: a timestamp a reader can compare with
/// `ls --full-time`, without a date crate for one message.
pub fn format_time(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let nanos = ns.rem_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_date(days);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{nanos:09} UTC", sod / 3600, sod / 60 % 60, sod % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01, counting
/// in 400-year eras (146097 days each) from 0000-03-01 so that the leap
/// day falls at the end of each year.
fn civil_date(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // day of era, 0..146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of the March-based year
    let mp = (5 * doy + 2) / 153; // month, March = 0
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// How an image holds its file lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lock {
    /// In use: excludes commits only.
    Shared,
    /// Being committed: excludes every other user.
    Exclusive,
}

/// Takes `lock` on `file` without waiting. A file system that has no
/// `flock` is used unlocked (logged), only a conflicting holder fails.
pub(crate) fn lock_file(file: &File, path: &Path, lock: Lock) -> Result<(), DiskError> {
    let op = match lock {
        Lock::Shared => libc::LOCK_SH,
        Lock::Exclusive => libc::LOCK_EX,
    } | libc::LOCK_NB;
    // SAFETY: flock only reads the descriptor, which `file` keeps open for
    // the duration of the call.
    if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Err(DiskError::InUse { path: path.to_owned() });
    }
    tracing::debug!("no flock on {}: {err}; using it unlocked", path.display());
    Ok(())
}

/// Opens the image at `path`, an overlay (and its chain) or a raw file,
/// as its first bytes say.
pub fn open_image(path: &Path, read_only: bool) -> Result<Box<dyn DiskImage>, DiskError> {
    open_locked(path, read_only, Lock::Shared, 0)
}

/// [`open_image`] with the lock to take on `path` itself (its bases are
/// always shared) and the depth in a chain.
pub(crate) fn open_locked(path: &Path, read_only: bool, lock: Lock, depth: usize) -> Result<Box<dyn DiskImage>, DiskError> {
    if depth >= MAX_CHAIN_DEPTH {
        return Err(DiskError::ChainTooDeep { path: path.to_owned(), max: MAX_CHAIN_DEPTH });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(!read_only)
        .open(path)
        .map_err(DiskError::io(if read_only { "open" } else { "open for writing" }, path))?;
    if overlay::probe(&file).map_err(DiskError::io("read", path))? {
        Ok(Box::new(Overlay::from_file(file, path, read_only, lock, depth)?))
    } else {
        Ok(Box::new(RawImage::from_file(file, path, read_only, lock)?))
    }
}

/// The format of the file at `path`, by probing its first bytes.
pub fn detect_format(path: &Path) -> Result<ImageFormat, DiskError> {
    let file = File::open(path).map_err(DiskError::io("open", path))?;
    Ok(if overlay::probe(&file).map_err(DiskError::io("read", path))? { ImageFormat::Overlay } else { ImageFormat::Raw })
}

/// Refuses a write of `buf` at `offset` that would leave the overlay magic
/// at one of the probed offsets (see the module comment). `read` reads the
/// image's current bytes, for a write that covers only part of the magic.
pub(crate) fn guard_probe(
    buf: &[u8],
    offset: u64,
    size: u64,
    read: impl Fn(&mut [u8], u64) -> io::Result<()>,
) -> io::Result<()> {
    let magic = &overlay::MAGIC;
    let len = magic.len() as u64;
    let end = offset.saturating_add(buf.len() as u64);
    for g in GUARDED_OFFSETS {
        if end <= g || offset >= g + len || g + len > size {
            continue;
        }
        let mut after = [0u8; 8];
        read(&mut after, g)?;
        for (i, byte) in after.iter_mut().enumerate() {
            let at = g + i as u64;
            if at >= offset && at < end {
                *byte = buf[(at - offset) as usize];
            }
        }
        if &after == magic {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refused a write that would put the dvisor overlay magic at offset {g}: the host would then take this disk for an overlay"),
            ));
        }
    }
    Ok(())
}

/// Fails a request outside `0..size`; callers check requests, so this is a
/// second line against a bug, not a guest error path.
pub(crate) fn check_range(len: usize, offset: u64, size: u64) -> io::Result<()> {
    if offset.checked_add(len as u64).is_some_and(|end| end <= size) {
        Ok(())
    } else {
        Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{len} bytes at {offset} lie beyond the image end {size}")))
    }
}

/// A raw image: the file's bytes are the disk's bytes.
pub struct RawImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl RawImage {
    /// Opens `path` as raw, whatever its content (a file opened read-only
    /// is opened without write access, so not even a VMM bug can change it).
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        Self::from_file(open_file(path, read_only)?, path, read_only, Lock::Shared)
    }

    pub(crate) fn from_file(file: File, path: &Path, read_only: bool, lock: Lock) -> Result<Self, DiskError> {
        let size = file.metadata().map_err(DiskError::io("read the metadata of", path))?.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(DiskError::Size { path: path.to_owned(), size });
        }
        lock_file(&file, path, lock)?;
        Ok(RawImage { file, path: path.to_owned(), size, read_only })
    }
}

impl DiskImage for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(buf.len(), offset, self.size)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the image is open read-only"));
        }
        check_range(buf.len(), offset, self.size)?;
        guard_probe(buf, offset, self.size, |b, o| self.file.read_exact_at(b, o))?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn format(&self) -> ImageFormat {
        ImageFormat::Raw
    }

    fn identity(&self) -> io::Result<DiskIdentity> {
        DiskIdentity::of_file(&self.file, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn time_format_matches_known_dates() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00.000000000 UTC");
        assert_eq!(format_time(951_782_400_000_000_000), "2000-02-29 00:00:00.000000000 UTC");
        assert_eq!(format_time(1_700_000_000_123_456_789), "2023-11-14 22:13:20.123456789 UTC");
        assert_eq!(format_time(-1), "1969-12-31 23:59:59.999999999 UTC");
    }

    #[test]
    fn identity_names_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(&dir, "a.img", &[0u8; 1024]);
        let before = DiskIdentity::of(&p).unwrap();
        assert!(before.check().is_ok());
        assert!(before.changes(&before).is_empty());

        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(2048).unwrap();
        f.set_times(std::fs::FileTimes::new().set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(86_400))).unwrap();
        let msg = before.check().unwrap_err().to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains("size changed from 1024 to 2048 bytes"), "{msg}");
        assert!(msg.contains("modified at 1970-01-02 00:00:00.000000000 UTC"), "{msg}");

        // A copy put in its place is another file.
        let copy = raw(&dir, "b.img", &[0u8; 1024]);
        std::fs::rename(&copy, &p).unwrap();
        let msg = before.check().unwrap_err().to_string();
        assert!(msg.contains("another file"), "{msg}");

        let json = serde_json::to_string(&before).unwrap();
        assert_eq!(serde_json::from_str::<DiskIdentity>(&json).unwrap(), before);
    }

    #[test]
    fn raw_image_reads_writes_and_refuses_out_of_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(&dir, "a.img", &[0u8; 4096]);
        let mut img = open_image(&p, false).unwrap();
        assert_eq!((img.size(), img.format(), img.read_only()), (4096, ImageFormat::Raw, false));
        img.write_at(&[7u8; 512], 512).unwrap();
        img.flush().unwrap();
        let mut back = [0u8; 512];
        img.read_at(&mut back, 512).unwrap();
        assert_eq!(back, [7u8; 512]);
        assert!(img.read_at(&mut back, 4096 - 256).is_err());
        assert!(img.write_at(&back, u64::MAX - 10).is_err());
        assert_eq!(img.identity().unwrap().ino, DiskIdentity::of(&p).unwrap().ino);

        let mut ro = open_image(&p, true).unwrap();
        assert!(ro.write_at(&[1u8; 512], 0).is_err());
        assert_eq!(std::fs::read(&p).unwrap()[512..1024], [7u8; 512]);
    }

    #[test]
    fn odd_sized_raw_image_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(&dir, "odd.img", &[0u8; 1000]);
        let msg = open_image(&p, true).err().expect("refused").to_string();
        assert!(msg.contains("1000 bytes") && msg.contains("512") && msg.contains("odd.img"), "{msg}");
    }

    #[test]
    fn writes_cannot_plant_the_overlay_magic() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(&dir, "a.img", &[0u8; 8192]);
        let mut img = open_image(&p, false).unwrap();
        for at in GUARDED_OFFSETS {
            let mut sector = [0u8; 512];
            sector[..8].copy_from_slice(&overlay::MAGIC);
            let err = img.write_at(&sector, at).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "at {at}");
            // Built up in two writes, the second completes the magic.
            img.write_at(&overlay::MAGIC[..4], at).unwrap();
            let mut rest = [0u8; 4];
            rest.copy_from_slice(&overlay::MAGIC[4..]);
            assert!(img.write_at(&rest, at + 4).is_err(), "at {at}");
        }
        // The magic elsewhere, or most of it, is plain data.
        img.write_at(&overlay::MAGIC, 512).unwrap();
        img.write_at(&overlay::MAGIC[..7], 0).unwrap();
        drop(img);
        assert_eq!(detect_format(&p).unwrap(), ImageFormat::Raw);
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let p = raw(&dir, "a.img", &[0u8; 512]);
        let a = open_image(&p, false).unwrap();
        let b = open_image(&p, true).unwrap();
        let err = open_locked(&p, false, Lock::Exclusive, 0).err().expect("in use");
        assert!(matches!(err, DiskError::InUse { .. }), "{err}");
        drop((a, b));
        let ex = open_locked(&p, false, Lock::Exclusive, 0).unwrap();
        assert!(matches!(open_image(&p, true), Err(DiskError::InUse { .. })));
        drop(ex);
    }
}
