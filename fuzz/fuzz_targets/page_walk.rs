//! Guest page tables are hostile: a walk and a virtual read must end, without panicking,
//! whatever the tables hold (self-references, entries pointing outside RAM, huge leaves).
//!
//! Input: 8 bytes CR3, 1 flag byte (bit 0: LA57, bit 1: keep CR3's high bits instead of
//! confining the root to the 64 KiB of memory), then guest-physical memory from 0 (zero
//! padded or cut to 64 KiB). The VAs read are a few fixed kernel addresses plus the
//! first eight u64s of memory, so tables and targets can point at each other.
#![no_main]
use introspect::memory::BufferMemory;
use introspect::paging::{PageTables, VirtMemory};

const MEM: usize = 64 << 10;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 9 {
        return;
    }
    let mut cr3 = u64::from_le_bytes(data[..8].try_into().unwrap());
    let flags = data[8];
    if flags & 2 == 0 {
        cr3 &= 0xffff;
    }
    let mut ram = data[9..].to_vec();
    ram.resize(MEM, 0);
    let mut vas = vec![
        0xffff_ffff_8100_0000u64,
        0xffff_8880_0000_0ff8,
        0xffff_c900_0000_0ffc,
        0xff11_0000_0000_0000,
        0x0000_8000_0000_0000,
        u64::MAX - 7,
        0,
    ];
    for chunk in ram[..64].chunks_exact(8) {
        vas.push(u64::from_le_bytes(chunk.try_into().unwrap()));
    }
    let mem = BufferMemory(ram);
    let pt = PageTables::new(cr3, flags & 1 != 0);
    let virt = VirtMemory::new(&mem, pt);
    let mut buf = vec![0u8; 9000];
    for &va in &vas {
        let _ = pt.translate(&mem, va);
        let _ = virt.read_u64_virt(va);
        let _ = virt.read_u32_virt(va.wrapping_add(0xffe));
        let len = (va as usize & 0x1fff) + 1;
        let _ = virt.read_virt(va, &mut buf[..len.min(9000)]);
    }
});
