//! Applying and disabling bundles on the running VM (called on the VMM thread).

use std::time::Duration;

use patcher::bundle::Bundle;
use patcher::transition::{self, Options};

use super::area::PatchArea;
use super::live::LiveTarget;
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
}

impl RunningVm {
    fn ensure_kernel_and_area(&mut self) -> Result<(), PatchError> {
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

    /// `vmm patch BUNDLE`: returns the bundle's name and where its functions went.
    pub fn apply_bundle(
        &mut self,
        path: &str,
        force: bool,
        deadline: Duration,
        allow_downgrade: bool,
    ) -> Result<serde_json::Value, PatchError> {
        if self.is_paused() {
            return Err(PatchError::Paused);
        }
        let bytes = std::fs::read(path).map_err(|e| PatchError::Bundle {
            path: path.into(),
            detail: e.to_string(),
        })?;
        let bundle = Bundle::decode(&bytes).map_err(|e| PatchError::Bundle {
            path: path.into(),
            detail: e.to_string(),
        })?;
        self.ensure_kernel_and_area()?;
        let digest = Bundle::digest_hex(&bytes);
        let opts = Options {
            deadline,
            force,
            allow_downgrade,
            ..Options::default()
        };
        let mut ledger = std::mem::take(&mut self.ledger);
        let result = {
            let mut target = LiveTarget::new(
                self,
                self.kernel.as_ref().expect("kernel found"),
                self.patch_area.expect("area mapped"),
            );
            transition::apply(&mut target, &mut ledger, &bundle, &digest, &opts, &|| false)
        };
        self.ledger = ledger;
        let linked = result?;
        Ok(serde_json::json!({
            "name": bundle.manifest.name,
            "sha256": digest,
            "forced": force,
            "functions": linked.functions.iter().map(|(n, (a, s))| serde_json::json!({"name": n, "addr": a, "size": s})).collect::<Vec<_>>(),
        }))
    }

    /// `vmm patch disable NAME`.
    pub fn disable_bundle(&mut self, name: &str, force: bool) -> Result<(), PatchError> {
        if self.is_paused() {
            return Err(PatchError::Paused);
        }
        self.ensure_kernel_and_area()?;
        let opts = Options {
            force,
            ..Options::default()
        };
        let mut ledger = std::mem::take(&mut self.ledger);
        let result = {
            let mut target = LiveTarget::new(
                self,
                self.kernel.as_ref().expect("kernel found"),
                self.patch_area.expect("area mapped"),
            );
            transition::disable(&mut target, &mut ledger, name, &opts, &|| false)
        };
        self.ledger = ledger;
        Ok(result?)
    }

    /// The ledger's bundles and events, for the API.
    pub fn ledger(&self) -> &patcher::ledger::Ledger {
        &self.ledger
    }

    /// `GET /patches`: every bundle with, per function, whether its code is the one that
    /// runs now (`active`), and the system states in force.
    pub fn patches_json(&self) -> serde_json::Value {
        let bundles: Vec<serde_json::Value> = self
            .ledger
            .bundles()
            .iter()
            .map(|b| {
                let mut v = serde_json::to_value(b).unwrap_or_default();
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
        serde_json::json!({
            "bundles": bundles,
            "states": self.ledger.states().collect::<Vec<_>>(),
        })
    }
}
