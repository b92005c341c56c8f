//! Errors of the image builder. Each message names the thing that failed and,
//! where there is one, the command that fixes it.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("`{tool}` not found: run `apt-get install {package}`")]
    ToolMissing { tool: &'static str, package: &'static str },

    #[error("package `{package}` is unknown to apt (package lists missing or stale): run `apt-get update`")]
    PackageUnknown { package: String },

    #[error("`{package}` has no dependency of the form `{prefix}*` in `apt-cache depends` output: run `apt-get update`")]
    MetaUnresolved { package: String, prefix: String },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed { command: String, status: String, stderr: String },

    #[error("static link of the {program} failed; the static C library is needed: run `apt-get install libc6-dev` ({stderr})")]
    StaticLinkFailed { program: &'static str, stderr: String },

    #[error("compiling the {program} failed: {stderr}")]
    CompileFailed { program: &'static str, stderr: String },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("{path}: not a usable bzImage: {reason}")]
    BadBzImage { path: PathBuf, reason: String },

    #[error("{path}: unpacking the kernel payload ({format}) failed: {reason}")]
    Payload { path: PathBuf, format: &'static str, reason: String },

    #[error("kernel module `{name}` not found under {dir}")]
    ModuleMissing { name: String, dir: PathBuf },

    #[error("{path}: bad kernel module: {reason}")]
    BadModule { path: PathBuf, reason: String },

    #[error("{path}: {what} not found in the unpacked package")]
    MissingInPackage { path: PathBuf, what: String },

    #[error("no guest image built: run `dvisor image build`")]
    NoImage,

    #[error("{path}: bad manifest ({reason}): run `dvisor image build --force`")]
    BadManifest { path: PathBuf, reason: String },
}

impl ImageError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ImageError::Io { path: path.into(), source }
    }
}

/// Shorthand for attaching a path to an I/O error.
pub(crate) trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImageError>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, ImageError> {
        self.map_err(|e| ImageError::io(path, e))
    }
}
