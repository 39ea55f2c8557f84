//! `vmm ps`, `vmm stack` and `vmm kernel`: guest kernel introspection from a running VM
//! (through its API, which pauses it only for the walk) or offline from a snapshot.

use std::path::PathBuf;

use clap::Args;
use serde_json::Value;

/// Where to read the guest from.
#[derive(Args)]
pub struct Source {
    /// Read this snapshot directory instead of asking a running VM.
    #[arg(long)]
    pub snapshot: Option<PathBuf>,
    /// VM name: its socket is /run/vmm/NAME.sock (or $XDG_RUNTIME_DIR/vmm/ when not root).
    #[arg(long, default_value = "default")]
    pub name: String,
    /// The VM's API socket (instead of --name).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Print the JSON report instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl Source {
    fn get(
        &self,
        path: &str,
        offline: impl FnOnce(&PathBuf) -> Result<Value, String>,
    ) -> Result<Value, String> {
        if let Some(dir) = &self.snapshot {
            return offline(dir);
        }
        let socket = self
            .api_socket
            .clone()
            .unwrap_or_else(|| vmm::api::server::default_socket(&self.name));
        let (status, text) =
            vmm::api::client::request(&socket, "GET", path, None).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("bad answer from {}: {e}", socket.display()))?;
        if status >= 400 {
            return Err(format!(
                "{} (HTTP {status})",
                v["error"].as_str().unwrap_or(&text)
            ));
        }
        Ok(v)
    }
}

fn load_offline(
    dir: &std::path::Path,
) -> Result<
    (
        vmm::introspection::SnapshotView,
        introspect::guest::GuestKernel,
    ),
    String,
> {
    let view = vmm::introspection::SnapshotView::open(dir)?;
    let gk = introspect::guest::GuestKernel::load(&view.memory)
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok((view, gk))
}

fn tasks(src: &Source, stacks: bool) -> Result<Vec<Value>, String> {
    let path = if stacks {
        "/tasks?stacks=true"
    } else {
        "/tasks"
    };
    let v = src.get(path, |dir| {
        let (view, gk) = load_offline(dir)?;
        vmm::introspection::tasks_report(&gk, &view.memory, &view.regs, stacks)
    })?;
    v["tasks"]
        .as_array()
        .cloned()
        .ok_or_else(|| "the report has no task list".to_string())
}

/// `vmm ps`.
pub fn ps(src: &Source) -> Result<i32, String> {
    let list = tasks(src, false)?;
    if src.json {
        println!("{}", serde_json::json!({ "tasks": list }));
        return Ok(0);
    }
    println!(
        "{:>7} {:>7} S {:>4} {:>4} COMM",
        "PID", "TGID", "CPU", "RUN"
    );
    for t in &list {
        let run = t["current_on"]
            .as_u64()
            .map_or("-".to_string(), |c| c.to_string());
        let comm = t["comm"].as_str().unwrap_or("?");
        let comm = if t["kthread"].as_bool() == Some(true) {
            format!("[{comm}]")
        } else {
            comm.to_string()
        };
        println!(
            "{:>7} {:>7} {} {:>4} {:>4} {comm}",
            t["pid"].as_i64().unwrap_or(-1),
            t["tgid"].as_i64().unwrap_or(-1),
            t["state"].as_str().unwrap_or("?"),
            t["cpu"].as_u64().unwrap_or(0),
            run
        );
    }
    Ok(0)
}

/// `vmm stack PID` or `vmm stack --cpu N`.
pub fn stack(src: &Source, pid: Option<i64>, cpu: Option<u64>) -> Result<i32, String> {
    let list = tasks(src, true)?;
    let found: Vec<&Value> = list
        .iter()
        .filter(|t| match (pid, cpu) {
            (Some(p), None) => t["pid"].as_i64() == Some(p),
            (None, Some(c)) => t["current_on"].as_u64() == Some(c),
            (Some(p), Some(c)) => t["pid"].as_i64() == Some(p) && t["cpu"].as_u64() == Some(c),
            (None, None) => false,
        })
        .collect();
    let t = match found.as_slice() {
        [] => {
            return Err(match (pid, cpu) {
                (Some(p), _) => format!("no task with pid {p}"),
                (None, Some(c)) => format!("no task is current on CPU {c}"),
                (None, None) => "give a PID or --cpu N".into(),
            })
        }
        [one] => *one,
        _ => {
            return Err(format!(
                "{} tasks have pid {}; add --cpu N to pick one",
                found.len(),
                pid.unwrap_or_default()
            ))
        }
    };
    if src.json {
        println!("{t}");
        return Ok(0);
    }
    let trace = &t["trace"];
    for f in trace["frames"].as_array().into_iter().flatten() {
        println!("[<0>] {}", f["symbol"].as_str().unwrap_or("?"));
    }
    if trace["ended_in_user"].as_bool() == Some(true) {
        println!("(user mode)");
    }
    match trace["problem"].as_str() {
        Some(p) if trace["reliable"].as_bool() != Some(true) => println!("unreliable: {p}"),
        _ => println!("reliable"),
    }
    Ok(0)
}

/// `vmm kernel`.
pub fn kernel(src: &Source) -> Result<i32, String> {
    let v = src.get("/kernel", |dir| {
        let (_, gk) = load_offline(dir)?;
        Ok(vmm::introspection::kernel_report(&gk))
    })?;
    if src.json {
        println!("{v}");
        return Ok(0);
    }
    let s = |k: &str| match &v[k] {
        Value::String(s) => s.clone(),
        Value::Null => "unknown".into(),
        other => other.to_string(),
    };
    for (label, key) in [
        ("release:", "release"),
        ("build id:", "build_id"),
        ("kaslr offset:", "kaslr_offset"),
        ("phys_base:", "phys_base"),
        ("paging levels:", "paging_levels"),
        ("symbols:", "symbols"),
        ("BTF types:", "btf_types"),
        ("ORC entries:", "orc_entries"),
    ] {
        println!("{label:<15}{}", s(key));
    }
    Ok(0)
}
