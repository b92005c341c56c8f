//! Configuration errors are caught before any VM (or carrier) starts:
//! clear message, exit status 2.
mod common;

use common::dvisor;

fn run_with_kernel(kernel: &std::path::Path) -> (i32, String) {
    let out = dvisor()
        .args(["run", "--kernel"])
        .arg(kernel)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dvisor-errors-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn missing_kernel_is_a_clear_error_with_status_2() {
    let (code, err) = run_with_kernel(&scratch("no-such-bzImage"));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("cannot open kernel image") && err.contains("no-such-bzImage"), "{err}");
    assert!(err.contains("dvisor image build"), "error should say how to fix it: {err}");
}

#[test]
fn corrupt_kernel_is_a_clear_error_with_status_2() {
    let p = scratch("corrupt-bzImage");
    let junk: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    std::fs::write(&p, junk).unwrap();
    let (code, err) = run_with_kernel(&p);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not a bootable x86-64 bzImage"), "{err}");
}

#[test]
fn truncated_kernel_is_a_clear_error_with_status_2() {
    let p = scratch("short-bzImage");
    std::fs::write(&p, b"MZ").unwrap();
    let (code, err) = run_with_kernel(&p);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("too short"), "{err}");
}

#[test]
fn bad_vcpu_count_is_rejected() {
    common::ensure_image();
    let out = dvisor().args(["run", "--vcpus", "0"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--vcpus 0 is out of range"));
}

#[test]
fn disk_of_odd_size_is_refused_before_boot() {
    common::ensure_image();
    let p = scratch("odd.raw");
    std::fs::write(&p, vec![0u8; 1000]).unwrap();
    let out = dvisor().args(["run", "--disk"]).arg(&p).stdin(std::process::Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a multiple of the 512-byte sector size"), "{err}");
    let out = dvisor().args(["run", "--disk", "/nonexistent.raw"]).stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent.raw"));
}

#[test]
fn no_carrier_refuses_clearly_on_a_host_without_hardware_kvm() {
    if dvisor_images::carrier::host_has_hardware_kvm() {
        eprintln!("skipped: this host has hardware KVM, so --no-carrier boots directly");
        return;
    }
    common::ensure_image();
    let out = dvisor().args(["run", "--no-carrier"]).stdin(std::process::Stdio::null()).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("no hardware virtualization") && err.contains("--no-carrier"), "{err}");
}

/// A runtime dir someone else created (who could swap the sockets in it)
/// is refused before anything starts. Needs root to give the directory
/// away; CI runs as root.
#[test]
fn someone_elses_runtime_dir_is_refused_before_any_vm() {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: giving a directory to another uid needs root");
        return;
    }
    let theirs = scratch("theirs");
    std::fs::create_dir_all(&theirs).unwrap();
    std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
    let out = dvisor()
        .args(["run", "--name", "owned", "--kernel", "/nonexistent"])
        .env("DVISOR_RUNTIME_DIR", &theirs)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("belongs to uid 65534") && err.contains("DVISOR_RUNTIME_DIR"), "{err}");
    assert!(!theirs.join("owned").exists(), "a VM dir was made inside someone else's runtime dir");
}
