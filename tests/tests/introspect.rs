//! Introspection of the stock kernel from a snapshot's memory: the symbol table the host
//! decodes must agree with what the CPU and the kernel itself say.

use std::time::Duration;

use integration_tests::{kernel_guest_snapshot, run_vmm};
use serde_json::Value;

const T: Duration = Duration::from_secs(300);

fn vmm_ok(args: &[&str]) -> String {
    integration_tests::vmm_ok(args, T)
}

/// The vCPU state saved in the snapshot (the state file is a 52-byte header + JSON).
fn saved_vcpus(dir: &std::path::Path) -> Value {
    let bytes = std::fs::read(dir.join("state")).unwrap();
    let v: Value = serde_json::from_slice(&bytes[52..]).unwrap();
    v["vcpus"].clone()
}

fn addr(line: &str) -> u64 {
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

#[test]
fn symbols_agree_with_the_cpu_and_the_kernel() {
    let snap = kernel_guest_snapshot();
    let s = snap.to_str().unwrap();
    let info = vmm_ok(&["kernel", "--snapshot", s]);
    assert!(
        info.lines()
            .any(|l| l.starts_with("release:") && l.ends_with(" 6.1.0-53-cloud-amd64")),
        "{info}"
    );
    let count: usize = info
        .lines()
        .find_map(|l| l.strip_prefix("symbols:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The pinned kernel has 87,256 symbols (guest-introspection.md §0).
    assert_eq!(count, 87_256, "{info}");

    let out = vmm_ok(&[
        "symbols",
        "--snapshot",
        s,
        "entry_SYSCALL_64",
        "_text",
        "current_task",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    // MSR_LSTAR of every vCPU is the runtime entry_SYSCALL_64.
    let lstar = addr(lines[0]);
    for v in saved_vcpus(&snap).as_array().unwrap() {
        let msrs = v["msrs"].as_array().unwrap();
        let saved = msrs
            .iter()
            .find(|m| m[0].as_u64() == Some(0xc000_0082))
            .expect("LSTAR saved")[1]
            .as_u64()
            .unwrap();
        assert_eq!(saved, lstar, "LSTAR vs kallsyms entry_SYSCALL_64");
    }
    // _text is 2 MiB aligned inside the image window, and KASLR moved it.
    let text = addr(lines[1]);
    assert_eq!(text % (2 << 20), 0);
    assert!((0xffff_ffff_8000_0000..0xffff_ffff_c000_0000).contains(&text));
    // Per-cpu symbols are absolute offsets, as /proc/kallsyms shows them.
    assert!(lines[2].ends_with(" A current_task"), "{}", lines[2]);
    assert!(addr(lines[2]) < 0x10_0000);

    // The full listing is /proc/kallsyms-shaped and has every symbol.
    let all = vmm_ok(&["symbols", "--snapshot", s, "--all"]);
    assert_eq!(all.lines().count(), count);
    assert!(all.lines().all(|l| l.split(' ').count() == 3));

    // 358 per-cpu symbols, all type A, as the kernel's own tables say (§2.4).
    assert_eq!(all.lines().filter(|l| l.contains(" A ")).count(), 358);
    // The build ID is the pinned kernel's.
    assert!(
        info.lines()
            .any(|l| l.starts_with("build id:") && l.contains(" 4409ab2b")),
        "{info}"
    );

    // Ambiguous names need a sympos (365 static `__func__.0` strings in this kernel).
    let (status, _, err) = run_vmm(&["symbols", "--snapshot", s, "__func__.0"], T);
    assert!(!status.success());
    assert!(err.contains("ambiguous") && err.contains("sympos"), "{err}");
    let second = vmm_ok(&["symbols", "--snapshot", s, "__func__.0,2"]);
    let nth: Vec<&str> = all.lines().filter(|l| l.ends_with(" __func__.0")).collect();
    assert_eq!(second.trim(), nth[1]);
}

/// The same symbol table found without vmcoreinfo's `SYMBOL(kallsyms_*)` lines: the scan
/// recognises this kernel's table order (6.1.y with the 6.2 backport of 3-byte
/// `kallsyms_seqs_of_names`) and decodes every symbol identically.
#[test]
fn a_scan_of_the_image_finds_the_same_kallsyms_as_vmcoreinfo() {
    let snap = kernel_guest_snapshot();
    let s = snap.to_str().unwrap();
    let named = vmm_ok(&["kernel", "--snapshot", s, "--kallsyms", "vmcoreinfo"]);
    assert!(named.contains("kallsyms:      vmcoreinfo"), "{named}");
    let scanned = vmm_ok(&["kernel", "--snapshot", s, "--kallsyms", "scan"]);
    assert!(
        scanned.contains("kallsyms:      image scan (6.2 order, 3-byte seqs_of_names)"),
        "{scanned}"
    );
    let by_vmcoreinfo = vmm_ok(&[
        "symbols",
        "--all",
        "--snapshot",
        s,
        "--kallsyms",
        "vmcoreinfo",
    ]);
    let by_scan = vmm_ok(&["symbols", "--all", "--snapshot", s, "--kallsyms", "scan"]);
    assert_eq!(by_scan.lines().count(), 87_256);
    let first_difference = by_scan
        .lines()
        .zip(by_vmcoreinfo.lines())
        .find(|(a, b)| a != b);
    assert_eq!(first_difference, None);
    // Stacks need the symbols too: a task list read through the scanned table works.
    let ps = vmm_ok(&["ps", "--snapshot", s, "--kallsyms", "scan"]);
    assert!(ps.contains("swapper/0"), "{ps}");
}

/// The stop-the-world check unwinds on several threads when the guest has many tasks
/// (`GuestKernel::task_traces_with`). On the real kernel's memory, any split gives the
/// same traces, in the same order, as one thread.
#[test]
fn unwinding_on_several_threads_gives_the_same_traces_as_one() {
    use introspect::guest::GuestKernel;
    use vmm::introspection::SnapshotView;

    let snap = kernel_guest_snapshot();
    let view = SnapshotView::open(&snap).unwrap();
    let gk = GuestKernel::load(&view.memory).unwrap();
    let render = |per_thread: usize| -> Vec<String> {
        gk.task_traces_split(&view.memory, &view.regs, true, per_thread)
            .unwrap()
            .iter()
            .map(|t| {
                let (task, trace) = (&t.task, &t.trace);
                format!(
                    "{task:?} {:?} {:?} {:?}",
                    trace.symbols, trace.trace, trace.words
                )
            })
            .collect()
    };
    let one = render(usize::MAX);
    assert!(one.len() > 40, "{} tasks", one.len());
    // One task per thread: as many threads as the host has CPUs.
    assert_eq!(render(1), one);
    // Lent threads that never run the job (gone) leave the whole walk to the caller.
    struct Absent;
    impl introspect::workers::Workers for Absent {
        fn run(&self, _: usize, _: &(dyn Fn() + Sync)) {}
    }
    let traces = gk
        .task_traces_on(&view.memory, &view.regs, false, 1, &Absent)
        .unwrap();
    assert_eq!(traces.len(), one.len());
}
