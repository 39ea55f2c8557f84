//! The host CPUs of a VM's parked vCPU threads, kept apart.
//!
//! While the vCPUs are parked for a live-patch transition, their threads poll for the
//! resume (and do the task walk, `pause::help_parked`). The host scheduler sometimes
//! leaves two of them polling on one host CPU, and does not move a thread that ran a
//! moment ago to an idle CPU (it counts as cache-hot). Then, at the resume, the first of
//! the two enters `KVM_RUN` and runs guest code while the other waits in that CPU's run
//! queue for the next scheduler tick: milliseconds the guest sees as part of the pause.
//! So a polling vCPU thread that finds a lower-numbered parked vCPU thread of its VM on
//! its own CPU moves itself to a CPU no parked vCPU thread is on, among the CPUs it may
//! run on (operator cpusets are respected), and lets the scheduler have it from there:
//! its CPU mask is set to that one CPU and straight back to what it was.

use std::sync::atomic::{AtomicI32, Ordering};

/// Bits of the CPU masks read and written here (1,024 CPUs, glibc's `cpu_set_t`).
const MASK_WORDS: usize = 16;
/// A vCPU thread that is not parked and polling.
const NOT_PARKED: i32 = -1;

/// The host CPU each parked, polling vCPU thread of one VM is on.
#[derive(Debug)]
pub struct ParkedCpus {
    cpus: Vec<AtomicI32>,
}

impl ParkedCpus {
    pub fn new(vcpus: usize) -> Self {
        ParkedCpus {
            cpus: (0..vcpus).map(|_| AtomicI32::new(NOT_PARKED)).collect(),
        }
    }

    /// Called by vCPU `id`'s thread while it polls: records the CPU it is on and, if a
    /// lower-numbered parked vCPU thread is on the same CPU, moves to a free one (see the
    /// module comment). Returns the CPU it moved to.
    pub fn spread(&self, id: usize) -> Option<usize> {
        let target = self.place(id, current_cpu()?, allowed_cpus)?;
        move_to(target.0, &target.1)?;
        self.cpus.get(id)?.store(target.0 as i32, Ordering::Relaxed);
        Some(target.0)
    }

    /// Records that vCPU `id`'s thread is on CPU `here`; where it must go (with the mask
    /// it may run on, from `allowed`, read only then), if anywhere.
    fn place(
        &self,
        id: usize,
        here: usize,
        allowed: impl FnOnce() -> Option<[u64; MASK_WORDS]>,
    ) -> Option<(usize, [u64; MASK_WORDS])> {
        self.cpus.get(id)?.store(here as i32, Ordering::Relaxed);
        let shared = self.cpus[..id]
            .iter()
            .any(|c| c.load(Ordering::Relaxed) == here as i32);
        if !shared {
            return None;
        }
        let taken: Vec<usize> = self
            .cpus
            .iter()
            .enumerate()
            .filter(|&(other, _)| other != id)
            .filter_map(|(_, c)| usize::try_from(c.load(Ordering::Relaxed)).ok())
            .collect();
        let allowed = allowed()?;
        Some((free_cpu(&allowed, here, &taken)?, allowed))
    }

    /// vCPU `id`'s thread stops polling (it sleeps, or runs the guest again).
    pub fn leave(&self, id: usize) {
        if let Some(slot) = self.cpus.get(id) {
            slot.store(NOT_PARKED, Ordering::Relaxed);
        }
    }
}

/// A CPU of `allowed` that is neither `here` nor `taken`, the lowest.
fn free_cpu(allowed: &[u64; MASK_WORDS], here: usize, taken: &[usize]) -> Option<usize> {
    (0..MASK_WORDS * 64)
        .filter(|&c| allowed[c / 64] & (1u64 << (c % 64)) != 0)
        .find(|&c| c != here && !taken.contains(&c))
}

/// The CPU this thread is running on.
fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments and touches no memory of ours.
    let cpu = unsafe { libc::sched_getcpu() };
    usize::try_from(cpu).ok()
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> Option<[u64; MASK_WORDS]> {
    let mut mask = [0u64; MASK_WORDS];
    // SAFETY: the kernel writes at most `size_of_val(&mask)` bytes into `mask`, which
    // lives on this stack frame for the call; the layout is a plain bit array, as
    // glibc's `cpu_set_t` is.
    let rc = unsafe {
        libc::sched_getaffinity(
            0,
            std::mem::size_of_val(&mask),
            mask.as_mut_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    (rc == 0).then_some(mask)
}

/// Sets this thread's CPU mask.
fn set_affinity(mask: &[u64; MASK_WORDS]) -> bool {
    // SAFETY: the kernel reads `size_of_val(mask)` bytes from `mask`, a live borrow.
    let rc = unsafe {
        libc::sched_setaffinity(
            0,
            std::mem::size_of_val(mask),
            mask.as_ptr().cast::<libc::cpu_set_t>(),
        )
    };
    rc == 0
}

/// Moves this thread to `cpu` (the kernel migrates it when its mask leaves its CPU out),
/// then gives it back the mask `allowed`.
fn move_to(cpu: usize, allowed: &[u64; MASK_WORDS]) -> Option<()> {
    let mut one = [0u64; MASK_WORDS];
    *one.get_mut(cpu / 64)? = 1u64 << (cpu % 64);
    let moved = set_affinity(&one);
    // Whatever happened, the thread keeps the CPUs it was given.
    let restored = set_affinity(allowed);
    (moved && restored).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_cpu_is_allowed_and_neither_here_nor_taken() {
        let mut allowed = [0u64; MASK_WORDS];
        allowed[0] = 0b1111;
        assert_eq!(free_cpu(&allowed, 0, &[1]), Some(2));
        assert_eq!(free_cpu(&allowed, 2, &[0, 1, 3]), None);
        allowed[1] = 1; // CPU 64
        assert_eq!(free_cpu(&allowed, 2, &[0, 1, 3]), Some(64));
    }

    #[test]
    fn the_higher_numbered_of_two_threads_on_one_cpu_moves() {
        let mut four = [0u64; MASK_WORDS];
        four[0] = 0b1111;
        let parked = ParkedCpus::new(3);
        // Alone on CPU 2: stays.
        assert_eq!(parked.place(1, 2, || Some(four)), None);
        // vCPU 0 comes to CPU 2 too: it was first in number, so it stays...
        assert_eq!(parked.place(0, 2, || Some(four)), None);
        // ...and vCPU 1 moves, to the lowest CPU no other parked vCPU is on.
        parked.place(2, 0, || Some(four));
        assert_eq!(parked.place(1, 2, || Some(four)).map(|t| t.0), Some(1));
        // With nowhere free to go (or the mask unreadable), it stays.
        let mut two = [0u64; MASK_WORDS];
        two[0] = 0b101;
        assert_eq!(parked.place(1, 2, || Some(two)), None);
        assert_eq!(parked.place(1, 2, || None), None);
        // A vCPU that left does not count.
        parked.leave(0);
        assert_eq!(parked.place(1, 2, || Some(four)), None);
    }

    #[test]
    fn moving_keeps_the_threads_cpu_mask() {
        let allowed = allowed_cpus().expect("sched_getaffinity");
        let here = current_cpu().expect("sched_getcpu");
        if let Some(other) = free_cpu(&allowed, here, &[]) {
            assert_eq!(move_to(other, &allowed), Some(()));
        }
        assert_eq!(allowed_cpus(), Some(allowed));
    }
}
