//! The control socket: a Unix socket (mode 0600) served by one API thread. Each
//! request is routed, handed to the VMM thread (which owns the VM) through a channel,
//! and answered with what the VMM thread replies.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
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

fn serve(mut stream: UnixStream, to_vmm: &Sender<Pending>, wake: &EventFd) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    let response = match http::read_request(&mut stream) {
        Err(http::HttpError::TooLarge) => ApiResponse::error(413, "request too large"),
        Err(e) => ApiResponse::error(400, e.to_string()),
        Ok(req) => match routes::route(&req) {
            Err(resp) => resp,
            Ok(request) => {
                let (reply, rx) = channel();
                let pending = Pending {
                    request,
                    reply,
                    received: Instant::now(),
                };
                if to_vmm.send(pending).is_err() {
                    ApiResponse::error(500, "the VM is shutting down")
                } else {
                    let _ = wake.write(1);
                    rx.recv_timeout(REPLY_TIMEOUT)
                        .unwrap_or_else(|_| ApiResponse::error(500, "the VMM did not answer"))
                }
            }
        },
    };
    let _ = http::write_response(&mut stream, response.status, &response.body);
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
            for stream in listener.incoming().flatten() {
                serve(stream, &tx, &thread_wake);
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
