//! Carrying out a transition on a VM: resolve, link and load the bundle, then in a loop
//! pause the guest, check consistency, write every site or none, and resume, retrying
//! with backoff until a deadline. The ledger records every step.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::bundle::Bundle;
use crate::consistency::{self, Blocker};
use crate::ledger::{
    Ledger, LedgerError, PatchMemory, ResolvedFunction, Transition, TransitionKind,
};
use crate::linker::{self, LinkError, LinkedPatch, SymbolResolver};
use crate::redirect::SITE_LEN;
use crate::system_state::ResolvedAction;
use crate::target::PatchTarget;

/// Why a transition failed. In every case the guest's kernel text and the patch area
/// are as they were before.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    #[error("bundle {bundle} targets kernel {wanted}, the guest runs {found}")]
    WrongKernel {
        bundle: String,
        wanted: String,
        found: String,
    },
    #[error("{bundle}: cannot resolve {func}: {detail}")]
    Resolve {
        bundle: String,
        func: String,
        detail: String,
    },
    #[error("{0}")]
    Link(#[from] LinkError),
    #[error("{0}")]
    Ledger(#[from] LedgerError),
    #[error("VM: {0}")]
    Target(String),
    #[error("{bundle}: transition did not complete within {waited:?}; blocked by: {}", blockers.join("; "))]
    Blocked {
        bundle: String,
        waited: Duration,
        blockers: Vec<String>,
    },
    #[error("{bundle}: writing {site:#x} failed ({detail}); every site was restored")]
    WriteFailed {
        bundle: String,
        site: u64,
        detail: String,
    },
    #[error("cancelled")]
    Cancelled,
}

/// How to run a transition.
#[derive(Debug, Clone)]
pub struct Options {
    /// Give up after this long (default 15 s).
    pub deadline: Duration,
    /// Skip the consistency check (recorded as forced).
    pub force: bool,
    /// Let a cumulative bundle replace a newer one (logged).
    pub allow_downgrade: bool,
    /// First wait between attempts; doubles up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            deadline: Duration::from_secs(15),
            force: false,
            allow_downgrade: false,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
        }
    }
}

struct Resolver<'a, T: PatchTarget>(&'a T);

impl<T: PatchTarget> SymbolResolver for Resolver<'_, T> {
    fn resolve(&self, name: &str, sympos: Option<u32>) -> Result<u64, String> {
        self.0.symbol(name, sympos)
    }
}

fn read_data<T: PatchTarget>(target: &T, addr: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    target.read_kernel(addr, &mut b)?;
    Ok(b)
}

fn read_site<T: PatchTarget>(target: &T, site: u64) -> Result<[u8; SITE_LEN], String> {
    let mut b = [0u8; SITE_LEN];
    target.read_kernel(site, &mut b)?;
    Ok(b)
}

/// Writes made so far in one pause, undone in reverse if a later one fails.
#[derive(Default)]
struct Undo(Vec<(u64, Vec<u8>, bool)>);

impl Undo {
    fn rollback<T: PatchTarget>(&mut self, target: &mut T) {
        for (addr, bytes, text) in self.0.drain(..).rev() {
            let _ = if text {
                target.write_kernel_text(addr, &bytes)
            } else {
                target.write_kernel_data(addr, &bytes)
            };
        }
    }
}

/// One verified write of kernel text (`text`) or of a kernel variable.
fn write_one<T: PatchTarget>(
    target: &mut T,
    undo: &mut Undo,
    addr: u64,
    expected: &[u8],
    bytes: &[u8],
    text: bool,
) -> Result<(), String> {
    // Recorded first: a half-done write is undone too.
    undo.0.push((addr, expected.to_vec(), text));
    if text {
        target.write_kernel_text(addr, bytes)?;
    } else {
        target.write_kernel_data(addr, bytes)?;
    }
    let mut back = vec![0u8; bytes.len()];
    target.read_kernel(addr, &mut back)?;
    if back != bytes {
        return Err("read back differs".into());
    }
    Ok(())
}

/// The switch itself, in one pause and in the kernel's order: pre-(un)patch state
/// actions, the site writes, post-(un)patch actions. Every write is verified; if one
/// fails, all of them are undone and the guest sees none.
fn switch<T: PatchTarget>(
    target: &mut T,
    ledger: &mut Ledger,
    bundle: &str,
    t: &Transition,
) -> Result<(), TransitionError> {
    let (phase, word) = match t.kind {
        TransitionKind::Apply => ("patch", "patching"),
        TransitionKind::Disable => ("unpatch", "unpatching"),
    };
    let mut undo = Undo::default();
    let failed = |target: &mut T, undo: &mut Undo, site: u64, detail: String| {
        undo.rollback(target);
        TransitionError::WriteFailed {
            bundle: bundle.to_string(),
            site,
            detail,
        }
    };
    for line in &t.states.pre {
        ledger.log(bundle, format!("pre-{phase}: {line}"));
    }
    let data = |target: &mut T, undo: &mut Undo| -> Result<(), (u64, String)> {
        for w in &t.states.writes {
            write_one(target, undo, w.addr, &w.expected, &w.value, false)
                .map_err(|e| (w.addr, format!("{}: {e}", w.symbol)))?;
        }
        Ok(())
    };
    if t.kind == TransitionKind::Disable {
        data(target, &mut undo).map_err(|(a, e)| failed(target, &mut undo, a, e))?;
    }
    ledger.log(bundle, format!("starting {word} transition"));
    for w in &t.writes {
        write_one(target, &mut undo, w.site, &w.expected, &w.replacement, true)
            .map_err(|e| failed(target, &mut undo, w.site, e))?;
    }
    ledger.log(bundle, format!("completing {word} transition"));
    if t.kind == TransitionKind::Apply {
        data(target, &mut undo).map_err(|(a, e)| failed(target, &mut undo, a, e))?;
    }
    for line in &t.states.post {
        ledger.log(bundle, format!("post-{phase}: {line}"));
    }
    Ok(())
}

/// A transition under way: its bundle is loaded (for an apply) and the ledger has logged
/// `initializing`; each [`InFlight::attempt`] is one pause. Between attempts the guest
/// runs and the VMM carries on (devices, API); [`InFlight::reverse`] abandons it, which
/// is how a disable during a running transition works (nothing was written yet).
pub struct InFlight {
    bundle: String,
    work: Work,
    opts: Options,
    started: Instant,
    attempt: u32,
    wait: Duration,
}

enum Work {
    Apply(Box<Prepared>),
    Disable,
}

/// An apply, resolved, linked and loaded.
struct Prepared {
    manifest: crate::manifest::Manifest,
    digest: String,
    resolved: Vec<ResolvedFunction>,
    actions: Vec<ResolvedAction>,
    linked: LinkedPatch,
    memory: Option<PatchMemory>,
}

/// What a transition finished with.
#[derive(Debug)]
pub enum Completed {
    Applied(LinkedPatch),
    Disabled,
}

/// The result of one attempt.
#[derive(Debug)]
pub enum Progress {
    Done(Completed),
    /// Blocked; try again after this long.
    RetryIn(Duration),
}

impl InFlight {
    fn new(ledger: &mut Ledger, bundle: &str, work: Work, opts: &Options) -> Self {
        ledger.log(
            bundle,
            match work {
                Work::Apply(_) => "initializing patching transition",
                Work::Disable => "initializing unpatching transition",
            },
        );
        InFlight {
            bundle: bundle.to_string(),
            work,
            opts: opts.clone(),
            started: Instant::now(),
            attempt: 0,
            wait: opts.backoff,
        }
    }

    /// The bundle being applied or disabled.
    pub fn bundle(&self) -> &str {
        &self.bundle
    }

    /// Whether this is an apply (else a disable).
    pub fn is_apply(&self) -> bool {
        matches!(self.work, Work::Apply(_))
    }

    /// Attempts made so far.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Time since the transition began.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn plan<T: PatchTarget>(&self, ledger: &Ledger, t: &T) -> Result<Transition, TransitionError> {
        let site = |s| read_site(t, s).unwrap_or([0; SITE_LEN]);
        let mut data = |addr, len| read_data(t, addr, len);
        Ok(match &self.work {
            Work::Apply(p) => ledger.plan_apply_with_actions(
                &p.manifest,
                &p.resolved,
                &p.actions,
                site,
                &mut data,
            )?,
            Work::Disable => ledger.plan_disable_with_actions(&self.bundle, site, &mut data)?,
        })
    }

    /// One attempt: pause, re-plan (site bytes are read while paused), check every vCPU
    /// and task stack unless forced, write all or nothing, resume. A failure (including
    /// reaching the deadline) has undone everything, the loaded patch included.
    pub fn attempt<T: PatchTarget>(
        &mut self,
        target: &mut T,
        ledger: &mut Ledger,
    ) -> Result<Progress, TransitionError> {
        match self.try_once(target, ledger) {
            Ok(Some(t)) => Ok(Progress::Done(self.commit(target, ledger, &t))),
            Ok(None) => Ok(Progress::RetryIn(self.wait)),
            Err(e) => {
                self.unload(target);
                Err(e)
            }
        }
    }

    fn try_once<T: PatchTarget>(
        &mut self,
        target: &mut T,
        ledger: &mut Ledger,
    ) -> Result<Option<Transition>, TransitionError> {
        self.attempt += 1;
        let attempt = self.attempt;
        let bundle = self.bundle.clone();
        let stopped_at = Instant::now();
        if let Err(e) = target.pause() {
            ledger.log(&bundle, format!("failed: VM: {e}"));
            return Err(TransitionError::Target(e));
        }
        let paused_at = Instant::now();
        let mut checked = 0usize;
        let outcome = (|| {
            let t = self.plan(ledger, target)?;
            if !self.opts.force {
                let rips = target.vcpu_rips().map_err(TransitionError::Target)?;
                let tasks = target.task_stacks().map_err(TransitionError::Target)?;
                checked = tasks.len();
                let mut symbolize = |a: u64| target.symbolize(a);
                if let Err(blockers) =
                    consistency::check(&t.busy_ranges, &rips, &tasks, &mut symbolize)
                {
                    return Ok(Err(blockers));
                }
            }
            Ok(Ok(t))
        })();
        let checked_at = Instant::now();
        let outcome = match outcome {
            Ok(Ok(t)) => switch(target, ledger, &bundle, &t).map(|()| Ok(t)),
            other => other,
        };
        let written_at = Instant::now();
        let resumed = target.resume().map_err(TransitionError::Target);
        let returned_at = Instant::now();
        let resumed_at = target
            .resumed_at()
            .filter(|&at| at >= written_at && at <= returned_at)
            .unwrap_or(returned_at);
        // The guest-visible cost of this attempt: pause to resume (the vCPUs back in the
        // guest), stack check included, and where it went.
        let us = |from: Instant, to: Instant| to.duration_since(from).as_micros();
        ledger.log(
            &bundle,
            format!(
                "attempt {attempt}: vCPUs stopped for {} us, {checked} task stacks checked \
                 (pause {} us, plan and check {} us, write {} us, resume {} us)",
                us(stopped_at, resumed_at),
                us(stopped_at, paused_at),
                us(paused_at, checked_at),
                us(checked_at, written_at),
                us(written_at, resumed_at),
            ),
        );
        if let Err(e) = resumed {
            ledger.log(&bundle, format!("failed: {e}"));
            return Err(e);
        }
        match outcome {
            Ok(Ok(t)) => Ok(Some(t)),
            Ok(Err(blockers)) => {
                let report: Vec<String> = blockers.iter().map(Blocker::to_string).collect();
                ledger.log(
                    &bundle,
                    format!("attempt {attempt} blocked by: {}", report.join("; ")),
                );
                if attempt > 1 {
                    self.wait = (self.wait * 2).min(self.opts.max_backoff);
                }
                if self.started.elapsed() + self.wait > self.opts.deadline {
                    ledger.log(&bundle, "failed: deadline reached, nothing written");
                    return Err(TransitionError::Blocked {
                        bundle,
                        waited: self.started.elapsed(),
                        blockers: report,
                    });
                }
                Ok(None)
            }
            Err(e) => {
                ledger.log(&bundle, format!("failed: {e}"));
                Err(e)
            }
        }
    }

    fn commit<T: PatchTarget>(
        &mut self,
        target: &mut T,
        ledger: &mut Ledger,
        t: &Transition,
    ) -> Completed {
        let force = self.opts.force;
        match std::mem::replace(&mut self.work, Work::Disable) {
            Work::Apply(p) => {
                let released =
                    ledger.commit_apply(&p.manifest, &p.digest, &p.resolved, t, p.memory, force);
                if p.memory.is_some() {
                    ledger.set_code(&p.manifest.name, p.linked.code());
                }
                clear_released(target, ledger, released);
                Completed::Applied(p.linked)
            }
            Work::Disable => {
                let released = ledger.commit_disable(&self.bundle, force);
                clear_released(target, ledger, released);
                Completed::Disabled
            }
        }
    }

    /// Clears the memory of a patch that was loaded but never redirected to.
    fn unload<T: PatchTarget>(&self, target: &mut T) {
        if let Work::Apply(p) = &self.work {
            if let Some(m) = p.memory {
                let _ = target.clear_patch_memory(m);
            }
        }
    }

    /// Abandons the transition between attempts (nothing of it was written): the kernel's
    /// reversal of a transition still in progress. An apply's loaded patch is cleared.
    pub fn reverse<T: PatchTarget>(self, target: &mut T, ledger: &mut Ledger) {
        self.unload(target);
        let (from, to) = if self.is_apply() {
            ("patching", "unpatching")
        } else {
            ("unpatching", "patching")
        };
        ledger.log(
            &self.bundle,
            format!("reversing transition from {from} to {to}"),
        );
        ledger.log(
            &self.bundle,
            format!("{to} complete (nothing had been written)"),
        );
    }
}

/// Applies a bundle, blocking until it completes, fails or `cancelled()` says so: the
/// synchronous form of [`begin_apply`] and [`InFlight::attempt`].
pub fn apply<T: PatchTarget>(
    target: &mut T,
    ledger: &mut Ledger,
    bundle: &Bundle,
    digest: &str,
    opts: &Options,
    cancelled: &dyn Fn() -> bool,
) -> Result<LinkedPatch, TransitionError> {
    let flight = begin_apply(target, ledger, bundle, digest, opts)?;
    match drive(flight, target, ledger, cancelled)? {
        Completed::Applied(linked) => Ok(linked),
        Completed::Disabled => Err(TransitionError::Target(
            "an apply ended as a disable".into(),
        )),
    }
}

/// Disables an applied bundle with the same consistency rules, blocking.
pub fn disable<T: PatchTarget>(
    target: &mut T,
    ledger: &mut Ledger,
    name: &str,
    opts: &Options,
    cancelled: &dyn Fn() -> bool,
) -> Result<(), TransitionError> {
    let flight = begin_disable(target, ledger, name, opts)?;
    drive(flight, target, ledger, cancelled).map(|_| ())
}

fn drive<T: PatchTarget>(
    mut flight: InFlight,
    target: &mut T,
    ledger: &mut Ledger,
    cancelled: &dyn Fn() -> bool,
) -> Result<Completed, TransitionError> {
    loop {
        match flight.attempt(target, ledger)? {
            Progress::Done(c) => return Ok(c),
            Progress::RetryIn(wait) => {
                eprintln!("patch: {}: blocked, retrying in {wait:?}", flight.bundle());
                if cancelled() {
                    flight.unload(target);
                    ledger.log(flight.bundle(), "cancelled, nothing written");
                    return Err(TransitionError::Cancelled);
                }
                std::thread::sleep(wait);
            }
        }
    }
}

/// Starts applying a bundle: checks it against the running kernel and the ledger, places
/// and links it at the first free space of the patch area that fits (the ledger knows
/// which memory the applied bundles hold), loads it, and logs `enabling patch` and
/// `initializing patching transition`. Nothing is redirected yet.
pub fn begin_apply<T: PatchTarget>(
    target: &mut T,
    ledger: &mut Ledger,
    bundle: &Bundle,
    digest: &str,
    opts: &Options,
) -> Result<InFlight, TransitionError> {
    let m = &bundle.manifest;
    let reject = |ledger: &mut Ledger, e: TransitionError| {
        ledger.log(&m.name, format!("rejected: {e}"));
        e
    };
    let release = target.kernel_release().map_err(TransitionError::Target)?;
    if release != m.target.release {
        return Err(reject(
            ledger,
            TransitionError::WrongKernel {
                bundle: m.name.clone(),
                wanted: m.target.release.clone(),
                found: release,
            },
        ));
    }
    if let (Some(wanted), Ok(Some(found))) = (&m.target.build_id, target.kernel_build_id()) {
        if !wanted.eq_ignore_ascii_case(&found) {
            return Err(reject(
                ledger,
                TransitionError::WrongKernel {
                    bundle: m.name.clone(),
                    wanted: format!("build ID {wanted}"),
                    found: format!("build ID {found}"),
                },
            ));
        }
    }
    let mut olds = Vec::with_capacity(m.functions.len());
    for f in &m.functions {
        let sym = target.function(&f.old, f.sympos).map_err(|detail| {
            reject(
                ledger,
                TransitionError::Resolve {
                    bundle: m.name.clone(),
                    func: f.old.clone(),
                    detail,
                },
            )
        });
        olds.push(sym?);
    }
    let mut actions: Vec<ResolvedAction> = Vec::new();
    for state in &m.states {
        for a in &state.actions {
            let addr = target.data_symbol(&a.symbol, a.sympos).map_err(|detail| {
                reject(
                    ledger,
                    TransitionError::Resolve {
                        bundle: m.name.clone(),
                        func: format!("state {} variable {}", state.id, a.symbol),
                        detail,
                    },
                )
            })?;
            actions.push(ResolvedAction {
                state: state.id,
                symbol: a.symbol.clone(),
                addr,
                value: a.bytes(),
            });
        }
    }
    let area = target.patch_area();
    let need = linker::footprint(&bundle.object).map_err(|e| reject(ledger, e.into()))?;
    let Some(base) = ledger.place(area, need) else {
        let free = area
            .1
            .saturating_sub(ledger.memory_in_use().iter().map(|m| m.size).sum());
        return Err(reject(
            ledger,
            linker::LinkError::TooBig {
                needed: need,
                available: free,
            }
            .into(),
        ));
    };
    let positions: HashMap<String, u32> = m
        .symbols
        .iter()
        .map(|r| (r.name.clone(), r.sympos))
        .collect();
    let linked = linker::link(&bundle.object, base, need, &Resolver(target), &positions)
        .map_err(|e| reject(ledger, e.into()))?;
    // A bundle of state actions alone has no code or data and holds no memory.
    let memory = (linked.size() > 0).then_some(PatchMemory {
        base,
        size: linked.size(),
    });
    let mut resolved = Vec::with_capacity(m.functions.len());
    for (f, old) in m.functions.iter().zip(&olds) {
        let &(new_addr, new_size) = linked.functions.get(&f.new).ok_or_else(|| {
            reject(
                ledger,
                TransitionError::Resolve {
                    bundle: m.name.clone(),
                    func: f.new.clone(),
                    detail: "not defined in the bundle's object".into(),
                },
            )
        })?;
        resolved.push(ResolvedFunction {
            old: f.old.clone(),
            sympos: old.sympos,
            site: old.addr,
            size: old.size,
            new_addr,
            new_size,
        });
    }
    // A plan that cannot work (a downgrade, already applied, incompatible states, a site
    // that is not ours) is refused before anything is loaded.
    let downgrade = ledger
        .check_version(m, opts.allow_downgrade)
        .map_err(|e| reject(ledger, e.into()))?;
    if let Some(what) = downgrade {
        ledger.log(&m.name, what);
    }
    ledger
        .plan_apply_with_actions(
            m,
            &resolved,
            &actions,
            |s| read_site(target, s).unwrap_or([0; SITE_LEN]),
            &mut |addr, len| read_data(target, addr, len),
        )
        .map_err(|e| reject(ledger, e.into()))?;
    ledger.log(&m.name, "enabling patch");
    target
        .load_patch(&linked)
        .map_err(TransitionError::Target)?;
    let prepared = Prepared {
        manifest: m.clone(),
        digest: digest.to_string(),
        resolved,
        actions,
        linked,
        memory,
    };
    Ok(InFlight::new(
        ledger,
        &m.name,
        Work::Apply(Box::new(prepared)),
        opts,
    ))
}

/// Starts disabling an applied bundle (it must be one that can be disabled now: enabled,
/// not sticky, on top of the stack for its functions).
pub fn begin_disable<T: PatchTarget>(
    target: &mut T,
    ledger: &mut Ledger,
    name: &str,
    opts: &Options,
) -> Result<InFlight, TransitionError> {
    ledger.plan_disable_with_actions(
        name,
        |s| read_site(target, s).unwrap_or([0; SITE_LEN]),
        &mut |addr, len| read_data(target, addr, len),
    )?;
    Ok(InFlight::new(ledger, name, Work::Disable, opts))
}

/// Zeroes patch memory nothing runs or references any more (the transition that retired
/// it cleared the consistency check for it). A failure is only logged: the memory is free
/// in the ledger either way and the next bundle placed there overwrites it.
fn clear_released<T: PatchTarget>(target: &mut T, ledger: &mut Ledger, released: Vec<PatchMemory>) {
    for m in released {
        if let Err(e) = target.clear_patch_memory(m) {
            ledger.log(
                "",
                format!("could not clear patch memory at {:#x}: {e}", m.base),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consistency::TaskStack;
    use crate::manifest::{Manifest, Replacement, Target};
    use crate::redirect::jmp_rel32;
    use crate::target::FunctionSymbol;
    use std::cell::Cell;

    const KTEXT: u64 = 0xffff_ffff_8100_0000;
    const CMDLINE: u64 = KTEXT + 0x1000;
    const MEMINFO: u64 = KTEXT + 0x2000;
    const AREA: u64 = 0xffff_ffff_c000_0000;
    const AREA_SIZE: u64 = 1 << 20;
    const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    /// Kernel data: `console_loglevel` (an int holding 7) at its start.
    const KDATA: u64 = KTEXT + 0x20000;

    struct FakeVm {
        text: Vec<u8>,
        data: Vec<u8>,
        area: Vec<u8>,
        release: String,
        paused: bool,
        pauses: usize,
        blocked_attempts: Cell<usize>,
        /// Where the blocking task is (the old cmdline_proc_show unless set).
        blocked_frame: Cell<u64>,
        fail_write_at: Option<usize>,
        writes: usize,
    }

    impl FakeVm {
        fn new() -> Self {
            let mut text = vec![0xcc; 0x10000];
            for f in [CMDLINE, MEMINFO] {
                let o = (f - KTEXT) as usize;
                text[o..o + 5].copy_from_slice(&NOP5);
            }
            let mut data = vec![0; 0x1000];
            data[..4].copy_from_slice(&7i32.to_le_bytes());
            FakeVm {
                text,
                data,
                area: vec![0; AREA_SIZE as usize],
                release: "6.1.0-53-cloud-amd64".into(),
                paused: false,
                pauses: 0,
                blocked_attempts: Cell::new(0),
                blocked_frame: Cell::new(CMDLINE + 0x20),
                fail_write_at: None,
                writes: 0,
            }
        }
        fn loglevel(&self) -> i32 {
            i32::from_le_bytes(self.data[..4].try_into().unwrap())
        }
        fn site(&self, a: u64) -> [u8; 5] {
            let o = (a - KTEXT) as usize;
            self.text[o..o + 5].try_into().unwrap()
        }
    }

    impl PatchTarget for FakeVm {
        fn kernel_release(&self) -> Result<String, String> {
            Ok(self.release.clone())
        }
        fn kernel_build_id(&self) -> Result<Option<String>, String> {
            Ok(Some("abcd".into()))
        }
        fn function(&self, name: &str, _: Option<u32>) -> Result<FunctionSymbol, String> {
            match name {
                "cmdline_proc_show" => Ok(FunctionSymbol {
                    addr: CMDLINE,
                    size: 0x80,
                    sympos: 1,
                }),
                "meminfo_proc_show" => Ok(FunctionSymbol {
                    addr: MEMINFO,
                    size: 0x80,
                    sympos: 1,
                }),
                _ => Err("not in kallsyms".into()),
            }
        }
        fn symbol(&self, name: &str, _: Option<u32>) -> Result<u64, String> {
            match name {
                "seq_puts" => Ok(KTEXT + 0x3000),
                _ => Err(String::new()),
            }
        }
        fn data_symbol(&self, name: &str, _: Option<u32>) -> Result<u64, String> {
            match name {
                "console_loglevel" => Ok(KDATA),
                "cmdline_proc_show" => Err("cmdline_proc_show is not a variable (type T)".into()),
                _ => Err(String::new()),
            }
        }
        fn patch_area(&self) -> (u64, u64) {
            (AREA, AREA_SIZE)
        }
        fn load_patch(&mut self, p: &LinkedPatch) -> Result<(), String> {
            for (addr, img) in [
                (p.text_addr, &p.text),
                (p.rodata_addr, &p.rodata),
                (p.data_addr, &p.data),
            ] {
                let o = (addr - AREA) as usize;
                self.area[o..o + img.len()].copy_from_slice(img);
            }
            Ok(())
        }
        fn clear_patch_memory(&mut self, m: PatchMemory) -> Result<(), String> {
            let o = (m.base - AREA) as usize;
            self.area[o..o + m.size as usize].fill(0);
            Ok(())
        }
        fn pause(&mut self) -> Result<(), String> {
            assert!(!self.paused);
            self.paused = true;
            self.pauses += 1;
            Ok(())
        }
        fn resume(&mut self) -> Result<(), String> {
            assert!(self.paused);
            self.paused = false;
            Ok(())
        }
        fn vcpu_rips(&mut self) -> Result<Vec<u64>, String> {
            assert!(self.paused);
            Ok(vec![KTEXT + 0x9000, KTEXT + 0x9100])
        }
        fn symbolize(&mut self, addr: u64) -> String {
            assert!(self.paused);
            if addr == self.blocked_frame.get() {
                "cmdline_proc_show+0x20".into()
            } else {
                format!("{addr:#x}")
            }
        }
        fn task_stacks(&mut self) -> Result<Vec<TaskStack>, String> {
            assert!(self.paused);
            let inside = self.blocked_attempts.get() > 0;
            if inside {
                self.blocked_attempts.set(self.blocked_attempts.get() - 1);
            }
            let frame = if inside {
                self.blocked_frame.get()
            } else {
                KTEXT + 0x8000
            };
            Ok(vec![TaskStack {
                pid: 42,
                comm: "cat".into(),
                frames: vec![frame],
                reliable: true,
                words: vec![],
            }])
        }
        fn read_kernel(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
            if addr >= KDATA {
                let o = (addr - KDATA) as usize;
                buf.copy_from_slice(&self.data[o..o + buf.len()]);
                return Ok(());
            }
            let o = (addr - KTEXT) as usize;
            buf.copy_from_slice(&self.text[o..o + buf.len()]);
            Ok(())
        }
        fn write_kernel_data(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
            assert!(self.paused, "data written while the guest runs");
            self.writes += 1;
            if Some(self.writes) == self.fail_write_at {
                return Err("injected failure".into());
            }
            let o = (addr - KDATA) as usize;
            self.data[o..o + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }
        fn write_kernel_text(&mut self, addr: u64, bytes: &[u8]) -> Result<(), String> {
            assert!(self.paused, "text written while the guest runs");
            self.writes += 1;
            if Some(self.writes) == self.fail_write_at {
                return Err("injected failure".into());
            }
            let o = (addr - KTEXT) as usize;
            self.text[o..o + bytes.len()].copy_from_slice(bytes);
            Ok(())
        }
    }

    fn bundle(name: &str, funcs: &[&str]) -> Bundle {
        let mut src = String::from("extern void seq_puts(void *m, const char *s);\n");
        for f in funcs {
            src.push_str(&format!(
                "int new_{f}(void *m, void *v) {{ seq_puts(m, \"this has been live patched\\n\"); return 0; }}\n"
            ));
        }
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("patcher-tr-{}-{name}-{seq}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("p.c"), src).unwrap();
        let ok = std::process::Command::new("cc")
            .args([
                "-c",
                "-O2",
                "-fno-pic",
                "-mcmodel=kernel",
                "-mfentry",
                "-pg",
                "-o",
            ])
            .arg(dir.join("p.o"))
            .arg(dir.join("p.c"))
            .status()
            .expect("these tests need a C compiler (cc)")
            .success();
        assert!(ok);
        let object = std::fs::read(dir.join("p.o")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        Bundle {
            manifest: Manifest {
                name: name.into(),
                version: 1,
                sticky: false,
                target: Target {
                    release: "6.1.0-53-cloud-amd64".into(),
                    build_id: Some("ABCD".into()),
                },
                replace: false,
                functions: funcs
                    .iter()
                    .map(|f| Replacement {
                        old: f.to_string(),
                        sympos: None,
                        new: format!("new_{f}"),
                    })
                    .collect(),
                states: vec![],
                symbols: vec![],
            },
            object,
        }
    }

    fn quick() -> Options {
        Options {
            deadline: Duration::from_millis(300),
            backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            ..Options::default()
        }
    }

    #[test]
    fn applies_and_disables_leaving_the_text_as_it_was() {
        let mut vm = FakeVm::new();
        let original = vm.text.clone();
        let mut ledger = Ledger::new();
        let b = bundle("cmdline", &["cmdline_proc_show"]);
        let linked = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap();
        let (new, _) = linked.functions["new_cmdline_proc_show"];
        assert_eq!(vm.site(CMDLINE), jmp_rel32(CMDLINE, new).unwrap());
        assert_eq!(&vm.area[..5], &NOP5, "patch code loaded, fentry NOPed");
        disable(&mut vm, &mut ledger, "cmdline", &quick(), &|| false).unwrap();
        assert_eq!(vm.text, original);
        let log: Vec<&str> = ledger.events().iter().map(|e| e.what.as_str()).collect();
        // The kernel's transcript (functions.sh), plus the host's per-attempt line.
        assert_eq!(log.len(), 12, "{log:?}");
        assert_eq!(
            &log[..4],
            [
                "enabling patch",
                "initializing patching transition",
                "starting patching transition",
                "completing patching transition"
            ]
        );
        assert!(
            log[4].starts_with("attempt 1: vCPUs stopped for "),
            "{log:?}"
        );
        assert!(
            log[4].contains(" us, 1 task stacks checked (pause "),
            "{log:?}"
        );
        assert!(log[4].ends_with(" us)"), "{log:?}");
        assert_eq!(
            &log[5..9],
            [
                "patching complete",
                "initializing unpatching transition",
                "starting unpatching transition",
                "completing unpatching transition",
            ]
        );
        assert!(log[9].starts_with("attempt 1: "), "{log:?}");
        assert_eq!(log[10], "unpatching complete");
        // Its memory in the patch area is free again, and zeroed.
        assert_eq!(
            log[11],
            format!("patch memory released (8 KiB at {AREA:#x})")
        );
        assert!(vm.area.iter().all(|&b| b == 0));
        assert!(ledger.memory_in_use().is_empty());
        let times: Vec<u64> = ledger.events().iter().map(|e| e.time_us).collect();
        assert!(times[0] > 1_600_000_000_000_000, "wall-clock timestamps");
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    }

    fn with_state(mut b: Bundle, id: u64, version: u32, value: Option<i128>) -> Bundle {
        b.manifest.replace = true;
        b.manifest.states.push(crate::manifest::State {
            id,
            version,
            actions: value
                .map(|value| crate::manifest::StateAction {
                    symbol: "console_loglevel".into(),
                    sympos: None,
                    size: 4,
                    value,
                })
                .into_iter()
                .collect(),
        });
        b
    }

    fn whats(ledger: &Ledger, bundle: &str) -> Vec<String> {
        ledger
            .events()
            .iter()
            .filter(|e| e.bundle == bundle && !e.what.starts_with("attempt "))
            .map(|e| e.what.clone())
            .collect()
    }

    /// The kernel's test-state.sh, translated: the callbacks of test_klp_state and
    /// test_klp_state2 are state actions on console_loglevel.
    #[test]
    fn state_actions_run_in_the_kernel_order_and_are_taken_over() {
        let mut vm = FakeVm::new();
        let mut ledger = Ledger::new();
        // ST-1: set up, then released.
        let st1 = with_state(bundle("state", &["cmdline_proc_show"]), 1, 1, Some(15));
        apply(&mut vm, &mut ledger, &st1, "d", &quick(), &|| false).unwrap();
        assert_eq!(vm.loglevel(), 15);
        assert_eq!(
            whats(&ledger, "state"),
            [
                "enabling patch",
                "initializing patching transition",
                "pre-patch: state 1: setting up (version 1)",
                "pre-patch: state 1: saved console_loglevel = 7",
                "starting patching transition",
                "completing patching transition",
                "post-patch: state 1: console_loglevel = 15 (was 7)",
                "patching complete",
            ]
        );
        // ST-2: a cumulative v2 takes the change over; the replaced bundle runs nothing.
        let mut st2 = with_state(bundle("state2", &["cmdline_proc_show"]), 1, 2, Some(15));
        st2.manifest.version = 2;
        apply(&mut vm, &mut ledger, &st2, "d", &quick(), &|| false).unwrap();
        assert_eq!(vm.loglevel(), 15);
        assert!(whats(&ledger, "state2").contains(
            &"pre-patch: state 1: taking over from state (version 1 to 2); saved values kept"
                .into()
        ));
        let retired = whats(&ledger, "state");
        assert_eq!(retired[retired.len() - 2], "replaced by state2");
        assert!(retired[retired.len() - 1].starts_with("patch memory released"));
        let rec: Vec<_> = ledger.states().collect();
        assert_eq!(rec.len(), 1);
        assert_eq!(
            (rec[0].version, rec[0].holders.clone()),
            (2, vec!["state2".to_string()])
        );
        assert_eq!(rec[0].saved[0].original, 7i32.to_le_bytes());
        assert_eq!(rec[0].taken_over_from.as_deref(), Some("state"));
        // ST-4: the v1 cumulative bundle is now incompatible (even with the patch-version
        // downgrade allowed); nothing changes.
        let (text, data) = (vm.text.clone(), vm.data.clone());
        let downgrade = Options {
            allow_downgrade: true,
            ..quick()
        };
        let err = apply(&mut vm, &mut ledger, &st1, "d", &downgrade, &|| false).unwrap_err();
        assert!(
            err.to_string()
                .contains("not compatible with the already installed livepatches"),
            "{err}"
        );
        assert!(vm.text == text && vm.data == data);
        // Disabling restores the original saved by the first bundle and releases the state.
        disable(&mut vm, &mut ledger, "state2", &quick(), &|| false).unwrap();
        assert_eq!(vm.loglevel(), 7);
        assert_eq!(ledger.states().count(), 0);
        let tail: Vec<String> = whats(&ledger, "state2").into_iter().rev().take(7).collect();
        assert_eq!(
            tail.into_iter().rev().collect::<Vec<_>>(),
            [
                "initializing unpatching transition",
                "pre-unpatch: state 1: console_loglevel restored to 7 (was 15)",
                "starting unpatching transition",
                "completing unpatching transition",
                "post-unpatch: state 1: released",
                "unpatching complete",
                // Placed after the first bundle, which was still loaded then.
                &format!("patch memory released (8 KiB at {:#x})", AREA + 0x2000),
            ]
        );
    }

    #[test]
    fn a_failed_state_write_undoes_the_sites_too() {
        let mut vm = FakeVm::new();
        // Write 1 is the site, write 2 the variable.
        vm.fail_write_at = Some(2);
        let (text, data) = (vm.text.clone(), vm.data.clone());
        let mut ledger = Ledger::new();
        let b = with_state(bundle("s", &["cmdline_proc_show"]), 1, 1, Some(15));
        let err = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap_err();
        assert!(err.to_string().contains("console_loglevel"), "{err}");
        assert!(vm.text == text && vm.data == data);
        assert_eq!(ledger.states().count(), 0);
    }

    #[test]
    fn a_state_action_on_a_function_is_refused() {
        let mut vm = FakeVm::new();
        let mut ledger = Ledger::new();
        let mut b = with_state(bundle("s", &["cmdline_proc_show"]), 1, 1, Some(1));
        b.manifest.states[0].actions[0].symbol = "cmdline_proc_show".into();
        let err = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap_err();
        assert!(err.to_string().contains("not a variable"), "{err}");
        assert_eq!(vm.pauses, 0);
    }

    #[test]
    fn waits_for_a_blocking_task_then_completes() {
        let mut vm = FakeVm::new();
        vm.blocked_attempts.set(2);
        let mut ledger = Ledger::new();
        let b = bundle("cmdline", &["cmdline_proc_show"]);
        apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap();
        assert_eq!(vm.pauses, 3);
        assert!(ledger.events().iter().any(|e| e.what.contains(
            "blocked by: pid 42 (cat) is inside cmdline_proc_show: cmdline_proc_show+0x20"
        )));
    }

    #[test]
    fn a_deadline_leaves_text_and_patch_area_unchanged() {
        let mut vm = FakeVm::new();
        vm.blocked_attempts.set(usize::MAX);
        let (text, area) = (vm.text.clone(), vm.area.clone());
        let mut ledger = Ledger::new();
        let b = bundle("cmdline", &["cmdline_proc_show"]);
        let err = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap_err();
        assert!(
            err.to_string().contains("blocked by: pid 42 (cat)"),
            "{err}"
        );
        assert_eq!((vm.text == text, vm.area == area), (true, true));
        assert!(ledger.bundles().is_empty());
        // --force writes anyway and says so.
        let forced = Options {
            force: true,
            ..quick()
        };
        apply(&mut vm, &mut ledger, &b, "d", &forced, &|| false).unwrap();
        assert!(ledger.bundles()[0].forced);
    }

    #[test]
    fn a_transition_in_progress_can_be_reversed_between_attempts() {
        let mut vm = FakeVm::new();
        vm.blocked_attempts.set(usize::MAX);
        let (text, area) = (vm.text.clone(), vm.area.clone());
        let mut ledger = Ledger::new();
        let b = bundle("cmdline", &["cmdline_proc_show"]);
        let mut flight = begin_apply(&mut vm, &mut ledger, &b, "d", &quick()).unwrap();
        assert!(flight.is_apply() && flight.bundle() == "cmdline");
        // Loaded, not redirected; blocked twice, backing off.
        assert_ne!(vm.area, area);
        let waits: Vec<Duration> = (0..2)
            .map(|_| match flight.attempt(&mut vm, &mut ledger).unwrap() {
                Progress::RetryIn(w) => w,
                Progress::Done(c) => panic!("{c:?}"),
            })
            .collect();
        assert!(waits[1] > waits[0], "{waits:?}");
        assert_eq!(flight.attempts(), 2);
        assert_eq!(vm.text, text);
        flight.reverse(&mut vm, &mut ledger);
        assert_eq!((vm.text == text, vm.area == area), (true, true));
        assert!(ledger.bundles().is_empty());
        let log = whats(&ledger, "cmdline");
        assert_eq!(
            &log[log.len() - 2..],
            [
                "reversing transition from patching to unpatching",
                "unpatching complete (nothing had been written)"
            ]
        );
        // Nothing of it is left: it applies again once the blocker is gone.
        vm.blocked_attempts.set(0);
        let mut flight = begin_apply(&mut vm, &mut ledger, &b, "d", &quick()).unwrap();
        assert!(matches!(
            flight.attempt(&mut vm, &mut ledger).unwrap(),
            Progress::Done(Completed::Applied(_))
        ));
        assert_eq!(
            ledger.bundles()[0].status,
            crate::ledger::BundleStatus::Enabled
        );
    }

    #[test]
    fn an_unpatching_transition_can_be_reversed_too() {
        let mut vm = FakeVm::new();
        let mut ledger = Ledger::new();
        let b = bundle("cmdline", &["cmdline_proc_show"]);
        let linked = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap();
        let (text, area) = (vm.text.clone(), vm.area.clone());
        // A task sleeps in the new code.
        let (new, _) = linked.functions["new_cmdline_proc_show"];
        vm.blocked_frame.set(new + 0x10);
        vm.blocked_attempts.set(usize::MAX);
        let mut flight = begin_disable(&mut vm, &mut ledger, "cmdline", &quick()).unwrap();
        assert!(!flight.is_apply());
        assert!(matches!(
            flight.attempt(&mut vm, &mut ledger).unwrap(),
            Progress::RetryIn(_)
        ));
        flight.reverse(&mut vm, &mut ledger);
        // Still patched, its code still loaded.
        assert_eq!((vm.text == text, vm.area == area), (true, true));
        assert_eq!(vm.site(CMDLINE), jmp_rel32(CMDLINE, new).unwrap());
        assert_eq!(
            ledger.bundles()[0].status,
            crate::ledger::BundleStatus::Enabled
        );
        let log = whats(&ledger, "cmdline");
        assert_eq!(
            &log[log.len() - 2..],
            [
                "reversing transition from unpatching to patching",
                "patching complete (nothing had been written)"
            ]
        );
    }

    #[test]
    fn a_failed_write_restores_every_site() {
        let mut vm = FakeVm::new();
        vm.fail_write_at = Some(2);
        let (text, area) = (vm.text.clone(), vm.area.clone());
        let mut ledger = Ledger::new();
        let b = bundle("two", &["cmdline_proc_show", "meminfo_proc_show"]);
        let err = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap_err();
        assert!(matches!(err, TransitionError::WriteFailed { .. }), "{err}");
        assert!(vm.text == text && vm.area == area);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut vm = FakeVm::new();
        let (text, area) = (vm.text.clone(), vm.area.clone());
        let mut ledger = Ledger::new();
        vm.release = "6.1.0-1-amd64".into();
        let err = apply(
            &mut vm,
            &mut ledger,
            &bundle("a", &["cmdline_proc_show"]),
            "d",
            &quick(),
            &|| false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("the guest runs 6.1.0-1-amd64"),
            "{err}"
        );
        vm.release = "6.1.0-53-cloud-amd64".into();
        let err = apply(
            &mut vm,
            &mut ledger,
            &bundle("b", &["no_such_function"]),
            "d",
            &quick(),
            &|| false,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("cannot resolve no_such_function"),
            "{err}"
        );
        assert!(vm.text == text && vm.area == area && vm.pauses == 0);
        let b = bundle("c", &["cmdline_proc_show"]);
        apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap();
        let err = apply(&mut vm, &mut ledger, &b, "d", &quick(), &|| false).unwrap_err();
        assert!(err.to_string().contains("already applied"), "{err}");
        assert!(ledger
            .events()
            .iter()
            .any(|e| e.what.starts_with("rejected: ")));
    }
}
