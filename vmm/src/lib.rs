//! D-Visor: a minimal KVM VMM.
