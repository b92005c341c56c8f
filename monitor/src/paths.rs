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

/// Makes (or checks) the runtime dir and VM `name`'s dir in it before a
/// VM uses them: each mode 0700 and this user's. One someone else
/// created is refused with what to do (`dvisor_api::owner`): whoever owns
/// the directory could swap the sockets in it.
pub fn prepare_vm_dir(name: &str) -> Result<PathBuf, String> {
    let root = runtime_dir();
    dvisor_api::owner::private_dir(&root).map_err(|e| format!("runtime dir: {e}"))?;
    let dir = root.join(name);
    dvisor_api::owner::private_dir(&dir).map_err(|e| format!("VM dir: {e}"))?;
    Ok(dir)
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
