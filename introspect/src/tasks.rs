//! Every task of the guest kernel: thread-group leaders from `init_task.tasks`, their
//! threads from `signal->thread_head`, and each CPU's idle and current task from its
//! runqueue (guest-introspection.md §4). Offsets come from the kernel's BTF; every list
//! walk is bounded and checked for cycles, because a vCPU may have been stopped in the
//! middle of a list update and the guest controls every pointer.

use std::collections::HashSet;

use crate::btf::Btf;
use crate::virt::KernelMemory;

/// Most tasks a walk accepts (the kernel's default `pid_max` is 32768; 4M is its limit).
pub const MAX_TASKS: usize = 1 << 20;
/// Most CPUs accepted (`NR_CPUS` of the Debian kernel is 8192).
pub const MAX_CPUS: u32 = 8192;
/// `THREAD_SIZE` on x86-64 without KASAN.
pub const THREAD_SIZE: u64 = 16 << 10;
/// Widest run of `task_struct` read at once (6.1's whole struct is about 9.5 KiB; BTF
/// comes from the guest).
const MAX_TASK_SPAN: u64 = 32 << 10;
/// Fields closer than this are read together.
const CLUSTER_GAP: u64 = 256;
/// The `task_struct` fields a [`Task`] is read from.
const TASK_FIELDS: usize = 11;
/// Bytes of `task_struct` fields read into a buffer on the stack (more go to the heap).
const SMALL_TASK_READ: usize = 1024;

/// `PF_IDLE` and `PF_KTHREAD` in `task_struct.flags`.
pub const PF_IDLE: u32 = 0x2;
pub const PF_KTHREAD: u32 = 0x0020_0000;

/// Errors enumerating tasks.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TaskError {
    #[error("BTF lacks {0}")]
    Btf(String),
    #[error("kallsyms lacks {0}")]
    Symbol(&'static str),
    #[error("reading {what}: {detail}")]
    Read { what: String, detail: String },
    #[error("the {0} list is inconsistent (a vCPU may be mid-update; retry): {1}")]
    TornList(&'static str, String),
    #[error("guest value out of range: {0}")]
    Range(String),
    #[error("task walk incomplete: {0}")]
    Incomplete(String),
}

/// Structure offsets the walk needs, resolved from BTF (no hard-coded offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskLayout {
    pub cpu: u64,
    pub state: u64,
    pub stack: u64,
    pub flags: u64,
    pub on_cpu: u64,
    pub tasks: u64,
    pub exit_state: u64,
    pub pid: u64,
    pub tgid: u64,
    pub comm: u64,
    pub signal: u64,
    pub thread_node: u64,
    pub thread_sp: u64,
    pub mm: u64,
    pub signal_thread_head: u64,
    pub rq_curr: u64,
    pub rq_idle: u64,
}

impl TaskLayout {
    pub fn from_btf(btf: &Btf) -> Result<Self, TaskError> {
        let off = |ty: &str, path: &str| {
            btf.member_offset(ty, path)
                .map_err(|e| TaskError::Btf(format!("{ty}.{path}: {e}")))
        };
        Ok(TaskLayout {
            cpu: off("task_struct", "thread_info.cpu")?,
            state: off("task_struct", "__state")?,
            stack: off("task_struct", "stack")?,
            flags: off("task_struct", "flags")?,
            on_cpu: off("task_struct", "on_cpu")?,
            tasks: off("task_struct", "tasks")?,
            exit_state: off("task_struct", "exit_state")?,
            pid: off("task_struct", "pid")?,
            tgid: off("task_struct", "tgid")?,
            comm: off("task_struct", "comm")?,
            signal: off("task_struct", "signal")?,
            thread_node: off("task_struct", "thread_node")?,
            thread_sp: off("task_struct", "thread.sp")?,
            mm: off("task_struct", "mm")?,
            signal_thread_head: off("signal_struct", "thread_head")?,
            rq_curr: off("rq", "curr")?,
            rq_idle: off("rq", "idle")?,
        })
    }
}

/// Addresses of the kernel objects the walk starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskRoots {
    /// `init_task` (CPU 0's idle task, head of the process list).
    pub init_task: u64,
    /// `nr_cpu_ids` (unsigned int).
    pub nr_cpu_ids: u64,
    /// `__per_cpu_offset[]`.
    pub per_cpu_offset: u64,
    /// Per-cpu offset (kallsyms `A` value) of `runqueues`.
    pub runqueues: u64,
    /// Per-cpu offset of `current_task`, the kernel's `current`, when kallsyms has it.
    /// It is the task whose stack the CPU is on: `__schedule()` sets `rq->curr` to the
    /// next task before it switches stacks (and calls `psi_task_switch()` in between),
    /// while `current_task` changes together with the stack, in `__switch_to()`.
    /// Without it, `rq->curr`.
    pub current_task: Option<u64>,
}

/// One task as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Task {
    /// Address of its `task_struct`.
    pub addr: u64,
    pub pid: i32,
    pub tgid: i32,
    pub comm: String,
    /// `__state`.
    pub state: u32,
    pub exit_state: u32,
    pub flags: u32,
    /// `thread_info.cpu`: the CPU it last ran on.
    pub cpu: u32,
    pub on_cpu: bool,
    /// Some(cpu) when it is its runqueue's current task: executing on that vCPU.
    pub current_on: Option<u32>,
    /// Base of its kernel stack (`task->stack`), `THREAD_SIZE` long.
    pub stack: u64,
    /// Saved stack pointer (`thread.sp`), meaningful while it is switched out.
    pub saved_sp: u64,
    pub mm: u64,
}

impl Task {
    pub fn is_kthread(&self) -> bool {
        self.flags & PF_KTHREAD != 0
    }

    pub fn is_idle(&self) -> bool {
        self.flags & PF_IDLE != 0 && self.pid == 0
    }

    /// The state letter `ps` prints.
    pub fn state_letter(&self) -> char {
        if self.exit_state & 0x20 != 0 {
            return 'Z';
        }
        if self.exit_state & 0x10 != 0 {
            return 'X';
        }
        match self.state & 0xff {
            0 => 'R',
            1 => 'S',
            2 if self.state & 0x400 != 0 => 'I',
            2 => 'D',
            4 => 'T',
            8 => 't',
            _ if self.state & 0x80 != 0 => 'X',
            _ if self.state & 0x40 != 0 => 'P',
            _ => '?',
        }
    }

    /// `[stack, stack + THREAD_SIZE)`.
    pub fn stack_range(&self) -> (u64, u64) {
        (self.stack, self.stack.saturating_add(THREAD_SIZE))
    }
}

fn read_u64(m: &dyn KernelMemory, va: u64, what: &str) -> Result<u64, TaskError> {
    m.read_u64(va).map_err(|detail| TaskError::Read {
        what: what.to_string(),
        detail,
    })
}

fn read_u32(m: &dyn KernelMemory, va: u64, what: &str) -> Result<u32, TaskError> {
    m.read_u32(va).map_err(|detail| TaskError::Read {
        what: what.to_string(),
        detail,
    })
}

/// `__per_cpu_offset[0..nr_cpu_ids]`.
pub fn percpu_offsets(m: &dyn KernelMemory, roots: &TaskRoots) -> Result<Vec<u64>, TaskError> {
    let n = read_u32(m, roots.nr_cpu_ids, "nr_cpu_ids")?;
    if n == 0 || n > MAX_CPUS {
        return Err(TaskError::Range(format!("nr_cpu_ids = {n}")));
    }
    let mut bytes = vec![0u8; n as usize * 8];
    m.read_virt(roots.per_cpu_offset, &mut bytes)
        .map_err(|detail| TaskError::Read {
            what: "__per_cpu_offset".into(),
            detail,
        })?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or_default()))
        .collect())
}

/// Follows a circular `list_head` from `head`, yielding the containing objects
/// (`entry - member_offset`). Fails on a cycle that does not return to `head`, on an
/// unreadable link and after `MAX_TASKS` entries.
fn walk_list(
    m: &dyn KernelMemory,
    head: u64,
    member: u64,
    name: &'static str,
) -> Result<Vec<u64>, TaskError> {
    crate::virt::walk_list(m, head, member, MAX_TASKS).map_err(|e| TaskError::TornList(name, e))
}

fn read_task(
    m: &dyn KernelMemory,
    l: &TaskLayout,
    addr: u64,
    current_on: Option<u32>,
) -> Result<Task, TaskError> {
    // The fields sit in a few clusters (most near the start of task_struct, the saved
    // stack pointer near its end): one read per cluster, not one per field and not
    // the ~10 KiB between them.
    let mut fields: [(u64, u64); TASK_FIELDS] = [
        (l.comm, 16u64),
        (l.pid, 4),
        (l.tgid, 4),
        (l.state, 4),
        (l.exit_state, 4),
        (l.flags, 4),
        (l.cpu, 4),
        (l.on_cpu, 4),
        (l.stack, 8),
        (l.thread_sp, 8),
        (l.mm, 8),
    ];
    fields.sort_unstable();
    // (start, end) of each cluster, then where its bytes sit in the buffer below; no
    // more clusters than fields.
    let mut clusters = [(0u64, 0u64, 0usize); TASK_FIELDS];
    let mut n = 0usize;
    for &(off, len) in &fields {
        let end = off.saturating_add(len);
        match n.checked_sub(1).map(|i| &mut clusters[i]) {
            Some((_, e, _)) if off <= e.saturating_add(CLUSTER_GAP) => *e = (*e).max(end),
            _ => {
                clusters[n] = (off, end, 0);
                n += 1;
            }
        }
    }
    let clusters = &mut clusters[..n];
    let mut total = 0usize;
    for (start, end, at) in clusters.iter_mut() {
        if *end - *start > MAX_TASK_SPAN {
            return Err(TaskError::Range(format!(
                "task_struct fields span {} bytes",
                *end - *start
            )));
        }
        *at = total;
        total += (*end - *start) as usize;
    }
    // The clusters' bytes back to back in one buffer: on the stack when they fit (the
    // usual case: a few hundred bytes), else on the heap.
    let mut small = [0u8; SMALL_TASK_READ];
    let mut large = Vec::new();
    let buf: &mut [u8] = if total <= small.len() {
        &mut small[..total]
    } else {
        large.resize(total, 0);
        &mut large
    };
    for &(start, end, at) in clusters.iter() {
        m.read_virt(
            addr.wrapping_add(start),
            &mut buf[at..at + (end - start) as usize],
        )
        .map_err(|detail| TaskError::Read {
            what: format!("task {addr:#x}"),
            detail,
        })?;
    }
    let buf: &[u8] = buf;
    // Every field lies inside the cluster made for it.
    let at = |off: u64, n: usize| -> &[u8] {
        clusters
            .iter()
            .find(|(start, end, _)| *start <= off && off.saturating_add(n as u64) <= *end)
            .map_or(&[][..], |&(start, _, at)| {
                let from = at + (off - start) as usize;
                &buf[from..from + n]
            })
    };
    let u32_at = |off: u64| u32::from_le_bytes(at(off, 4).try_into().unwrap_or_default());
    let u64_at = |off: u64| u64::from_le_bytes(at(off, 8).try_into().unwrap_or_default());
    let comm = at(l.comm, 16);
    let len = comm.iter().position(|&b| b == 0).unwrap_or(comm.len());
    Ok(Task {
        addr,
        pid: u32_at(l.pid) as i32,
        tgid: u32_at(l.tgid) as i32,
        comm: String::from_utf8_lossy(&comm[..len]).into_owned(),
        state: u32_at(l.state),
        exit_state: u32_at(l.exit_state),
        flags: u32_at(l.flags),
        cpu: u32_at(l.cpu),
        on_cpu: u32_at(l.on_cpu) != 0,
        current_on,
        stack: u64_at(l.stack),
        saved_sp: u64_at(l.thread_sp),
        mm: u64_at(l.mm),
    })
}

/// Every task: leaders in list order, each followed by its other threads, then the idle
/// tasks of CPUs other than 0 and any current task no list reaches (one exiting).
pub fn enumerate(
    m: &dyn KernelMemory,
    l: &TaskLayout,
    roots: &TaskRoots,
) -> Result<Vec<Task>, TaskError> {
    enumerate_with(m, l, roots, &percpu_offsets(m, roots)?)
}

/// [`enumerate`] with `__per_cpu_offset[]` already read (the unwinder needs it too).
pub fn enumerate_with(
    m: &dyn KernelMemory,
    l: &TaskLayout,
    roots: &TaskRoots,
    offsets: &[u64],
) -> Result<Vec<Task>, TaskError> {
    let roster = Roster::read(m, l, roots, offsets)?;
    let init = roster.init_task(m, l)?;
    let groups = roster.groups(m, l, &roster.leaders)?;
    let rest = roster.cpu_tasks(m, l)?;
    merge([vec![init], groups, rest])
}

/// Where a task walk starts: what each CPU runs, its idle task, and the thread-group
/// leaders of the process list. Each leader's group is read on its own
/// ([`Roster::groups`]), so a walk can be split between threads.
#[derive(Debug, Clone)]
pub struct Roster {
    init_task: u64,
    /// `rq->curr` of each CPU, with the CPU.
    current: Vec<(u64, u32)>,
    /// `rq->idle` of each CPU.
    idle: Vec<u64>,
    /// The process list, in order.
    pub leaders: Vec<u64>,
}

impl Roster {
    /// Reads the run queues and walks the process list (bounded, loop-checked).
    pub fn read(
        m: &dyn KernelMemory,
        l: &TaskLayout,
        roots: &TaskRoots,
        offsets: &[u64],
    ) -> Result<Self, TaskError> {
        let mut current = Vec::with_capacity(offsets.len());
        let mut idle = Vec::with_capacity(offsets.len());
        for (cpu, off) in offsets.iter().enumerate() {
            if *off == 0 && cpu > 0 {
                continue; // a possible CPU that never came up
            }
            let rq = off.wrapping_add(roots.runqueues);
            let curr = match roots.current_task {
                Some(ct) => read_u64(m, off.wrapping_add(ct), "current_task")?,
                None => read_u64(m, rq.wrapping_add(l.rq_curr), "rq->curr")?,
            };
            let idl = read_u64(m, rq.wrapping_add(l.rq_idle), "rq->idle")?;
            if curr != 0 {
                current.push((curr, cpu as u32));
            }
            if idl != 0 {
                idle.push(idl);
            }
        }
        let leaders = walk_list(m, roots.init_task.wrapping_add(l.tasks), l.tasks, "process")?;
        Ok(Roster {
            init_task: roots.init_task,
            current,
            idle,
            leaders,
        })
    }

    fn current_on(&self, task: u64) -> Option<u32> {
        self.current
            .iter()
            .find(|(c, _)| *c == task)
            .map(|(_, cpu)| *cpu)
    }

    /// `init_task` (the idle task of CPU 0, which heads the process list).
    pub fn init_task(&self, m: &dyn KernelMemory, l: &TaskLayout) -> Result<Task, TaskError> {
        read_task(m, l, self.init_task, self.current_on(self.init_task))
    }

    /// Each of `leaders`, followed by its other threads.
    pub fn groups(
        &self,
        m: &dyn KernelMemory,
        l: &TaskLayout,
        leaders: &[u64],
    ) -> Result<Vec<Task>, TaskError> {
        let mut out = Vec::with_capacity(leaders.len());
        for &leader in leaders {
            let t = read_task(m, l, leader, self.current_on(leader))?;
            let signal = read_u64(m, leader.wrapping_add(l.signal), "task->signal")?;
            out.push(t);
            if signal == 0 {
                continue;
            }
            let threads = walk_list(
                m,
                signal.wrapping_add(l.signal_thread_head),
                l.thread_node,
                "thread",
            )?;
            if out.len().saturating_add(threads.len()) > MAX_TASKS {
                return Err(TaskError::TornList("thread", "too many tasks".into()));
            }
            for th in threads {
                if th != leader {
                    out.push(read_task(m, l, th, self.current_on(th))?);
                }
            }
        }
        Ok(out)
    }

    /// The idle tasks, then the current tasks (an exiting one is on no list);
    /// [`merge`] drops the ones the lists already gave.
    pub fn cpu_tasks(&self, m: &dyn KernelMemory, l: &TaskLayout) -> Result<Vec<Task>, TaskError> {
        self.idle
            .iter()
            .copied()
            .chain(self.current.iter().map(|(t, _)| *t))
            .map(|t| read_task(m, l, t, self.current_on(t)))
            .collect()
    }
}

/// Something a task walk yields per task (a [`Task`], or a task with its trace).
pub trait HasTask {
    fn task(&self) -> &Task;
}

impl HasTask for Task {
    fn task(&self) -> &Task {
        self
    }
}

/// The parts of a walk in order, each task once (the first time it appears), at most
/// [`MAX_TASKS`].
pub fn merge<T: HasTask>(parts: impl IntoIterator<Item = Vec<T>>) -> Result<Vec<T>, TaskError> {
    let parts: Vec<Vec<T>> = parts.into_iter().collect();
    let n = parts.iter().map(Vec::len).sum::<usize>().min(MAX_TASKS);
    let mut seen = HashSet::with_capacity(n);
    let mut out = Vec::with_capacity(n);
    for part in parts {
        for t in part {
            if seen.insert(t.task().addr) {
                if out.len() >= MAX_TASKS {
                    return Err(TaskError::TornList("process", "too many tasks".into()));
                }
                out.push(t);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virt::SparseMemory;

    const L: TaskLayout = TaskLayout {
        cpu: 0x14,
        state: 0x18,
        stack: 0x20,
        flags: 0x2c,
        on_cpu: 0x34,
        tasks: 0x40,
        exit_state: 0x50,
        pid: 0x60,
        tgid: 0x64,
        comm: 0x70,
        signal: 0x80,
        thread_node: 0x90,
        thread_sp: 0xa0,
        mm: 0xa8,
        signal_thread_head: 0x10,
        rq_curr: 0x8,
        rq_idle: 0x10,
    };
    const INIT: u64 = 0xffff_ffff_8200_0000;
    const NR: u64 = 0xffff_ffff_8210_0000;
    const PCO: u64 = 0xffff_ffff_8210_1000;
    const RQ: u64 = 0x2000;
    const TASKS: u64 = 0xffff_8880_0100_0000;

    fn roots() -> TaskRoots {
        TaskRoots {
            init_task: INIT,
            nr_cpu_ids: NR,
            per_cpu_offset: PCO,
            runqueues: RQ,
            current_task: None,
        }
    }

    fn task_at(i: u64) -> u64 {
        TASKS + i * 0x1000
    }

    fn write_task(m: &mut SparseMemory, t: u64, pid: u32, tgid: u32, comm: &str, sig: u64) {
        m.write_u32(t + L.pid, pid);
        m.write_u32(t + L.tgid, tgid);
        m.write(t + L.comm, comm.as_bytes());
        m.write_u64(t + L.signal, sig);
        m.write_u64(t + L.stack, 0xffff_c900_0000_0000 + u64::from(pid) * 0x8000);
        m.write_u64(
            t + L.thread_sp,
            0xffff_c900_0000_3f00 + u64::from(pid) * 0x8000,
        );
    }

    /// Links `objs` (object addresses) into a circular list through `member`, headed at `head`.
    fn link(m: &mut SparseMemory, head: u64, objs: &[u64], member: u64) {
        let nodes: Vec<u64> = std::iter::once(head)
            .chain(objs.iter().map(|o| o + member))
            .collect();
        for (i, n) in nodes.iter().enumerate() {
            m.write_u64(*n, nodes[(i + 1) % nodes.len()]);
            m.write_u64(*n + 8, nodes[(i + nodes.len() - 1) % nodes.len()]);
        }
    }

    /// init_task, two processes (the second with two threads), 2 CPUs with an idle task
    /// on CPU 1 and an exiting task current on CPU 0.
    fn guest() -> SparseMemory {
        let mut m = SparseMemory::new();
        m.write_u32(NR, 2);
        let pcpu = [0xffff_8880_1000_0000u64, 0xffff_8880_1100_0000];
        m.write_u64(PCO, pcpu[0]);
        m.write_u64(PCO + 8, pcpu[1]);
        write_task(&mut m, INIT, 0, 0, "swapper/0", 0);
        m.write_u32(INIT + L.flags, PF_IDLE);
        let (p1, p2, p2b, idle1, exiting) =
            (task_at(1), task_at(2), task_at(3), task_at(4), task_at(5));
        let (s1, s2) = (task_at(10), task_at(11));
        write_task(&mut m, p1, 1, 1, "init", s1);
        write_task(&mut m, p2, 7, 7, "worker", s2);
        write_task(&mut m, p2b, 8, 7, "worker-thread", s2);
        write_task(&mut m, idle1, 0, 0, "swapper/1", 0);
        m.write_u32(idle1 + L.flags, PF_IDLE);
        write_task(&mut m, exiting, 9, 9, "dying", 0);
        link(&mut m, INIT + L.tasks, &[p1, p2], L.tasks);
        link(&mut m, s1 + L.signal_thread_head, &[p1], L.thread_node);
        link(&mut m, s2 + L.signal_thread_head, &[p2, p2b], L.thread_node);
        m.write_u64(pcpu[0] + RQ + L.rq_curr, exiting);
        m.write_u64(pcpu[0] + RQ + L.rq_idle, INIT);
        m.write_u64(pcpu[1] + RQ + L.rq_curr, p2b);
        m.write_u64(pcpu[1] + RQ + L.rq_idle, idle1);
        m
    }

    #[test]
    fn finds_leaders_threads_idle_and_orphaned_currents() {
        let m = guest();
        let tasks = enumerate(&m, &L, &roots()).unwrap();
        let got: Vec<(i32, i32, &str, Option<u32>)> = tasks
            .iter()
            .map(|t| (t.pid, t.tgid, t.comm.as_str(), t.current_on))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 0, "swapper/0", None),
                (1, 1, "init", None),
                (7, 7, "worker", None),
                (8, 7, "worker-thread", Some(1)),
                (0, 0, "swapper/1", None),
                (9, 9, "dying", Some(0)),
            ]
        );
        assert!(tasks[0].is_idle() && tasks[4].is_idle() && !tasks[1].is_idle());
        assert_eq!(
            tasks[1].stack_range().1 - tasks[1].stack_range().0,
            THREAD_SIZE
        );
    }

    #[test]
    fn the_task_on_a_cpu_is_its_current_task_not_the_run_queues_next() {
        // CPU 1 is inside __schedule(): rq->curr already names the next task (worker,
        // pid 7) while the CPU still runs worker-thread (pid 8) on its stack.
        let mut m = guest();
        const CURRENT: u64 = 0x3000;
        let pcpu = [0xffff_8880_1000_0000u64, 0xffff_8880_1100_0000];
        m.write_u64(pcpu[0] + CURRENT, task_at(5));
        m.write_u64(pcpu[1] + CURRENT, task_at(3));
        m.write_u64(pcpu[1] + RQ + L.rq_curr, task_at(2));
        let with = TaskRoots {
            current_task: Some(CURRENT),
            ..roots()
        };
        let on = |roots: &TaskRoots| -> Vec<(i32, Option<u32>)> {
            enumerate(&m, &L, roots)
                .unwrap()
                .iter()
                .filter(|t| t.current_on.is_some())
                .map(|t| (t.pid, t.current_on))
                .collect()
        };
        assert_eq!(on(&with), vec![(8, Some(1)), (9, Some(0))]);
        // Without the symbol, the run queue's view.
        assert_eq!(on(&roots()), vec![(7, Some(1)), (9, Some(0))]);
    }

    #[test]
    fn groups_read_in_any_split_merge_into_the_same_walk() {
        let m = guest();
        let r = roots();
        let whole = enumerate(&m, &L, &r).unwrap();
        let offsets = percpu_offsets(&m, &r).unwrap();
        let roster = Roster::read(&m, &L, &r, &offsets).unwrap();
        assert_eq!(roster.leaders.len(), 2);
        // Each leader read on its own, as two threads would; a part that repeats a
        // task (a hostile list) does not repeat it in the walk.
        let parts = vec![
            vec![roster.init_task(&m, &L).unwrap()],
            roster.groups(&m, &L, &roster.leaders[..1]).unwrap(),
            roster.groups(&m, &L, &roster.leaders[1..]).unwrap(),
            roster.groups(&m, &L, &roster.leaders[1..]).unwrap(),
            roster.cpu_tasks(&m, &L).unwrap(),
        ];
        assert_eq!(merge(parts).unwrap(), whole);
    }

    #[test]
    fn a_cycle_that_skips_the_head_is_an_error_not_a_hang() {
        let mut m = guest();
        // p2.tasks.next -> p1.tasks: p1 -> p2 -> p1 -> … never returns to init_task.
        m.write_u64(task_at(2) + L.tasks, task_at(1) + L.tasks);
        let e = enumerate(&m, &L, &roots()).unwrap_err();
        assert!(matches!(e, TaskError::TornList("process", _)), "{e}");
    }

    #[test]
    fn a_dangling_link_is_an_error() {
        let mut m = guest();
        m.write_u64(task_at(2) + L.tasks, 0xdead_0000_0000);
        assert!(matches!(
            enumerate(&m, &L, &roots()),
            Err(TaskError::TornList("process", _))
        ));
    }

    #[test]
    fn absurd_cpu_counts_are_refused() {
        for n in [0u32, MAX_CPUS + 1, u32::MAX] {
            let mut m = guest();
            m.write_u32(NR, n);
            assert!(matches!(
                enumerate(&m, &L, &roots()),
                Err(TaskError::Range(_))
            ));
        }
    }

    #[test]
    fn state_letters_follow_ps() {
        let mut t = enumerate(&guest(), &L, &roots()).unwrap().remove(1);
        for (state, exit, letter) in [
            (0, 0, 'R'),
            (1, 0, 'S'),
            (0x2001, 0, 'S'),
            (2, 0, 'D'),
            (0x402, 0, 'I'),
            (4, 0, 'T'),
            (0, 0x20, 'Z'),
        ] {
            t.state = state;
            t.exit_state = exit;
            assert_eq!(t.state_letter(), letter, "{state:#x}/{exit:#x}");
        }
    }
}
