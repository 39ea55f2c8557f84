//! Pausing a VM: every vCPU stopped outside `KVM_RUN` (the kick in `vcpu.rs`), pause
//! holds that nest (an API pause and a snapshot or a live patch inside it), the register
//! state of a paused VM for the rest of the VMM ([`PausedVm`]), and how long pauses take.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::GuestMemoryMmap;

use crate::persist::vcpu_state::{KernelView, VcpuState};
use crate::vstate::vcpu::{HelpJob, VcpuError, VcpuEvent, VcpuHandle, VcpuResponse};

/// How long one vCPU may take to answer a pause, resume or state request.
pub const VCPU_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors pausing, resuming or reading a paused VM.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("vCPU {vcpu}: cannot read its state: {detail}")]
    State { vcpu: u8, detail: String },
    #[error("the VM is not paused")]
    NotPaused,
    #[error("no vCPU with id {0}")]
    NoSuchVcpu(u8),
}

/// Waits for `handle`'s reply that `accept` takes, dropping stale replies (a vCPU that
/// answered late to an earlier request) until `timeout` runs out.
fn wait_for<T>(
    handle: &VcpuHandle,
    timeout: Duration,
    mut accept: impl FnMut(VcpuResponse) -> Option<T>,
) -> Result<T, PauseError> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = handle.wait(left).map_err(|e| match e {
            VcpuError::Timeout(id, _) => VcpuError::Timeout(id, timeout),
            other => other,
        })?;
        match accept(reply) {
            Some(v) => return Ok(v),
            None => tracing::debug!("vCPU {}: dropped a stale reply", handle.id),
        }
    }
}

/// Kicks every vCPU out of `KVM_RUN` and waits until all of them are parked. The kicks
/// all go out first, so the vCPUs stop in parallel. A vCPU finishes the exit it is
/// handling (a port or MMIO access completes on its bus) and `KVM_RUN` has completed
/// any I/O it owed the guest before the thread parks; each calls `KVM_KVMCLOCK_CTRL`.
/// If one does not stop, the others are started again and the error is returned.
pub fn pause_all(vcpus: &[VcpuHandle]) -> Result<(), PauseError> {
    let result = (|| {
        for v in vcpus {
            v.send(VcpuEvent::Pause)?;
        }
        for v in vcpus {
            wait_for(v, VCPU_TIMEOUT, |r| {
                (r == VcpuResponse::Paused).then_some(())
            })?;
        }
        Ok(())
    })();
    if result.is_err() {
        if let Err(e) = resume_all(vcpus) {
            tracing::warn!("after a failed pause: {e}");
        }
    }
    result
}

/// Lets every parked vCPU enter the guest again. Returns when the last vCPU thread took
/// the request on its way back into `KVM_RUN`: the end of the pause as the guest sees it
/// (this thread learns of it a wake-up later).
pub fn resume_all(vcpus: &[VcpuHandle]) -> Result<Option<Instant>, PauseError> {
    for v in vcpus {
        v.send(VcpuEvent::Resume)?;
    }
    let mut last: Option<Instant> = None;
    for v in vcpus {
        let at = wait_for(v, VCPU_TIMEOUT, |r| match r {
            VcpuResponse::Resumed(at) => Some(at),
            _ => None,
        })?;
        last = Some(last.map_or(at, |l| l.max(at)));
    }
    Ok(last)
}

/// Runs `job` on each of the parked vCPU threads `vcpus`, at once, and returns when
/// every one of them has run it or is gone. The calling thread only waits: the host CPUs
/// the paused vCPUs leave free do the work, with threads that are already awake (they
/// poll while parked) and nothing to start.
pub fn help_parked(vcpus: &[VcpuHandle], job: &(dyn Fn() + Sync)) {
    let (done, reports) = std::sync::mpsc::channel();
    for v in vcpus {
        // SAFETY: `job` stays borrowed until this function returns, and it returns only
        // once `reports` is disconnected below: every HelpJob has then reported (a vCPU
        // thread runs it, then reports) or been dropped unrun (a thread that is gone, a
        // failed post). Nothing between here and that wait can unwind.
        let help = unsafe { HelpJob::new(job, done.clone()) };
        let _ = v.post(VcpuEvent::Help(help));
    }
    drop(done);
    // Each report, until no sender is left.
    while reports.recv().is_ok() {}
}

/// The parked vCPU threads of a paused VM, lent to the guest task walk.
pub struct ParkedVcpus<'a>(pub &'a [VcpuHandle]);

impl introspect::workers::Workers for ParkedVcpus<'_> {
    fn run(&self, threads: usize, job: &(dyn Fn() + Sync)) {
        help_parked(&self.0[..threads.min(self.0.len())], job);
    }
}

/// Reads one parked vCPU's whole state (registers, special registers, `msrs`, LAPIC,
/// XSAVE, events, MP state) on its own thread, after completing any I/O `KVM_RUN` owed.
pub fn save_one(handle: &VcpuHandle, msrs: &Arc<Vec<u32>>) -> Result<VcpuState, PauseError> {
    handle.send(VcpuEvent::SaveState(msrs.clone()))?;
    let state = wait_for(handle, VCPU_TIMEOUT, |r| match r {
        VcpuResponse::State(s) => Some(*s),
        _ => None,
    })?;
    state.map_err(|detail| PauseError::State {
        vcpu: handle.id,
        detail,
    })
}

/// Reads every parked vCPU's [`KernelView`]; the requests all go out first, so the
/// vCPU threads answer in parallel.
pub fn read_kernel_views(vcpus: &[VcpuHandle]) -> Result<Vec<KernelView>, PauseError> {
    for v in vcpus {
        v.send(VcpuEvent::ReadKernelView)?;
    }
    vcpus
        .iter()
        .map(|v| {
            let view = wait_for(v, VCPU_TIMEOUT, |r| match r {
                VcpuResponse::KernelView(s) => Some(*s),
                _ => None,
            })?;
            view.map_err(|detail| PauseError::State { vcpu: v.id, detail })
        })
        .collect()
}

/// Pause latencies: how many pauses, and the most recent ones for percentiles.
#[derive(Debug, Clone, Default)]
pub struct PauseStats {
    count: u64,
    recent_us: VecDeque<u64>,
}

/// A summary of [`PauseStats`], in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PauseSummary {
    pub count: u64,
    /// Pauses the percentiles are taken over (the most recent ones).
    pub window: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
}

impl PauseStats {
    /// Percentiles are over this many most recent pauses.
    pub const WINDOW: usize = 10_000;

    pub fn record(&mut self, latency: Duration) {
        self.count += 1;
        if self.recent_us.len() == Self::WINDOW {
            self.recent_us.pop_front();
        }
        self.recent_us
            .push_back(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn summary(&self) -> PauseSummary {
        let mut v: Vec<u64> = self.recent_us.iter().copied().collect();
        v.sort_unstable();
        // Nearest rank: the smallest value with at least p% of the samples at or below it.
        let pct = |p: usize| match v.len() {
            0 => 0,
            n => v[(n * p).div_ceil(100).max(1) - 1],
        };
        PauseSummary {
            count: self.count,
            window: v.len(),
            p50_us: pct(50),
            p99_us: pct(99),
            max_us: v.last().copied().unwrap_or(0),
        }
    }
}

/// Whether the vCPUs are paused, by how many holders, and the pause latencies.
///
/// Pauses nest: the first hold stops the vCPUs, the last release starts them again, so a
/// snapshot or a live patch taken while a client holds the VM paused leaves it paused.
#[derive(Debug, Default)]
pub struct PauseControl {
    holds: u32,
    stats: PauseStats,
}

impl PauseControl {
    pub fn is_paused(&self) -> bool {
        self.holds > 0
    }

    /// Adds a hold, stopping the vCPUs if it is the first. Returns the time from the call
    /// to every vCPU parked when this call stopped them, `None` when they already were.
    pub fn hold(&mut self, vcpus: &[VcpuHandle]) -> Result<Option<Duration>, PauseError> {
        if self.holds > 0 {
            self.holds += 1;
            return Ok(None);
        }
        let started = Instant::now();
        pause_all(vcpus)?;
        let latency = started.elapsed();
        self.holds = 1;
        self.stats.record(latency);
        Ok(Some(latency))
    }

    /// Drops a hold, starting the vCPUs again if it was the last. Returns whether they run.
    pub fn release(&mut self, vcpus: &[VcpuHandle]) -> Result<bool, PauseError> {
        match self.holds {
            0 => Err(PauseError::NotPaused),
            1 => {
                resume_all(vcpus)?;
                self.holds = 0;
                Ok(true)
            }
            _ => {
                self.holds -= 1;
                Ok(false)
            }
        }
    }

    pub fn stats(&self) -> &PauseStats {
        &self.stats
    }
}

/// A VM whose vCPUs are all parked outside `KVM_RUN`: what the live patcher and the
/// introspection code read. Obtained from `RunningVm::paused_vm` or `RunningVm::with_paused`,
/// on the VMM thread, which is also the only thread that answers API requests; so no
/// client resumes the VM while it is in use. (Code that drops the last pause hold itself
/// meanwhile gets `PauseError::State` from the reads: running vCPUs do not save state.)
pub struct PausedVm<'a> {
    vcpus: &'a [VcpuHandle],
    msr_indices: &'a Arc<Vec<u32>>,
    memory: &'a GuestMemoryMmap,
}

impl<'a> PausedVm<'a> {
    pub(crate) fn new(
        vcpus: &'a [VcpuHandle],
        msr_indices: &'a Arc<Vec<u32>>,
        memory: &'a GuestMemoryMmap,
    ) -> Self {
        PausedVm {
            vcpus,
            msr_indices,
            memory,
        }
    }

    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// One vCPU's full state: `regs`, `sregs` (CR0/CR2/CR3/CR4/CR8, EFER, APIC base,
    /// segments, GDT/IDT), every MSR KVM saves (KERNEL_GS_BASE, LSTAR, STAR, SYSENTER_*,
    /// TSC, …), LAPIC, XSAVE, debug registers, events and MP state.
    pub fn vcpu_state(&self, id: u8) -> Result<VcpuState, PauseError> {
        let handle = self
            .vcpus
            .iter()
            .find(|v| v.id == id)
            .ok_or(PauseError::NoSuchVcpu(id))?;
        save_one(handle, self.msr_indices)
    }

    /// Every vCPU's state, in vCPU id order.
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, PauseError> {
        self.vcpus
            .iter()
            .map(|v| save_one(v, self.msr_indices))
            .collect()
    }

    /// Every vCPU's registers for introspection, in vCPU id order (read in parallel).
    pub fn kernel_views(&self) -> Result<Vec<KernelView>, PauseError> {
        read_kernel_views(self.vcpus)
    }

    /// Guest RAM (nothing in the guest writes it while paused).
    pub fn memory(&self) -> &GuestMemoryMmap {
        self.memory
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::ram_regions;
    use crate::arch::x86_64::emulate::FallbackStats;
    use crate::arch::x86_64::regs;
    use crate::devices::bus::Bus;
    use crate::vstate::exit::ExitSignal;
    use crate::vstate::vcpu::{install_kick_handler, Vcpu};
    use crate::vstate::vm::{allocate_memory, open_kvm, Vm};
    use std::sync::Barrier;
    use vm_memory::{Bytes, GuestAddress};

    /// Two vCPUs on real KVM: the boot vCPU counts in RAX forever (`inc rax; jmp $-3`), the
    /// other waits for INIT/SIPI inside `KVM_RUN`. Both must stop, read the same while
    /// paused, and the counter must move again after resume.
    #[test]
    fn pauses_a_running_and_a_waiting_vcpu_and_reads_their_state() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let memory = allocate_memory(&ram_regions(2 << 20)).unwrap();
        let vm = Vm::new(&kvm, memory).unwrap();
        let mem = vm.memory().clone();
        const CODE: u64 = 0x1_0000;
        mem.write_slice(&[0x48, 0xff, 0xc0, 0xeb, 0xfb], GuestAddress(CODE))
            .unwrap();
        install_kick_handler().unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let barrier = Arc::new(Barrier::new(3));
        let mut handles = Vec::new();
        for id in 0..2u8 {
            let fd = vm.fd().create_vcpu(u64::from(id)).unwrap();
            if id == 0 {
                let mut sregs = fd.get_sregs().unwrap();
                regs::setup_long_mode(&mem, &mut sregs).unwrap();
                fd.set_sregs(&sregs).unwrap();
                fd.set_regs(&regs::boot_regs(GuestAddress(CODE))).unwrap();
            }
            let vcpu = Vcpu::new(
                id,
                fd,
                Arc::new(Bus::new()),
                Arc::new(Bus::new()),
                mem.clone(),
                exit.clone(),
                Arc::new(FallbackStats::default()),
            );
            handles.push(vcpu.start(barrier.clone()).unwrap());
        }
        barrier.wait();
        std::thread::sleep(Duration::from_millis(50));

        let msrs = Arc::new(vec![0xc000_0102u32]);
        let mut control = PauseControl::default();
        let read = |vcpus: &[VcpuHandle]| {
            PausedVm::new(vcpus, &msrs, &mem)
                .vcpu_states()
                .unwrap()
                .iter()
                .map(|s| (s.regs.rip, s.regs.rax, s.mp_state.mp_state, s.msrs.clone()))
                .collect::<Vec<_>>()
        };
        assert!(control.hold(&handles).unwrap().is_some());
        let first = read(&handles);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(first, read(&handles), "state changed while paused");
        assert_eq!(first[0].3, vec![(0xc000_0102, 0)], "KERNEL_GS_BASE");
        assert!((CODE..CODE + 5).contains(&first[0].0), "{:#x}", first[0].0);
        assert_eq!(
            first[1].2,
            kvm_bindings::KVM_MP_STATE_UNINITIALIZED,
            "the AP still waits for SIPI"
        );
        // The light read for introspection agrees with the full state.
        let views = PausedVm::new(&handles, &msrs, &mem).kernel_views().unwrap();
        assert_eq!(views.len(), 2);
        for (view, full) in views.iter().zip(&first) {
            assert_eq!((view.regs.rip, view.regs.rax), (full.0, full.1));
            assert_eq!(view.kernel_gs_base, 0);
        }
        // The parked threads run a job for this thread, each once, on their own threads;
        // a job that panics is reported done (the caller finds its work missing) and the
        // thread stays parked and answering.
        let me = std::thread::current().id();
        let ran = std::sync::Mutex::new(Vec::new());
        help_parked(&handles, &|| {
            ran.lock().unwrap().push(std::thread::current().id());
        });
        let ran = ran.into_inner().unwrap();
        assert_eq!(ran.len(), 2);
        assert!(ran[0] != ran[1] && !ran.contains(&me), "{ran:?}");
        help_parked(&handles[..1], &|| panic!("a job that panics"));
        // As the task walk's workers: as many runs as asked for, at most one per vCPU.
        use introspect::workers::Workers;
        let runs = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            runs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        ParkedVcpus(&handles).run(5, &count);
        ParkedVcpus(&handles).run(1, &count);
        assert_eq!(runs.load(std::sync::atomic::Ordering::Relaxed), 3);
        assert_eq!(first, read(&handles), "state changed while helping");
        // A nested hold does not pause again; the last release resumes.
        assert_eq!(control.hold(&handles).unwrap(), None);
        assert!(!control.release(&handles).unwrap());
        assert!(control.release(&handles).unwrap());
        std::thread::sleep(Duration::from_millis(50));
        control.hold(&handles).unwrap();
        let later = read(&handles);
        assert_ne!(first[0].1, later[0].1, "RAX did not count after resume");
        control.release(&handles).unwrap();
        // States cannot be read from running vCPUs.
        assert!(matches!(
            save_one(&handles[0], &msrs),
            Err(PauseError::State { vcpu: 0, .. })
        ));
        assert!(matches!(
            read_kernel_views(&handles),
            Err(PauseError::State { vcpu: 0, .. })
        ));
        for h in &handles {
            h.send(VcpuEvent::Finish).unwrap();
        }
        for h in handles {
            h.join(Duration::from_secs(2));
        }
        assert!(exit.reason().is_none(), "{:?}", exit.reason());
        assert_eq!(control.stats().count(), 2);
    }

    #[test]
    fn percentiles_use_nearest_rank_over_a_bounded_window() {
        let mut s = PauseStats::default();
        assert_eq!(s.summary().p99_us, 0);
        for us in 1..=100 {
            s.record(Duration::from_micros(us));
        }
        let sum = s.summary();
        assert_eq!((sum.count, sum.window), (100, 100));
        assert_eq!((sum.p50_us, sum.p99_us, sum.max_us), (50, 99, 100));
        for _ in 0..PauseStats::WINDOW {
            s.record(Duration::from_micros(7));
        }
        let sum = s.summary();
        assert_eq!(sum.count, 100 + PauseStats::WINDOW as u64);
        assert_eq!(sum.window, PauseStats::WINDOW);
        assert_eq!((sum.p50_us, sum.p99_us, sum.max_us), (7, 7, 7));
    }

    #[test]
    fn releasing_an_unpaused_vm_is_an_error() {
        let mut c = PauseControl::default();
        assert!(!c.is_paused());
        assert!(matches!(c.release(&[]), Err(PauseError::NotPaused)));
        // With no vCPUs, holds still nest.
        assert!(c.hold(&[]).unwrap().is_some());
        assert_eq!(c.hold(&[]).unwrap(), None);
        assert!(!c.release(&[]).unwrap());
        assert!(c.is_paused());
        assert!(c.release(&[]).unwrap());
        assert!(!c.is_paused());
        assert_eq!(c.stats().count(), 1);
    }
}
