//! D-System Monitor: a process outside the VM that attaches to a VMM
//! through the support API, maps guest memory, follows its events and
//! serves the operator's control socket (docs/monitor.md).
pub mod control;
pub mod core;
pub mod daemon;
pub mod error;
pub mod guest_memory;

pub mod paging;
pub mod patch;
pub mod paths;
pub mod profile;
pub mod services;
pub mod vmi;

pub use control::{ControlClient, ControlRequest};
pub use daemon::Monitor;
pub use error::MonitorError;
pub use guest_memory::GuestMemoryMap;
