//! The guest's C programs, embedded in the crate and compiled at image
//! build time with `gcc -static`:
//! - the demo service: a static, non-PIE ELF with symbols (the patcher needs
//!   fixed addresses and the symbol table);
//! - `evread`, a tiny evdev key reader (`/usr/bin/evread`);
//! - `spin-demo`, a static-pie program whose thread sits inside functions
//!   on demand (the patcher's safety checks and PIE load base);
//! - `vmgenid-watch`, which reseeds the RNG when the VM generation ID
//!   changes, for kernels without the vmgenid driver (the cloud kernel);
//! - the sample live patches of the demo service (`guest-images/patches`),
//!   compiled into patch objects for the host side.

use std::path::Path;

use crate::error::{ImageError, IoContext};
use crate::tool::{self, GCC};

pub const SOURCE: &str = include_str!("../service/demo.c");
/// Where the service lives inside the guest.
pub const GUEST_PATH: &str = "/usr/bin/demo-service";
/// `-flive-patching=inline-clone` is what makes a program patchable function
/// by function (Linux builds livepatch kernels with it): it turns off the
/// interprocedural optimisations that let a caller depend on the body of the
/// function it calls. Without it, gcc's IPA-RA lets `heartbeat` keep its
/// printf format in %rdi across `get_message()`, and any patch of
/// `get_message` that touches %rdi (by calling a function) breaks the caller.
pub const LIVE_PATCHING_FLAG: &str = "-flive-patching=inline-clone";
pub const GCC_FLAGS: &[&str] = &["-static", "-O2", "-g", LIVE_PATCHING_FLAG, "-fno-pie", "-no-pie", "-Wall"];

pub const EVREAD_SOURCE: &str = include_str!("../service/evread.c");
/// Where the key reader lives inside the guest.
pub const EVREAD_GUEST_PATH: &str = "/usr/bin/evread";
pub const EVREAD_GCC_FLAGS: &[&str] = &["-static", "-O2", "-s", "-Wall", "-Wextra"];

pub const SPIN_SOURCE: &str = include_str!("../service/spin-demo.c");
/// Where spin-demo lives inside the guest.
pub const SPIN_GUEST_PATH: &str = "/usr/bin/spin-demo";
/// Position-independent on purpose: its load base differs on every run.
pub const SPIN_GCC_FLAGS: &[&str] = &["-static-pie", "-fpie", "-O2", "-g", LIVE_PATCHING_FLAG, "-Wall", "-Wextra"];

pub const VMGENID_WATCH_SOURCE: &str = include_str!("../service/vmgenid-watch.c");
/// Where vmgenid-watch lives inside the guest (/init starts it).
pub const VMGENID_WATCH_GUEST_PATH: &str = "/usr/bin/vmgenid-watch";
pub const VMGENID_WATCH_GCC_FLAGS: &[&str] = &["-static", "-O2", "-s", "-Wall", "-Wextra"];

/// The flags docs/patching.md gives for patch objects.
pub const PATCH_GCC_FLAGS: &[&str] =
    &["-c", "-O2", "-fpic", "-fno-asynchronous-unwind-tables", "-ffunction-sections", "-fdata-sections", "-Wall"];

/// A sample patch of the demo service: the object compiled from `source`
/// and its command file, shipped as `patches/<name>.o` and `<name>.cmd`.
pub struct SamplePatch {
    pub name: &'static str,
    pub source_file: &'static str,
    pub source: &'static str,
    pub commands: &'static str,
}

macro_rules! sample {
    ($name:literal, $source:literal, $commands:literal) => {
        SamplePatch {
            name: $name,
            source_file: $source,
            source: include_str!(concat!("../patches/", $source)),
            commands: include_str!(concat!("../patches/", $commands)),
        }
    };
}

pub const SAMPLE_PATCHES: &[SamplePatch] = &[
    sample!("v2", "v2.c", "v2.cmd"),
    sample!("fix", "fix.c", "fix.cmd"),
    sample!("var", "empty.c", "var.cmd"),
    sample!("ptr", "ptr.c", "ptr.cmd"),
    sample!("callback", "callback.c", "callback.cmd"),
    sample!("handler", "handler.c", "handler.cmd"),
];

/// Compiles the demo service into `out` (work files go into `work`).
pub fn compile(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "demo service", "demo.c", SOURCE, GCC_FLAGS, out)
}

/// Compiles `evread` into `out` (work files go into `work`).
pub fn compile_evread(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "key reader evread", "evread.c", EVREAD_SOURCE, EVREAD_GCC_FLAGS, out)
}

/// Compiles spin-demo into `out`.
pub fn compile_spin(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "spin-demo", "spin-demo.c", SPIN_SOURCE, SPIN_GCC_FLAGS, out)
}

/// Compiles vmgenid-watch into `out`.
pub fn compile_vmgenid_watch(work: &Path, out: &Path) -> Result<(), ImageError> {
    compile_c(work, "vmgenid-watch", "vmgenid-watch.c", VMGENID_WATCH_SOURCE, VMGENID_WATCH_GCC_FLAGS, out)
}

/// Compiles one sample patch into the object `out`, and writes its source
/// and command file beside it.
pub fn compile_sample(work: &Path, sample: &SamplePatch, out_dir: &Path) -> Result<(), ImageError> {
    let obj = out_dir.join(format!("{}.o", sample.name));
    compile_c(work, "sample patch", sample.source_file, sample.source, PATCH_GCC_FLAGS, &obj)?;
    let src = out_dir.join(sample.source_file);
    std::fs::write(&src, sample.source).at(&src)?;
    let cmd = out_dir.join(format!("{}.cmd", sample.name));
    std::fs::write(&cmd, sample.commands).at(&cmd)
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

    /// evread and vmgenid-watch must build without a single warning under
    /// -Wall -Wextra.
    #[test]
    fn helpers_compile_without_warnings() {
        if std::process::Command::new("gcc").arg("--version").output().is_err() {
            eprintln!("gcc not installed; skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, source) in [("evread", super::EVREAD_SOURCE), ("vmgenid-watch", super::VMGENID_WATCH_SOURCE)] {
            let src = dir.path().join(format!("{name}.c"));
            std::fs::write(&src, source).unwrap();
            // Not static: the check is about warnings, and static libc may be absent.
            let out = std::process::Command::new("gcc")
                .args(["-O2", "-Wall", "-Wextra", "-Werror", "-c", "-o"])
                .arg(dir.path().join(format!("{name}.o")))
                .arg(&src)
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
            assert!(out.stderr.is_empty(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }

    /// The address and the kmsg line that docs/images.md and the VMM agree on.
    #[test]
    fn vmgenid_watch_contract() {
        let s = super::VMGENID_WATCH_SOURCE;
        assert!(s.contains("#define VMGENID_ADDR 0xFE000"));
        assert!(s.contains("#define POLL_MS 20"));
        assert!(s.contains("\"ID changed, crng reseeded\""));
        assert!(s.contains("/sys/bus/acpi/drivers/vmgenid"));
    }

    #[test]
    fn source_has_the_patch_targets() {
        for sym in ["get_message", "message_ptr", "config_interval_ms", "reply_counter", "counter"] {
            assert!(super::SOURCE.contains(sym), "{sym}");
        }
    }
}
