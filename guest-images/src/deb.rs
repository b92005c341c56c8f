//! Unpacking downloaded .deb files and finding the parts we need in them.

use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};
use crate::tool::{self, DPKG_DEB};

/// `dpkg-deb -x deb dest`.
pub fn extract(deb: &Path, dest: &Path) -> Result<(), ImageError> {
    std::fs::create_dir_all(dest).at(dest)?;
    let (d, t) = (deb.to_string_lossy(), dest.to_string_lossy());
    tool::run(DPKG_DEB, &["-x", &d, &t], None)?;
    Ok(())
}

/// An unpacked kernel package: its bzImage and its module tree.
#[derive(Debug, Clone)]
pub struct KernelTree {
    /// `boot/vmlinuz-<release>`.
    pub bzimage: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `lib/modules/<release>` (or `usr/lib/...` on merged-/usr packages).
    pub modules_dir: PathBuf,
}

/// Finds the kernel and modules inside an unpacked linux-image package.
pub fn kernel_tree(root: &Path) -> Result<KernelTree, ImageError> {
    let boot = root.join("boot");
    let mut found = None;
    for entry in std::fs::read_dir(&boot).at(&boot)? {
        let name = entry.at(&boot)?.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            found = Some(release.to_string());
        }
    }
    let release = found.ok_or_else(|| ImageError::MissingInPackage { path: boot.clone(), what: "vmlinuz-*".into() })?;
    let modules_dir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| root.join(d).join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| ImageError::MissingInPackage { path: root.to_path_buf(), what: format!("lib/modules/{release}") })?;
    Ok(KernelTree { bzimage: boot.join(format!("vmlinuz-{release}")), release, modules_dir })
}
