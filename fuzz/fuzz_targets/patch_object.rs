//! A patch object (ELF relocatable) from the user: parsed or refused.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dvisor_monitor::patch::PatchObject::parse("fuzz.o", data);
});
