//! What a VM is made of, as the CLI describes it.
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::VmmError;

pub const MIN_MEM_MIB: u64 = 96;
pub const MAX_VCPUS: u8 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnReboot {
    /// Boot the guest again, as a PC would.
    Restart,
    /// Stop the VMM and report the reboot to the caller.
    Exit,
}

/// A raw disk image served by virtio-blk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A virtio-net interface backed by a host tap device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// The VM's name (`dvisor run --name`), recorded in its snapshots.
    #[serde(default)]
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    pub on_reboot: OnReboot,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// Where to serve the support API; `None` serves none.
    pub api_socket: Option<PathBuf>,
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), VmmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmmError::Config(format!(
                "--vcpus {} is out of range: use 1 to {MAX_VCPUS}",
                self.vcpus
            )));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(VmmError::Config(format!(
                "--mem {} MiB is too small: a stock kernel needs at least {MIN_MEM_MIB} MiB",
                self.mem_mib
            )));
        }
        if self.mem_mib > 1 << 20 {
            return Err(VmmError::Config(format!("--mem {} MiB is more than 1 TiB", self.mem_mib)));
        }
        crate::boot::check_bzimage(&self.kernel)?;
        if self.disks.len() + self.nets.len() > crate::layout::MAX_VIRTIO_DEVICES {
            return Err(VmmError::Config(format!(
                "{} disks and {} network interfaces given; at most {} virtio devices fit",
                self.disks.len(),
                self.nets.len(),
                crate::layout::MAX_VIRTIO_DEVICES
            )));
        }
        for d in &self.disks {
            // Opening checks existence, permissions and the sector multiple.
            crate::devices::virtio::block::Block::open(&d.path, d.read_only)
                .map_err(|e| VmmError::Disk(e.to_string()))?;
        }
        if let Some(initrd) = &self.initrd {
            std::fs::metadata(initrd).map_err(|e| VmmError::InitrdOpen(initrd.clone(), e))?;
        }
        Ok(())
    }
}
