//! The profile cache: `kernel-profile.json` beside the vmlinux, else (an
//! image directory that is not writable) `<cache root>/profiles/<key>.json`.
//! The cache root is the caller's (the CLI passes the one its guest images
//! live under): the monitor does not decide where caches live.
//!
//! A cache entry is used only if its format and version match and it was
//! made from this very file: the file's stamp (size, mtime, inode, device)
//! equal to the one recorded lets the load skip hashing the vmlinux; any
//! other stamp means the vmlinux is hashed again and the entry is used only
//! if its recorded SHA-256 matches. A stale, foreign or corrupt entry is
//! rebuilt and overwritten, never trusted.
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::{ProfileError, Source};
use super::{bytes, release, KernelProfile, FORMAT_VERSION};

const CACHE_FORMAT: &str = "dvisor-kernel-profile";

/// What identifies one version of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Stamp {
    len: u64,
    mtime_sec: i64,
    mtime_nsec: i64,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Stamp { len: meta.len(), mtime_sec: meta.mtime(), mtime_nsec: meta.mtime_nsec(), ino: meta.ino(), dev: meta.dev() }
    }
}

#[derive(Serialize, Deserialize)]
struct CacheFile {
    format: String,
    vmlinux: PathBuf,
    stamp: Stamp,
    profile: KernelProfile,
}

/// `kernel-profile.json` beside a file named `vmlinux`; for another name,
/// `<name>.kernel-profile.json`.
pub fn cache_file_beside(vmlinux: &Path) -> PathBuf {
    let name = vmlinux.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let file = if name == "vmlinux" || name.is_empty() { "kernel-profile.json".to_string() } else { format!("{name}.kernel-profile.json") };
    vmlinux.with_file_name(file)
}

/// `<cache root>/profiles/<hash of the vmlinux's absolute path>.json`.
pub fn fallback_cache_file(vmlinux: &Path, cache_root: &Path) -> PathBuf {
    let abs = std::fs::canonicalize(vmlinux).unwrap_or_else(|_| vmlinux.to_path_buf());
    let key = bytes::hex(&Sha256::digest(abs.as_os_str().as_encoded_bytes()));
    cache_root.join("profiles").join(format!("{}.json", &key[..32]))
}


pub fn load_or_build(vmlinux: &Path, cache_root: &Path) -> Result<KernelProfile, ProfileError> {
    load_or_build_at(vmlinux, &[cache_file_beside(vmlinux), fallback_cache_file(vmlinux, cache_root)])
}

/// [`load_or_build`] with the cache places given, first choice first.
pub(super) fn load_or_build_at(vmlinux: &Path, places: &[PathBuf]) -> Result<KernelProfile, ProfileError> {
    let read_err = |e| ProfileError::Read { path: Source(vmlinux.to_path_buf()), source: e };
    let stamp = Stamp::of(&std::fs::metadata(vmlinux).map_err(read_err)?);
    let mut stale = Vec::new();
    for place in places {
        match read_entry(place) {
            Some(entry) if entry.stamp == stamp => return Ok(entry.profile),
            Some(entry) => stale.push(entry),
            None => {}
        }
    }
    let data = std::fs::read(vmlinux).map_err(read_err)?;
    let built = if stale.is_empty() {
        KernelProfile::from_bytes(&data)
    } else {
        let sha = bytes::hex(&Sha256::digest(&data));
        if let Some(mut entry) = stale.into_iter().find(|e| e.profile.vmlinux_sha256 == sha) {
            // Same content, new stamp (copied or touched): record the new stamp.
            entry.stamp = stamp;
            let _ = store(places, &entry);
            return Ok(entry.profile);
        }
        KernelProfile::parse(&data, sha)
    };
    let mut profile = built.map_err(|e| e.at(vmlinux))?;
    if profile.kernel_release == "unknown" {
        if let Some(r) = release::from_manifest(vmlinux) {
            profile.kernel_release = r;
        }
    }
    let entry = CacheFile { format: CACHE_FORMAT.to_string(), vmlinux: vmlinux.to_path_buf(), stamp, profile };
    if let Err(e) = store(places, &entry) {
        tracing::warn!("kernel profile not cached: {e}");
    }
    Ok(entry.profile)
}

/// A cache entry of the current format, or `None` (missing, corrupt, other
/// format: all rebuilt).
fn read_entry(path: &Path) -> Option<CacheFile> {
    let text = std::fs::read(path).ok()?;
    match serde_json::from_slice::<CacheFile>(&text) {
        Ok(e) if e.format == CACHE_FORMAT && e.profile.format_version == FORMAT_VERSION => Some(e),
        Ok(_) => {
            tracing::debug!("{}: kernel profile cache of another format; rebuilding", path.display());
            None
        }
        Err(err) => {
            tracing::warn!("{}: corrupt kernel profile cache ({err}); rebuilding", path.display());
            None
        }
    }
}

/// Writes the entry to the first place that takes it (atomically: a temp
/// file renamed into place).
fn store(places: &[PathBuf], entry: &CacheFile) -> Result<PathBuf, ProfileError> {
    let json = serde_json::to_vec(entry).map_err(|e| ProfileError::WriteCache {
        path: Source(places.first().cloned().unwrap_or_default()),
        source: std::io::Error::other(e),
    })?;
    let mut last = None;
    for place in places {
        match write_atomic(place, &json) {
            Ok(()) => return Ok(place.clone()),
            Err(e) => last = Some(ProfileError::WriteCache { path: Source(place.clone()), source: e }),
        }
    }
    Err(last.unwrap_or_else(|| ProfileError::WriteCache {
        path: Source::default(),
        source: std::io::Error::other("no cache location"),
    }))
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let res = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
