//! Applying and disabling bundles on the running VM. A transition is driven by the VMM
//! thread's event loop, one attempt (one pause) at a time: between blocked attempts the
//! devices and the API keep working, and a disable of the bundle whose apply is still
//! retrying reverses it, as the kernel allows for a transition in progress.

use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use patcher::bundle::Bundle;
use patcher::transition::{self, Completed, InFlight, Options, Progress};
use serde_json::json;

use super::area::PatchArea;
use super::live::LiveTarget;
use crate::api::routes::ApiResponse;
use crate::builder::RunningVm;

/// Why a patch request failed before or during its transition.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("cannot read bundle {path}: {detail}")]
    Bundle { path: String, detail: String },
    #[error("{0}")]
    Introspect(String),
    #[error("cannot map the patch area: {0}")]
    Area(String),
    #[error("{0}")]
    Transition(#[from] transition::TransitionError),
    #[error("the VM is paused; resume it first")]
    Paused,
    #[error("bundle {0} is in transition; only one transition runs at a time")]
    Busy(String),
}

impl PatchError {
    fn response(&self) -> ApiResponse {
        let status = match self {
            PatchError::Paused | PatchError::Busy(_) => 409,
            PatchError::Bundle { .. } => 400,
            _ => 422,
        };
        ApiResponse::error(status, self.to_string())
    }
}

/// A transition between attempts, with the client waiting for its answer.
pub struct PendingPatch {
    flight: InFlight,
    reply: Sender<ApiResponse>,
    next_at: Instant,
}

impl RunningVm {
    pub(crate) fn ensure_kernel_and_area(&mut self) -> Result<(), PatchError> {
        self.guest_kernel().map_err(PatchError::Introspect)?;
        if self.patch_area.is_none() {
            let k = &self.kernel.as_ref().expect("loaded above").kernel;
            let sym = |n: &str| {
                k.symbols
                    .lookup(n, None)
                    .map(|s| s.addr)
                    .map_err(|e| PatchError::Area(e.to_string()))
            };
            let level2 = k.image.pa(sym("level2_kernel_pgt")?);
            let area = PatchArea::map(self.vm.memory(), level2, sym("_end")?)
                .map_err(|e| PatchError::Area(e.to_string()))?;
            self.patch_area = Some(area);
        }
        Ok(())
    }

    /// Runs `f` with the patch target and the ledger (taken out of `self` meanwhile).
    fn with_target<R>(
        &mut self,
        f: impl FnOnce(&mut LiveTarget<'_>, &mut patcher::ledger::Ledger) -> R,
    ) -> R {
        // Tasks may sleep in the applied bundles' code: the unwinder knows it as text.
        let code = crate::introspection::host_code(&self.ledger);
        if let Some(k) = self.kernel.as_mut() {
            k.set_host_code(code);
        }
        let mut ledger = std::mem::take(&mut self.ledger);
        let result = {
            let mut target = LiveTarget::new(
                self,
                self.kernel.as_ref().expect("kernel found"),
                self.patch_area.expect("area mapped"),
            );
            f(&mut target, &mut ledger)
        };
        self.ledger = ledger;
        result
    }

    fn check_can_start(&self) -> Result<(), PatchError> {
        if self.is_paused() {
            return Err(PatchError::Paused);
        }
        if let Some(p) = &self.patch_in_flight {
            return Err(PatchError::Busy(p.flight.bundle().to_string()));
        }
        Ok(())
    }

    /// `PUT /patches`: starts applying the bundle at `path` and makes its first attempt;
    /// `reply` gets the answer when the transition completes or fails. If that bundle's
    /// disable is still in transition, it is reversed instead (the bundle stays enabled).
    pub fn start_apply(
        &mut self,
        path: &str,
        force: bool,
        deadline: Duration,
        allow_downgrade: bool,
        reply: Sender<ApiResponse>,
    ) {
        let started = (|| {
            let bytes = std::fs::read(path).map_err(|e| PatchError::Bundle {
                path: path.into(),
                detail: e.to_string(),
            })?;
            let bundle = Bundle::decode(&bytes).map_err(|e| PatchError::Bundle {
                path: path.into(),
                detail: e.to_string(),
            })?;
            let name = &bundle.manifest.name;
            let reversing = self
                .patch_in_flight
                .as_ref()
                .is_some_and(|p| !p.flight.is_apply() && p.flight.bundle() == name);
            if reversing && !self.is_paused() {
                let name = name.clone();
                self.reverse_in_flight(&name);
                // Reversed instead of started.
                return Ok(Err(name));
            }
            self.check_can_start()?;
            self.ensure_kernel_and_area()?;
            let digest = Bundle::digest_hex(&bytes);
            let opts = Options {
                deadline,
                force,
                allow_downgrade,
                ..Options::default()
            };
            let flight =
                self.with_target(|t, l| transition::begin_apply(t, l, &bundle, &digest, &opts))?;
            Ok::<_, PatchError>(Ok(flight))
        })();
        match started {
            Ok(Err(name)) => {
                let _ = reply.send(ApiResponse::ok(json!({
                    "name": name,
                    "state": "enabled",
                    "reversed": true,
                })));
            }
            Ok(Ok(flight)) => self.launch(Ok(flight), reply),
            Err(e) => self.launch(Err(e), reply),
        }
    }

    /// `PUT /patches/disable`: starts disabling `name`, or reverses its apply if that is
    /// still in transition (nothing of it was written yet).
    pub fn start_disable(&mut self, name: &str, force: bool, reply: Sender<ApiResponse>) {
        let reversing = self
            .patch_in_flight
            .as_ref()
            .is_some_and(|p| p.flight.is_apply() && p.flight.bundle() == name);
        if reversing && !self.is_paused() {
            self.reverse_in_flight(name);
            let _ = reply.send(ApiResponse::ok(
                json!({"name": name, "state": "disabled", "reversed": true}),
            ));
            return;
        }
        let started = (|| {
            self.check_can_start()?;
            self.ensure_kernel_and_area()?;
            let opts = Options {
                force,
                ..Options::default()
            };
            Ok::<_, PatchError>(
                self.with_target(|t, l| transition::begin_disable(t, l, name, &opts))?,
            )
        })();
        self.launch(started, reply);
    }

    /// Makes the first attempt of a transition that started (its client is answered when
    /// it ends), or answers the client with why it did not start.
    fn launch(&mut self, started: Result<InFlight, PatchError>, reply: Sender<ApiResponse>) {
        match started {
            Ok(flight) => {
                self.patch_in_flight = Some(PendingPatch {
                    flight,
                    reply,
                    next_at: Instant::now(),
                });
                self.poll_patch();
            }
            Err(e) => {
                let _ = reply.send(e.response());
            }
        }
    }

    /// Reverses the transition in flight (of bundle `name`): nothing of it was written.
    /// Its own request is answered 409.
    fn reverse_in_flight(&mut self, name: &str) {
        let Some(pending) = self.patch_in_flight.take() else {
            return;
        };
        let attempts = pending.flight.attempts();
        let (was, now) = if pending.flight.is_apply() {
            ("disabled", "patching")
        } else {
            ("enabled", "unpatching")
        };
        self.with_target(|t, l| pending.flight.reverse(t, l));
        let _ = pending.reply.send(ApiResponse::error(
            409,
            format!(
                "bundle {name} was {was} while in transition (after {attempts} blocked \
                 attempts); the {now} transition was reversed and nothing was written"
            ),
        ));
    }

    /// Makes the next attempt of the transition in flight if it is due (and the VM is not
    /// held paused by a client), answering its client when it ends.
    pub fn poll_patch(&mut self) {
        let due = self
            .patch_in_flight
            .as_ref()
            .is_some_and(|p| Instant::now() >= p.next_at);
        if !due || self.is_paused() {
            return;
        }
        let mut pending = self.patch_in_flight.take().expect("checked above");
        let result = self.with_target(|t, l| pending.flight.attempt(t, l));
        let answer = match result {
            Ok(Progress::RetryIn(wait)) => {
                tracing::info!(
                    "patch: {}: blocked, retrying in {wait:?}",
                    pending.flight.bundle()
                );
                pending.next_at = Instant::now() + wait;
                self.patch_in_flight = Some(pending);
                return;
            }
            Ok(Progress::Done(Completed::Applied(linked))) => {
                let name = pending.flight.bundle();
                let record = self.ledger.bundles().iter().rev().find(|b| b.name == name);
                ApiResponse::ok(json!({
                    "name": name,
                    "sha256": record.map(|b| b.digest.as_str()),
                    "forced": record.is_some_and(|b| b.forced),
                    "attempts": pending.flight.attempts(),
                    "functions": linked.functions.iter().map(|(n, (a, s))| json!({"name": n, "addr": a, "size": s})).collect::<Vec<_>>(),
                }))
            }
            Ok(Progress::Done(Completed::Disabled)) => ApiResponse::ok(json!({
                "name": pending.flight.bundle(),
                "state": "disabled",
                "attempts": pending.flight.attempts(),
            })),
            Err(e) => PatchError::from(e).response(),
        };
        let _ = pending.reply.send(answer);
    }

    /// How long the event loop may sleep before the transition in flight is due.
    pub fn patch_due_in(&self) -> Option<Duration> {
        self.patch_in_flight
            .as_ref()
            .map(|p| p.next_at.saturating_duration_since(Instant::now()))
    }

    /// The transition in flight, for `GET /patches`.
    fn in_flight_json(&self) -> serde_json::Value {
        match &self.patch_in_flight {
            Some(p) => json!({
                "bundle": p.flight.bundle(),
                "kind": if p.flight.is_apply() { "patching" } else { "unpatching" },
                "attempts": p.flight.attempts(),
                "elapsed_ms": u64::try_from(p.flight.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            None => serde_json::Value::Null,
        }
    }

    /// The ledger's bundles and events, for the API.
    pub fn ledger(&self) -> &patcher::ledger::Ledger {
        &self.ledger
    }

    /// `GET /patches`: every bundle with, per function, whether its code is the one that
    /// runs now (`active`), the system states in force, and the transition in flight.
    pub fn patches_json(&self) -> serde_json::Value {
        let bundles: Vec<serde_json::Value> = self
            .ledger
            .bundles()
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
                // The ORC rows are for the unwinder (they stay in the ledger and in
                // snapshots); the listing says how many there are.
                if let (Some(code), Some(c)) = (v["code"].as_object_mut(), &b.code) {
                    code.insert("orc".into(), json!({ "rows": c.orc.len() }));
                }
                if let Some(funcs) = v["functions"].as_array_mut() {
                    for (f, rec) in funcs.iter_mut().zip(&b.functions) {
                        f["active"] = serde_json::Value::Bool(
                            self.ledger.active_target(rec.site)
                                == Some((b.name.as_str(), rec.new_addr)),
                        );
                    }
                }
                v
            })
            .collect();
        json!({
            "bundles": bundles,
            "states": self.ledger.states().collect::<Vec<_>>(),
            "transition": self.in_flight_json(),
        })
    }
}
