//! The KVM VM: guest memory slots, the in-kernel interrupt controllers and PIT.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_READONLY, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::KVM_TSS_ADDRESS;

/// Errors while creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm does not exist: KVM is not available on this host (load the kvm module, or run on a host with virtualization)")]
    KvmMissing,
    #[error("permission denied opening /dev/kvm: run as root or add your user to the 'kvm' group")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    KvmApiVersion(i32),
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR failed: {0}")]
    SetTss(kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP failed: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2 failed: {0}")]
    CreatePit(kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    SetMemory {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    GuestMemory { mib: u64, detail: String },
    #[error("{0} read-only pages is more than the {MAX_READONLY_PAGES} this VMM allows")]
    TooManyReadOnly(usize),
}

/// Most read-only pages (each splits a RAM slot in up to three).
pub const MAX_READONLY_PAGES: usize = 256;

/// One registered memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    id: u32,
    gpa: u64,
    size: u64,
    readonly: bool,
}

/// The slots each RAM region is registered as (one, or several around read-only pages).
#[derive(Debug, Default)]
struct SlotTable {
    regions: Vec<Vec<Slot>>,
    free: Vec<u32>,
    next: u32,
}

impl SlotTable {
    fn take_id(&mut self) -> u32 {
        self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

/// Splits `[start, start + len)` around the 4 KiB `pages` inside it.
fn segments(start: u64, len: u64, pages: &BTreeSet<u64>) -> Vec<(u64, u64, bool)> {
    let end = start + len;
    let mut out = Vec::new();
    let mut at = start;
    for &p in pages.range(start..end) {
        if p > at {
            out.push((at, p - at, false));
        }
        let pend = (p + 4096).min(end);
        if pend > p.max(at) {
            out.push((p.max(at), pend - p.max(at), true));
        }
        at = at.max(pend);
    }
    if at < end {
        out.push((at, end - at, false));
    }
    out
}

/// Opens `/dev/kvm`, mapping the common failures to clear messages.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => VmError::KvmMissing,
        libc::EACCES | libc::EPERM => VmError::KvmPermission,
        _ => VmError::KvmOpen(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::KvmApiVersion(version));
    }
    Ok(kvm)
}

/// A VM with its memory and interrupt controllers.
pub struct Vm {
    fd: Arc<VmFd>,
    memory: GuestMemoryMmap,
    slots: Mutex<SlotTable>,
}

impl Vm {
    /// Creates the VM, the TSS area, the in-kernel PIC+IOAPIC(+LAPICs) and the PIT.
    pub fn new(kvm: &Kvm, memory: GuestMemoryMmap) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(VmError::CreatePit)?;
        let vm = Self {
            fd: Arc::new(fd),
            memory,
            slots: Mutex::new(SlotTable::default()),
        };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        self.set_read_only(&BTreeSet::new())
    }

    fn set_slot(&self, slot: Slot, host: u64) -> Result<(), VmError> {
        let mr = kvm_userspace_memory_region {
            slot: slot.id,
            flags: if slot.readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: host,
        };
        // SAFETY: `host` points into a live mapping owned by `self.memory` (or the slot
        // is being deleted, size 0), which the VM keeps for as long as the VM fd exists.
        unsafe { self.fd.set_user_memory_region(mr) }.map_err(|source| VmError::SetMemory {
            slot: slot.id,
            source,
        })
    }

    /// Registers guest RAM with the 4 KiB `pages` read-only: guest writes to them exit
    /// to the VMM as MMIO (the text guard answers), the VMM's own writes go through.
    /// Only the slots whose range or access changes are re-registered. Call with every vCPU out of
    /// `KVM_RUN` (paused), or before they start.
    pub fn set_read_only(&self, pages: &BTreeSet<u64>) -> Result<(), VmError> {
        if pages.len() > MAX_READONLY_PAGES {
            return Err(VmError::TooManyReadOnly(pages.len()));
        }
        let mut table = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for (i, region) in self.memory.iter().enumerate() {
            let start = region.start_addr().raw_value();
            let host = region.as_ptr() as u64;
            let wanted = segments(start, region.len(), pages);
            if table.regions.len() <= i {
                table.regions.push(Vec::new());
            }
            // Only the slots that change are touched: KVM cannot resize a slot, and
            // deleting one makes KVM drop every mapping it built for it (under shadow
            // paging, as on PVM, the guest then faults those pages in again). The table
            // follows each ioctl, so it stays true if one fails.
            let (keep, gone): (Vec<Slot>, Vec<Slot>) = std::mem::take(&mut table.regions[i])
                .into_iter()
                .partition(|s| wanted.contains(&(s.gpa, s.size, s.readonly)));
            table.regions[i] = keep;
            for (n, old) in gone.iter().enumerate() {
                if let Err(e) = self.set_slot(Slot { size: 0, ..*old }, host + (old.gpa - start)) {
                    table.regions[i].extend_from_slice(&gone[n..]);
                    table.regions[i].sort_by_key(|s| s.gpa);
                    return Err(e);
                }
                table.free.push(old.id);
            }
            for (gpa, size, readonly) in wanted {
                if table.regions[i]
                    .iter()
                    .any(|s| (s.gpa, s.size, s.readonly) == (gpa, size, readonly))
                {
                    continue;
                }
                let slot = Slot {
                    id: table.take_id(),
                    gpa,
                    size,
                    readonly,
                };
                if let Err(e) = self.set_slot(slot, host + (gpa - start)) {
                    table.free.push(slot.id);
                    table.regions[i].sort_by_key(|s| s.gpa);
                    return Err(e);
                }
                table.regions[i].push(slot);
            }
            table.regions[i].sort_by_key(|s| s.gpa);
        }
        Ok(())
    }

    /// The registered slots, `(id, gpa, size, read-only)` per RAM region.
    #[cfg(test)]
    fn slot_layout(&self) -> Vec<Vec<(u32, u64, u64, bool)>> {
        let table = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        table
            .regions
            .iter()
            .map(|r| {
                r.iter()
                    .map(|s| (s.id, s.gpa, s.size, s.readonly))
                    .collect()
            })
            .collect()
    }

    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }
}

/// Allocates anonymous guest RAM for `regions`.
pub fn allocate_memory(
    regions: &[(vm_memory::GuestAddress, usize)],
) -> Result<GuestMemoryMmap, VmError> {
    let mib = regions.iter().map(|r| r.1 as u64).sum::<u64>() >> 20;
    GuestMemoryMmap::from_ranges(regions).map_err(|e| VmError::GuestMemory {
        mib,
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    /// A guest store to a read-only page exits as an MMIO write (the text guard's input)
    /// and leaves RAM unchanged; a read still sees RAM; making it writable again lets the
    /// store through.
    #[test]
    fn read_only_pages_turn_guest_stores_into_mmio_exits() {
        use kvm_ioctls::VcpuExit;
        use vm_memory::{Bytes, GuestAddress};
        if !std::path::Path::new("/dev/kvm").exists() {
            panic!("this test needs /dev/kvm");
        }
        let kvm = super::open_kvm().unwrap();
        let (vm, mut fd) = crate::host_check::kernel_mode_guest(&kvm).unwrap();
        const PAGE: u64 = 0x10_0000;
        // mov byte [PAGE], 0x42; mov al, [PAGE]; out 0x80, al; jmp $
        // (no hlt: with the in-kernel LAPIC a halted vCPU waits in KVM for an interrupt)
        let code = [
            0xc6, 0x04, 0x25, 0x00, 0x00, 0x10, 0x00, 0x42, 0x8a, 0x04, 0x25, 0x00, 0x00, 0x10,
            0x00, 0xe6, 0x80, 0xeb, 0xfe,
        ];
        let mem = vm.memory().clone();
        mem.write_slice(&code, GuestAddress(crate::host_check::PROBE_CODE))
            .unwrap();
        mem.write_obj(0x17u8, GuestAddress(PAGE)).unwrap();
        vm.set_read_only(&[PAGE].into_iter().collect()).unwrap();
        let mut seen = Vec::new();
        for _ in 0..16 {
            match fd.run().unwrap() {
                VcpuExit::MmioWrite(addr, data) => seen.push(format!("w {addr:#x} {data:?}")),
                VcpuExit::MmioRead(addr, data) => {
                    data.fill(0x99);
                    seen.push(format!("r {addr:#x}"));
                }
                VcpuExit::IoOut(0x80, data) => {
                    seen.push(format!("out {}", data[0]));
                    break;
                }
                other => panic!("unexpected exit {other:?} after {seen:?}"),
            }
        }
        assert_eq!(seen[0], format!("w {PAGE:#x} [66]"), "{seen:?}");
        assert_eq!(
            seen.last().unwrap(),
            "out 23",
            "the load read RAM: {seen:?}"
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE)).unwrap(), 0x17);
        // Writable again: the same store goes to RAM.
        vm.set_read_only(&super::BTreeSet::new()).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = crate::host_check::PROBE_CODE;
        fd.set_regs(&regs).unwrap();
        match fd.run().unwrap() {
            VcpuExit::IoOut(0x80, data) => assert_eq!(data[0], 0x42),
            other => panic!("unexpected exit {other:?}"),
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(PAGE)).unwrap(), 0x42);
    }

    #[test]
    fn segments_split_around_read_only_pages() {
        let pages: super::BTreeSet<u64> = [0x0, 0x3000, 0x4000, 0x9000].into_iter().collect();
        assert_eq!(
            super::segments(0x0, 0x8000, &pages),
            [
                (0x0, 0x1000, true),
                (0x1000, 0x2000, false),
                (0x3000, 0x1000, true),
                (0x4000, 0x1000, true),
                (0x5000, 0x3000, false),
            ]
        );
        assert_eq!(
            super::segments(0x10000, 0x1000, &pages),
            [(0x10000, 0x1000, false)]
        );
    }

    use super::*;
    use crate::arch::x86_64::boot::ram_regions;

    /// Needs /dev/kvm; fails (never skips) without it.
    #[test]
    fn creates_vm_with_irqchip_pit_and_memory() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let memory = allocate_memory(&ram_regions(64 << 20)).unwrap();
        let vm = Vm::new(&kvm, memory).expect("VM creation");
        assert_eq!(vm.memory().num_regions(), 1);
        vm.fd().create_vcpu(0).expect("vCPU creation");
    }

    /// Guarding one more page re-registers only the slot it splits; the slots before it
    /// keep their ids. Releasing every page gives back one slot per region.
    #[test]
    fn read_only_changes_touch_only_the_slots_they_split() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let memory = allocate_memory(&ram_regions(64 << 20)).unwrap();
        let vm = Vm::new(&kvm, memory).expect("VM creation");
        let (p, q) = (0x20_0000u64, 0x80_0000u64);
        vm.set_read_only(&[p].into_iter().collect()).unwrap();
        let one = vm.slot_layout()[0].clone();
        assert_eq!(one.len(), 3, "{one:?}");
        assert_eq!((one[1].1, one[1].2, one[1].3), (p, 0x1000, true));
        vm.set_read_only(&[p, q].into_iter().collect()).unwrap();
        let two = vm.slot_layout()[0].clone();
        assert_eq!(two.len(), 5, "{two:?}");
        assert_eq!(
            &two[..2],
            &one[..2],
            "the slots below the new page were kept"
        );
        assert_eq!(
            two.iter().map(|s| (s.1, s.2, s.3)).collect::<Vec<_>>(),
            segments(0, 64 << 20, &[p, q].into_iter().collect())
        );
        let ids: BTreeSet<u32> = two.iter().map(|s| s.0).collect();
        assert_eq!(ids.len(), 5, "slot ids are distinct: {two:?}");
        vm.set_read_only(&BTreeSet::new()).unwrap();
        let none = vm.slot_layout();
        assert_eq!(none[0].len(), 1);
        assert_eq!(
            (none[0][0].1, none[0][0].2, none[0][0].3),
            (0, 64 << 20, false)
        );
        // Guest memory is still usable through the re-registered slot.
        vm.fd().create_vcpu(0).expect("vCPU creation");
    }

    #[test]
    fn kvm_errors_are_one_line() {
        for e in [VmError::KvmMissing, VmError::KvmPermission] {
            let msg = e.to_string();
            assert!(msg.contains("/dev/kvm") && !msg.contains('\n'), "{msg}");
        }
    }
}
