//! A line on the monitor's control socket, as the monitor decodes it.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<dvisor_monitor::control::ControlEnvelope>(data);
});
