//! Reading guest kernel virtual memory: the one small interface task walking and stack
//! unwinding use, implemented over the page walker for real guests and over a sparse map
//! for tests.

use std::collections::{HashMap, HashSet};

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

/// The entries of a circular `list_head` list: the address of each containing object
/// (`member` is the list_head's offset in it), in list order. At most `max` entries; a
/// node seen twice before the head comes back is an error, so a hostile or torn list
/// cannot loop. Errors are plain messages for the caller's error type.
pub fn walk_list(
    m: &dyn KernelMemory,
    head: u64,
    member: u64,
    max: usize,
) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut cur = m
        .read_u64(head)
        .map_err(|e| format!("list head at {head:#x}: {e}"))?;
    while cur != head {
        if out.len() >= max {
            return Err(format!("more than {max} entries"));
        }
        if !seen.insert(cur) {
            return Err(format!(
                "{cur:#x} is linked twice without reaching the head"
            ));
        }
        out.push(cur.wrapping_sub(member));
        cur = m
            .read_u64(cur)
            .map_err(|e| format!("link at {cur:#x}: {e}"))?;
    }
    Ok(out)
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
