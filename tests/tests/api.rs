//! The control API on a real guest (its kernel booting; on PVM hosts that takes minutes,
//! which is plenty of running guest code to pause and resume).

use std::time::{Duration, Instant};

use integration_tests::{api, guest_artifact, require_kvm, run_vmm, wait_for_socket, Guest};
use serde_json::Value;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

fn boot() -> Guest {
    require_kvm();
    let image = guest_artifact("guest.img");
    let guest = Guest::start(&["run", image.to_str().unwrap(), "--console", "none"]);
    wait_for_socket(&guest.api_socket, Duration::from_secs(60));
    guest
}

/// Every vCPU's general-purpose registers (a guest inside a long `rep movs` keeps its
/// RIP but not its RCX/RSI/RDI).
fn regs(socket: &std::path::Path) -> Vec<Vec<u64>> {
    let (status, body) = api(socket, "GET", "/vm/vcpus", "");
    assert_eq!(status, 200, "{body}");
    let names = [
        "rip", "rsp", "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12",
        "r13", "r14", "r15", "rflags",
    ];
    json(&body)["vcpus"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| names.iter().map(|n| v[*n].as_u64().unwrap()).collect())
        .collect()
}

#[test]
fn status_pause_resume_and_registers() {
    let guest = boot();
    let s = &guest.api_socket;
    let (status, body) = api(s, "GET", "/vm", "");
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(
        (v["state"].as_str(), v["vcpus"].as_u64()),
        (Some("running"), Some(2))
    );
    assert_eq!(v["memory_mib"].as_u64(), Some(512));

    // Registers only while paused.
    assert_eq!(api(s, "GET", "/vm/vcpus", "").0, 409);
    let (status, body) = api(s, "PUT", "/vm/state", r#"{"state":"paused"}"#);
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["paused_in_us"].as_u64().is_some());
    assert_eq!(json(&api(s, "GET", "/vm", "").1)["state"], "paused");
    let (_, body) = api(s, "GET", "/vm/vcpus", "");
    let v = json(&body);
    let boot_cpu = &v["vcpus"][0];
    assert_ne!(
        boot_cpu["cr0"].as_u64().unwrap() & (1 << 31),
        0,
        "paging on: {boot_cpu}"
    );
    assert_ne!(
        boot_cpu["efer"].as_u64().unwrap() & (1 << 10),
        0,
        "long mode active"
    );
    // Paused means paused: the registers do not move.
    let first = regs(s);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(first, regs(s));
    assert_eq!(api(s, "PUT", "/vm/state", r#"{"state":"paused"}"#).0, 409);
    assert_eq!(api(s, "PUT", "/vm/state", r#"{"state":"running"}"#).0, 200);
    assert_eq!(json(&api(s, "GET", "/vm", "").1)["state"], "running");
}

#[test]
fn a_thousand_pauses_and_the_guest_keeps_running() {
    let guest = boot();
    let s = &guest.api_socket;
    api(s, "PUT", "/vm/state", r#"{"state":"paused"}"#);
    let before = regs(s);
    api(s, "PUT", "/vm/state", r#"{"state":"running"}"#);
    let mut latencies = Vec::with_capacity(1000);
    let start = Instant::now();
    for _ in 0..1000 {
        let (status, body) = api(s, "PUT", "/vm/state", r#"{"state":"paused"}"#);
        assert_eq!(status, 200, "{body}");
        latencies.push(json(&body)["paused_in_us"].as_u64().unwrap());
        assert_eq!(api(s, "PUT", "/vm/state", r#"{"state":"running"}"#).0, 200);
    }
    let elapsed = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    api(s, "PUT", "/vm/state", r#"{"state":"paused"}"#);
    let after = regs(s);
    api(s, "PUT", "/vm/state", r#"{"state":"running"}"#);
    assert_ne!(
        before, after,
        "the guest made no progress across 1000 pauses"
    );
    latencies.sort_unstable();
    eprintln!(
        "1000 pause/resume cycles in {elapsed:?}; pause latency p50 {} us, p99 {} us, max {} us",
        latencies[500], latencies[989], latencies[999]
    );
    let (status, body) = api(s, "GET", "/vm", "");
    assert_eq!(status, 200);
    assert_eq!(json(&body)["pauses"].as_u64(), Some(1002));
}

#[test]
fn bad_requests_get_json_errors_and_the_socket_is_private() {
    let guest = boot();
    let s = &guest.api_socket;
    for (method, path, body, want) in [
        ("GET", "/nope", "", 404),
        ("DELETE", "/vm", "", 405),
        ("PUT", "/vm/state", "{not json", 400),
        ("PUT", "/vm/state", r#"{"state":"asleep"}"#, 400),
        ("PUT", "/console/sysrq", r#"{"key":"tt"}"#, 400),
    ] {
        let (status, reply) = api(s, method, path, body);
        assert_eq!(status, want, "{method} {path}: {reply}");
        assert!(json(&reply)["error"].as_str().is_some(), "{reply}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A second VM on the same socket is refused; the first keeps answering.
    let image = guest_artifact("guest.img");
    let (status, _, stderr) = run_vmm(
        &[
            "run",
            image.to_str().unwrap(),
            "--api-socket",
            s.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert!(stderr.contains("is in use by a running VM"), "{stderr}");
    assert_eq!(api(s, "GET", "/vm", "").0, 200);
}

#[test]
fn client_commands_find_the_vm_and_fail_cleanly_without_one() {
    let guest = boot();
    let sock = guest.api_socket.to_str().unwrap().to_string();
    let (status, out, _) = run_vmm(&["status", "--api-socket", &sock], Duration::from_secs(30));
    assert!(status.success());
    assert_eq!(json(out.trim())["state"], "running");
    let (status, _, _) = run_vmm(&["pause", "--api-socket", &sock], Duration::from_secs(30));
    assert!(status.success());
    let (status, _, stderr) = run_vmm(&["pause", "--api-socket", &sock], Duration::from_secs(30));
    assert!(
        !status.success() && stderr.contains("already paused"),
        "{stderr}"
    );
    let (status, _, _) = run_vmm(&["resume", "--api-socket", &sock], Duration::from_secs(30));
    assert!(status.success());
    let (status, _, stderr) = run_vmm(
        &["status", "--api-socket", "/nonexistent/vm.sock"],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(
        lines[0].starts_with("error: no VM answers on /nonexistent/vm.sock"),
        "{stderr}"
    );
}
