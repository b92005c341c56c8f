//! Snapshots of a running VM: its complete state as serializable structs,
//! written to a checked on-disk format, and read back to continue the
//! guest in a new VMM process or in place (docs/snapshots.md).
//!
//! - `vcpu`: one vCPU's registers, FPU, MSRs, LAPIC, events;
//! - `vm_state`: the in-kernel interrupt controllers, PIT and kvmclock;
//! - devices keep their own `*State` beside them (`devices/`), gathered in
//!   [`DevicesState`];
//! - `memory`: dirty-page tracking, the sparse memory file, loading;
//! - `format`: the directory, its files and their checks;
//! - `create`: the live snapshot (copy while running, short pause).
pub mod create;
pub mod format;
pub mod memory;
pub mod merge;
pub mod restore;
pub mod vcpu;
pub mod vm_state;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NetConfig};
use crate::devices::acpi_pm::AcpiPmState;
use crate::devices::pci_host::PciHostState;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialState;
use crate::devices::virtio::block::{BlockState, DiskIdentity};
use crate::devices::virtio::mmio::MmioTransportState;
use crate::devices::virtio::net::NetState;
use crate::devices::vmgenid::VmGenIdState;

pub use format::{Manifest, ParentRef, SnapshotKind};
pub use memory::PageSet;

/// Why a snapshot could not be taken, checked or restored.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    #[error("{0} already exists: snapshots are never overwritten; pick another --out or remove it (dvisor snapshot rm)")]
    Exists(PathBuf),
    #[error("{0} is not a snapshot: {1}")]
    NotASnapshot(PathBuf, String),
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("{path} has snapshot format version {found} (written by dvisor {writer}); this dvisor reads version {supported} only: restore it with the dvisor that wrote it")]
    Version { path: PathBuf, found: u32, writer: String, supported: u32 },
    #[error("invalid snapshot state: {0}")]
    Invalid(String),
    #[error("the snapshot's guest uses CPU features this host's KVM does not offer ({0}): restore it on a host with the same or a newer CPU")]
    CpuFeatures(String),
    #[error("KVM refused MSR {index:#x} of vCPU {vcpu}: the host CPU or KVM lacks it")]
    MsrRefused { vcpu: u32, index: u32 },
    #[error("the guest's TSC ran at {khz} kHz and this host cannot scale to it: {error}")]
    TscFrequency { khz: u32, error: kvm_ioctls::Error },
    #[error("disk {index} ({path}) changed since the snapshot: {what}; restore needs the disk as it was (use the clone's overlay, or take a new snapshot)")]
    DiskChanged { index: usize, path: PathBuf, what: String },
    #[error("device {device} cannot be saved: {reason}")]
    Device { device: String, reason: String },
    #[error("device {device} cannot be restored: {reason}")]
    DeviceRestore { device: String, reason: String },
    #[error("parent of {child}: {error}")]
    Parent { child: PathBuf, error: Box<SnapshotError> },
    #[error("{0}")]
    WrongState(String),
}

impl SnapshotError {
    /// Errors about the snapshot's files (as opposed to KVM or the host
    /// failing): what `dvisor snapshot verify` reports as bad input.
    pub fn is_bad_snapshot(&self) -> bool {
        match self {
            SnapshotError::Corrupt { .. }
            | SnapshotError::Version { .. }
            | SnapshotError::Invalid(_)
            | SnapshotError::NotASnapshot(..)
            | SnapshotError::CpuFeatures(_)
            | SnapshotError::DiskChanged { .. } => true,
            SnapshotError::Parent { error, .. } => error.is_bad_snapshot(),
            _ => false,
        }
    }
}

/// How the VM was configured: what a restore needs to rebuild it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedConfig {
    pub vm_name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub disks: Vec<SavedDisk>,
    pub nets: Vec<NetConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SavedDisk {
    pub config: DiskConfig,
    pub identity: DiskIdentity,
}

/// Every device's state, in the order the VM creates them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialState,
    pub i8042: I8042State,
    pub acpi_pm: AcpiPmState,
    pub pci_host: PciHostState,
    pub blocks: Vec<(MmioTransportState, BlockState)>,
    pub nets: Vec<(MmioTransportState, NetState)>,
    pub vmgenid: VmGenIdState,
}

/// Everything in `state.bin`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    pub id: String,
    pub parent: Option<ParentRef>,
    /// CRC-64 of `manifest.json`.
    pub manifest_crc: u64,
    pub config: SavedConfig,
    pub memory: format::MemoryState,
    pub vcpus: Vec<vcpu::VcpuState>,
    pub vm: vm_state::VmState,
    pub devices: DevicesState,
    /// Whether the VM was paused when the snapshot was taken (restore
    /// leaves it paused too unless asked otherwise).
    pub was_paused: bool,
}

impl SnapshotState {
    /// Bounds a hostile state file could break, checked before use.
    pub fn check(&self) -> Result<(), SnapshotError> {
        self.memory.check()?;
        let n = usize::from(self.config.vcpus);
        if n == 0 || n != self.vcpus.len() || n > usize::from(crate::config::MAX_VCPUS) {
            return Err(SnapshotError::Invalid(format!("{} vCPU states for {} vCPUs", self.vcpus.len(), n)));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return Err(SnapshotError::Invalid(format!("vCPU state {i} has id {}", v.id)));
            }
            v.check()?;
        }
        let ranges = crate::layout::ram_ranges(self.config.mem_mib << 20);
        let saved: Vec<(u64, u64)> = self.memory.ranges.iter().map(|r| (r.gpa, r.size)).collect();
        if ranges != saved {
            return Err(SnapshotError::Invalid(format!(
                "memory ranges {saved:x?} do not match {} MiB of RAM",
                self.config.mem_mib
            )));
        }
        if self.devices.blocks.len() != self.config.disks.len() || self.devices.nets.len() != self.config.nets.len() {
            return Err(SnapshotError::Invalid("device states do not match the configured disks and networks".into()));
        }
        Ok(())
    }
}
