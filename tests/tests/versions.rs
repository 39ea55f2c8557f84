//! Patch versions and sticky bundles (the versioning RFC) on a real guest: cumulative
//! bundles of SysRq 'm''s handler at versions 2, 1 and 3 (sticky). The guest's console
//! shows which handler runs.

use std::time::Duration;

use integration_tests::{
    api, build_sample_bundle, disable_patch, json, kernel_digest, put_patch, restore_fixture, Guest,
};

const T: Duration = Duration::from_secs(300);
const PATCHED: &str = "this has been live patched (sysrq m)";

/// SysRq 'm' and whether the patched handler answered (else the kernel's own report,
/// which is waited for to its end, so the next break is not lost).
fn patched_handler_runs(guest: &mut Guest) -> bool {
    guest.sysrq('m');
    guest.wait_for("sysrq: Show Memory", T);
    // The handler's first line follows (the rest of this line is its end).
    guest.wait_for("\n", T);
    let patched = guest.wait_for("\n", T).contains(PATCHED);
    if !patched {
        guest.wait_for("pages reserved", T);
    }
    std::thread::sleep(Duration::from_secs(2));
    patched
}

fn enabled(s: &std::path::Path) -> Vec<String> {
    json(&api(s, "GET", "/patches", "").1)["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["status"] == "enabled")
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn versions_only_go_up_and_sticky_bundles_are_only_superseded() {
    let sample = |m| build_sample_bundle("sysrq-showmem", m, "livepatch_sysrq.c");
    let (v2, v1, sticky) = (
        sample("manifest-cumulative.json"),
        sample("manifest-cumulative-v1.json"),
        sample("manifest-sticky.json"),
    );
    let mut guest = restore_fixture("versions");
    let s = guest.api_socket.clone();
    let put = |bundle: &str, extra: &str| put_patch(&s, bundle, extra);
    assert!(!patched_handler_runs(&mut guest));

    let (status, body) = put(&v2, "");
    assert_eq!(status, 200, "{body}");
    assert!(patched_handler_runs(&mut guest));

    // Version 1 after version 2 is a downgrade: refused, nothing changes.
    let before = json(&api(&s, "GET", "/patches", "").1);
    let digest = kernel_digest(&s);
    let (status, body) = put(&v1, "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("is not newer than the applied"), "{body}");
    let mut after = json(&api(&s, "GET", "/patches", "").1);
    after["transition"] = before["transition"].clone();
    assert_eq!(before, after);
    assert_eq!(kernel_digest(&s), digest);
    // Allowed explicitly, it replaces version 2 and the downgrade is logged.
    let (status, body) = put(&v1, r#","allow_downgrade":true"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(enabled(&s), ["sysrq-showmem-cumulative-v1"]);
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    assert!(
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["what"]
                == "downgrade allowed: version 1 after sysrq-showmem-cumulative version 2"),
        "{events}"
    );
    assert!(patched_handler_runs(&mut guest));

    // A sticky version 3 cannot be disabled; the guest keeps running it.
    let (status, body) = put(&sticky, "");
    assert_eq!(status, 200, "{body}");
    let digest = kernel_digest(&s);
    let (status, body) = disable_patch(&s, "sysrq-showmem-sticky");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("is sticky"), "{body}");
    assert_eq!(enabled(&s), ["sysrq-showmem-sticky"]);
    assert_eq!(kernel_digest(&s), digest);
    assert!(patched_handler_runs(&mut guest));

    // Only a cumulative bundle supersedes it (here a downgrade, allowed explicitly); that
    // one can be disabled, and the kernel's own handler answers again.
    let (status, body) = put(&v2, r#","allow_downgrade":true"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(enabled(&s), ["sysrq-showmem-cumulative"]);
    let (status, body) = disable_patch(&s, "sysrq-showmem-cumulative");
    assert_eq!(status, 200, "{body}");
    assert!(enabled(&s).is_empty());
    assert!(!patched_handler_runs(&mut guest));
}
