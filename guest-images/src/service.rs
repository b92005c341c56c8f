//! The demo service: C source embedded in the crate, compiled at image build
//! time into a static, non-PIE ELF with symbols (the patcher needs fixed
//! addresses and the symbol table).

use std::path::Path;

use crate::error::{ImageError, IoContext};
use crate::tool::{self, GCC};

pub const SOURCE: &str = include_str!("../service/demo.c");
/// Where the service lives inside the guest.
pub const GUEST_PATH: &str = "/usr/bin/demo-service";
pub const GCC_FLAGS: &[&str] = &["-static", "-O2", "-g", "-fno-pie", "-no-pie", "-Wall"];

/// Compiles the demo service into `out` (work files go into `work`).
pub fn compile(work: &Path, out: &Path) -> Result<(), ImageError> {
    let src = work.join("demo.c");
    std::fs::write(&src, SOURCE).at(&src)?;
    let (s, o) = (src.to_string_lossy().into_owned(), out.to_string_lossy().into_owned());
    let mut args: Vec<&str> = GCC_FLAGS.to_vec();
    args.extend(["-o", &o, &s]);
    let res = tool::output(GCC, &args, Some(work))?;
    if res.status.success() {
        return Ok(());
    }
    let stderr = tool::tail(&String::from_utf8_lossy(&res.stderr), 10);
    if is_missing_libc(&stderr) {
        Err(ImageError::StaticLinkFailed { stderr })
    } else {
        Err(ImageError::CompileFailed { stderr })
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

    #[test]
    fn source_has_the_patch_targets() {
        for sym in ["get_message", "message_ptr", "config_interval_ms", "reply_counter", "counter"] {
            assert!(super::SOURCE.contains(sym), "{sym}");
        }
    }
}
