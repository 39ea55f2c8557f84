//! The live-patch area: guest-physical memory the guest does not know about
//! (`PATCH_AREA_START`, outside the e820 map), mapped into the kernel's address space
//! through one free 2 MiB slot of `level2_kernel_pgt`, just after the kernel image —
//! within rel32 reach of all kernel text and shared by every process (the kernel half of
//! every page table points at the same `level3_kernel_pgt`; guest-introspection.md §7).
//! The slot's page table is the reserved page at `PATCH_TABLE_START`, inside the range
//! the guest kernel always keeps in its direct map, so a guest that walks its own kernel
//! page tables (the boot-time W+X check, ptdump) finds a table it can read. Snapshots
//! taken before that kept the table in the area's first page; `table_gpa` says which.
//! The mapping only ever grows (not-present to present needs no guest TLB flush);
//! retired code stays mapped.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{PATCH_AREA_SIZE, PATCH_AREA_START, PATCH_TABLE_START};

const PAGE: u64 = 4096;
const PMD_SPAN: u64 = 2 << 20;
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
const P: u64 = 1;
const RW: u64 = 1 << 1;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const NX: u64 = 1 << 63;

/// Errors mapping the patch area.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AreaError {
    #[error("guest memory: {0}")]
    Memory(String),
    #[error("no free 2 MiB slot after the kernel image in level2_kernel_pgt")]
    NoSlot,
    #[error("patch pages {0:#x}..{1:#x} are outside the patch area")]
    Range(u64, u64),
}

/// Page permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    Exec,
    ReadOnly,
    ReadWrite,
}

/// The mapped area.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchArea {
    /// Virtual address of the slot; it maps `PATCH_AREA_START` at offset 0.
    pub slot_va: u64,
    /// Guest-physical address of the slot's page table: `PATCH_TABLE_START`, or
    /// `PATCH_AREA_START` in a VM restored from a snapshot of the earlier layout (whose
    /// first area page is then the table and not usable).
    pub table_gpa: u64,
}

fn mem_err(e: impl std::fmt::Display) -> AreaError {
    AreaError::Memory(e.to_string())
}

impl PatchArea {
    /// Maps the area: picks the first free PMD slot at or after `end` (the kernel's
    /// `_end`), points it at a zeroed page table at `PATCH_TABLE_START`.
    /// `level2_pa` is the guest-physical address of `level2_kernel_pgt`.
    pub fn map(mem: &GuestMemoryMmap, level2_pa: u64, end: u64) -> Result<Self, AreaError> {
        let first = end.div_ceil(PMD_SPAN) * PMD_SPAN;
        let first_slot = first.wrapping_sub(START_KERNEL_MAP) / PMD_SPAN;
        for slot in first_slot..512 {
            let entry_pa = level2_pa + slot * 8;
            let entry: u64 = mem.read_obj(GuestAddress(entry_pa)).map_err(mem_err)?;
            if entry & P != 0 {
                continue;
            }
            mem.write_slice(&[0u8; PAGE as usize], GuestAddress(PATCH_TABLE_START))
                .map_err(mem_err)?;
            // Table entry: present, writable (the PTEs decide), supervisor, accessed.
            mem.write_obj(PATCH_TABLE_START | P | RW | A, GuestAddress(entry_pa))
                .map_err(mem_err)?;
            return Ok(PatchArea {
                slot_va: START_KERNEL_MAP + slot * PMD_SPAN,
                table_gpa: PATCH_TABLE_START,
            });
        }
        Err(AreaError::NoSlot)
    }

    /// Offset of the first page patch code may use: 0, or one page when the table
    /// lives in the area (the earlier layout).
    fn first_usable(&self) -> u64 {
        if (PATCH_AREA_START..PATCH_AREA_START + PATCH_AREA_SIZE).contains(&self.table_gpa) {
            PAGE
        } else {
            0
        }
    }

    /// Where patch code may go: (virtual base, size).
    pub fn usable(&self) -> (u64, u64) {
        let first = self.first_usable();
        (self.slot_va + first, PATCH_AREA_SIZE.min(PMD_SPAN) - first)
    }

    /// Guest-physical address behind a patch-area virtual address.
    pub fn gpa(&self, va: u64) -> Result<u64, AreaError> {
        let off = va.wrapping_sub(self.slot_va);
        if off < self.first_usable() || off >= PATCH_AREA_SIZE.min(PMD_SPAN) {
            return Err(AreaError::Range(va, va));
        }
        Ok(PATCH_AREA_START + off)
    }

    /// Writes `bytes` at `va` and maps its pages with `perm` (or unmaps when `None`).
    pub fn place(
        &self,
        mem: &GuestMemoryMmap,
        va: u64,
        bytes: &[u8],
        perm: Option<Perm>,
    ) -> Result<(), AreaError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let end = va + bytes.len() as u64;
        let gpa = self.gpa(va)?;
        self.gpa(end - 1).map_err(|_| AreaError::Range(va, end))?;
        mem.write_slice(bytes, GuestAddress(gpa)).map_err(mem_err)?;
        let mut page = va & !(PAGE - 1);
        while page < end {
            let index = (page - self.slot_va) / PAGE;
            let pte = match perm {
                None => 0,
                Some(p) => {
                    let flags = match p {
                        Perm::Exec => P | A | D,
                        Perm::ReadOnly => P | A | D | NX,
                        Perm::ReadWrite => P | RW | A | D | NX,
                    };
                    (PATCH_AREA_START + (page - self.slot_va)) | flags
                }
            };
            mem.write_obj(pte, GuestAddress(self.table_gpa + index * 8))
                .map_err(mem_err)?;
            page += PAGE;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_the_first_free_slot_after_the_image_and_sets_ptes() {
        let mem = memory();
        let level2 = 0x5000u64;
        // Slots 8..28 hold the image (_text at +16 MiB); slot 28 is also taken.
        for slot in 8..29u64 {
            mem.write_obj((slot << 21) | 0x83u64, GuestAddress(level2 + slot * 8))
                .unwrap();
        }
        let end = START_KERNEL_MAP + (27 << 21) + 0x1234;
        let area = PatchArea::map(&mem, level2, end).unwrap();
        assert_eq!(area.slot_va, START_KERNEL_MAP + (29 << 21));
        let pmd: u64 = mem.read_obj(GuestAddress(level2 + 29 * 8)).unwrap();
        assert_eq!(pmd, PATCH_TABLE_START | 0x23);
        // The whole area is usable: the table is outside it.
        let (base, size) = area.usable();
        assert_eq!((base, size), (area.slot_va, PATCH_AREA_SIZE));
        area.place(&mem, base, &[0xc3; 5000], Some(Perm::Exec))
            .unwrap();
        let pte0: u64 = mem.read_obj(GuestAddress(PATCH_TABLE_START)).unwrap();
        let pte1: u64 = mem.read_obj(GuestAddress(PATCH_TABLE_START + 8)).unwrap();
        assert_eq!(pte0, PATCH_AREA_START | 0x61);
        assert_eq!(pte1, (PATCH_AREA_START + 0x1000) | 0x61);
        let code: u8 = mem.read_obj(GuestAddress(PATCH_AREA_START)).unwrap();
        assert_eq!(code, 0xc3);
        area.place(&mem, base + 0x2000, &[1; 10], Some(Perm::ReadWrite))
            .unwrap();
        let pte: u64 = mem.read_obj(GuestAddress(PATCH_TABLE_START + 16)).unwrap();
        assert_eq!(pte, (PATCH_AREA_START + 0x2000) | NX | 0x63);
        area.place(&mem, base + 0x2000, &[0; 10], None).unwrap();
        let pte: u64 = mem.read_obj(GuestAddress(PATCH_TABLE_START + 16)).unwrap();
        assert_eq!(pte, 0);
        assert!(area
            .place(&mem, base + size, &[0; 1], Some(Perm::Exec))
            .is_err());
        assert!(area
            .place(&mem, area.slot_va - 1, &[0; 2], Some(Perm::Exec))
            .is_err());
        assert!(PatchArea::map(&mem, level2, START_KERNEL_MAP + (511 << 21) + 1).is_err());
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(PATCH_AREA_START), PATCH_AREA_SIZE as usize),
        ])
        .unwrap()
    }

    #[test]
    fn an_area_restored_from_the_earlier_layout_keeps_its_table_in_the_first_page() {
        let mem = memory();
        let area = PatchArea {
            slot_va: START_KERNEL_MAP + (29 << 21),
            table_gpa: PATCH_AREA_START,
        };
        let (base, size) = area.usable();
        assert_eq!((base, size), (area.slot_va + PAGE, PATCH_AREA_SIZE - PAGE));
        assert!(area
            .place(&mem, area.slot_va, &[0; 1], Some(Perm::Exec))
            .is_err());
        area.place(&mem, base, &[0xc3; 10], Some(Perm::Exec))
            .unwrap();
        let pte1: u64 = mem.read_obj(GuestAddress(PATCH_AREA_START + 8)).unwrap();
        assert_eq!(pte1, (PATCH_AREA_START + 0x1000) | 0x61);
        let low: u64 = mem.read_obj(GuestAddress(PATCH_TABLE_START + 8)).unwrap();
        assert_eq!(low, 0);
    }
}
