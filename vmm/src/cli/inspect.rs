//! `vmm ps`, `vmm stack` and `vmm kernel`: guest kernel introspection from a running VM
//! (through its API, which pauses it only for the walk) or offline from a snapshot.

use std::path::PathBuf;

use clap::Args;
use introspect::cpu::CpuRegs;
use introspect::guest::GuestKernel;
use introspect::kernel::KallsymsFrom;
use introspect::memory::{FileMemory, GuestPhysMemory};
use serde_json::Value;

/// Where to read the guest from.
#[derive(Args)]
pub struct Source {
    /// Read this snapshot directory instead of asking a running VM.
    #[arg(long, conflicts_with = "dump")]
    pub snapshot: Option<PathBuf>,
    /// Read a raw dump of guest RAM from guest-physical 0 (e.g. QEMU's `pmemsave 0 SIZE FILE`);
    /// there are no vCPU registers, so tasks running on a CPU are not unwound.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// VM name: its socket is /run/vmm/NAME.sock (or $XDG_RUNTIME_DIR/vmm/ when not root).
    #[arg(long, default_value = "default")]
    pub name: String,
    /// The VM's API socket (instead of --name).
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Print the JSON report instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Where to find the kallsyms tables: `auto` (vmcoreinfo's SYMBOL lines, or a scan of the
    /// kernel image when it has none), `vmcoreinfo`, or `scan` (ignore vmcoreinfo's lines;
    /// checks the scan against the guest's own list). Only with --snapshot or --dump.
    #[arg(long, value_enum, default_value_t = KallsymsArg::Auto)]
    pub kallsyms: KallsymsArg,
}

/// `--kallsyms`.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KallsymsArg {
    Auto,
    Vmcoreinfo,
    Scan,
}

impl From<KallsymsArg> for KallsymsFrom {
    fn from(a: KallsymsArg) -> Self {
        match a {
            KallsymsArg::Auto => KallsymsFrom::Auto,
            KallsymsArg::Vmcoreinfo => KallsymsFrom::Vmcoreinfo,
            KallsymsArg::Scan => KallsymsFrom::Scan,
        }
    }
}

impl Source {
    fn get(
        &self,
        path: &str,
        offline: impl FnOnce(&Offline) -> Result<Value, String>,
    ) -> Result<Value, String> {
        if let Some(o) = self.offline()? {
            return offline(&o);
        }
        self.online_only()?;
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

/// Guest memory and registers read from a file.
pub struct Offline {
    name: String,
    kallsyms: KallsymsFrom,
    memory: Box<dyn GuestPhysMemory>,
    regs: Vec<CpuRegs>,
    host_code: Vec<introspect::host_code::HostCode>,
}

impl Source {
    /// A running VM finds its tables itself (auto); the choice is for offline reads.
    fn online_only(&self) -> Result<(), String> {
        if self.kallsyms != KallsymsArg::Auto {
            return Err("--kallsyms is only for --snapshot or --dump".into());
        }
        Ok(())
    }

    fn offline(&self) -> Result<Option<Offline>, String> {
        if let Some(dir) = &self.snapshot {
            let view = vmm::introspection::SnapshotView::open(dir)?;
            return Ok(Some(Offline {
                kallsyms: self.kallsyms.into(),
                name: dir.display().to_string(),
                memory: Box::new(view.memory),
                regs: view.regs,
                host_code: view.host_code,
            }));
        }
        if let Some(file) = &self.dump {
            let len = std::fs::metadata(file)
                .map_err(|e| format!("{}: {e}", file.display()))?
                .len();
            let memory = FileMemory::open(file, &[(0, len)]).map_err(|e| e.to_string())?;
            return Ok(Some(Offline {
                kallsyms: self.kallsyms.into(),
                name: file.display().to_string(),
                memory: Box::new(memory),
                regs: Vec::new(),
                host_code: Vec::new(),
            }));
        }
        Ok(None)
    }
}

impl Offline {
    fn guest_kernel(&self) -> Result<GuestKernel, String> {
        let mut gk = GuestKernel::load_with(self.memory.as_ref(), self.kallsyms)
            .map_err(|e| format!("{}: {e}", self.name))?;
        gk.set_host_code(self.host_code.clone());
        Ok(gk)
    }
}

fn tasks(src: &Source, stacks: bool) -> Result<Vec<Value>, String> {
    let path = if stacks {
        "/tasks?stacks=true"
    } else {
        "/tasks"
    };
    let v = src.get(path, |o| {
        let gk = o.guest_kernel()?;
        vmm::introspection::tasks_report(&gk, o.memory.as_ref(), &o.regs, stacks)
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
    let v = src.get("/kernel", |o| {
        Ok(vmm::introspection::kernel_report(&o.guest_kernel()?))
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
        ("direct map:", "direct_map_base"),
        ("vmalloc:", "vmalloc_base"),
        ("vmemmap:", "vmemmap_base"),
        ("paging levels:", "paging_levels"),
        ("symbols:", "symbols"),
        ("kallsyms:", "kallsyms_found"),
        ("BTF types:", "btf_types"),
        ("ORC entries:", "orc_entries"),
        ("banner:", "banner"),
    ] {
        println!("{label:<15}{}", s(key));
    }
    Ok(0)
}

/// `vmm modules`: `NAME SIZE STATE ADDRESS` as /proc/modules orders them (without the
/// reference counts and dependencies, which the VMM does not read), then the text size and
/// ORC entries.
pub fn modules(src: &Source) -> Result<i32, String> {
    let v = match src.offline()? {
        Some(o) => {
            let gk = o.guest_kernel()?;
            vmm::introspection::modules_report(gk.module_code(o.memory.as_ref()))?
        }
        None => src.get("/kernel/modules", |_| Err("offline handled above".into()))?,
    };
    if src.json {
        println!("{v}");
        return Ok(0);
    }
    for m in v["modules"]
        .as_array()
        .ok_or("the answer has no module list")?
    {
        println!(
            "{} {} {} {} text={} orc={}",
            m["name"].as_str().unwrap_or("?"),
            m["size"],
            m["state"].as_str().unwrap_or("?"),
            m["address"].as_str().unwrap_or("?"),
            m["text_size"],
            m["orc_entries"],
        );
    }
    Ok(0)
}

/// `vmm symbols [NAME[,SYMPOS]…|--all]`: /proc/kallsyms lines, modules' included.
pub fn symbols(src: &Source, all: bool, names: &[String]) -> Result<i32, String> {
    let names = if all { &[] } else { names };
    let v = match src.offline()? {
        Some(o) => {
            let gk = o.guest_kernel()?;
            let modules = gk.modules(o.memory.as_ref());
            vmm::introspection::symbols_report(&gk, modules, names)?
        }
        None => {
            let query = if names.is_empty() {
                String::new()
            } else {
                format!("?names={}", names.join(";"))
            };
            src.get(&format!("/kernel/symbols{query}"), |_| {
                Err("offline handled above".into())
            })?
        }
    };
    if let Some(e) = v["modules_error"].as_str() {
        eprintln!("vmm: modules not listed: {e}");
    }
    let lines: Vec<String> = v["symbols"]
        .as_array()
        .ok_or("the answer has no symbol list")?
        .iter()
        .map(|l| l.as_str().unwrap_or("").to_string())
        .collect();
    if src.json {
        println!("{}", serde_json::json!({ "symbols": lines }));
        return Ok(0);
    }
    let mut out = String::with_capacity(lines.len() * 48);
    for l in lines {
        out.push_str(&l);
        out.push('\n');
    }
    print!("{out}");
    Ok(0)
}
