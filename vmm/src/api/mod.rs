//! The support API: how a monitor in another process sees and drives the
//! VM (docs/support-api.md).
mod convert;
pub mod events;
pub mod fdpass;
pub mod protocol;
pub mod server;

pub use events::{ConsoleTee, EventHub};
pub use server::{ApiServer, BootHandles, CurrentBoot, DeviceHandle};
