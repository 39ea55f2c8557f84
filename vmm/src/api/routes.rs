//! Routing: HTTP method and path (and JSON body) to an API request.

use serde::Deserialize;

use super::http::Request;

/// What a client asked the VMM to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm`
    Status,
    /// `PUT /vm/state {"state": "paused" | "running"}`
    SetState { paused: bool },
    /// `GET /vm/vcpus` (paused VMs only)
    Vcpus,
    /// `PUT /snapshot {"dir": "...", "stop": false}`
    Snapshot { dir: String, stop: bool },
    /// `PUT /console/sysrq {"key": "h"}`
    Sysrq { key: char },
    /// `PUT /patches {"bundle": "/abs/path", "force": false, "deadline_ms": 15000,
    /// "allow_downgrade": false}`
    ApplyPatch {
        bundle: String,
        force: bool,
        deadline_ms: u64,
        allow_downgrade: bool,
    },
    /// `PUT /patches/disable {"name": "...", "force": false}`
    DisablePatch { name: String, force: bool },
    /// `GET /patches`
    ListPatches,
    /// `GET /patches/events`
    PatchEvents,
    /// `GET /kernel`: release, build ID, KASLR offset, paging mode.
    Kernel,
    /// `GET /kernel/symbols[?names=A;B,2]`: /proc/kallsyms lines.
    KernelSymbols { names: Vec<String> },
    /// `GET /kernel/modules`: the loaded modules, as /proc/modules.
    KernelModules,
    /// `GET /kernel/text?symbol=NAME[,SYMPOS]`: a function's current bytes.
    KernelText { symbol: String },
    /// `GET /kernel/digest`: SHA-256 of the kernel's text and of the patch area.
    KernelDigest,
    /// `GET /tasks[?stacks=true]`: every task (and its kernel stack trace).
    Tasks { stacks: bool },
}

/// A response: HTTP status and JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    pub status: u16,
    pub body: String,
}

impl ApiResponse {
    pub fn ok(body: serde_json::Value) -> Self {
        ApiResponse {
            status: 200,
            body: body.to_string(),
        }
    }

    pub fn no_content() -> Self {
        ApiResponse {
            status: 204,
            body: String::new(),
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        ApiResponse {
            status,
            body: serde_json::json!({ "error": message.into() }).to_string(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateBody {
    state: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapshotBody {
    dir: String,
    #[serde(default)]
    stop: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    bundle: String,
    #[serde(default)]
    force: bool,
    #[serde(default = "default_deadline")]
    deadline_ms: u64,
    #[serde(default)]
    allow_downgrade: bool,
}

fn default_deadline() -> u64 {
    15_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisableBody {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SysrqBody {
    key: String,
}

fn json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiResponse> {
    serde_json::from_slice(body).map_err(|e| ApiResponse::error(400, format!("bad JSON body: {e}")))
}

/// Maps a request to an [`ApiRequest`], or to the error response to send.
pub fn route(req: &Request) -> Result<ApiRequest, ApiResponse> {
    let (path, query) = req.path.split_once('?').unwrap_or((&req.path, ""));
    let method = req.method.as_str();
    let allowed = match path {
        "/vm" => "GET",
        "/vm/state" | "/snapshot" | "/console/sysrq" | "/patches/disable" => "PUT",
        "/vm/vcpus" | "/patches/events" | "/kernel" | "/kernel/text" | "/kernel/symbols"
        | "/kernel/modules" | "/kernel/digest" | "/tasks" => "GET",
        "/patches" if req.method == "GET" => "GET",
        "/patches" => "PUT",
        _ => return Err(ApiResponse::error(404, format!("no endpoint {path}"))),
    };
    if method != allowed {
        return Err(ApiResponse::error(
            405,
            format!("{path} takes {allowed}, not {method}"),
        ));
    }
    match path {
        "/vm" => Ok(ApiRequest::Status),
        "/vm/vcpus" => Ok(ApiRequest::Vcpus),
        "/patches/events" => Ok(ApiRequest::PatchEvents),
        "/kernel" => Ok(ApiRequest::Kernel),
        "/kernel/digest" => Ok(ApiRequest::KernelDigest),
        "/kernel/modules" => Ok(ApiRequest::KernelModules),
        "/kernel/symbols" => match query {
            "" => Ok(ApiRequest::KernelSymbols { names: Vec::new() }),
            q => match q.strip_prefix("names=") {
                Some(n) if !n.is_empty() && !n.contains('&') => Ok(ApiRequest::KernelSymbols {
                    names: n.split(';').map(str::to_string).collect(),
                }),
                _ => Err(ApiResponse::error(400, "give ?names=NAME[,SYMPOS][;NAME…]")),
            },
        },
        "/kernel/text" => match query.strip_prefix("symbol=") {
            Some(sym) if !sym.is_empty() && !sym.contains('&') => Ok(ApiRequest::KernelText {
                symbol: sym.to_string(),
            }),
            _ => Err(ApiResponse::error(400, "give ?symbol=NAME[,SYMPOS]")),
        },
        "/tasks" => match query {
            "" | "stacks=false" => Ok(ApiRequest::Tasks { stacks: false }),
            "stacks=true" => Ok(ApiRequest::Tasks { stacks: true }),
            other => Err(ApiResponse::error(
                400,
                format!("unknown query {other:?} (only stacks=true|false)"),
            )),
        },
        "/patches" if method == "GET" => Ok(ApiRequest::ListPatches),
        "/patches" => {
            let b: PatchBody = json(&req.body)?;
            if b.deadline_ms == 0 || b.deadline_ms > 3_600_000 {
                return Err(ApiResponse::error(400, "deadline_ms must be 1..=3600000"));
            }
            Ok(ApiRequest::ApplyPatch {
                bundle: b.bundle,
                force: b.force,
                deadline_ms: b.deadline_ms,
                allow_downgrade: b.allow_downgrade,
            })
        }
        "/patches/disable" => {
            let b: DisableBody = json(&req.body)?;
            Ok(ApiRequest::DisablePatch {
                name: b.name,
                force: b.force,
            })
        }
        "/vm/state" => {
            let b: StateBody = json(&req.body)?;
            match b.state.as_str() {
                "paused" => Ok(ApiRequest::SetState { paused: true }),
                "running" => Ok(ApiRequest::SetState { paused: false }),
                other => Err(ApiResponse::error(
                    400,
                    format!("state must be \"paused\" or \"running\", not {other:?}"),
                )),
            }
        }
        "/snapshot" => {
            let b: SnapshotBody = json(&req.body)?;
            if b.dir.is_empty() {
                return Err(ApiResponse::error(400, "dir must not be empty"));
            }
            Ok(ApiRequest::Snapshot {
                dir: b.dir,
                stop: b.stop,
            })
        }
        "/console/sysrq" => {
            let b: SysrqBody = json(&req.body)?;
            let mut chars = b.key.chars();
            match (chars.next(), chars.next()) {
                (Some(key), None) if key.is_ascii_graphic() => Ok(ApiRequest::Sysrq { key }),
                _ => Err(ApiResponse::error(
                    400,
                    "key must be one printable character",
                )),
            }
        }
        _ => unreachable!("paths are matched above"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request {
            method: method.into(),
            path: path.into(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn routes_every_endpoint() {
        assert_eq!(route(&req("GET", "/vm", "")), Ok(ApiRequest::Status));
        assert_eq!(
            route(&req("PUT", "/vm/state", r#"{"state":"paused"}"#)),
            Ok(ApiRequest::SetState { paused: true })
        );
        assert_eq!(
            route(&req("PUT", "/snapshot", r#"{"dir":"/s"}"#)),
            Ok(ApiRequest::Snapshot {
                dir: "/s".into(),
                stop: false
            })
        );
        assert_eq!(
            route(&req("PUT", "/console/sysrq", r#"{"key":"t"}"#)),
            Ok(ApiRequest::Sysrq { key: 't' })
        );
        assert_eq!(route(&req("GET", "/vm/vcpus", "")), Ok(ApiRequest::Vcpus));
        assert_eq!(route(&req("GET", "/kernel", "")), Ok(ApiRequest::Kernel));
        assert_eq!(
            route(&req("GET", "/kernel/modules", "")),
            Ok(ApiRequest::KernelModules)
        );
        assert_eq!(
            route(&req("GET", "/tasks", "")),
            Ok(ApiRequest::Tasks { stacks: false })
        );
        assert_eq!(
            route(&req("GET", "/tasks?stacks=true", "")),
            Ok(ApiRequest::Tasks { stacks: true })
        );
    }

    #[test]
    fn bad_requests_get_4xx_with_a_json_error() {
        let cases = [
            (req("GET", "/nope", ""), 404),
            (req("POST", "/vm", ""), 405),
            (req("PUT", "/vm/state", "{"), 400),
            (req("PUT", "/vm/state", r#"{"state":"sleeping"}"#), 400),
            (req("PUT", "/vm/state", r#"{"state":"paused","x":1}"#), 400),
            (req("PUT", "/console/sysrq", r#"{"key":"ab"}"#), 400),
            (req("PUT", "/snapshot", r#"{"dir":""}"#), 400),
            (req("GET", "/tasks?stacks=maybe", ""), 400),
            (req("GET", "/kernel/text", ""), 400),
            (req("PUT", "/tasks", ""), 405),
        ];
        for (r, status) in cases {
            let e = route(&r).unwrap_err();
            assert_eq!(e.status, status, "{r:?}");
            let v: serde_json::Value = serde_json::from_str(&e.body).unwrap();
            assert!(v["error"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }
}
