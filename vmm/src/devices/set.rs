//! The devices of one boot, held together so that a snapshot can stop
//! them all at once and read their state.
use std::sync::{Arc, Mutex, MutexGuard};

use super::acpi_pm::AcpiPm;
use super::pci_host::PciHost;
use super::i8042::I8042;
use super::serial::Serial;
use super::virtio::block::Block;
use super::virtio::mmio::MmioTransport;
use super::virtio::net::{Net, Tap};
use super::vmgenid::VmGenId;
use crate::snapshot::{DevicesState, SnapshotError};

pub type BlockDevice = Arc<Mutex<MmioTransport<Block>>>;
pub type NetDevice = Arc<Mutex<MmioTransport<Net<Tap>>>>;

pub struct DeviceSet {
    pub serial: Arc<Mutex<Serial>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub acpi_pm: Arc<Mutex<AcpiPm>>,
    pub pci_host: Arc<Mutex<PciHost>>,
    pub blocks: Vec<BlockDevice>,
    pub nets: Vec<NetDevice>,
    pub vmgenid: Arc<Mutex<VmGenId>>,
}

/// Every device locked: no device thread (net RX) can touch guest memory
/// or device state until this is dropped.
pub struct LockedDevices<'a> {
    serial: MutexGuard<'a, Serial>,
    i8042: MutexGuard<'a, I8042>,
    acpi_pm: MutexGuard<'a, AcpiPm>,
    pci_host: MutexGuard<'a, PciHost>,
    blocks: Vec<MutexGuard<'a, MmioTransport<Block>>>,
    nets: Vec<MutexGuard<'a, MmioTransport<Net<Tap>>>>,
    vmgenid: MutexGuard<'a, VmGenId>,
}

/// Locks a device (or other plain state) even if a thread panicked holding
/// it: device state is registers and queues, still usable.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl DeviceSet {
    pub fn lock_all(&self) -> LockedDevices<'_> {
        LockedDevices {
            serial: lock(&self.serial),
            i8042: lock(&self.i8042),
            acpi_pm: lock(&self.acpi_pm),
            pci_host: lock(&self.pci_host),
            blocks: self.blocks.iter().map(|b| lock(b)).collect(),
            nets: self.nets.iter().map(|n| lock(n)).collect(),
            vmgenid: lock(&self.vmgenid),
        }
    }
}

/// Where a clone point put a disk: the origin VM now writes `origin`, the
/// clone starts on `clone`; both are overlays over the frozen file.
#[derive(Clone, Debug)]
pub struct ForkedDisk {
    pub index: usize,
    pub origin: std::path::PathBuf,
    pub clone: std::path::PathBuf,
    pub clone_identity: crate::devices::virtio::block::DiskIdentity,
}

impl LockedDevices<'_> {
    /// A clone point (VM paused): every writable disk continues on a new
    /// overlay `<dir>/vdX.<origin>.ovl` over its current file, which is
    /// frozen from now on, and gets a twin `<dir>/vdX.<clone>.ovl` for the
    /// clone. Read-only disks are shared as they are.
    pub fn fork_disks(&mut self, dir: &std::path::Path, origin: &str, clone: &str) -> Result<Vec<ForkedDisk>, SnapshotError> {
        use crate::devices::virtio::overlay::Overlay;
        let mut out = Vec::new();
        for (index, b) in self.blocks.iter_mut().enumerate() {
            let dev = b.device_mut();
            if dev.read_only() {
                continue;
            }
            let letter = (b'a' + index as u8) as char;
            let origin_path = dir.join(format!("vd{letter}.{origin}.ovl"));
            let clone_path = dir.join(format!("vd{letter}.{clone}.ovl"));
            let fail = |e: String| SnapshotError::Device { device: format!("vd{letter}"), reason: e };
            let frozen = dev.fork(&origin_path).map_err(|e| fail(e.to_string()))?;
            Overlay::create(&frozen.path, &clone_path).map_err(|e| fail(e.to_string()))?;
            let clone_identity =
                crate::devices::virtio::block::DiskIdentity::of(&clone_path).map_err(|e| fail(e.to_string()))?;
            out.push(ForkedDisk { index, origin: origin_path, clone: clone_path, clone_identity });
        }
        Ok(out)
    }

    /// Every device's state; a device that cannot say its state fails the
    /// whole snapshot with its name.
    pub fn state(&self) -> Result<DevicesState, SnapshotError> {
        Ok(DevicesState {
            serial: self.serial.state(),
            i8042: self.i8042.state(),
            acpi_pm: self.acpi_pm.state(),
            pci_host: self.pci_host.state(),
            blocks: self
                .blocks
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    let s = b.device().state().map_err(|e| SnapshotError::Device {
                        device: format!("vd{}", (b'a' + i as u8) as char),
                        reason: e.to_string(),
                    })?;
                    Ok((b.state(), s))
                })
                .collect::<Result<_, SnapshotError>>()?,
            nets: self.nets.iter().map(|n| (n.state(), n.device().state())).collect(),
            vmgenid: self.vmgenid.state(),
        })
    }
}
