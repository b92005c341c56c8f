//! Emulated devices and the port-I/O bus that routes vCPU exits to them.
pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod irq;
pub mod keymap;
pub mod pci_host;
pub mod serial;
pub mod set;
pub mod virtio;
pub mod vmgenid;

pub use bus::{MmioBus, MmioDevice, PioBus, PioDevice};

/// Why a device could not be rebuilt from saved state. Saved state comes
/// from a file and is untrusted: every value a device could not have
/// produced itself is refused here rather than trusted into a panic or a
/// device the guest could not have driven into.
#[derive(Debug, thiserror::Error)]
pub enum DeviceStateError {
    /// A value no run of the device could have produced.
    #[error("{device} state is invalid: {reason}")]
    Invalid { device: &'static str, reason: String },
    /// Restoring raised the device's interrupt (a pending one is replayed)
    /// and its line could not be signalled.
    #[error("{device} state: cannot raise the interrupt: {source}")]
    Interrupt {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl DeviceStateError {
    /// Shorthand for [`DeviceStateError::Invalid`].
    pub(crate) fn invalid(device: &'static str, reason: impl Into<String>) -> Self {
        DeviceStateError::Invalid { device, reason: reason.into() }
    }
}
