//! The narrow interface through which the patcher reaches a VM. `vmm` implements it on
//! a live VM (pausing vCPUs, introspecting the guest, writing through its protected
//! patch path); tests implement it over an in-memory fake.

use crate::consistency::TaskStack;
use crate::ledger::PatchMemory;
use crate::linker::LinkedPatch;

/// A guest kernel function found by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FunctionSymbol {
    pub addr: u64,
    pub size: u64,
    /// Position among symbols of the same name (1-based).
    pub sympos: u32,
}

/// What the patcher needs from a VM.
pub trait PatchTarget {
    /// `uname -r` of the guest kernel.
    fn kernel_release(&self) -> Result<String, String>;
    /// The guest kernel's GNU build ID (hex), when known.
    fn kernel_build_id(&self) -> Result<Option<String>, String>;
    /// A function by name; `sympos` picks among same-named symbols (required if several).
    fn function(&self, name: &str, sympos: Option<u32>) -> Result<FunctionSymbol, String>;
    /// A kernel symbol's address for the linker.
    fn symbol(&self, name: &str, sympos: Option<u32>) -> Result<u64, String>;
    /// A writable kernel variable (a data or bss symbol of the kernel image) for state
    /// actions; anything else is refused.
    fn data_symbol(&self, name: &str, sympos: Option<u32>) -> Result<u64, String>;
    /// The patch area: guest virtual base and size.
    fn patch_area(&self) -> (u64, u64);
    /// Places a linked patch (RX text, RO rodata, RW data) in the patch area.
    fn load_patch(&mut self, patch: &LinkedPatch) -> Result<(), String>;
    /// Zeroes patch memory that nothing runs or references: a patch that was loaded but
    /// never redirected to, or the memory of a bundle a transition retired.
    fn clear_patch_memory(&mut self, memory: PatchMemory) -> Result<(), String>;
    /// Stops every vCPU outside guest execution.
    fn pause(&mut self) -> Result<(), String>;
    fn resume(&mut self) -> Result<(), String>;
    /// When the guest ran again after the last `resume`, if the target knows it more
    /// exactly than the caller's clock after `resume` returns (a VMM learns that its vCPU
    /// threads are back in the guest a thread wake-up later).
    fn resumed_at(&self) -> Option<std::time::Instant> {
        None
    }
    /// RIP of every vCPU (paused).
    fn vcpu_rips(&mut self) -> Result<Vec<u64>, String>;
    /// Kernel stacks of every task (paused).
    fn task_stacks(&mut self) -> Result<Vec<TaskStack>, String>;
    /// `function+0xoff/0xsize` for a code address, for reports (paused; called only
    /// for the frames of tasks that block a transition).
    fn symbolize(&mut self, addr: u64) -> String {
        format!("{addr:#x}")
    }
    /// Reads guest kernel memory.
    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Writes guest kernel text (the VMM unprotects, writes and re-protects).
    fn write_kernel_text(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String>;
    /// Writes a guest kernel variable (paused).
    fn write_kernel_data(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String>;
}
