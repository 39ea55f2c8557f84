//! What the VMM thread does for each API request.

use std::path::Path;
use std::time::Instant;

use serde_json::json;

use super::routes::{ApiRequest, ApiResponse};
use crate::builder::RunningVm;
use crate::vstate::exit::ExitReason;
use crate::vstate::vcpu::{VcpuEvent, VcpuResponse};

impl RunningVm {
    /// Answers one API request. Returns an exit reason when the VM must stop.
    pub fn handle_api(&mut self, req: ApiRequest) -> (ApiResponse, Option<ExitReason>) {
        match req {
            ApiRequest::Status => (ApiResponse::ok(self.status_json()), None),
            ApiRequest::SetState { paused: true } => {
                if self.paused {
                    return (ApiResponse::error(409, "the VM is already paused"), None);
                }
                let t = Instant::now();
                match self.pause_vcpus() {
                    Ok(()) => {
                        self.paused = true;
                        let us = t.elapsed().as_micros() as u64;
                        self.pause_latencies_us.push(us);
                        (
                            ApiResponse::ok(json!({"state": "paused", "paused_in_us": us})),
                            None,
                        )
                    }
                    Err(e) => (ApiResponse::error(500, e.to_string()), None),
                }
            }
            ApiRequest::SetState { paused: false } => {
                if !self.paused {
                    return (ApiResponse::error(409, "the VM is not paused"), None);
                }
                match self.resume_vcpus() {
                    Ok(()) => {
                        self.paused = false;
                        (ApiResponse::ok(json!({"state": "running"})), None)
                    }
                    Err(e) => (ApiResponse::error(500, e.to_string()), None),
                }
            }
            ApiRequest::Vcpus => {
                if !self.paused {
                    return (
                        ApiResponse::error(409, "pause the VM first (PUT /vm/state)"),
                        None,
                    );
                }
                let mut out = Vec::new();
                for v in &self.vcpus {
                    let state = v
                        .send(VcpuEvent::SaveState(self.msr_indices.clone()))
                        .map_err(|e| e.to_string())
                        .and_then(|_| match v.wait(std::time::Duration::from_secs(5)) {
                            Ok(VcpuResponse::State(s)) => *s,
                            Ok(other) => Err(format!("unexpected reply {other:?}")),
                            Err(e) => Err(e.to_string()),
                        });
                    match state {
                        Ok(s) => {
                            let msr = |i: u32| s.msrs.iter().find(|m| m.0 == i).map(|m| m.1);
                            let r = &s.regs;
                            let sr = &s.sregs;
                            out.push(json!({
                                "id": s.id,
                                "rip": r.rip, "rsp": r.rsp, "rbp": r.rbp, "rflags": r.rflags,
                                "rax": r.rax, "rbx": r.rbx, "rcx": r.rcx, "rdx": r.rdx,
                                "rsi": r.rsi, "rdi": r.rdi, "r8": r.r8, "r9": r.r9,
                                "r10": r.r10, "r11": r.r11, "r12": r.r12, "r13": r.r13,
                                "r14": r.r14, "r15": r.r15,
                                "cr0": sr.cr0, "cr2": sr.cr2, "cr3": sr.cr3, "cr4": sr.cr4,
                                "efer": sr.efer,
                                "cs": {"selector": sr.cs.selector, "l": sr.cs.l, "dpl": sr.cs.dpl},
                                "ss": sr.ss.selector,
                                "gs_base": sr.gs.base, "fs_base": sr.fs.base,
                                "kernel_gs_base": msr(0xc000_0102),
                                "lstar": msr(0xc000_0082),
                                "mp_state": s.mp_state.mp_state,
                            }));
                        }
                        Err(e) => return (ApiResponse::error(500, e), None),
                    }
                }
                (ApiResponse::ok(json!({ "vcpus": out })), None)
            }
            ApiRequest::Snapshot { dir, stop } => {
                if self.paused {
                    // snapshot() pauses and resumes by itself
                    return (
                        ApiResponse::error(409, "resume the VM first; snapshot pauses it itself"),
                        None,
                    );
                }
                match self.snapshot(Path::new(&dir), stop) {
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
                }
            }
            ApiRequest::Sysrq { key } => {
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                serial.send_break();
                serial.queue_input(&[key as u8]);
                (ApiResponse::no_content(), None)
            }
        }
    }

    fn status_json(&self) -> serde_json::Value {
        json!({
            "name": self.name,
            "state": if self.paused { "paused" } else { "running" },
            "vcpus": self.vcpus.len(),
            "memory_mib": self.machine.memory_mib,
            "cpu_template": self.machine.cpu_template.name(),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "pauses": self.pause_latencies_us.len(),
        })
    }
}
