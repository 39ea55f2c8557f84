//! The guest's BTF blob is hostile: parsing and every query must end, without panicking,
//! on any bytes. Queries use the blob's own type names (and one-letter member names the
//! fuzzer can easily produce) so they reach the member search, not just the name index.
#![no_main]
use introspect::btf::Btf;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(btf) = Btf::parse(data) else { return };
    let _ = btf.member_offset("task_struct", "thread.sp");
    let _ = btf.member_size("task_struct", "thread_info.cpu");
    let _ = btf.type_size("pt_regs");
    let count = u32::try_from(btf.type_count()).unwrap_or(u32::MAX);
    for id in 0..=count.min(64) {
        let _ = btf.size_of(id);
        let Some(name) = btf.name_of(id).map(str::to_string) else {
            continue;
        };
        let _ = btf.type_by_name(&name);
        let _ = btf.type_size(&name);
        for path in ["a", "b", "a.b", "a.b.c", "ab"] {
            let _ = btf.member_offset(&name, path);
            let _ = btf.member_size(&name, path);
        }
    }
});
