//! The support API (docs/support-api.md): what a monitor in another
//! process and the VMM say to each other. The wire types and framing
//! (`protocol`), descriptor passing for the guest-memory memfd
//! (`fdpass`), the client a monitor talks through (`client`), and an
//! event fan-out both sides use (`events`).
//!
//! The VMM (server) and the monitor (client) both depend on this crate and
//! it depends on neither, so the monitor builds without any KVM code and
//! could sit on any VMM that serves this protocol.
pub mod client;
pub mod events;
pub mod fdpass;
pub mod owner;
pub mod protocol;

pub use client::{ClientError, MemoryGrant, VmmClient};
pub use events::EventHub;

/// CLOCK_MONOTONIC in nanoseconds: the clock of every `t_ns` on the wire.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, and on failure `ts` stays zero.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}
