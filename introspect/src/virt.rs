//! Reading guest kernel virtual memory: the one small interface task walking and stack
//! unwinding use, implemented over the page walker for real guests and over a sparse map
//! for tests.

use std::collections::HashMap;

use crate::paging::VirtMemory;

/// Reads guest kernel virtual memory. Every error is a plain message: the caller
/// decides whether a hole is fatal (a torn task list) or just ends a walk.
pub trait KernelMemory {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String>;

    fn read_u64(&self, va: u64) -> Result<u64, String> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, va: u64) -> Result<u32, String> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_i32(&self, va: u64) -> Result<i32, String> {
        self.read_u32(va).map(|v| v as i32)
    }
}

impl KernelMemory for VirtMemory<'_> {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        VirtMemory::read_virt(self, va, buf).map_err(|e| e.to_string())
    }
}

/// Sparse virtual memory in 4 KiB pages, for tests and fuzzing.
#[derive(Debug, Default, Clone)]
pub struct SparseMemory {
    pages: HashMap<u64, Box<[u8; 4096]>>,
}

impl SparseMemory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `bytes` at `va`, creating pages as needed.
    pub fn write(&mut self, va: u64, bytes: &[u8]) {
        let mut done = 0usize;
        while done < bytes.len() {
            let a = va.wrapping_add(done as u64);
            let off = (a & 0xfff) as usize;
            let n = (4096 - off).min(bytes.len() - done);
            let page = self
                .pages
                .entry(a & !0xfff)
                .or_insert_with(|| Box::new([0u8; 4096]));
            page[off..off + n].copy_from_slice(&bytes[done..done + n]);
            done += n;
        }
    }

    pub fn write_u64(&mut self, va: u64, v: u64) {
        self.write(va, &v.to_le_bytes());
    }

    pub fn write_u32(&mut self, va: u64, v: u32) {
        self.write(va, &v.to_le_bytes());
    }
}

impl KernelMemory for SparseMemory {
    fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), String> {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = va.wrapping_add(i as u64);
            let page = self
                .pages
                .get(&(a & !0xfff))
                .ok_or_else(|| format!("{a:#x} is not mapped"))?;
            *b = page[(a & 0xfff) as usize];
        }
        Ok(())
    }
}
