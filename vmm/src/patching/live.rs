//! `patcher::PatchTarget` for a running VM: symbols from the guest's kallsyms
//! (`introspect`), pausing through the vCPU threads, kernel text written through guest
//! memory while every vCPU is out of `KVM_RUN`, patch code placed in the patch area.

use introspect::guest::{GuestKernel, TASKS_PER_UNWIND_THREAD};
use introspect::kallsyms::LookupError;
use introspect::orc::FrameKind;
use patcher::consistency::TaskStack;
use patcher::ledger::PatchMemory;
use patcher::linker::LinkedPatch;
use patcher::target::{FunctionSymbol, PatchTarget};
use vm_memory::{Bytes, GuestAddress};

use super::area::{PatchArea, Perm};
use crate::builder::RunningVm;
use crate::introspection::{view_regs, LiveMemory};
use crate::vstate::pause;
use introspect::cpu::CpuRegs;

/// Kernel-image window: the only virtual range this target reads or writes directly.
const IMAGE_WINDOW: std::ops::Range<u64> = 0xffff_ffff_8000_0000..0xffff_ffff_c000_0000;

/// A running VM as the patcher sees it.
pub struct LiveTarget<'a> {
    pub vm: &'a RunningVm,
    pub guest: &'a GuestKernel,
    pub area: PatchArea,
    /// The paused vCPUs' registers, read once per pause (RIPs and the running tasks'
    /// unwind both need them).
    regs: Option<Vec<CpuRegs>>,
    /// Sites were written this pause: re-register the read-only pages before resuming.
    guard_changed: bool,
    /// When the last vCPU thread went back into the guest after the last resume.
    resumed_at: Option<std::time::Instant>,
}

/// First byte of `jmp rel32`.
const JMP_REL32: u8 = 0xe9;

impl<'a> LiveTarget<'a> {
    pub fn new(vm: &'a RunningVm, guest: &'a GuestKernel, area: PatchArea) -> Self {
        LiveTarget {
            vm,
            guest,
            area,
            regs: None,
            guard_changed: false,
            resumed_at: None,
        }
    }

    /// Registers of every vCPU (call while paused).
    fn paused_regs(&mut self) -> Result<&[CpuRegs], String> {
        if self.regs.is_none() {
            let views = pause::read_kernel_views(&self.vm.vcpus).map_err(|e| e.to_string())?;
            self.regs = Some(views.iter().map(view_regs).collect());
        }
        Ok(self.regs.as_deref().unwrap_or_default())
    }

    fn image_pa(&self, va: u64, len: usize) -> Result<u64, String> {
        let end = va.checked_add(len as u64).ok_or("address overflow")?;
        if !IMAGE_WINDOW.contains(&va) || end > IMAGE_WINDOW.end {
            return Err(format!("{va:#x} is outside the kernel image window"));
        }
        Ok(self.guest.kernel.image.pa(va))
    }
}

fn lookup_msg(e: LookupError) -> String {
    match e {
        LookupError::NotFound(_) => String::new(),
        other => other.to_string(),
    }
}

impl PatchTarget for LiveTarget<'_> {
    fn kernel_release(&self) -> Result<String, String> {
        Ok(self.guest.kernel.release.clone())
    }

    fn kernel_build_id(&self) -> Result<Option<String>, String> {
        Ok(self.guest.kernel.build_id.clone())
    }

    fn function(&self, name: &str, sympos: Option<u32>) -> Result<FunctionSymbol, String> {
        let s = self
            .guest
            .kernel
            .symbols
            .lookup(name, sympos)
            .map_err(|e| e.to_string())?;
        if !matches!(s.kind, 't' | 'T' | 'W' | 'w') {
            return Err(format!("{name} is not a function (type {})", s.kind));
        }
        Ok(FunctionSymbol {
            addr: s.addr,
            size: s.size,
            sympos: s.sympos,
        })
    }

    fn symbol(&self, name: &str, sympos: Option<u32>) -> Result<u64, String> {
        self.guest
            .kernel
            .symbols
            .lookup(name, sympos)
            .map(|s| s.addr)
            .map_err(lookup_msg)
    }

    fn data_symbol(&self, name: &str, sympos: Option<u32>) -> Result<u64, String> {
        let s = self
            .guest
            .kernel
            .symbols
            .lookup(name, sympos)
            .map_err(|e| e.to_string())?;
        // Initialised data and bss of the kernel image; not read-only data, not text,
        // not per-CPU offsets.
        if !matches!(s.kind, 'd' | 'D' | 'b' | 'B') {
            return Err(format!(
                "{name} is not a writable kernel variable (type {})",
                s.kind
            ));
        }
        self.image_pa(s.addr, 8)?;
        Ok(s.addr)
    }

    fn patch_area(&self) -> (u64, u64) {
        self.area.usable()
    }

    fn load_patch(&mut self, p: &LinkedPatch) -> Result<(), String> {
        let mem = self.vm.vm.memory();
        for (addr, img, perm) in [
            (p.text_addr, &p.text, Perm::Exec),
            (p.rodata_addr, &p.rodata, Perm::ReadOnly),
            (p.data_addr, &p.data, Perm::ReadWrite),
        ] {
            self.area
                .place(mem, addr, img, Some(perm))
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn clear_patch_memory(&mut self, m: PatchMemory) -> Result<(), String> {
        let zeros = vec![0u8; m.size as usize];
        self.area
            .place(self.vm.vm.memory(), m.base, &zeros, None)
            .map_err(|e| e.to_string())
    }

    fn pause(&mut self) -> Result<(), String> {
        self.regs = None;
        pause::pause_all(&self.vm.vcpus).map_err(|e| e.to_string())
    }

    fn resume(&mut self) -> Result<(), String> {
        self.regs = None;
        let mut guarded = Ok(());
        if std::mem::take(&mut self.guard_changed) {
            let pages = self
                .vm
                .text_guard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pages();
            guarded = self
                .vm
                .vm
                .set_read_only(&pages)
                .map_err(|e| format!("cannot write-protect the patched sites: {e}"));
        }
        // The vCPUs run again whatever happened to the protection.
        self.resumed_at = pause::resume_all(&self.vm.vcpus).map_err(|e| e.to_string())?;
        guarded
    }

    fn resumed_at(&self) -> Option<std::time::Instant> {
        self.resumed_at
    }

    fn vcpu_rips(&mut self) -> Result<Vec<u64>, String> {
        Ok(self.paused_regs()?.iter().map(|r| r.rip).collect())
    }

    fn task_stacks(&mut self) -> Result<Vec<TaskStack>, String> {
        // Called inside the transition's pause: the vCPUs are stopped.
        let regs = self.paused_regs()?.to_vec();
        // Unsymbolized: the check looks at addresses; a blocker's frames are
        // symbolized afterwards (`symbolize`).
        // The walk's extra threads are the parked vCPU threads themselves.
        let traces = self
            .guest
            .task_traces_on(
                &LiveMemory(self.vm.vm.memory()),
                &regs,
                false,
                TASKS_PER_UNWIND_THREAD,
                &pause::ParkedVcpus(&self.vm.vcpus),
            )
            .map_err(|e| e.to_string())?;
        Ok(traces
            .into_iter()
            .map(|t| {
                // User-mode frames (the pt_regs at the bottom) are not kernel code.
                let frames = t
                    .trace
                    .trace
                    .frames
                    .iter()
                    .filter(|f| f.kind != FrameKind::UserRegs)
                    .map(|f| f.ip)
                    .collect();
                TaskStack {
                    pid: t.task.pid,
                    comm: t.task.comm,
                    frames,
                    reliable: t.trace.trace.reliable,
                    words: t.trace.words,
                }
            })
            .collect())
    }

    fn symbolize(&mut self, addr: u64) -> String {
        self.guest.symbolize(&LiveMemory(self.vm.vm.memory()), addr)
    }

    fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let pa = self.image_pa(addr, buf.len())?;
        self.vm
            .vm
            .memory()
            .read_slice(buf, GuestAddress(pa))
            .map_err(|e| e.to_string())
    }

    fn write_kernel_data(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        let pa = self.image_pa(addr, bytes.len())?;
        if self
            .vm
            .text_guard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .touches_site(pa, bytes.len() as u64)
        {
            return Err(format!("{addr:#x} is a guarded redirection site"));
        }
        self.vm
            .vm
            .memory()
            .write_slice(bytes, GuestAddress(pa))
            .map_err(|e| e.to_string())
    }

    fn write_kernel_text(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        let pa = self.image_pa(addr, bytes.len())?;
        self.vm
            .vm
            .memory()
            .write_slice(bytes, GuestAddress(pa))
            .map_err(|e| e.to_string())?;
        // A redirection (`jmp rel32`) is guarded against guest writes from the same pause;
        // a site given back its original bytes is released.
        let mut guard = self.vm.text_guard.lock().unwrap_or_else(|e| e.into_inner());
        if bytes.first() == Some(&JMP_REL32) {
            guard.protect(pa, bytes.len() as u64);
        } else {
            guard.unprotect(pa);
        }
        self.guard_changed = true;
        Ok(())
    }
}
