//! Walking the guest's x86-64 page tables (4- and 5-level) from guest-physical memory,
//! and reading kernel virtual memory through them (guest-introspection.md §1.2–1.3).
//!
//! Every table entry comes from the guest and may be garbage: a walk is at most one read
//! per level (five at most), so a table that points at itself yields an odd translation or
//! an error, never a loop. Reads are split per 4 KiB page because virtually contiguous
//! memory (vmalloc'd stacks, modules) is not physically contiguous.

use std::cell::RefCell;

use crate::memory::{read_u64, GuestPhysMemory, MemError};

/// Size of a base page.
pub const PAGE_SIZE: u64 = 1 << 12;
/// Size of a 2 MiB leaf (PDE with PS).
pub const LARGE_PAGE_SIZE: u64 = 1 << 21;
/// Size of a 1 GiB leaf (PDPTE with PS).
pub const HUGE_PAGE_SIZE: u64 = 1 << 30;

/// Bits 51:12: the next table or a 4 KiB frame (also the CR3 base).
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
/// CR3 bit 12 selects the PTI user half of an 8 KiB PGD pair.
const PTI_USER_PGTABLE_BIT: u64 = 1 << 12;

const P: u64 = 1 << 0;
const RW: u64 = 1 << 1;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// Slots of [`VirtMemory`]'s direct-mapped translation cache (a power of two).
const CACHE_SLOTS: usize = 4096;
/// Slots of [`VirtMemory`]'s cache of 2 MiB regions (a power of two).
const REGION_SLOTS: usize = 512;

/// Errors translating or reading guest virtual addresses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PagingError {
    #[error("virtual address {0:#x} is not canonical")]
    NonCanonical(u64),
    #[error("virtual address {va:#x} is not mapped ({} entry not present)", level_name(*level))]
    NotPresent { va: u64, level: u8 },
    #[error("virtual address {va:#x}: {} entry {entry:#x} sets PS where it is reserved", level_name(*level))]
    Reserved { va: u64, level: u8, entry: u64 },
    #[error("a read of {len} bytes at {va:#x} runs past the top of the address space")]
    Wraps { va: u64, len: usize },
    #[error("{0}")]
    Memory(#[from] MemError),
}

/// Name of a paging level (5 = PML5 … 1 = PT), for messages.
pub fn level_name(level: u8) -> &'static str {
    match level {
        5 => "PML5",
        4 => "PML4",
        3 => "PDPT",
        2 => "PD",
        1 => "PT",
        _ => "?",
    }
}

/// The kernel PGD's physical address from any CR3 value: bits 51:12, with bit 12 cleared
/// because PTI PGDs are 8 KiB pairs whose second page is the user half (§1.2). PCID bits
/// and the no-flush bit are dropped.
pub fn kernel_pgd(cr3: u64) -> u64 {
    cr3 & ADDR_MASK & !PTI_USER_PGTABLE_BIT
}

/// Result of a walk: the physical address of the VA and the leaf that maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub pa: u64,
    /// 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// RW set at every level.
    pub writable: bool,
    /// NX set at any level.
    pub nx: bool,
}

/// One address space: the top table's physical address and the paging depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTables {
    root: u64,
    levels: u8,
}

impl PageTables {
    /// From a CR3 value (user or kernel half, any PCID) and CR4.LA57.
    pub fn new(cr3: u64, la57: bool) -> Self {
        PageTables {
            root: kernel_pgd(cr3),
            levels: if la57 { 5 } else { 4 },
        }
    }

    /// Physical address of the top-level table.
    pub fn root(&self) -> u64 {
        self.root
    }

    /// 4 or 5.
    pub fn levels(&self) -> u8 {
        self.levels
    }

    /// Whether `va` is sign-extended from bit 47 (4-level) or bit 56 (5-level).
    pub fn is_canonical(&self, va: u64) -> bool {
        let bits = 12 + 9 * u32::from(self.levels); // 48 or 57
        let shift = 64 - bits;
        (((va << shift) as i64) >> shift) as u64 == va
    }

    /// Walks the tables for `va`. At most `levels` reads of guest memory.
    pub fn translate(
        &self,
        mem: &dyn GuestPhysMemory,
        va: u64,
    ) -> Result<Translation, PagingError> {
        if !self.is_canonical(va) {
            return Err(PagingError::NonCanonical(va));
        }
        match walk(mem, va, self.root, self.levels, 1)? {
            Walk::Leaf(t) => Ok(t),
            // Level 1 always ends in a leaf or an error.
            Walk::Table(_) => Err(PagingError::NotPresent { va, level: 1 }),
        }
    }

    /// Walks the levels above the page table for `va`: its whole 2 MiB region is either
    /// mapped by one large leaf, or described by one page table.
    fn region(&self, mem: &dyn GuestPhysMemory, va: u64) -> Result<Region, PagingError> {
        if !self.is_canonical(va) {
            return Err(PagingError::NonCanonical(va));
        }
        Ok(match walk(mem, va, self.root, self.levels, 2)? {
            Walk::Leaf(t) => Region::Mapped(t.pa & !(LARGE_PAGE_SIZE - 1)),
            Walk::Table(pt) => Region::Table(pt),
        })
    }
}

/// Where a walk stopped.
enum Walk {
    /// At a leaf.
    Leaf(Translation),
    /// Above `to_level` without a leaf: the physical address of the next table.
    Table(u64),
}

/// Walks `va` from `table`, a level-`from` table, down to level `to` (at most one read
/// per level). The permission bits count only the levels walked: callers that want them
/// walk from the root.
fn walk(
    mem: &dyn GuestPhysMemory,
    va: u64,
    mut table: u64,
    from: u8,
    to: u8,
) -> Result<Walk, PagingError> {
    let mut writable = true;
    let mut nx = false;
    for level in (to..=from).rev() {
        let shift = 12 + 9 * u32::from(level - 1);
        let index = (va >> shift) & 0x1ff;
        let entry = read_u64(mem, table + index * 8)?;
        if entry & P == 0 {
            return Err(PagingError::NotPresent { va, level });
        }
        writable &= entry & RW != 0;
        nx |= entry & NX != 0;
        let page_size = match level {
            1 => Some(PAGE_SIZE),
            2 | 3 if entry & PS != 0 => Some(1u64 << shift),
            4 | 5 if entry & PS != 0 => return Err(PagingError::Reserved { va, level, entry }),
            _ => None,
        };
        if let Some(page_size) = page_size {
            // The frame is bits 51:shift; for large leaves this drops the PAT bit 12.
            let frame = entry & ADDR_MASK & !(page_size - 1);
            return Ok(Walk::Leaf(Translation {
                pa: frame | (va & (page_size - 1)),
                page_size,
                writable,
                nx,
            }));
        }
        table = entry & ADDR_MASK;
    }
    Ok(Walk::Table(table))
}

/// A 2 MiB region of virtual memory as the levels above the page table leave it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Region {
    /// One 2 MiB or 1 GiB leaf maps it: the physical address of the region's first byte.
    Mapped(u64),
    /// A page table (its physical address) maps its 4 KiB pages.
    Table(u64),
}

/// A direct-mapped cache keyed by a page or region number: a key's slot is its low
/// bits, O(1) however the guest lays out its addresses; a collision just replaces.
struct DirectMapped<V> {
    slots: RefCell<Vec<(u64, V)>>,
}

/// A key no page or region number can be (they have at most 52 bits).
const NO_KEY: u64 = u64::MAX;

impl<V: Copy> DirectMapped<V> {
    /// `slots` is a power of two; `empty` fills the unused ones.
    fn new(slots: usize, empty: V) -> Self {
        DirectMapped {
            slots: RefCell::new(vec![(NO_KEY, empty); slots]),
        }
    }

    /// The value for `key`, from the cache or from `fill` (then cached).
    fn get_or_try<E>(&self, key: u64, fill: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        let slot = (key as usize) & (self.slots.borrow().len() - 1);
        if let Some(&(k, v)) = self.slots.borrow().get(slot) {
            if k == key {
                return Ok(v);
            }
        }
        let v = fill()?;
        if let Some(s) = self.slots.borrow_mut().get_mut(slot) {
            *s = (key, v);
        }
        Ok(v)
    }

    fn clear(&self) {
        for s in self.slots.borrow_mut().iter_mut() {
            s.0 = NO_KEY;
        }
    }
}

/// Guest virtual memory read through one set of page tables, with a small cache of
/// translated pages. Only valid while the guest's tables do not change (a paused VM, a
/// snapshot): drop it or call [`VirtMemory::clear_cache`] after the guest ran.
pub struct VirtMemory<'a> {
    mem: &'a dyn GuestPhysMemory,
    pt: PageTables,
    /// VA page number → PA of that 4 KiB page.
    cache: DirectMapped<u64>,
    /// VA >> 21 → what maps that 2 MiB region: the upper
    /// levels of a walk, as a CPU's paging-structure caches keep them. A page missing
    /// from `cache` then costs one read (its page-table entry) or none (a large leaf).
    regions: DirectMapped<Region>,
}

impl<'a> VirtMemory<'a> {
    pub fn new(mem: &'a dyn GuestPhysMemory, pt: PageTables) -> Self {
        VirtMemory {
            mem,
            pt,
            cache: DirectMapped::new(CACHE_SLOTS, 0),
            regions: DirectMapped::new(REGION_SLOTS, Region::Table(0)),
        }
    }

    pub fn pgtables(&self) -> &PageTables {
        &self.pt
    }

    pub fn phys(&self) -> &dyn GuestPhysMemory {
        self.mem
    }

    /// Forgets every cached translation.
    pub fn clear_cache(&self) {
        self.cache.clear();
        self.regions.clear();
    }

    /// A full, uncached walk (flags included).
    pub fn translate(&self, va: u64) -> Result<Translation, PagingError> {
        self.pt.translate(self.mem, va)
    }

    /// Physical address of the 4 KiB page holding `va`, from the cache or a walk.
    fn page_pa(&self, va: u64) -> Result<u64, PagingError> {
        self.cache.get_or_try(va >> 12, || {
            Ok(match self.region(va)? {
                Region::Mapped(base) => base | (va & (LARGE_PAGE_SIZE - 1) & !(PAGE_SIZE - 1)),
                Region::Table(pt) => match walk(self.mem, va, pt, 1, 1)? {
                    Walk::Leaf(t) => t.pa & !(PAGE_SIZE - 1),
                    Walk::Table(_) => return Err(PagingError::NotPresent { va, level: 1 }),
                },
            })
        })
    }

    /// What maps the 2 MiB region holding `va`, from the cache or a walk of the levels
    /// above the page table.
    fn region(&self, va: u64) -> Result<Region, PagingError> {
        self.regions
            .get_or_try(va >> 21, || self.pt.region(self.mem, va))
    }

    /// Fills `buf` from virtual address `va`, translating each page separately.
    pub fn read_virt(&self, va: u64, buf: &mut [u8]) -> Result<(), PagingError> {
        if buf.is_empty() {
            return Ok(());
        }
        if va.checked_add(buf.len() as u64 - 1).is_none() {
            return Err(PagingError::Wraps { va, len: buf.len() });
        }
        let mut done = 0usize;
        while done < buf.len() {
            // Cannot overflow: the last byte's address was checked above.
            let cur = va + done as u64;
            let in_page = (PAGE_SIZE - (cur & (PAGE_SIZE - 1))) as usize;
            let n = in_page.min(buf.len() - done);
            let pa = self.page_pa(cur)? | (cur & (PAGE_SIZE - 1));
            self.mem.read_phys(pa, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    pub fn read_u64_virt(&self, va: u64) -> Result<u64, PagingError> {
        let mut b = [0u8; 8];
        self.read_virt(va, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn read_u32_virt(&self, va: u64) -> Result<u32, PagingError> {
        let mut b = [0u8; 4];
        self.read_virt(va, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::BufferMemory;

    const PRW: u64 = P | RW;

    /// A tiny physical memory with page-table helpers.
    struct Phys(Vec<u8>);

    impl Phys {
        fn new(pages: usize) -> Self {
            Phys(vec![0; pages * PAGE_SIZE as usize])
        }
        fn set(&mut self, table: u64, index: u64, entry: u64) {
            let at = (table + index * 8) as usize;
            self.0[at..at + 8].copy_from_slice(&entry.to_le_bytes());
        }
        fn put(&mut self, pa: u64, bytes: &[u8]) {
            self.0[pa as usize..pa as usize + bytes.len()].copy_from_slice(bytes);
        }
        fn mem(self) -> BufferMemory {
            BufferMemory(self.0)
        }
    }

    fn idx(va: u64, level: u32) -> u64 {
        (va >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// Kernel-image style VA.
    const KVA: u64 = 0xffff_ffff_8123_4567;

    #[test]
    fn kernel_pgd_masks_pcid_pti_and_high_bits() {
        assert_eq!(kernel_pgd(0x0297_5000), 0x0297_4000);
        assert_eq!(kernel_pgd(0x8000_0000_0297_5801), 0x0297_4000);
        assert_eq!(kernel_pgd(0xfff0_0000_0000_0000 | 0x4000), 0x4000);
    }

    #[test]
    fn four_level_4k_leaf() {
        let mut p = Phys::new(8);
        // PML4 at 0 (8 KiB aligned, as with PTI), PDPT 0x2000, PD 0x3000, PT 0x4000, data page 0x5000.
        p.set(0, idx(KVA, 4), 0x2000 | PRW);
        p.set(0x2000, idx(KVA, 3), 0x3000 | PRW);
        p.set(0x3000, idx(KVA, 2), 0x4000 | P); // read-only above the leaf
        p.set(0x4000, idx(KVA, 1), 0x5000 | PRW | NX | (1 << 7)); // bit 7 is PAT here
        p.put(0x5567, &0x1122_3344_5566_7788u64.to_le_bytes());
        let mem = p.mem();
        let pt = PageTables::new(0, false);
        let t = pt.translate(&mem, KVA).unwrap();
        assert_eq!(
            t,
            Translation {
                pa: 0x5567,
                page_size: PAGE_SIZE,
                writable: false,
                nx: true
            }
        );
        let vm = VirtMemory::new(&mem, pt);
        assert_eq!(vm.read_u64_virt(KVA).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(vm.read_u32_virt(KVA).unwrap(), 0x5566_7788);
        assert_eq!(vm.pgtables().levels(), 4);
        assert_eq!(vm.pgtables().root(), 0);
    }

    #[test]
    fn two_mib_leaf_masks_pat() {
        let mut p = Phys::new(4);
        p.set(0, idx(KVA, 4), 0x2000 | PRW);
        p.set(0x2000, idx(KVA, 3), 0x3000 | PRW);
        // 2 MiB frame at 0x4000_0000 with PAT (bit 12) set.
        p.set(0x3000, idx(KVA, 2), 0x4000_0000 | (1 << 12) | PS | PRW);
        let mem = p.mem();
        let t = PageTables::new(0, false).translate(&mem, KVA).unwrap();
        assert_eq!(t.pa, 0x4000_0000 + (KVA & (LARGE_PAGE_SIZE - 1)));
        assert_eq!(t.page_size, LARGE_PAGE_SIZE);
        assert!(t.writable && !t.nx);
    }

    #[test]
    fn one_gib_leaf() {
        let va = 0xffff_8880_1234_5678u64; // direct map
        let mut p = Phys::new(3);
        p.set(0, idx(va, 4), 0x2000 | PRW);
        p.set(
            0x2000,
            idx(va, 3),
            0x1_c000_0000 | (1 << 12) | PS | PRW | NX,
        );
        let mem = p.mem();
        let t = PageTables::new(0, false).translate(&mem, va).unwrap();
        assert_eq!(t.pa, 0x1_c000_0000 + (va & (HUGE_PAGE_SIZE - 1)));
        assert_eq!(t.page_size, HUGE_PAGE_SIZE);
        assert!(t.nx);
    }

    #[test]
    fn five_level() {
        let va = 0xff11_0000_0020_3008u64; // L5 direct-map default
        let mut p = Phys::new(8);
        p.set(0, idx(va, 5), 0x2000 | PRW);
        p.set(0x2000, idx(va, 4), 0x3000 | PRW);
        p.set(0x3000, idx(va, 3), 0x4000 | PRW);
        p.set(0x4000, idx(va, 2), 0x5000 | PRW);
        p.set(0x5000, idx(va, 1), 0x6000 | PRW);
        p.put(0x6008, &[0xaa, 0xbb]);
        let mem = p.mem();
        let pt = PageTables::new(0, true);
        assert!(!PageTables::new(0, false).is_canonical(va));
        assert_eq!(pt.translate(&mem, va).unwrap().pa, 0x6008);
        let mut b = [0u8; 2];
        VirtMemory::new(&mem, pt).read_virt(va, &mut b).unwrap();
        assert_eq!(b, [0xaa, 0xbb]);
    }

    #[test]
    fn pti_user_cr3_resolves_like_the_kernel_half() {
        let mut p = Phys::new(8);
        // Kernel PGD at 0x2000, user PGD at 0x3000 (bit 12 set) mapping KVA elsewhere.
        p.set(0x2000, idx(KVA, 4), 0x4000 | PRW);
        p.set(0x4000, idx(KVA, 3), 0x5000 | PRW);
        p.set(0x5000, idx(KVA, 2), 0x20_0000 | PS | PRW);
        p.set(0x3000, idx(KVA, 4), 0x6000 | PRW);
        p.set(0x6000, idx(KVA, 3), 0x7000 | PRW);
        p.set(0x7000, idx(KVA, 2), 0x80_0000 | PS | PRW);
        let mem = p.mem();
        let user = PageTables::new(0x3000 | 0x801, false); // bit 12, user PCID bit 11
        let kernel = PageTables::new(0x2000, false);
        assert_eq!(user, kernel);
        assert_eq!(
            user.translate(&mem, KVA).unwrap(),
            kernel.translate(&mem, KVA).unwrap()
        );
        assert_eq!(
            user.translate(&mem, KVA).unwrap().pa,
            0x20_0000 + (KVA & (LARGE_PAGE_SIZE - 1))
        );
    }

    #[test]
    fn read_spans_two_non_contiguous_pages() {
        let va = 0xffff_c900_0000_0ffcu64; // vmalloc, 4 bytes before a page end
        let mut p = Phys::new(10);
        p.set(0, idx(va, 4), 0x2000 | PRW);
        p.set(0x2000, idx(va, 3), 0x3000 | PRW);
        p.set(0x3000, idx(va, 2), 0x4000 | PRW);
        // Page 0 → PA 0x8000, page 1 → PA 0x6000 (backwards).
        p.set(0x4000, idx(va, 1), 0x8000 | PRW);
        p.set(0x4000, idx(va, 1) + 1, 0x6000 | PRW);
        p.put(0x8ffc, &[1, 2, 3, 4]);
        p.put(0x6000, &[5, 6, 7, 8]);
        p.put(0x9000, &[0xee; 4]); // what a physically contiguous read would see
        let mem = p.mem();
        let vm = VirtMemory::new(&mem, PageTables::new(0, false));
        let mut b = [0u8; 8];
        vm.read_virt(va, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Again through the cache.
        let mut b2 = [0u8; 8];
        vm.read_virt(va, &mut b2).unwrap();
        assert_eq!(b, b2);
        vm.clear_cache();
        // A read running into an unmapped third page fails.
        let mut big = [0u8; 0x1008];
        assert_eq!(
            vm.read_virt(va, &mut big),
            Err(PagingError::NotPresent {
                va: (va & !0xfff) + 0x2000, // the first byte of the missing page
                level: 1
            })
        );
    }

    #[test]
    fn not_present_non_canonical_and_wrap() {
        let mut p = Phys::new(3);
        p.set(0, idx(KVA, 4), 0x2000 | PRW);
        let mem = p.mem();
        let pt = PageTables::new(0, false);
        assert_eq!(
            pt.translate(&mem, KVA),
            Err(PagingError::NotPresent { va: KVA, level: 3 })
        );
        assert_eq!(
            pt.translate(&mem, 0x1000),
            Err(PagingError::NotPresent {
                va: 0x1000,
                level: 4
            })
        );
        let bad = 0x0000_8000_0000_0000u64;
        assert_eq!(pt.translate(&mem, bad), Err(PagingError::NonCanonical(bad)));
        let vm = VirtMemory::new(&mem, pt);
        assert_eq!(
            vm.read_u64_virt(0xffff_7fff_ffff_fffc),
            Err(PagingError::NonCanonical(0xffff_7fff_ffff_fffc))
        );
        assert_eq!(
            vm.read_u64_virt(u64::MAX - 3),
            Err(PagingError::Wraps {
                va: u64::MAX - 3,
                len: 8
            })
        );
        assert_eq!(vm.read_virt(u64::MAX, &mut []), Ok(()));
        // A table pointer outside RAM is a memory error, not a panic.
        let mut p = Phys::new(2);
        p.set(0, idx(KVA, 4), 0xdead_0000 | PRW);
        let mem = p.mem();
        assert_eq!(
            PageTables::new(0, false).translate(&mem, KVA),
            Err(PagingError::Memory(MemError::Unbacked(
                0xdead_0000 + idx(KVA, 3) * 8
            )))
        );
        // PS in a PML4 entry is reserved.
        let mut p = Phys::new(2);
        p.set(0, idx(KVA, 4), PS | PRW);
        let mem = p.mem();
        assert!(matches!(
            PageTables::new(0, false).translate(&mem, KVA),
            Err(PagingError::Reserved { level: 4, .. })
        ));
    }

    /// Counts the reads that reach physical memory.
    struct Counting(BufferMemory, std::sync::atomic::AtomicUsize);

    impl GuestPhysMemory for Counting {
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), MemError> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.0.read_phys(gpa, buf)
        }
        fn regions(&self) -> Vec<(u64, u64)> {
            self.0.regions()
        }
    }

    #[test]
    fn pages_of_a_known_region_cost_one_read_or_none() {
        use std::sync::atomic::Ordering::Relaxed;
        // A vmalloc-style region of 4 KiB pages, a 2 MiB leaf and a 1 GiB leaf.
        let small = 0xffff_c900_0020_0000u64;
        let large = 0xffff_8880_0040_0000u64;
        let huge = 0xffff_8881_0000_0000u64;
        let mut p = Phys::new(12);
        p.set(0, idx(small, 4), 0x1000 | PRW);
        p.set(0x1000, idx(small, 3), 0x2000 | PRW);
        p.set(0x2000, idx(small, 2), 0x3000 | PRW);
        p.set(0x3000, 0, 0x7000 | PRW);
        p.set(0x3000, 1, 0x9000 | PRW);
        p.set(0, idx(large, 4), 0x4000 | PRW);
        p.set(0x4000, idx(large, 3), 0x5000 | PRW);
        p.set(0x5000, idx(large, 2), 0x4000_0000 | PS | PRW);
        p.set(0x4000, idx(huge, 3), 0x8000_0000 | PS | PRW);
        let pt = PageTables::new(0, false);
        let mem = Counting(p.mem(), 0.into());
        let vm = VirtMemory::new(&mem, pt);
        let reads = || mem.1.swap(0, Relaxed);
        let page = |va: u64| vm.page_pa(va).unwrap();
        // First page of each region: a full walk (4, 3 and 2 reads).
        assert_eq!(page(small), 0x7000);
        assert_eq!(reads(), 4);
        assert_eq!(page(large + 0x3000), 0x4000_3000);
        assert_eq!(reads(), 3);
        assert_eq!(page(huge + 0x1234_5000), 0x9234_5000);
        assert_eq!(reads(), 2);
        // Other pages of the same regions: one page-table read, or none.
        assert_eq!(page(small + 0x1000), 0x9000);
        assert_eq!(reads(), 1);
        assert_eq!(page(large + 0x1f_f000), 0x401f_f000);
        assert_eq!(page(huge + 0x1234_6000), 0x9234_6000);
        assert_eq!(reads(), 0);
        // The same answers as a full walk; a missing page-table entry is still level 1.
        for va in [small + 0x1000, large + 0x1f_f000, huge + 0x1234_6000] {
            assert_eq!(pt.translate(&mem, va).unwrap().pa, vm.page_pa(va).unwrap());
        }
        assert_eq!(
            vm.page_pa(small + 0x2000),
            Err(PagingError::NotPresent {
                va: small + 0x2000,
                level: 1
            })
        );
    }

    #[test]
    fn self_referencing_pml4_does_not_hang() {
        // Recursive mapping: PML4[510] points at the PML4 itself, like Windows' self-map.
        let mut p = Phys::new(2);
        p.set(0, 510, PRW);
        let mem = p.mem();
        let pt = PageTables::new(0, false);
        // VA with every index 510: each level re-reads the PML4; the "leaf" is the PML4 page.
        let va = 0xffff_0000_0000_0000u64 | (510 << 39) | (510 << 30) | (510 << 21) | (510 << 12);
        let t = pt.translate(&mem, va).unwrap();
        assert_eq!((t.pa, t.page_size), (0, PAGE_SIZE));
        let vm = VirtMemory::new(&mem, pt);
        assert_eq!(vm.read_u64_virt(va + 510 * 8).unwrap(), PRW);
        // Every other index ends in a not-present entry.
        assert!(pt.translate(&mem, va ^ (1 << 12)).is_err());
        // And 5-level with the same self-map.
        let pt5 = PageTables::new(0, true);
        let va5 = 0xfe00_0000_0000_0000u64 | (510 << 48) | (va & 0xffff_ffff_ffff);
        assert_eq!(pt5.translate(&mem, va5).unwrap().pa, 0);
    }
}
