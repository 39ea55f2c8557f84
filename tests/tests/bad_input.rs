//! Bad input to `vmm run`: one clear line on stderr, non-zero exit, no panic,
//! no hang, and the image left untouched.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::{guest_artifact, run_vmm, vmm_binary};

const T: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-bad-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn hash(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Runs vmm and checks: non-zero exit, exactly one stderr line starting with
/// "error:" that contains `expect`, and no panic.
fn assert_rejected(args: &[&str], expect: &str) {
    let (status, stdout, stderr) = run_vmm(args, T);
    assert!(
        !status.success(),
        "vmm {args:?} succeeded; stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "vmm panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one error line, got: {stderr:?} (stdout {stdout:?})"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(
        lines[0].contains(expect),
        "expected {expect:?} in {stderr:?}"
    );
}

fn mkfs(dir: &Path, image: &Path) {
    let status = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(dir)
        .arg(image)
        .arg("8M")
        .status()
        .expect("mkfs.ext4 is needed (apt-get install e2fsprogs)");
    assert!(status.success());
}

#[test]
fn missing_image() {
    assert_rejected(&["run", "/nonexistent/guest.img"], "/nonexistent/guest.img");
}

#[test]
fn unreadable_image_is_a_directory() {
    let dir = scratch("a-directory.img");
    std::fs::create_dir_all(&dir).unwrap();
    assert_rejected(&["run", dir.to_str().unwrap()], "a-directory.img");
}

#[test]
fn image_without_a_kernel() {
    let root = scratch("nokernel-root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/README"), "no kernel here").unwrap();
    let img = scratch("nokernel.img");
    mkfs(&root, &img);
    let before = hash(&img);
    assert_rejected(&["run", img.to_str().unwrap()], "vmlinuz");
    assert_eq!(before, hash(&img), "image modified");
}

#[test]
fn image_that_is_not_ext4() {
    let img = scratch("random.img");
    std::fs::write(&img, vec![0x5au8; 4 << 20]).unwrap();
    assert_rejected(&["run", img.to_str().unwrap()], "random.img");
}

#[test]
fn corrupt_ext4_image() {
    let root = scratch("corrupt-root");
    std::fs::create_dir_all(root.join("boot")).unwrap();
    std::fs::write(root.join("boot/vmlinuz-1.0"), vec![0u8; 4096]).unwrap();
    let img = scratch("corrupt.img");
    mkfs(&root, &img);
    // Scribble over the group descriptor table and inode tables.
    let mut bytes = std::fs::read(&img).unwrap();
    for b in &mut bytes[4096..4096 * 64] {
        *b = 0xa5;
    }
    std::fs::write(&img, &bytes).unwrap();
    let (status, _, stderr) = run_vmm(&["run", img.to_str().unwrap()], T);
    assert!(!status.success());
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(bytes, hash(&img), "image modified");
}

#[test]
fn kernel_that_is_not_a_bzimage() {
    let k = scratch("not-a-kernel");
    std::fs::write(&k, b"#!/bin/sh\necho hello\n").unwrap();
    assert_rejected(&["run", "--kernel", k.to_str().unwrap()], "not a bzImage");
}

#[test]
fn memory_too_small_for_the_kernel() {
    let kernel = guest_artifact("vmlinuz");
    assert_rejected(
        &[
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32",
        ],
        "memory too small",
    );
}

#[test]
fn zero_and_too_many_cpus() {
    let img = guest_artifact("guest.img");
    let before = hash(&img);
    assert_rejected(
        &["run", img.to_str().unwrap(), "--cpus", "0"],
        "--cpus must be between 1 and 254",
    );
    assert_rejected(
        &["run", img.to_str().unwrap(), "--cpus", "255"],
        "--cpus must be between 1 and 254",
    );
    assert_eq!(before, hash(&img), "image modified");
}

#[test]
fn kvm_not_permitted() {
    // /dev/kvm is root-only here; run vmm as an unprivileged user.
    let kernel = guest_artifact("vmlinuz");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(vmm_binary())
        .args([
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--console",
            "none",
        ])
        .output()
        .expect("setpriv (util-linux) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/dev/kvm"), "{stderr}");
}

#[test]
fn kvm_missing() {
    // A private mount namespace whose /dev is an empty tmpfs: /dev/kvm does not exist there.
    let kernel = guest_artifact("vmlinuz");
    let script = format!(
        "mount -t tmpfs none /dev && exec {} run --kernel {} --console none",
        vmm_binary().display(),
        kernel.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare (util-linux) is needed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("/dev/kvm does not exist"), "{stderr}");
}

#[test]
fn restore_from_a_missing_snapshot() {
    assert_rejected(
        &["run", "--restore", "/nonexistent/snapshot"],
        "cannot read state file /nonexistent/snapshot/state",
    );
}

#[test]
fn restore_from_a_garbage_state_file() {
    let dir = scratch("garbage-snapshot");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("state"), b"VMMSTATE\x01\0\0\0 not really").unwrap();
    std::fs::write(dir.join("memory"), b"").unwrap();
    assert_rejected(&["run", "--restore", dir.to_str().unwrap()], "truncated");
    std::fs::write(dir.join("state"), b"#!/bin/sh\n").unwrap();
    assert_rejected(&["run", "--restore", dir.to_str().unwrap()], "bad magic");
}

#[test]
fn restore_does_not_mix_with_boot_options() {
    let (status, _, stderr) = run_vmm(&["run", "--restore", "/tmp", "/some/guest.img"], T);
    assert!(
        !status.success() && stderr.contains("cannot be used with"),
        "{stderr}"
    );
    assert_rejected(
        &["run", "/some/guest.img", "--disk", "/some/disk.img"],
        "--disk goes with --kernel or --restore",
    );
    let (status, _, stderr) = run_vmm(&["run", "/some/guest.img", "--snapshot-dir", "/tmp/x"], T);
    assert!(
        !status.success() && stderr.contains("--snapshot-on-output"),
        "{stderr}"
    );
}
