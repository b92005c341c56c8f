//! Steps shared by the guest image and the carrier image: resolving the
//! kernel and busybox packages, downloading and unpacking them, and putting
//! busybox, device nodes and modules into an initramfs.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::apt::{self, Package};
use crate::cache::Progress;
use crate::cpio::CpioWriter;
use crate::deb::{self, KernelTree};
use crate::error::{ImageError, IoContext};
use crate::modules::Module;

pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The package versions an image is built from (part of its content key).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub kernel: Package,
    pub busybox: Package,
}

/// Resolves `kernel_meta` (e.g. `linux-image-cloud-amd64`) and busybox.
pub fn resolve_inputs(kernel_meta: &str, progress: Progress) -> Result<Inputs, ImageError> {
    progress.step(format!("resolving {kernel_meta} and {BUSYBOX_PACKAGE} with apt-cache"));
    let kernel = resolve_kernel(kernel_meta)?;
    let busybox = apt::candidate(BUSYBOX_PACKAGE)?;
    progress.step(format!("kernel {} {}, busybox {}", kernel.name, kernel.version, busybox.version));
    Ok(Inputs { kernel, busybox })
}

/// The concrete kernel package (and version) `kernel_meta` stands for.
pub fn resolve_kernel(kernel_meta: &str) -> Result<Package, ImageError> {
    apt::resolve_meta(kernel_meta, "linux-image-")
}

/// Unpacked packages (they live in the caller's work dir).
pub struct Unpacked {
    pub kernel: KernelTree,
    pub busybox: PathBuf,
}

/// Downloads and unpacks both packages into `work`.
pub fn fetch(inputs: &Inputs, work: &Path, progress: Progress) -> Result<Unpacked, ImageError> {
    let kernel = fetch_kernel(&inputs.kernel, work, progress)?;
    let unpacked = fetch_package(&inputs.busybox, work, progress)?;
    let busybox = unpacked.join("bin/busybox");
    if !busybox.is_file() {
        return Err(ImageError::MissingInPackage { path: unpacked, what: "bin/busybox".into() });
    }
    Ok(Unpacked { kernel, busybox })
}

/// Downloads and unpacks the kernel package alone into `work`.
pub fn fetch_kernel(kernel: &Package, work: &Path, progress: Progress) -> Result<KernelTree, ImageError> {
    deb::kernel_tree(&fetch_package(kernel, work, progress)?)
}

/// Downloads `pkg` into `work/debs` and unpacks it into `work/<name>`.
fn fetch_package(pkg: &Package, work: &Path, progress: Progress) -> Result<PathBuf, ImageError> {
    let debs = work.join("debs");
    std::fs::create_dir_all(&debs).at(&debs)?;
    progress.step(format!("downloading {}={} (apt-get download)", pkg.name, pkg.version));
    let file = apt::download(pkg, &debs)?;
    let dest = work.join(&pkg.name);
    progress.step(format!("unpacking {}", file.file_name().unwrap_or_default().to_string_lossy()));
    deb::extract(&file, &dest)?;
    Ok(dest)
}

/// Adds the skeleton every initramfs needs: directories, `/dev/console`
/// (the kernel opens it for /init before devtmpfs is mounted), busybox and
/// its applet symlinks. Returns busybox's version banner.
pub fn add_busybox<W: Write>(cpio: &mut CpioWriter<W>, busybox: &Path) -> Result<String, ImageError> {
    let io = |e| ImageError::io("initrd.cpio", e);
    for d in ["proc", "sys", "dev", "run", "tmp", "root", "etc", "sbin", "usr/bin", "usr/sbin"] {
        cpio.dir(d, 0o755).map_err(io)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1).map_err(io)?;
    let bin = std::fs::read(busybox).at(busybox)?;
    cpio.file("bin/busybox", 0o755, &bin).map_err(io)?;
    // Applet links at build time (busybox-static runs on any x86-64 host),
    // so /init needs no `busybox --install` step.
    let out = std::process::Command::new(busybox).arg("--list-full").output().at(busybox)?;
    let list = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    for applet in list.lines().map(str::trim).filter(|l| !l.is_empty() && *l != "bin/busybox") {
        cpio.symlink(applet, "/bin/busybox").map_err(io)?;
        n += 1;
    }
    if n == 0 {
        return Err(ImageError::MissingInPackage { path: busybox.to_path_buf(), what: "busybox applet list (--list-full)".into() });
    }
    let banner = std::process::Command::new(busybox).output().at(busybox)?;
    let banner = String::from_utf8_lossy(&banner.stdout).lines().next().unwrap_or("BusyBox").to_string();
    Ok(banner)
}

/// Adds `modules` under `lib/modules/<release>/` plus a load-order list at
/// `list_path` with one `name rel_path` line per module, dependencies first;
/// `rel_prefix` is prepended to each listed path.
pub fn add_modules<W: Write>(
    cpio: &mut CpioWriter<W>,
    release: &str,
    modules: &[Module],
    list_path: &str,
    rel_prefix: &str,
) -> Result<(), ImageError> {
    add_module_files(cpio, release, modules)?;
    add_module_list(cpio, modules, list_path, rel_prefix)
}

/// Adds the module objects under `lib/modules/<release>/` (no list).
pub fn add_module_files<W: Write>(cpio: &mut CpioWriter<W>, release: &str, modules: &[Module]) -> Result<(), ImageError> {
    for m in modules {
        cpio.file(&format!("lib/modules/{release}/{}", m.rel_path), 0o644, &m.data).map_err(|e| ImageError::io("initrd.cpio", e))?;
    }
    Ok(())
}

/// Adds a load-order list at `list_path`: one `name rel_prefix+rel_path`
/// line per module, in the given order (dependencies first).
pub fn add_module_list<W: Write>(cpio: &mut CpioWriter<W>, modules: &[Module], list_path: &str, rel_prefix: &str) -> Result<(), ImageError> {
    let list: String = modules.iter().map(|m| format!("{} {rel_prefix}{}\n", m.name, m.rel_path)).collect();
    cpio.file(list_path, 0o644, list.as_bytes()).map_err(|e| ImageError::io("initrd.cpio", e))
}
