//! A bundle's ELF object is checked and linked on the host: neither may panic on any bytes.
#![no_main]
use std::collections::HashMap;

struct Anything;
impl patcher::linker::SymbolResolver for Anything {
    fn resolve(&self, name: &str, _: Option<u32>) -> Result<u64, String> {
        Ok(0xffff_ffff_8100_0000 + (name.len() as u64) * 16)
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let manifest = patcher::manifest::Manifest::from_json(
        r#"{"name":"f","target":{"release":"r"},"functions":[{"old":"a","new":"b"}]}"#,
    )
    .expect("valid manifest");
    let _ = patcher::object_check::check(&manifest, data);
    let _ = patcher::linker::link(data, 0xffff_ffff_c000_0000, 1 << 20, &Anything, &HashMap::new());
});
