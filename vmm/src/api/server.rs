//! The control socket: a Unix socket (mode 0600) served by one API thread. Each
//! request is routed, handed to the VMM thread (which owns the VM) through a channel,
//! and answered with what the VMM thread replies. A patch apply or disable, answered
//! only when its transition ends, waits on a thread of its own.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::http;
use super::routes::{self, ApiRequest, ApiResponse};

/// Errors setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("API socket {0} is in use by a running VM (pick another --name or --api-socket)")]
    InUse(String),
    #[error("cannot create API socket {path}: {source}")]
    Bind {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create the API eventfd: {0}")]
    EventFd(std::io::Error),
}

/// A request waiting for the VMM thread, with where to send the answer.
pub struct Pending {
    pub request: ApiRequest,
    pub reply: Sender<ApiResponse>,
    /// When the API thread had the whole request (latencies are measured from here).
    pub received: Instant,
}

/// The VMM thread's end of the API.
pub struct ApiChannel {
    pub requests: Receiver<Pending>,
    /// Written for every request, so the event loop wakes up at once.
    pub wake: Arc<EventFd>,
    pub path: PathBuf,
}

impl Drop for ApiChannel {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The default socket for VM `name`: `/run/vmm/NAME.sock` as root, else under
/// `$XDG_RUNTIME_DIR/vmm/` (or the temporary directory).
pub fn default_socket(name: &str) -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let base = if root {
        PathBuf::from("/run/vmm")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join("vmm")
    };
    base.join(format!("{name}.sock"))
}

/// How long a request may wait for the VMM thread (a snapshot writes the whole RAM).
const REPLY_TIMEOUT: Duration = Duration::from_secs(600);

/// At most this many requests wait for a patch transition at once.
const MAX_WAITING: usize = 8;

/// Serves one connection. Most requests are answered at once by the VMM thread, in
/// turn; a patch apply or disable is answered when its transition ends, which may take
/// many attempts, so its connection waits on a thread of its own and the API stays
/// responsive meanwhile.
fn serve(
    mut stream: UnixStream,
    to_vmm: &Sender<Pending>,
    wake: &EventFd,
    waiting: &Arc<AtomicUsize>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let request = match http::read_request(&mut stream) {
        Err(http::HttpError::TooLarge) => Err(ApiResponse::error(413, "request too large")),
        Err(e) => Err(ApiResponse::error(400, e.to_string())),
        Ok(req) => routes::route(&req),
    };
    let request = match request {
        Ok(r) => r,
        Err(response) => {
            let _ = http::write_response(&mut stream, response.status, &response.body);
            return;
        }
    };
    let long = matches!(
        request,
        ApiRequest::ApplyPatch { .. } | ApiRequest::DisablePatch { .. }
    );
    if long && waiting.load(Ordering::Acquire) >= MAX_WAITING {
        let response = ApiResponse::error(503, "too many patch requests waiting");
        let _ = http::write_response(&mut stream, response.status, &response.body);
        return;
    }
    let (reply, rx) = channel();
    let pending = Pending {
        request,
        reply,
        received: Instant::now(),
    };
    let sent = to_vmm.send(pending).is_ok();
    if sent {
        let _ = wake.write(1);
    }
    let answer = move |mut stream: UnixStream| {
        let response = if sent {
            rx.recv_timeout(REPLY_TIMEOUT)
                .unwrap_or_else(|_| ApiResponse::error(500, "the VMM did not answer"))
        } else {
            ApiResponse::error(500, "the VM is shutting down")
        };
        let _ = http::write_response(&mut stream, response.status, &response.body);
    };
    if !long {
        answer(stream);
        return;
    }
    waiting.fetch_add(1, Ordering::AcqRel);
    let count = waiting.clone();
    let spawned = std::thread::Builder::new()
        .name("api-wait".into())
        .spawn(move || {
            answer(stream);
            count.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        // The request is with the VMM thread; its answer is dropped with the channel.
        waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Binds a socket that is never reachable with wider permissions than 0600: it is bound in
/// a fresh 0700 directory next to `path`, restricted, then renamed into place.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent)?;
    let name = path.file_name().ok_or(std::io::ErrorKind::InvalidInput)?;
    let staging = parent.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("s");
    let result = UnixListener::bind(&staged).and_then(|listener| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&staging);
    result
}

/// Creates the socket at `path` and starts the API thread.
pub fn start(path: &Path) -> Result<ApiChannel, ServerError> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ServerError::InUse(path.display().to_string()));
        }
        let _ = std::fs::remove_file(path); // stale: nobody listens
    }
    let bind_err = |source| ServerError::Bind {
        path: path.display().to_string(),
        source,
    };
    let listener = bind_private(path).map_err(bind_err)?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(ServerError::EventFd)?);
    let (tx, rx) = channel();
    let thread_wake = wake.clone();
    std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            let waiting = Arc::new(AtomicUsize::new(0));
            for stream in listener.incoming().flatten() {
                serve(stream, &tx, &thread_wake, &waiting);
            }
        })
        .map_err(bind_err)?;
    Ok(ApiChannel {
        requests: rx,
        wake,
        path: path.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::client;
    use std::os::unix::fs::PermissionsExt;

    fn temp_socket(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("vmm-api-unit-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("nested").join("api.sock")
    }

    #[test]
    fn serves_on_a_private_socket_and_refuses_one_in_use() {
        let path = temp_socket("serve");
        let api = start(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(start(&path), Err(ServerError::InUse(_))));

        // Routing errors are answered by the API thread itself.
        let (status, body) = client::request(&path, "GET", "/nope", None).unwrap();
        assert_eq!(status, 404);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert!(v["error"].as_str().is_some(), "{body}");

        // Routed requests reach the VMM thread's end, with their arrival time.
        let vmm = std::thread::spawn(move || {
            let p = api.requests.recv().unwrap();
            assert_eq!(p.request, ApiRequest::Status);
            assert!(p.received.elapsed() < Duration::from_secs(10));
            p.reply
                .send(ApiResponse::ok(serde_json::json!({"ok": 1})))
                .unwrap();
            api
        });
        let (status, body) = client::request(&path, "GET", "/vm", None).unwrap();
        assert_eq!((status, body.as_str()), (200, r#"{"ok":1}"#));
        drop(vmm.join().unwrap());
        assert!(!path.exists(), "the socket file goes with the VM");
        assert!(matches!(
            client::request(&path, "GET", "/vm", None),
            Err(client::ClientError::Connect { .. })
        ));
    }

    #[test]
    fn a_stale_socket_file_is_replaced() {
        let path = temp_socket("stale");
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let api = start(&path).unwrap();
        let (status, _) = client::request(&path, "DELETE", "/vm", None).unwrap();
        assert_eq!(status, 405);
        drop(api);
    }

    #[test]
    fn default_sockets_are_per_name() {
        let p = default_socket("web1");
        assert_eq!(p.file_name().unwrap(), "web1.sock");
        assert_eq!(p.parent().unwrap().file_name().unwrap(), "vmm");
    }
}
