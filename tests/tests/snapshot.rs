//! Snapshot and restore of the stock kernel: a prebuilt (snapshotted) kernel-only guest,
//! restored into private copies. On PVM hosts guest user space cannot run, so the guest
//! is driven through the kernel's magic SysRq on the serial console.

use std::time::Duration;

use integration_tests::{api, json, kernel_guest_snapshot, private_disk, require_kvm, Guest};

const T: Duration = Duration::from_secs(300);

/// The kernel timestamp (`[  123.456789]`) of the last line containing `needle`.
fn stamp(text: &str, needle: &str) -> f64 {
    let line = text
        .lines()
        .rev()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle:?}"));
    let inner = line
        .split('[')
        .nth(1)
        .and_then(|r| r.split(']').next())
        .unwrap();
    inner.trim().parse().unwrap()
}

fn restore(dir: &std::path::Path, tag: &str, extra: &[&str]) -> Guest {
    let disk = private_disk(tag);
    let mut args = vec![
        "run",
        "--restore",
        dir.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Guest::start(&args)
}

#[test]
fn restored_guest_answers_on_its_console_and_its_clock_moves_on() {
    require_kvm();
    let snap = kernel_guest_snapshot();
    let mut guest = restore(&snap, "answers", &[]);
    let restored = guest.stderr();
    guest.sysrq('h');
    let text = guest.wait_for("show-task-states", T);
    assert!(text.contains("sysrq: HELP"), "{text}");
    // The snapshot was taken 20 s after init started at ~600 s kernel time or later.
    let t = stamp(&text, "sysrq: HELP");
    assert!(t > 20.0, "kernel clock went back: {t}");
    // The guest took the break and the key: nothing waits in the UART or behind it, and
    // the kernel's 8250 driver has its receive and line-status interrupts on.
    let console = &json(&api(&guest.api_socket, "GET", "/vm", "").1)["console"];
    assert_eq!(
        console["interrupt_enable"].as_u64().map(|ier| ier & 5),
        Some(5),
        "{console}"
    );
    assert_eq!(
        (
            &console["fifo"],
            &console["pending_input"],
            &console["break_in_fifo"]
        ),
        (&0.into(), &0.into(), &"None".into()),
        "{console}"
    );
    // Both vCPUs are online and running after the restore.
    guest.sysrq('l');
    guest.wait_for("NMI backtrace for cpu 1", T);
    assert!(!restored.contains("error"), "{restored}");
}

#[test]
fn a_restored_guest_can_be_snapshotted_and_restored_again() {
    require_kvm();
    let snap = kernel_guest_snapshot();
    let second = std::env::temp_dir().join(format!("vmm-resnap-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&second);
    let mut guest = restore(
        &snap,
        "first",
        &[
            "--snapshot-on-output",
            "sysrq: HELP",
            "--snapshot-stop",
            "--snapshot-dir",
            second.to_str().unwrap(),
        ],
    );
    guest.sysrq('h');
    guest.wait_for("sysrq: HELP", T);
    let status = guest.wait_exit(T);
    assert!(status.success(), "{}", guest.stderr());
    assert!(
        guest.stderr().contains("snapshot written to"),
        "{}",
        guest.stderr()
    );
    let first_help = stamp(&guest.output(), "sysrq: HELP");

    let mut again = restore(&second, "second", &[]);
    again.sysrq('h');
    let text = again.wait_for("show-task-states", T);
    assert!(stamp(&text, "sysrq: HELP") > first_help);
    std::fs::remove_dir_all(&second).unwrap();
}
