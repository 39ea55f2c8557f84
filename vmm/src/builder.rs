//! The boot recipe: from a `VmConfig` to running vCPUs, and the VMM event loop.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::routes::ApiRequest;
use crate::arch::x86_64::acpi::{self, AcpiConfig, VirtioMmioAcpi};
use crate::arch::x86_64::boot::{self, ZeroPageConfig};
use crate::arch::x86_64::emulate::FallbackStats;
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::regs;
use crate::config::{BootSource, ConsoleConfig, VmConfig};
use crate::console::{self, ConsoleInput, RawTerminal};
use crate::devices::acpi_power::AcpiPower;
use crate::devices::bus::Bus;
use crate::devices::i8042::I8042;
use crate::devices::serial::{ConsoleOut, LineWatch, SerialDevice, SerialSnapshot};
use crate::devices::text_guard::{GuardState, TextGuard};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::persist::MmioSnapshot;
use crate::devices::virtio::{self, SubscriberManager};
use crate::guest_image;
use crate::persist::snapshot::{DiskRef, MachineConfig};
use crate::persist::vcpu_state;
use crate::signals;
use crate::vstate::exit::{ExitReason, ExitSignal};
use crate::vstate::pause::{PauseControl, PauseError, PauseStats, PausedVm};
use crate::vstate::vcpu::{self, Vcpu, VcpuEvent, VcpuHandle};
use crate::vstate::vm::{self, Vm};

/// Errors while building or running the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Image(#[from] guest_image::GuestImageError),
    #[error("cannot read {path}: {source}")]
    ReadFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    #[error("cannot open disk {path}: {source}")]
    Disk {
        path: String,
        source: std::io::Error,
    },
    #[error("virtio device: {0}")]
    Virtio(#[from] virtio::VirtioError),
    #[error("{what}: {source}")]
    Kvm {
        what: String,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error("this host supports at most {max} vCPUs, {asked} requested")]
    TooManyCpus { asked: u8, max: usize },
    #[error("cannot restore: {0}")]
    Restore(String),
    #[error("{0}")]
    Api(String),
}

pub(crate) fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Kvm { what, source }
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// Kernel, initrd and their names, however they were found.
struct BootFiles {
    kernel: Vec<u8>,
    kernel_name: String,
    initrd: Option<Vec<u8>>,
}

fn read_file(path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::ReadFile {
        path: path.display().to_string(),
        source,
    })
}

fn boot_files(cfg: &VmConfig) -> Result<BootFiles, BuildError> {
    match &cfg.boot {
        BootSource::Image(path) => {
            let found = guest_image::find_boot_files(path)?;
            Ok(BootFiles {
                kernel_name: format!("{}:{}", path.display(), found.kernel_path),
                kernel: found.kernel,
                initrd: found.initrd,
            })
        }
        BootSource::Direct { kernel, initrd } => Ok(BootFiles {
            kernel: read_file(kernel)?,
            kernel_name: kernel.display().to_string(),
            initrd: initrd.as_deref().map(read_file).transpose()?,
        }),
    }
}

/// Reports progress on stderr (the console owns stdout).
pub(crate) fn progress(msg: &str) {
    eprintln!("vmm: {msg}");
}

/// A VM that has been built and whose vCPUs are running.
pub struct RunningVm {
    pub vm: Vm,
    pub vcpus: Vec<VcpuHandle>,
    pub exit: Arc<ExitSignal>,
    pub stats: Arc<FallbackStats>,
    event_manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>,
    _raw_terminal: Option<RawTerminal>,
    /// What the VM was built from, for snapshots.
    pub machine: MachineConfig,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) block: Option<Arc<Mutex<MmioTransport>>>,
    pub(crate) msr_indices: Arc<Vec<u32>>,
    pub(crate) snapshot_trigger: Option<SnapshotTrigger>,
    /// Bundles to apply once their console line appears (`--boot-patch`).
    pub(crate) boot_patches: Option<BootPatches>,
    /// The boot patch being applied, and the ones after it.
    pub(crate) boot_patching: Option<crate::patching::boot::BootPatching>,
    /// The control API, when serving one.
    pub(crate) api: Option<crate::api::server::ApiChannel>,
    pub(crate) name: String,
    /// Pause holds and latencies (behind a lock so a shared `&RunningVm` can pause).
    pause: Mutex<PauseControl>,
    /// Whether an API client holds the VM paused (one of the pause holds).
    pub(crate) paused: bool,
    /// What the loop waits on while paused, when the device subscribers must not run.
    paused_wait: PausedWait,
    pub(crate) started: std::time::Instant,
    /// The guest kernel, found on first use (live patching) or preloaded after a restore.
    pub(crate) kernel: Option<introspect::guest::GuestKernel>,
    /// The preload in progress, if any ([`RunningVm::preload_guest_kernel`]).
    pub(crate) kernel_loading: Option<crate::introspection::KernelPreload>,
    /// When the guest kernel's tables were last used (they are dropped when idle).
    pub(crate) kernel_used_at: std::time::Instant,
    pub(crate) patch_area: Option<crate::patching::area::PatchArea>,
    pub(crate) ledger: patcher::ledger::Ledger,
    /// The patch transition between attempts, if any.
    pub(crate) patch_in_flight: Option<crate::patching::apply::PendingPatch>,
    /// Live-patched sites the guest may not write (read-only memory slots + the guard).
    pub(crate) text_guard: Arc<Mutex<GuardState>>,
}

/// The devices of a VM, on their buses.
pub(crate) struct Devices {
    pub(crate) io_bus: Bus,
    pub(crate) mmio_bus: Bus,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    pub(crate) rx_ready: Arc<EventFd>,
    pub(crate) block: Option<Arc<Mutex<MmioTransport>>>,
    pub(crate) text_guard: Arc<Mutex<GuardState>>,
}

/// Creates COM1, i8042, ACPI power and (with a disk) virtio-blk, fresh or from a snapshot.
pub(crate) fn create_devices(
    vm: &Vm,
    console_cfg: &ConsoleConfig,
    disk: Option<(std::fs::File, &Path, bool)>,
    exit: &Arc<ExitSignal>,
    event_manager: &mut SubscriberManager,
    saved: Option<(&SerialSnapshot, Option<&MmioSnapshot>)>,
    watches: Vec<LineWatch>,
) -> Result<Devices, BuildError> {
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("cannot route the serial interrupt"))?;
    let rx_ready = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?);
    let sink = console::output_sink(console_cfg).map_err(io_err("console"))?;
    let out = ConsoleOut::new(sink, exit.clone()).with_watches(watches);
    let serial = match saved {
        Some((snap, _)) => SerialDevice::restore(serial_irq, rx_ready.clone(), out, snap)
            .map_err(|e| BuildError::Restore(e.to_string()))?,
        None => SerialDevice::new(serial_irq, rx_ready.clone(), out),
    };
    let serial = Arc::new(Mutex::new(serial));
    io_bus
        .insert(serial.clone(), u64::from(COM1_PORT), 8)
        .map_err(|e| BuildError::EventLoop(e.to_string()))?;

    let i8042_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.fd()
        .register_irqfd(&i8042_irq, I8042_IRQ)
        .map_err(kvm_err("cannot route the i8042 interrupt"))?;
    io_bus
        .insert(
            Arc::new(Mutex::new(I8042::new(i8042_irq, exit.clone()))),
            u64::from(I8042_DATA_PORT),
            u64::from(I8042_PORT_LEN),
        )
        .map_err(|e| BuildError::EventLoop(e.to_string()))?;
    io_bus
        .insert(
            Arc::new(Mutex::new(AcpiPower::new(exit.clone()))),
            u64::from(ACPI_SLEEP_CONTROL_PORT),
            2,
        )
        .map_err(|e| BuildError::EventLoop(e.to_string()))?;

    // virtio-blk on the first virtio-mmio slot.
    let block = match disk {
        Some((file, path, readonly)) => Some(virtio::attach_block(
            vm,
            &mut mmio_bus,
            event_manager,
            file,
            path,
            readonly,
            VIRTIO_MMIO_START,
            VIRTIO_FIRST_IRQ,
            saved.and_then(|(_, b)| b),
        )?),
        None => None,
    };
    // Writes to read-only RAM (live-patched text pages) exit as MMIO: the text guard
    // answers them, over every RAM region.
    let text_guard = Arc::new(Mutex::new(GuardState::default()));
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in vm.memory().iter() {
        let base = region.start_addr().0;
        mmio_bus
            .insert(
                Arc::new(Mutex::new(TextGuard::new(
                    base,
                    vm.memory().clone(),
                    text_guard.clone(),
                ))),
                base,
                region.len(),
            )
            .map_err(|e| BuildError::EventLoop(e.to_string()))?;
    }
    Ok(Devices {
        io_bus,
        mmio_bus,
        serial,
        rx_ready,
        block,
        text_guard,
    })
}

/// Adds the event-loop subscribers (stop signals, console input) and starts the vCPUs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn start(
    vm: Vm,
    vcpus: Vec<Vcpu>,
    mut event_manager: SubscriberManager,
    console_cfg: &ConsoleConfig,
    exit: Arc<ExitSignal>,
    stats: Arc<FallbackStats>,
    devices_serial: (Arc<Mutex<SerialDevice>>, Arc<EventFd>),
    block: Option<Arc<Mutex<MmioTransport>>>,
    text_guard: Arc<Mutex<GuardState>>,
    machine: MachineConfig,
    msr_indices: Arc<Vec<u32>>,
) -> Result<RunningVm, BuildError> {
    let (serial, rx_ready) = devices_serial;
    let stop_evt = Arc::new(
        signals::install_stop_handlers().map_err(io_err("cannot install signal handlers"))?,
    );
    let paused_wait = PausedWait::new(&stop_evt, &exit)?;
    event_manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
        stop_evt,
        exit: exit.clone(),
    })));
    let raw_terminal = if *console_cfg == ConsoleConfig::Stdio {
        RawTerminal::enable()
    } else {
        None
    };
    if *console_cfg == ConsoleConfig::Stdio {
        let quit_exit = exit.clone();
        event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            serial.clone(),
            rx_ready,
            Arc::new(move || quit_exit.request(ExitReason::Signal(libc::SIGINT))),
        ))));
    }
    let barrier = Arc::new(Barrier::new(vcpus.len() + 1));
    let poll = crate::vstate::vcpu::parked_poll(vcpus.len());
    let parked = Arc::new(crate::vstate::parked_cpus::ParkedCpus::new(vcpus.len()));
    let handles = vcpus
        .into_iter()
        .map(|v| {
            v.with_parked_poll(poll)
                .with_parked_cpus(parked.clone())
                .start(barrier.clone())
        })
        .collect::<Result<Vec<_>, _>>()?;
    barrier.wait();
    Ok(RunningVm {
        vm,
        vcpus: handles,
        exit,
        stats,
        event_manager,
        _raw_terminal: raw_terminal,
        machine,
        serial,
        block,
        msr_indices,
        snapshot_trigger: None,
        boot_patches: None,
        boot_patching: None,
        api: None,
        name: String::new(),
        pause: Mutex::new(PauseControl::default()),
        paused: false,
        paused_wait,
        started: std::time::Instant::now(),
        kernel: None,
        kernel_loading: None,
        kernel_used_at: std::time::Instant::now(),
        patch_area: None,
        ledger: patcher::ledger::Ledger::new(),
        patch_in_flight: None,
        text_guard,
    })
}

/// Guest RAM plus the live-patch area (which is not RAM: the e820 map leaves it out).
pub fn guest_memory_regions(mem_size: u64) -> Vec<(vm_memory::GuestAddress, usize)> {
    let mut regions = boot::ram_regions(mem_size);
    regions.push((
        vm_memory::GuestAddress(PATCH_AREA_START),
        PATCH_AREA_SIZE as usize,
    ));
    regions.sort_by_key(|r| r.0);
    regions
}

/// Snapshot the VM once the console prints a line (`vmm run --snapshot-on-output`).
#[derive(Debug, Clone)]
pub struct SnapshotTrigger {
    pub watch: LineWatch,
    pub dir: std::path::PathBuf,
    /// Wait this long after the line before pausing (let the guest settle).
    pub delay: Duration,
    /// Stop the VM after the snapshot instead of resuming it.
    pub stop: bool,
}

/// Live-patch bundles applied while the guest boots (`vmm run --boot-patch`): when a
/// console line contains the watched text (a restored VM, too). The vCPUs are
/// held while the patcher loads the guest kernel (kallsyms, BTF, ORC), so the guest makes
/// no progress between the line and the patch.
#[derive(Debug, Clone)]
pub struct BootPatches {
    pub bundles: Vec<std::path::PathBuf>,
    pub watch: LineWatch,
}

/// What `vmm run` does by itself while the VM runs.
#[derive(Debug, Clone, Default)]
pub struct RunActions {
    pub snapshot: Option<SnapshotTrigger>,
    pub boot_patches: Option<BootPatches>,
}

impl RunActions {
    /// The console lines these actions wait for.
    pub(crate) fn watches(&self) -> Vec<LineWatch> {
        let snapshot = self.snapshot.as_ref().map(|t| t.watch.clone());
        let patches = self.boot_patches.as_ref().map(|b| b.watch.clone());
        snapshot.into_iter().chain(patches).collect()
    }
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn build_and_start(cfg: &VmConfig) -> Result<RunningVm, BuildError> {
    build_and_start_with(cfg, &RunActions::default())
}

/// [`build_and_start`], doing `actions` as the VM runs.
pub fn build_and_start_with(cfg: &VmConfig, actions: &RunActions) -> Result<RunningVm, BuildError> {
    // Everything that can be checked without KVM is checked first, so bad input never
    // depends on the host.
    let files = boot_files(cfg)?;
    let header = boot::read_setup_header(&files.kernel, &files.kernel_name)?;
    let mem_size = cfg.memory_mib << 20;
    let initrd_len = files.initrd.as_ref().map_or(0, Vec::len);
    let needed = boot::min_memory(&header, initrd_len);
    if mem_size < needed {
        return Err(boot::BootError::MemoryTooSmall {
            given_mib: cfg.memory_mib,
            needed_mib: needed.div_ceil(1 << 20),
            what: if initrd_len > 0 {
                "this kernel and its initrd need"
            } else {
                "this kernel needs"
            },
        }
        .into());
    }
    let disk = match &cfg.disk {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .read(true)
                .write(!cfg.disk_readonly)
                .open(path)
                .map_err(|source| BuildError::Disk {
                    path: path.display().to_string(),
                    source,
                })?,
        ),
        None => None,
    };

    let kvm = vm::open_kvm()?;
    let max_vcpus = kvm.get_max_vcpus();
    if usize::from(cfg.cpus) > max_vcpus {
        return Err(BuildError::TooManyCpus {
            asked: cfg.cpus,
            max: max_vcpus,
        });
    }
    let memory = vm::allocate_memory(&guest_memory_regions(mem_size))?;
    let vm = Vm::new(&kvm, memory)?;
    let mem = vm.memory();

    // Kernel, initrd, firmware tables, zero page.
    let kernel = boot::load_bzimage(mem, &files.kernel, &files.kernel_name, mem_size, initrd_len)?;
    let initrd = match &files.initrd {
        Some(data) => {
            let kernel_end = HIMEM_START + files.kernel.len() as u64;
            Some((
                boot::load_initrd(mem, mem_size, &kernel.header, data, kernel_end)?,
                data.len(),
            ))
        }
        None => None,
    };

    let exit = Arc::new(ExitSignal::new().map_err(io_err("cannot create exit eventfd"))?);
    let mut event_manager =
        SubscriberManager::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let disk_path = cfg.disk.clone();
    let devices = create_devices(
        &vm,
        &cfg.console,
        match (disk, &disk_path) {
            (Some(f), Some(p)) => Some((f, p.as_path(), cfg.disk_readonly)),
            _ => None,
        },
        &exit,
        &mut event_manager,
        None,
        actions.watches(),
    )?;
    let mut virtio_acpi = Vec::new();
    if devices.block.is_some() {
        virtio_acpi.push(VirtioMmioAcpi {
            base: VIRTIO_MMIO_START,
            len: VIRTIO_MMIO_SLOT_SIZE,
            irq: VIRTIO_FIRST_IRQ,
        });
    }

    let rsdp = acpi::create_acpi_tables(
        mem,
        &AcpiConfig {
            num_cpus: cfg.cpus,
            virtio_mmio: virtio_acpi,
        },
    )?;
    let cmdline = cfg.kernel_cmdline();
    boot::write_zero_page(
        mem,
        &ZeroPageConfig {
            header: kernel.header,
            cmdline: &cmdline,
            initrd,
            rsdp,
            mem_size,
        },
    )?;

    // vCPUs.
    vcpu::install_kick_handler()?;
    let stats = Arc::new(FallbackStats::default());
    let io_bus = Arc::new(devices.io_bus);
    let mmio_bus = Arc::new(devices.mmio_bus);
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(vm::VmError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(cfg.cpus.into());
    for id in 0..cfg.cpus {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err(format!("cannot create vCPU {id}")))?;
        let mut cpuid = supported.clone();
        cfg.cpu_template.apply(&mut cpuid, id, cfg.cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(format!("vCPU {id}: KVM_SET_CPUID2")))?;
        let msrs = regs::boot_msrs()?;
        fd.set_msrs(&msrs)
            .map_err(kvm_err(format!("vCPU {id}: KVM_SET_MSRS")))?;
        let mut lapic = fd
            .get_lapic()
            .map_err(kvm_err(format!("vCPU {id}: KVM_GET_LAPIC")))?;
        regs::configure_lint(&mut lapic);
        fd.set_lapic(&lapic)
            .map_err(kvm_err(format!("vCPU {id}: KVM_SET_LAPIC")))?;
        if id == 0 {
            let mut sregs = fd.get_sregs().map_err(kvm_err("vCPU 0: KVM_GET_SREGS"))?;
            regs::setup_long_mode(mem, &mut sregs)?;
            fd.set_sregs(&sregs)
                .map_err(kvm_err("vCPU 0: KVM_SET_SREGS"))?;
            fd.set_fpu(&regs::boot_fpu())
                .map_err(kvm_err("vCPU 0: KVM_SET_FPU"))?;
            fd.set_regs(&regs::boot_regs(kernel.entry))
                .map_err(kvm_err("vCPU 0: KVM_SET_REGS"))?;
        }
        vcpus.push(Vcpu::new(
            id,
            fd,
            io_bus.clone(),
            mmio_bus.clone(),
            mem.clone(),
            exit.clone(),
            stats.clone(),
        ));
    }

    progress(&format!(
        "booting {} ({} vCPU{}, {} MiB, cpu template {})",
        files.kernel_name,
        cfg.cpus,
        if cfg.cpus == 1 { "" } else { "s" },
        cfg.memory_mib,
        cfg.cpu_template.resolve().name()
    ));
    tracing::info!("kernel command line: {cmdline}");

    let machine = MachineConfig {
        cpus: cfg.cpus,
        memory_mib: cfg.memory_mib,
        cpu_template: cfg.cpu_template.resolve(),
        cmdline,
        disk: disk_path.map(|path| DiskRef {
            path,
            readonly: cfg.disk_readonly,
            size: 0,
            sha256: String::new(),
            mtime_ns: None,
        }),
    };
    let msr_indices =
        Arc::new(vcpu_state::msr_indices(&kvm).map_err(|e| BuildError::Restore(e.to_string()))?);
    let mut running = start(
        vm,
        vcpus,
        event_manager,
        &cfg.console,
        exit,
        stats,
        (devices.serial, devices.rx_ready),
        devices.block,
        devices.text_guard,
        machine,
        msr_indices,
    )?;
    running.snapshot_trigger = actions.snapshot.clone();
    running.boot_patches = actions.boot_patches.clone();
    Ok(running)
}

impl RunningVm {
    /// Serves the control API on `socket` as VM `name`.
    pub fn serve_api(&mut self, socket: &Path, name: &str) -> Result<(), BuildError> {
        let api = crate::api::server::start(socket).map_err(|e| BuildError::Api(e.to_string()))?;
        let wake = api.wake.clone();
        self.paused_wait.add(&wake)?;
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(WakeDrain(wake))));
        self.api = Some(api);
        self.name = name.to_string();
        Ok(())
    }

    /// Answers queued API requests; returns an exit reason when one stops the VM.
    fn poll_api(&mut self) -> Option<ExitReason> {
        let pending: Vec<_> = match &self.api {
            Some(api) => api.requests.try_iter().collect(),
            None => return None,
        };
        let mut stop = None;
        for p in pending {
            // Patch transitions answer when they end, possibly after several attempts.
            match p.request {
                ApiRequest::ApplyPatch {
                    bundle,
                    force,
                    deadline_ms,
                    allow_downgrade,
                } => self.start_apply(
                    &bundle,
                    force,
                    Duration::from_millis(deadline_ms),
                    allow_downgrade,
                    p.reply,
                ),
                ApiRequest::DisablePatch { name, force } => {
                    self.start_disable(&name, force, p.reply)
                }
                request => {
                    let (resp, exit) = self.handle_api(request, p.received);
                    let _ = p.reply.send(resp);
                    stop = stop.or(exit);
                }
            }
        }
        stop
    }

    /// Runs the device event loop until the guest or the host stops the VM, then
    /// stops every vCPU thread and returns why.
    pub fn run_until_exit(mut self) -> ExitReason {
        let mut trigger_seen_at: Option<std::time::Instant> = None;
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Some(reason) = self.poll_snapshot_trigger(&mut trigger_seen_at) {
                break reason;
            }
            if let Some(reason) = self.poll_api() {
                break reason;
            }
            self.poll_boot_patches();
            self.poll_patch();
            self.drop_idle_guest_kernel();
            // Wake for the next attempt of a patch transition in flight.
            let timeout = self.patch_due_in().map_or(100, |d| {
                i32::try_from(d.as_millis()).unwrap_or(100).clamp(0, 100)
            });
            // While paused the device subscribers do not run: no console input, no block
            // request completes, no interrupt is raised until the vCPUs run again.
            let waited = if self.is_paused() {
                self.paused_wait.wait(timeout, &self.exit)
            } else {
                self.event_manager
                    .run_with_timeout(timeout)
                    .map(|_| ())
                    .map_err(|e| format!("{e:?}"))
            };
            if let Err(e) = waited {
                break ExitReason::Fatal(format!("event loop failed: {e}"));
            }
        };
        for v in &self.vcpus {
            if let Err(e) = v.send(VcpuEvent::Finish) {
                tracing::debug!("{e}");
            }
        }
        for v in self.vcpus.drain(..) {
            v.join(Duration::from_secs(1));
        }
        tracing::debug!("emulation fallbacks: {}", self.stats.summary());
        reason
    }
}

impl RunningVm {
    /// Takes the `--snapshot-on-output` snapshot once its line was seen and the delay
    /// passed; returns an exit reason when the VM must stop.
    fn poll_snapshot_trigger(
        &mut self,
        seen_at: &mut Option<std::time::Instant>,
    ) -> Option<ExitReason> {
        let trigger = self.snapshot_trigger.clone()?;
        if !trigger
            .watch
            .seen
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return None;
        }
        let since = *seen_at.get_or_insert_with(std::time::Instant::now);
        if since.elapsed() < trigger.delay {
            return None;
        }
        self.snapshot_trigger = None;
        match self.snapshot(&trigger.dir, trigger.stop) {
            Ok(info) => {
                progress(&format!(
                    "snapshot written to {} (state {} bytes, memory {} MiB, vCPUs paused {:.1} ms)",
                    info.dir.display(),
                    info.state_bytes,
                    info.memory_bytes >> 20,
                    info.paused_for.as_secs_f64() * 1000.0
                ));
                trigger
                    .stop
                    .then(|| ExitReason::Snapshotted(info.dir.display().to_string()))
            }
            Err(e) => Some(ExitReason::Fatal(format!("snapshot failed: {e}"))),
        }
    }
}

impl RunningVm {
    fn pause_control(&self) -> std::sync::MutexGuard<'_, PauseControl> {
        self.pause.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a pause hold: the first one stops every vCPU outside `KVM_RUN`. Returns the
    /// pause latency (call to every vCPU parked) when this call stopped them, `None` when
    /// the VM was already paused. Holds nest; [`RunningVm::resume`] drops one.
    pub fn pause(&self) -> Result<Option<Duration>, PauseError> {
        self.pause_control().hold(&self.vcpus)
    }

    /// Drops a pause hold; the last one lets the vCPUs run again. Returns whether they run.
    pub fn resume(&self) -> Result<bool, PauseError> {
        self.pause_control().release(&self.vcpus)
    }

    /// [`RunningVm::pause`] without the latency.
    pub fn pause_vcpus(&self) -> Result<(), PauseError> {
        self.pause().map(|_| ())
    }

    /// [`RunningVm::resume`] without the outcome.
    pub fn resume_vcpus(&self) -> Result<(), PauseError> {
        self.resume().map(|_| ())
    }

    pub fn is_paused(&self) -> bool {
        self.pause_control().is_paused()
    }

    /// Latencies of the pauses that stopped the vCPUs.
    pub fn pause_stats(&self) -> PauseStats {
        self.pause_control().stats().clone()
    }

    /// The paused VM's vCPU state and memory; `NotPaused` while the vCPUs run. API
    /// requests are answered on this same (VMM) thread, so no client resumes the VM while
    /// the result is in use.
    pub fn paused_vm(&self) -> Result<PausedVm<'_>, PauseError> {
        if !self.is_paused() {
            return Err(PauseError::NotPaused);
        }
        Ok(PausedVm::new(
            &self.vcpus,
            &self.msr_indices,
            self.vm.memory(),
        ))
    }

    /// Pauses the VM (if it is not already), runs `f` on it, and drops the hold again:
    /// the stop-the-world window of a live patch.
    pub fn with_paused<R>(&self, f: impl FnOnce(&PausedVm<'_>) -> R) -> Result<R, PauseError> {
        self.pause()?;
        let result = self.paused_vm().map(|p| f(&p));
        self.resume()?;
        result
    }
}

/// The fds the loop waits on while the VM is paused: stop signals, the exit eventfd and
/// the API's wake-up. All are non-blocking eventfds that are only drained here.
struct PausedWait {
    epoll: Epoll,
    fds: Vec<Arc<EventFd>>,
}

impl PausedWait {
    fn new(stop_evt: &Arc<EventFd>, exit: &ExitSignal) -> Result<Self, BuildError> {
        let epoll = Epoll::new().map_err(io_err("epoll"))?;
        let mut wait = PausedWait {
            epoll,
            fds: Vec::new(),
        };
        wait.add(stop_evt)?;
        use std::os::unix::io::AsRawFd;
        let exit_fd = exit.eventfd().as_raw_fd();
        wait.epoll
            .ctl(
                ControlOperation::Add,
                exit_fd,
                EpollEvent::new(EventSet::IN, exit_fd as u64),
            )
            .map_err(io_err("epoll"))?;
        Ok(wait)
    }

    fn add(&mut self, fd: &Arc<EventFd>) -> Result<(), BuildError> {
        use std::os::unix::io::AsRawFd;
        let raw = fd.as_raw_fd();
        self.epoll
            .ctl(
                ControlOperation::Add,
                raw,
                EpollEvent::new(EventSet::IN, raw as u64),
            )
            .map_err(io_err("epoll"))?;
        self.fds.push(fd.clone());
        Ok(())
    }

    /// Waits up to `timeout_ms` for a stop signal, an exit request or an API request.
    fn wait(&self, timeout_ms: i32, exit: &ExitSignal) -> Result<(), String> {
        let mut events = [EpollEvent::default(); 4];
        match self.epoll.wait(timeout_ms, &mut events) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e.to_string()),
        }
        // The stop eventfd is the first; the API wake-up is drained (its requests are
        // picked up by the loop); the exit eventfd only wakes the loop.
        if let Some(stop) = self.fds.first() {
            if stop.read().is_ok() {
                exit.request(ExitReason::Signal(signals::last_signal()));
            }
        }
        for fd in self.fds.iter().skip(1) {
            let _ = fd.read();
        }
        let _ = exit.eventfd().read();
        Ok(())
    }
}

/// Drains an eventfd whose only job is to wake the event loop.
struct WakeDrain(Arc<EventFd>);

impl MutEventSubscriber for WakeDrain {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(self.0.as_ref(), EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }
}

/// Turns SIGINT/SIGTERM and the exit eventfd into loop wake-ups.
struct StopWatcher {
    stop_evt: Arc<EventFd>,
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.stop_evt, EventSet::IN));
        let _ = ops.add(Events::new(self.exit.eventfd(), EventSet::IN));
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        use std::os::unix::io::AsRawFd;
        if events.fd() == self.stop_evt.as_raw_fd() {
            let _ = self.stop_evt.read();
            self.exit
                .request(ExitReason::Signal(signals::last_signal()));
        } else {
            let _ = self.exit.eventfd().read();
        }
    }
}
