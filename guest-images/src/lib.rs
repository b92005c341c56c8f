//! Builds the default guest image and the carrier VM from Debian packages.
//!
//! - [`build_guest_image`] / [`current_guest_image`]: the default guest
//!   (Debian cloud kernel, busybox initramfs with the demo service).
//! - [`guest_vmlinux`]: that image's kernel ELF alone (fetched and cached
//!   without building the image when none is built).
//! - [`carrier`]: a QEMU-TCG VM with a real /dev/kvm for hosts without
//!   hardware virtualization.
//!
//! See docs/images.md and docs/carrier.md.

pub mod apt;
mod base;
pub mod cache;
pub mod carrier;
pub mod cpio;
pub mod deb;
mod error;
mod guest;
mod kernel;
pub mod kernel_payload;
pub mod modules;
pub mod service;
mod tool;

pub use cache::cache_root;
pub use error::ImageError;
pub use guest::{
    build_guest_image, current_guest_image, load as load_guest_image, read_manifest, BuildOptions, FileEntry, GuestImage, Manifest,
    fast_beat_cmdline, DEFAULT_CMDLINE, FAST_BEAT,
};
pub use kernel::guest_vmlinux;
