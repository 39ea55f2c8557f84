//! The control API on a real guest, driven while its kernel is still booting (on PVM
//! hosts guest kernel code is emulated and a boot takes many minutes: plenty of running
//! guest code to pause and resume, see docs/pvm.md).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use integration_tests::{
    api, guest_artifact, json, require_kvm, restore_fixture, run_vmm, wait_for_socket, Guest,
};
use serde_json::Value;

/// A private directory for one test's console file and sockets.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-api-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A guest booting `guest.img` with its console in `dir/console` and its API socket at
/// `dir/api.sock`.
fn boot(dir: &Path) -> Guest {
    require_kvm();
    let image = guest_artifact("guest.img");
    let console = format!("file:{}", dir.join("console").display());
    let socket = dir.join("api.sock");
    let guest = Guest::start(&[
        "run",
        image.to_str().unwrap(),
        "--console",
        &console,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    wait_for_socket(&socket, Duration::from_secs(60));
    guest
}

fn put_state(socket: &Path, state: &str) -> (u16, Value) {
    let (status, body) = api(
        socket,
        "PUT",
        "/vm/state",
        &format!(r#"{{"state":"{state}"}}"#),
    );
    (status, json(&body))
}

fn console_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("console")).map_or(0, |m| m.len())
}

/// Every vCPU's general-purpose registers and RIP (a guest inside a long `rep movs`
/// keeps its RIP but not its RCX/RSI/RDI).
fn regs(socket: &Path) -> Vec<Vec<u64>> {
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
        .map(|v| {
            names
                .iter()
                .map(|n| v["regs"][*n].as_u64().unwrap())
                .collect()
        })
        .collect()
}

#[test]
fn status_pause_resume_and_registers() {
    let dir = scratch("regs");
    let guest = boot(&dir);
    let s = dir.join("api.sock");
    let (status, body) = api(&s, "GET", "/vm", "");
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(
        (v["state"].as_str(), v["vcpus"].as_u64()),
        (Some("running"), Some(2))
    );
    assert_eq!(v["memory_mib"].as_u64(), Some(512));
    assert!(v["cpu_template"].as_str().is_some(), "{v}");
    assert!(v["uptime_ms"].as_u64().is_some(), "{v}");

    // Registers only while paused.
    let (status, body) = api(&s, "GET", "/vm/vcpus", "");
    assert_eq!(status, 409, "{body}");
    assert!(json(&body)["error"].as_str().is_some());

    let (status, v) = put_state(&s, "paused");
    assert_eq!(status, 200, "{v}");
    let (total, kick) = (
        v["paused_in_us"].as_u64(),
        v["vcpus_stopped_in_us"].as_u64(),
    );
    assert!(kick.is_some() && total >= kick, "{v}");
    assert_eq!(json(&api(&s, "GET", "/vm", "").1)["state"], "paused");

    // The boot vCPU entered the kernel in long mode with paging; the register dump
    // says so consistently.
    let (_, body) = api(&s, "GET", "/vm/vcpus", "");
    let v = json(&body);
    assert_eq!(v["vcpus"].as_array().map(Vec::len), Some(2), "{v}");
    let cpu = &v["vcpus"][0];
    let sregs = &cpu["sregs"];
    let cr0 = sregs["cr0"].as_u64().unwrap();
    let efer = sregs["efer"].as_u64().unwrap();
    assert_ne!(cr0 & (1 << 31), 0, "CR0.PG: {sregs}");
    assert_ne!(cr0 & 1, 0, "CR0.PE: {sregs}");
    assert_ne!(
        sregs["cr4"].as_u64().unwrap() & (1 << 5),
        0,
        "CR4.PAE: {sregs}"
    );
    assert_ne!(efer & (1 << 10), 0, "EFER.LMA: {sregs}");
    assert_eq!(sregs["cs"]["l"], 1, "CS.L in long mode: {sregs}");
    assert_ne!(sregs["cr3"].as_u64().unwrap(), 0, "{sregs}");
    assert_eq!(cpu["msrs"]["efer"].as_u64(), Some(efer));
    for msr in ["kernel_gs_base", "gs_base", "fs_base", "lstar"] {
        assert!(cpu["msrs"][msr].is_u64(), "{msr}: {}", cpu["msrs"]);
    }
    for seg in ["cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"] {
        assert!(sregs[seg]["selector"].is_u64(), "{seg}: {sregs}");
        assert!(sregs[seg]["base"].is_u64(), "{seg}: {sregs}");
    }

    // Paused means paused: the registers do not move and the console does not grow.
    let first = regs(&s);
    let console = console_len(&dir);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(first, regs(&s), "registers changed while paused");
    assert_eq!(console, console_len(&dir), "console grew while paused");
    // The guest gets no input while paused.
    assert_eq!(api(&s, "PUT", "/console/sysrq", r#"{"key":"h"}"#).0, 409);

    let (status, v) = put_state(&s, "paused");
    assert_eq!(status, 409, "{v}");
    let (status, v) = put_state(&s, "running");
    assert_eq!((status, v["state"].as_str()), (200, Some("running")), "{v}");
    assert_eq!(put_state(&s, "running").0, 409);
    let v = json(&api(&s, "GET", "/vm", "").1);
    assert_eq!(v["state"], "running");
    assert_eq!(v["pauses"], 1, "{v}");
    assert!(v["pause_latency_us"]["p99_us"].as_u64().is_some(), "{v}");
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_thousand_pauses_and_the_guest_keeps_running() {
    let dir = scratch("thousand");
    let mut guest = boot(&dir);
    let s = dir.join("api.sock");
    put_state(&s, "paused");
    let before = regs(&s);
    put_state(&s, "running");
    let mut latencies = Vec::with_capacity(1000);
    let start = Instant::now();
    for i in 0..1000 {
        let (status, v) = put_state(&s, "paused");
        assert_eq!(status, 200, "pause {i}: {v}");
        latencies.push(v["paused_in_us"].as_u64().unwrap());
        let (status, v) = put_state(&s, "running");
        assert_eq!(status, 200, "resume {i}: {v}");
    }
    let elapsed = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    put_state(&s, "paused");
    let after = regs(&s);
    put_state(&s, "running");
    assert_ne!(
        before, after,
        "the guest made no progress across 1000 pauses"
    );
    assert!(guest.is_running(), "vmm exited: {}", guest.stderr());
    latencies.sort_unstable();
    eprintln!(
        "1000 pause/resume cycles in {elapsed:?}; pause latency p50 {} us, p99 {} us, max {} us",
        latencies[499], latencies[989], latencies[999]
    );
    let (status, body) = api(&s, "GET", "/vm", "");
    assert_eq!(status, 200);
    let v = json(&body);
    assert_eq!(v["state"], "running");
    assert_eq!(v["pauses"].as_u64(), Some(1002), "{v}");
    assert_eq!(v["pause_latency_us"]["count"].as_u64(), Some(1002), "{v}");
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_requests_get_json_errors_and_the_socket_is_private() {
    let dir = scratch("bad");
    let guest = boot(&dir);
    let s = dir.join("api.sock");
    for (method, path, body, want) in [
        ("GET", "/nope", "", 404),
        ("DELETE", "/vm", "", 405),
        ("GET", "/vm/state", "", 405),
        ("PUT", "/vm/state", "{not json", 400),
        ("PUT", "/vm/state", "", 400),
        ("PUT", "/vm/state", r#"{"state":"asleep"}"#, 400),
        ("PUT", "/vm/state", r#"{"state":"paused","now":true}"#, 400),
        ("PUT", "/console/sysrq", r#"{"key":"tt"}"#, 400),
    ] {
        let (status, reply) = api(&s, method, path, body);
        assert_eq!(status, want, "{method} {path}: {reply}");
        assert!(json(&reply)["error"].as_str().is_some(), "{reply}");
    }
    // Not HTTP at all.
    {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(&s).unwrap();
        c.write_all(b"\x00\x01garbage\r\n\r\n").unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(out.contains(r#"{"error":"#), "{out}");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // A second VM on the same socket is refused with one line; the first keeps answering.
    let image = guest_artifact("guest.img");
    let (status, _, stderr) = run_vmm(
        &[
            "run",
            image.to_str().unwrap(),
            "--console",
            "none",
            "--api-socket",
            s.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    );
    assert!(!status.success());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("is in use by a running VM"), "{stderr}");
    assert_eq!(api(&s, "GET", "/vm", "").0, 200);
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_stale_socket_file_is_replaced() {
    let dir = scratch("stale");
    // A socket file nobody listens on (its listener is gone).
    drop(std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap());
    assert!(dir.join("api.sock").exists());
    let guest = boot(&dir);
    assert_eq!(api(&dir.join("api.sock"), "GET", "/vm", "").0, 200);
    drop(guest);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn client_commands_find_the_vm_and_fail_cleanly_without_one() {
    require_kvm();
    // The default socket of a named VM (/run/vmm/NAME.sock as root, else under
    // $XDG_RUNTIME_DIR/vmm): client commands find it by --name alone.
    let name = format!("api-test-{}", std::process::id());
    let image = guest_artifact("guest.img");
    let guest = Guest::start(&[
        "run",
        image.to_str().unwrap(),
        "--console",
        "none",
        "--name",
        &name,
    ]);
    let (status, out, stderr) = {
        let start = Instant::now();
        loop {
            let r = run_vmm(&["status", "--name", &name], Duration::from_secs(30));
            if r.0.success() || start.elapsed() > Duration::from_secs(60) {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert!(status.success(), "{stderr}");
    let v = json(out.trim());
    assert_eq!(
        (v["state"].as_str(), v["name"].as_str()),
        (Some("running"), Some(name.as_str()))
    );
    let (status, out, stderr) = run_vmm(&["pause", "--name", &name], Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    assert!(json(out.trim())["paused_in_us"].as_u64().is_some(), "{out}");
    let (status, _, stderr) = run_vmm(&["pause", "--name", &name], Duration::from_secs(30));
    assert!(
        !status.success() && stderr.contains("already paused"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    let (_, out, _) = run_vmm(&["status", "--name", &name], Duration::from_secs(30));
    assert_eq!(json(out.trim())["state"], "paused");
    let (status, _, stderr) = run_vmm(&["resume", "--name", &name], Duration::from_secs(30));
    assert!(status.success(), "{stderr}");
    let (status, _, stderr) = run_vmm(&["resume", "--name", &name], Duration::from_secs(30));
    assert!(
        !status.success() && stderr.contains("not paused"),
        "{stderr}"
    );
    drop(guest);

    // No VM: one line, non-zero exit, for every client command.
    for cmd in ["status", "pause", "resume"] {
        let (status, _, stderr) = run_vmm(
            &[cmd, "--api-socket", "/nonexistent/vm.sock"],
            Duration::from_secs(30),
        );
        assert!(!status.success(), "{cmd}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{cmd}: {stderr}");
        assert!(
            lines[0].starts_with("error: no VM answers on /nonexistent/vm.sock"),
            "{cmd}: {stderr}"
        );
    }
    let (status, _, stderr) = run_vmm(&["status", "--name", &name], Duration::from_secs(30));
    assert!(!status.success(), "the VM is gone: {stderr}");
    assert!(stderr.starts_with("error: no VM answers on"), "{stderr}");
    // The killed VM left its socket file behind.
    let _ = std::fs::remove_file(format!("/run/vmm/{name}.sock"));
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        let _ = std::fs::remove_file(Path::new(&dir).join(format!("vmm/{name}.sock")));
    }
}

/// The kernel timestamp (`[  123.456789]`) of the last line containing `needle`.
fn stamp(text: &str, needle: &str) -> f64 {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}: {text}"));
    line.split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or_else(|| panic!("no timestamp in {line:?}"))
}

/// The booted kernel-only guest (its PID 1 spins in user mode, the kernel takes timer
/// interrupts on both vCPUs), restored from the test fixture: after 1000 pause/resume
/// cycles the kernel still answers SysRq, reports no lockup or stall, and its clock moved
/// on by about as much as the host's.
#[test]
fn a_booted_guest_survives_a_thousand_pauses_with_a_sane_clock() {
    require_kvm();
    const T: Duration = Duration::from_secs(300);
    let mut guest = restore_fixture("pauses");
    let s = guest.api_socket.clone();
    guest.sysrq('h');
    let text = guest.wait_for("show-task-states", T);
    let (guest0, host0) = (stamp(&text, "sysrq: HELP"), Instant::now());

    for i in 0..1000 {
        let (status, v) = put_state(&s, "paused");
        assert_eq!(status, 200, "pause {i}: {v}");
        let (status, v) = put_state(&s, "running");
        assert_eq!(status, 200, "resume {i}: {v}");
    }
    assert!(guest.is_running(), "vmm exited: {}", guest.stderr());

    guest.sysrq('h');
    let text = guest.wait_for("show-task-states", T);
    let (guest1, host1) = (stamp(&text, "sysrq: HELP"), host0.elapsed().as_secs_f64());
    let guest1 = guest1 - guest0;
    eprintln!("guest clock advanced {guest1:.3} s while the host's advanced {host1:.3} s");
    assert!(guest1 > 0.0, "the guest clock did not move: {text}");
    assert!(
        (guest1 - host1).abs() < 2.0 + 0.25 * host1,
        "guest clock {guest1:.3} s vs host {host1:.3} s"
    );
    let all = guest.output();
    for bad in [
        "soft lockup",
        "hard LOCKUP",
        "rcu_sched self-detected stall",
        "BUG:",
    ] {
        assert!(!all.contains(bad), "{bad:?} on the console: {all}");
    }
    // Both vCPUs are still alive.
    guest.sysrq('l');
    guest.wait_for("NMI backtrace for cpu 1", T);
    drop(guest);
}
