//! D-System Monitor: VMI, live patching and policy from outside the guest.
//!
//! Not built yet: the support API it attaches to lands with issue 3. See
//! docs/architecture.md for the design it will follow.
