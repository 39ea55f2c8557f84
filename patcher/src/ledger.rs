//! The ledger: which bundles are applied, in what order, which function each patched
//! site currently runs, and an ordered log of everything that happened. It plans
//! transitions (the site writes and the code ranges a consistency check must clear) and
//! records them once the VMM has carried them out. Semantics follow the kernel's
//! livepatch: stacked patches, per-function stacks, atomic replace (cumulative bundles)
//! and system-state compatibility.

use std::collections::BTreeMap;

use crate::linker::PatchCode;
use crate::manifest::{Manifest, State};
use crate::redirect::{self, RedirectError, SiteWrite, SITE_LEN};
use crate::system_state::{self, ReadData, ResolvedAction, StatePlan, StateRecord};

/// Why a transition cannot be planned.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("bundle {0} is already applied")]
    AlreadyApplied(String),
    #[error("bundle {0} is not applied")]
    NotApplied(String),
    #[error(
        "bundle {bundle} is not on top of the stack for {func}: disable {top} first \
         (a bundle below another that patches the same function cannot go first)"
    )]
    NotOnTop {
        bundle: String,
        func: String,
        top: String,
    },
    #[error("bundle {bundle} is not compatible with the already installed livepatches: state {id} {why}")]
    IncompatibleState {
        bundle: String,
        id: u64,
        why: &'static str,
    },
    #[error(
        "bundle {bundle} version {version} is not newer than the applied {newest} version \
         {newest_version}; allow a downgrade explicitly to apply it"
    )]
    Downgrade {
        bundle: String,
        version: u32,
        newest: String,
        newest_version: u32,
    },
    #[error("bundle {0} is sticky: it cannot be disabled, only superseded by a cumulative bundle")]
    Sticky(String),
    #[error("{0}")]
    Site(#[from] RedirectError),
    #[error("bundle {bundle} replaces {func} twice")]
    DuplicateSite { bundle: String, func: String },
    #[error("bundle {bundle}: state variable {detail}")]
    StateData { bundle: String, detail: String },
}

/// A replacement resolved against the running kernel and the loaded patch code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFunction {
    pub old: String,
    pub sympos: u32,
    /// Entry (fentry site) and size of the old function.
    pub site: u64,
    pub size: u64,
    /// Address and size of the new function in the patch area.
    pub new_addr: u64,
    pub new_size: u64,
}

/// Lifecycle of an applied bundle, as `/sys/kernel/livepatch` would show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleStatus {
    Enabled,
    Disabled,
    Replaced { by: String },
}

/// A bundle in the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BundleRecord {
    pub name: String,
    pub version: u32,
    pub replace: bool,
    pub digest: String,
    pub states: Vec<(u64, u32)>,
    pub functions: Vec<FunctionRecord>,
    pub status: BundleStatus,
    pub forced: bool,
    #[serde(default)]
    pub sticky: bool,
    /// Position in the stack of enabled bundles when applied (1-based).
    pub stack_order: usize,
    /// The bundle's state actions, resolved (what it writes while it holds a state).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<ResolvedAction>,
    /// Where its code and data sit in the patch area; `None` once released.
    #[serde(default)]
    pub memory: Option<PatchMemory>,
    /// A forced transition ran while it was applied, so a task may still be in its code:
    /// its memory is never released (the kernel keeps a forced patch's module loaded).
    #[serde(default)]
    pub pinned: bool,
    /// Its code as an unwinder sees it (text range, ORC rows, functions), while its memory
    /// is held.
    #[serde(default)]
    pub code: Option<PatchCode>,
}

/// A bundle's linked images in the patch area: `size` bytes from `base`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PatchMemory {
    pub base: u64,
    pub size: u64,
}

impl PatchMemory {
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// One function of a bundle.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionRecord {
    pub old: String,
    pub sympos: u32,
    pub site: u64,
    pub size: u64,
    pub new_addr: u64,
    pub new_size: u64,
}

/// An entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    pub seq: u64,
    /// Wall-clock time, microseconds since the Unix epoch.
    #[serde(default)]
    pub time_us: u64,
    pub bundle: String,
    pub what: String,
}

/// What a transition changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub bundle: String,
    pub kind: TransitionKind,
    /// Site writes, all done in one stop-the-world window.
    pub writes: Vec<SiteWrite>,
    /// Code no vCPU and no task stack may be inside while the writes happen:
    /// `(start, end, name)`.
    pub busy_ranges: Vec<(u64, u64, String)>,
    /// Bundles that an atomic replace retires.
    pub replaces: Vec<String>,
    /// System-state actions of the transition.
    pub states: StatePlan,
    /// The applied bundle's resolved state actions (empty for a disable).
    pub actions: Vec<ResolvedAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransitionKind {
    Apply,
    Disable,
}

/// Per-site state: the original bytes and the stack of (bundle, new function).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Site {
    func: String,
    size: u64,
    original: [u8; SITE_LEN],
    stack: Vec<(String, u64, u64)>,
}

/// The ledger of one VM. It is saved in snapshots, so a restored VM knows exactly what
/// its guest kernel has applied.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ledger {
    bundles: Vec<BundleRecord>,
    sites: BTreeMap<u64, Site>,
    events: Vec<Event>,
    next_seq: u64,
    /// System states in force, by id.
    #[serde(default)]
    states: BTreeMap<u64, StateRecord>,
    /// Patch memory held by no bundle record but never to be reused: pinned memory of a
    /// record that was dropped, or an older snapshot's area without per-bundle records.
    #[serde(default)]
    reserved: Vec<PatchMemory>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every bundle ever applied, in order.
    pub fn bundles(&self) -> &[BundleRecord] {
        &self.bundles
    }

    /// The event log.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    /// System states in force.
    pub fn states(&self) -> impl Iterator<Item = &StateRecord> {
        self.states.values()
    }

    /// Patch memory in use: every bundle's that is not released, and the reserved ranges.
    pub fn memory_in_use(&self) -> Vec<PatchMemory> {
        let mut used: Vec<PatchMemory> = self
            .bundles
            .iter()
            .filter_map(|b| b.memory)
            .chain(self.reserved.iter().copied())
            .collect();
        used.sort_by_key(|m| m.base);
        used
    }

    /// First fit for `size` bytes (page-granular) in the patch area `(base, size)`.
    pub fn place(&self, area: (u64, u64), size: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        let size = size.max(1).checked_next_multiple_of(PAGE)?;
        let (area_base, area_size) = area;
        let area_end = area_base.checked_add(area_size)?;
        let mut at = area_base.checked_next_multiple_of(PAGE)?;
        for used in self.memory_in_use() {
            if used.base >= at.checked_add(size)? {
                break;
            }
            at = at.max(used.end().checked_next_multiple_of(PAGE)?);
        }
        (at.checked_add(size)? <= area_end).then_some(at)
    }

    /// Keeps `memory` out of every future placement (see `reserved`).
    pub fn reserve(&mut self, memory: PatchMemory) {
        if memory.size > 0 {
            self.reserved.push(memory);
        }
    }

    /// Records the code of the applied bundle `name` (see [`Ledger::patch_code`]).
    pub fn set_code(&mut self, name: &str, code: PatchCode) {
        if let Some(b) = self
            .bundles
            .iter_mut()
            .rev()
            .find(|b| b.name == name && b.memory.is_some())
        {
            b.code = Some(code);
        }
    }

    /// The code of every bundle whose memory is held (applied, or disabled but pinned):
    /// code a task may be running or sleeping in. (bundle name, code).
    pub fn patch_code(&self) -> impl Iterator<Item = (&str, &PatchCode)> {
        self.bundles
            .iter()
            .filter(|b| b.memory.is_some())
            .filter_map(|b| Some((b.name.as_str(), b.code.as_ref()?)))
    }

    /// Releases the memory of bundle records that no longer run, unless pinned, and
    /// logs it. Returns what was released, for the caller to clear.
    fn release_retired(&mut self, names: &[String]) -> Vec<PatchMemory> {
        let mut released = Vec::new();
        let mut notes = Vec::new();
        for b in self
            .bundles
            .iter_mut()
            .filter(|b| names.contains(&b.name) && b.status != BundleStatus::Enabled)
        {
            let Some(m) = b.memory else { continue };
            if b.pinned {
                notes.push((
                    b.name.clone(),
                    format!(
                        "patch memory kept ({} KiB at {:#x}): a forced transition may have left \
                         tasks in it",
                        m.size / 1024,
                        m.base
                    ),
                ));
                continue;
            }
            b.memory = None;
            b.code = None;
            released.push(m);
            notes.push((
                b.name.clone(),
                format!(
                    "patch memory released ({} KiB at {:#x})",
                    m.size / 1024,
                    m.base
                ),
            ));
        }
        for (name, what) in notes {
            self.log(&name, what);
        }
        released
    }

    fn enabled(&self) -> impl Iterator<Item = &BundleRecord> {
        self.bundles
            .iter()
            .filter(|b| b.status == BundleStatus::Enabled)
    }

    /// Appends to the event log.
    pub fn log(&mut self, bundle: &str, what: impl Into<String>) {
        self.next_seq += 1;
        let time_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        self.events.push(Event {
            seq: self.next_seq,
            time_us,
            bundle: bundle.to_string(),
            what: what.into(),
        });
    }

    /// Patch versions (docs/semantics.md): a cumulative bundle supersedes everything
    /// applied, so it must be newer than every enabled bundle unless `allow_downgrade`.
    /// Returns the downgrade it allowed, for the event log.
    pub fn check_version(
        &self,
        m: &Manifest,
        allow_downgrade: bool,
    ) -> Result<Option<String>, LedgerError> {
        if !m.replace {
            return Ok(None);
        }
        let Some(newest) = self.enabled().max_by_key(|b| b.version) else {
            return Ok(None);
        };
        if m.version > newest.version {
            return Ok(None);
        }
        if !allow_downgrade {
            return Err(LedgerError::Downgrade {
                bundle: m.name.clone(),
                version: m.version,
                newest: newest.name.clone(),
                newest_version: newest.version,
            });
        }
        Ok(Some(format!(
            "downgrade allowed: version {} after {} version {}",
            m.version, newest.name, newest.version
        )))
    }

    /// The kernel's `klp_is_patch_compatible` over the enabled bundles.
    fn check_states(&self, m: &Manifest) -> Result<(), LedgerError> {
        for b in self.enabled() {
            for &(id, version) in &b.states {
                match m.states.iter().find(|s| s.id == id) {
                    None if m.replace => return Err(LedgerError::IncompatibleState {
                        bundle: m.name.clone(),
                        id,
                        why: "is set up by an applied bundle and a cumulative bundle must carry it",
                    }),
                    None => {}
                    Some(State { version: v, .. }) if *v < version => {
                        return Err(LedgerError::IncompatibleState {
                            bundle: m.name.clone(),
                            id,
                            why: "has a lower version than in an applied bundle",
                        })
                    }
                    Some(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Plans applying a bundle whose functions are resolved and whose states carry no
    /// actions; `current(site)` reads the 5 bytes now at a site.
    pub fn plan_apply(
        &self,
        manifest: &Manifest,
        functions: &[ResolvedFunction],
        current: impl FnMut(u64) -> [u8; SITE_LEN],
    ) -> Result<Transition, LedgerError> {
        let mut no_data = |addr: u64, _| Err(format!("{addr:#x}: no state actions planned"));
        self.plan_apply_with_actions(manifest, functions, &[], current, &mut no_data)
    }

    /// [`Ledger::plan_apply`] with the bundle's resolved state actions; `read(addr, len)`
    /// reads kernel variables (the originals to save and the values now in force).
    pub fn plan_apply_with_actions(
        &self,
        manifest: &Manifest,
        functions: &[ResolvedFunction],
        actions: &[ResolvedAction],
        mut current: impl FnMut(u64) -> [u8; SITE_LEN],
        read: &mut ReadData<'_>,
    ) -> Result<Transition, LedgerError> {
        if self
            .bundles
            .iter()
            .any(|b| b.name == manifest.name && b.status == BundleStatus::Enabled)
        {
            return Err(LedgerError::AlreadyApplied(manifest.name.clone()));
        }
        self.check_states(manifest)?;
        let mut writes = Vec::new();
        let mut busy = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for f in functions {
            if !seen.insert(f.site) {
                return Err(LedgerError::DuplicateSite {
                    bundle: manifest.name.clone(),
                    func: f.old.clone(),
                });
            }
            let now = current(f.site);
            busy.push((f.site, f.site + f.size, f.old.clone()));
            match self.sites.get(&f.site).and_then(|s| s.stack.last()) {
                Some((owner, from, from_size)) => {
                    writes.push(redirect::plan_retarget(
                        &f.old, f.site, now, *from, f.new_addr,
                    )?);
                    busy.push((*from, from + from_size, format!("{} ({owner})", f.old)));
                }
                None => writes.push(redirect::plan_redirect(
                    &f.old, f.site, f.size, now, f.new_addr,
                )?),
            }
        }
        let mut replaces = Vec::new();
        if manifest.replace {
            // Functions patched only by retired bundles go back to their original code.
            for (site, s) in &self.sites {
                if seen.contains(site) {
                    continue;
                }
                if let Some((owner, to, to_size)) = s.stack.last() {
                    writes.push(redirect::plan_revert(
                        &s.func,
                        *site,
                        current(*site),
                        *to,
                        s.original,
                    )?);
                    busy.push((*to, to + to_size, format!("{} ({owner})", s.func)));
                    busy.push((*site, site + s.size, s.func.clone()));
                }
            }
            replaces = self.enabled().map(|b| b.name.clone()).collect();
            // Their memory is released when the transition completes: nothing may be in it.
            for b in self.enabled() {
                if let Some(m) = b.memory {
                    busy.push((m.base, m.end(), format!("patch memory of {}", b.name)));
                }
            }
        }
        let declared: Vec<(u64, u32)> = manifest.states.iter().map(|s| (s.id, s.version)).collect();
        let states =
            system_state::plan_apply(&self.states, &manifest.name, &declared, actions, read)
                .map_err(|detail| LedgerError::StateData {
                    bundle: manifest.name.clone(),
                    detail,
                })?;
        Ok(Transition {
            bundle: manifest.name.clone(),
            kind: TransitionKind::Apply,
            writes,
            busy_ranges: busy,
            replaces,
            states,
            actions: actions.to_vec(),
        })
    }

    /// Records a completed apply (`forced` when the consistency check was skipped) of a
    /// bundle loaded at `memory` (`None` for a bundle without code or data). Returns the patch memory of the bundles it retired that
    /// is now free: the caller clears it.
    pub fn commit_apply(
        &mut self,
        manifest: &Manifest,
        digest: &str,
        functions: &[ResolvedFunction],
        transition: &Transition,
        memory: Option<PatchMemory>,
        forced: bool,
    ) -> Vec<PatchMemory> {
        let originals: BTreeMap<u64, [u8; SITE_LEN]> = transition
            .writes
            .iter()
            .map(|w| (w.site, w.expected))
            .collect();
        for name in &transition.replaces {
            for b in self
                .bundles
                .iter_mut()
                .filter(|b| &b.name == name && b.status == BundleStatus::Enabled)
            {
                b.status = BundleStatus::Replaced {
                    by: manifest.name.clone(),
                };
            }
            for s in self.sites.values_mut() {
                s.stack.retain(|(owner, ..)| owner != name);
            }
        }
        // Sites the retired bundles alone patched are back to their original code; sites
        // this bundle patches keep their record (and the original bytes in it).
        let patched: std::collections::HashSet<u64> = functions.iter().map(|f| f.site).collect();
        self.sites
            .retain(|site, s| !s.stack.is_empty() || patched.contains(site));
        for f in functions {
            let site = self.sites.entry(f.site).or_insert_with(|| Site {
                func: f.old.clone(),
                size: f.size,
                original: originals.get(&f.site).copied().unwrap_or([0; SITE_LEN]),
                stack: Vec::new(),
            });
            site.stack
                .push((manifest.name.clone(), f.new_addr, f.new_size));
        }
        let order = self.enabled().count() + 1;
        // A forced transition leaves every bundle applied so far pinned (klp_force_transition
        // marks every patch forced).
        if forced {
            for b in self.bundles.iter_mut().filter(|b| b.memory.is_some()) {
                b.pinned = true;
            }
        }
        // An earlier record of the same name is dropped; pinned memory stays reserved.
        let dropped: Vec<PatchMemory> = self
            .bundles
            .iter()
            .filter(|b| b.name == manifest.name && b.status != BundleStatus::Enabled)
            .filter_map(|b| b.memory)
            .collect();
        self.reserved.extend(dropped);
        self.bundles
            .retain(|b| !(b.name == manifest.name && b.status != BundleStatus::Enabled));
        self.bundles.push(BundleRecord {
            name: manifest.name.clone(),
            version: manifest.version,
            sticky: manifest.sticky,
            replace: manifest.replace,
            digest: digest.to_string(),
            states: manifest.states.iter().map(|s| (s.id, s.version)).collect(),
            functions: functions
                .iter()
                .map(|f| FunctionRecord {
                    old: f.old.clone(),
                    sympos: f.sympos,
                    site: f.site,
                    size: f.size,
                    new_addr: f.new_addr,
                    new_size: f.new_size,
                })
                .collect(),
            status: BundleStatus::Enabled,
            forced,
            stack_order: order,
            actions: transition.actions.clone(),
            memory,
            pinned: forced,
            code: None,
        });
        for state in &manifest.states {
            let previous = self
                .states
                .get(&state.id)
                .and_then(|r| r.holders.last().cloned());
            let rec = self.states.entry(state.id).or_insert_with(|| StateRecord {
                id: state.id,
                version: state.version,
                holders: Vec::new(),
                saved: Vec::new(),
                taken_over_from: None,
            });
            rec.version = state.version;
            if manifest.replace {
                rec.holders.clear();
            }
            rec.holders.retain(|h| h != &manifest.name);
            rec.holders.push(manifest.name.clone());
            if previous.is_some() {
                rec.taken_over_from = previous;
            }
            for (id, saved) in &transition.states.saves {
                if *id == state.id && !rec.saved.iter().any(|s| s.addr == saved.addr) {
                    rec.saved.push(saved.clone());
                }
            }
        }
        for name in &transition.replaces {
            self.log(name, format!("replaced by {}", manifest.name));
        }
        self.log(
            &manifest.name,
            if forced {
                "patching complete (forced: consistency check skipped)"
            } else {
                "patching complete"
            },
        );
        self.release_retired(&transition.replaces)
    }

    /// Plans disabling an enabled bundle whose states carry no actions.
    pub fn plan_disable(
        &self,
        name: &str,
        current: impl FnMut(u64) -> [u8; SITE_LEN],
    ) -> Result<Transition, LedgerError> {
        let mut no_data = |addr: u64, _| Err(format!("{addr:#x}: no state actions planned"));
        self.plan_disable_with_actions(name, current, &mut no_data)
    }

    /// Plans disabling an enabled bundle: each of its sites falls back to the previous
    /// bundle's function on that site, or to the original code, and each of its states to
    /// the holder below or to the saved originals; `read` reads kernel variables.
    pub fn plan_disable_with_actions(
        &self,
        name: &str,
        mut current: impl FnMut(u64) -> [u8; SITE_LEN],
        read: &mut ReadData<'_>,
    ) -> Result<Transition, LedgerError> {
        let bundle = self
            .enabled()
            .find(|b| b.name == name)
            .ok_or_else(|| LedgerError::NotApplied(name.to_string()))?;
        if bundle.sticky {
            return Err(LedgerError::Sticky(name.to_string()));
        }
        let mut writes = Vec::new();
        let mut busy = Vec::new();
        for f in &bundle.functions {
            let Some(site) = self.sites.get(&f.site) else {
                continue;
            };
            busy.push((
                f.new_addr,
                f.new_addr + f.new_size,
                format!("{} ({name})", f.old),
            ));
            // The kernel's stacking rule: the most recent bundle for a function runs it, and
            // a bundle can only be taken off a function it is the top of (one that shares no
            // function with later bundles may go in any order).
            match site.stack.last() {
                Some((owner, ..)) if owner == name => {}
                Some((owner, ..)) => {
                    return Err(LedgerError::NotOnTop {
                        bundle: name.to_string(),
                        func: f.old.clone(),
                        top: owner.clone(),
                    })
                }
                None => continue,
            }
            let below = site.stack.iter().rev().nth(1);
            let now = current(f.site);
            writes.push(match below {
                Some((_, to, _)) => redirect::plan_retarget(&f.old, f.site, now, f.new_addr, *to)?,
                None => redirect::plan_revert(&f.old, f.site, now, f.new_addr, site.original)?,
            });
        }
        // Its memory is released when the transition completes: nothing may be in it.
        if let Some(m) = bundle.memory {
            busy.push((m.base, m.end(), format!("patch memory of {name}")));
        }
        let declared: Vec<u64> = bundle.states.iter().map(|s| s.0).collect();
        let actions_of = |holder: &str, id: u64| -> Vec<&ResolvedAction> {
            self.enabled()
                .filter(|b| b.name == holder)
                .flat_map(|b| &b.actions)
                .filter(|a| a.state == id)
                .collect()
        };
        let states = system_state::plan_disable(&self.states, name, &declared, &actions_of, read)
            .map_err(|detail| LedgerError::StateData {
            bundle: name.to_string(),
            detail,
        })?;
        Ok(Transition {
            bundle: name.to_string(),
            kind: TransitionKind::Disable,
            writes,
            busy_ranges: busy,
            replaces: Vec::new(),
            states,
            actions: Vec::new(),
        })
    }

    /// Records a completed disable. Returns the bundle's patch memory when it is now free
    /// (the caller clears it).
    pub fn commit_disable(&mut self, name: &str, forced: bool) -> Vec<PatchMemory> {
        if forced {
            for b in self.bundles.iter_mut().filter(|b| b.memory.is_some()) {
                b.pinned = true;
            }
        }
        for s in self.sites.values_mut() {
            s.stack.retain(|(owner, ..)| owner != name);
        }
        self.sites.retain(|_, s| !s.stack.is_empty());
        for b in self
            .bundles
            .iter_mut()
            .filter(|b| b.name == name && b.status == BundleStatus::Enabled)
        {
            b.status = BundleStatus::Disabled;
            b.forced |= forced;
        }
        for rec in self.states.values_mut() {
            rec.holders.retain(|h| h != name);
        }
        self.states.retain(|_, rec| !rec.holders.is_empty());
        self.log(
            name,
            if forced {
                "unpatching complete (forced)"
            } else {
                "unpatching complete"
            },
        );
        self.release_retired(&[name.to_string()])
    }

    /// The function a site runs now: `None` when it runs its original code.
    pub fn active_target(&self, site: u64) -> Option<(&str, u64)> {
        self.sites
            .get(&site)
            .and_then(|s| s.stack.last())
            .map(|(b, a, _)| (b.as_str(), *a))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::{Replacement, Target};
    use crate::redirect::jmp_rel32;
    use std::collections::HashMap;

    const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
    const CMDLINE: u64 = 0xffff_ffff_8130_0000;
    const MEMINFO: u64 = 0xffff_ffff_8131_0000;

    fn manifest(name: &str, replace: bool, funcs: &[&str], states: &[(u64, u32)]) -> Manifest {
        Manifest {
            name: name.into(),
            version: 1,
            sticky: false,
            target: Target {
                release: "r".into(),
                build_id: None,
            },
            replace,
            functions: funcs
                .iter()
                .map(|f| Replacement {
                    old: f.to_string(),
                    sympos: None,
                    new: format!("new_{f}"),
                })
                .collect(),
            states: states
                .iter()
                .map(|&(id, version)| State {
                    id,
                    version,
                    actions: Vec::new(),
                })
                .collect(),
            symbols: Vec::new(),
        }
    }

    fn resolved(funcs: &[(&str, u64)], area: u64) -> Vec<ResolvedFunction> {
        funcs
            .iter()
            .enumerate()
            .map(|(i, (f, site))| ResolvedFunction {
                old: f.to_string(),
                sympos: 1,
                site: *site,
                size: 0x80,
                new_addr: area + 0x100 * i as u64,
                new_size: 0x40,
            })
            .collect()
    }

    /// A fake kernel text: site -> 5 bytes.
    struct Text(HashMap<u64, [u8; 5]>);
    impl Text {
        fn new() -> Self {
            Text([(CMDLINE, NOP5), (MEMINFO, NOP5)].into_iter().collect())
        }
        fn get(&self, site: u64) -> [u8; 5] {
            self.0[&site]
        }
        fn apply(&mut self, t: &Transition) {
            for w in &t.writes {
                assert_eq!(self.0[&w.site], w.expected);
                self.0.insert(w.site, w.replacement);
            }
        }
    }

    fn apply(l: &mut Ledger, text: &mut Text, m: &Manifest, f: &[ResolvedFunction]) {
        let t = l.plan_apply(m, f, |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_apply(m, "digest", f, &t, Some(mem_of(f)), false);
    }

    /// The page of the patch area the test functions of `f` sit in.
    fn mem_of(f: &[ResolvedFunction]) -> PatchMemory {
        PatchMemory {
            base: f[0].new_addr & !0xfff,
            size: 0x1000,
        }
    }

    #[test]
    fn apply_then_disable_restores_the_original_bytes() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let m = manifest("a", false, &["cmdline_proc_show"], &[]);
        let f = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(&mut l, &mut text, &m, &f);
        assert_eq!(
            text.get(CMDLINE),
            jmp_rel32(CMDLINE, f[0].new_addr).unwrap()
        );
        assert_eq!(
            l.plan_apply(&m, &f, |s| text.get(s)),
            Err(LedgerError::AlreadyApplied("a".into()))
        );
        // Its code, for unwinders, while its memory is held.
        let code = PatchCode {
            text: (f[0].new_addr, f[0].new_addr + 0x40),
            orc: vec![(f[0].new_addr, [8, 0, 0, 0, 5, 0])],
            functions: vec![("new".into(), f[0].new_addr, 0x40)],
        };
        l.set_code("a", code.clone());
        assert_eq!(l.patch_code().collect::<Vec<_>>(), vec![("a", &code)]);
        let t = l.plan_disable("a", |s| text.get(s)).unwrap();
        assert_eq!(t.busy_ranges[0].0, f[0].new_addr);
        text.apply(&t);
        l.commit_disable("a", false);
        assert_eq!(l.patch_code().count(), 0, "released with its memory");
        assert_eq!(text.get(CMDLINE), NOP5);
        assert_eq!(l.bundles()[0].status, BundleStatus::Disabled);
        assert!(matches!(
            l.plan_disable("a", |s| text.get(s)),
            Err(LedgerError::NotApplied(_))
        ));
        let log: Vec<&str> = l.events().iter().map(|e| e.what.as_str()).collect();
        assert_eq!(
            log,
            [
                "patching complete",
                "unpatching complete",
                "patch memory released (4 KiB at 0xffffffffc0000000)"
            ]
        );
    }

    #[test]
    fn stacked_bundles_fall_back_per_function() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let m1 = manifest("one", false, &["cmdline_proc_show"], &[]);
        let f1 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(&mut l, &mut text, &m1, &f1);
        let m2 = manifest(
            "two",
            false,
            &["cmdline_proc_show", "meminfo_proc_show"],
            &[],
        );
        let f2 = resolved(
            &[
                ("cmdline_proc_show", CMDLINE),
                ("meminfo_proc_show", MEMINFO),
            ],
            0xffff_ffff_c001_0000,
        );
        let t2 = l.plan_apply(&m2, &f2, |s| text.get(s)).unwrap();
        // Taking over from bundle one makes its new code busy too.
        assert!(t2.busy_ranges.iter().any(|r| r.0 == f1[0].new_addr));
        text.apply(&t2);
        l.commit_apply(&m2, "d2", &f2, &t2, Some(mem_of(&f2)), false);
        assert_eq!(l.active_target(CMDLINE), Some(("two", f2[0].new_addr)));
        // The first is below the second for cmdline_proc_show: it cannot go first.
        assert_eq!(
            l.plan_disable("one", |s| text.get(s)).unwrap_err(),
            LedgerError::NotOnTop {
                bundle: "one".into(),
                func: "cmdline_proc_show".into(),
                top: "two".into(),
            }
        );
        // Disabling the second hands cmdline_proc_show back to the first and reverts
        // meminfo_proc_show; then the first goes too.
        let t = l.plan_disable("two", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("two", false);
        assert_eq!(l.active_target(CMDLINE), Some(("one", f1[0].new_addr)));
        assert_eq!(text.get(MEMINFO), NOP5);
        let t = l.plan_disable("one", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("one", false);
        assert_eq!((text.get(CMDLINE), text.get(MEMINFO)), (NOP5, NOP5));
    }

    #[test]
    fn disabling_the_top_falls_back_to_the_bundle_below() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let f1 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &f1,
        );
        let f2 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c001_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("two", false, &["cmdline_proc_show"], &[]),
            &f2,
        );
        let t = l.plan_disable("two", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("two", false);
        assert_eq!(
            text.get(CMDLINE),
            jmp_rel32(CMDLINE, f1[0].new_addr).unwrap()
        );
    }

    #[test]
    fn atomic_replace_reverts_what_it_does_not_carry() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let f1 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &f1,
        );
        let m = manifest("cumulative", true, &["meminfo_proc_show"], &[]);
        let f = resolved(&[("meminfo_proc_show", MEMINFO)], 0xffff_ffff_c002_0000);
        let t = l.plan_apply(&m, &f, |s| text.get(s)).unwrap();
        assert_eq!(t.replaces, vec!["one".to_string()]);
        text.apply(&t);
        l.commit_apply(&m, "d", &f, &t, Some(mem_of(&f)), false);
        assert_eq!(text.get(CMDLINE), NOP5);
        assert_eq!(
            text.get(MEMINFO),
            jmp_rel32(MEMINFO, f[0].new_addr).unwrap()
        );
        assert_eq!(
            l.bundles()[0].status,
            BundleStatus::Replaced {
                by: "cumulative".into()
            }
        );
        // Disabling the replacer leaves nothing patched (no fallback to replaced bundles).
        let t = l.plan_disable("cumulative", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("cumulative", false);
        assert_eq!((text.get(CMDLINE), text.get(MEMINFO)), (NOP5, NOP5));
    }

    #[test]
    fn a_replace_of_the_same_function_keeps_the_true_original() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let f1 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("v1", false, &["cmdline_proc_show"], &[]),
            &f1,
        );
        let f2 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c001_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("v2", true, &["cmdline_proc_show"], &[]),
            &f2,
        );
        assert_eq!(
            text.get(CMDLINE),
            jmp_rel32(CMDLINE, f2[0].new_addr).unwrap()
        );
        let t = l.plan_disable("v2", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("v2", false);
        assert_eq!(text.get(CMDLINE), NOP5);
    }

    #[test]
    fn cumulative_versions_only_go_up_unless_a_downgrade_is_allowed() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let f = |area| resolved(&[("cmdline_proc_show", CMDLINE)], area);
        let cum = |v: u32| {
            let mut m = manifest(&format!("cum-v{v}"), true, &["cmdline_proc_show"], &[]);
            m.version = v;
            m
        };
        for (v, area) in [(1, 0xffff_ffff_c000_0000), (2, 0xffff_ffff_c001_0000)] {
            assert_eq!(l.check_version(&cum(v), false), Ok(None));
            apply(&mut l, &mut text, &cum(v), &f(area));
        }
        // v3 after v2: an upgrade.
        assert_eq!(l.check_version(&cum(3), false), Ok(None));
        // v2 again, or v1: refused without the flag, naming what is applied.
        for v in [1, 2] {
            assert_eq!(
                l.check_version(&cum(v), false),
                Err(LedgerError::Downgrade {
                    bundle: format!("cum-v{v}"),
                    version: v,
                    newest: "cum-v2".into(),
                    newest_version: 2,
                })
            );
        }
        let allowed = l.check_version(&cum(1), true).unwrap().unwrap();
        assert!(allowed.contains("downgrade allowed: version 1 after cum-v2 version 2"));
        // Non-cumulative bundles stack by name; their versions are not ordered.
        assert_eq!(
            l.check_version(
                &manifest("other", false, &["meminfo_proc_show"], &[]),
                false
            ),
            Ok(None)
        );
    }

    #[test]
    fn a_sticky_bundle_is_only_superseded() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let mut sticky = manifest("sticky", true, &["cmdline_proc_show"], &[]);
        sticky.sticky = true;
        apply(
            &mut l,
            &mut text,
            &sticky,
            &resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000),
        );
        assert_eq!(
            l.plan_disable("sticky", |s| text.get(s)).unwrap_err(),
            LedgerError::Sticky("sticky".into())
        );
        assert!(l.bundles()[0].sticky);
        // A cumulative follow-up supersedes it and, not being sticky itself, can go.
        let mut next = manifest("next", true, &["cmdline_proc_show"], &[]);
        next.version = 2;
        apply(
            &mut l,
            &mut text,
            &next,
            &resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c001_0000),
        );
        assert!(matches!(
            l.bundles()[0].status,
            BundleStatus::Replaced { .. }
        ));
        let t = l.plan_disable("next", |s| text.get(s)).unwrap();
        text.apply(&t);
        l.commit_disable("next", false);
        assert_eq!(text.get(CMDLINE), NOP5);
    }

    #[test]
    fn state_versions_follow_klp_rules() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let f1 = resolved(&[("cmdline_proc_show", CMDLINE)], 0xffff_ffff_c000_0000);
        apply(
            &mut l,
            &mut text,
            &manifest("s2", false, &["cmdline_proc_show"], &[(7, 2)]),
            &f1,
        );
        let f = resolved(&[("meminfo_proc_show", MEMINFO)], 0xffff_ffff_c003_0000);
        let lower = manifest("low", false, &["meminfo_proc_show"], &[(7, 1)]);
        assert!(matches!(
            l.plan_apply(&lower, &f, |s| text.get(s)),
            Err(LedgerError::IncompatibleState { id: 7, .. })
        ));
        let cumulative_without = manifest("cum", true, &["meminfo_proc_show"], &[]);
        assert!(matches!(
            l.plan_apply(&cumulative_without, &f, |s| text.get(s)),
            Err(LedgerError::IncompatibleState { id: 7, .. })
        ));
        let plain_without = manifest("plain", false, &["meminfo_proc_show"], &[]);
        assert!(l.plan_apply(&plain_without, &f, |s| text.get(s)).is_ok());
        let same = manifest("same", true, &["meminfo_proc_show"], &[(7, 2)]);
        assert!(l.plan_apply(&same, &f, |s| text.get(s)).is_ok());
    }

    const AREA: (u64, u64) = (0xffff_ffff_c000_0000, 0x10_0000);

    #[test]
    fn placement_is_first_fit_and_reuses_released_memory() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        assert_eq!(l.place(AREA, 0x1800), Some(AREA.0));
        let one = resolved(&[("cmdline_proc_show", CMDLINE)], AREA.0);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &one,
        );
        // One page in use: the next bundle goes right after it.
        assert_eq!(l.place(AREA, 0x1800), Some(AREA.0 + 0x1000));
        let two = resolved(&[("meminfo_proc_show", MEMINFO)], AREA.0 + 0x1000);
        apply(
            &mut l,
            &mut text,
            &manifest("two", false, &["meminfo_proc_show"], &[]),
            &two,
        );
        // Disabling the first frees its page, which fits a one-page bundle but not two pages.
        let t = l.plan_disable("one", |s| text.get(s)).unwrap();
        assert!(t
            .busy_ranges
            .iter()
            .any(|r| r.0 == AREA.0 && r.1 == AREA.0 + 0x1000));
        text.apply(&t);
        assert_eq!(l.commit_disable("one", false), vec![mem_of(&one)]);
        assert_eq!(l.bundles()[0].memory, None);
        assert_eq!(l.place(AREA, 0x1000), Some(AREA.0));
        assert_eq!(l.place(AREA, 0x2000), Some(AREA.0 + 0x2000));
        // Nothing fits a request larger than what is left of the area.
        assert_eq!(l.place(AREA, AREA.1), None);
        assert!(l
            .events()
            .iter()
            .any(|e| e.bundle == "one" && e.what.starts_with("patch memory released (4 KiB")));
    }

    #[test]
    fn a_replace_checks_and_releases_the_memory_of_what_it_retires() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let one = resolved(&[("cmdline_proc_show", CMDLINE)], AREA.0);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &one,
        );
        let two = resolved(&[("meminfo_proc_show", MEMINFO)], AREA.0 + 0x1000);
        apply(
            &mut l,
            &mut text,
            &manifest("two", false, &["meminfo_proc_show"], &[]),
            &two,
        );
        let m = manifest("cumulative", true, &["meminfo_proc_show"], &[]);
        let f = resolved(&[("meminfo_proc_show", MEMINFO)], AREA.0 + 0x2000);
        let t = l.plan_apply(&m, &f, |s| text.get(s)).unwrap();
        for retired in [AREA.0, AREA.0 + 0x1000] {
            assert!(t
                .busy_ranges
                .iter()
                .any(|r| r.0 == retired && r.1 == retired + 0x1000));
        }
        text.apply(&t);
        let released = l.commit_apply(&m, "d", &f, &t, Some(mem_of(&f)), false);
        assert_eq!(released, vec![mem_of(&one), mem_of(&two)]);
        assert_eq!(l.memory_in_use(), vec![mem_of(&f)]);
        assert_eq!(l.place(AREA, 0x2000), Some(AREA.0));
    }

    #[test]
    fn a_forced_transition_pins_every_bundle_it_saw() {
        let (mut l, mut text) = (Ledger::new(), Text::new());
        let one = resolved(&[("cmdline_proc_show", CMDLINE)], AREA.0);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &one,
        );
        let m = manifest("forced", false, &["meminfo_proc_show"], &[]);
        let f = resolved(&[("meminfo_proc_show", MEMINFO)], AREA.0 + 0x1000);
        let t = l.plan_apply(&m, &f, |s| text.get(s)).unwrap();
        text.apply(&t);
        assert!(l
            .commit_apply(&m, "d", &f, &t, Some(mem_of(&f)), true)
            .is_empty());
        // "one" was applied when the check was skipped: its memory is kept after a disable.
        let t = l.plan_disable("one", |s| text.get(s)).unwrap();
        text.apply(&t);
        assert!(l.commit_disable("one", false).is_empty());
        assert_eq!(l.memory_in_use().len(), 2);
        assert!(l
            .events()
            .iter()
            .any(|e| e.bundle == "one" && e.what.starts_with("patch memory kept")));
        // Re-applying a bundle of the same name drops the old record but not its memory.
        let again = resolved(&[("cmdline_proc_show", CMDLINE)], AREA.0 + 0x2000);
        apply(
            &mut l,
            &mut text,
            &manifest("one", false, &["cmdline_proc_show"], &[]),
            &again,
        );
        assert_eq!(l.memory_in_use().len(), 3);
        assert_eq!(l.place(AREA, 0x1000), Some(AREA.0 + 0x3000));
    }
}
