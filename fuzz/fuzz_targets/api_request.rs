//! A support-API request line from a client: decoded or refused, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = dvisor_api::protocol::decode_request(data);
});
