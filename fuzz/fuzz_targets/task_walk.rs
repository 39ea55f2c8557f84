//! The task lists are hostile: `init_task.tasks`, every `signal->thread_head` and the
//! per-CPU runqueues are pointers the guest controls (and a vCPU may have been stopped in
//! the middle of a list update). The walk must end with tasks or an error, never hang.
//!
//! Input: the first 64 bytes pick the roots and a few layout offsets; the rest is 64 KiB
//! of kernel virtual memory at a fixed base, so list links can point anywhere in it.
#![no_main]
use introspect::tasks::{self, TaskLayout, TaskRoots};
use introspect::virt::SparseMemory;

const BASE: u64 = 0xffff_8880_0000_0000;
const MEM: usize = 64 << 10;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() < 64 {
        return;
    }
    let w = |i: usize| u64::from(u16::from_le_bytes([data[2 * i], data[2 * i + 1]]));
    let layout = TaskLayout {
        cpu: w(0) & 0xff,
        state: w(1) & 0xff,
        stack: w(2) & 0xff,
        flags: w(3) & 0xff,
        on_cpu: w(4) & 0xff,
        tasks: w(5) & 0xff,
        exit_state: w(6) & 0xff,
        pid: w(7) & 0xff,
        tgid: w(8) & 0xff,
        comm: w(9) & 0xff,
        signal: w(10) & 0xff,
        thread_node: w(11) & 0xff,
        thread_sp: w(12) & 0xff,
        mm: w(13) & 0xff,
        signal_thread_head: w(14) & 0xff,
        rq_curr: w(15) & 0xff,
        rq_idle: w(16) & 0xff,
    };
    let roots = TaskRoots {
        init_task: BASE + w(17),
        nr_cpu_ids: BASE + w(18),
        per_cpu_offset: BASE + w(19),
        runqueues: w(20),
    };
    let mut mem = SparseMemory::new();
    let mut ram = data[64..].to_vec();
    ram.resize(MEM, 0);
    mem.write(BASE, &ram);
    if let Ok(list) = tasks::enumerate(&mem, &layout, &roots) {
        assert!(list.len() <= tasks::MAX_TASKS);
        for t in &list {
            let _ = t.state_letter();
        }
    }
});
