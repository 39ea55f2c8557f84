//! Boots the prebuilt Debian guest image with 2 vCPUs and checks it from inside.
//! Slow on hosts where guest kernel code is emulated (see docs/pvm.md): it prints
//! progress every minute while waiting.

use std::time::{Duration, Instant};

use integration_tests::{boot_timeout, guest_artifact, require_kvm, Guest};

#[test]
#[ignore = "on this project's PVM hosts guest user space cannot make system calls (`vmm host-check`, docs/pvm.md); run scripts/test-boot"]
fn boots_debian_cloud_kernel_from_image_with_two_vcpus() {
    require_kvm();
    let image = guest_artifact("guest.img");
    // Boot a private copy: the guest mounts the disk read-write.
    let copy = std::env::temp_dir().join(format!("vmm-boot-test-{}.img", std::process::id()));
    std::fs::copy(&image, &copy).unwrap();

    let started = Instant::now();
    let mut guest = Guest::start(&[
        "run",
        copy.to_str().unwrap(),
        "--cpus",
        "2",
        "--memory",
        "512",
    ]);
    guest.wait_for("VMM-GUEST-READY", boot_timeout());
    eprintln!("guest ready after {:?}", started.elapsed());
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
