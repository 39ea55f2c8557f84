//! The introspection library against the guest kernel's own view of the same boot. Guest
//! user space cannot run on this project's PVM hosts (docs/pvm.md), so the oracle guest runs
//! under QEMU's TCG, where it can: boot guest.img, let the guest print `/proc/kallsyms`, its
//! task list and a sleeping task's `/proc/PID/stack` as root, stop QEMU and dump its RAM with
//! `pmemsave`, then compare with what `vmm symbols|ps|stack|kernel --dump` read from the dump.
//! Two boots: `-cpu max` (LA57: 5-level paging) and `-cpu max,-la57` with `pti=on`; each gets
//! its own KASLR offset.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::{guest_artifact, Guest};
use serde_json::Value;

const T: Duration = Duration::from_secs(300);
const RAM: u64 = 512 << 20;

fn vmm_ok(args: &[&str]) -> String {
    integration_tests::vmm_ok(args, T)
}

/// Under TCG the guest's TSC runs at the host's rate; microvm has no timer to calibrate it.
fn host_tsc_khz() -> u64 {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

struct Oracle {
    guest: Guest,
    monitor: PathBuf,
    dump: PathBuf,
}

fn boot_qemu(tag: &str, cpu: &str, append: &str) -> Oracle {
    let qemu = "qemu-system-x86_64";
    assert!(
        Command::new(qemu).arg("--version").output().is_ok(),
        "{qemu} is missing (scripts/setup installs qemu-system-x86)"
    );
    let dir = std::env::temp_dir();
    let monitor = dir.join(format!("vmm-oracle-{}-{tag}.mon", std::process::id()));
    let dump = dir.join(format!("vmm-oracle-{}-{tag}.mem", std::process::id()));
    let _ = std::fs::remove_file(&monitor);
    let _ = std::fs::remove_file(&dump);
    let cmdline = format!(
        "console=ttyS0 root=/dev/vda rw panic=-1 tsc_early_khz={} {append}",
        host_tsc_khz()
    );
    let mut cmd = Command::new(qemu);
    cmd.args(["-M", "microvm,acpi=on,rtc=on", "-accel", "tcg", "-cpu", cpu])
        .args(["-smp", "2", "-m", "512", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(guest_artifact("vmlinuz"))
        .arg("-initrd")
        .arg(guest_artifact("initrd.img"))
        .args(["-append", &cmdline])
        .arg("-drive")
        .arg(format!(
            "id=d0,file={},format=raw,if=none,snapshot=on",
            guest_artifact("guest.img").display()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .arg("-monitor")
        .arg(format!("unix:{},server=on,wait=off", monitor.display()));
    let mut guest = Guest::spawn(cmd, monitor.clone());
    guest.wait_for("VMM-GUEST-READY", T);
    Oracle {
        guest,
        monitor,
        dump,
    }
}

impl Oracle {
    /// Lets a stopped guest run on.
    fn resume(&mut self) {
        let mut mon = UnixStream::connect(&self.monitor).expect("QEMU monitor");
        mon.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        writeln!(mon, "cont").unwrap();
        writeln!(mon, "info status").unwrap();
        let start = Instant::now();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("VM status: running") {
            let mut buf = [0u8; 4096];
            if let Ok(n) = mon.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
            assert!(
                start.elapsed() < T,
                "cont did not finish: {}",
                String::from_utf8_lossy(&seen)
            );
        }
    }

    /// Stops the guest and writes its RAM to `self.dump`.
    fn stop_and_dump(&mut self) {
        let mut mon = UnixStream::connect(&self.monitor).expect("QEMU monitor");
        mon.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        writeln!(mon, "stop").unwrap();
        writeln!(mon, "pmemsave 0 {RAM:#x} \"{}\"", self.dump.display()).unwrap();
        writeln!(mon, "info status").unwrap();
        let start = Instant::now();
        let mut seen = Vec::new();
        loop {
            let mut buf = [0u8; 4096];
            if let Ok(n) = mon.read(&mut buf) {
                seen.extend_from_slice(&buf[..n]);
            }
            if String::from_utf8_lossy(&seen).contains("VM status: paused")
                && std::fs::metadata(&self.dump).is_ok_and(|m| m.len() == RAM)
            {
                return;
            }
            assert!(
                start.elapsed() < T,
                "pmemsave did not finish: {}",
                String::from_utf8_lossy(&seen)
            );
        }
    }
}

impl Drop for Oracle {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.dump);
        let _ = std::fs::remove_file(&self.monitor);
    }
}

/// Checks one QEMU boot against its own /proc; returns its KASLR offset as `vmm kernel`
/// printed it.
fn check_against_guest(tag: &str, cpu: &str, append: &str, levels: u8) -> String {
    let mut o = boot_qemu(tag, cpu, append);
    let g = &mut o.guest;
    let kallsyms = g.run("cat /proc/kallsyms", T);
    let sleep_pid: i64 = g
        .run("sleep 1000 & echo $!", T)
        .lines()
        .last()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Let it reach its sleep before reading where it sleeps.
    g.run("sleep 1", T);
    let proc_stack = g.run(&format!("cat /proc/{sleep_pid}/stack"), T);
    let pti = g.run("grep -c ' pti' /proc/cpuinfo || true", T);
    let proc_modules = g.run("cat /proc/modules", T);
    // The thread list last, right before the stop: a thread may exit (an idle kworker
    // retired by its pool) or start between any listing and the stop.
    let listed = g.run("grep -H . /proc/[0-9]*/task/[0-9]*/comm", T);
    o.stop_and_dump();
    let dump = o.dump.to_str().unwrap().to_string();

    // Kernel: the paging mode the CPU model implies.
    let info = vmm_ok(&["kernel", "--dump", &dump]);
    let level_line = info
        .lines()
        .find(|l| l.starts_with("paging levels:"))
        .unwrap();
    assert!(level_line.ends_with(&format!(" {levels}")), "{tag}: {info}");
    if append.contains("pti=on") {
        assert_ne!(pti.trim(), "0", "{tag}: PTI is not on in the guest");
    }

    // Symbols: every line of /proc/kallsyms, address, type and name: the core kernel's, then
    // each loaded module's (`name\t[module]`; the guest's init loads the virtio modules).
    // Only the kernel's non-module pseudo-owners ([bpf], [__builtin__ftrace], …) are left
    // out: they are not modules.
    let guest_syms: Vec<&str> = kallsyms
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.contains("\t[bpf]") && !l.contains("\t[__builtin__"))
        .collect();
    let module_lines = guest_syms.iter().filter(|l| l.contains('\t')).count();
    assert!(module_lines > 100, "{tag}: {module_lines} module symbols");
    let host = vmm_ok(&["symbols", "--all", "--dump", &dump]);
    let host_syms: Vec<&str> = host.lines().collect();
    assert!(
        guest_syms.len() > 80_000,
        "{tag}: {} lines",
        guest_syms.len()
    );
    assert_eq!(host_syms.len(), guest_syms.len(), "{tag}: symbol counts");
    let mismatch = host_syms.iter().zip(&guest_syms).position(|(h, g)| h != g);
    assert_eq!(
        mismatch.map(|i| (host_syms[i], guest_syms[i])),
        None,
        "{tag}: first differing line"
    );
    // The same table found by scanning the image instead of through vmcoreinfo.
    let scanned = vmm_ok(&["symbols", "--all", "--dump", &dump, "--kallsyms", "scan"]);
    assert!(scanned == host, "{tag}: the scanned kallsyms differ");

    // Tasks: every thread the guest listed, by tid and comm (minus the grep that listed
    // them, which had exited), and nothing else.
    let guest_tasks: BTreeSet<(i64, String)> = listed
        .lines()
        .filter_map(|l| {
            let (path, comm) = l.split_once(":")?;
            let tid = path.split('/').nth(4)?.parse().ok()?;
            Some((tid, comm.trim().to_string()))
        })
        .filter(|(_, c)| c != "grep")
        .collect();
    let ps: Value = serde_json::from_str(&vmm_ok(&["ps", "--json", "--dump", &dump])).unwrap();
    let host_tasks: BTreeSet<(i64, String)> = ps["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["pid"] != 0)
        .map(|t| {
            (
                t["pid"].as_i64().unwrap(),
                t["comm"].as_str().unwrap().to_string(),
            )
        })
        .filter(|(pid, _)| *pid != sleep_pid)
        .collect();
    let guest_tasks: BTreeSet<_> = guest_tasks
        .into_iter()
        .filter(|(pid, _)| *pid != sleep_pid)
        .collect();
    assert!(guest_tasks.len() > 20, "{tag}: {listed}");
    // The same tids, but for threads that came or went between the listing and the stop,
    // and each of those is proven: one the guest listed and the dump lacks must be gone
    // when the guest runs on; one only the dump has must be newer than every listed one
    // (tids are handed out in increasing order; a few hundred are far from pid_max).
    let pids = |set: &BTreeSet<(i64, String)>| set.iter().map(|(p, _)| *p).collect::<BTreeSet<_>>();
    let (host_pids, guest_pids) = (pids(&host_tasks), pids(&guest_tasks));
    let newest_listed = guest_pids.iter().max().copied().unwrap_or(0);
    let started: Vec<i64> = host_pids.difference(&guest_pids).copied().collect();
    assert!(
        started.iter().all(|&p| p > newest_listed),
        "{tag}: the dump has threads the guest did not list, and they are not newer than \
         its listing (newest listed {newest_listed}): {started:?}\n{listed}"
    );
    let gone: Vec<i64> = guest_pids.difference(&host_pids).copied().collect();
    if !gone.is_empty() {
        o.resume();
        for tid in &gone {
            // `test` exits 1 when the task is gone: `status=1` is only ever output, never
            // part of the command's echo.
            let status = o
                .guest
                .run(&format!("test -e /proc/{tid}/comm; echo status=$?"), T);
            assert!(
                status.contains("status=1"),
                "{tag}: the guest listed tid {tid}, which is still there ({status}), and the dump lacks it"
            );
        }
        eprintln!("{tag}: threads that exited between the listing and the dump: {gone:?}");
    }
    if !started.is_empty() {
        eprintln!("{tag}: threads that started between the listing and the dump: {started:?}");
    }
    // Each comm is the kernel's 15-character `task->comm`, which /proc/PID/comm extends
    // for kernel threads (full kthread names, a kworker's current work queue after '-').
    let host_tasks: BTreeSet<_> = host_tasks
        .into_iter()
        .filter(|(p, _)| guest_pids.contains(p))
        .collect();
    let guest_tasks: BTreeSet<_> = guest_tasks
        .into_iter()
        .filter(|(p, _)| host_pids.contains(p))
        .collect();
    assert_eq!(host_tasks.len(), guest_tasks.len(), "{tag}: task lists");
    for ((pid, host), (_, guest)) in host_tasks.iter().zip(&guest_tasks) {
        assert!(
            guest.starts_with(host.as_str())
                && (host.len() == 15
                    || guest.len() == host.len()
                    || guest[host.len()..].starts_with('-')),
            "{tag}: pid {pid}: host comm {host:?}, guest {guest:?}"
        );
    }

    // Modules: name, core size, state and core address as the guest's /proc/modules gives
    // them (root sees the addresses); and each module's ORC entry count, which the kernel
    // takes from the size of the module's `.orc_unwind_ip` section, as its .ko file says.
    let host_modules = vmm_ok(&["modules", "--dump", &dump]);
    let mut compared = 0;
    for line in proc_modules.lines() {
        // `virtio_blk 24576 0 - Live 0xffffffffc0123000`
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 {
            continue;
        }
        let host = host_modules
            .lines()
            .find(|l| l.split(' ').next() == Some(f[0]))
            .unwrap_or_else(|| panic!("{tag}: module {} missing: {host_modules}", f[0]));
        let h: Vec<&str> = host.split(' ').collect();
        assert_eq!(
            (h[1], h[2], h[3]),
            (f[1], f[4], f[5]),
            "{tag}: {host} vs {line}"
        );
        let orc: usize = h[5].strip_prefix("orc=").unwrap().parse().unwrap();
        assert_eq!(orc, ko_orc_entries(f[0]), "{tag}: {host}");
        compared += 1;
    }
    assert_eq!(
        compared,
        host_modules.lines().count(),
        "{tag}: {host_modules}"
    );
    assert!(compared >= 3, "{tag}: {proc_modules}");

    // Stack: the guest's /proc/PID/stack (which hides the scheduler's own __sched frames)
    // is the tail of the host's reliable ORC trace of the same task.
    let guest_frames: Vec<&str> = proc_stack.lines().map(str::trim).collect();
    assert!(guest_frames.len() >= 4, "{tag}: {proc_stack}");
    let st = vmm_ok(&["stack", &sleep_pid.to_string(), "--dump", &dump]);
    let host_frames: Vec<&str> = st.lines().filter(|l| l.starts_with("[<0>]")).collect();
    assert!(st.contains("(user mode)"), "{tag}: {st}");
    assert_eq!(st.lines().last(), Some("reliable"), "{tag}: {st}");
    assert!(
        host_frames.ends_with(&guest_frames),
        "{tag}: host {host_frames:?} vs guest {guest_frames:?}"
    );
    assert!(host_frames.len() - guest_frames.len() <= 4, "{tag}: {st}");
    kaslr_offset(&info)
}

/// Entries of the `.orc_unwind_ip` section of module `name`'s .ko in the extracted kernel
/// package the guest image was built from.
fn ko_orc_entries(name: &str) -> usize {
    fn find(dir: &std::path::Path, file: &str) -> Option<PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.is_dir() {
                if let Some(f) = find(&p, file) {
                    return Some(f);
                }
            } else if p.file_name().is_some_and(|n| n == file) {
                return Some(p);
            }
        }
        None
    }
    let extract = integration_tests::workspace_root().join("guest-images/cache/extract");
    let ko = find(&extract, &format!("{name}.ko"))
        .unwrap_or_else(|| panic!("{name}.ko is not under {}", extract.display()));
    let bytes = std::fs::read(&ko).unwrap();
    let file = object::File::parse(&*bytes).unwrap();
    use object::{Object, ObjectSection};
    let size = file
        .section_by_name(".orc_unwind_ip")
        .unwrap_or_else(|| panic!("{} has no .orc_unwind_ip", ko.display()))
        .size();
    (size / 4) as usize
}

fn kaslr_offset(kernel_info: &str) -> String {
    kernel_info
        .lines()
        .find_map(|l| l.strip_prefix("kaslr offset:"))
        .expect("vmm kernel prints the KASLR offset")
        .trim()
        .to_string()
}

/// Two QEMU boots, run side by side: 5-level paging, and 4-level paging with PTI forced
/// on. With the PVM fixture that makes three boots of the same kernel, each with its own
/// KASLR offset; the checks above passed on each, and the offsets must not all be the same
/// (all three equal by chance: a few in a million).
#[test]
fn five_level_and_pti_guests_match_their_own_proc_at_their_own_kaslr_offsets() {
    let la57 = std::thread::spawn(|| check_against_guest("la57", "max", "", 5));
    let pti = std::thread::spawn(|| check_against_guest("pti", "max,-la57", "pti=on", 4));
    let (la57, pti) = (la57.join(), pti.join());
    let (la57, pti) = match (la57, pti) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => std::panic::resume_unwind(e),
    };
    let fixture = integration_tests::kernel_guest_snapshot();
    let pvm = kaslr_offset(&vmm_ok(&[
        "kernel",
        "--snapshot",
        fixture.to_str().unwrap(),
    ]));
    let offsets: BTreeSet<&str> = [la57.as_str(), pti.as_str(), pvm.as_str()].into();
    assert!(
        offsets.len() >= 2,
        "three boots, one KASLR offset: la57 {la57}, pti {pti}, pvm {pvm}"
    );
    eprintln!("KASLR offsets: la57 {la57}, pti {pti}, PVM fixture {pvm}");
}
