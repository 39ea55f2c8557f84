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

/// The entries of a circular `list_head` list: the address of each containing object
/// (`member` is the list_head's offset in it), in list order. At most `max` entries; a
/// list that loops without coming back to the head is an error, so a hostile or torn
/// list cannot loop. Errors are plain messages for the caller's error type.
///
/// The loop is found with Brent's algorithm (a saved node, re-saved at each power of two
/// steps): constant memory and no hashing, and it stops within about twice the length of
/// the list's tail and loop.
pub fn walk_list(
    m: &dyn KernelMemory,
    head: u64,
    member: u64,
    max: usize,
) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    let mut cur = m
        .read_u64(head)
        .map_err(|e| format!("list head at {head:#x}: {e}"))?;
    let (mut saved, mut power, mut steps) = (head, 1usize, 0usize);
    while cur != head {
        if out.len() >= max {
            return Err(format!("more than {max} entries"));
        }
        if cur == saved {
            return Err(format!(
                "{cur:#x} is linked twice without reaching the head"
            ));
        }
        steps += 1;
        if steps == power {
            saved = cur;
            power = power.saturating_mul(2);
            steps = 0;
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

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: u64 = 0xffff_8880_0000_0000;

    /// Links HEAD → nodes[0] → … → nodes[n-1] → `last_to`.
    fn chain(nodes: &[u64], last_to: u64) -> SparseMemory {
        let mut m = SparseMemory::new();
        let mut prev = HEAD;
        for &n in nodes {
            m.write_u64(prev, n);
            prev = n;
        }
        m.write_u64(prev, last_to);
        m
    }

    #[test]
    fn walks_a_list_and_finds_loops_that_miss_the_head() {
        let nodes: Vec<u64> = (1..=50).map(|i| HEAD + i * 0x100).collect();
        let m = chain(&nodes, HEAD);
        let got = walk_list(&m, HEAD, 0x10, 100).unwrap();
        assert_eq!(got, nodes.iter().map(|n| n - 0x10).collect::<Vec<_>>());
        assert!(walk_list(&m, HEAD, 0, 49)
            .unwrap_err()
            .contains("more than 49"));
        // A tail of 30 nodes into a loop of 20 (back to node 30), and a node that links
        // to itself: both found long before `max`.
        for (back_to, what) in [(nodes[30], "loop"), (nodes[49], "self")] {
            let m = chain(&nodes, back_to);
            let err = walk_list(&m, HEAD, 0, 1_000_000).unwrap_err();
            assert!(err.contains("linked twice"), "{what}: {err}");
        }
        // An empty list and an unreadable head.
        assert_eq!(walk_list(&chain(&[], HEAD), HEAD, 0, 10).unwrap(), []);
        assert!(walk_list(&SparseMemory::new(), HEAD, 0, 10).is_err());
    }
}
