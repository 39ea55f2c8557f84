//! Taking a snapshot of a running VM and starting a VM from one.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arch::x86_64::emulate::FallbackStats;
use crate::builder::{self, kvm_err, progress, BuildError, RunningVm};
use crate::config::ConsoleConfig;
use crate::vstate::exit::ExitSignal;
use crate::vstate::vcpu::{self, Vcpu};
use crate::vstate::vm::{self, Vm};

use super::snapshot::{
    check_cpu_template, check_disk, disk_identity, disk_mtime, LivePatchState, SnapshotError,
    VmSnapshot, MEMORY_FILE, STATE_FILE,
};
use super::{memory_file, state_file, vcpu_state, vm_state};

/// What a snapshot took.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub dir: PathBuf,
    pub state_bytes: u64,
    pub memory_bytes: u64,
    /// Wall time with the vCPUs paused.
    pub paused_for: Duration,
}

impl RunningVm {
    /// Pauses the VM, writes `dir/state` and `dir/memory`, and resumes it unless `stop`.
    /// Runs on the VMM thread, so the device event loop is idle meanwhile.
    pub fn snapshot(&mut self, dir: &Path, stop: bool) -> Result<SnapshotInfo, SnapshotError> {
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
        let started = Instant::now();
        let vcpu_err = |e: crate::vstate::pause::PauseError| SnapshotError::Vcpu(e.to_string());
        // A pause hold: a VM an API client paused stays paused after the snapshot.
        self.pause().map_err(vcpu_err)?;
        let result = self.write_snapshot(dir);
        let paused_for = started.elapsed();
        if !stop {
            self.resume().map_err(vcpu_err)?;
        }
        let (snapshot, memory) = result?;
        // The memory file reaches the disk while the guest runs again; the state file,
        // captured in the pause, is written after it, so a complete state file always
        // names a complete memory file.
        let memory_path = dir.join(MEMORY_FILE);
        memory_file::sync(&memory, &memory_path)?;
        let state_path = dir.join(STATE_FILE);
        state_file::write(&state_path, &snapshot)?;
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let (state_bytes, memory_bytes) = (size(&state_path), size(&memory_path));
        Ok(SnapshotInfo {
            dir: dir.to_path_buf(),
            state_bytes,
            memory_bytes,
            paused_for,
        })
    }

    /// Captures the VM's state and writes the memory file (returned unsynced).
    fn write_snapshot(&self, dir: &Path) -> Result<(VmSnapshot, std::fs::File), SnapshotError> {
        let vcpus = self
            .paused_vm()
            .and_then(|p| p.vcpu_states())
            .map_err(|e| SnapshotError::Vcpu(e.to_string()))?;
        let mut machine = self.machine.clone();
        if let Some(disk) = &mut machine.disk {
            let (size, sha256) = disk_identity(&disk.path)?;
            disk.size = size;
            disk.sha256 = sha256;
            disk.mtime_ns = Some(disk_mtime(&disk.path)?);
        }
        let snapshot = VmSnapshot {
            machine,
            ram: memory_file::layout(self.vm.memory()),
            vm: vm_state::save(self.vm.fd())?,
            vcpus,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .save_state(),
            block: self
                .block
                .as_ref()
                .map(|b| b.lock().unwrap_or_else(|e| e.into_inner()).save_state()),
            live_patch: self.patch_area.map(|a| LivePatchState {
                area_slot_va: a.slot_va,
                area_table_gpa: a.table_gpa,
                next: self
                    .ledger
                    .memory_in_use()
                    .iter()
                    .map(|m| m.end())
                    .max()
                    .unwrap_or(a.usable().0),
                ledger: self.ledger.clone(),
                protected: self
                    .text_guard
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .sites()
                    .collect(),
            }),
        };
        let memory_path = dir.join(MEMORY_FILE);
        // An older snapshot in the same directory stops being one before its memory file
        // is overwritten.
        let _ = std::fs::remove_file(dir.join(STATE_FILE));
        let memory = memory_file::write(self.vm.memory(), &memory_path)?;
        Ok((snapshot, memory))
    }
}

/// Starts a VM from the snapshot in `dir`: memory mapped privately from `dir/memory`,
/// devices and vCPUs in their saved state. `disk` replaces the snapshot's disk path (a
/// private copy, say); either way the disk must be the one the snapshot was taken with.
/// Nothing runs unless every part restored.
pub fn restore_and_start(
    dir: &Path,
    disk: Option<PathBuf>,
    console: &ConsoleConfig,
) -> Result<RunningVm, BuildError> {
    restore_and_start_with(dir, disk, console, &builder::RunActions::default())
}

/// [`restore_and_start`], doing `actions` as the VM runs (boot patches, too, wait for
/// their console line).
pub fn restore_and_start_with(
    dir: &Path,
    disk: Option<PathBuf>,
    console: &ConsoleConfig,
    actions: &builder::RunActions,
) -> Result<RunningVm, BuildError> {
    let started = Instant::now();
    let restore_err = |e: SnapshotError| BuildError::Restore(e.to_string());
    let snap: VmSnapshot =
        state_file::read(&dir.join(STATE_FILE)).map_err(|e| restore_err(e.into()))?;
    snap.validate().map_err(restore_err)?;
    check_cpu_template(snap.machine.cpu_template).map_err(restore_err)?;
    let disk_file = match &snap.machine.disk {
        Some(d) => {
            let path = disk.clone().unwrap_or_else(|| d.path.clone());
            let matched = check_disk(d, &path).map_err(restore_err)?;
            tracing::debug!(disk = %path.display(), ?matched, "snapshot disk recognised");
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(!d.readonly)
                .open(&path)
                .map_err(|source| BuildError::Disk {
                    path: path.display().to_string(),
                    source,
                })?;
            Some((file, path, d.readonly))
        }
        None => None,
    };
    let memory = memory_file::map_private(&dir.join(MEMORY_FILE), &snap.ram)
        .map_err(|e| restore_err(e.into()))?;

    let kvm = vm::open_kvm()?;
    let vm = Vm::new(&kvm, memory)?;
    vm_state::restore(vm.fd(), &snap.vm).map_err(|e| restore_err(e.into()))?;
    let exit = Arc::new(ExitSignal::new().map_err(builder::io_err("cannot create exit eventfd"))?);
    let mut event_manager = crate::devices::virtio::SubscriberManager::new()
        .map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let devices = builder::create_devices(
        &vm,
        console,
        disk_file
            .as_ref()
            .map(|(f, p, ro)| f.try_clone().map(|f| (f, p.as_path(), *ro)))
            .transpose()
            .map_err(builder::io_err("disk"))?,
        &exit,
        &mut event_manager,
        Some((&snap.serial, snap.block.as_ref())),
        actions.watches(),
    )?;

    vcpu::install_kick_handler()?;
    let stats = Arc::new(FallbackStats::default());
    let io_bus = Arc::new(devices.io_bus);
    let mmio_bus = Arc::new(devices.mmio_bus);
    let supported = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(vm::VmError::SupportedCpuid)?;
    let mut vcpus = Vec::with_capacity(snap.vcpus.len());
    for state in &snap.vcpus {
        let id = state.id;
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err(format!("cannot create vCPU {id}")))?;
        let mut cpuid = supported.clone();
        snap.machine
            .cpu_template
            .apply(&mut cpuid, id, snap.machine.cpus);
        fd.set_cpuid2(&cpuid)
            .map_err(kvm_err(format!("vCPU {id}: KVM_SET_CPUID2")))?;
        vcpu_state::restore(&fd, state).map_err(|e| BuildError::Restore(e.to_string()))?;
        vcpus.push(Vcpu::new(
            id,
            fd,
            io_bus.clone(),
            mmio_bus.clone(),
            vm.memory().clone(),
            exit.clone(),
            stats.clone(),
        ));
    }
    let msr_indices =
        Arc::new(vcpu_state::msr_indices(&kvm).map_err(|e| BuildError::Restore(e.to_string()))?);
    let mut machine = snap.machine.clone();
    if let (Some(d), Some((_, path, _))) = (&mut machine.disk, &disk_file) {
        d.path = path.clone();
    }
    // Redirection sites are guarded before any vCPU runs: the guest never sees a window
    // in which it could write them.
    if let Some(lp) = &snap.live_patch {
        let pages = {
            let mut guard = devices.text_guard.lock().unwrap_or_else(|e| e.into_inner());
            for &(gpa, len) in &lp.protected {
                guard.protect(gpa, len);
            }
            guard.pages()
        };
        if !pages.is_empty() {
            vm.set_read_only(&pages)
                .map_err(|e| BuildError::Restore(e.to_string()))?;
        }
    }
    let mut running = builder::start(
        vm,
        vcpus,
        event_manager,
        console,
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
    running.preload_guest_kernel();
    progress(&format!(
        "restored {} ({} vCPU{}, {} MiB): vCPUs running {:.1} ms after the restore began",
        dir.display(),
        running.machine.cpus,
        if running.machine.cpus == 1 { "" } else { "s" },
        running.machine.memory_mib,
        started.elapsed().as_secs_f64() * 1000.0
    ));
    if let Some(lp) = snap.live_patch {
        running.patch_area = Some(crate::patching::area::PatchArea {
            slot_va: lp.area_slot_va,
            table_gpa: lp.area_table_gpa,
        });
        running.ledger = lp.ledger;
        // A snapshot from before per-bundle memory records: keep all it had used.
        let area = running.patch_area.expect("set above").usable();
        if running.ledger.memory_in_use().is_empty() && lp.next > area.0 {
            running.ledger.reserve(patcher::ledger::PatchMemory {
                base: area.0,
                size: lp.next - area.0,
            });
        }
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::ram_regions;
    use crate::arch::x86_64::cpu_template::CpuTemplate;
    use crate::arch::x86_64::regs;
    use crate::devices::serial::{ConsoleOut, SerialDevice};
    use crate::persist::snapshot::MachineConfig;
    use crate::vstate::exit::ExitReason;
    use crate::vstate::vm::{allocate_memory, open_kvm};
    use kvm_ioctls::VcpuExit;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    /// Prints 'a'..'z' on COM1, one `out` each, then powers off through ACPI S5.
    const ALPHABET: &[u8] = &[
        0x31, 0xdb, 0x88, 0xd8, 0x04, 0x61, 0x66, 0xba, 0xf8, 0x03, 0xee, 0x48, 0xff, 0xc3, 0x48,
        0x83, 0xfb, 0x1a, 0x75, 0xee, 0xb0, 0x34, 0x66, 0xba, 0xc0, 0x03, 0xee, 0xf4,
    ];
    const CODE: u64 = 0x1_0000;

    /// Runs the alphabet guest until it has printed `n` letters and saves it as a
    /// snapshot directory, as `RunningVm::snapshot` would.
    fn snapshot_after(n: usize, dir: &Path) {
        let kvm = open_kvm().expect("this test needs a working /dev/kvm");
        let vm = Vm::new(&kvm, allocate_memory(&ram_regions(2 << 20)).unwrap()).unwrap();
        vm.memory()
            .write_slice(ALPHABET, GuestAddress(CODE))
            .unwrap();
        let mut fd = vm.fd().create_vcpu(0).unwrap();
        let template = CpuTemplate::Auto.resolve();
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        template.apply(&mut cpuid, 0, 1);
        fd.set_cpuid2(&cpuid).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        regs::setup_long_mode(vm.memory(), &mut sregs).unwrap();
        fd.set_sregs(&sregs).unwrap();
        fd.set_regs(&regs::boot_regs(GuestAddress(CODE))).unwrap();
        let mut printed = 0;
        while printed < n {
            if let VcpuExit::IoOut(0x3f8, _) = fd.run().unwrap() {
                printed += 1;
            }
        }
        vcpu_state::complete_pending_io(&mut fd, 0).unwrap();
        let msrs = vcpu_state::msr_indices(&kvm).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let serial = SerialDevice::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
            ConsoleOut::new(Box::new(std::io::sink()), exit),
        );
        let snap = VmSnapshot {
            machine: MachineConfig {
                cpus: 1,
                memory_mib: 2,
                cpu_template: template,
                cmdline: String::new(),
                disk: None,
            },
            ram: memory_file::layout(vm.memory()),
            vm: vm_state::save(vm.fd()).unwrap(),
            vcpus: vec![vcpu_state::save(&fd, 0, &msrs).unwrap()],
            serial: serial.save_state(),
            block: None,
            live_patch: None,
        };
        std::fs::create_dir_all(dir).unwrap();
        memory_file::write(vm.memory(), &dir.join(MEMORY_FILE)).unwrap();
        state_file::write(&dir.join(STATE_FILE), &snap).unwrap();
    }

    fn scratch(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vmm-vmsnap-{}-{name}", std::process::id()))
    }

    /// Needs /dev/kvm. The restored VM continues the alphabet where the snapshot stopped
    /// and powers off.
    #[test]
    fn restored_vm_continues_on_its_console() {
        let dir = scratch("ok");
        snapshot_after(10, &dir);
        let console = dir.join("console");
        let vm = restore_and_start(&dir, None, &ConsoleConfig::File(console.clone())).unwrap();
        assert_eq!(vm.run_until_exit(), ExitReason::Poweroff);
        assert_eq!(
            std::fs::read_to_string(&console).unwrap(),
            "klmnopqrstuvwxyz"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Needs /dev/kvm. Each damaged snapshot is refused with one line and never runs.
    #[test]
    fn damaged_snapshots_are_refused() {
        let dir = scratch("bad");
        snapshot_after(3, &dir);
        let state = std::fs::read(dir.join(STATE_FILE)).unwrap();
        let memory = std::fs::read(dir.join(MEMORY_FILE)).unwrap();
        let console = ConsoleConfig::None;
        let attempt = |state: &[u8], memory: &[u8]| {
            std::fs::write(dir.join(STATE_FILE), state).unwrap();
            std::fs::write(dir.join(MEMORY_FILE), memory).unwrap();
            let msg = restore_and_start(&dir, None, &console)
                .err()
                .expect("a damaged snapshot must not run")
                .to_string();
            assert!(!msg.contains('\n'), "{msg}");
            msg
        };
        let mut flipped = state.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 0x40;
        assert!(attempt(&flipped, &memory).contains("checksum mismatch"));
        assert!(attempt(&state[..n - 10], &memory).contains("truncated"));
        let mut version = state.clone();
        version[8] = 7;
        assert!(attempt(&version, &memory).contains("format version 7"));
        assert!(attempt(b"garbage", &memory).contains("bad magic"));
        assert!(attempt(&state, &memory[..4096]).contains("needs 2097152"));
        std::fs::remove_dir_all(&dir).unwrap();
        let missing = restore_and_start(&dir, None, &console)
            .err()
            .unwrap()
            .to_string();
        assert!(missing.contains("cannot read state file"), "{missing}");
    }
}
