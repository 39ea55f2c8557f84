//! The kernel livepatch selftests' "multiple livepatches" (LP-2) and "atomic replace"
//! (LP-3) scenarios (test-livepatch.sh), on a real guest. The guest cannot run user space
//! here (docs/pvm.md), so the patched functions are SysRq handlers, observed on the serial
//! console in place of /proc/cmdline and /proc/meminfo: 'm' (show memory), 'w' (show
//! blocked tasks) and a loglevel digit (the current level, so the original handler changes
//! nothing). Each replacement prints `this has been live patched (sysrq KEY)`.

use std::path::Path;
use std::time::Duration;

use integration_tests::{
    api, build_sample_bundle, disable_patch, json, put_patch, restore_fixture, Guest,
};
use serde_json::Value;

const T: Duration = Duration::from_secs(300);

/// `console_loglevel` as a SysRq key.
fn loglevel_key(s: &Path) -> char {
    let (status, body) = api(s, "GET", "/kernel/text?symbol=console_printk", "");
    assert_eq!(status, 200, "{body}");
    let hex = json(&body)["bytes"].as_str().unwrap().to_string();
    let level = u8::from_str_radix(&hex[..2], 16).unwrap();
    assert!(level <= 9, "console_loglevel {level}");
    char::from(b'0' + level)
}

/// Which of the three handlers run patched code: SysRq each and look at what follows
/// the kernel's header line for it.
struct Handlers {
    loglevel: char,
}

impl Handlers {
    fn one(&self, guest: &mut Guest, key: char) -> bool {
        let (header, end) = match key {
            'm' => ("sysrq: Show Memory", Some("pages reserved")),
            'w' => ("sysrq: Show Blocked State", None),
            _ => ("sysrq: Changing Loglevel", Some("Loglevel set to")),
        };
        guest.sysrq(key);
        guest.wait_for(header, T);
        // The handler's first line follows the header at once; allow for a slow console.
        std::thread::sleep(Duration::from_secs(3));
        let marker = format!("this has been live patched (sysrq {key})");
        let patched = guest.output_since_last_wait().contains(&marker);
        if patched {
            guest.wait_for(&marker, T);
        } else if let Some(end) = end {
            // A SysRq sent while the original handler still prints is lost.
            guest.wait_for(end, T);
        }
        std::thread::sleep(Duration::from_secs(1));
        patched
    }

    /// (showmem, blocked, loglevel) patched?
    fn all(&self, guest: &mut Guest) -> (bool, bool, bool) {
        (
            self.one(guest, 'm'),
            self.one(guest, 'w'),
            self.one(guest, self.loglevel),
        )
    }
}

fn bundle(manifest: &str) -> String {
    build_sample_bundle("sysrq-multi", manifest, "livepatch_sysrq_multi.c")
}

fn put(s: &Path, bundle: &str) {
    let (status, body) = put_patch(s, bundle, "");
    assert_eq!(status, 200, "{body}");
}

fn disable(s: &Path, name: &str) {
    let (status, body) = disable_patch(s, name);
    assert_eq!(status, 200, "{body}");
}

/// (name, status, stack_order) of every bundle in the ledger.
fn ledger(s: &Path) -> Vec<(String, Value, u64)> {
    json(&api(s, "GET", "/patches", "").1)["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_string(),
                b["status"].clone(),
                b["stack_order"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// LP-2: two independent bundles coexist; removing the newer leaves the older.
#[test]
fn multiple_livepatches() {
    let (showmem, blocked) = (
        bundle("manifest-showmem.json"),
        bundle("manifest-blocked.json"),
    );
    let mut guest = restore_fixture("lp2");
    let s = guest.api_socket.clone();
    let h = Handlers {
        loglevel: loglevel_key(&s),
    };
    assert_eq!(h.all(&mut guest), (false, false, false));
    put(&s, &showmem);
    assert_eq!(h.all(&mut guest), (true, false, false));
    put(&s, &blocked);
    assert_eq!(h.all(&mut guest), (true, true, false));
    let enabled = Value::from("enabled");
    assert_eq!(
        ledger(&s),
        [
            ("sysrq-multi-showmem".to_string(), enabled.clone(), 1),
            ("sysrq-multi-blocked".to_string(), enabled.clone(), 2),
        ]
    );
    disable(&s, "sysrq-multi-blocked");
    assert_eq!(h.all(&mut guest), (true, false, false));
    disable(&s, "sysrq-multi-showmem");
    assert_eq!(h.all(&mut guest), (false, false, false));
}

/// LP-3: three bundles, then a cumulative one carrying only showmem: in one transition the
/// functions only the older bundles patched go back to the kernel's code, the three are
/// `replaced` (no actions of theirs run), and disabling the cumulative bundle leaves
/// nothing patched rather than falling back to them.
#[test]
fn atomic_replace_livepatch() {
    let bundles = [
        bundle("manifest-showmem.json"),
        bundle("manifest-blocked.json"),
        bundle("manifest-loglevel.json"),
    ];
    let cumulative = bundle("manifest-cumulative.json");
    let mut guest = restore_fixture("lp3");
    let s = guest.api_socket.clone();
    let h = Handlers {
        loglevel: loglevel_key(&s),
    };
    for b in &bundles {
        put(&s, b);
    }
    assert_eq!(h.all(&mut guest), (true, true, true));
    put(&s, &cumulative);
    assert_eq!(h.all(&mut guest), (true, false, false));
    let replaced = serde_json::json!({"replaced": {"by": "sysrq-multi-cumulative"}});
    let names: Vec<(String, Value)> = ledger(&s).into_iter().map(|(n, st, _)| (n, st)).collect();
    assert_eq!(
        names,
        [
            ("sysrq-multi-showmem".to_string(), replaced.clone()),
            ("sysrq-multi-blocked".to_string(), replaced.clone()),
            ("sysrq-multi-loglevel".to_string(), replaced.clone()),
            ("sysrq-multi-cumulative".to_string(), Value::from("enabled")),
        ]
    );
    // One transition did it: one successful attempt for the cumulative bundle.
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let of = |name: &str| -> Vec<String> {
        events["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["bundle"] == name)
            .map(|e| e["what"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        of("sysrq-multi-cumulative")
            .iter()
            .filter(|w| w.starts_with("completing patching transition"))
            .count(),
        1
    );
    for name in [
        "sysrq-multi-showmem",
        "sysrq-multi-blocked",
        "sysrq-multi-loglevel",
    ] {
        let log = of(name);
        assert!(
            log.contains(&"replaced by sysrq-multi-cumulative".to_string()),
            "{name}: {log:?}"
        );
        assert!(
            !log.iter().any(|w| w.contains("unpatch")),
            "{name}: {log:?}"
        );
    }
    disable(&s, "sysrq-multi-cumulative");
    assert_eq!(h.all(&mut guest), (false, false, false));
    // Nothing is in the patch area any more.
    let list = json(&api(&s, "GET", "/patches", "").1);
    assert!(
        list["bundles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["memory"].is_null()),
        "{list}"
    );
}

/// FO-1: a forced apply (kthreadd sleeps in the function, so the check would never clear)
/// is recorded as forced, and its code is never released, even after a clean disable: a
/// task may still run it (the kernel keeps a forced patch's module loaded for good).
#[test]
fn forced_bundles_keep_their_memory() {
    let busy = build_sample_bundle("busy-kthreadd", "manifest.json", "livepatch_kthreadd.c");
    let guest = restore_fixture("fo1");
    let s = guest.api_socket.clone();
    let text = || json(&api(&s, "GET", "/kernel/text?symbol=kthreadd", "").1)["bytes"].clone();
    let before = text();
    let (status, body) = put_patch(&s, &busy, r#","force":true"#);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["forced"], true, "{body}");
    assert_ne!(text(), before, "kthreadd is redirected");
    let b = &json(&api(&s, "GET", "/patches", "").1)["bundles"][0];
    assert_eq!(
        (&b["forced"], &b["pinned"]),
        (&Value::Bool(true), &Value::Bool(true))
    );
    let memory = b["memory"].clone();
    assert!(memory["size"].as_u64().unwrap() > 0, "{b}");
    // kthreadd still sleeps in its original code, not in the bundle's: the disable clears.
    disable(&s, "busy-kthreadd-demo");
    assert_eq!(text(), before);
    let b = &json(&api(&s, "GET", "/patches", "").1)["bundles"][0];
    assert_eq!(b["status"], "disabled");
    assert_eq!(b["memory"], memory, "pinned memory is kept");
    let events = json(&api(&s, "GET", "/patches/events", "").1);
    let last = events["events"].as_array().unwrap().last().unwrap()["what"].clone();
    assert!(
        last.as_str().unwrap().starts_with("patch memory kept ("),
        "{last}"
    );
}
