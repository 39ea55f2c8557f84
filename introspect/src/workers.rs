//! Running one job on several threads at once: how the task walk uses the host CPUs a
//! paused VM leaves free. A live VM lends its parked vCPU threads (`vmm`); elsewhere
//! (snapshots, dumps, tests) scoped threads are started for the job.

/// Runs a job on several threads at once.
pub trait Workers {
    /// Runs `job` on up to `threads` threads at once, the caller's among them or not,
    /// and returns when every run has returned. A run may be missing (a thread that is
    /// gone) or end in a panic; the caller checks that the work is complete.
    fn run(&self, threads: usize, job: &(dyn Fn() + Sync));
}

/// Scoped threads: `threads - 1` started for the job (at most one per host CPU in all),
/// and the calling thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScopedThreads;

impl Workers for ScopedThreads {
    fn run(&self, threads: usize, job: &(dyn Fn() + Sync)) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let others = threads.clamp(1, cpus) - 1;
        std::thread::scope(|s| {
            for _ in 0..others {
                s.spawn(job);
            }
            job();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn scoped_threads_run_the_job_on_as_many_threads_as_the_host_has_cpus() {
        let runs = AtomicUsize::new(0);
        ScopedThreads.run(64, &|| {
            runs.fetch_add(1, Ordering::Relaxed);
        });
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(runs.load(Ordering::Relaxed), cpus.min(64));
        runs.store(0, Ordering::Relaxed);
        ScopedThreads.run(0, &|| {
            runs.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(runs.load(Ordering::Relaxed), 1);
    }
}
