//! The module list is hostile: `modules`, every `struct module`, its `mod_kallsyms`,
//! export table, core layout and ORC table pointers are guest memory. Enumerating the
//! modules, reading their code ranges and ORC tables, and symbolizing addresses in them
//! (what the unwinder does when a trace leaves vmlinux) must end with a result or an
//! error, never panic or hang.
//!
//! Input: the first 64 bytes pick the layout offsets and the probe addresses; the rest
//! is 64 KiB of kernel virtual memory at a fixed base, so pointers can go anywhere in it.
#![no_main]
use introspect::modules::{self, ExportFormat, LazyModules, ModuleLayout};
use introspect::virt::SparseMemory;

const BASE: u64 = 0xffff_ffff_c000_0000;
const MEM: usize = 64 << 10;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 64 {
        return;
    }
    let w = |i: usize| u64::from(u16::from_le_bytes([data[2 * i], data[2 * i + 1]]));
    let b = |i: usize| w(i) & 0x1ff;
    let layout = ModuleLayout {
        state: b(0),
        list: b(1),
        name: b(2),
        name_len: w(3) & 0x7f,
        kallsyms: b(4),
        syms: b(5),
        num_syms: b(6),
        core: (data[60] & 1 == 0).then(|| (b(7), b(8))),
        core_text_size: (data[60] & 2 == 0).then(|| b(9)),
        orc: (data[60] & 4 == 0).then(|| (b(10), b(11), b(12))),
        symtab: b(13),
        num_symtab: b(14),
        strtab: b(15),
        typetab: b(16),
        export: if data[60] & 8 == 0 {
            ExportFormat::Relative {
                value: 0,
                name: 4,
                size: 12,
            }
        } else {
            ExportFormat::Absolute {
                value: 0,
                name: 8,
                size: 16,
            }
        },
    };
    let head = BASE + w(17);
    let mut mem = SparseMemory::new();
    let mut ram = data[64..].to_vec();
    ram.resize(MEM, 0);
    mem.write(BASE, &ram);
    if let Ok(list) = modules::enumerate(&mem, &layout, head) {
        assert!(list.len() <= modules::MAX_MODULES);
    }
    if let Ok(code) = modules::code_ranges(&mem, &layout, head) {
        for c in &code {
            assert!(c.text.0 <= c.text.1 && c.text.1 <= c.core.1);
            let _ = c.orc_table(&mem);
        }
    }
    let lazy = LazyModules::new(&mem, Some((head, &layout)));
    for i in 18..30 {
        let addr = BASE + w(i) * 4;
        let _ = lazy.is_text(addr);
        let _ = lazy.orc(addr);
        let _ = lazy.symbolize(addr);
    }
});
