//! Bad bundles on a running guest (issue #5's bad-input list): each is refused with a
//! precise message, and the guest's kernel text and the whole patch area hash the same
//! before and after (`GET /kernel/digest`, read with the vCPUs paused), as does the ledger.
//!
//! Each bad bundle is a copy of one good bundle, wrong in exactly one way and
//! re-checksummed (`repack_bundle`), except two that are built from their own sources:
//! one too big for the patch area, and one whose 32-bit absolute reference to a kernel
//! variable cannot be relocated (`reloc-overflow`).

use std::path::PathBuf;

use integration_tests::{
    api, build_sample_bundle, disable_patch, json, kernel_digest, put_patch, repack_bundle,
    restore_fixture,
};
use serde_json::Value;

/// The digests and the ledger: everything a refusal must leave as it was.
fn guest_state(s: &std::path::Path) -> (Value, Value) {
    let digest = kernel_digest(s);
    for part in ["kernel_text", "patch_area", "patch_table"] {
        assert_eq!(
            digest[part]["sha256"].as_str().map(str::len),
            Some(64),
            "{digest}"
        );
    }
    let patches = json(&api(s, "GET", "/patches", "").1);
    (digest, patches["bundles"].clone())
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmm-refusal-{}-{name}.bundle", std::process::id()))
}

#[test]
fn bad_bundles_are_refused_and_leave_kernel_text_and_patch_area_unchanged() {
    let good = build_sample_bundle("sysrq-showmem", "manifest.json", "livepatch_sysrq.c");
    let oversized = build_sample_bundle("oversized", "manifest.json", "livepatch_oversized.c");
    let overflow = build_sample_bundle(
        "reloc-overflow",
        "manifest.json",
        "livepatch_reloc_overflow.c",
    );
    let bytes = std::fs::read(&good).unwrap();

    let truncated = scratch("truncated");
    std::fs::write(&truncated, &bytes[..bytes.len() - 100]).unwrap();
    let corrupt = scratch("corrupt");
    let mut flipped = bytes.clone();
    let at = flipped.len() - 200; // inside the object
    flipped[at] ^= 0xff;
    std::fs::write(&corrupt, &flipped).unwrap();
    let variant = |name: &str, version: u32, edit: &dyn Fn(&mut Value)| {
        let out = scratch(name);
        repack_bundle(&good, &out, version, edit);
        out
    };
    let future = variant("future", 2, &|_| {});
    let other_kernel = variant("build-id", 1, &|m| {
        m["target"]["build_id"] = "00".repeat(20).into();
    });
    let other_release = variant("release", 1, &|m| {
        m["target"]["release"] = "6.1.0-99-cloud-amd64".into();
    });
    let unknown = variant("unknown", 1, &|m| {
        m["functions"][0]["old"] = "no_such_function_in_this_kernel".into();
    });
    let ambiguous = variant("ambiguous", 1, &|m| {
        m["functions"][0]["old"] = "pgd_val".into();
    });
    let no_such_pos = variant("sympos", 1, &|m| {
        m["functions"][0]["old"] = "pgd_val".into();
        m["functions"][0]["sympos"] = 9.into();
    });
    // An assembly entry point: it starts with `swapgs`, not the fentry NOP.
    let no_nop = variant("no-nop", 1, &|m| {
        m["functions"][0]["old"] = "entry_SYSCALL_64".into();
    });
    let path = |p: &PathBuf| p.display().to_string();
    let cases: Vec<(String, &str)> = vec![
        (path(&truncated), "truncated"),
        (path(&corrupt), "checksum mismatch"),
        (path(&future), "format version 2 is not supported"),
        (path(&other_kernel), "the guest runs"),
        (path(&other_release), "the guest runs"),
        (path(&unknown), "no_such_function_in_this_kernel"),
        (path(&ambiguous), "ambiguous"),
        (path(&no_such_pos), "has no sympos 9"),
        (path(&no_nop), "does not start with the fentry NOP"),
        (oversized.clone(), "but the patch area has"),
        (
            overflow.clone(),
            "relocation R_X86_64_32 at .rodata+0x0 against jiffies overflows",
        ),
        ("/nonexistent/bundle".to_string(), "/nonexistent/bundle"),
    ];

    let guest = restore_fixture("refusals");
    let s = guest.api_socket.clone();
    let before = guest_state(&s);
    for (bundle, expect) in &cases {
        let (status, body) = put_patch(&s, bundle, "");
        assert!(
            (400..500).contains(&status),
            "{bundle}: HTTP {status} {body}"
        );
        let error = json(&body)["error"].as_str().unwrap_or("").to_string();
        assert!(
            error.contains(expect),
            "{bundle}: {error:?} lacks {expect:?}"
        );
        assert!(!error.contains('\n'), "{bundle}: not one line: {error:?}");
        eprintln!("refused (HTTP {status}): {error}");
        assert_eq!(guest_state(&s), before, "{bundle} changed the guest");
    }

    // Disabling a bundle that is not applied changes nothing either.
    let (status, body) = disable_patch(&s, "sysrq-showmem-demo");
    assert!((400..500).contains(&status), "HTTP {status} {body}");
    assert!(body.contains("not applied"), "{body}");
    assert_eq!(guest_state(&s), before);

    // A good bundle changes the text (its redirection), the area (its code) and the area's
    // page table (the code's pages); applying it a second time is refused and changes none
    // of them again.
    let (status, body) = put_patch(&s, &good, "");
    assert_eq!(status, 200, "{body}");
    let applied = guest_state(&s);
    assert_ne!(applied.0["kernel_text"], before.0["kernel_text"]);
    assert_ne!(applied.0["patch_area"], before.0["patch_area"]);
    assert_ne!(applied.0["patch_table"], before.0["patch_table"]);
    let (status, body) = put_patch(&s, &good, "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("already applied"), "{body}");
    assert_eq!(guest_state(&s), applied);

    // Disabled, the kernel text is byte-for-byte what it was.
    let (status, body) = disable_patch(&s, "sysrq-showmem-demo");
    assert_eq!(status, 200, "{body}");
    let after = guest_state(&s);
    assert_eq!(after.0["kernel_text"], before.0["kernel_text"]);
    for p in [
        truncated,
        corrupt,
        future,
        other_kernel,
        other_release,
        unknown,
        ambiguous,
        no_such_pos,
        no_nop,
    ] {
        let _ = std::fs::remove_file(p);
    }
}
