//! `vmm patch BUNDLE` and `vmm patch disable NAME` wait for their transition: while it is
//! blocked the client prints progress once a second (attempts, time so far), and Ctrl-C
//! on an apply disables the bundle, which reverses the transition still in progress.

use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm::api::client;

/// What the request thread hands back: the HTTP status and body, or why it failed.
type Answer = Result<(u16, String), String>;

/// Sends `PUT path body` and waits for the answer, reporting the transition of `bundle`
/// meanwhile. Returns the status and body of the answer.
pub fn wait(
    socket: &Path,
    path: &'static str,
    body: String,
    bundle: &str,
    is_apply: bool,
) -> Answer {
    let (tx, rx) = mpsc::channel::<Answer>();
    let sock = socket.to_path_buf();
    std::thread::spawn(move || {
        let answer = client::request(&sock, "PUT", path, Some(&body)).map_err(|e| e.to_string());
        let _ = tx.send(answer);
    });
    let stop = vmm::signals::install_stop_handlers().ok();
    let mut next_report = Instant::now() + Duration::from_secs(1);
    let mut interrupted = false;
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(answer) => return answer,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err("the request thread ended without an answer".into())
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if !interrupted && stop.as_ref().is_some_and(|e| e.read().is_ok()) {
            interrupted = true;
            if !is_apply {
                return Err(format!(
                    "interrupted; the unpatching transition of {bundle} goes on in the VMM \
                     (vmm patch list shows it)"
                ));
            }
            eprintln!("vmm: interrupted: disabling {bundle}, which reverses its transition");
            let body = serde_json::json!({ "name": bundle }).to_string();
            if let Err(e) = client::request(socket, "PUT", "/patches/disable", Some(&body)) {
                return Err(format!("interrupted, and the disable failed: {e}"));
            }
            continue;
        }
        if Instant::now() >= next_report {
            report(socket, bundle);
            next_report += Duration::from_secs(1);
        }
    }
}

/// A progress line if the transition of `bundle` is in flight.
fn report(socket: &Path, bundle: &str) {
    let Ok((200, text)) = client::request(socket, "GET", "/patches", None) else {
        return;
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return;
    };
    if let Some(line) = progress_line(&v["transition"], bundle) {
        eprintln!("{line}");
    }
}

/// The progress line for `GET /patches`'s `transition` when it is `bundle`'s.
pub fn progress_line(t: &serde_json::Value, bundle: &str) -> Option<String> {
    if t["bundle"].as_str() != Some(bundle) {
        return None;
    }
    Some(format!(
        "vmm: {bundle}: {} transition blocked, {} attempts in {:.1} s (vmm patch events \
         names the blockers; Ctrl-C reverses a patching transition)",
        t["kind"].as_str().unwrap_or("?"),
        t["attempts"],
        t["elapsed_ms"].as_f64().unwrap_or(0.0) / 1000.0
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn progress_only_for_the_bundle_in_transition() {
        let t = json!({"bundle": "fix", "kind": "patching", "attempts": 4, "elapsed_ms": 2500});
        assert_eq!(
            progress_line(&t, "fix").unwrap(),
            "vmm: fix: patching transition blocked, 4 attempts in 2.5 s (vmm patch events \
             names the blockers; Ctrl-C reverses a patching transition)"
        );
        assert!(progress_line(&t, "other").is_none());
        assert!(progress_line(&serde_json::Value::Null, "fix").is_none());
    }
}
