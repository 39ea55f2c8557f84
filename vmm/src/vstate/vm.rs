//! The KVM VM: guest memory slots, the in-kernel interrupt controllers and PIT.

use std::sync::Arc;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
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
        };
        vm.register_memory()?;
        Ok(vm)
    }

    fn register_memory(&self) -> Result<(), VmError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let mr = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `self.memory`, which the VM
            // keeps alive for as long as the VM fd exists.
            unsafe { self.fd.set_user_memory_region(mr) }
                .map_err(|source| VmError::SetMemory { slot, source })?;
        }
        Ok(())
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

    #[test]
    fn kvm_errors_are_one_line() {
        for e in [VmError::KvmMissing, VmError::KvmPermission] {
            let msg = e.to_string();
            assert!(msg.contains("/dev/kvm") && !msg.contains('\n'), "{msg}");
        }
    }
}
