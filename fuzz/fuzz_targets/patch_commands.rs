//! A patch command file from the user: parsed or refused.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = dvisor_monitor::patch::CommandFile::parse("fuzz.cmd", text);
    }
});
