//! What the VMM thread does for each API request.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::registers;
use super::routes::{ApiRequest, ApiResponse};
use crate::builder::RunningVm;
use crate::vstate::exit::ExitReason;
use crate::vstate::pause::PauseError;

impl RunningVm {
    /// Answers one API request, which the API thread had complete at `received`.
    /// Returns an exit reason when the VM must stop.
    pub fn handle_api(
        &mut self,
        req: ApiRequest,
        received: Instant,
    ) -> (ApiResponse, Option<ExitReason>) {
        match req {
            ApiRequest::Status => (ApiResponse::ok(self.status_json()), None),
            ApiRequest::SetState { paused: true } => (self.api_pause(received), None),
            ApiRequest::SetState { paused: false } => (self.api_resume(), None),
            ApiRequest::Vcpus => (self.vcpus_json(), None),
            ApiRequest::Snapshot { dir, stop } => match self.snapshot(Path::new(&dir), stop) {
                Ok(info) => (
                    ApiResponse::ok(json!({
                        "dir": info.dir,
                        "state_bytes": info.state_bytes,
                        "memory_bytes": info.memory_bytes,
                        "paused_ms": info.paused_for.as_secs_f64() * 1000.0,
                        "stopped": stop,
                    })),
                    stop.then(|| ExitReason::Snapshotted(dir.clone())),
                ),
                Err(e) => (ApiResponse::error(500, e.to_string()), None),
            },
            // Answered by the transition runner (RunningVm::start_apply/start_disable).
            ApiRequest::ApplyPatch { .. } | ApiRequest::DisablePatch { .. } => (
                ApiResponse::error(500, "patch requests are not handled here"),
                None,
            ),
            ApiRequest::ListPatches => (ApiResponse::ok(self.patches_json()), None),
            ApiRequest::PatchEvents => (
                ApiResponse::ok(json!({ "events": self.ledger().events() })),
                None,
            ),
            ApiRequest::Kernel => (
                self.kernel_json()
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::KernelSymbols { names } => (
                self.symbols_json(&names)
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::KernelModules => (
                self.modules_json()
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::KernelDigest => (
                self.kernel_digest_json()
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::KernelText { symbol } => (
                self.kernel_text_json(&symbol)
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::Tasks { stacks } => (
                self.tasks_json(stacks)
                    .map_or_else(|e| ApiResponse::error(422, e), ApiResponse::ok),
                None,
            ),
            ApiRequest::Sysrq { key } => {
                if self.is_paused() {
                    // The device loop is frozen: nothing reaches a paused guest.
                    return (
                        ApiResponse::error(409, "the VM is paused; resume it first"),
                        None,
                    );
                }
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                serial.send_break();
                serial.queue_input(&[key as u8]);
                (ApiResponse::no_content(), None)
            }
        }
    }

    fn api_pause(&mut self, received: Instant) -> ApiResponse {
        if self.paused {
            return ApiResponse::error(409, "the VM is already paused");
        }
        let us = |d: std::time::Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        match self.pause() {
            Ok(stopped_in) => {
                self.paused = true;
                // Request (at the API thread) to every vCPU parked; and the part of it from
                // the first kick to the last vCPU's answer (the pause histogram's figure).
                ApiResponse::ok(json!({
                    "state": "paused",
                    "paused_in_us": us(received.elapsed()),
                    "vcpus_stopped_in_us": stopped_in.map_or(0, us),
                }))
            }
            Err(e) => ApiResponse::error(500, e.to_string()),
        }
    }

    fn api_resume(&mut self) -> ApiResponse {
        if !self.paused {
            return ApiResponse::error(409, "the VM is not paused");
        }
        match self.resume() {
            Ok(running) => {
                self.paused = false;
                let state = if running { "running" } else { "paused" };
                ApiResponse::ok(json!({ "state": state }))
            }
            Err(e) => ApiResponse::error(500, e.to_string()),
        }
    }

    fn vcpus_json(&self) -> ApiResponse {
        let states = self.paused_vm().and_then(|p| p.vcpu_states());
        match states {
            Ok(states) => ApiResponse::ok(json!({
                "vcpus": states.iter().map(registers::vcpu_json).collect::<Vec<_>>()
            })),
            Err(PauseError::NotPaused) => {
                ApiResponse::error(409, "the VM is running; pause it first (PUT /vm/state)")
            }
            Err(e) => ApiResponse::error(500, e.to_string()),
        }
    }

    fn text_guard_json(&self) -> serde_json::Value {
        let g = self.text_guard.lock().unwrap_or_else(|e| e.into_inner());
        json!({
            "protected_sites": g.sites().count(),
            "read_only_pages": g.pages().len(),
            "dropped_writes": g.dropped,
            "passed_writes": g.passed,
        })
    }

    fn status_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "state": if self.is_paused() { "paused" } else { "running" },
            "vcpus": self.vcpus.len(),
            "memory_mib": self.machine.memory_mib,
            "cpu_template": self.machine.cpu_template.name(),
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "pauses": self.pause_stats().count(),
            "pause_latency_us": self.pause_stats().summary(),
            "text_guard": self.text_guard_json(),
            "console": self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .receive_status(),
        })
    }
}
