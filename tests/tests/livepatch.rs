//! Live patching the stock kernel of a running (restored, kernel-only) guest from the host.
//! The patch replaces SysRq 'm''s handler; the guest's own console shows the effect.
//!
//! The consistency check walks every task's kernel stack (ORC, from guest memory) with the
//! vCPUs paused: a patch nobody is executing goes in at once; a patch of a function a
//! task sleeps in is refused at its deadline with the kernel text unchanged.

use std::time::Duration;

use integration_tests::{
    api, assert_logged, build_sample_bundle, bundle_record, disable_patch, json, put_patch,
    restore_fixture, vmm_binary, wait_for_attempts, wait_for_socket, Guest,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(300);

fn build_bundle(sample: &str, source: &str) -> String {
    build_sample_bundle(sample, "manifest.json", source)
}

#[test]
fn patch_a_sysrq_handler_and_revert_it() {
    let bundle = build_bundle("sysrq-showmem", "livepatch_sysrq.c");
    let mut guest = restore_fixture("livepatch");
    let s = guest.api_socket.clone();
    guest.sysrq('m');
    guest.wait_for("Mem-Info", T);
    // The kernel runs a SysRq handler in the UART's interrupt handler: a second break sent
    // while the first one's report is still printing is lost, so let it finish.
    guest.wait_for("pages reserved", T);
    std::thread::sleep(Duration::from_secs(3));

    // No task is inside the SysRq handler: the stack check clears the transition.
    let started = std::time::Instant::now();
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["name"], "sysrq-showmem-demo");
    assert_eq!(json(&body)["forced"], false);
    let took = started.elapsed();
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let stopped: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["what"].as_str())
        .filter(|w| w.contains("vCPUs stopped for"))
        .collect();
    assert_eq!(stopped.len(), 1, "one attempt: {stopped:?}");
    // Figures for docs/benchmarks.md (not asserted).
    eprintln!(
        "livepatch: PUT /patches answered in {took:?}; {}",
        stopped[0]
    );
    guest.sysrq('m');
    guest.wait_for("this has been live patched (sysrq m)", T);
    std::thread::sleep(Duration::from_secs(2));
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert_eq!(list["bundles"][0]["status"], "enabled");
    let first_place = list["bundles"][0]["memory"]["base"].as_u64().unwrap();
    // The redirected entry is write-protected (a read-only memory slot + the text guard).
    let guard = &json(&api(&s, "GET", "/vm", "").1)["text_guard"];
    assert_eq!(guard["protected_sites"], 1, "{guard}");
    assert!(guard["read_only_pages"].as_u64().unwrap() >= 1, "{guard}");
    assert_eq!(list["bundles"][0]["forced"], false);
    assert_eq!(
        list["bundles"][0]["functions"][0]["old"],
        "sysrq_handle_showmem"
    );

    // Applying it again is refused.
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("already applied"), "{body}");

    // Disable: the original handler runs again.
    let (status, body) = disable_patch(&s, "sysrq-showmem-demo");
    assert_eq!(status, 200, "{body}");
    let guard = &json(&api(&s, "GET", "/vm", "").1)["text_guard"];
    assert_eq!(guard["protected_sites"], 0, "{guard}");
    assert_eq!(guard["read_only_pages"], 0, "{guard}");
    guest.sysrq('m');
    guest.wait_for("Mem-Info", T);
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let whats: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    // The kernel's transcript for an enable and a disable (functions.sh), with the host's
    // per-attempt lines left out.
    let transcript: Vec<&str> = whats
        .iter()
        .copied()
        .filter(|w| !w.starts_with("attempt "))
        .collect();
    // Its patch memory is free again once the disable has cleared the stack check.
    assert!(
        transcript
            .last()
            .unwrap()
            .starts_with("patch memory released ("),
        "{transcript:?}"
    );
    let transcript = &transcript[..transcript.len() - 1];
    assert_eq!(
        transcript,
        [
            "enabling patch",
            "initializing patching transition",
            "starting patching transition",
            "completing patching transition",
            "patching complete",
            "rejected: bundle sysrq-showmem-demo is already applied",
            "initializing unpatching transition",
            "starting unpatching transition",
            "completing unpatching transition",
            "unpatching complete",
        ]
    );
    // Disabling what is not applied is refused.
    let (status, _) = disable_patch(&s, "sysrq-showmem-demo");
    assert_eq!(status, 422);
    // Applied again, it reuses the memory it had: the patch area does not leak.
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 200, "{body}");
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert_eq!(list["bundles"][0]["status"], "enabled", "{list}");
    assert_eq!(
        list["bundles"][0]["memory"]["base"].as_u64(),
        Some(first_place)
    );
    // The original handler's report (after the disable) must end before the next break.
    guest.wait_for("pages reserved", T);
    std::thread::sleep(Duration::from_secs(3));
    guest.sysrq('m');
    guest.wait_for("this has been live patched (sysrq m)", T);
}

#[test]
fn a_patch_of_a_function_a_task_sleeps_in_is_refused_and_changes_nothing() {
    let bundle = build_bundle("busy-kthreadd", "livepatch_kthreadd.c");
    let guest = restore_fixture("blocked");
    let s = guest.api_socket.clone();
    let text = |s: &std::path::Path| {
        let (status, body) = api(s, "GET", "/kernel/text?symbol=kthreadd", "");
        assert_eq!(status, 200, "{body}");
        json(&body)["bytes"].as_str().unwrap().to_string()
    };
    let before = text(&s);
    let (status, body) = put_patch(&s, &bundle, r#","deadline_ms":2000"#);
    assert_eq!(status, 422, "{body}");
    // The blocker names the task and where it sleeps.
    assert!(body.contains("kthreadd"), "{body}");
    assert!(body.contains("pid 2"), "{body}");
    assert_eq!(
        json(&api(&s, "GET", "/patches", "").1)["bundles"],
        serde_json::json!([])
    );
    assert_eq!(text(&s), before, "kthreadd's text changed");
}

#[test]
fn a_snapshot_of_a_patched_guest_restores_its_patches() {
    let bundle = build_bundle("sysrq-showmem", "livepatch_sysrq.c");
    let guest = restore_fixture("persist");
    let s = guest.api_socket.clone();
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 200, "{body}");
    let before = json(&api(&s, "GET", "/patches", "").1);
    let dir = std::env::temp_dir().join(format!("vmm-patched-snap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (status, body) = api(
        &s,
        "PUT",
        "/snapshot",
        &format!(r#"{{"dir":"{}","stop":true}}"#, dir.display()),
    );
    assert_eq!(status, 200, "{body}");
    // The first guest stops with the snapshot; it is kept (with the private disk the
    // snapshot names) until the end of the test.
    let mut guest = guest;
    assert!(guest.wait_exit(Duration::from_secs(60)).success());

    // The restored VM knows what its kernel runs: the same ledger, the patch refused as
    // already applied, and the replacement still answering SysRq 'm'.
    // (The snapshot names the first guest's private disk, which is still there.)
    let mut again = Guest::start(&["run", "--restore", dir.to_str().unwrap()]);
    wait_for_socket(&again.api_socket, Duration::from_secs(60));
    let s2 = again.api_socket.clone();
    assert_eq!(json(&api(&s2, "GET", "/patches", "").1), before);
    let guard = &json(&api(&s2, "GET", "/vm", "").1)["text_guard"];
    assert_eq!(guard["protected_sites"], 1, "{guard}");
    let (status, body) = put_patch(&s2, &bundle, "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("already applied"), "{body}");
    again.sysrq('m');
    again.wait_for("this has been live patched (sysrq m)", T);
    let (status, body) = disable_patch(&s2, "sysrq-showmem-demo");
    assert_eq!(status, 200, "{body}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_cumulative_bundle_releases_the_memory_of_what_it_replaces() {
    let demo = build_bundle("sysrq-showmem", "livepatch_sysrq.c");
    let cumulative = build_sample_bundle(
        "sysrq-showmem",
        "manifest-cumulative.json",
        "livepatch_sysrq.c",
    );
    let mut guest = restore_fixture("patch-memory");
    let s = guest.api_socket.clone();
    let put = |bundle: &str| put_patch(&s, bundle, "");
    let memory_of = |list: &Value, name: &str| {
        bundle_record(list, name)
            .map(|b| b["memory"].clone())
            .unwrap_or_else(|| panic!("{name} not in {list}"))
    };

    let (status, body) = put(&demo);
    assert_eq!(status, 200, "{body}");
    let list = json(&api(&s, "GET", "/patches", "").1);
    let demo_base = memory_of(&list, "sysrq-showmem-demo")["base"]
        .as_u64()
        .unwrap();
    let demo_kib = memory_of(&list, "sysrq-showmem-demo")["size"]
        .as_u64()
        .unwrap()
        / 1024;

    // The cumulative bundle is placed while the demo is loaded, then retires it: the
    // demo's memory counted as busy in that transition and is released when it completes.
    let (status, body) = put(&cumulative);
    assert_eq!(status, 200, "{body}");
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert!(memory_of(&list, "sysrq-showmem-demo").is_null(), "{list}");
    let cumulative_base = memory_of(&list, "sysrq-showmem-cumulative")["base"]
        .as_u64()
        .unwrap();
    assert!(cumulative_base > demo_base, "{list}");
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let demo_events: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["bundle"] == "sysrq-showmem-demo")
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        &demo_events[demo_events.len() - 2..],
        [
            "replaced by sysrq-showmem-cumulative".to_string(),
            format!("patch memory released ({demo_kib} KiB at {demo_base:#x})"),
        ]
    );
    // The guest runs the cumulative bundle's code.
    guest.sysrq('m');
    guest.wait_for("this has been live patched (sysrq m)", T);

    // The demo applied on top of it goes into the space it left.
    let (status, body) = put(&demo);
    assert_eq!(status, 200, "{body}");
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert_eq!(
        memory_of(&list, "sysrq-showmem-demo")["base"].as_u64(),
        Some(demo_base),
        "{list}"
    );
}

/// A blocked transition runs one pause per attempt, driven by the VMM's event loop: the
/// guest's console and the API keep answering between attempts; a second transition is
/// refused meanwhile; disabling the bundle reverses its transition (nothing was written),
/// through the API or by Ctrl-C on `vmm patch`, which prints progress while it waits.
#[test]
fn a_blocked_transition_can_be_reversed_while_the_guest_and_api_carry_on() {
    let busy = build_bundle("busy-kthreadd", "livepatch_kthreadd.c");
    let other = build_bundle("sysrq-showmem", "livepatch_sysrq.c");
    let mut guest = restore_fixture("reverse");
    let s = guest.api_socket.clone();
    let text = |s: &std::path::Path| {
        json(&api(s, "GET", "/kernel/text?symbol=kthreadd", "").1)["bytes"].clone()
    };
    let before = text(&s);
    let transition =
        |s: &std::path::Path| json(&api(s, "GET", "/patches", "").1)["transition"].clone();
    let start_cli = || {
        std::process::Command::new(vmm_binary())
            .args([
                "patch",
                "--deadline",
                "120",
                "--api-socket",
                s.to_str().unwrap(),
                &busy,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let wait_attempts = |s: &std::path::Path, n: u64| {
        let start = std::time::Instant::now();
        loop {
            let t = transition(s);
            if t["attempts"].as_u64().unwrap_or(0) >= n {
                return t;
            }
            assert!(start.elapsed() < T, "no transition in flight: {t}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Through the API: the CLI waits while the transition is blocked by kthreadd.
    let cli = start_cli();
    let t = wait_attempts(&s, 2);
    assert_eq!(t["bundle"], "busy-kthreadd-demo", "{t}");
    assert_eq!(t["kind"], "patching", "{t}");
    // The guest's console works between attempts, and so does the API.
    guest.sysrq('h');
    guest.wait_for("sysrq: HELP", T);
    let (status, body) = api(&s, "GET", "/vm", "");
    assert_eq!(status, 200, "{body}");
    // One transition at a time (the kernel's -EBUSY).
    let (status, body) = put_patch(&s, &other, "");
    assert_eq!(status, 409, "{body}");
    assert!(
        body.contains("busy-kthreadd-demo is in transition"),
        "{body}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = disable_patch(&s, "busy-kthreadd-demo");
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["reversed"], true, "{body}");
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("was disabled while in transition"), "{err}");
    assert!(
        err.contains("busy-kthreadd-demo: patching transition blocked, "),
        "progress: {err}"
    );
    assert!(transition(&s).is_null());
    assert_eq!(text(&s), before, "kthreadd's text changed");
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert_eq!(list["bundles"], serde_json::json!([]), "{list}");
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let whats: Vec<&str> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["what"].as_str().unwrap())
        .collect();
    assert_eq!(
        &whats[whats.len() - 2..],
        [
            "reversing transition from patching to unpatching",
            "unpatching complete (nothing had been written)"
        ]
    );

    // By Ctrl-C on the client.
    let cli = start_cli();
    wait_attempts(&s, 2);
    // The shell's builtin kill: nothing beyond sh needed on the host.
    let sent = std::process::Command::new("sh")
        .args(["-c", &format!("kill -INT {}", cli.id())])
        .status()
        .unwrap();
    assert!(sent.success());
    let out = cli.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("interrupted: disabling busy-kthreadd-demo"),
        "{err}"
    );
    assert!(transition(&s).is_null());
    assert_eq!(text(&s), before, "kthreadd's text changed");
    // Nothing is left behind: the other bundle applies.
    let (status, body) = put_patch(&s, &other, "");
    assert_eq!(status, 200, "{body}");
}

/// A replacement that calls a static kernel function whose name is not unique (the second
/// `pgd_val`, by sympos from the manifest), reads globals (`jiffies`, `_totalram_pages`)
/// and a per-CPU variable (`cpu_number`), and prints what it found on the console.
#[test]
fn a_replacement_calls_static_functions_and_reads_globals_and_per_cpu_data() {
    let bundle = build_sample_bundle("sysrq-calls", "manifest.json", "livepatch_sysrq_calls.c");
    let mut guest = restore_fixture("calls");
    let s = guest.api_socket.clone();
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 200, "{body}");
    guest.sysrq('w');
    guest.wait_for("this has been live patched (sysrq w): ", T);
    let line = guest.wait_for("\n", T);
    // "cpu N, jiffies J, totalram P pages, pgd_val(0x1000) = 0x1000"
    let field = |name: &str| -> u64 {
        let rest = &line[line
            .find(name)
            .unwrap_or_else(|| panic!("{name} in {line}"))
            + name.len()..];
        let digits: String = rest
            .trim_start()
            .chars()
            .take_while(|c| c.is_ascii_hexdigit() || *c == 'x')
            .collect();
        match digits.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).unwrap(),
            None => digits
                .parse()
                .unwrap_or_else(|e| panic!("{name}: {e} in {line}")),
        }
    };
    assert!(field("cpu ") < 2, "{line}");
    assert!(field("jiffies ") > 0, "{line}");
    let pages = field("totalram ");
    assert!(pages > 1000 && pages <= 512 * 256, "{line}");
    assert_eq!(field("= "), 0x1000, "{line}");
}

/// A task whose stack runs through a bundle's own code: the host unwinds that code with the
/// bundle's ORC rows, so the task's trace is reliable and names the patch's frames
/// (`function+0xoff/0xsize [bundle]`); disabling the bundle waits for the task, which the
/// report names from that reliable trace (no conservative scan); and a cumulative bundle
/// that retires it keeps retrying and completes once the task has left.
#[test]
fn a_task_sleeping_in_patch_code_has_a_reliable_trace_and_holds_off_its_removal() {
    let bundle = build_bundle("patch-sleeper", "livepatch_patch_sleeper.c");
    let mut guest = restore_fixture("sleeper");
    let s = guest.api_socket.clone();
    let (status, body) = put_patch(&s, &bundle, "");
    assert_eq!(status, 200, "{body}");
    guest.sysrq('n');
    let out = guest.wait_for("sleeps in the live patch", T);
    let pid: i32 = out
        .lines()
        .find_map(|l| l.split("patch-sleeper: pid ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    // Let it reach its sleep.
    std::thread::sleep(Duration::from_secs(3));

    let socket = s.display().to_string();
    let st = integration_tests::vmm_ok(&["stack", &pid.to_string(), "--api-socket", &socket], T);
    assert_eq!(st.lines().last(), Some("reliable"), "{st}");
    let frames: Vec<&str> = st.lines().filter(|l| l.starts_with("[<0>]")).collect();
    assert!(
        frames
            .iter()
            .any(|f| f.contains("patch_sleeper_loop+") && f.ends_with(" [patch-sleeper]")),
        "{st}"
    );
    assert!(
        frames.iter().any(|f| f.contains("schedule_timeout")),
        "{st}"
    );
    assert!(
        frames.last().is_some_and(|f| f.contains("ret_from_fork")),
        "{st}"
    );

    // Its code is in use: the disable is refused at the deadline, naming the task.
    let (status, body) = disable_patch(&s, "patch-sleeper");
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains(&format!("pid {pid} (patch-sleeper)")),
        "{body}"
    );
    assert!(body.contains("[patch-sleeper]"), "{body}");
    assert!(!body.contains("unreliable"), "{body}");
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert_eq!(list["bundles"][0]["status"], "enabled", "{list}");
    // The listing names the code the unwinder knows and counts its ORC rows.
    let code = &list["bundles"][0]["code"];
    assert!(code["orc"]["rows"].as_u64().unwrap_or(0) > 0, "{list}");
    assert!(
        code["functions"]
            .as_array()
            .is_some_and(|f| f.iter().any(|f| f[0] == "patch_sleeper_loop")),
        "{list}"
    );

    // A cumulative bundle that retires it waits for the task as well, and completes as
    // soon as the task has left the patch's code (SysRq 'n' again makes it return).
    let revert = build_sample_bundle(
        "patch-sleeper",
        "manifest-replace.json",
        "livepatch_patch_sleeper.c",
    );
    let s2 = s.clone();
    let put = std::thread::spawn(move || put_patch(&s2, &revert, r#","deadline_ms":120000"#));
    wait_for_attempts(&s, 2, Duration::from_secs(60));
    guest.sysrq('n');
    let (status, body) = put.join().unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["attempts"].as_u64().unwrap() >= 2, "{body}");
    assert!(
        guest
            .output()
            .contains(&format!("patch-sleeper: pid {pid} leaves the live patch")),
        "the transition completed before the task left"
    );
    assert_logged(&s, "patch-sleeper-revert", |w| {
        w.contains(&format!("blocked by: pid {pid} (patch-sleeper)"))
    });
    // Retired, and its memory released (nothing runs in it any more).
    assert_logged(&s, "patch-sleeper", |w| {
        w.starts_with("patch memory released")
    });
}
