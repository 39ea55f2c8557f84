//! Shared harness for the integration tests: locating the `vmm` binary and the
//! prebuilt guest images, and driving a guest's serial console through pipes.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives in the workspace")
        .to_path_buf()
}

/// The `vmm` binary, built (in the same profile as the tests) if it is missing or stale.
pub fn vmm_binary() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = workspace_root();
            let release = !cfg!(debug_assertions);
            let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            cmd.current_dir(&root)
                .args(["build", "-q", "-p", "vmm", "--bin", "vmm"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd
                .status()
                .expect("cannot run cargo to build the vmm binary");
            assert!(status.success(), "building the vmm binary failed");
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| root.join("target"));
            target
                .join(if release { "release" } else { "debug" })
                .join("vmm")
        })
        .clone()
}

/// A file produced by `guest-images/build.sh`; fails the test with the fix if missing.
pub fn guest_artifact(name: &str) -> PathBuf {
    let path = workspace_root().join("guest-images/out").join(name);
    assert!(
        path.exists(),
        "{} is missing: run guest-images/build.sh first (scripts/test does)",
        path.display()
    );
    path
}

/// Fails the test (never skips) when KVM is not usable here.
pub fn require_kvm() {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        panic!("this integration test needs /dev/kvm (read-write): {e}");
    }
}

/// A running `vmm run` whose console is driven through stdin/stdout pipes.
pub struct Guest {
    /// The VM's private API socket.
    pub api_socket: PathBuf,
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    consumed: usize,
    /// Files the test made for this guest (a private disk), removed with it.
    owned: Vec<PathBuf>,
}

fn pump(mut from: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>, echo: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                break;
            }
            if echo {
                let _ = std::io::stderr().write_all(&buf[..n]);
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
}

impl Guest {
    /// Starts `vmm` with `args`; console output is mirrored to the test's stderr
    /// when `VMM_TEST_ECHO=1`.
    pub fn start(args: &[&str]) -> Guest {
        // Every test VM gets its own API socket, so parallel tests never collide.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let api_socket =
            std::env::temp_dir().join(format!("vmm-test-{}-{n}.sock", std::process::id()));
        let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        // A `--name` VM uses its default socket (the test knows where).
        if args.first() == Some(&"run")
            && !args.contains(&"--api-socket")
            && !args.contains(&"--name")
        {
            full.push("--api-socket".into());
            full.push(api_socket.display().to_string());
        }
        let mut cmd = Command::new(vmm_binary());
        cmd.args(&full);
        Guest::spawn(cmd, api_socket)
    }

    /// Starts any program (e.g. QEMU, for oracle tests) with its console on stdin/stdout.
    pub fn spawn(mut cmd: Command, api_socket: PathBuf) -> Guest {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {:?}: {e}", cmd.get_program()));
        let echo = std::env::var("VMM_TEST_ECHO").is_ok_and(|v| v == "1");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().unwrap(), output.clone(), echo);
        pump(child.stderr.take().unwrap(), stderr.clone(), echo);
        Guest {
            api_socket,
            stdin: child.stdin.take(),
            child,
            output,
            stderr,
            consumed: 0,
            owned: Vec::new(),
        }
    }

    /// For a wait that timed out: the console's receive side (`GET /vm`) and where each
    /// vCPU is (`vmm stack --cpu N`), when the VM has an API socket.
    fn diagnose(&self) -> String {
        if std::os::unix::net::UnixStream::connect(&self.api_socket).is_err() {
            return format!("no API socket at {}", self.api_socket.display());
        }
        let status = json(&api(&self.api_socket, "GET", "/vm", "").1);
        let mut out = format!("console receive side: {}", status["console"]);
        let socket = self.api_socket.display().to_string();
        for cpu in 0..status["vcpus"].as_u64().unwrap_or(0) {
            let cpu = cpu.to_string();
            let (_, stack, err) = run_vmm(
                &["stack", "--cpu", &cpu, "--api-socket", &socket],
                Duration::from_secs(60),
            );
            out += &format!("\nvCPU {cpu}:\n{stack}{err}");
        }
        out
    }

    /// Whether the `vmm` process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// All console output so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Console output after what earlier waits consumed (not consumed by this call).
    pub fn output_since_last_wait(&self) -> String {
        let out = self.output.lock().unwrap();
        String::from_utf8_lossy(&out[self.consumed.min(out.len())..]).into_owned()
    }

    /// The VMM's own stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    fn last_line(&self) -> String {
        let out = self.output();
        out.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .chars()
            .take(160)
            .collect()
    }

    /// Waits until `needle` appears in the console output after what earlier waits
    /// consumed, printing progress every `progress_every`. Returns the output up to and
    /// including the needle.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> String {
        let start = Instant::now();
        let mut next_progress = Duration::from_secs(60);
        loop {
            {
                let out = self.output.lock().unwrap();
                let tail = &out[self.consumed.min(out.len())..];
                if let Some(pos) = find(tail, needle.as_bytes()) {
                    let end = self.consumed + pos + needle.len();
                    let text = String::from_utf8_lossy(&out[self.consumed..end]).into_owned();
                    drop(out);
                    self.consumed = end;
                    return text;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "vmm exited ({status}) before printing {needle:?}\nstderr: {}\nconsole tail: {}",
                    self.stderr(),
                    tail_of(&self.output(), 3000)
                );
            }
            let elapsed = start.elapsed();
            if elapsed >= timeout {
                panic!(
                    "timed out after {elapsed:?} waiting for {needle:?}\nstderr: {}\n\
                     console tail: {}\n{}",
                    self.stderr(),
                    tail_of(&self.output(), 3000),
                    self.diagnose()
                );
            }
            if elapsed >= next_progress {
                eprintln!(
                    "[{:>5}s] waiting for {needle:?}; console: {}",
                    elapsed.as_secs(),
                    self.last_line()
                );
                next_progress += Duration::from_secs(60);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Types a line into the guest's console.
    pub fn send_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Runs a shell command in the guest and returns its output (between two markers
    /// that the command echo cannot produce).
    pub fn run(&mut self, command: &str, timeout: Duration) -> String {
        let id = self.consumed;
        self.send_line(&format!(
            "echo BEGIN-$(({id}+1)); {command}; echo END-$(({id}+2))"
        ));
        self.wait_for(&format!("BEGIN-{}", id + 1), timeout);
        let text = self.wait_for(&format!("END-{}", id + 2), timeout);
        text.rsplit_once(&format!("END-{}", id + 2))
            .map(|(body, _)| body)
            .unwrap_or(&text)
            .trim()
            .replace('\r', "")
    }

    /// Waits for the VMM to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "vmm did not exit within {timeout:?}; console tail: {}",
                tail_of(&self.output(), 2000)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for f in &self.owned {
            let _ = std::fs::remove_file(f);
        }
        // The socket path `start` made for this guest (unused when the test gave its own).
        let _ = std::fs::remove_file(&self.api_socket);
    }
}

/// The kernel-only fixture restored on a private copy of its disk (removed with the
/// guest), with its API socket up.
pub fn restore_fixture(tag: &str) -> Guest {
    let snap = kernel_guest_snapshot();
    let disk = private_disk(tag);
    let mut guest = Guest::start(&[
        "run",
        "--restore",
        snap.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ]);
    guest.owned.push(disk);
    wait_for_socket(&guest.api_socket, Duration::from_secs(60));
    guest
}

/// Builds the sample patch `guest-images/patches/SAMPLE` from its `manifest` and C
/// `source` with `vmm bundle build` (kbuild against the guest kernel's headers) and
/// returns the bundle's path.
pub fn build_sample_bundle(sample: &str, manifest: &str, source: &str) -> String {
    let dir = workspace_root().join("guest-images/patches").join(sample);
    let out = std::env::temp_dir().join(format!(
        "vmm-{sample}-{manifest}-{}.bundle",
        std::process::id()
    ));
    vmm_ok(
        &[
            "bundle",
            "build",
            dir.join(manifest).to_str().unwrap(),
            dir.join(source).to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ],
        Duration::from_secs(300),
    );
    out.display().to_string()
}

/// Writes a copy of the bundle at `bundle` to `out` with its manifest changed by `edit`
/// and its format version set to `version`, re-checksummed (docs/bundle-format.md), so a
/// test can make a well-formed bundle that is wrong in exactly one way.
pub fn repack_bundle(
    bundle: &str,
    out: &Path,
    version: u32,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    use sha2::{Digest, Sha256};
    let b = std::fs::read(bundle).unwrap();
    let m = u32::from_le_bytes(b[12..16].try_into().unwrap()) as usize;
    let o = u64::from_le_bytes(b[16..24].try_into().unwrap()) as usize;
    let mut manifest: serde_json::Value = serde_json::from_slice(&b[24..24 + m]).unwrap();
    edit(&mut manifest);
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let mut file = b[..8].to_vec();
    file.extend_from_slice(&version.to_le_bytes());
    file.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    file.extend_from_slice(&(o as u64).to_le_bytes());
    file.extend_from_slice(&manifest);
    file.extend_from_slice(&b[24 + m..24 + m + o]);
    let sum = Sha256::digest(&file);
    file.extend_from_slice(&sum);
    std::fs::write(out, file).unwrap();
}

/// Runs `vmm ARGS`, requires success and returns its stdout.
pub fn vmm_ok(args: &[&str], timeout: Duration) -> String {
    let (status, out, err) = run_vmm(args, timeout);
    assert!(status.success(), "vmm {args:?}: {err}");
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn tail_of(s: &str, n: usize) -> String {
    let start = s.len().saturating_sub(n);
    let start = (start..s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// Runs `vmm` to completion with `args` and returns (status, stdout, stderr).
pub fn run_vmm(args: &[&str], timeout: Duration) -> (ExitStatus, String, String) {
    let mut guest = Guest::start(args);
    drop(guest.stdin.take());
    let status = guest.wait_exit(timeout);
    // Let the pump threads drain.
    std::thread::sleep(Duration::from_millis(50));
    (status, guest.output(), guest.stderr())
}

/// Minutes to wait for a cold boot (this host emulates guest kernel code; see docs/pvm.md).
pub fn boot_timeout() -> Duration {
    let minutes = std::env::var("VMM_TEST_BOOT_MINUTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(70);
    Duration::from_secs(60 * minutes)
}

impl Guest {
    /// Sends a serial break and then `key`: the guest kernel's magic SysRq (Ctrl-A b on
    /// the VMM's console).
    pub fn sysrq(&mut self, key: char) {
        let stdin = self.stdin.as_mut().expect("stdin already closed");
        stdin.write_all(&[0x01, b'b', key as u8]).unwrap();
        stdin.flush().unwrap();
    }
}

/// The kernel command-line options of the kernel-only guest: a PID 1 that makes no system
/// call (guest user space cannot make system calls on PVM hosts; docs/pvm.md) and every
/// SysRq function.
pub const KERNEL_GUEST_APPEND: &str = "rdinit=/spin-init sysrq_always_enabled";
/// The console line after which the kernel-only guest is up.
pub const KERNEL_GUEST_READY: &str = "Run /spin-init as init process";

fn mtime_key(path: &Path) -> String {
    let meta = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    format!("{:x}-{:x}", meta.len(), mtime)
}

/// Version of the fixture snapshot's contents (2: guest memory includes the patch area;
/// 3: the patch area's page table is a reserved page below 1 MiB, out of the e820 RAM).
pub const FIXTURE_VERSION: u32 = 3;

/// A snapshot of `guest.img` booted as a kernel-only guest (2 vCPUs), taken 20 s after it
/// is up. Built once (a cold boot: many minutes on PVM hosts, with progress on stderr)
/// and reused while the guest image and the vmm binary are unchanged.
pub fn kernel_guest_snapshot() -> PathBuf {
    static SNAP: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    SNAP.get_or_init(|| {
        require_kvm();
        let image = guest_artifact("guest.img");
        // Keyed by the guest image and by what the snapshot must contain; bump
        // FIXTURE_VERSION when the VM layout or the state file changes. (A state file
        // this build cannot read is refused by the restore with a clear error anyway.)
        let key = format!("{}-v{FIXTURE_VERSION}", mtime_key(&image));
        let root = workspace_root().join("target/test-fixtures");
        let dir = root.join(format!("kernel-guest-{key}"));
        if dir.join("complete").exists() {
            return dir;
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let disk = root.join("fixture-disk.img");
        std::fs::copy(&image, &disk).unwrap();
        eprintln!("fixture: cold-booting the kernel-only guest to snapshot it (docs/pvm.md)");
        let started = Instant::now();
        let mut guest = Guest::start(&[
            "run",
            "--kernel",
            guest_artifact("vmlinuz").to_str().unwrap(),
            "--initrd",
            guest_artifact("initrd.img").to_str().unwrap(),
            "--disk",
            disk.to_str().unwrap(),
            "--cpus",
            "2",
            "--append",
            KERNEL_GUEST_APPEND,
            "--snapshot-on-output",
            KERNEL_GUEST_READY,
            "--snapshot-delay",
            "20",
            "--snapshot-stop",
            "--snapshot-dir",
            dir.to_str().unwrap(),
        ]);
        guest.wait_for(KERNEL_GUEST_READY, boot_timeout());
        let status = guest.wait_exit(Duration::from_secs(600));
        assert!(
            status.success(),
            "fixture snapshot failed ({status}): {}",
            guest.stderr()
        );
        eprintln!(
            "fixture: snapshot taken after {:.0} s of boot",
            started.elapsed().as_secs_f64()
        );
        std::fs::write(dir.join("complete"), b"").unwrap();
        dir
    })
    .clone()
}

/// A private copy of the fixture's disk for one restored guest.
pub fn private_disk(tag: &str) -> PathBuf {
    let src = workspace_root().join("target/test-fixtures/fixture-disk.img");
    let dst = std::env::temp_dir().join(format!("vmm-disk-{}-{tag}.img", std::process::id()));
    std::fs::copy(&src, &dst).unwrap_or_else(|e| panic!("{}: {e}", src.display()));
    // Keep the fixture's mtime, as `cp -p` would: the restore then recognises the disk by
    // size and mtime instead of hashing it; the contents are the fixture's either way.
    let modified = std::fs::metadata(&src).and_then(|m| m.modified());
    std::fs::File::options()
        .write(true)
        .open(&dst)
        .and_then(|f| f.set_modified(modified?))
        .unwrap_or_else(|e| panic!("{}: {e}", dst.display()));
    dst
}

/// One request to a VM's API socket: (status, body).
pub fn api(socket: &Path, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::os::unix::net::UnixStream;
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("API socket {}: {e}", socket.display()));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad HTTP response {out:?}"));
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `PUT /patches` for `bundle`; `extra` is appended to the JSON body's fields (e.g.
/// `,"force":true`).
pub fn put_patch(socket: &Path, bundle: &str, extra: &str) -> (u16, String) {
    api(
        socket,
        "PUT",
        "/patches",
        &format!(r#"{{"bundle":"{bundle}"{extra}}}"#),
    )
}

/// `PUT /patches/disable` for bundle `name`: (HTTP status, body).
pub fn disable_patch(socket: &Path, name: &str) -> (u16, String) {
    api(
        socket,
        "PUT",
        "/patches/disable",
        &format!(r#"{{"name":"{name}"}}"#),
    )
}

/// SHA-256 of the guest kernel's text and of the patch area (`GET /kernel/digest`, read
/// with the vCPUs paused): what a refused patch request must leave unchanged.
pub fn kernel_digest(socket: &Path) -> serde_json::Value {
    let (status, body) = api(socket, "GET", "/kernel/digest", "");
    assert_eq!(status, 200, "GET /kernel/digest: {body}");
    json(&body)
}

/// Asserts that the event log (`GET /patches/events`) has an event of `bundle` whose text
/// satisfies `what`; the log is in the panic message otherwise.
pub fn assert_logged(socket: &Path, bundle: &str, what: impl Fn(&str) -> bool) {
    let events = json(&api(socket, "GET", "/patches/events", "").1);
    assert!(
        events["events"].as_array().is_some_and(|all| all
            .iter()
            .any(|e| e["bundle"] == bundle && e["what"].as_str().is_some_and(&what))),
        "no such event of {bundle}: {events}"
    );
}

/// Waits until the transition in flight has made `attempts` attempts (it is retrying).
pub fn wait_for_attempts(socket: &Path, attempts: u64, timeout: Duration) {
    let started = Instant::now();
    loop {
        let list = json(&api(socket, "GET", "/patches", "").1);
        if list["transition"]["attempts"].as_u64().unwrap_or(0) >= attempts {
            return;
        }
        assert!(
            started.elapsed() < timeout,
            "no transition reached {attempts} attempts: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The record of bundle `name` in a `GET /patches` answer, if the ledger lists it.
pub fn bundle_record(list: &serde_json::Value, name: &str) -> Option<serde_json::Value> {
    list["bundles"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
}

/// Parses an API answer's JSON body.
pub fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Waits until `socket` accepts connections.
pub fn wait_for_socket(socket: &Path, timeout: Duration) {
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < timeout,
            "API socket {} never came up",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
