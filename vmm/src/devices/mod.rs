//! Emulated devices and the port-I/O bus that routes vCPU exits to them.
pub mod acpi_pm;
pub mod bus;
pub mod i8042;
pub mod irq;
pub mod keymap;
pub mod serial;
pub mod set;
pub mod virtio;
pub mod vmgenid;

pub use bus::{MmioBus, MmioDevice, PioBus, PioDevice};
