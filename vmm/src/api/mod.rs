//! The support API: how a monitor in another process sees and drives the
//! VM (docs/support-api.md). The wire types, framing and descriptor
//! passing are the `dvisor-api` crate, shared with the monitor; here is
//! the server side and what publishes events.
mod convert;
pub mod events;
pub mod server;

pub use dvisor_api::protocol;
pub use events::{ConsoleTee, EventHub};
pub use server::{ApiServer, BootHandles, CurrentBoot, DeviceHandle};
