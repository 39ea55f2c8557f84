//! Minimal HTTP/1.1 for the control socket: one request per connection (parsed with
//! `httparse`), a JSON response, then the connection closes. Enough for `curl
//! --unix-socket` and the `vmm` client subcommands.

use std::io::{Read, Write};

/// Largest request (headers and body) accepted.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Errors reading or writing HTTP.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    #[error("request larger than {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("connection: {0}")]
    Io(#[from] std::io::Error),
}

/// A parsed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Parses `buf` if it holds a whole request; `Ok(None)` when more bytes are needed.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    let mut length = 0usize;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| HttpError::Malformed("bad Content-Length".into()))?;
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::Malformed(
                "chunked bodies are not supported".into(),
            ));
        }
    }
    if head_len + length > MAX_REQUEST {
        return Err(HttpError::TooLarge);
    }
    if buf.len() < head_len + length {
        return Ok(None);
    }
    Ok(Some(Request {
        method: req.method.unwrap_or("").to_string(),
        path: req.path.unwrap_or("").to_string(),
        body: buf[head_len..head_len + length].to_vec(),
    }))
}

/// Reads one request from `stream`.
pub fn read_request(stream: &mut impl Read) -> Result<Request, HttpError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(HttpError::Malformed("connection closed mid-request".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return Err(HttpError::TooLarge);
        }
        if let Some(req) = parse_request(&buf)? {
            return Ok(req);
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Content",
        500 => "Internal Server Error",
        _ => "Unknown",
    }
}

/// Writes a response with a JSON body (none for 204).
pub fn write_response(stream: &mut impl Write, status: u16, body: &str) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nConnection: close\r\n",
        reason(status)
    );
    if status != 204 {
        out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    out.push_str("\r\n");
    if status != 204 {
        out.push_str(body);
    }
    stream.write_all(out.as_bytes())?;
    stream.flush()
}

/// Parses a response (for the client): status and body.
pub fn parse_response(buf: &[u8]) -> Result<(u16, String), HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => Ok((
            resp.code.unwrap_or(0),
            String::from_utf8_lossy(&buf[n..]).into_owned(),
        )),
        Ok(httparse::Status::Partial) => Err(HttpError::Malformed("truncated response".into())),
        Err(e) => Err(HttpError::Malformed(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_requests_and_waits_for_partial_ones() {
        let raw = b"PUT /vm/state HTTP/1.1\r\nHost: x\r\nContent-Length: 18\r\n\r\n{\"state\":\"paused\"}";
        let req = parse_request(raw).unwrap().unwrap();
        assert_eq!(
            (req.method.as_str(), req.path.as_str()),
            ("PUT", "/vm/state")
        );
        assert_eq!(req.body, b"{\"state\":\"paused\"}");
        assert_eq!(parse_request(&raw[..raw.len() - 3]).unwrap(), None);
        assert_eq!(parse_request(&raw[..10]).unwrap(), None);
        assert!(parse_request(b"NOT HTTP\x00\r\n\r\n").is_err());
        let huge = format!("PUT / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", MAX_REQUEST);
        assert!(matches!(
            parse_request(huge.as_bytes()),
            Err(HttpError::TooLarge)
        ));
    }

    #[test]
    fn responses_round_trip() {
        let mut out = Vec::new();
        write_response(&mut out, 404, "{\"error\":\"no\"}").unwrap();
        assert_eq!(
            parse_response(&out).unwrap(),
            (404, "{\"error\":\"no\"}".into())
        );
        let mut out = Vec::new();
        write_response(&mut out, 204, "").unwrap();
        assert_eq!(parse_response(&out).unwrap(), (204, String::new()));
    }
}
