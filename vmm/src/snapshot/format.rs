//! The snapshot directory on disk (docs/snapshots.md has the byte layout):
//!
//! - `state.bin`: a header (magic, format version, the dvisor version that
//!   wrote it, body length, CRC-64 over everything but the CRC field)
//!   followed by the postcard-encoded [`SnapshotState`];
//! - `memory.raw`: guest memory at guest-physical offsets, sparse;
//! - `manifest.json`: what a person or `jq` wants to know, its CRC-64 kept
//!   in the state so an edited manifest is caught.
//!
//! Writes go to a hidden temporary directory beside the target, which is
//! renamed into place only when every file is complete and synced: a
//! crash or a full disk leaves no directory that looks like a snapshot.
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::memory::{PageSet, RamRange, PAGE_SIZE};
use super::{SnapshotError, SnapshotState};

pub const STATE_FILE: &str = "state.bin";
pub const MEMORY_FILE: &str = "memory.raw";
pub const MANIFEST_FILE: &str = "manifest.json";

pub const MAGIC: [u8; 8] = *b"DVSNAPv\0";
/// Bumped whenever `SnapshotState` changes shape; restore refuses others.
/// 2: the PCI host's CONFIG_ADDRESS latch (`devices::pci_host`).
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 8 + 32;
/// A state file larger than this is not ours (a few vCPUs take ~20 KiB).
const MAX_BODY: u64 = 64 << 20;

pub const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// The dvisor version that writes snapshots.
pub fn writer_version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// Human-readable summary (`manifest.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub dvisor_version: String,
    pub id: String,
    pub vm_name: String,
    pub created_unix: u64,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub mem_mib: u64,
    pub disks: Vec<ManifestDisk>,
    pub nets: Vec<String>,
    /// Incremental snapshots name their parent.
    pub parent: Option<ParentRef>,
    pub kind: SnapshotKind,
    /// Pages this snapshot's memory file holds; bytes of data in it.
    pub memory_pages: u64,
    pub memory_bytes: u64,
    /// Whether the VM was paused when the snapshot was taken.
    pub was_paused: bool,
    pub pause_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestDisk {
    pub path: PathBuf,
    pub read_only: bool,
    pub size: u64,
    pub identity: String,
}

/// Also on the wire (a snapshot's report), so the support API defines it.
pub use dvisor_api::protocol::SnapshotKind;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    pub id: String,
    /// As given when the snapshot was taken (absolute).
    pub dir: PathBuf,
}

/// Encodes the state file.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, SnapshotError> {
    let body = postcard::to_allocvec(state).map_err(|e| SnapshotError::Invalid(format!("encoding the state: {e}")))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes()); // flags, none yet
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes()); // CRC, filled below
    let mut ver = [0u8; 32];
    let v = writer_version().as_bytes();
    ver[..v.len().min(32)].copy_from_slice(&v[..v.len().min(32)]);
    out.extend_from_slice(&ver);
    out.extend_from_slice(&body);
    let crc = crc_without_field(&out);
    out[24..32].copy_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn crc_without_field(bytes: &[u8]) -> u64 {
    let mut d = CRC.digest();
    d.update(&bytes[..24]);
    d.update(&bytes[32..]);
    d.finalize()
}

/// What the header says, before the body is trusted.
#[derive(Clone, Debug)]
pub struct Header {
    pub version: u32,
    pub writer: String,
    pub body_len: u64,
}

/// Decodes and checks a state file: magic, version, length, checksum, then
/// the body. Every failure names what is wrong.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<(Header, SnapshotState), SnapshotError> {
    let bad = |what: String| SnapshotError::Corrupt { path: path.to_owned(), what };
    if bytes.len() < HEADER_LEN {
        return Err(bad(format!("{} bytes, shorter than the {HEADER_LEN}-byte header (truncated)", bytes.len())));
    }
    if bytes[..8] != MAGIC {
        return Err(bad(format!("wrong magic {:02x?}: not a dvisor snapshot state file", &bytes[..8])));
    }
    let u32_at = |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    let writer = String::from_utf8_lossy(&bytes[32..64]).trim_end_matches('\0').to_string();
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version { path: path.to_owned(), found: version, writer, supported: FORMAT_VERSION });
    }
    let body_len = u64_at(16);
    if body_len > MAX_BODY || HEADER_LEN as u64 + body_len != bytes.len() as u64 {
        return Err(bad(format!(
            "the header says {body_len} bytes of state, the file has {} (truncated or padded)",
            bytes.len() - HEADER_LEN
        )));
    }
    let stored = u64_at(24);
    let actual = crc_without_field(bytes);
    if stored != actual {
        return Err(bad(format!("checksum mismatch (stored {stored:016x}, computed {actual:016x}): the file was changed or damaged")));
    }
    let state: SnapshotState = postcard::from_bytes(&bytes[HEADER_LEN..])
        .map_err(|e| bad(format!("state does not decode ({e}) although its checksum matches: written by an incompatible build")))?;
    Ok((Header { version, writer, body_len }, state))
}

/// Reads a snapshot directory's state and manifest and checks them
/// against each other and the memory file's size. Does not read memory.
pub struct Loaded {
    pub dir: PathBuf,
    pub header: Header,
    pub state: SnapshotState,
    pub manifest: Manifest,
}

pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let meta = fs::metadata(dir).map_err(|e| SnapshotError::Io(format!("opening snapshot {}", dir.display()), e))?;
    if !meta.is_dir() {
        return Err(SnapshotError::NotASnapshot(dir.to_owned(), "not a directory".into()));
    }
    let state_path = dir.join(STATE_FILE);
    let bytes = fs::read(&state_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SnapshotError::NotASnapshot(dir.to_owned(), format!("it has no {STATE_FILE}"))
        } else {
            SnapshotError::Io(format!("reading {}", state_path.display()), e)
        }
    })?;
    let (header, state) = decode_state(&state_path, &bytes)?;
    let manifest_path = dir.join(MANIFEST_FILE);
    let mbytes = fs::read(&manifest_path).map_err(|e| SnapshotError::Io(format!("reading {}", manifest_path.display()), e))?;
    if CRC.checksum(&mbytes) != state.manifest_crc {
        return Err(SnapshotError::Corrupt {
            path: manifest_path,
            what: "checksum mismatch with the one kept in state.bin: the manifest was edited or damaged".into(),
        });
    }
    let manifest: Manifest = serde_json::from_slice(&mbytes)
        .map_err(|e| SnapshotError::Corrupt { path: manifest_path.clone(), what: format!("not a manifest: {e}") })?;
    state.check()?;
    let mem_path = dir.join(MEMORY_FILE);
    let mem_len = fs::metadata(&mem_path).map_err(|e| SnapshotError::Io(format!("opening {}", mem_path.display()), e))?.len();
    let want = state.memory_file_len();
    if mem_len != want {
        return Err(SnapshotError::Corrupt {
            path: mem_path,
            what: format!("{mem_len} bytes, expected {want} (truncated or extended)"),
        });
    }
    Ok(Loaded { dir: dir.to_owned(), header, state, manifest })
}

/// A snapshot being written: a hidden directory beside the target.
pub struct Staging {
    pub tmp: PathBuf,
    pub target: PathBuf,
    done: bool,
}

impl Staging {
    /// Refuses an existing target (a snapshot is never overwritten).
    pub fn new(target: &Path) -> Result<Staging, SnapshotError> {
        let target = std::path::absolute(target).map_err(|e| SnapshotError::Io(format!("resolving {}", target.display()), e))?;
        if fs::symlink_metadata(&target).is_ok() {
            return Err(SnapshotError::Exists(target));
        }
        let parent = target.parent().ok_or_else(|| SnapshotError::NotASnapshot(target.clone(), "no parent directory".into()))?;
        fs::create_dir_all(parent).map_err(|e| SnapshotError::Io(format!("creating {}", parent.display()), e))?;
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(|e| SnapshotError::Io(format!("creating {}", tmp.display()), e))?;
        Ok(Staging { tmp, target, done: false })
    }

    /// The memory file, created with the guest's physical size (sparse).
    pub fn memory_file(&self, len: u64) -> Result<File, SnapshotError> {
        let p = self.tmp.join(MEMORY_FILE);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| SnapshotError::Io(format!("creating {}", p.display()), e))?;
        f.set_len(len).map_err(|e| SnapshotError::Io(format!("sizing {}", p.display()), e))?;
        Ok(f)
    }

    /// Writes the manifest and the state (in that order: the state holds
    /// the manifest's checksum), syncs everything and renames into place.
    pub fn commit(mut self, mut state: SnapshotState, manifest: &Manifest) -> Result<PathBuf, SnapshotError> {
        let mut mbytes = serde_json::to_vec_pretty(manifest).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
        mbytes.push(b'\n');
        state.manifest_crc = CRC.checksum(&mbytes);
        write_synced(&self.tmp.join(MANIFEST_FILE), &mbytes)?;
        write_synced(&self.tmp.join(STATE_FILE), &encode_state(&state)?)?;
        let mem = self.tmp.join(MEMORY_FILE);
        File::open(&mem)
            .and_then(|f| f.sync_all())
            .map_err(|e| SnapshotError::Io(format!("syncing {}", mem.display()), e))?;
        sync_dir(&self.tmp)?;
        if fs::symlink_metadata(&self.target).is_ok() {
            return Err(SnapshotError::Exists(self.target.clone()));
        }
        fs::rename(&self.tmp, &self.target)
            .map_err(|e| SnapshotError::Io(format!("renaming {} to {}", self.tmp.display(), self.target.display()), e))?;
        if let Some(parent) = self.target.parent() {
            sync_dir(parent)?;
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), SnapshotError> {
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| SnapshotError::Io(format!("creating {}", path.display()), e))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| SnapshotError::Io(format!("writing {}", path.display()), e))
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| SnapshotError::Io(format!("syncing {}", dir.display()), e))
}

/// A fresh random id (16 bytes, hex) for a snapshot.
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Unique enough without the kernel's RNG: time and pid.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        b[..16].copy_from_slice(&(t ^ u128::from(std::process::id())).to_le_bytes());
    }
    hex::encode(b)
}

/// The layer chain of a snapshot, newest last: follows `parent` links and
/// checks each parent's id.
pub fn chain(dir: &Path) -> Result<Vec<Loaded>, SnapshotError> {
    let mut out = vec![load(dir)?];
    while let Some(parent) = out.last().and_then(|l| l.state.parent.clone()) {
        if out.len() > 64 {
            return Err(SnapshotError::Invalid("a snapshot chain longer than 64: merge it (dvisor snapshot merge)".into()));
        }
        let child_dir = out.last().map(|l| l.dir.clone()).unwrap_or_default();
        let p = load(&parent.dir).map_err(|e| SnapshotError::Parent { child: child_dir.clone(), error: Box::new(e) })?;
        if p.state.id != parent.id {
            return Err(SnapshotError::Parent {
                child: child_dir,
                error: Box::new(SnapshotError::Invalid(format!(
                    "{} has id {}, but this snapshot was taken over id {}",
                    parent.dir.display(),
                    p.state.id,
                    parent.id
                ))),
            });
        }
        out.push(p);
    }
    out.reverse();
    Ok(out)
}

impl SnapshotState {
    pub fn memory_file_len(&self) -> u64 {
        self.memory.ranges.iter().map(|r| r.gpa + r.size).max().unwrap_or(0)
    }
}

/// Memory layout and which pages the memory file holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemoryState {
    pub ranges: Vec<RamRange>,
    /// `None`: every page (a full snapshot). Otherwise the pages written
    /// in this (incremental) layer; the rest come from the parent.
    pub pages: Option<PageSet>,
}

impl MemoryState {
    pub fn check(&self) -> Result<(), SnapshotError> {
        if self.ranges.is_empty() || self.ranges.len() > 8 {
            return Err(SnapshotError::Invalid(format!("{} RAM ranges", self.ranges.len())));
        }
        for r in &self.ranges {
            if r.gpa % PAGE_SIZE != 0 || r.size % PAGE_SIZE != 0 || r.size == 0 || r.gpa.checked_add(r.size).is_none() {
                return Err(SnapshotError::Invalid(format!("RAM range {:#x}+{:#x} is not page-aligned", r.gpa, r.size)));
            }
        }
        if let Some(p) = &self.pages {
            let end = self.ranges.iter().map(|r| r.gpa + r.size).max().unwrap_or(0);
            if (p.words.len() as u64) > (end / PAGE_SIZE).div_ceil(64) {
                return Err(SnapshotError::Invalid("page bitmap longer than guest memory".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_covers_header_and_body() {
        let mut bytes = vec![0u8; HEADER_LEN + 10];
        bytes[..8].copy_from_slice(&MAGIC);
        let a = crc_without_field(&bytes);
        bytes[24] = 7; // the CRC field itself is not covered
        assert_eq!(a, crc_without_field(&bytes));
        bytes[HEADER_LEN + 3] = 1;
        assert_ne!(a, crc_without_field(&bytes));
    }
}
