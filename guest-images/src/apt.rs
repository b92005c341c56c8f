//! Resolving and downloading Debian packages with the host's apt.
//!
//! Kernel meta-packages (`linux-image-cloud-amd64`) depend on one concrete ABI
//! package that changes with security updates, so we resolve it every build
//! instead of hard-coding the ABI number.

use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext};
use crate::tool::{self, APT_CACHE, APT_GET};

/// A concrete package and the version apt would install.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
}

/// Resolves `meta` to the dependency whose name starts with `prefix`
/// (e.g. `linux-image-cloud-amd64` → `linux-image-6.1.0-56-cloud-amd64`)
/// and that package's candidate version.
pub fn resolve_meta(meta: &str, prefix: &str) -> Result<Package, ImageError> {
    let out = tool::output(APT_CACHE, &["depends", meta], None)?;
    if !out.status.success() {
        return Err(ImageError::PackageUnknown { package: meta.to_string() });
    }
    let name = parse_depends(&String::from_utf8_lossy(&out.stdout), prefix)
        .ok_or_else(|| ImageError::MetaUnresolved { package: meta.to_string(), prefix: prefix.to_string() })?;
    candidate(&name)
}

/// The version apt would download for `name`.
pub fn candidate(name: &str) -> Result<Package, ImageError> {
    let out = tool::output(APT_CACHE, &["show", "--no-all-versions", name], None)?;
    let version = if out.status.success() { parse_show_version(&String::from_utf8_lossy(&out.stdout)) } else { None };
    let version = version.ok_or_else(|| ImageError::PackageUnknown { package: name.to_string() })?;
    Ok(Package { name: name.to_string(), version })
}

/// First `Depends:` target in `apt-cache depends` output that starts with
/// `prefix` and is a real package (virtual ones are shown as `<name>`).
pub fn parse_depends(output: &str, prefix: &str) -> Option<String> {
    output.lines().find_map(|line| {
        let rest = line.trim_start().trim_start_matches('|').strip_prefix("Depends:")?;
        let target = rest.trim();
        (target.starts_with(prefix) && !target.starts_with('<')).then(|| target.to_string())
    })
}

/// The `Version:` field of `apt-cache show --no-all-versions` output.
pub fn parse_show_version(output: &str) -> Option<String> {
    output.lines().find_map(|l| l.strip_prefix("Version:").map(|v| v.trim().to_string())).filter(|v| !v.is_empty())
}

/// Downloads `pkg` (exact version) into `dir` and returns the .deb path.
pub fn download(pkg: &Package, dir: &Path) -> Result<PathBuf, ImageError> {
    let spec = format!("{}={}", pkg.name, pkg.version);
    let mut args: Vec<&str> = vec!["-q"];
    // As root, apt drops privileges to the `_apt` user for downloads and
    // warns when that user cannot write the target dir; our temp dir is
    // private, so keep root instead of loosening its permissions.
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        args.extend(["-o", "APT::Sandbox::User=root"]);
    }
    args.extend(["download", spec.as_str()]);
    let out = tool::output(APT_GET, &args, Some(dir))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("Unable to locate") || stderr.contains("Can't select") || stderr.contains("not found") {
            return Err(ImageError::PackageUnknown { package: spec });
        }
        return Err(tool::failed(APT_GET, &args, &out));
    }
    let prefix = format!("{}_", pkg.name);
    let entries = std::fs::read_dir(dir).at(dir)?;
    for entry in entries {
        let path = entry.at(dir)?.path();
        let fname = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if fname.starts_with(&prefix) && fname.ends_with(".deb") {
            return Ok(path);
        }
    }
    Err(ImageError::MissingInPackage { path: dir.to_path_buf(), what: format!("{prefix}*.deb after apt-get download") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_parsing() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(parse_depends(out, "linux-image-").as_deref(), Some("linux-image-6.1.0-56-cloud-amd64"));
        let alt = "x\n |Depends: <linux-image-virtual>\n  Depends: linux-image-6.12.9-amd64\n  Recommends: foo\n";
        assert_eq!(parse_depends(alt, "linux-image-").as_deref(), Some("linux-image-6.12.9-amd64"));
        assert_eq!(parse_depends("x\n  Depends: libc6\n", "linux-image-"), None);
    }

    #[test]
    fn show_version_parsing() {
        let out = "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nArchitecture: amd64\n";
        assert_eq!(parse_show_version(out).as_deref(), Some("1:1.35.0-4+deb12u1+b1"));
        assert_eq!(parse_show_version("Package: x\n"), None);
    }
}
