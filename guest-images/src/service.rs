//! The guest's C programs, embedded in the crate and compiled at image
//! build time with `gcc -static`:
//! - the demo service: a static, non-PIE ELF with symbols (the patcher needs
//!   fixed addresses and the symbol table);
//! - `evread`, a tiny evdev key reader (`/usr/bin/evread`).

use std::path::Path;

use crate::error::{ImageError, IoContext};
use crate::tool::{self, GCC};

pub const SOURCE: &str = include_str!("../service/demo.c");
/// Where the service lives inside the guest.
pub const GUEST_PATH: &str = "/usr/bin/demo-service";
pub const GCC_FLAGS: &[&str] = &["-static", "-O2", "-g", "-fno-pie", "-no-pie", "-Wall"];

pub const EVREAD_SOURCE: &str = include_str!("../service/evread.c");
/// Where the key reader lives inside the guest.
pub const EVREAD_GUEST_PATH: &str = "/usr/bin/evread";
pub const EVREAD_GCC_FLAGS: &[&str] = &["-static", "-O2", "-s", "-Wall", "-Wextra"];

/// Compiles the demo service into `out` (work files go into `work`).
pub fn compile(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "demo service", "demo.c", SOURCE, GCC_FLAGS, out)
}

/// Compiles `evread` into `out` (work files go into `work`).
pub fn compile_evread(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "key reader evread", "evread.c", EVREAD_SOURCE, EVREAD_GCC_FLAGS, out)
}

/// Writes `source` to `work/file_name` and runs gcc with `flags` on it.
fn compile_c(work: &Path, program: &'static str, file_name: &str, source: &str, flags: &[&str], out: &Path) -> Result<(), ImageError> {
    let src = work.join(file_name);
    std::fs::write(&src, source).at(&src)?;
    let (s, o) = (src.to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    let mut args: Vec<&str> = flags.to_vec();
    args.extend(["-o", &o, &s]);
    let res = tool::output(GCC, &args, Some(work))?;
    if res.status.success() {
        return Ok(());
    }
    let stderr = tool::tail(&String::from_utf8_lossy(&res.stderr), 10);
    if is_missing_libc(&stderr) {
        Err(ImageError::StaticLinkFailed { program, stderr })
    } else {
        Err(ImageError::CompileFailed { program, stderr })
    }
}

/// gcc's ways of saying the C library (headers or static archive) is absent.
pub fn is_missing_libc(stderr: &str) -> bool {
    stderr.contains("cannot find -lc")
        || stderr.contains("stdio.h: No such file")
        || stderr.contains("crt1.o")
        || stderr.contains("cannot find crt")
}

#[cfg(test)]
mod tests {
    #[test]
    fn libc_missing_detection() {
        assert!(super::is_missing_libc("/usr/bin/ld: cannot find -lc: No such file or directory"));
        assert!(super::is_missing_libc("demo.c:1:10: fatal error: stdio.h: No such file or directory"));
        assert!(!super::is_missing_libc("demo.c:3: error: expected ';'"));
    }

    /// evread must build without a single warning under -Wall -Wextra.
    #[test]
    fn evread_compiles_without_warnings() {
        if std::process::Command::new("gcc").arg("--version").output().is_err() {
            eprintln!("gcc not installed; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("evread.c");
        std::fs::write(&src, super::EVREAD_SOURCE).unwrap();
        // Not static: the check is about warnings, and static libc may be absent.
        let out = std::process::Command::new("gcc")
            .args(["-O2", "-Wall", "-Wextra", "-Werror", "-c", "-o"])
            .arg(dir.path().join("evread.o"))
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
    }

    #[test]
    fn source_has_the_patch_targets() {
        for sym in ["get_message", "message_ptr", "config_interval_ms", "reply_counter", "counter"] {
            assert!(super::SOURCE.contains(sym), "{sym}");
        }
    }
}
