//! The KASLR slide: MSR_LSTAR holds the runtime address of
//! `entry_SYSCALL_64`, whose link-time address the profile knows.
use super::VmiError;
use crate::profile::KernelProfile;

pub const MSR_LSTAR: u32 = 0xc000_0082;

/// KASLR moves the kernel in 2 MiB steps (CONFIG_PHYSICAL_ALIGN).
const KASLR_ALIGN: u64 = 0x20_0000;

pub fn slide_from_lstar(profile: &KernelProfile, lstar: u64) -> Result<u64, VmiError> {
    let entry = profile
        .addr_of("entry_SYSCALL_64")
        .ok_or_else(|| VmiError::Profile("symbol entry_SYSCALL_64".into()))?;
    let slide = lstar.wrapping_sub(entry);
    if slide % KASLR_ALIGN != 0 {
        return Err(VmiError::Slide(format!(
            "MSR_LSTAR {lstar:#x} minus entry_SYSCALL_64 {entry:#x} is not a multiple of 2 MiB: the guest runs another kernel than the profile's, or page-table isolation moved the syscall entry"
        )));
    }
    Ok(slide)
}
