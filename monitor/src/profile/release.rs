//! The kernel release, from the `Linux version ...` banner (linux_banner)
//! in the image, or from the guest image's manifest.json beside it.
use std::path::Path;

use super::bytes::cstr_at;

const PREFIX: &[u8] = b"Linux version ";

/// The first `Linux version <digit>...` string: (release, whole banner line).
pub fn from_banner(data: &[u8]) -> Option<(String, String)> {
    memchr::memmem::find_iter(data, PREFIX).find_map(|at| {
        let text = cstr_at(data, at as u64, 512)?;
        let line = text.split(|&b| b == b'\n').next()?;
        let release = line.get(PREFIX.len()..)?.split(|&b| b == b' ').next()?;
        let ok = release.first().is_some_and(u8::is_ascii_digit) && release.iter().all(|b| b.is_ascii_graphic());
        ok.then(|| (String::from_utf8_lossy(release).into_owned(), String::from_utf8_lossy(line).trim_end().to_string()))
    })
}

/// `kernel_release` of the manifest.json in the vmlinux's directory.
pub fn from_manifest(vmlinux: &Path) -> Option<String> {
    let text = std::fs::read_to_string(vmlinux.parent()?.join("manifest.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("kernel_release")?.as_str().map(str::to_string)
}
