//! The carrier: a QEMU-TCG VM with emulated AMD SVM, so a real (hardware
//! model) `/dev/kvm` exists inside it even on hosts whose own /dev/kvm is a
//! software hypervisor (PVM) that cannot boot stock kernels. `run` executes
//! a host command in it with the host's root filesystem shared read-write
//! over 9p; see docs/carrier.md.

mod image;
pub mod relay;
mod run;

use std::path::PathBuf;

pub use image::{build_carrier_image, carrier_image, CarrierImage, CARRIER_KERNEL_META};
pub use run::{run, run_forwarding, StdinEncoder};

use crate::error::ImageError;

/// How big the carrier VM is and what extra environment the command gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CarrierOptions {
    pub mem_mib: u32,
    pub cpus: u32,
    /// Exported to the command on top of the filtered host environment.
    pub extra_env: Vec<(String, String)>,
}

impl Default for CarrierOptions {
    fn default() -> Self {
        CarrierOptions { mem_mib: 2048, cpus: 2, extra_env: Vec::new() }
    }
}

/// A TCP port forwarded from the host into the carrier (`run_forwarding`):
/// connections to `127.0.0.1:host_port` on the host reach
/// `CARRIER_IP:carrier_port` inside the carrier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpForward {
    pub host_port: u16,
    pub carrier_port: u16,
}

/// The carrier's address on its private user-mode (slirp) network, which
/// exists only when `run_forwarding` is given forwards. The subnet is
/// deliberately not QEMU's default 10.0.2.0/24, which docs/images.md uses
/// for guest tap networks inside the carrier.
pub const CARRIER_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 254, 77, 15);
/// Prefix length of the carrier's slirp network (10.254.77.0/24; QEMU's
/// side is 10.254.77.2).
pub const CARRIER_NET_PREFIX: u8 = 24;

#[derive(Debug, thiserror::Error)]
pub enum CarrierError {
    #[error("carrier image: {0}")]
    Image(#[from] ImageError),

    #[error("qemu-system-x86_64 not found: run `apt-get install qemu-system-x86`")]
    QemuMissing,

    #[error("no command given: usage `dvisor carrier -- CMD [ARGS...]`")]
    EmptyCommand,

    #[error("{what}: {path} must not contain whitespace (it is passed on the kernel command line); set TMPDIR to a plain path")]
    BadPath { what: &'static str, path: PathBuf },

    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    #[error("starting qemu-system-x86_64 failed: {0}")]
    Spawn(std::io::Error),

    #[error("QEMU could not listen on the host for a forwarded port: {0}")]
    HostForward(String),

    #[error("the carrier VM ended without reporting the command's exit status (qemu {qemu_status}); last lines of its console log {log}:\n{tail}")]
    NoStatus { qemu_status: String, log: PathBuf, tail: String },
}

impl CarrierError {
    fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CarrierError::Io { path: path.into(), source }
    }
}

/// True inside the carrier VM (`run` sets `DVISOR_IN_CARRIER` for the command).
pub fn in_carrier() -> bool {
    std::env::var_os(IN_CARRIER_VAR).is_some()
}

/// True where a VM has to run inside the carrier: not already in it, and
/// the host has no hardware KVM.
pub fn needed() -> bool {
    !in_carrier() && !host_has_hardware_kvm()
}

/// The environment variable that tells a command it runs in the carrier.
pub const IN_CARRIER_VAR: &str = "DVISOR_IN_CARRIER";

/// True only where dvisor can use the host's /dev/kvm directly: the CPU
/// advertises VT-x/AMD-V, /dev/kvm exists, and it is not served by the PVM
/// software hypervisor (which cannot boot stock kernels; see PLATFORM.md).
pub fn host_has_hardware_kvm() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let has_flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    has_flag && std::path::Path::new("/dev/kvm").exists() && !std::path::Path::new("/sys/module/kvm_pvm").exists()
}
