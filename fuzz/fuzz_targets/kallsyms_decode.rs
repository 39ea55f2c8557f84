//! The kallsyms tables live in guest memory: counts, offsets, the token table and the
//! compressed names stream are all hostile. Decoding must end with a table or an error,
//! within bounded memory, and lookups on whatever it accepted must not panic.
//!
//! Input: six u16 table offsets (num_syms, names, offsets, relative_base, token_table,
//! token_index) into a 64 KiB kernel image that starts at `_text`'s physical address 0,
//! then the image bytes.
#![no_main]
use introspect::kallsyms::{self, KernelImage, Tables, START_KERNEL_MAP};
use introspect::memory::BufferMemory;

const MEM: usize = 64 << 10;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let off = |i: usize| u64::from(u16::from_le_bytes([data[2 * i], data[2 * i + 1]]));
    let va = |i: usize| START_KERNEL_MAP + off(i);
    let tables = Tables {
        num_syms: va(0),
        names: va(1),
        offsets: va(2),
        relative_base: va(3),
        token_table: va(4),
        token_index: va(5),
    };
    let mut ram = data[12..].to_vec();
    ram.resize(MEM, 0);
    let mem = BufferMemory(ram);
    // phys_base 0: image VA START_KERNEL_MAP + x is guest-physical x.
    if let Ok(table) = kallsyms::decode(&mem, KernelImage { phys_base: 0 }, tables) {
        for s in table.symbols().iter().take(64) {
            let _ = table.lookup(&s.name, Some(s.sympos));
            let _ = table.symbolize(s.addr.wrapping_add(1));
        }
        let _ = table.lookup("_text", None);
        let _ = table.symbolize(u64::MAX);
    }
});
