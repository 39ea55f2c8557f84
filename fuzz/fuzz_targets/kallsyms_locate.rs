//! Finding the kallsyms tables by their shape: the whole kernel image is hostile. The
//! search must end with tables or an error, within its step budget, and whatever it
//! accepts must decode without panicking.
//!
//! Input: the image bytes from `_text` (which is at guest-physical 0 here).
#![no_main]
use introspect::kallsyms::{self, locate, KernelImage, START_KERNEL_MAP};
use introspect::memory::BufferMemory;

const TEXT: u64 = 0xffff_ffff_8100_0000;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(found) = locate::locate(TEXT, data) {
        let image = KernelImage {
            phys_base: START_KERNEL_MAP.wrapping_sub(TEXT),
        };
        let _ = kallsyms::decode(&BufferMemory(data.to_vec()), image, found.tables);
    }
});
