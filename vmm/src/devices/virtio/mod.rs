//! Virtio devices on the virtio-mmio transport (virtio 1.2, "modern" only).
//!
//! The transport (`mmio`) owns the register state and the queues; a device
//! (`block`, `net`) only turns descriptor chains into I/O. Everything a
//! chain says comes from the guest and is hostile: a bad chain fails that
//! request, never the VMM.
pub mod block;
pub mod chain;
pub mod disk;
pub mod mmio;
pub mod net;
pub mod overlay;
pub mod stats;
#[cfg(test)]
mod testing;

use std::io;
use std::path::PathBuf;

use virtio_queue::Queue;

use crate::memory::GuestMemory;

pub use mmio::{MmioTransport, MMIO_LEN};

/// Feature bits of the transport, common to every device type.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;

/// Device type ids (virtio 1.2 §5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

pub use crate::devices::irq::{EventFdIrq, IrqLine};

/// What a device type adds to the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Device-specific feature bits; the transport adds VERSION_1 and
    /// INDIRECT_DESC.
    fn features(&self) -> u64;
    /// The largest size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device configuration space, read through the window at 0x100.
    fn config(&self) -> &[u8];
    /// Consumes the available chains of queue `index`. Returns whether it
    /// put anything in the used ring, i.e. whether the guest may need an
    /// interrupt.
    fn process_queue(&mut self, index: usize, queue: &mut Queue, mem: &GuestMemory) -> bool;
    /// The driver reset the device: drop in-flight state.
    fn reset(&mut self) {}
}

/// Errors building a device (host side). Guest errors never surface here:
/// they fail the guest's own request.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("cannot open disk image {0}: {1}")]
    DiskOpen(PathBuf, #[source] io::Error),
    #[error("disk image {path} is {size} bytes, not a multiple of the 512-byte sector size (resize it, e.g. `truncate -s %512 {path}`)")]
    DiskSize { path: PathBuf, size: u64 },
    #[error("cannot open tap device {0}: {1} (does it exist, and may this user use it?)")]
    TapOpen(String, #[source] io::Error),
    #[error("invalid tap device name {0:?}: 1 to 15 bytes, no NUL")]
    TapName(String),
    #[error("virtio queue: {0}")]
    Queue(String),
    /// Opening, checking or flushing a disk image (raw or overlay).
    #[error(transparent)]
    Disk(#[from] disk::DiskError),
    /// An image that cannot stand in for a device's current one, or a
    /// saved device state that does not fit the image it is rebuilt on.
    #[error("disk {path}: {reason}")]
    ImageMismatch { path: PathBuf, reason: String },
    /// Saved state (a snapshot) that does not fit the device.
    #[error(transparent)]
    State(#[from] crate::devices::DeviceStateError),
}
