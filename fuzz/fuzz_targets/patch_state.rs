//! The monitor's patch state file, which a revert writes back into guest
//! code: loaded whole and valid, or refused.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dvisor_monitor::services::patching::check_state_file(data);
});
