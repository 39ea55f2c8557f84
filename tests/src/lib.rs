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
    child: Child,
    stdin: Option<ChildStdin>,
    output: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    consumed: usize,
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
        let mut child = Command::new(vmm_binary())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start vmm");
        let echo = std::env::var("VMM_TEST_ECHO").is_ok_and(|v| v == "1");
        let output = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        pump(child.stdout.take().unwrap(), output.clone(), echo);
        pump(child.stderr.take().unwrap(), stderr.clone(), echo);
        Guest {
            stdin: child.stdin.take(),
            child,
            output,
            stderr,
            consumed: 0,
        }
    }

    /// All console output so far.
    pub fn output(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
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
            assert!(
                elapsed < timeout,
                "timed out after {elapsed:?} waiting for {needle:?}\nstderr: {}\nconsole tail: {}",
                self.stderr(),
                tail_of(&self.output(), 3000)
            );
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
    }
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
