//! The boot recipe: from a `VmConfig` to running vCPUs, and the VMM event loop.

use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
use crate::devices::serial::{ConsoleOut, SerialDevice};
use crate::devices::virtio;
use crate::guest_image;
use crate::signals;
use crate::vstate::exit::{ExitReason, ExitSignal};
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
}

fn kvm_err(what: impl Into<String>) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Kvm { what, source }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
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
fn progress(msg: &str) {
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
}

/// Builds the VM described by `cfg` and starts its vCPUs.
pub fn build_and_start(cfg: &VmConfig) -> Result<RunningVm, BuildError> {
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
    let memory = vm::allocate_memory(&boot::ram_regions(mem_size))?;
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
    let mut event_manager = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
        .map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;

    // Legacy devices on the port I/O bus.
    let mut io_bus = Bus::new();
    let mut mmio_bus = Bus::new();
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
    vm.fd()
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("cannot route the serial interrupt"))?;
    let rx_ready = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?);
    let sink = console::output_sink(&cfg.console).map_err(io_err("console"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        rx_ready.clone(),
        ConsoleOut::new(sink, exit.clone()),
    )));
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
    let mut virtio_acpi = Vec::new();
    if let (Some(file), Some(path)) = (disk, &cfg.disk) {
        let base = VIRTIO_MMIO_START;
        let irq = VIRTIO_FIRST_IRQ;
        virtio::attach_block(
            &vm,
            &mut mmio_bus,
            &mut event_manager,
            file,
            path,
            cfg.disk_readonly,
            base,
            irq,
        )?;
        virtio_acpi.push(VirtioMmioAcpi {
            base,
            len: VIRTIO_MMIO_SLOT_SIZE,
            irq,
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
    let io_bus = Arc::new(io_bus);
    let mmio_bus = Arc::new(mmio_bus);
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

    // Event loop subscribers: exit, stop signals, console input.
    let stop_evt =
        signals::install_stop_handlers().map_err(io_err("cannot install signal handlers"))?;
    event_manager.add_subscriber(Arc::new(Mutex::new(StopWatcher {
        stop_evt,
        exit: exit.clone(),
    })));
    let raw_terminal = if cfg.console == ConsoleConfig::Stdio {
        RawTerminal::enable()
    } else {
        None
    };
    if cfg.console == ConsoleConfig::Stdio {
        let quit_exit = exit.clone();
        event_manager.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(
            serial,
            rx_ready,
            raw_terminal.is_some(),
            Arc::new(move || quit_exit.request(ExitReason::Signal(libc::SIGINT))),
        ))));
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

    let barrier = Arc::new(Barrier::new(vcpus.len() + 1));
    let handles = vcpus
        .into_iter()
        .map(|v| v.start(barrier.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    barrier.wait();

    Ok(RunningVm {
        vm,
        vcpus: handles,
        exit,
        stats,
        event_manager,
        _raw_terminal: raw_terminal,
    })
}

impl RunningVm {
    /// Runs the device event loop until the guest or the host stops the VM, then
    /// stops every vCPU thread and returns why.
    pub fn run_until_exit(mut self) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.event_manager.run_with_timeout(100) {
                break ExitReason::Fatal(format!("event loop failed: {e:?}"));
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

/// Turns SIGINT/SIGTERM and the exit eventfd into loop wake-ups.
struct StopWatcher {
    stop_evt: EventFd,
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
