//! The `vmm` command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::arch::x86_64::cpu_template::CpuTemplate;
use vmm::config::{BootSource, ConsoleConfig, VmConfig};
use vmm::host_check::{probe_user_syscall, UserSyscall};

#[path = "cli/inspect.rs"]
mod inspect;
#[path = "cli/patch.rs"]
mod patch_report;
#[path = "cli/transition_wait.rs"]
mod transition_wait;

#[derive(Parser)]
#[command(
    name = "vmm",
    version,
    about = "A VMM that boots unmodified Linux guests and live-patches their kernels from the host"
)]
struct Cli {
    /// Log filter for diagnostics on stderr (e.g. info, debug, vmm=trace).
    #[arg(long, global = true, env = "VMM_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a guest from a disk image (or a kernel and initrd) with a serial console on stdio.
    Run(Box<RunArgs>),
    /// Check what this host's KVM can do for unmodified guests (exit 1 if something is missing).
    HostCheck,
    /// Build or inspect live-patch bundles.
    #[command(subcommand)]
    Bundle(BundleCommand),
    /// Pause a running VM (every vCPU stopped outside KVM_RUN).
    Pause(ApiTarget),
    /// Resume a paused VM.
    Resume(ApiTarget),
    /// Show a VM's state, vCPUs, memory and uptime.
    Status(ApiTarget),
    /// Write a snapshot of a running VM (it pauses and resumes it).
    Snapshot {
        #[command(flatten)]
        target: ApiTarget,
        /// Snapshot directory.
        #[arg(long, short)]
        output: PathBuf,
        /// Stop the VM after the snapshot.
        #[arg(long)]
        stop: bool,
    },
    /// Live-patch the running guest kernel, or list/disable applied bundles.
    Patch(PatchArgs),
    /// Print guest kernel symbols in /proc/kallsyms format, read from guest memory.
    Symbols {
        /// Print every symbol.
        #[arg(long, conflicts_with = "names")]
        all: bool,
        /// Symbols to print (name or name,sympos).
        names: Vec<String>,
        #[command(flatten)]
        source: inspect::Source,
    },
    /// Print what the guest kernel is: release, build ID, KASLR offset, paging mode.
    Kernel(inspect::Source),
    /// List the guest kernel's loaded modules, like /proc/modules (with text size and ORC entries).
    Modules(inspect::Source),
    /// List the guest's tasks (processes, threads, idle tasks) read from its memory.
    Ps(inspect::Source),
    /// Print a guest task's kernel stack (ORC unwind), like /proc/PID/stack.
    Stack {
        /// The task's pid (0 is every CPU's idle task: add --cpu).
        pid: Option<i64>,
        /// The task current on this CPU (or, with PID, the one that last ran there).
        #[arg(long)]
        cpu: Option<u64>,
        #[command(flatten)]
        source: inspect::Source,
    },
    /// Send a magic SysRq key to the guest kernel (serial break + key).
    Sysrq {
        #[command(flatten)]
        target: ApiTarget,
        key: char,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct PatchArgs {
    #[command(flatten)]
    target: ApiTarget,
    #[command(subcommand)]
    action: Option<PatchAction>,
    /// The bundle to apply (vmm bundle build).
    bundle: Option<PathBuf>,
    /// Apply as a cumulative bundle: the manifest must say "replace": true (issue #6).
    #[arg(long)]
    replace: bool,
    /// Let a cumulative bundle replace a newer version (logged in the event log).
    #[arg(long)]
    allow_downgrade: bool,
    /// Skip the consistency check (recorded in the ledger as forced).
    #[arg(long)]
    force: bool,
    /// Give up after this many seconds of blocked attempts.
    #[arg(long, default_value_t = 15.0)]
    deadline: f64,
}

#[derive(Subcommand)]
enum PatchAction {
    /// Applied bundles with their functions and status, and the states in force.
    List {
        #[command(flatten)]
        target: ApiTarget,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revert a bundle, with the same consistency check.
    Disable {
        #[command(flatten)]
        target: ApiTarget,
        /// The bundle's name (from its manifest).
        #[arg(value_name = "BUNDLE_NAME")]
        bundle_name: String,
        /// Skip the consistency check (recorded as forced).
        #[arg(long)]
        force: bool,
    },
    /// The ordered event log, with timestamps.
    Events {
        #[command(flatten)]
        target: ApiTarget,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which VM a client command talks to.
#[derive(Args, Clone)]
struct ApiTarget {
    /// VM name: its socket is /run/vmm/NAME.sock (or $XDG_RUNTIME_DIR/vmm/ when not root).
    #[arg(long, default_value = "default")]
    name: String,
    /// The VM's API socket (instead of --name).
    #[arg(long)]
    api_socket: Option<PathBuf>,
}

impl ApiTarget {
    fn socket(&self) -> PathBuf {
        self.api_socket
            .clone()
            .unwrap_or_else(|| vmm::api::server::default_socket(&self.name))
    }
}

#[derive(Subcommand)]
enum BundleCommand {
    /// Compile C sources against the guest kernel's headers (kbuild) into a bundle.
    Build {
        /// The bundle manifest (JSON; see docs/bundle-format.md).
        manifest: PathBuf,
        /// C sources and headers of the patch.
        #[arg(required = true)]
        sources: Vec<PathBuf>,
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Kernel headers tree (default /usr/src/linux-headers-<target release>).
        #[arg(long)]
        kernel_headers: Option<PathBuf>,
        /// Do not install linux-headers-<release> with apt-get when it is missing.
        #[arg(long)]
        no_install: bool,
    },
    /// Print a bundle's manifest and functions after verifying it.
    Inspect { bundle: PathBuf },
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    api: ApiTarget,
    /// Disk image whose filesystem holds /boot/vmlinuz-* and /boot/initrd.img-*; also the root disk.
    image: Option<PathBuf>,
    /// Boot this kernel (bzImage) directly instead of the one inside IMAGE.
    #[arg(long, conflicts_with = "image")]
    kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Root disk for --kernel (attached as virtio-blk, /dev/vda); with --restore, a copy of
    /// the snapshot's disk to use instead of the original.
    #[arg(long)]
    disk: Option<PathBuf>,
    /// Resume the VM saved in this snapshot directory instead of booting.
    #[arg(long, conflicts_with_all = ["image", "kernel", "initrd", "cmdline", "append"])]
    restore: Option<PathBuf>,
    /// Snapshot the VM into --snapshot-dir when a console line contains this text.
    #[arg(long, requires = "snapshot_dir")]
    snapshot_on_output: Option<String>,
    /// Where --snapshot-on-output writes the snapshot.
    #[arg(long, requires = "snapshot_on_output")]
    snapshot_dir: Option<PathBuf>,
    /// Seconds to wait after the line before taking the snapshot.
    #[arg(long, default_value_t = 0.0)]
    snapshot_delay: f64,
    /// Stop the VM after the snapshot (exit status 0) instead of letting it run on.
    #[arg(long)]
    snapshot_stop: bool,
    /// Apply this live-patch bundle while the guest boots, once --boot-patch-on's line
    /// appears on the console (the vCPUs are held from the line to the patch).
    /// Repeatable; applied in order.
    #[arg(long)]
    boot_patch: Vec<PathBuf>,
    /// The console line (a part of it) at which --boot-patch bundles are applied. The
    /// default is printed by the kernel just before it executes init, after its own
    /// boot-time checks of the kernel page tables.
    #[arg(long, default_value = "Run /init as init process")]
    boot_patch_on: String,
    /// Attach the disk read-only.
    #[arg(long)]
    readonly: bool,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    memory: u64,
    /// Replace the default kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Append to the kernel command line (repeatable).
    #[arg(long)]
    append: Vec<String>,
    /// CPU template: which CPU features the guest sees and the guest options that go with them.
    #[arg(long, value_enum, default_value_t = CpuTemplate::Auto)]
    cpu_template: CpuTemplate,
    /// Serial console back end: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    console: ConsoleConfig,
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(args: RunArgs) -> Result<i32, String> {
    if args.disk.is_some() && args.kernel.is_none() && args.restore.is_none() {
        return Err("--disk goes with --kernel or --restore (an image is its own disk)".into());
    }
    if !(0.0..=86400.0).contains(&args.snapshot_delay) {
        return Err("--snapshot-delay must be between 0 and 86400 seconds".into());
    }
    let snapshot = match (args.snapshot_on_output, args.snapshot_dir) {
        (Some(needle), Some(dir)) => Some(vmm::builder::SnapshotTrigger {
            watch: vmm::devices::serial::LineWatch {
                needle,
                seen: Default::default(),
            },
            dir,
            delay: std::time::Duration::from_secs_f64(args.snapshot_delay),
            stop: args.snapshot_stop,
        }),
        _ => None,
    };
    for b in &args.boot_patch {
        if !b.is_file() {
            return Err(format!("--boot-patch {}: no such bundle file", b.display()));
        }
    }
    let boot_patches = (!args.boot_patch.is_empty()).then(|| vmm::builder::BootPatches {
        bundles: args.boot_patch.clone(),
        watch: vmm::devices::serial::LineWatch {
            needle: args.boot_patch_on.clone(),
            seen: Default::default(),
        },
    });
    let actions = vmm::builder::RunActions {
        snapshot,
        boot_patches,
    };
    if let Some(dir) = &args.restore {
        let socket = args.api.socket();
        ensure_socket_free(&socket)?;
        let mut vm = vmm::persist::vm_snapshot::restore_and_start_with(
            dir,
            args.disk,
            &args.console,
            &actions,
        )
        .map_err(|e| e.to_string())?;
        vm.serve_api(&socket, &args.api.name)
            .map_err(|e| e.to_string())?;
        return Ok(finish(vm, !args.boot_patch.is_empty()));
    }
    let (cpus, memory_mib) =
        VmConfig::validate(args.cpus, args.memory).map_err(|e| e.to_string())?;
    let (boot, disk) = match (args.image, args.kernel) {
        (Some(image), None) => (BootSource::Image(image.clone()), Some(image)),
        (None, Some(kernel)) => (
            BootSource::Direct {
                kernel,
                initrd: args.initrd,
            },
            args.disk,
        ),
        _ => return Err("give a disk image (vmm run guest.img) or --kernel".into()),
    };
    let cfg = VmConfig {
        boot,
        disk,
        disk_readonly: args.readonly,
        cpus,
        memory_mib,
        cmdline: args.cmdline,
        append: args.append,
        cpu_template: args.cpu_template,
        console: args.console,
    };
    let socket = args.api.socket();
    ensure_socket_free(&socket)?;
    let mut vm = vmm::builder::build_and_start_with(&cfg, &actions).map_err(|e| e.to_string())?;
    vm.serve_api(&socket, &args.api.name)
        .map_err(|e| e.to_string())?;
    Ok(finish(vm, !args.boot_patch.is_empty()))
}

/// Refuses, before anything starts, a socket another running VM answers on.
fn ensure_socket_free(socket: &std::path::Path) -> Result<(), String> {
    if std::os::unix::net::UnixStream::connect(socket).is_ok() {
        return Err(format!(
            "API socket {} is in use by a running VM (pick another --name or --api-socket)",
            socket.display()
        ));
    }
    Ok(())
}

/// Sends one API request; prints the JSON answer; 4xx/5xx become errors.
fn api_call(
    target: &ApiTarget,
    method: &str,
    path: &str,
    body: Option<String>,
) -> Result<i32, String> {
    let socket = target.socket();
    let (status, text) = vmm::api::client::request(&socket, method, path, body.as_deref())
        .map_err(|e| e.to_string())?;
    print_answer(status, text)
}

/// Prints a 2xx answer's body; any other status is the error message of its JSON body.
fn print_answer(status: u16, text: String) -> Result<i32, String> {
    if status >= 400 {
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or(text);
        return Err(format!("{msg} (HTTP {status})"));
    }
    if !text.is_empty() {
        println!("{text}");
    }
    Ok(0)
}

/// A GET whose JSON body is printed as it is (`json`) or through `human`.
fn api_report(
    target: &ApiTarget,
    path: &str,
    json: bool,
    human: fn(&serde_json::Value) -> Vec<String>,
) -> Result<i32, String> {
    if json {
        return api_call(target, "GET", path, None);
    }
    let socket = target.socket();
    let (status, text) =
        vmm::api::client::request(&socket, "GET", path, None).map_err(|e| e.to_string())?;
    let body: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("bad API response: {e}"))?;
    if status >= 400 {
        let msg = body["error"].as_str().unwrap_or(&text);
        return Err(format!("{msg} (HTTP {status})"));
    }
    let mut out = std::io::stdout().lock();
    for line in human(&body) {
        if writeln!(out, "{line}").is_err() {
            break; // a closed pipe (`| head`) ends the report quietly
        }
    }
    Ok(0)
}

fn snapshot(target: &ApiTarget, output: &std::path::Path, stop: bool) -> Result<i32, String> {
    let dir = std::path::absolute(output).map_err(|e| format!("{}: {e}", output.display()))?;
    let body = serde_json::json!({"dir": dir, "stop": stop}).to_string();
    api_call(target, "PUT", "/snapshot", Some(body))
}

fn patch(args: PatchArgs) -> Result<i32, String> {
    match args.action {
        Some(PatchAction::List { target, json }) => {
            api_report(&target, "/patches", json, patch_report::list)
        }
        Some(PatchAction::Events { target, json }) => {
            api_report(&target, "/patches/events", json, patch_report::events)
        }
        Some(PatchAction::Disable {
            target,
            bundle_name,
            force,
        }) => {
            let body = serde_json::json!({"name": bundle_name, "force": force}).to_string();
            let (status, text) = transition_wait::wait(
                &target.socket(),
                "/patches/disable",
                body,
                &bundle_name,
                false,
            )?;
            print_answer(status, text)
        }
        None => {
            let bundle = args
                .bundle
                .ok_or("give a bundle to apply, or list/disable/events")?;
            let path =
                std::path::absolute(&bundle).map_err(|e| format!("{}: {e}", bundle.display()))?;
            let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let b = patcher::bundle::Bundle::decode(&bytes)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            if args.replace && !b.manifest.replace {
                return Err(format!(
                    "{}: --replace needs a cumulative bundle (\"replace\": true in its manifest)",
                    path.display()
                ));
            }
            if !(0.001..=3600.0).contains(&args.deadline) {
                return Err("--deadline must be between 0.001 and 3600 seconds".into());
            }
            let body = serde_json::json!({
                "bundle": path,
                "force": args.force,
                "deadline_ms": (args.deadline * 1000.0) as u64,
                "allow_downgrade": args.allow_downgrade,
            })
            .to_string();
            let (status, text) = transition_wait::wait(
                &args.target.socket(),
                "/patches",
                body,
                &b.manifest.name,
                true,
            )?;
            print_answer(status, text)
        }
    }
}

/// Runs the VM to its end and reports why it ended.
fn finish(vm: vmm::builder::RunningVm, boot_patched: bool) -> i32 {
    warn_about_host_limits(boot_patched);
    let reason = vm.run_until_exit();
    if let Some(msg) = reason.message() {
        eprintln!("vmm: {msg}");
    }
    reason.exit_code()
}

/// One warning line when this host's KVM cannot run guest user space (see docs/pvm.md)
/// and no boot patch was given to make up for it.
fn warn_about_host_limits(boot_patched: bool) {
    let Ok(kvm) = vmm::vstate::vm::open_kvm() else {
        return; // building the VM reports the real error
    };
    match probe_user_syscall(&kvm) {
        Ok(UserSyscall::EntersKernel) => {}
        Ok(UserSyscall::StaysInUserMode) if boot_patched => eprintln!(
            "vmm: this KVM does not enter guest kernel mode on SYSCALL; guest user space relies \
             on the --boot-patch bundles (docs/pvm.md)"
        ),
        Ok(other) => eprintln!("vmm: warning: {} (docs/pvm.md)", other.describe()),
        Err(e) => tracing::warn!("host check failed: {e}"),
    }
}

fn host_check() -> Result<i32, String> {
    let kvm = vmm::vstate::vm::open_kvm().map_err(|e| e.to_string())?;
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    println!("kvm: API version {}", kvm.get_api_version());
    println!(
        "kvm: {}",
        if pvm {
            "PVM (kvm_pvm module): guest kernel code is emulated, CPU template auto = pvm"
        } else {
            "hardware-assisted or other"
        }
    );
    let outcome = probe_user_syscall(&kvm).map_err(|e| e.to_string())?;
    println!("guest: {}", outcome.describe());
    Ok(if outcome == UserSyscall::EntersKernel {
        0
    } else {
        1
    })
}

fn bundle(cmd: BundleCommand) -> Result<i32, String> {
    use patcher::bundle::Bundle;
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    match cmd {
        BundleCommand::Build {
            manifest,
            sources,
            output,
            kernel_headers,
            no_install,
        } => {
            let text = String::from_utf8(read(&manifest)?)
                .map_err(|_| format!("{}: not UTF-8", manifest.display()))?;
            let manifest = patcher::manifest::Manifest::from_json(&text)
                .map_err(|e| format!("{}: {e}", manifest.display()))?;
            let bundle = patcher::build::build(&patcher::build::BuildRequest {
                manifest,
                sources,
                kernel_headers,
                install_headers: !no_install,
                work_dir: None,
            })
            .map_err(|e| e.to_string())?;
            let bytes = bundle.encode().map_err(|e| e.to_string())?;
            let tmp = output.with_extension("tmp");
            std::fs::write(&tmp, &bytes)
                .and_then(|_| std::fs::rename(&tmp, &output))
                .map_err(|e| format!("{}: {e}", output.display()))?;
            println!("{}: {}", output.display(), Bundle::digest_hex(&bytes));
            Ok(0)
        }
        BundleCommand::Inspect { bundle } => {
            let bytes = read(&bundle)?;
            let decoded =
                Bundle::decode(&bytes).map_err(|e| format!("{}: {e}", bundle.display()))?;
            patcher::object_check::check(&decoded.manifest, &decoded.object)
                .map_err(|e| format!("{}: {e}", bundle.display()))?;
            print!("{}", decoded.describe(&bytes));
            Ok(0)
        }
    }
}

/// Lets a report command die quietly when its reader goes away (`vmm symbols --all | head`),
/// like other Unix tools; `vmm run` keeps Rust's default (a closed console pipe is an
/// error it reports, not a signal that kills the VM).
fn default_sigpipe() {
    // SAFETY: restoring the default disposition of SIGPIPE touches no Rust state; it runs
    // before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log);
    if !matches!(cli.command, Command::Run(_)) {
        default_sigpipe();
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::HostCheck => host_check(),
        Command::Bundle(cmd) => bundle(cmd),
        Command::Pause(t) => api_call(&t, "PUT", "/vm/state", Some(r#"{"state":"paused"}"#.into())),
        Command::Resume(t) => api_call(
            &t,
            "PUT",
            "/vm/state",
            Some(r#"{"state":"running"}"#.into()),
        ),
        Command::Status(t) => api_call(&t, "GET", "/vm", None),
        Command::Snapshot {
            target,
            output,
            stop,
        } => snapshot(&target, &output, stop),
        Command::Patch(args) => patch(args),
        Command::Symbols { all, names, source } => inspect::symbols(&source, all, &names),
        Command::Kernel(src) => inspect::kernel(&src),
        Command::Modules(src) => inspect::modules(&src),
        Command::Ps(src) => inspect::ps(&src),
        Command::Stack { pid, cpu, source } => inspect::stack(&source, pid, cpu),
        Command::Sysrq { target, key } => {
            let body = serde_json::json!({"key": key.to_string()}).to_string();
            api_call(&target, "PUT", "/console/sysrq", Some(body))
        }
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(msg) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap checks every subcommand's arguments here (unique names, valid defaults), so a
    /// clash like a positional `name` beside `--name` fails the build's tests, not a user.
    #[test]
    fn the_command_line_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
