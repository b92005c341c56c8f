//! A D-Script policy from the user: parsed and type-checked, or diagnosed.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(src) = std::str::from_utf8(data) {
        let _ = dscript::check_with(src, &[], &[]);
    }
});
