//! Errors of the VMM. Each names the thing that failed and, where there is
//! one, the fix.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open kernel image {0}: {1} (run `dvisor image build`, or pass --kernel)")]
    KernelOpen(PathBuf, #[source] std::io::Error),
    #[error("kernel image {0} is not a bootable x86-64 bzImage: {1}")]
    BadKernel(PathBuf, String),
    #[error("cannot open initrd {0}: {1}")]
    InitrdOpen(PathBuf, #[source] std::io::Error),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("disk: {0}")]
    Disk(String),
    #[error("network: {0}")]
    Net(String),
    #[error("cannot serve the support API at {0}: {1}")]
    Api(PathBuf, #[source] std::io::Error),
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("cannot open /dev/kvm: {0} (is KVM available here? `dvisor run` uses the carrier VM when it is not)")]
    KvmOpen(#[source] kvm_ioctls::Error),
    #[error("KVM lacks a capability D-Visor needs: {0}")]
    KvmCapability(&'static str),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("guest memory: {0}")]
    GuestMemory(#[source] std::io::Error),
    #[error("guest memory: {0}")]
    GuestMemoryMap(String),
    #[error("building ACPI tables: {0}")]
    Acpi(String),
    #[error("loading the guest: {0}")]
    Boot(String),
    #[error("creating an interrupt eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("starting vCPU thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("installing signal handlers: {0}")]
    Signal(#[source] std::io::Error),
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("guest stopped on vCPU {vcpu}: {reason}\n{registers}")]
    GuestFatal { vcpu: u32, reason: String, registers: String },
}
