//! vCPU threads: the `KVM_RUN` loop, exits to the device buses, the user-space
//! fallback for instructions the in-kernel emulator cannot execute, and a
//! race-free kick (immediate_exit + signal) for pause and stop.

use std::cell::Cell;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_regs, kvm_sregs, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::arch::x86_64::emulate::{self, EmulateError, Fallback, FallbackStats, GuestCpuAccess};
use crate::devices::bus::Bus;
use crate::persist::vcpu_state::{self, KernelView, VcpuState};
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::parked_cpus::ParkedCpus;

/// Signal used to kick a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// `KVM_INTERNAL_ERROR_EMULATION`: the in-kernel emulator could not execute an instruction.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// Longest x86 instruction.
const MAX_INSN_LEN: usize = 15;
/// How often an instruction re-read from guest memory may fail to decode to something the
/// fallback handles before the VM is stopped. The guest may have rewritten the bytes between
/// KVM's fetch and ours (text_poke writes an int3 first, then the new instruction), in which
/// case simply re-entering the guest executes the new instruction.
const MAX_STALE_CODE_RETRIES: u32 = 3;

/// Messages to a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    Pause,
    Resume,
    Finish,
    /// While paused: complete any pending I/O and save the vCPU's state (these MSRs).
    SaveState(Arc<Vec<u32>>),
    /// While paused: read the registers introspection needs (a [`KernelView`]).
    ReadKernelView,
    /// While paused: run a job for the VMM thread (the host CPU is free meanwhile).
    Help(HelpJob),
}

/// A job a parked vCPU thread runs for the VMM thread, which waits for it
/// ([`crate::vstate::pause::help_parked`]).
pub struct HelpJob {
    job: &'static (dyn Fn() + Sync),
    done: Sender<()>,
}

impl std::fmt::Debug for HelpJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HelpJob")
    }
}

impl HelpJob {
    /// # Safety
    ///
    /// `job` must outlive the returned value: the caller must not let `job`'s borrow end
    /// before every `HelpJob` made from it has reported on `done`'s channel or been
    /// dropped (each holds one sender; the channel reports `Disconnected` once all are
    /// gone). `run` reports, and uses `job` only before it does.
    pub unsafe fn new(job: &(dyn Fn() + Sync), done: Sender<()>) -> Self {
        // SAFETY: only the lifetime changes (same fat-pointer layout); the caller keeps
        // the borrow alive for as long as this value can use it (see above).
        let job =
            unsafe { std::mem::transmute::<&(dyn Fn() + Sync), &'static (dyn Fn() + Sync)>(job) };
        HelpJob { job, done }
    }

    /// Runs the job (a panic in it is caught: the caller finds the work incomplete), then
    /// reports.
    fn run(self) {
        let HelpJob { job, done } = self;
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
            tracing::warn!("a job run on a parked vCPU thread panicked");
        }
        let _ = done.send(());
    }
}

/// Replies from a vCPU thread.
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    /// Taken the resume request at this instant, on the way back into `KVM_RUN`.
    Resumed(std::time::Instant),
    Finished,
    State(Box<Result<VcpuState, String>>),
    KernelView(Box<Result<KernelView, String>>),
}

impl PartialEq for VcpuResponse {
    fn eq(&self, other: &Self) -> bool {
        matches!(
            (self, other),
            (VcpuResponse::Paused, VcpuResponse::Paused)
                | (VcpuResponse::Resumed(_), VcpuResponse::Resumed(_))
                | (VcpuResponse::Finished, VcpuResponse::Finished)
        )
    }
}

/// How long a parked vCPU thread keeps polling for its next request before it sleeps.
/// A live-patch transition keeps the vCPUs parked for about a millisecond; a thread that
/// sleeps through it is woken on a CPU that may have gone idle, which on a virtualized
/// host can take milliseconds, and the guest waits for it. Polling (yielding the CPU to
/// any other runnable thread) keeps that wake-up off the guest's pause.
pub const PARKED_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// How long the parked vCPU threads of a VM with `cpus` vCPUs poll: [`PARKED_POLL`] while
/// the host has a CPU for each of them, none when they outnumber the host's CPUs (their
/// polling would then take CPU time from the work the pause is for).
pub fn parked_poll(cpus: usize) -> std::time::Duration {
    let host = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpus <= host {
        PARKED_POLL
    } else {
        std::time::Duration::ZERO
    }
}

/// The next request for a parked vCPU: polled for `poll`, then waited for.
/// While polling, vCPU `id`'s thread keeps off the host CPUs of the VM's other parked
/// vCPU threads (`spread`, see [`ParkedCpus`]).
fn recv_while_paused(
    events: &Receiver<VcpuEvent>,
    poll: std::time::Duration,
    spread: Option<(&ParkedCpus, usize)>,
) -> Result<VcpuEvent, std::sync::mpsc::RecvError> {
    let until = std::time::Instant::now() + poll;
    let polled = loop {
        if std::time::Instant::now() >= until {
            break None;
        }
        match events.try_recv() {
            Ok(event) => break Some(Ok(event)),
            Err(std::sync::mpsc::TryRecvError::Disconnected) => {
                break Some(Err(std::sync::mpsc::RecvError))
            }
            Err(std::sync::mpsc::TryRecvError::Empty) => {
                if let Some((parked, id)) = spread {
                    parked.spread(id);
                }
                std::thread::yield_now();
            }
        }
    };
    if let Some((parked, id)) = spread {
        parked.leave(id);
    }
    polled.unwrap_or_else(|| events.recv())
}

/// Errors of vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    #[error("cannot start vCPU thread: {0}")]
    Spawn(std::io::Error),
    #[error("vCPU {0} thread is gone")]
    Gone(u8),
    #[error("vCPU {0} did not answer within {1:?}")]
    Timeout(u8, Duration),
    #[error("cannot kick vCPU {0}: {1}")]
    Kick(u8, vmm_sys_util::errno::Error),
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, for the kick signal handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    IMMEDIATE_EXIT.with(|p| {
        let ptr = p.get();
        if !ptr.is_null() {
            // SAFETY: the pointer was set by this very thread to its own vCPU's mapped
            // kvm_run page, which stays mapped while the thread runs; a volatile byte
            // store is async-signal-safe.
            unsafe { std::ptr::write_volatile(ptr, 1) };
        }
    });
    fence(Ordering::Release);
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    (*ONCE
        .get_or_init(|| register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.errno())))
    .map_err(|e| VcpuError::SignalHandler(vmm_sys_util::errno::Error::new(e)))
}

/// A vCPU and what it needs to run.
pub struct Vcpu {
    pub id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    memory: GuestMemoryMmap,
    exit: Arc<ExitSignal>,
    stats: Arc<FallbackStats>,
    /// The last emulation failure we could not handle from re-read bytes, and how often in a row.
    stale_code: Option<(u64, Vec<u8>, u32)>,
    /// How long this thread polls for its next request while parked ([`parked_poll`]).
    parked_poll: std::time::Duration,
    /// Where the VM's parked vCPU threads poll, to keep them on different host CPUs.
    parked_cpus: Option<Arc<ParkedCpus>>,
}

/// The VMM's handle on a running vCPU thread.
pub struct VcpuHandle {
    pub id: u8,
    thread: Option<JoinHandle<()>>,
    events: Sender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    /// Sends `event` and kicks the thread out of `KVM_RUN`.
    pub fn send(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.id))?;
        if let Some(thread) = &self.thread {
            thread
                .kill(kick_signal())
                .map_err(|e| VcpuError::Kick(self.id, e))?;
        }
        Ok(())
    }

    /// Sends `event` without a kick: for a parked thread, which reads its requests
    /// outside `KVM_RUN`.
    pub fn post(&self, event: VcpuEvent) -> Result<(), VcpuError> {
        self.events
            .send(event)
            .map_err(|_| VcpuError::Gone(self.id))
    }

    /// Waits for the thread's reply.
    pub fn wait(&self, timeout: Duration) -> Result<VcpuResponse, VcpuError> {
        self.responses.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuError::Timeout(self.id, timeout),
            RecvTimeoutError::Disconnected => VcpuError::Gone(self.id),
        })
    }

    /// Joins the thread (after `Finish`), giving up after `timeout`.
    pub fn join(mut self, timeout: Duration) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let deadline = std::time::Instant::now() + timeout;
        while !thread.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            tracing::warn!("vCPU {} thread did not stop in {timeout:?}", self.id);
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

impl Vcpu {
    pub fn new(
        id: u8,
        fd: VcpuFd,
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        memory: GuestMemoryMmap,
        exit: Arc<ExitSignal>,
        stats: Arc<FallbackStats>,
    ) -> Self {
        Self {
            id,
            fd,
            io_bus,
            mmio_bus,
            memory,
            exit,
            stats,
            stale_code: None,
            parked_poll: std::time::Duration::ZERO,
            parked_cpus: None,
        }
    }

    /// Sets how long the thread polls while parked (see [`parked_poll`]).
    pub fn with_parked_poll(mut self, poll: std::time::Duration) -> Self {
        self.parked_poll = poll;
        self
    }

    /// Shares where the VM's parked vCPU threads poll (see [`ParkedCpus`]).
    pub fn with_parked_cpus(mut self, parked: Arc<ParkedCpus>) -> Self {
        self.parked_cpus = Some(parked);
        self
    }

    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Starts the vCPU thread; it waits on `barrier` before entering the guest.
    pub fn start(self, barrier: Arc<Barrier>) -> Result<VcpuHandle, VcpuError> {
        let id = self.id;
        let (ev_tx, ev_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run(ev_rx, resp_tx, barrier))
            .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            thread: Some(thread),
            events: ev_tx,
            responses: resp_rx,
        })
    }

    fn run(
        mut self,
        events: Receiver<VcpuEvent>,
        responses: Sender<VcpuResponse>,
        barrier: Arc<Barrier>,
    ) {
        let run = self.fd.get_kvm_run();
        let ptr = std::ptr::addr_of_mut!(run.immediate_exit);
        IMMEDIATE_EXIT.with(|p| p.set(ptr));
        barrier.wait();
        loop {
            match self.run_once() {
                Ok(Flow::Continue) => {}
                Ok(Flow::Stop) => {
                    // Park until the VMM tells us to finish.
                    if self.wait_for_finish(&events, &responses) {
                        break;
                    }
                }
                Err(Interrupted) => {
                    self.fd.set_kvm_immediate_exit(0);
                    if self.handle_events(&events, &responses) {
                        break;
                    }
                }
            }
        }
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        let _ = responses.send(VcpuResponse::Finished);
    }

    /// Processes queued control events; returns true when the thread must end.
    fn handle_events(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responses: &Sender<VcpuResponse>,
    ) -> bool {
        while let Ok(event) = events.try_recv() {
            match event {
                VcpuEvent::Finish => return true,
                VcpuEvent::Resume => {
                    let _ = responses.send(VcpuResponse::Resumed(std::time::Instant::now()));
                }
                VcpuEvent::SaveState(_) => {
                    let _ = responses.send(VcpuResponse::State(Box::new(Err(
                        "vCPU is running; pause it first".into(),
                    ))));
                }
                VcpuEvent::ReadKernelView => {
                    let _ = responses.send(VcpuResponse::KernelView(Box::new(Err(
                        "vCPU is running; pause it first".into(),
                    ))));
                }
                VcpuEvent::Help(job) => job.run(),
                VcpuEvent::Pause => {
                    // Tell the guest it was stopped, so its watchdogs forgive the gap.
                    if let Err(e) = self.fd.kvmclock_ctrl() {
                        tracing::trace!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.id);
                    }
                    let _ = responses.send(VcpuResponse::Paused);
                    loop {
                        let spread = self.parked_cpus.as_deref().map(|p| (p, self.id as usize));
                        match recv_while_paused(events, self.parked_poll, spread) {
                            Ok(VcpuEvent::Resume) => {
                                let _ = responses
                                    .send(VcpuResponse::Resumed(std::time::Instant::now()));
                                break;
                            }
                            Ok(VcpuEvent::Pause) => {
                                let _ = responses.send(VcpuResponse::Paused);
                            }
                            Ok(VcpuEvent::SaveState(msrs)) => {
                                let _ = responses.send(self.save_state(&msrs));
                            }
                            Ok(VcpuEvent::ReadKernelView) => {
                                let _ = responses.send(self.kernel_view());
                            }
                            Ok(VcpuEvent::Help(job)) => job.run(),
                            Ok(VcpuEvent::Finish) | Err(_) => return true,
                        }
                    }
                }
            }
        }
        false
    }

    fn wait_for_finish(
        &mut self,
        events: &Receiver<VcpuEvent>,
        responses: &Sender<VcpuResponse>,
    ) -> bool {
        loop {
            match events.recv() {
                Ok(VcpuEvent::Finish) | Err(_) => return true,
                Ok(VcpuEvent::Pause) => {
                    let _ = responses.send(VcpuResponse::Paused);
                }
                Ok(VcpuEvent::Resume) => {
                    let _ = responses.send(VcpuResponse::Resumed(std::time::Instant::now()));
                }
                Ok(VcpuEvent::SaveState(msrs)) => {
                    let _ = responses.send(self.save_state(&msrs));
                }
                Ok(VcpuEvent::ReadKernelView) => {
                    let _ = responses.send(self.kernel_view());
                }
                Ok(VcpuEvent::Help(job)) => job.run(),
            }
        }
    }

    /// Saves this (paused) vCPU, after finishing the I/O access it exited for.
    fn save_state(&mut self, msrs: &[u32]) -> VcpuResponse {
        let id = self.id;
        let result = vcpu_state::complete_pending_io(&mut self.fd, id)
            .and_then(|_| vcpu_state::save(&self.fd, id, msrs))
            .map_err(|e| e.to_string());
        VcpuResponse::State(Box::new(result))
    }

    /// Reads this (paused) vCPU's registers for introspection.
    fn kernel_view(&self) -> VcpuResponse {
        let result = vcpu_state::read_kernel_view(&self.fd, self.id).map_err(|e| e.to_string());
        VcpuResponse::KernelView(Box::new(result))
    }

    fn stop(&self, reason: ExitReason) -> Result<Flow, Interrupted> {
        self.exit.request(reason);
        Ok(Flow::Stop)
    }

    fn run_once(&mut self) -> Result<Flow, Interrupted> {
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Err(Interrupted)
            }
            Err(e) => {
                let msg = format!("vCPU {}: KVM_RUN failed: {e}", self.id);
                return self.stop(ExitReason::Fatal(msg));
            }
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                self.io_bus.read(u64::from(port), data);
            }
            VcpuExit::IoOut(port, data) => {
                self.io_bus.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                self.mmio_bus.read(addr, data);
            }
            VcpuExit::MmioWrite(addr, data) => {
                self.mmio_bus.write(addr, data);
            }
            VcpuExit::Hlt => {}
            VcpuExit::Shutdown => return self.stop(ExitReason::TripleFault { vcpu: self.id }),
            VcpuExit::SystemEvent(kind, _) => {
                return match kind {
                    KVM_SYSTEM_EVENT_RESET => self.stop(ExitReason::Reset),
                    KVM_SYSTEM_EVENT_SHUTDOWN => self.stop(ExitReason::Poweroff),
                    other => self.stop(ExitReason::Fatal(format!(
                        "vCPU {}: unexpected system event {other}",
                        self.id
                    ))),
                };
            }
            VcpuExit::InternalError => return self.handle_internal_error(),
            VcpuExit::FailEntry(reason, cpu) => {
                let msg = format!(
                    "vCPU {}: VM entry failed (hardware reason {reason:#x} on host CPU {cpu})",
                    self.id
                );
                return self.stop(ExitReason::Fatal(msg));
            }
            other => {
                let msg = format!("vCPU {}: unexpected exit {other:?}", self.id);
                return self.stop(ExitReason::Fatal(msg));
            }
        }
        Ok(Flow::Continue)
    }

    fn fatal_with_state(&self, what: &str) -> Result<Flow, Interrupted> {
        let state = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => emulate::format_regs(&regs, &sregs),
            _ => "registers unavailable".to_string(),
        };
        self.stop(ExitReason::Fatal(format!(
            "vCPU {}: {what}; {state}",
            self.id
        )))
    }

    /// Handles `KVM_EXIT_INTERNAL_ERROR`: emulation failures go to the user-space
    /// fallback; everything else stops the VM with the registers printed.
    fn handle_internal_error(&mut self) -> Result<Flow, Interrupted> {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active
        // member of the exit union.
        let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        let kvm_code = self.emulation_failure_bytes();
        if suberror != KVM_INTERNAL_ERROR_EMULATION {
            return self.fatal_with_state(&format!("KVM internal error, suberror {suberror}"));
        }
        let (mut regs, sregs) = match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => (r, s),
            (Err(e), _) | (_, Err(e)) => {
                return self.stop(ExitReason::Fatal(format!(
                    "vCPU {}: cannot read registers: {e}",
                    self.id
                )))
            }
        };
        let from_kvm = kvm_code.is_some();
        let code = kvm_code.unwrap_or_else(|| self.fetch_code(&regs, &sregs));
        let rip = regs.rip;
        let mut access = VcpuAccess {
            fd: &self.fd,
            memory: &self.memory,
        };
        let result = emulate::handle_emulation_failure(&code, &mut regs, &sregs, &mut access);
        if result.is_ok() {
            self.stale_code = None;
        }
        match result {
            Ok(Fallback::Emulated(kind)) => {
                self.stats.record(kind);
                if let Err(e) = self.fd.set_regs(&regs) {
                    return self.stop(ExitReason::Fatal(format!(
                        "vCPU {}: KVM_SET_REGS: {e}",
                        self.id
                    )));
                }
            }
            Ok(Fallback::InjectException {
                vector,
                error_code,
                kind,
            }) => {
                self.stats.record(kind);
                if let Err(e) = self.inject_exception(&regs, vector, error_code) {
                    return self.stop(ExitReason::Fatal(format!(
                        "vCPU {}: cannot inject exception {vector}: {e}",
                        self.id
                    )));
                }
            }
            Err(e) if !from_kvm && self.retry_stale_code(rip, &code) => {
                tracing::debug!(
                    "vCPU {}: re-entering after {e}: the code may have changed under us",
                    self.id
                );
            }
            Err(e) => {
                let what = format!(
                    "emulation failure the VMM cannot handle: {e} [{}]",
                    emulate::describe(&code, regs.rip)
                );
                return self.fatal_with_state(&what);
            }
        }
        Ok(Flow::Continue)
    }

    /// The instruction bytes KVM itself fetched, when it reports them with the failure.
    fn emulation_failure_bytes(&mut self) -> Option<Vec<u8>> {
        // SAFETY: called for KVM_EXIT_INTERNAL_ERROR with the emulation suberror, for which KVM
        // fills the `emulation_failure` member; the flag says whether the bytes are valid.
        let failure = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.emulation_failure };
        if failure.flags
            & u64::from(kvm_bindings::KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)
            == 0
        {
            return None;
        }
        // SAFETY: the union has a single member.
        let bytes = unsafe { failure.__bindgen_anon_1.__bindgen_anon_1 };
        let len = usize::from(bytes.insn_size).min(MAX_INSN_LEN);
        (len > 0).then(|| bytes.insn_bytes[..len].to_vec())
    }

    /// Whether to re-enter the guest after failing to handle bytes we re-read ourselves.
    fn retry_stale_code(&mut self, rip: u64, code: &[u8]) -> bool {
        should_retry_stale_code(&mut self.stale_code, rip, code)
    }

    fn inject_exception(
        &self,
        regs: &kvm_regs,
        vector: u8,
        error_code: Option<u32>,
    ) -> Result<(), kvm_ioctls::Error> {
        // SET_REGS clears pending exceptions, so it must come before SET_VCPU_EVENTS.
        self.fd.set_regs(regs)?;
        let mut events = self.fd.get_vcpu_events()?;
        events.exception.injected = 1;
        events.exception.pending = 0;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        events.exception_has_payload = 0;
        self.fd.set_vcpu_events(&events)
    }

    /// Reads up to 15 instruction bytes at CS:RIP through the guest's page tables,
    /// stopping at the first page that does not translate.
    fn fetch_code(&self, regs: &kvm_regs, sregs: &kvm_sregs) -> Vec<u8> {
        let mut access = VcpuAccess {
            fd: &self.fd,
            memory: &self.memory,
        };
        let start = sregs.cs.base.wrapping_add(regs.rip);
        let mut code = Vec::with_capacity(MAX_INSN_LEN);
        let mut addr = start;
        while code.len() < MAX_INSN_LEN {
            let in_page = (0x1000 - (addr & 0xfff)) as usize;
            let n = in_page.min(MAX_INSN_LEN - code.len());
            let mut buf = vec![0u8; n];
            if access.read_gva(addr, &mut buf).is_err() {
                break;
            }
            code.extend_from_slice(&buf);
            addr = addr.wrapping_add(n as u64);
        }
        code
    }
}

/// Counts consecutive failures at the same RIP with the same bytes; allows
/// `MAX_STALE_CODE_RETRIES` re-entries before giving up.
fn should_retry_stale_code(state: &mut Option<(u64, Vec<u8>, u32)>, rip: u64, code: &[u8]) -> bool {
    let repeats = match state {
        Some((r, c, n)) if *r == rip && c == code => *n + 1,
        _ => 1,
    };
    *state = Some((rip, code.to_vec(), repeats));
    repeats <= MAX_STALE_CODE_RETRIES
}

/// Marker for `KVM_RUN` returning EINTR/EAGAIN.
struct Interrupted;

/// Guest-virtual memory and MXCSR access for the emulation fallback, through
/// `KVM_TRANSLATE` on the faulting vCPU (whose CR3 is the one the instruction uses).
struct VcpuAccess<'a> {
    fd: &'a VcpuFd,
    memory: &'a GuestMemoryMmap,
}

impl VcpuAccess<'_> {
    fn translate(&self, gva: u64) -> Result<u64, EmulateError> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(|e| EmulateError::Memory(format!("KVM_TRANSLATE {gva:#x}: {e}")))?;
        if t.valid == 0 {
            return Err(EmulateError::Memory(format!(
                "guest address {gva:#x} is not mapped"
            )));
        }
        Ok(t.physical_address)
    }

    fn for_each_page(
        &self,
        gva: u64,
        len: usize,
        mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), EmulateError>,
    ) -> Result<(), EmulateError> {
        let mut done = 0usize;
        while done < len {
            let va = gva.wrapping_add(done as u64);
            let n = ((0x1000 - (va & 0xfff)) as usize).min(len - done);
            let pa = self.translate(va)?;
            f(GuestAddress(pa), done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

impl GuestCpuAccess for VcpuAccess<'_> {
    fn read_gva(&mut self, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        let len = buf.len();
        let memory = self.memory;
        self.for_each_page(gva, len, |pa, range| {
            memory
                .read_slice(&mut buf[range], pa)
                .map_err(|e| EmulateError::Memory(format!("read {pa:?}: {e}")))
        })
    }

    fn write_gva(&mut self, gva: u64, data: &[u8]) -> Result<(), EmulateError> {
        let memory = self.memory;
        self.for_each_page(gva, data.len(), |pa, range| {
            memory
                .write_slice(&data[range], pa)
                .map_err(|e| EmulateError::Memory(format!("write {pa:?}: {e}")))
        })
    }

    fn mxcsr(&mut self) -> Result<u32, EmulateError> {
        self.fd
            .get_fpu()
            .map(|f| f.mxcsr)
            .map_err(|e| EmulateError::Memory(format!("KVM_GET_FPU: {e}")))
    }

    fn set_mxcsr(&mut self, value: u32) -> Result<(), EmulateError> {
        let mut fpu = self
            .fd
            .get_fpu()
            .map_err(|e| EmulateError::Memory(format!("KVM_GET_FPU: {e}")))?;
        fpu.mxcsr = value;
        self.fd
            .set_fpu(&fpu)
            .map_err(|e| EmulateError::Memory(format!("KVM_SET_FPU: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::ram_regions;
    use crate::arch::x86_64::cpu_template::CpuTemplate;
    use crate::arch::x86_64::regs;
    use crate::devices::bus::BusDevice;
    use crate::vstate::vm::{allocate_memory, open_kvm, Vm};
    use std::sync::Mutex;
    use std::time::Instant;

    #[test]
    fn a_parked_vcpu_polls_then_waits_for_its_next_request() {
        let (tx, rx) = std::sync::mpsc::channel();
        // Sent during the polling window.
        tx.send(VcpuEvent::Resume).unwrap();
        assert!(matches!(
            recv_while_paused(&rx, PARKED_POLL, None),
            Ok(VcpuEvent::Resume)
        ));
        // Sent well after it: the thread has gone to sleep and is woken by it.
        let late = std::thread::spawn(move || {
            std::thread::sleep(PARKED_POLL * 3);
            tx.send(VcpuEvent::Pause).unwrap();
            tx
        });
        let started = Instant::now();
        assert!(matches!(
            recv_while_paused(&rx, PARKED_POLL, None),
            Ok(VcpuEvent::Pause)
        ));
        assert!(started.elapsed() >= PARKED_POLL * 3);
        // The VMM gone: an error, whether polling or asleep.
        drop(late.join().unwrap());
        assert!(recv_while_paused(&rx, PARKED_POLL, None).is_err());
        assert!(recv_while_paused(&rx, std::time::Duration::ZERO, None).is_err());
        // More vCPUs than host CPUs: no polling.
        assert_eq!(parked_poll(usize::MAX), std::time::Duration::ZERO);
        assert_eq!(parked_poll(1), PARKED_POLL);
    }

    /// Records port writes; a write to the last port powers the VM off.
    struct Probe {
        writes: Arc<Mutex<Vec<(u64, u8)>>>,
        exit: Arc<ExitSignal>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.lock().unwrap().push((offset, data[0]));
            if offset == 3 {
                self.exit.request(ExitReason::Poweroff);
            }
        }
    }

    const CODE: u64 = 0x1_0000;
    const HANDLER: u64 = 0x1_1000;
    const IDT: u64 = 0x1_2000;
    const DATA: u64 = 0x3000;

    /// Runs a tiny 64-bit guest on real KVM: `popcnt` (register and memory forms) and an
    /// `int3` handled by the guest's own IDT. On PVM hosts these go through the user-space
    /// emulation fallback; elsewhere the CPU runs them. The guest reports over port I/O.
    #[test]
    fn tiny_guest_runs_popcnt_and_int3_through_the_vcpu_loop() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let memory = allocate_memory(&ram_regions(2 << 20)).unwrap();
        let vm = Vm::new(&kvm, memory).unwrap();
        let mem = vm.memory().clone();
        #[rustfmt::skip]
        let code: &[u8] = &[
            0x48, 0xb9, 0xf0, 0xf0, 0, 0, 0, 0, 0, 0, // mov rcx, 0xf0f0
            0xf3, 0x48, 0x0f, 0xb8, 0xc1,             // popcnt rax, rcx
            0xe6, 0x10,                               // out 0x10, al
            0xcc,                                     // int3 (handler sets bl = 0x33)
            0x88, 0xd8,                               // mov al, bl
            0xe6, 0x11,                               // out 0x11, al
            0xf3, 0x48, 0x0f, 0xb8, 0x04, 0x25, 0x00, 0x30, 0x00, 0x00, // popcnt rax, [0x3000]
            0xe6, 0x12,                               // out 0x12, al
            0xe6, 0x13,                               // out 0x13, al (done)
            0xf4,                                     // hlt
        ];
        mem.write_slice(code, GuestAddress(CODE)).unwrap();
        mem.write_slice(&[0xb3, 0x33, 0x48, 0xcf], GuestAddress(HANDLER))
            .unwrap(); // mov bl,0x33; iretq
        mem.write_obj(0x7u64, GuestAddress(DATA)).unwrap();
        // 64-bit interrupt gate for vector 3: selector 0x10, present, DPL 0, type 0xe.
        let gate_lo: u64 = (HANDLER & 0xffff)
            | (0x10 << 16)
            | (0x8e00u64 << 32)
            | ((HANDLER >> 16) & 0xffff) << 48;
        mem.write_obj(gate_lo, GuestAddress(IDT + 3 * 16)).unwrap();
        mem.write_obj(HANDLER >> 32, GuestAddress(IDT + 3 * 16 + 8))
            .unwrap();

        let fd = vm.fd().create_vcpu(0).unwrap();
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        CpuTemplate::Host.apply(&mut cpuid, 0, 1);
        fd.set_cpuid2(&cpuid).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        regs::setup_long_mode(&mem, &mut sregs).unwrap();
        sregs.idt.base = IDT;
        sregs.idt.limit = 16 * 4 - 1;
        fd.set_sregs(&sregs).unwrap();
        let mut r = regs::boot_regs(GuestAddress(CODE));
        r.rsp = 0x8000;
        fd.set_regs(&r).unwrap();

        install_kick_handler().unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mut io_bus = Bus::new();
        io_bus
            .insert(
                Arc::new(Mutex::new(Probe {
                    writes: writes.clone(),
                    exit: exit.clone(),
                })),
                0x10,
                4,
            )
            .unwrap();
        let stats = Arc::new(FallbackStats::default());
        let vcpu = Vcpu::new(
            0,
            fd,
            Arc::new(io_bus),
            Arc::new(Bus::new()),
            mem,
            exit.clone(),
            stats.clone(),
        );
        let barrier = Arc::new(Barrier::new(2));
        let handle = vcpu.start(barrier.clone()).unwrap();
        barrier.wait();

        let start = Instant::now();
        while exit.reason().is_none() && start.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(5));
        }
        handle.send(VcpuEvent::Finish).unwrap();
        handle.join(Duration::from_secs(2));

        assert_eq!(
            exit.reason(),
            Some(ExitReason::Poweroff),
            "guest did not finish"
        );
        assert_eq!(
            *writes.lock().unwrap(),
            vec![(0, 8), (1, 0x33), (2, 3), (3, 3)]
        );
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            // Under PVM the emulator cannot run these; the VMM did.
            assert!(stats.summary().contains("int3=1"), "{}", stats.summary());
            assert!(stats.summary().contains("popcnt=2"), "{}", stats.summary());
        }
    }

    #[test]
    fn stale_code_is_retried_a_bounded_number_of_times() {
        let mut state = None;
        // Bytes that changed under us (an int3 became a jmp): retried, then given up on.
        for _ in 0..MAX_STALE_CODE_RETRIES {
            assert!(should_retry_stale_code(&mut state, 0x1000, &[0xeb, 0x38]));
        }
        assert!(!should_retry_stale_code(&mut state, 0x1000, &[0xeb, 0x38]));
        // A different RIP or different bytes start a new count.
        assert!(should_retry_stale_code(&mut state, 0x2000, &[0xeb, 0x38]));
        assert!(should_retry_stale_code(
            &mut state,
            0x2000,
            &[0x0f, 0xc7, 0xf8]
        ));
    }

    #[test]
    fn pause_resume_and_finish_a_running_vcpu() {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let memory = allocate_memory(&ram_regions(2 << 20)).unwrap();
        let vm = Vm::new(&kvm, memory).unwrap();
        let mem = vm.memory().clone();
        mem.write_slice(&[0xeb, 0xfe], GuestAddress(CODE)).unwrap(); // jmp $ (spin forever)
        let fd = vm.fd().create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        regs::setup_long_mode(&mem, &mut sregs).unwrap();
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&regs::boot_regs(GuestAddress(CODE))).unwrap();
        install_kick_handler().unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let vcpu = Vcpu::new(
            0,
            fd,
            Arc::new(Bus::new()),
            Arc::new(Bus::new()),
            mem,
            exit.clone(),
            Arc::new(FallbackStats::default()),
        );
        let barrier = Arc::new(Barrier::new(2));
        let handle = vcpu.start(barrier.clone()).unwrap();
        barrier.wait();
        for _ in 0..20 {
            handle.send(VcpuEvent::Pause).unwrap();
            assert_eq!(
                handle.wait(Duration::from_secs(10)).unwrap(),
                VcpuResponse::Paused
            );
            let sent = Instant::now();
            handle.send(VcpuEvent::Resume).unwrap();
            match handle.wait(Duration::from_secs(10)).unwrap() {
                VcpuResponse::Resumed(at) => assert!(at >= sent),
                other => panic!("{other:?}"),
            }
        }
        handle.send(VcpuEvent::Finish).unwrap();
        assert_eq!(
            handle.wait(Duration::from_secs(10)).unwrap(),
            VcpuResponse::Finished
        );
        assert!(exit.reason().is_none(), "{:?}", exit.reason());
        handle.join(Duration::from_secs(2));
    }
}
