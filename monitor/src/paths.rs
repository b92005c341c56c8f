//! Where a VM's sockets live: `<runtime>/<name>/{api,monitor}.sock`, with
//! `<runtime>` = $DVISOR_RUNTIME_DIR, else $XDG_RUNTIME_DIR/dvisor, else
//! /tmp/dvisor-<uid>. Sockets must be on a local file system (not 9p).
use std::path::PathBuf;

pub const DEFAULT_VM_NAME: &str = "default";

pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("DVISOR_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("dvisor");
    }
    // SAFETY: getuid cannot fail.
    PathBuf::from(format!("/tmp/dvisor-{}", unsafe { libc::getuid() }))
}

pub fn vm_dir(name: &str) -> PathBuf {
    runtime_dir().join(name)
}

pub fn api_socket(name: &str) -> PathBuf {
    vm_dir(name).join("api.sock")
}

pub fn control_socket(name: &str) -> PathBuf {
    vm_dir(name).join("monitor.sock")
}

/// A VM name becomes a directory name: keep it to one plain component.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!("invalid VM name {name:?}: use 1-64 letters, digits, '-', '_' or '.', not starting with '.'"))
    }
}
