//! D-Visor: a minimal KVM VMM that boots a stock Linux guest.
//!
//! It knows nothing of Linux internals beyond the boot protocol; the
//! monitor gets everything else through the support API (issue 3).
pub mod acpi;
pub mod aml;
pub mod api;
pub mod boot;
pub mod config;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod layout;
pub mod lazy_memory;
pub mod lifecycle;
pub mod memory;
pub mod signals;
pub mod snapshot;
pub mod vcpu;
pub mod vcpu_control;
pub mod vm;

pub use config::{DiskConfig, NetConfig, OnReboot, VmConfig};
pub use error::VmmError;
pub use vm::{run, RestoreFrom, RunOutcome};
