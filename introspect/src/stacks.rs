//! Kernel stacks of tasks: where each task's stack is, where its unwind starts (the frame
//! `__switch_to_asm` left for a sleeping task, the vCPU's registers for a running one), and
//! the symbolized, reliability-judged ORC trace (guest-introspection.md §4.3–§5.5).

use std::cell::{RefCell, RefMut};

use crate::cpu::CpuRegs;
use crate::host_code::{region_at, HostCode};
use crate::kallsyms::SymbolTable;
use crate::modules::LazyModules;
use crate::orc::{
    self, CodeMap, FullRegs, OrcEntry, OrcTable, StackKind, StackRange, StackReader, Trace,
    UnwindStart,
};
use crate::tasks::Task;
use crate::virt::KernelMemory;

/// Most frames one trace may have (the kernel's own limit for livepatch is 64).
pub const MAX_FRAMES: usize = 128;
/// `IRQ_STACK_SIZE` on x86-64.
pub const IRQ_STACK_SIZE: u64 = 16 << 10;
/// Size of the entry (trampoline) stack page.
pub const ENTRY_STACK_SIZE: u64 = 4096;
/// Start of the per-CPU entry areas (`CPU_ENTRY_AREA_BASE` + the IDT alias page); not
/// randomized in 6.1.
pub const CEA_PERCPU_BASE: u64 = 0xffff_fe00_0000_1000;

/// Where each CPU's extra stacks are, from kallsyms and BTF.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuStackLayout {
    /// Per-cpu offset of `hardirq_stack_ptr`.
    pub hardirq_stack_ptr: Option<u64>,
    /// Per-cpu offset of `cea_exception_stacks`, and (offset, size) of each IST stack in it.
    pub cea_exception_stacks: Option<u64>,
    pub exception_stacks: Vec<(u64, u64)>,
    /// `sizeof(struct cpu_entry_area)` and the offset of `entry_stack_page` in it.
    pub entry_area: Option<(u64, u64)>,
}

/// Everything needed to unwind.
pub struct Unwinder<'a> {
    pub mem: &'a dyn KernelMemory,
    pub orc: &'a OrcTable,
    pub symbols: &'a SymbolTable,
    /// Kernel text ranges (core text, init text).
    pub text: &'a [(u64, u64)],
    pub ret_from_fork: u64,
    /// Return trampolines that hide the real caller (`return_to_handler` of the function
    /// graph tracer, the kretprobe/rethook trampoline): a trace through one is unreliable.
    pub trampolines: &'a [u64],
    pub percpu_offsets: &'a [u64],
    pub cpu_stacks: &'a CpuStackLayout,
    /// Module text, ORC tables and symbols, read when a trace first leaves vmlinux.
    pub modules: LazyModules<'a>,
    /// Code the host placed in the guest (live-patch bundles), with its ORC.
    pub host_code: &'a [HostCode],
    /// Symbolize every frame ([`TaskTrace::symbols`]); a live patch's check does not
    /// (it symbolizes only the frames of a task that blocks it).
    pub symbolize: bool,
    /// The buffer each unwind copies its stack into, kept from one task to the next.
    pub scratch: RefCell<Vec<u8>>,
}

impl CodeMap for Unwinder<'_> {
    fn is_text(&self, ip: u64) -> bool {
        self.is_core_text(ip) || region_at(self.host_code, ip).is_some() || self.modules.is_text(ip)
    }

    fn orc(&self, ip: u64) -> Option<OrcEntry> {
        if self.is_core_text(ip) {
            self.orc.find(ip)
        } else if let Some(code) = region_at(self.host_code, ip) {
            code.orc(ip)
        } else {
            self.modules.orc(ip)
        }
    }
}

/// Stack words for the unwinder: the live part of the stack being unwound is read once
/// (`[sp, end)`, usually under a page) and served from that copy; any other word (another
/// stack, a `pt_regs` elsewhere) is read from memory.
struct Reader<'a> {
    mem: &'a dyn KernelMemory,
    base: u64,
    bytes: RefMut<'a, Vec<u8>>,
}

impl<'a> Reader<'a> {
    /// Buffers `[from, range.end)` of `range` (8-byte aligned, at most the range) in
    /// `bytes`, a reused buffer. A range that cannot be read in one piece (a guard page,
    /// a hole) is left to word reads.
    fn new(
        mem: &'a dyn KernelMemory,
        range: Option<StackRange>,
        from: u64,
        mut bytes: RefMut<'a, Vec<u8>>,
    ) -> Self {
        bytes.clear();
        let mut r = Reader {
            mem,
            base: 0,
            bytes,
        };
        let Some(range) = range else {
            return r;
        };
        let start = from.max(range.start) & !7;
        let len = range.end.saturating_sub(start).min(MAX_BUFFERED_STACK) & !7;
        if len == 0 {
            return r;
        }
        r.bytes.resize(len as usize, 0);
        if mem.read_virt(start, &mut r.bytes).is_ok() {
            r.base = start;
        } else {
            r.bytes.clear();
        }
        r
    }
}

impl StackReader for Reader<'_> {
    fn read_u64(&self, va: u64) -> Option<u64> {
        if va >= self.base {
            let off = (va - self.base) as usize;
            if let Some(w) = off.checked_add(8).and_then(|end| self.bytes.get(off..end)) {
                return Some(u64::from_le_bytes(w.try_into().unwrap_or_default()));
            }
        }
        self.mem.read_u64(va).ok()
    }
}

/// Which kernel CPU a vCPU is: the CPU whose per-cpu offset is the vCPU's per-cpu base.
pub fn cpu_of(percpu_offsets: &[u64], regs: &CpuRegs) -> Option<u32> {
    let want = regs.percpu_base();
    let alt = if regs.in_kernel() {
        regs.kernel_gs_base
    } else {
        regs.gs_base
    };
    let find = |b: u64| percpu_offsets.iter().position(|&o| o == b && b != 0);
    find(want).or_else(|| find(alt)).map(|c| c as u32)
}

/// Most bytes of one stack buffered for an unwind (a task stack is 16 KiB).
const MAX_BUFFERED_STACK: u64 = 16 << 10;

/// A task's trace, symbolized.
#[derive(Debug, Clone)]
pub struct TaskTrace {
    pub trace: Trace,
    /// `function+0xoff/0xsize` per frame (the address when no symbol covers it); empty
    /// when the unwinder was told not to symbolize.
    pub symbols: Vec<String>,
    /// The stacks the trace was allowed to use.
    pub stacks: Vec<StackRange>,
    /// Every word of those stacks when the trace is unreliable (for the conservative
    /// "does anything on this stack point into…" check); empty when it is reliable.
    pub words: Vec<u64>,
}

/// A code address as the kernel prints it in a stack trace: `function+0xoff/0xsize`
/// from vmlinux's symbols, `function+0xoff/0xsize [module]` in module text, the bare
/// address in module memory no symbol covers.
pub fn symbolize(
    symbols: &SymbolTable,
    in_core_text: bool,
    modules: &LazyModules<'_>,
    host_code: &[HostCode],
    ip: u64,
) -> String {
    if let Some(code) = region_at(host_code, ip).filter(|_| !in_core_text) {
        return code.symbolize(ip).unwrap_or_else(|| format!("{ip:#x}"));
    }
    if !in_core_text && modules.module_at(ip).is_some() {
        return modules.symbolize(ip).unwrap_or_else(|| format!("{ip:#x}"));
    }
    // Past the kernel image (`_end`; a live patch's code, say) no kallsyms symbol covers
    // an address: the kernel prints it bare, and so does this.
    if symbols.lookup("_end", None).is_ok_and(|end| ip >= end.addr) {
        return format!("{ip:#x}");
    }
    match symbols.symbolize(ip) {
        Some((s, off)) => format!("{}+{off:#x}/{:#x}", s.name, s.size),
        None => format!("{ip:#x}"),
    }
}

/// `addr` lies in one of the `[start, end)` ranges.
pub fn in_ranges(ranges: &[(u64, u64)], addr: u64) -> bool {
    ranges.iter().any(|&(s, e)| s <= addr && addr < e)
}

fn unreliable(problem: String) -> Trace {
    Trace {
        frames: Vec::new(),
        reliable: false,
        problem: Some(problem),
        ended_in_user: false,
    }
}

impl Unwinder<'_> {
    /// Which kernel CPU a vCPU is, by its per-cpu base.
    pub fn cpu_of(&self, regs: &CpuRegs) -> Option<u32> {
        cpu_of(self.percpu_offsets, regs)
    }

    /// `addr` is vmlinux text (core or init).
    pub fn is_core_text(&self, addr: u64) -> bool {
        in_ranges(self.text, addr)
    }

    /// The IRQ, exception and entry stacks of `cpu`.
    pub fn cpu_stack_ranges(&self, cpu: u32) -> Vec<StackRange> {
        let mut out = Vec::new();
        let Some(&base) = self.percpu_offsets.get(cpu as usize) else {
            return out;
        };
        let l = self.cpu_stacks;
        if let Some(ptr) = l
            .hardirq_stack_ptr
            .and_then(|o| self.mem.read_u64(base.wrapping_add(o)).ok())
            .filter(|&p| p != 0)
        {
            let end = ptr.wrapping_add(8);
            out.push(StackRange {
                kind: StackKind::Irq,
                start: end.wrapping_sub(IRQ_STACK_SIZE),
                end,
            });
        }
        if let Some(estacks) = l
            .cea_exception_stacks
            .and_then(|o| self.mem.read_u64(base.wrapping_add(o)).ok())
            .filter(|&p| p != 0)
        {
            for (i, &(off, size)) in l.exception_stacks.iter().enumerate() {
                let start = estacks.wrapping_add(off);
                out.push(StackRange {
                    kind: StackKind::Exception(i as u8),
                    start,
                    end: start.wrapping_add(size),
                });
            }
        }
        if let Some((size, off)) = l.entry_area {
            let start = CEA_PERCPU_BASE
                .wrapping_add(u64::from(cpu).wrapping_mul(size))
                .wrapping_add(off);
            out.push(StackRange {
                kind: StackKind::Entry,
                start,
                end: start.wrapping_add(ENTRY_STACK_SIZE),
            });
        }
        out
    }

    fn task_range(task: &Task) -> StackRange {
        let (start, end) = task.stack_range();
        StackRange {
            kind: StackKind::Task,
            start,
            end,
        }
    }

    /// Unwinds `task`. A task current on a CPU needs that CPU's vCPU registers (`regs`);
    /// without them its trace is unreliable, as the kernel treats a task running elsewhere.
    pub fn trace(&self, task: &Task, regs: Option<&CpuRegs>) -> TaskTrace {
        let task_stack = Self::task_range(task);
        let mut stacks = vec![task_stack];
        let trace = match (task.current_on, regs) {
            (Some(_), Some(r)) if !r.in_kernel() => Trace {
                // In user mode: no live kernel frames, only the user pt_regs at the top.
                frames: Vec::new(),
                reliable: true,
                problem: None,
                ended_in_user: true,
            },
            (Some(cpu), Some(r)) => {
                stacks.extend(self.cpu_stack_ranges(cpu));
                let start = UnwindStart {
                    ip: r.rip,
                    sp: r.rsp,
                    bp: r.rbp,
                    signal: true,
                    regs: Some(FullRegs {
                        ip: r.rip,
                        sp: r.rsp,
                        bp: r.rbp,
                        di: r.rdi,
                        dx: r.rdx,
                        r10: r.r10,
                        r13: r.r13,
                        cs: u64::from(r.cs),
                    }),
                };
                let on = stacks.iter().find(|r| r.contains(start.sp, 8)).copied();
                let reader = Reader::new(self.mem, on, start.sp, self.scratch.borrow_mut());
                self.run(&start, &stacks, &reader)
            }
            (Some(cpu), None) => unreliable(format!("running on CPU {cpu} (no vCPU registers)")),
            (None, _) => {
                let reader = Reader::new(
                    self.mem,
                    Some(task_stack),
                    task.saved_sp,
                    self.scratch.borrow_mut(),
                );
                match orc::start_from_inactive_frame(&reader, task.saved_sp, self.ret_from_fork) {
                    Some(start)
                        if task_stack.start <= task.saved_sp && task.saved_sp < task_stack.end =>
                    {
                        let mut t = self.run(&start, &stacks, &reader);
                        if task.on_cpu && t.reliable {
                            t.reliable = false;
                            t.problem = Some("in the middle of a context switch".into());
                        }
                        t
                    }
                    _ => unreliable(format!(
                        "saved stack pointer {:#x} is not on its stack {:#x}..{:#x}",
                        task.saved_sp, task_stack.start, task_stack.end
                    )),
                }
            }
        };
        let mut trace = trace;
        if let Some(f) = trace
            .frames
            .iter()
            .find(|f| self.trampolines.contains(&f.ip))
        {
            if trace.reliable {
                trace.reliable = false;
                trace.problem = Some(format!(
                    "return trampoline {} hides the caller",
                    self.symbolize(f.ip)
                ));
            }
        }
        let symbols = if self.symbolize {
            trace.frames.iter().map(|f| self.symbolize(f.ip)).collect()
        } else {
            Vec::new()
        };
        let words = if trace.reliable {
            Vec::new()
        } else {
            stacks.iter().flat_map(|r| self.stack_words(r)).collect()
        };
        TaskTrace {
            trace,
            symbols,
            stacks,
            words,
        }
    }

    fn run(&self, start: &UnwindStart, stacks: &[StackRange], reader: &Reader<'_>) -> Trace {
        orc::unwind(self, start, stacks, reader, MAX_FRAMES)
    }

    /// `function+0xoff/0xsize`, as `/proc/PID/stack` prints it; in module text,
    /// `function+0xoff/0xsize [module]`.
    pub fn symbolize(&self, ip: u64) -> String {
        symbolize(
            self.symbols,
            self.is_core_text(ip),
            &self.modules,
            self.host_code,
            ip,
        )
    }

    /// Every 8-byte word of `range` (for the conservative scan).
    pub fn stack_words(&self, range: &StackRange) -> Vec<u64> {
        let len = range.end.saturating_sub(range.start).min(64 << 10) as usize;
        let mut bytes = vec![0u8; len & !7];
        if self.mem.read_virt(range.start, &mut bytes).is_err() {
            // Page by page: a guard page or hole reads as zeros rather than losing the rest.
            for (i, chunk) in bytes.chunks_mut(4096).enumerate() {
                let va = range.start.wrapping_add(i as u64 * 4096);
                if self.mem.read_virt(va, chunk).is_err() {
                    chunk.fill(0);
                }
            }
        }
        bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kallsyms::Symbol;
    use crate::virt::SparseMemory;

    #[test]
    fn addresses_past_the_image_are_printed_bare() {
        let sym = Symbol::text;
        let symbols = SymbolTable::new(vec![
            sym(0xffff_ffff_8100_0000, "_stext"),
            sym(0xffff_ffff_8100_0100, "ksys_read"),
            sym(0xffff_ffff_8300_0000, "__init_scratch_begin"),
            sym(0xffff_ffff_8340_0000, "_end"),
        ]);
        let mem = SparseMemory::default();
        let modules = LazyModules::new(&mem, None);
        assert_eq!(
            symbolize(&symbols, true, &modules, &[], 0xffff_ffff_8100_0110),
            "ksys_read+0x10/0x1ffff00"
        );
        // A live patch's code, just past the image: no kallsyms symbol covers it.
        assert_eq!(
            symbolize(&symbols, false, &modules, &[], 0xffff_ffff_8360_10a9),
            "0xffffffff836010a9"
        );
        // Unless the host says whose code it is.
        let patch = HostCode::new(
            "fix",
            0xffff_ffff_8360_0000,
            0xffff_ffff_8360_2000,
            &[],
            [("new_read".to_string(), 0xffff_ffff_8360_1000, 0x100)],
        );
        assert_eq!(
            symbolize(&symbols, false, &modules, &[patch], 0xffff_ffff_8360_10a9),
            "new_read+0xa9/0x100 [fix]"
        );
    }
}
