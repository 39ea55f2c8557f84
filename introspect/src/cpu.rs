//! A vCPU's register state as introspection needs it: the second of the library's two
//! inputs (the first is guest-physical memory). The VMM fills it from KVM on a paused VM
//! or from a snapshot's saved vCPU state; tests build it by hand.

/// The registers introspection reads from one vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuRegs {
    pub rip: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rdx: u64,
    pub r10: u64,
    pub r13: u64,
    /// CS selector; its low two bits are the CPL.
    pub cs: u16,
    pub cr3: u64,
    pub cr4: u64,
    /// GS base as loaded (the kernel's per-cpu base in kernel mode).
    pub gs_base: u64,
    /// `MSR_KERNEL_GS_BASE` (the kernel's per-cpu base while in user mode).
    pub kernel_gs_base: u64,
}

/// `CR4.LA57`: 5-level paging.
pub const CR4_LA57: u64 = 1 << 12;

impl CpuRegs {
    /// Current privilege level.
    pub fn cpl(&self) -> u8 {
        (self.cs & 3) as u8
    }

    pub fn in_kernel(&self) -> bool {
        self.cpl() == 0
    }

    pub fn la57(&self) -> bool {
        self.cr4 & CR4_LA57 != 0
    }

    /// The kernel's per-cpu base for this vCPU, whichever mode it is in.
    pub fn percpu_base(&self) -> u64 {
        if self.in_kernel() {
            self.gs_base
        } else {
            self.kernel_gs_base
        }
    }
}

/// The vCPUs of a VM (paused, or as saved in a snapshot).
pub trait Vcpus {
    fn vcpu_count(&self) -> usize;
    fn vcpu_regs(&self, index: usize) -> Result<CpuRegs, String>;
}

impl Vcpus for Vec<CpuRegs> {
    fn vcpu_count(&self) -> usize {
        self.len()
    }

    fn vcpu_regs(&self, index: usize) -> Result<CpuRegs, String> {
        self.get(index)
            .copied()
            .ok_or_else(|| format!("no vCPU {index}"))
    }
}
