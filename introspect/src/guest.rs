//! The introspection context of one guest kernel: discovery (kallsyms), then the kernel's
//! page tables, BTF and ORC tables, and the offsets and roots the task walk and unwinder
//! need. Loaded once per kernel boot (everything here is read-only kernel data), used for
//! any number of task walks on the same memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::btf::{Btf, BtfError};
use crate::cpu::{CpuRegs, Vcpus};
use crate::host_code::HostCode;
use crate::kernel::{KallsymsFrom, Kernel, KernelError};
use crate::memory::{GuestPhysMemory, MemError};
use crate::modules::{self, LazyModules, Module, ModuleError, ModuleLayout};
use crate::orc::{OrcError, OrcTable};
use crate::paging::{PageTables, VirtMemory};
use crate::stacks::{self, CpuStackLayout, TaskTrace, Unwinder};
use crate::tasks::{self, Roster, Task, TaskError, TaskLayout, TaskRoots};
use crate::workers::{ScopedThreads, Workers};

/// Largest BTF blob accepted (6.1.187's is about 4 MiB).
const MAX_BTF: u64 = 64 << 20;
/// Largest ORC tables accepted (6.1.187 has about 368k entries).
const MAX_ORC_ENTRIES: u64 = 4 << 20;

/// Errors loading the introspection context.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("{0}")]
    Kernel(#[from] KernelError),
    #[error("kallsyms lacks {0}")]
    Symbol(String),
    #[error("{what}: {size} bytes is out of range")]
    Size { what: &'static str, size: u64 },
    #[error("reading {what}: {source}")]
    Memory {
        what: &'static str,
        source: MemError,
    },
    #[error("BTF: {0}")]
    Btf(#[from] BtfError),
    #[error("ORC: {0}")]
    Orc(#[from] OrcError),
    #[error("{0}")]
    Tasks(#[from] TaskError),
    #[error("modules: {0}")]
    Modules(#[from] ModuleError),
}

/// A guest kernel ready for task walks and unwinding.
pub struct GuestKernel {
    pub kernel: Kernel,
    pub btf: Btf,
    pub orc: OrcTable,
    pub layout: TaskLayout,
    pub roots: TaskRoots,
    pub cpu_stacks: CpuStackLayout,
    /// The kernel's own page tables (`init_top_pgt`): valid for every kernel address.
    pub page_tables: PageTables,
    text: Vec<(u64, u64)>,
    ret_from_fork: u64,
    trampolines: Vec<u64>,
    /// The `modules` list head and `struct module`'s layout, or why they are unknown.
    module_list: Result<(u64, ModuleLayout), String>,
    /// Code the host placed in the guest ([`GuestKernel::set_host_code`]).
    host_code: Vec<HostCode>,
}

/// One task and its kernel stack trace.
#[derive(Debug, Clone)]
pub struct TaskStackTrace {
    pub task: Task,
    pub trace: TaskTrace,
}

impl GuestKernel {
    /// Finds the kernel in `mem` and loads what task walks and unwinding need.
    pub fn load(mem: &dyn GuestPhysMemory) -> Result<Self, GuestError> {
        Self::load_with(mem, KallsymsFrom::Auto)
    }

    /// [`GuestKernel::load`], taking the kallsyms tables from `from`.
    pub fn load_with(mem: &dyn GuestPhysMemory, from: KallsymsFrom) -> Result<Self, GuestError> {
        let kernel = Kernel::discover_with(mem, from)?;
        let sym = |name: &str| {
            kernel
                .symbols
                .lookup(name, None)
                .map(|s| s.addr)
                .map_err(|_| GuestError::Symbol(name.to_string()))
        };
        let read_image = |what: &'static str, start: u64, stop: u64, max: u64| {
            let size = stop.wrapping_sub(start);
            if stop < start || size > max {
                return Err(GuestError::Size { what, size });
            }
            let mut buf = vec![0u8; size as usize];
            mem.read_phys(kernel.image.pa(start), &mut buf)
                .map_err(|source| GuestError::Memory { what, source })?;
            Ok(buf)
        };
        let btf_bytes = read_image("BTF", sym("__start_BTF")?, sym("__stop_BTF")?, MAX_BTF)?;
        let btf = Btf::parse(&btf_bytes)?;
        let ip_start = sym("__start_orc_unwind_ip")?;
        let ips = read_image(
            "ORC ip table",
            ip_start,
            sym("__stop_orc_unwind_ip")?,
            MAX_ORC_ENTRIES * 4,
        )?;
        let entries = read_image(
            "ORC table",
            sym("__start_orc_unwind")?,
            sym("__stop_orc_unwind")?,
            MAX_ORC_ENTRIES * 6,
        )?;
        let orc = OrcTable::from_raw(ip_start, &ips, &entries)?;
        let layout = TaskLayout::from_btf(&btf)?;
        let percpu = |name: &str| {
            kernel
                .symbols
                .lookup(name, None)
                .ok()
                .filter(|s| s.kind == 'A' || s.kind == 'D' || s.kind == 'd')
                .map(|s| s.addr)
        };
        let roots = TaskRoots {
            init_task: sym("init_task")?,
            nr_cpu_ids: sym("nr_cpu_ids")?,
            per_cpu_offset: sym("__per_cpu_offset")?,
            runqueues: sym("runqueues")?,
            current_task: percpu("current_task"),
        };
        let estack_names = [
            "DF_stack",
            "NMI_stack",
            "DB_stack",
            "MCE_stack",
            "VC_stack",
            "VC2_stack",
        ];
        let exception_stacks = estack_names
            .iter()
            .filter_map(|m| {
                let off = btf.member_offset("cea_exception_stacks", m).ok()?;
                let size = btf.member_size("cea_exception_stacks", m).ok()?;
                Some((off, size))
            })
            .collect();
        let cpu_stacks = CpuStackLayout {
            hardirq_stack_ptr: percpu("hardirq_stack_ptr"),
            cea_exception_stacks: percpu("cea_exception_stacks"),
            exception_stacks,
            entry_area: btf
                .type_size("cpu_entry_area")
                .ok()
                .zip(btf.member_offset("cpu_entry_area", "entry_stack_page").ok()),
        };
        let mut text = vec![(sym("_stext")?, sym("_etext")?)];
        if let (Ok(s), Ok(e)) = (sym("_sinittext"), sym("_einittext")) {
            text.push((s, e));
        }
        let pgt = sym("init_top_pgt")?;
        let la57 = kernel
            .vmcoreinfo
            .number("pgtable_l5_enabled")
            .is_some_and(|v| v != 0);
        let page_tables = PageTables::new(kernel.image.pa(pgt), la57);
        let trampolines = [
            "return_to_handler",
            "arch_rethook_trampoline",
            "__kretprobe_trampoline",
        ]
        .iter()
        .filter_map(|n| sym(n).ok())
        .collect();
        let module_list = match (sym("modules"), ModuleLayout::from_btf(&btf)) {
            (Ok(head), Ok(layout)) => Ok((head, layout)),
            (Err(e), _) => Err(e.to_string()),
            (_, Err(e)) => Err(e.to_string()),
        };
        Ok(GuestKernel {
            module_list,
            host_code: Vec::new(),
            ret_from_fork: sym("ret_from_fork")?,
            trampolines,
            kernel,
            btf,
            orc,
            layout,
            roots,
            cpu_stacks,
            page_tables,
            text,
        })
    }

    /// The loaded modules, in `/proc/kallsyms` order. Modules come and go: read them while
    /// the vCPUs are paused, or from a snapshot.
    pub fn modules(&self, mem: &dyn GuestPhysMemory) -> Result<Vec<Module>, GuestError> {
        let (head, layout) = self
            .module_list
            .as_ref()
            .map_err(|e| ModuleError::Btf(e.clone()))?;
        Ok(modules::enumerate(&self.virt(mem), layout, *head)?)
    }

    /// Each loaded module's core memory, text and ORC table pointers (`/proc/modules`
    /// order). Read while the vCPUs are paused, or from a snapshot.
    pub fn module_code(
        &self,
        mem: &dyn GuestPhysMemory,
    ) -> Result<Vec<modules::ModuleCode>, GuestError> {
        let (head, layout) = self
            .module_list
            .as_ref()
            .map_err(|e| ModuleError::Btf(e.clone()))?;
        Ok(modules::code_ranges(&self.virt(mem), layout, *head)?)
    }

    fn lazy_modules<'a>(&'a self, v: &'a VirtMemory<'a>) -> LazyModules<'a> {
        LazyModules::new(
            v,
            self.module_list.as_ref().ok().map(|(head, l)| (*head, l)),
        )
    }

    /// A code address as a stack trace prints it: `function+0xoff/0xsize`, with
    /// ` [module]` in module text, or the bare address.
    pub fn symbolize(&self, mem: &dyn GuestPhysMemory, addr: u64) -> String {
        let in_core = stacks::in_ranges(&self.text, addr);
        let v = self.virt(mem);
        stacks::symbolize(
            &self.kernel.symbols,
            in_core,
            &self.lazy_modules(&v),
            &self.host_code,
            addr,
        )
    }

    /// Tells the unwinder and the symbolizer about code the host placed in the guest
    /// (the applied live-patch bundles): its text counts as kernel text with its own ORC
    /// table, as a livepatch module's does in the kernel.
    pub fn set_host_code(&mut self, code: Vec<HostCode>) {
        self.host_code = code;
    }

    /// The host-placed code regions in force.
    pub fn host_code(&self) -> &[HostCode] {
        &self.host_code
    }

    /// Kernel virtual memory through the kernel's page tables.
    pub fn virt<'a>(&self, mem: &'a dyn GuestPhysMemory) -> VirtMemory<'a> {
        VirtMemory::new(mem, self.page_tables)
    }

    /// Every task (see `tasks::enumerate`).
    pub fn tasks(&self, mem: &dyn GuestPhysMemory) -> Result<Vec<Task>, GuestError> {
        let v = self.virt(mem);
        Ok(tasks::enumerate(&v, &self.layout, &self.roots)?)
    }

    /// Every task with its stack trace; running tasks are unwound from their vCPU's
    /// registers. Call with every vCPU paused (or on a snapshot).
    pub fn task_traces(
        &self,
        mem: &dyn GuestPhysMemory,
        vcpus: &dyn Vcpus,
    ) -> Result<Vec<TaskStackTrace>, GuestError> {
        self.task_traces_with(mem, vcpus, true)
    }

    /// [`GuestKernel::task_traces`], leaving the frames unsymbolized when `symbolize`
    /// is false (a live patch's check, which looks only at addresses, inside its pause).
    pub fn task_traces_with(
        &self,
        mem: &dyn GuestPhysMemory,
        vcpus: &dyn Vcpus,
        symbolize: bool,
    ) -> Result<Vec<TaskStackTrace>, GuestError> {
        self.task_traces_split(mem, vcpus, symbolize, TASKS_PER_UNWIND_THREAD)
    }

    /// [`GuestKernel::task_traces_with`] on one thread per `per_thread` processes (at
    /// most one per host CPU), each with its own page walker: after the process list,
    /// each thread group is read and unwound on its own, and on a paused VM the vCPUs'
    /// host CPUs are free. The traces come back in task order whatever the split.
    pub fn task_traces_split(
        &self,
        mem: &dyn GuestPhysMemory,
        vcpus: &dyn Vcpus,
        symbolize: bool,
        per_thread: usize,
    ) -> Result<Vec<TaskStackTrace>, GuestError> {
        self.task_traces_on(mem, vcpus, symbolize, per_thread, &ScopedThreads)
    }

    /// [`GuestKernel::task_traces_split`] on the threads `workers` lends (a live VM's
    /// parked vCPU threads, say).
    pub fn task_traces_on(
        &self,
        mem: &dyn GuestPhysMemory,
        vcpus: &dyn Vcpus,
        symbolize: bool,
        per_thread: usize,
        workers: &dyn Workers,
    ) -> Result<Vec<TaskStackTrace>, GuestError> {
        // One read of the per-CPU offsets serves the task walk and every unwind; each
        // thread has its own page walker (and translation cache).
        let v = self.virt(mem);
        let offsets = tasks::percpu_offsets(&v, &self.roots)?;
        let roster = Roster::read(&v, &self.layout, &self.roots, &offsets)?;
        let mut regs = Vec::with_capacity(vcpus.vcpu_count());
        for i in 0..vcpus.vcpu_count() {
            regs.push(vcpus.vcpu_regs(i).map_err(|detail| TaskError::Read {
                what: format!("vCPU {i} registers"),
                detail,
            })?);
        }
        let by_cpu: Vec<(u32, &CpuRegs)> = regs
            .iter()
            .filter_map(|r| stacks::cpu_of(&offsets, r).map(|c| (c, r)))
            .collect();
        let unwind = |u: &Unwinder<'_>, tasks: Vec<Task>| -> Vec<TaskStackTrace> {
            tasks
                .into_iter()
                .map(|task| {
                    let r = task
                        .current_on
                        .and_then(|c| by_cpu.iter().find(|(cpu, _)| *cpu == c))
                        .map(|(_, r)| *r);
                    let trace = u.trace(&task, r);
                    TaskStackTrace { task, trace }
                })
                .collect()
        };
        // The thread groups, a block of leaders at a time, on as many threads as the
        // split allows: each run takes the next block until none is left, so a run
        // that starts late takes fewer, and one run alone does them all.
        let next = AtomicUsize::new(0);
        let leaders = &roster.leaders;
        let blocks = leaders.len().div_ceil(LEADERS_PER_BLOCK);
        let done: Mutex<Vec<(usize, Vec<TaskStackTrace>)>> = Mutex::new(Vec::new());
        let failed: Mutex<Option<TaskError>> = Mutex::new(None);
        let job = || {
            let v = self.virt(mem);
            let u = self.unwinder(&v, &offsets, symbolize);
            let mut mine = Vec::new();
            loop {
                let block = next.fetch_add(1, Ordering::Relaxed);
                if block >= blocks {
                    break;
                }
                let end = ((block + 1) * LEADERS_PER_BLOCK).min(leaders.len());
                match roster.groups(&v, &self.layout, &leaders[block * LEADERS_PER_BLOCK..end]) {
                    Ok(group) => mine.push((block, unwind(&u, group))),
                    Err(e) => {
                        // Stop the other runs too: the walk fails.
                        next.store(blocks, Ordering::Relaxed);
                        failed
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            }
            done.lock().unwrap_or_else(|e| e.into_inner()).extend(mine);
        };
        let threads = leaders.len().div_ceil(per_thread.max(1));
        if threads > 1 {
            workers.run(threads, &job);
        }
        // Whatever the workers left (all of it with one thread, or if none ran).
        if next.load(Ordering::Relaxed) < blocks {
            job();
        }
        if let Some(e) = failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
            return Err(e.into());
        }
        let mut done = done.into_inner().unwrap_or_else(|e| e.into_inner());
        if done.len() != blocks {
            // A run that panicked lost the blocks it had taken.
            return Err(TaskError::Incomplete(format!(
                "{} of {blocks} blocks of processes were walked (a walk thread failed)",
                done.len()
            ))
            .into());
        }
        done.sort_unstable_by_key(|(block, _)| *block);
        let u = self.unwinder(&v, &offsets, symbolize);
        let first = unwind(&u, vec![roster.init_task(&v, &self.layout)?]);
        let last = unwind(&u, roster.cpu_tasks(&v, &self.layout)?);
        Ok(tasks::merge(
            std::iter::once(first)
                .chain(done.into_iter().map(|(_, traces)| traces))
                .chain(std::iter::once(last)),
        )?)
    }
}

impl GuestKernel {
    fn unwinder<'a>(
        &'a self,
        v: &'a VirtMemory<'a>,
        percpu_offsets: &'a [u64],
        symbolize: bool,
    ) -> Unwinder<'a> {
        Unwinder {
            mem: v,
            orc: &self.orc,
            symbols: &self.kernel.symbols,
            text: &self.text,
            ret_from_fork: self.ret_from_fork,
            trampolines: &self.trampolines,
            percpu_offsets,
            cpu_stacks: &self.cpu_stacks,
            modules: self.lazy_modules(v),
            host_code: &self.host_code,
            symbolize,
            scratch: Default::default(),
        }
    }
}

impl tasks::HasTask for TaskStackTrace {
    fn task(&self) -> &Task {
        &self.task
    }
}

/// Thread-group leaders a task-walk thread takes at a time.
const LEADERS_PER_BLOCK: usize = 32;

/// [`GuestKernel::task_traces_with`] starts another thread for each this many processes
/// (thread-group leaders). Starting a thread costs tens of microseconds; walking and
/// unwinding this many tasks, several hundred.
pub const TASKS_PER_UNWIND_THREAD: usize = 256;
