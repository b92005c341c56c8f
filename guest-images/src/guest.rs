//! The default guest image: Debian cloud kernel (bzImage + extracted
//! vmlinux), a busybox initramfs with /init, the demo service and the
//! `evread` key reader, `vmgenid-watch`, the virtio modules (loaded when the VMM describes a
//! virtio-mmio device) and evdev (always loaded), and an empty data disk.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::apt::Package;
use crate::base;
use crate::cache::{self, Progress};
use crate::cpio::{self, CpioWriter};
use crate::error::{ImageError, IoContext};
use crate::{kernel_payload, modules, service};

/// Bump when the image layout or build steps change: it is in the content key.
/// 2: evdev + dvisor-boot-modules, /usr/bin/evread, /sbin/load-modules.
/// 3: /usr/bin/spin-demo (static-pie), `programs`, sample patches.
/// 4: programs built with `-flive-patching=inline-clone`; `callback` calls a
///    function of its own.
/// 5: /usr/bin/vmgenid-watch, started by /init.
/// 6: the demo service beats once a second unless `dvisor.beat=MS`.
pub const FORMAT_VERSION: u32 = 6;
pub const MANIFEST_FORMAT: &str = "dvisor-guest-image";
pub const KERNEL_META: &str = "linux-image-cloud-amd64";
/// The default image's kernel command line: COM1 as console; quiet
/// because every console byte is a VM exit. Not `pci=off`: that forbids
/// the probe for PCI configuration access, and the kernel then prints
/// `PCI: Fatal: No config space access function found`; D-Visor answers
/// the probe instead (`vmm/src/devices/pci_host.rs`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet";
/// Appended to the command line by tests and benchmarks: the demo service
/// beats every 100 ms instead of once a second, so waits for the next beat
/// stay short (a person at the console wants the slow default).
pub const FAST_BEAT: &str = "dvisor.beat=100";

/// The default command line with [`FAST_BEAT`]: what benchmarks boot
/// (both sides of a comparison), so a time to a heartbeat holds at most
/// 100 ms of waiting for the next beat.
pub fn fast_beat_cmdline() -> String {
    format!("{DEFAULT_CMDLINE} {FAST_BEAT}")
}
pub const DISK_SIZE: u64 = 64 << 20;
/// Shipped (not loaded at boot) for the virtio-mmio devices of later issues.
pub const VIRTIO_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net"];
/// Loaded by /init on every boot (list `dvisor-boot-modules`): evdev gives
/// the PS/2 keyboard its /dev/input/event0.
pub const BOOT_MODULES: &[&str] = &["evdev"];
/// Load-order lists under `/lib/modules/<release>/`.
pub const VIRTIO_LIST: &str = "dvisor-load-order";
pub const BOOT_LIST: &str = "dvisor-boot-modules";

pub const INIT_SCRIPT: &str = include_str!("../init/guest-init.sh");
pub const LOADER_SCRIPT: &str = include_str!("../init/load-virtio-modules.sh");

const F_KERNEL: &str = "bzImage";
pub(crate) const F_VMLINUX: &str = "vmlinux";
const F_INITRD: &str = "initrd.cpio";
const F_DISK: &str = "disk.raw";
const F_SERVICE: &str = "demo-service";
const F_SPIN: &str = "spin-demo";
const D_PATCHES: &str = "patches";
const F_MANIFEST: &str = "manifest.json";

/// A built guest image, as the VMM and the monitor use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestImage {
    pub dir: PathBuf,
    /// The bzImage.
    pub kernel: PathBuf,
    /// The uncompressed kernel ELF (BTF, kallsyms, PVH entry note).
    pub vmlinux: PathBuf,
    pub initrd: PathBuf,
    pub disk: PathBuf,
    /// Host copy of the demo service ELF (with symbols) that runs in the guest.
    pub service_binary: PathBuf,
    /// Host copies of the image's own programs, by their path in the guest
    /// (what the patcher resolves a process's executable to).
    pub programs: BTreeMap<String, PathBuf>,
    /// The sample patches of the demo service: `<name>.o`, `<name>.cmd`
    /// and the C source.
    pub patches_dir: PathBuf,
    pub kernel_release: String,
}

impl GuestImage {
    /// The host copy of the program at `guest_path` in the guest, if the
    /// image built it.
    pub fn program(&self, guest_path: &str) -> Option<&Path> {
        self.programs.get(guest_path).map(PathBuf::as_path)
    }
}

#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Rebuild even when an image with the same content key exists.
    pub force: bool,
    /// No progress lines on stderr.
    pub quiet: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// `manifest.json` of a guest image.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub key: String,
    pub kernel_package: Package,
    pub kernel_release: String,
    pub kernel_compression: String,
    pub busybox_package: Package,
    pub busybox_banner: String,
    /// Role → file in the image dir: kernel, vmlinux, initrd, disk, service_binary.
    pub files: BTreeMap<String, FileEntry>,
    /// Path of the demo service inside the guest.
    pub service_guest_path: String,
    /// Path in the guest → file in the image dir, for every program the
    /// image built (with symbols, for the patcher).
    pub programs: BTreeMap<String, String>,
    /// Sample patch names: `patches/<name>.o` with `patches/<name>.cmd`.
    pub sample_patches: Vec<String>,
    pub default_cmdline: String,
    /// Modules shipped under /lib/modules/<release>/: the virtio set in load
    /// order, then the boot modules not already in it.
    pub modules: Vec<String>,
    /// Modules /init loads on every boot, in load order (`dvisor-boot-modules`).
    #[serde(default)]
    pub boot_modules: Vec<String>,
    pub built_unix_time: u64,
}

fn images_dir(root: &Path) -> PathBuf {
    root.join("images")
}

fn current_link(root: &Path) -> PathBuf {
    images_dir(root).join("current")
}

/// Hash of everything in this crate that shapes the image.
fn recipe_key() -> String {
    cache::content_key(&[
        &FORMAT_VERSION.to_le_bytes(),
        service::SOURCE.as_bytes(),
        service::GCC_FLAGS.join(" ").as_bytes(),
        service::EVREAD_SOURCE.as_bytes(),
        service::EVREAD_GCC_FLAGS.join(" ").as_bytes(),
        service::SPIN_SOURCE.as_bytes(),
        service::SPIN_GCC_FLAGS.join(" ").as_bytes(),
        service::VMGENID_WATCH_SOURCE.as_bytes(),
        service::VMGENID_WATCH_GCC_FLAGS.join(" ").as_bytes(),
        service::PATCH_GCC_FLAGS.join(" ").as_bytes(),
        &service::SAMPLE_PATCHES.iter().flat_map(|p| [p.name, p.source, p.commands]).collect::<String>().into_bytes(),
        INIT_SCRIPT.as_bytes(),
        LOADER_SCRIPT.as_bytes(),
        VIRTIO_MODULES.join(",").as_bytes(),
        BOOT_MODULES.join(",").as_bytes(),
    ])
}

/// Builds (or reuses) the default guest image and makes it `current`.
pub fn build_guest_image(opts: &BuildOptions) -> Result<GuestImage, ImageError> {
    let progress = Progress { quiet: opts.quiet, what: "image" };
    let root = cache::cache_root();
    let inputs = base::resolve_inputs(KERNEL_META, progress)?;
    let recipe = recipe_key();
    let key = cache::content_key(&[
        recipe.as_bytes(),
        inputs.kernel.name.as_bytes(),
        inputs.kernel.version.as_bytes(),
        inputs.busybox.version.as_bytes(),
    ]);
    let name = format!("guest-{}", &key[..16]);
    let dest = images_dir(&root).join(&name);
    if !opts.force {
        if let Ok(img) = load(&dest) {
            progress.step(format!("up to date: {}", dest.display()));
            cache::set_pointer(&current_link(&root), &name)?;
            return Ok(img);
        }
    }
    let started = std::time::Instant::now();
    // The image is written straight into `staging` (renamed into place at
    // the end); downloads and unpacked packages go to a separate temp dir.
    let staging = cache::staging_dir(&root)?;
    let out = staging.path().to_path_buf();
    let work_dir = cache::staging_dir(&root)?;
    let work = work_dir.path().to_path_buf();
    let pkgs = base::fetch(&inputs, &work, progress)?;

    progress.step(format!("kernel {}: extracting vmlinux from the bzImage", pkgs.kernel.release));
    std::fs::copy(&pkgs.kernel.bzimage, out.join(F_KERNEL)).at(&pkgs.kernel.bzimage)?;
    let image_bytes = std::fs::read(&pkgs.kernel.bzimage).at(&pkgs.kernel.bzimage)?;
    let compression = kernel_payload::locate_payload(&image_bytes)
        .ok()
        .and_then(|l| kernel_payload::detect(&image_bytes[l.offset..]))
        .map(|c| c.name())
        .unwrap_or("unknown");
    let vmlinux = kernel_payload::extract_vmlinux(&pkgs.kernel.bzimage)?;
    std::fs::write(out.join(F_VMLINUX), &vmlinux).at(out.join(F_VMLINUX))?;
    drop((image_bytes, vmlinux));

    progress.step("compiling the demo service, evread, spin-demo and vmgenid-watch (gcc -static), and the sample patches");
    service::compile(&work, &out.join(F_SERVICE))?;
    let evread_bin = work.join("evread");
    service::compile_evread(&work, &evread_bin)?;
    service::compile_spin(&work, &out.join(F_SPIN))?;
    let watch_bin = work.join("vmgenid-watch");
    service::compile_vmgenid_watch(&work, &watch_bin)?;
    let patches = out.join(D_PATCHES);
    std::fs::create_dir_all(&patches).at(&patches)?;
    for sample in service::SAMPLE_PATCHES {
        service::compile_sample(&work, sample, &patches)?;
    }

    progress.step(format!("resolving modules {}, {}", VIRTIO_MODULES.join(", "), BOOT_MODULES.join(", ")));
    let mods = modules::resolve(&pkgs.kernel.modules_dir, VIRTIO_MODULES)?;
    let boot_mods = modules::resolve(&pkgs.kernel.modules_dir, BOOT_MODULES)?;

    progress.step("writing initrd.cpio");
    let initrd_path = out.join(F_INITRD);
    let file = std::fs::File::create(&initrd_path).at(&initrd_path)?;
    let mut w = CpioWriter::new(std::io::BufWriter::new(file));
    let io = |e| ImageError::io(&initrd_path, e);
    let banner = base::add_busybox(&mut w, &pkgs.busybox)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes()).map_err(io)?;
    w.file("sbin/load-modules", 0o755, LOADER_SCRIPT.as_bytes()).map_err(io)?;
    w.symlink("sbin/load-virtio-modules", "load-modules").map_err(io)?;
    let svc = std::fs::read(out.join(F_SERVICE)).at(out.join(F_SERVICE))?;
    w.file(service::GUEST_PATH, 0o755, &svc).map_err(io)?;
    let evread = std::fs::read(&evread_bin).at(&evread_bin)?;
    w.file(service::EVREAD_GUEST_PATH, 0o755, &evread).map_err(io)?;
    let spin = std::fs::read(out.join(F_SPIN)).at(out.join(F_SPIN))?;
    w.file(service::SPIN_GUEST_PATH, 0o755, &spin).map_err(io)?;
    let watch = std::fs::read(&watch_bin).at(&watch_bin)?;
    w.file(service::VMGENID_WATCH_GUEST_PATH, 0o755, &watch).map_err(io)?;
    let release = pkgs.kernel.release.clone();
    base::add_modules(&mut w, &release, &mods, &format!("lib/modules/{release}/{VIRTIO_LIST}"), "")?;
    // Each module file goes in once; both lists name theirs in load order.
    let extra: Vec<modules::Module> = boot_mods.iter().filter(|b| !mods.iter().any(|m| m.name == b.name)).cloned().collect();
    base::add_module_files(&mut w, &release, &extra)?;
    base::add_module_list(&mut w, &boot_mods, &format!("lib/modules/{release}/{BOOT_LIST}"), "")?;
    w.finish().map_err(io)?;
    // Self-check: the archive parses back and has /init.
    let written = std::fs::read(&initrd_path).at(&initrd_path)?;
    let entries = cpio::read_archive(&written).map_err(|r| ImageError::io(&initrd_path, std::io::Error::other(r)))?;
    if !entries.iter().any(|e| e.name == "init") {
        return Err(ImageError::io(&initrd_path, std::io::Error::other("written archive has no /init")));
    }
    drop(written);

    progress.step("creating the 64 MiB sparse data disk");
    let disk = out.join(F_DISK);
    std::fs::File::create(&disk).and_then(|f| f.set_len(DISK_SIZE)).at(&disk)?;

    let mut files = BTreeMap::new();
    for (role, fname) in [
        ("kernel", F_KERNEL),
        ("vmlinux", F_VMLINUX),
        ("initrd", F_INITRD),
        ("disk", F_DISK),
        ("service_binary", F_SERVICE),
        ("spin_demo", F_SPIN),
    ] {
        let p = out.join(fname);
        let size = std::fs::metadata(&p).at(&p)?.len();
        files.insert(role.to_string(), FileEntry { name: fname.to_string(), size, sha256: cache::sha256_file(&p)? });
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: FORMAT_VERSION,
        key: key.clone(),
        kernel_package: inputs.kernel.clone(),
        kernel_release: release,
        kernel_compression: compression.into(),
        busybox_package: inputs.busybox.clone(),
        busybox_banner: banner,
        files,
        service_guest_path: service::GUEST_PATH.into(),
        programs: [(service::GUEST_PATH, F_SERVICE), (service::SPIN_GUEST_PATH, F_SPIN)]
            .into_iter()
            .map(|(g, f)| (g.to_string(), f.to_string()))
            .collect(),
        sample_patches: service::SAMPLE_PATCHES.iter().map(|p| p.name.to_string()).collect(),
        default_cmdline: DEFAULT_CMDLINE.into(),
        modules: mods.iter().chain(&extra).map(|m| m.name.clone()).collect(),
        boot_modules: boot_mods.iter().map(|m| m.name.clone()).collect(),
        built_unix_time: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| ImageError::io(F_MANIFEST, std::io::Error::other(e)))?;
    std::fs::write(out.join(F_MANIFEST), json).at(out.join(F_MANIFEST))?;
    drop(work_dir);
    cache::install_dir(staging, &dest)?;
    cache::set_pointer(&current_link(&root), &name)?;
    progress.step(format!("built {} in {:.1}s", dest.display(), started.elapsed().as_secs_f64()));
    load(&dest)
}

/// The last built default image (no apt access).
pub fn current_guest_image() -> Result<GuestImage, ImageError> {
    let link = current_link(&cache::cache_root());
    let dir = std::fs::canonicalize(&link).map_err(|_| ImageError::NoImage)?;
    load(&dir)
}

/// Reads `dir/manifest.json` of a guest image.
pub fn read_manifest(dir: &Path) -> Result<Manifest, ImageError> {
    let path = dir.join(F_MANIFEST);
    let bytes = std::fs::read(&path).at(&path)?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| ImageError::BadManifest { path: path.clone(), reason: e.to_string() })?;
    if m.format != MANIFEST_FORMAT || m.version != FORMAT_VERSION {
        return Err(ImageError::BadManifest { path, reason: format!("format {} v{}, expected {MANIFEST_FORMAT} v{FORMAT_VERSION}", m.format, m.version) });
    }
    Ok(m)
}

/// Loads an image dir and checks every file the manifest names exists.
pub fn load(dir: &Path) -> Result<GuestImage, ImageError> {
    let m = read_manifest(dir)?;
    let file = |role: &str| -> Result<PathBuf, ImageError> {
        let e = m.files.get(role).ok_or_else(|| ImageError::BadManifest { path: dir.join(F_MANIFEST), reason: format!("no `{role}` file") })?;
        let p = dir.join(&e.name);
        if !p.is_file() {
            return Err(ImageError::BadManifest { path: dir.join(F_MANIFEST), reason: format!("{} is missing", p.display()) });
        }
        Ok(p)
    };
    let mut programs = BTreeMap::new();
    for (guest_path, name) in &m.programs {
        let p = dir.join(name);
        if !p.is_file() {
            return Err(ImageError::BadManifest { path: dir.join(F_MANIFEST), reason: format!("{} is missing", p.display()) });
        }
        programs.insert(guest_path.clone(), p);
    }
    Ok(GuestImage {
        dir: dir.to_path_buf(),
        programs,
        patches_dir: dir.join(D_PATCHES),
        kernel: file("kernel")?,
        vmlinux: file("vmlinux")?,
        initrd: file("initrd")?,
        disk: file("disk")?,
        service_binary: file("service_binary")?,
        kernel_release: m.kernel_release,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines the boot tests wait for, in boot order, and the new pieces
    /// before the service starts.
    #[test]
    fn init_script_order() {
        let pos = |needle: &str| INIT_SCRIPT.find(needle).unwrap_or_else(|| panic!("init lacks {needle:?}"));
        let order = [
            "dvisor-guest: init",
            "dvisor-guest: cpus=",
            "/usr/bin/vmgenid-watch",
            "load-modules dvisor-boot-modules",
            "/sbin/load-virtio-modules",
            "dvisor.ip=*)",
            "dvisor-guest: vt shell on tty1",
            "dvisor-guest: service started pid=",
            "dvisor-guest: shell\"",
        ];
        for w in order.windows(2) {
            assert!(pos(w[0]) < pos(w[1]), "{:?} must come before {:?}", w[0], w[1]);
        }
        assert!(LOADER_SCRIPT.contains("dvisor-load-order") && INIT_SCRIPT.contains(BOOT_LIST));
    }
}
