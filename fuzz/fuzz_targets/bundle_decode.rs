//! Bundle files come from users and the network: decoding must never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    patcher::bundle::fuzz_decode(data);
});
