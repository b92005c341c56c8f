//! Running the host tools the builder needs (apt, dpkg-deb, gcc), with errors
//! that say which tool is missing and which package provides it.

use std::path::Path;
use std::process::{Command, Output};

use crate::error::ImageError;

/// A host tool and the Debian package that provides it.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub const APT_GET: Tool = Tool { name: "apt-get", package: "apt" };
pub const APT_CACHE: Tool = Tool { name: "apt-cache", package: "apt" };
pub const DPKG_DEB: Tool = Tool { name: "dpkg-deb", package: "dpkg" };
pub const GCC: Tool = Tool { name: "gcc", package: "gcc libc6-dev" };

/// Runs `tool args...` (optionally in `cwd`) and returns its output; a
/// missing binary becomes `ToolMissing`, a non-zero exit `CommandFailed`.
pub fn run(tool: Tool, args: &[&str], cwd: Option<&Path>) -> Result<Output, ImageError> {
    let out = output(tool, args, cwd)?;
    if !out.status.success() {
        return Err(failed(tool, args, &out));
    }
    Ok(out)
}

/// Like `run` but hands back a failed `Output` too, for callers that map
/// specific failures to better errors.
pub fn output(tool: Tool, args: &[&str], cwd: Option<&Path>) -> Result<Output, ImageError> {
    let mut cmd = Command::new(tool.name);
    cmd.args(args).env("LC_ALL", "C");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    tracing::debug!(tool = tool.name, ?args, "running");
    cmd.output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ImageError::ToolMissing { tool: tool.name, package: tool.package },
        _ => ImageError::CommandFailed { command: tool.name.to_string(), status: "could not start".into(), stderr: e.to_string() },
    })
}

pub fn failed(tool: Tool, args: &[&str], out: &Output) -> ImageError {
    ImageError::CommandFailed {
        command: format!("{} {}", tool.name, args.join(" ")),
        status: out.status.to_string(),
        stderr: tail(&String::from_utf8_lossy(&out.stderr), 20),
    }
}

/// The last `n` lines of `text`, for error messages.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.trim_end().lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
