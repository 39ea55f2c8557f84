//! The client side, for `vmm pause|resume|status|snapshot|sysrq`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::http;

/// Errors talking to a VM's API socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no VM answers on {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("API socket {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("API socket {path}: {detail}")]
    Protocol { path: String, detail: String },
}

/// Sends one request and returns the status and body.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), ClientError> {
    let name = socket.display().to_string();
    let mut stream = UnixStream::connect(socket).map_err(|source| ClientError::Connect {
        path: name.clone(),
        source,
    })?;
    let io = |source| ClientError::Io {
        path: name.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(900)))
        .map_err(io)?;
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(req.as_bytes()).map_err(io)?;
    let mut buf = Vec::new();
    stream.read_to_end(&mut buf).map_err(io)?;
    http::parse_response(&buf).map_err(|e| ClientError::Protocol {
        path: name.clone(),
        detail: e.to_string(),
    })
}
