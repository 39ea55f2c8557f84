//! Boots the prebuilt Debian guest image with 2 vCPUs and checks it from inside.
//! Slow on hosts where guest kernel code is emulated (see docs/pvm.md): it prints
//! progress every minute while waiting.
//!
//! On hosts whose KVM does not switch to CPL 0 on SYSCALL from guest user mode (PVM;
//! `vmm host-check` says so), guest user space needs the `pvm-syscall` live patch, which
//! `vmm run --boot-patch` applies just before the kernel executes init.

use std::time::{Duration, Instant};

use integration_tests::{
    boot_timeout, build_sample_bundle, guest_artifact, require_kvm, run_vmm, Guest,
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
        args.extend(["--boot-patch", bundle.as_str()]);
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
        assert!(guest
            .output()
            .contains("pvm-syscall: system calls from user mode are completed by the live patch"));
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

    guest.send_line("poweroff -f");
    let status = guest.wait_exit(step);
    assert!(
        status.success(),
        "vmm exit status after guest poweroff: {status}; stderr: {}",
        guest.stderr()
    );
    let _ = std::fs::remove_file(&copy);
}
