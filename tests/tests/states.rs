//! System states with host-side actions on a running guest: the kernel's test-state.sh
//! scenarios ST-1 (set up, release), ST-2 (a cumulative v2 takes the change over), ST-3
//! (equal state versions are compatible, both ways) and ST-4
//! (an incompatible cumulative bundle is refused), translated. The kernel's test modules
//! change `console_loglevel` in their callbacks; here the bundles' state actions write it
//! (`console_printk[0]`) from the host, inside the transition's pause. The guest shows the
//! effect: with a console log level of 1 or 2, SysRq 'm' prints its header (the kernel
//! raises the level for it) but not the memory report, which it prints at the default level.

use std::time::Duration;

use integration_tests::{
    api, build_sample_bundle, bundle_record, disable_patch, json, kernel_digest, put_patch,
    restore_fixture, run_vmm, vmm_ok, Guest,
};

const T: Duration = Duration::from_secs(300);

fn build(manifest: &str) -> String {
    build_sample_bundle("loglevel-state", manifest, "livepatch_loglevel.c")
}

/// `console_loglevel` as the guest kernel has it now, read through the API.
fn loglevel(s: &std::path::Path) -> i32 {
    let (status, body) = api(s, "GET", "/kernel/text?symbol=console_printk", "");
    assert_eq!(status, 200, "{body}");
    let hex = json(&body)["bytes"].as_str().unwrap().to_string();
    let b: Vec<u8> = (0..4)
        .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    i32::from_le_bytes(b.try_into().unwrap())
}

/// SysRq 'm': whether the memory report reaches the console (its header always does).
fn show_memory_prints_report(guest: &mut Guest) -> bool {
    guest.sysrq('m');
    guest.wait_for("sysrq: Show Memory", T);
    // The report's first line follows the header at once when it is printed at all; a
    // generous wait rules out a slow console.
    std::thread::sleep(Duration::from_secs(10));
    let printed = guest.output_since_last_wait().contains("Mem-Info");
    if printed {
        // A SysRq sent while the report still prints is lost: let it finish.
        guest.wait_for("pages reserved", T);
        std::thread::sleep(Duration::from_secs(3));
    }
    printed
}

/// Disables `name`: the value the state saved first comes back and no state is left.
fn disable_and_check_released(s: &std::path::Path, name: &str, original: i32) {
    let (status, body) = disable_patch(s, name);
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(s), original);
    assert_eq!(
        json(&api(s, "GET", "/patches", "").1)["states"],
        serde_json::json!([])
    );
}

fn transcript(s: &std::path::Path, bundle: &str) -> Vec<String> {
    json(&api(s, "GET", "/patches/events", "").1)["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["bundle"] == bundle)
        .map(|e| e["what"].as_str().unwrap().to_string())
        .filter(|w| !w.starts_with("attempt "))
        .collect()
}

#[test]
fn state_actions_change_the_guest_and_are_taken_over_and_restored() {
    let v1 = build("manifest.json");
    let v2 = build("manifest-v2.json");
    let mut guest = restore_fixture("states");
    let s = guest.api_socket.clone();
    let original = loglevel(&s);
    assert!(
        original > 4,
        "the fixture prints the memory report (level {original})"
    );
    assert!(show_memory_prints_report(&mut guest));

    // ST-1: the state is set up; the guest's console goes quiet.
    let (status, body) = put_patch(&s, &v1, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(&s), 1);
    assert_eq!(
        transcript(&s, "loglevel-state"),
        [
            "enabling patch".to_string(),
            "initializing patching transition".into(),
            "pre-patch: state 1: setting up (version 1)".into(),
            format!("pre-patch: state 1: saved console_printk = {original}"),
            "starting patching transition".into(),
            "completing patching transition".into(),
            format!("post-patch: state 1: console_printk = 1 (was {original})"),
            "patching complete".into(),
        ]
    );
    assert!(!show_memory_prints_report(&mut guest));

    // ST-2: a cumulative v2 takes the change over, writes its own value, keeps the original.
    let (status, body) = put_patch(&s, &v2, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(&s), 2);
    let list = json(&api(&s, "GET", "/patches", "").1);
    let state = &list["states"][0];
    assert_eq!(state["version"], 2, "{list}");
    assert_eq!(state["holders"], serde_json::json!(["loglevel-state2"]));
    assert_eq!(state["taken_over_from"], "loglevel-state");
    assert_eq!(
        state["saved"][0]["original"],
        serde_json::json!(original.to_le_bytes())
    );
    assert!(transcript(&s, "loglevel-state2").contains(
        &"pre-patch: state 1: taking over from loglevel-state (version 1 to 2); saved values kept"
            .to_string()
    ));
    // The replaced bundle ran no actions of its own.
    assert_eq!(
        transcript(&s, "loglevel-state").last().unwrap(),
        "replaced by loglevel-state2"
    );
    let human = vmm_ok(&["patch", "list", "--api-socket", s.to_str().unwrap()], T);
    assert!(
        human.contains(&format!(
            "state 1 version 2: held by loglevel-state2 (taken over from loglevel-state); saved console_printk = {original}"
        )),
        "{human}"
    );

    // ST-4: the v1 bundle is incompatible now (the patch-version downgrade allowed, the
    // state rule still refuses); nothing changes.
    let before = (loglevel(&s), list.clone(), kernel_digest(&s));
    let (status, body) = put_patch(&s, &v1, r#","allow_downgrade":true"#);
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("not compatible with the already installed livepatches"),
        "{body}"
    );
    let after = (
        loglevel(&s),
        json(&api(&s, "GET", "/patches", "").1),
        kernel_digest(&s),
    );
    assert_eq!(before, after);
    // The CLI says the same in one line and exits non-zero.
    let (status, _, err) = run_vmm(
        &[
            "patch",
            "--allow-downgrade",
            "--api-socket",
            s.to_str().unwrap(),
            &v1,
        ],
        T,
    );
    assert!(!status.success());
    assert!(err.contains("not compatible"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // Disabling v2 restores the value saved by v1 and releases the state.
    disable_and_check_released(&s, "loglevel-state2", original);
    let tail: Vec<String> = transcript(&s, "loglevel-state2")
        .into_iter()
        .rev()
        .take(6)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    assert_eq!(
        tail,
        [
            "initializing unpatching transition".to_string(),
            format!("pre-unpatch: state 1: console_printk restored to {original} (was 2)"),
            "starting unpatching transition".into(),
            "completing unpatching transition".into(),
            "post-unpatch: state 1: released".into(),
            "unpatching complete".into(),
        ]
    );
    assert!(show_memory_prints_report(&mut guest));
    // Every event carries a wall-clock timestamp, in order; the CLI prints them.
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let times: Vec<u64> = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["time_us"].as_u64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let printed = vmm_ok(&["patch", "events", "--api-socket", s.to_str().unwrap()], T);
    assert!(
        printed
            .lines()
            .any(|l| l.ends_with(" UTC  loglevel-state2: unpatching complete")),
        "{printed}"
    );
}

/// ST-3, "compatible cumulative livepatches": state2 (state version 2) → state3 (the same
/// state version, accepted, takes the change over) → state2 again (a lower patch version,
/// so only with --allow-downgrade; the equal state version is accepted and takes over
/// back) → disable: the value saved by the first bundle comes back.
#[test]
fn equal_state_versions_are_compatible_both_ways() {
    let v2 = build("manifest-v2.json");
    let v3 = build("manifest-v3.json");
    let guest = restore_fixture("states-st3");
    let s = guest.api_socket.clone();
    let original = loglevel(&s);
    let holder = |s: &std::path::Path| {
        let list = json(&api(s, "GET", "/patches", "").1);
        let st = &list["states"][0];
        assert_eq!(st["version"], 2, "{list}");
        assert_eq!(
            st["saved"][0]["original"],
            serde_json::json!(original.to_le_bytes()),
            "the first bundle's saved value is kept: {list}"
        );
        (
            st["holders"][0].as_str().unwrap().to_string(),
            st["taken_over_from"].as_str().map(str::to_string),
        )
    };

    let (status, body) = put_patch(&s, &v2, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(&s), 2);
    assert_eq!(holder(&s), ("loglevel-state2".into(), None));

    let (status, body) = put_patch(&s, &v3, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(&s), 3);
    assert_eq!(
        holder(&s),
        ("loglevel-state3".into(), Some("loglevel-state2".into()))
    );
    assert!(transcript(&s, "loglevel-state3").contains(
        &"pre-patch: state 1: taking over from loglevel-state2 (version 2 to 2); saved values kept"
            .to_string()
    ));

    // Back to state2: a patch-version downgrade (refused without the flag, nothing
    // changed), then accepted with it; the equal state version takes over again.
    let before = (loglevel(&s), holder(&s), kernel_digest(&s));
    let (status, body) = put_patch(&s, &v2, "");
    assert_eq!(status, 422, "{body}");
    assert_eq!(before, (loglevel(&s), holder(&s), kernel_digest(&s)));
    let (status, body) = put_patch(&s, &v2, r#","allow_downgrade":true"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(loglevel(&s), 2);
    assert_eq!(
        holder(&s),
        ("loglevel-state2".into(), Some("loglevel-state3".into()))
    );
    // The ledger keeps the replaced bundle, marked as replaced by the one now enabled.
    let list = json(&api(&s, "GET", "/patches", "").1);
    let status_of = |name: &str| bundle_record(&list, name).map(|b| b["status"].clone());
    assert_eq!(
        status_of("loglevel-state2"),
        Some("enabled".into()),
        "{list}"
    );
    assert_eq!(
        status_of("loglevel-state3"),
        Some(serde_json::json!({"replaced": {"by": "loglevel-state2"}})),
        "{list}"
    );

    disable_and_check_released(&s, "loglevel-state2", original);
}
