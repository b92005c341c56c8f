//! The default guest kernel's `vmlinux` without the rest of the image, for
//! code that needs only the kernel ELF (the monitor's profile tests): the
//! current image's when one is built, else the kernel package alone is
//! fetched and its vmlinux cached under
//! `<root>/kernels/<package>_<version>/vmlinux`. No busybox, initramfs,
//! modules or disk.

use std::path::{Path, PathBuf};

use crate::cache::{self, Progress};
use crate::error::{ImageError, IoContext};
use crate::{base, guest, kernel_payload};

fn kernels_dir(root: &Path) -> PathBuf {
    root.join("kernels")
}

/// The vmlinux of the default guest kernel: the current image's if one is
/// built (no apt access), else that of the kernel package the image is
/// built from, fetched alone on first use and cached.
pub fn guest_vmlinux(quiet: bool) -> Result<PathBuf, ImageError> {
    if let Ok(img) = guest::current_guest_image() {
        return Ok(img.vmlinux);
    }
    kernel_vmlinux(guest::KERNEL_META, Progress { quiet, what: "kernel" })
}

/// The vmlinux of the kernel package `kernel_meta` resolves to now: on first
/// use the package is downloaded and unpacked in a temp dir, and the
/// extracted vmlinux is written to the cache (temp name + rename); later
/// calls reuse it.
fn kernel_vmlinux(kernel_meta: &str, progress: Progress) -> Result<PathBuf, ImageError> {
    let root = cache::cache_root();
    progress.step(format!("resolving {kernel_meta} with apt-cache"));
    let kernel = base::resolve_kernel(kernel_meta)?;
    let dir = kernels_dir(&root).join(format!("{}_{}", kernel.name, kernel.version));
    let path = dir.join(guest::F_VMLINUX);
    if path.is_file() {
        progress.step(format!("up to date: {}", path.display()));
        return Ok(path);
    }
    let work_dir = cache::staging_dir(&root)?;
    let tree = base::fetch_kernel(&kernel, work_dir.path(), progress)?;
    progress.step(format!("kernel {}: extracting vmlinux from the bzImage", tree.release));
    let vmlinux = kernel_payload::extract_vmlinux(&tree.bzimage)?;
    std::fs::create_dir_all(&dir).at(&dir)?;
    cache::write_atomic(&path, &vmlinux)?;
    progress.step(format!("cached {}", path.display()));
    Ok(path)
}
