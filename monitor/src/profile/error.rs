//! Errors of building or loading a kernel profile, each naming the file and
//! the fix.
use std::fmt;
use std::path::{Path, PathBuf};

/// The file an error is about; empty while the bytes came from memory (the
/// file-level callers fill it in with [`ProfileError::at`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Source(pub PathBuf);

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.as_os_str().is_empty() {
            f.write_str("the vmlinux image")
        } else {
            write!(f, "{}", self.0.display())
        }
    }
}

const REBUILD: &str = "(run `dvisor image build`)";

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("cannot read {path}: {source} {REBUILD}")]
    Read { path: Source, source: std::io::Error },
    #[error("{path} is not an x86-64 ELF64 vmlinux ({detail}): pass the vmlinux extracted from the bzImage, not the bzImage itself {REBUILD}")]
    NotElf { path: Source, detail: String },
    #[error("no kallsyms tables found in {path} ({detail}): is this an extracted vmlinux of a kernel built with CONFIG_KALLSYMS? {REBUILD}")]
    NoKallsyms { path: Source, detail: String },
    #[error("no usable .BTF section in {path} ({detail}): the kernel must be built with CONFIG_DEBUG_INFO_BTF {REBUILD}")]
    NoBtf { path: Source, detail: String },
    #[error("{path}: the kernel's BTF has no {what} ({detail}); the monitor does not support this kernel's layout")]
    MissingLayout { path: Source, what: String, detail: String },
    #[error("cannot write the kernel profile cache {path}: {source} (check the directory's permissions, or set DVISOR_CACHE_DIR to a writable place)")]
    WriteCache { path: Source, source: std::io::Error },
}

impl ProfileError {
    /// Names `path` as the file the error is about, unless one is named.
    pub fn at(mut self, file: &Path) -> Self {
        let slot = match &mut self {
            ProfileError::Read { path, .. }
            | ProfileError::NotElf { path, .. }
            | ProfileError::NoKallsyms { path, .. }
            | ProfileError::NoBtf { path, .. }
            | ProfileError::MissingLayout { path, .. }
            | ProfileError::WriteCache { path, .. } => path,
        };
        if slot.0.as_os_str().is_empty() {
            slot.0 = file.to_path_buf();
        }
        self
    }

    pub(crate) fn not_elf(detail: impl Into<String>) -> Self {
        ProfileError::NotElf { path: Source::default(), detail: detail.into() }
    }

    pub(crate) fn no_kallsyms(detail: impl Into<String>) -> Self {
        ProfileError::NoKallsyms { path: Source::default(), detail: detail.into() }
    }

    pub(crate) fn no_btf(detail: impl Into<String>) -> Self {
        ProfileError::NoBtf { path: Source::default(), detail: detail.into() }
    }

    pub(crate) fn missing(what: impl Into<String>, detail: impl Into<String>) -> Self {
        ProfileError::MissingLayout { path: Source::default(), what: what.into(), detail: detail.into() }
    }
}
