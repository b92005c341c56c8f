//! The on-disk cache: where images live, content keys, atomic installs, the
//! pointers to the last built images, and progress lines.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{ImageError, IoContext};

/// `$DVISOR_CACHE_DIR`, else `$XDG_CACHE_HOME/dvisor`, else `~/.cache/dvisor`.
pub fn cache_root() -> PathBuf {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = env("DVISOR_CACHE_DIR") {
        return dir;
    }
    if let Some(dir) = env("XDG_CACHE_HOME") {
        return dir.join("dvisor");
    }
    env("HOME").unwrap_or_else(|| PathBuf::from("/root")).join(".cache").join("dvisor")
}

/// Hex SHA-256 over length-prefixed parts (so `["ab","c"]` != `["a","bc"]`).
pub fn content_key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

pub fn sha256_file(path: &Path) -> Result<String, ImageError> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}


/// A fresh private directory under `<root>/tmp`, on the same filesystem as
/// the final place so the install is one rename.
pub fn staging_dir(root: &Path) -> Result<tempfile::TempDir, ImageError> {
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    tempfile::Builder::new().prefix("build-").tempdir_in(&tmp).at(&tmp)
}

/// Renames `staged` to `dest`, replacing an older `dest` if present.
pub fn install_dir(staged: tempfile::TempDir, dest: &Path) -> Result<(), ImageError> {
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).at(parent)?;
    }
    let staged = staged.keep();
    // tempfile makes 0700 dirs; images are meant to be readable.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).at(&staged)?;
    if dest.exists() {
        // rename(2) cannot replace a non-empty directory: move the old one
        // aside first, then drop it.
        let old = dest.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(dest, &old).at(dest)?;
        let _ = std::fs::remove_dir_all(&old);
    }
    std::fs::rename(&staged, dest).at(dest)
}

/// Points `link` (a symlink) at `target` atomically (symlink + rename).
pub fn set_pointer(link: &Path, target: &str) -> Result<(), ImageError> {
    let tmp = link.with_extension(format!("tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp).at(&tmp)?;
    std::fs::rename(&tmp, link).at(link)
}

/// Writes `data` to `path` through a temp file + rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data).at(&tmp)?;
    std::fs::rename(&tmp, path).at(path)
}

/// Progress lines on stderr (the builds take tens of seconds).
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    pub quiet: bool,
    pub what: &'static str,
}

impl Progress {
    pub fn step(&self, msg: impl std::fmt::Display) {
        tracing::info!(what = self.what, "{msg}");
        if !self.quiet {
            eprintln!("dvisor {}: {msg}", self.what);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_length_prefixed() {
        assert_ne!(content_key(&[b"ab", b"c"]), content_key(&[b"a", b"bc"]));
        assert_eq!(content_key(&[b"x"]).len(), 64);
    }

    #[test]
    fn install_replaces() {
        let root = tempfile::tempdir().unwrap();
        let dest = root.path().join("images").join("guest-1");
        for content in ["one", "two"] {
            let st = staging_dir(root.path()).unwrap();
            std::fs::write(st.path().join("f"), content).unwrap();
            install_dir(st, &dest).unwrap();
            assert_eq!(std::fs::read_to_string(dest.join("f")).unwrap(), content);
        }
        let link = root.path().join("images").join("current");
        set_pointer(&link, "guest-1").unwrap();
        set_pointer(&link, "guest-1").unwrap();
        assert_eq!(std::fs::read_to_string(link.join("f")).unwrap(), "two");
    }
}
