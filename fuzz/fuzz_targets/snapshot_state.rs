//! A snapshot's state.bin from disk: decoded or refused as corrupt.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dvisor_vmm::snapshot::format::decode_state(std::path::Path::new("state.bin"), data);
});
