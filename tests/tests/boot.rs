//! Boots the prebuilt Debian guest image with 2 vCPUs and checks it from inside.
//! Slow on hosts where guest kernel code is emulated (see docs/pvm.md): it prints
//! progress every minute while waiting.
//!
//! On hosts whose KVM does not switch to CPL 0 on SYSCALL from guest user mode (PVM;
//! `vmm host-check` says so), guest user space needs the `pvm-syscall` live patch, which
//! `vmm run --boot-patch` applies just before the kernel executes init.

use std::time::{Duration, Instant};

use integration_tests::{
    api, assert_logged, boot_timeout, build_sample_bundle, bundle_record, disable_patch,
    guest_artifact, json, kernel_digest, put_patch, require_kvm, run_vmm, vmm_ok,
    wait_for_attempts, Guest,
};

/// Whether this host's KVM runs guest system calls (`vmm host-check`, exit 0).
fn host_runs_guest_syscalls() -> bool {
    let (status, out, err) = run_vmm(&["host-check"], Duration::from_secs(120));
    eprintln!("vmm host-check: {status}\n{out}{err}");
    status.success()
}

#[test]
fn boots_debian_cloud_kernel_from_image_with_two_vcpus() {
    require_kvm();
    let image = guest_artifact("guest.img");
    // Boot a private copy: the guest mounts the disk read-write.
    let copy = std::env::temp_dir().join(format!("vmm-boot-test-{}.img", std::process::id()));
    std::fs::copy(&image, &copy).unwrap();

    let patch = (!host_runs_guest_syscalls())
        .then(|| build_sample_bundle("pvm-syscall", "manifest.json", "livepatch_pvm_syscall.c"));
    let started = Instant::now();
    let mut args = vec![
        "run",
        copy.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "512",
    ];
    if let Some(bundle) = &patch {
        // Applied before the kernel's boot-time W+X check, which walks every kernel page
        // table through the direct map: the patch area's table must be one it can read.
        args.extend([
            "--boot-patch",
            bundle.as_str(),
            "--boot-patch-on",
            "Freeing unused kernel image (initmem)",
        ]);
    }
    let mut guest = Guest::start(&args);
    guest.wait_for("VMM-GUEST-READY", boot_timeout());
    eprintln!("guest ready after {:?}", started.elapsed());
    if patch.is_some() {
        let stderr = guest.stderr();
        assert!(
            stderr.contains("boot patch pvm-syscall applied"),
            "{stderr}"
        );
        // The kernel's own word that the patch completed the system calls.
        let console = guest.output();
        assert!(console
            .contains("pvm-syscall: system calls from user mode are completed by the live patch"));
        // The W+X check walked the page tables, the patch area's included, after the patch.
        let wx = console.find("Checked W+X mappings: passed");
        let freed = console.find("Freeing unused kernel image (initmem)");
        assert!(
            matches!((freed, wx), (Some(f), Some(w)) if f < w),
            "no passed W+X check after the boot patch:\n{console}"
        );
    }
    let step = Duration::from_secs(15 * 60);

    let cmdline = guest.run("cat /proc/cmdline", step);
    assert!(cmdline.contains("console=ttyS0"), "cmdline: {cmdline}");
    assert!(cmdline.contains("root=/dev/vda"), "cmdline: {cmdline}");

    let nproc = guest.run("nproc", step);
    assert_eq!(
        nproc.lines().last().map(str::trim),
        Some("2"),
        "nproc printed: {nproc}"
    );

    let mounts = guest.run("grep ' / ' /proc/mounts", step);
    assert!(
        mounts.lines().any(|l| l.starts_with("/dev/vda / ext4 rw")),
        "root is not /dev/vda ext4 rw: {mounts}"
    );

    introspection_matches_the_guests_own_proc(&mut guest, step);
    pauses_under_user_space_load(&mut guest, step);
    let mut guest = snapshot_and_restore_the_user_space_guest(guest, step);
    the_classic_cmdline_patch_seen_from_user_space(&mut guest, step);
    a_hot_system_call_is_patched_under_load(&mut guest, step);
    a_task_sleeping_in_a_function_holds_off_its_patch(&mut guest, step);
    system_states_seen_from_user_space(&mut guest, step);
    multiple_livepatches_seen_from_user_space(&mut guest, step);
    // Last: on PVM hosts the cumulative bundle stays (it carries the boot patch).
    atomic_replace_seen_from_user_space(&mut guest, step, patch.is_some());

    guest.send_line("poweroff -f");
    let status = guest.wait_exit(step);
    assert!(
        status.success(),
        "vmm exit status after guest poweroff: {status}; stderr: {}",
        guest.stderr()
    );
    let _ = std::fs::remove_file(&copy);
}

/// Issue #5's classic sample, observed from guest user space: `cmdline_proc_show` replaced,
/// `cat /proc/cmdline` prints the replacement's line; disabled, the original returns.
fn the_classic_cmdline_patch_seen_from_user_space(guest: &mut Guest, step: Duration) {
    let bundle = build_sample_bundle("cmdline", "manifest.json", "livepatch_cmdline.c");
    let before = guest.run("cat /proc/cmdline", step);
    assert!(before.contains("console=ttyS0"), "{before}");
    let (status, body) = put_patch(&guest.api_socket, &bundle, "");
    assert_eq!(status, 200, "{body}");
    let patched = guest.run("cat /proc/cmdline", step);
    assert!(patched.contains("this has been live patched"), "{patched}");
    assert!(!patched.contains("console=ttyS0"), "{patched}");
    let (status, body) = disable_patch(&guest.api_socket, "cmdline-demo");
    assert_eq!(status, 200, "{body}");
    let after = guest.run("cat /proc/cmdline", step);
    assert!(after.contains("console=ttyS0"), "{after}");
    assert!(!after.contains("this has been live patched"), "{after}");
}

/// Issue #5: replace `__x64_sys_getpid` while three processes call getpid() in a tight
/// loop. The transition completes, and the replacement's own count (a kernel log line per
/// process at its 1,000th call) shows that every one of them runs the new code.
fn a_hot_system_call_is_patched_under_load(guest: &mut Guest, step: Duration) {
    let bundle = build_sample_bundle("getpid-count", "manifest.json", "livepatch_getpid.c");
    let out = guest.run(
        "getpid-loop & A=$!; getpid-loop & B=$!; getpid-loop & C=$!; echo loops $A $B $C",
        step,
    );
    let pids: Vec<i64> = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("loops "))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(pids.len(), 3, "{out}");
    let (status, body) = put_patch(&guest.api_socket, &bundle, "");
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "getpid patched under load after {} attempt(s)",
        json(&body)["attempts"]
    );
    let started = Instant::now();
    loop {
        let console = guest.output();
        let missing: Vec<i64> = pids
            .iter()
            .copied()
            .filter(|p| {
                !console.contains(&format!(
                    "getpid-count: pid {p} made 1000 calls to the patched getpid"
                ))
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < step,
            "no count from the patched getpid for {missing:?}"
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    guest.run("kill $A $B $C; wait", step);
    let (status, body) = disable_patch(&guest.api_socket, "getpid-count");
    assert_eq!(status, 200, "{body}");
}

/// Issue #5's blocked transition, on a kernel function user space sleeps in: a `sleep`
/// process waits inside `hrtimer_nanosleep`, which the `nanosleep-report` sample replaces.
/// With a short deadline the patch is refused, naming the task with its stack, and nothing
/// is written; with a long one it keeps retrying, and completes as soon as the task has
/// left (killed from the shell). Sleeps that start afterwards run the replacement.
fn a_task_sleeping_in_a_function_holds_off_its_patch(guest: &mut Guest, step: Duration) {
    let bundle = build_sample_bundle("nanosleep-report", "manifest.json", "livepatch_nanosleep.c");
    let socket = guest.api_socket.clone();
    let out = guest.run("sleep 100000 & S=$!; echo sleeper $S", step);
    let pid = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("sleeper "))
        .and_then(|p| p.trim().parse::<i64>().ok())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    // The host sees it asleep in the function (exec and startup take a while when guest
    // code is emulated).
    let started = Instant::now();
    let stack = loop {
        let (status, out, err) = run_vmm(
            &[
                "stack",
                &pid.to_string(),
                "--api-socket",
                socket.to_str().unwrap(),
            ],
            Duration::from_secs(60),
        );
        if status.success() && out.contains("hrtimer_nanosleep+") {
            break out;
        }
        assert!(
            started.elapsed() < step,
            "pid {pid} never slept in hrtimer_nanosleep: {out}{err}"
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert_eq!(stack.lines().last(), Some("reliable"), "{stack}");

    // Short deadline: refused, the sleeper named with its stack, nothing written.
    let before = (
        kernel_digest(&socket),
        json(&api(&socket, "GET", "/patches", "").1)["bundles"].clone(),
    );
    let (status, body) = put_patch(&socket, &bundle, r#","deadline_ms":3000"#);
    assert_eq!(status, 422, "{body}");
    assert!(body.contains(&format!("pid {pid} (sleep)")), "{body}");
    assert!(body.contains("hrtimer_nanosleep+"), "{body}");
    let after = (
        kernel_digest(&socket),
        json(&api(&socket, "GET", "/patches", "").1)["bundles"].clone(),
    );
    assert_eq!(
        after, before,
        "a refused patch changed the guest or the ledger"
    );

    // Long deadline: retries while the task sleeps there, completes once it has left.
    let (s2, b2) = (socket.clone(), bundle.clone());
    let put = std::thread::spawn(move || put_patch(&s2, &b2, r#","deadline_ms":900000"#));
    wait_for_attempts(&socket, 2, step);
    guest.run("kill $S; wait $S", step);
    let (status, body) = put.join().unwrap();
    assert_eq!(status, 200, "{body}");
    let attempts = json(&body)["attempts"].as_u64().unwrap_or(0);
    assert!(attempts >= 2, "{body}");
    eprintln!("hrtimer_nanosleep patched after {attempts} attempts, once pid {pid} had left");
    assert_logged(&socket, "nanosleep-report", |w| {
        w.contains(&format!("blocked by: pid {pid} (sleep)"))
    });

    // A sleep that starts now runs the new code.
    let out = guest.run("sleep 0.2 & T=$!; wait $T; echo napper $T", step);
    let napper = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("napper "))
        .map(|p| p.trim().to_string())
        .unwrap_or_else(|| panic!("no pid in {out:?}"));
    let line =
        format!("nanosleep-report: pid {napper} (sleep) sleeps in the patched hrtimer_nanosleep");
    let started = Instant::now();
    while !guest.output().contains(&line) {
        assert!(started.elapsed() < step, "no {line:?} in the console");
        std::thread::sleep(Duration::from_secs(1));
    }
    let (status, body) = disable_patch(&socket, "nanosleep-report");
    assert_eq!(status, 200, "{body}");
}

/// Issue #6's stacking and state rules, observed from guest user space: two stacked
/// (non-cumulative) bundles that both replace `cmdline_proc_show` and carry state actions
/// on `console_loglevel` (the first field of `/proc/sys/kernel/printk`). The first sets
/// the state up, the second (a newer state version) takes it over with its own value;
/// disabling the second hands the function and the state back to the first, disabling the
/// first restores the original function and value. (Cumulative bundles would also retire
/// the pvm-syscall boot patch on PVM hosts; see docs/pvm.md.)
fn system_states_seen_from_user_space(guest: &mut Guest, step: Duration) {
    let samples = integration_tests::workspace_root().join("guest-images/patches");
    let bundle = |manifest: &str| {
        let out =
            std::env::temp_dir().join(format!("vmm-{manifest}-{}.bundle", std::process::id()));
        vmm_ok(
            &[
                "bundle",
                "build",
                samples
                    .join("loglevel-state")
                    .join(manifest)
                    .to_str()
                    .unwrap(),
                samples
                    .join("cmdline/livepatch_cmdline.c")
                    .to_str()
                    .unwrap(),
                "-o",
                out.to_str().unwrap(),
            ],
            step,
        );
        out.display().to_string()
    };
    let cmdline_patched = |guest: &mut Guest| {
        guest
            .run("cat /proc/cmdline", step)
            .contains("this has been live patched")
    };
    // The line of four numbers (console, default message, minimum, boot-time default).
    let loglevel = |guest: &mut Guest| -> String {
        let out = guest.run("cat /proc/sys/kernel/printk", step);
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .rfind(|f| f.len() == 4 && f.iter().all(|v| v.parse::<i32>().is_ok()))
            .map(|f| f[0].to_string())
            .unwrap_or_else(|| panic!("/proc/sys/kernel/printk: {out:?}"))
    };
    let original = loglevel(guest);
    assert!(!["1", "2"].contains(&original.as_str()), "{original}");
    for (manifest, level) in [
        ("manifest-stacked-a.json", "1"),
        ("manifest-stacked-b.json", "2"),
    ] {
        let (status, body) = put_patch(&guest.api_socket, &bundle(manifest), "");
        assert_eq!(status, 200, "{manifest}: {body}");
        assert_eq!(loglevel(guest), level, "after {manifest}");
        assert!(cmdline_patched(guest), "after {manifest}");
    }
    for (name, level, patched) in [
        ("loglevel-stacked-b", "1", true),
        ("loglevel-stacked-a", original.as_str(), false),
    ] {
        let (status, body) = disable_patch(&guest.api_socket, name);
        assert_eq!(status, 200, "disable {name}: {body}");
        assert_eq!(loglevel(guest), level, "after disabling {name}");
        assert_eq!(cmdline_patched(guest), patched, "after disabling {name}");
    }
}

/// What `/proc/cmdline` and `/proc/meminfo` show: (cmdline patched, meminfo patched).
/// Each sample replaces the whole file with one line; the originals start with the kernel
/// command line and `MemTotal:`.
fn proc_files_patched(guest: &mut Guest, step: Duration) -> (bool, bool) {
    let out = guest.run("cat /proc/cmdline; head -n 1 /proc/meminfo", step);
    let cmdline = if out.contains("console=ttyS0") {
        false
    } else {
        assert!(out.contains("this has been live patched"), "{out}");
        true
    };
    let meminfo = if out.contains("MemTotal:") {
        false
    } else {
        assert!(out.contains("meminfo: this has been live patched"), "{out}");
        true
    };
    (cmdline, meminfo)
}

/// The kernel selftests' "multiple livepatches" (test-livepatch.sh), read from guest user
/// space as there: two independent bundles, one for `/proc/cmdline` and one for
/// `/proc/meminfo`, both in force; disabling the newer leaves the older; disabling that
/// restores the original.
fn multiple_livepatches_seen_from_user_space(guest: &mut Guest, step: Duration) {
    let cmdline = build_sample_bundle("cmdline", "manifest.json", "livepatch_cmdline.c");
    let meminfo = build_sample_bundle("meminfo", "manifest.json", "livepatch_meminfo.c");
    let s = guest.api_socket.clone();
    assert_eq!(proc_files_patched(guest, step), (false, false));
    let (status, body) = put_patch(&s, &cmdline, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proc_files_patched(guest, step), (true, false));
    let (status, body) = put_patch(&s, &meminfo, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proc_files_patched(guest, step), (true, true));
    let (status, body) = disable_patch(&s, "meminfo-demo");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proc_files_patched(guest, step), (true, false));
    let (status, body) = disable_patch(&s, "cmdline-demo");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proc_files_patched(guest, step), (false, false));
}

/// The kernel selftests' "atomic replace", read from guest user space: with the
/// `/proc/cmdline` bundle applied, a cumulative bundle for `/proc/meminfo` goes in; in the
/// one transition meminfo is patched and cmdline returns to the original, and the older
/// bundle is retired.
///
/// On PVM hosts (`boot_patch`), a cumulative bundle retires the boot patch too, so it must
/// carry the boot patch's function as well (docs/pvm.md). Every task inside a system call
/// sleeps in the boot patch's code, so the consistency check can never clear it (the kernel
/// would send those tasks fake signals): without `force` it is refused at the deadline,
/// naming them; with `force`, which pins the retired code in memory for the tasks that
/// return through it (as the kernel keeps a forced patch's module), it goes in and user
/// space carries on. Disabling it would take system calls away from user space, so the
/// selftest's last step (disable: everything original) runs only on other hosts.
fn atomic_replace_seen_from_user_space(guest: &mut Guest, step: Duration, boot_patch: bool) {
    let samples = integration_tests::workspace_root().join("guest-images/patches");
    let dir = std::env::temp_dir().join(format!("vmm-cumulative-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("manifest.json");
    let boot_function = if boot_patch {
        r#"{ "old": "bad_area_nosemaphore", "new": "livepatch_bad_area_nosemaphore" },"#
    } else {
        ""
    };
    std::fs::write(
        &manifest,
        format!(
            r#"{{
  "name": "cumulative-meminfo",
  "version": 2,
  "target": {{ "release": "6.1.0-53-cloud-amd64" }},
  "replace": true,
  "functions": [
    {boot_function}
    {{ "old": "meminfo_proc_show", "new": "livepatch_meminfo_proc_show" }}
  ]
}}"#
        ),
    )
    .unwrap();
    let bundle = dir.join("cumulative.bundle");
    let src = |p: &str| samples.join(p).display().to_string();
    let mut args = vec![
        "bundle".to_string(),
        "build".to_string(),
        manifest.display().to_string(),
        src("meminfo/livepatch_meminfo.c"),
    ];
    if boot_patch {
        args.push(src("pvm-syscall/livepatch_pvm_syscall.c"));
    }
    args.extend(["-o".to_string(), bundle.display().to_string()]);
    vmm_ok(&args.iter().map(String::as_str).collect::<Vec<_>>(), step);
    let bundle = bundle.to_str().unwrap();
    let s = guest.api_socket.clone();

    let cmdline = build_sample_bundle("cmdline", "manifest.json", "livepatch_cmdline.c");
    let (status, body) = put_patch(&s, &cmdline, "");
    assert_eq!(status, 200, "{body}");
    assert_eq!(proc_files_patched(guest, step), (true, false));

    let extra = if boot_patch {
        // Without force: refused at a short deadline, naming tasks asleep in pvm-syscall.
        let (status, body) = put_patch(&s, bundle, r#","deadline_ms":3000"#);
        assert_eq!(status, 422, "{body}");
        assert!(body.contains("[pvm-syscall]"), "{body}");
        assert_eq!(proc_files_patched(guest, step), (true, false));
        r#","force":true"#
    } else {
        ""
    };
    let (status, body) = put_patch(&s, bundle, extra);
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["forced"], boot_patch, "{body}");
    assert_eq!(proc_files_patched(guest, step), (false, true));
    let alive = guest.run("echo still-$((40+2))", step);
    assert!(alive.contains("still-42"), "{alive}");

    let list = json(&api(&s, "GET", "/patches", "").1);
    let status_of = |name: &str| bundle_record(&list, name).map(|b| b["status"].clone());
    assert_eq!(
        status_of("cumulative-meminfo"),
        Some("enabled".into()),
        "{list}"
    );
    let replaced = serde_json::json!({"replaced": {"by": "cumulative-meminfo"}});
    assert_eq!(status_of("cmdline-demo"), Some(replaced.clone()), "{list}");
    if boot_patch {
        // Retired, but its code stays pinned where the sleeping tasks return to.
        let pvm = bundle_record(&list, "pvm-syscall").unwrap_or_else(|| panic!("{list}"));
        assert_eq!(pvm["status"], replaced, "{list}");
        assert_eq!(pvm["pinned"], true, "{list}");
        assert!(pvm["memory"].is_object(), "{list}");
    } else {
        // Disabling a cumulative bundle returns to the original kernel, not to the
        // bundles it replaced.
        let (status, body) = disable_patch(&s, "cumulative-meminfo");
        assert_eq!(status, 200, "{body}");
        assert_eq!(proc_files_patched(guest, step), (false, false));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `PUT /snapshot` of the VM behind `socket` into `dir` (removed first): the answer's JSON.
fn snapshot_to(socket: &std::path::Path, dir: &std::path::Path, stop: bool) -> serde_json::Value {
    let _ = std::fs::remove_dir_all(dir);
    let (status, body) = api(
        socket,
        "PUT",
        "/snapshot",
        &format!(r#"{{"dir":"{}","stop":{stop}}}"#, dir.display()),
    );
    assert_eq!(status, 200, "snapshot to {}: {body}", dir.display());
    json(&body)
}

/// The first number of `/proc/uptime`.
fn guest_uptime(guest: &mut Guest, step: Duration) -> f64 {
    let out = guest.run("cat /proc/uptime", step);
    let line = out.lines().last().unwrap_or_default().to_string();
    line.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("/proc/uptime printed {out:?}"))
}

/// Issue #3, on a guest with user space: snapshot it (`--stop`), restore it, and the
/// console shell still answers, `/proc/uptime` continues, the root disk is still mounted
/// with what was written to it, both CPUs are online, and the restored VM can itself be
/// snapshotted. Returns the restored guest.
fn snapshot_and_restore_the_user_space_guest(mut guest: Guest, step: Duration) -> Guest {
    let marker = format!("restore-marker-{}", std::process::id());
    guest.run(&format!("echo {marker} > /root/marker; sync"), step);
    let before = guest_uptime(&mut guest, step);
    let dir = std::env::temp_dir().join(format!("vmm-boot-snap-{}", std::process::id()));
    snapshot_to(&guest.api_socket, &dir, true);
    let exit = guest.wait_exit(Duration::from_secs(60));
    assert!(exit.success(), "vmm after snapshot --stop: {exit}");
    drop(guest);

    let started = Instant::now();
    let mut restored = Guest::start(&["run", "--restore", dir.to_str().unwrap()]);
    let answer = restored.run("echo restored-$((6*7))", step);
    let first_answer = started.elapsed();
    assert!(answer.contains("restored-42"), "{answer}");
    let after = guest_uptime(&mut restored, step);
    eprintln!(
        "restored the user-space guest: first console answer {first_answer:?} after process \
         start; /proc/uptime {before:.2} s before the snapshot, {after:.2} s after the restore"
    );
    assert!(
        after >= before && after < before + 600.0,
        "/proc/uptime went from {before} to {after} across the restore"
    );
    let mounts = restored.run("grep ' / ' /proc/mounts; cat /root/marker", step);
    assert!(
        mounts.lines().any(|l| l.starts_with("/dev/vda / ext4 rw")),
        "root is not /dev/vda ext4 rw after the restore: {mounts}"
    );
    assert!(mounts.contains(&marker), "{mounts}");
    let online = restored.run("cat /sys/devices/system/cpu/online; nproc", step);
    assert!(
        online.lines().map(str::trim).any(|l| l == "0-1"),
        "CPUs online after the restore: {online}"
    );
    // The disk still takes writes that reach the image.
    restored.run("echo after-restore >> /root/marker; sync", step);

    // A snapshot of the restored VM (it keeps running).
    let again = dir.with_extension("again");
    let answer = snapshot_to(&restored.api_socket, &again, false);
    assert_eq!(answer["stopped"], false, "{answer}");
    let still = restored.run("cat /root/marker", step);
    assert!(still.contains("after-restore"), "{still}");
    let console = restored.output();
    assert!(!console.contains("soft lockup"), "{console}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&again);
    restored
}

/// Issue #3: 1,000 pauses and resumes while guest user space spins on one loop and sleeps
/// 1 ms at a time on another. The guest keeps running, reports no soft lockup, and its
/// clock moves on by about the host's time.
fn pauses_under_user_space_load(guest: &mut Guest, step: Duration) {
    let uptime = |guest: &mut Guest| guest_uptime(guest, step);
    guest.run(
        "(while :; do :; done) & SPIN=$!; (while :; do usleep 1000; done) & TICK=$!; sleep 1",
        step,
    );
    let (guest0, host0) = (uptime(guest), Instant::now());
    let s = guest.api_socket.clone();
    for i in 0..1000 {
        for state in ["paused", "running"] {
            let (status, body) = api(&s, "PUT", "/vm/state", &format!(r#"{{"state":"{state}"}}"#));
            assert_eq!(status, 200, "pause/resume {i}: {body}");
        }
    }
    let pauses = json(&api(&s, "GET", "/vm", "").1)["pause_latency_us"].clone();
    let (guest1, host) = (uptime(guest), host0.elapsed().as_secs_f64());
    eprintln!(
        "1,000 pauses under user-space load: guest clock +{:.2} s, host +{host:.2} s; {pauses}",
        guest1 - guest0
    );
    // /proc/uptime is read through the (slow, emulated) console on both sides, so allow
    // for that, but a clock that stood still or ran off fails.
    let moved = guest1 - guest0;
    assert!(
        moved > 0.5 * host - 2.0 && moved < 1.5 * host + 2.0,
        "guest clock moved {moved:.2} s while the host's moved {host:.2} s"
    );
    guest.run("kill $SPIN $TICK; wait $SPIN $TICK", step);
    let console = guest.output();
    assert!(!console.contains("soft lockup"), "{console}");
    assert!(
        !console.contains("rcu_sched self-detected stall"),
        "{console}"
    );
}

/// Issue #4's oracle, on the same boot: what the host reads out of guest memory equals
/// the guest's own `/proc`: every `/proc/kallsyms` line (compared by SHA-256, since 87k
/// lines are too many for the serial console), the task list with each comm, and a
/// sleeping task's `/proc/PID/stack`.
fn introspection_matches_the_guests_own_proc(guest: &mut Guest, step: Duration) {
    use sha2::{Digest, Sha256};
    let s = guest.api_socket.display().to_string();
    let api_args = |cmd: &[&str]| -> Vec<String> {
        cmd.iter()
            .map(|a| a.to_string())
            .chain(["--api-socket".to_string(), s.clone()])
            .collect()
    };
    let host_vmm = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        vmm_ok(&args, step)
    };

    let started = Instant::now();
    // The kernel's non-module pseudo-owners ([bpf], [__builtin__ftrace], …) are not
    // modules; vmm does not list them.
    let out = guest.run(
        "grep -v -F -e '[bpf]' -e '[__builtin__' /proc/kallsyms | sha256sum",
        step,
    );
    eprintln!("guest hashed /proc/kallsyms in {:?}", started.elapsed());
    let host = host_vmm(api_args(&["symbols", "--all"]));
    let host_sha: String = Sha256::digest(host.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let lines: Vec<&str> = out.lines().map(str::trim).collect();
    let guest_sha = lines
        .iter()
        .find_map(|l| l.strip_suffix('-'))
        .map(str::trim)
        .unwrap_or_else(|| panic!("sha256sum printed {out:?}"));
    if guest_sha != host_sha {
        let head = guest.run("head -5 /proc/kallsyms; tail -3 /proc/kallsyms", step);
        panic!(
            "/proc/kallsyms differs from vmm symbols --all ({} lines)\n\
             guest head/tail:\n{head}\nhost head:\n{}\nhost tail:\n{}",
            host.lines().count(),
            host.lines().take(5).collect::<Vec<_>>().join("\n"),
            host.lines().rev().take(3).collect::<Vec<_>>().join("\n"),
        );
    }

    // Tasks: every thread the guest lists (but the listing's own processes, gone by the
    // time the host looks) is in the host's walk with the same comm.
    let sleep_pid: i64 = guest
        .run("sleep 1000 & echo $!", step)
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .expect("the shell printed the sleep's pid");
    guest.run("sleep 1", step);
    let listed = guest.run("grep -H . /proc/[0-9]*/task/[0-9]*/comm", step);
    let ps = json(&host_vmm(api_args(&["ps", "--json"])));
    let host_tasks: std::collections::HashMap<i64, String> = ps["tasks"]
        .as_array()
        .expect("tasks")
        .iter()
        .map(|t| {
            (
                t["pid"].as_i64().unwrap(),
                t["comm"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut missing = Vec::new();
    let mut compared = 0;
    for line in listed.lines() {
        let Some((path, comm)) = line.trim().split_once(":") else {
            continue;
        };
        let Some(tid) = path.split('/').nth(4).and_then(|t| t.parse::<i64>().ok()) else {
            continue;
        };
        match host_tasks.get(&tid) {
            Some(c) => {
                // The host reads task->comm (15 characters); /proc shows a kernel
                // thread's full name, and a workqueue worker's with its workqueue
                // (`kworker/1:0-mm_percpu_wq`).
                let rest = comm.strip_prefix(c.as_str());
                assert!(
                    rest.is_some_and(|r| {
                        r.is_empty() || c.len() == 15 || r.starts_with(['-', '+'])
                    }),
                    "task {tid}: host {c:?}, guest {comm:?}"
                );
                compared += 1;
            }
            None => missing.push(line.to_string()),
        }
    }
    assert!(compared > 40, "{listed}");
    assert!(missing.len() <= 3, "not in the host's walk: {missing:?}");

    // Stack: the guest's /proc/PID/stack of the sleep (which hides the scheduler's own
    // frames) is the tail of the host's trace. With the pvm-syscall patch, the system call
    // was made from the patch's code, which the guest's unwinder does not know (its trace
    // stops before that frame) and the host's does, from the bundle's ORC rows: the host's
    // trace is reliable through it, and the frames above it must agree.
    let proc_stack = guest.run(&format!("cat /proc/{sleep_pid}/stack"), step);
    let guest_frames: Vec<&str> = proc_stack.lines().map(str::trim).collect();
    assert!(guest_frames.len() >= 3, "{proc_stack}");
    let st = host_vmm(api_args(&["stack", &sleep_pid.to_string()]));
    let mut host_frames: Vec<&str> = st.lines().filter(|l| l.starts_with("[<0>]")).collect();
    assert_eq!(st.lines().last(), Some("reliable"), "{st}");
    if let Some(patch_frame) = host_frames
        .iter()
        .position(|f| f.ends_with("[pvm-syscall]"))
    {
        host_frames.truncate(patch_frame);
    }
    assert!(
        host_frames.ends_with(&guest_frames),
        "host {host_frames:?} vs guest {guest_frames:?}"
    );
    guest.run(&format!("kill {sleep_pid}"), step);
    eprintln!(
        "same-boot oracle: /proc/kallsyms = vmm symbols --all ({} lines), {compared} tasks, \
         /proc/{sleep_pid}/stack",
        host.lines().count()
    );
}
