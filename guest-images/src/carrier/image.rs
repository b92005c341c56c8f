//! The carrier's kernel and initramfs: Debian's *generic* kernel (it has 9p,
//! the cloud flavour does not), busybox, KVM + 9p + virtio-pci modules, and
//! the carrier /init. Cached under `<cache root>/carrier/`, content-keyed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apt::Package;
use crate::base;
use crate::cache::{self, Progress};
use crate::cpio::CpioWriter;
use crate::error::{ImageError, IoContext};
use crate::guest::BuildOptions;
use crate::{kernel_payload, modules};

pub const CARRIER_KERNEL_META: &str = "linux-image-amd64";
/// 2: boot the extracted vmlinux through its PVH entry.
pub const FORMAT_VERSION: u32 = 2;
const MANIFEST_FORMAT: &str = "dvisor-carrier-image";
pub const INIT_SCRIPT: &str = include_str!("../../init/carrier-init.sh");
/// Roots of the module set; dependencies (irqbypass, kvm, ccp, 9pnet, netfs,
/// fscache, virtio, virtio_ring, virtio_pci_*_dev) are added in load order.
/// `tun` (/dev/net/tun) lets commands create tap devices for the guest's
/// virtio-net; `veth` lets them wire network namespaces together.
/// `virtio_net` (+ `failover`, `net_failover`) drives the carrier's own NIC,
/// which exists only when ports are forwarded into it; the init loads those
/// three only then (`dvisor.net=` on its command line).
pub const MODULES: &[&str] = &["kvm_amd", "virtio_pci", "9pnet_virtio", "9p", "tun", "veth", "virtio_net"];

/// A built carrier image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierImage {
    pub dir: PathBuf,
    /// The uncompressed kernel ELF, booted via its PVH entry.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_release: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Manifest {
    format: String,
    version: u32,
    /// Hash of this crate's carrier recipe: an image built from another
    /// recipe is rebuilt on next use.
    recipe: String,
    key: String,
    kernel_package: Package,
    kernel_release: String,
    busybox_package: Package,
    kernel: String,
    initrd: String,
    kernel_sha256: String,
    initrd_sha256: String,
    modules: Vec<String>,
}

fn carrier_dir(root: &Path) -> PathBuf {
    root.join("carrier")
}

fn recipe_key() -> String {
    cache::content_key(&[&FORMAT_VERSION.to_le_bytes(), INIT_SCRIPT.as_bytes(), MODULES.join(",").as_bytes()])
}

/// The carrier image to use now: the last built one if it matches this
/// build's recipe (no apt access, works offline), else a fresh build.
pub fn carrier_image(quiet: bool) -> Result<CarrierImage, ImageError> {
    let root = cache::cache_root();
    if let Ok(dir) = std::fs::canonicalize(carrier_dir(&root).join("current")) {
        match load(&dir) {
            Ok((img, m)) if m.recipe == recipe_key() => return Ok(img),
            Ok(_) => tracing::info!("carrier image recipe changed; rebuilding"),
            Err(e) => tracing::info!("carrier image unusable ({e}); rebuilding"),
        }
    }
    build_carrier_image(&BuildOptions { force: false, quiet })
}

/// Resolves the current kernel/busybox versions and builds the carrier image
/// unless one with that content key exists (or `force`).
pub fn build_carrier_image(opts: &BuildOptions) -> Result<CarrierImage, ImageError> {
    let progress = Progress { quiet: opts.quiet, what: "carrier image" };
    let root = cache::cache_root();
    let inputs = base::resolve_inputs(CARRIER_KERNEL_META, progress)?;
    let recipe = recipe_key();
    let key = cache::content_key(&[recipe.as_bytes(), inputs.kernel.name.as_bytes(), inputs.kernel.version.as_bytes(), inputs.busybox.version.as_bytes()]);
    let name = format!("carrier-{}", &key[..16]);
    let dest = carrier_dir(&root).join(&name);
    let link = carrier_dir(&root).join("current");
    if !opts.force {
        if let Ok((img, _)) = load(&dest) {
            progress.step(format!("up to date: {}", dest.display()));
            cache::set_pointer(&link, &name)?;
            return Ok(img);
        }
    }
    let started = std::time::Instant::now();
    let staging = cache::staging_dir(&root)?;
    let out = staging.path().to_path_buf();
    let work_dir = cache::staging_dir(&root)?;
    let pkgs = base::fetch(&inputs, work_dir.path(), progress)?;
    let release = pkgs.kernel.release.clone();
    // QEMU boots the uncompressed ELF through its PVH entry note: that skips
    // the bzImage's XZ decompressor, which costs ~3 s under TCG.
    progress.step(format!("kernel {release}: extracting vmlinux"));
    let vmlinux = kernel_payload::extract_vmlinux(&pkgs.kernel.bzimage)?;
    std::fs::write(out.join("vmlinux"), vmlinux).at(out.join("vmlinux"))?;

    progress.step(format!("resolving modules {} for {release}", MODULES.join(", ")));
    let mods = modules::resolve(&pkgs.kernel.modules_dir, MODULES)?;
    progress.step(format!("writing initrd.cpio ({} modules)", mods.len()));
    let initrd = out.join("initrd.cpio");
    let file = std::fs::File::create(&initrd).at(&initrd)?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    let io = |e| ImageError::io(&initrd, e);
    base::add_busybox(&mut w, &pkgs.busybox)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes()).map_err(io)?;
    base::add_modules(&mut w, &release, &mods, "etc/dvisor-modules", &format!("{release}/"))?;
    w.finish().map_err(io)?;
    drop(work_dir);

    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: FORMAT_VERSION,
        recipe,
        key,
        kernel_package: inputs.kernel,
        kernel_release: release,
        busybox_package: inputs.busybox,
        kernel: "vmlinux".into(),
        initrd: "initrd.cpio".into(),
        kernel_sha256: cache::sha256_file(&out.join("vmlinux"))?,
        initrd_sha256: cache::sha256_file(&initrd)?,
        modules: mods.iter().map(|m| m.name.clone()).collect(),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::io("manifest.json", std::io::Error::other(e)))?;
    std::fs::write(out.join("manifest.json"), json).at(out.join("manifest.json"))?;
    cache::install_dir(staging, &dest)?;
    cache::set_pointer(&link, &name)?;
    progress.step(format!("built {} in {:.1}s", dest.display(), started.elapsed().as_secs_f64()));
    load(&dest).map(|(img, _)| img)
}

fn load(dir: &Path) -> Result<(CarrierImage, Manifest), ImageError> {
    let path = dir.join("manifest.json");
    let bytes = std::fs::read(&path).at(&path)?;
    let bad = |reason: String| ImageError::BadManifest { path: path.clone(), reason };
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if m.format != MANIFEST_FORMAT || m.version != FORMAT_VERSION {
        return Err(bad(format!("format {} v{}", m.format, m.version)));
    }
    let (kernel, initrd) = (dir.join(&m.kernel), dir.join(&m.initrd));
    if !kernel.is_file() || !initrd.is_file() {
        return Err(bad("kernel or initrd missing".into()));
    }
    Ok((CarrierImage { dir: dir.to_path_buf(), kernel, initrd, kernel_release: m.kernel_release.clone() }, m))
}
