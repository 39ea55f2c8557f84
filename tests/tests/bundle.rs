//! `vmm bundle build` and `vmm bundle inspect` with the real Debian kernel headers and
//! kbuild (scripts/setup installs linux-headers-<guest release>).

use std::path::PathBuf;
use std::time::Duration;

use integration_tests::{run_vmm, workspace_root};

const T: Duration = Duration::from_secs(300);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-bundle-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn sample(file: &str) -> String {
    workspace_root()
        .join("guest-images/patches/cmdline")
        .join(file)
        .display()
        .to_string()
}

fn ok(args: &[&str]) -> String {
    let (status, stdout, stderr) = run_vmm(args, T);
    assert!(status.success(), "vmm {args:?} failed: {stderr}");
    stdout
}

fn rejected(args: &[&str], expect: &str) {
    let (status, _, stderr) = run_vmm(args, T);
    assert!(!status.success(), "vmm {args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(expect),
        "{expect:?} not in {stderr}"
    );
}

#[test]
fn builds_and_inspects_the_cmdline_sample_with_kbuild() {
    let out = scratch("cmdline.bundle");
    let out_s = out.display().to_string();
    let built = ok(&[
        "bundle",
        "build",
        &sample("manifest.json"),
        &sample("livepatch_cmdline.c"),
        "-o",
        &out_s,
    ]);
    assert!(built.contains(&out_s), "{built}");
    let shown = ok(&["bundle", "inspect", &out_s]);
    assert!(shown.contains("name:      cmdline-demo"), "{shown}");
    assert!(
        shown.contains("cmdline_proc_show -> livepatch_cmdline_proc_show"),
        "{shown}"
    );

    // The object was compiled with the kernel's flags: an fentry call and the return thunk.
    let bytes = std::fs::read(&out).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.contains("__fentry__") && text.contains("__x86_return_thunk"));

    // A damaged copy is refused with one line; the original stays valid.
    let mut damaged = bytes.clone();
    let n = damaged.len();
    damaged[n / 2] ^= 0xff;
    let bad = scratch("damaged.bundle");
    std::fs::write(&bad, &damaged).unwrap();
    rejected(
        &["bundle", "inspect", &bad.display().to_string()],
        "checksum mismatch",
    );
    std::fs::write(&bad, &bytes[..100]).unwrap();
    rejected(
        &["bundle", "inspect", &bad.display().to_string()],
        "truncated",
    );
    ok(&["bundle", "inspect", &out_s]);
}

#[test]
fn refuses_code_the_host_cannot_make_work() {
    let src = scratch("uses_key.c");
    std::fs::write(
        &src,
        "#include <linux/jump_label.h>\n\
         #include <linux/seq_file.h>\n\
         DEFINE_STATIC_KEY_FALSE(demo_key);\n\
         int livepatch_cmdline_proc_show(struct seq_file *m, void *v)\n\
         {\n\tif (static_branch_unlikely(&demo_key))\n\t\tseq_puts(m, \"key\\n\");\n\treturn 0;\n}\n",
    )
    .unwrap();
    let out = scratch("key.bundle");
    rejected(
        &[
            "bundle",
            "build",
            &sample("manifest.json"),
            &src.display().to_string(),
            "-o",
            &out.display().to_string(),
        ],
        "static key (jump label) in function livepatch_cmdline_proc_show",
    );
    assert!(!out.exists(), "no bundle is written for refused code");
}

#[test]
fn refuses_a_manifest_whose_function_is_not_built() {
    let manifest = scratch("manifest.json");
    std::fs::write(
        &manifest,
        r#"{"name":"x","target":{"release":"6.1.0-53-cloud-amd64"},
            "functions":[{"old":"cmdline_proc_show","new":"not_defined_anywhere"}]}"#,
    )
    .unwrap();
    rejected(
        &[
            "bundle",
            "build",
            &manifest.display().to_string(),
            &sample("livepatch_cmdline.c"),
            "-o",
            &scratch("x.bundle").display().to_string(),
        ],
        "not_defined_anywhere is not defined",
    );
}
