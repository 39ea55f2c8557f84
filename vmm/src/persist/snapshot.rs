//! A whole-VM snapshot: what `vmm snapshot` writes and `vmm run --restore` reads.
//! `DIR/state` is the state file (`state_file`), `DIR/memory` the guest memory file.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::memory_file::RamLayout;
use super::vcpu_state::VcpuState;
use super::vm_state::VmState;
use crate::arch::x86_64::cpu_template::CpuTemplate;
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::persist::MmioSnapshot;

/// File names inside a snapshot directory.
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

/// Errors of whole-VM snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    StateFile(#[from] super::state_file::StateFileError),
    #[error("{0}")]
    MemoryFile(#[from] super::memory_file::MemoryFileError),
    #[error("{0}")]
    VmState(#[from] super::vm_state::VmStateError),
    #[error("cannot create snapshot directory {path}: {source}")]
    Dir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot read disk {path}: {source}")]
    Disk {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is not the one the snapshot was taken with ({why})")]
    DiskChanged { path: String, why: String },
    #[error("snapshot was taken with cpu template {saved}; this host provides {here}")]
    CpuTemplate { saved: String, here: String },
    #[error("snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error("vCPU control: {0}")]
    Vcpu(String),
}

/// The disk a snapshot refers to, and how to recognise it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRef {
    pub path: PathBuf,
    pub readonly: bool,
    pub size: u64,
    /// SHA-256 of the whole disk at snapshot time (hex).
    pub sha256: String,
    /// Modification time at snapshot time, nanoseconds since the epoch. A disk whose size and
    /// mtime both match is accepted without reading it; any other is hashed.
    #[serde(default)]
    pub mtime_ns: Option<u128>,
}

/// What the VM was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    pub cpus: u8,
    pub memory_mib: u64,
    pub cpu_template: CpuTemplate,
    pub cmdline: String,
    pub disk: Option<DiskRef>,
}

/// Everything needed to resume a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub machine: MachineConfig,
    pub ram: RamLayout,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub block: Option<MmioSnapshot>,
    /// What the live patcher has done to this guest (absent if it never ran).
    #[serde(default)]
    pub live_patch: Option<LivePatchState>,
}

fn table_in_area() -> u64 {
    crate::arch::x86_64::layout::PATCH_AREA_START
}

/// The live patcher's host-side state: where its area is mapped in the guest, where the
/// next bundle goes, and the ledger (bundles, per-site stacks and original bytes, events).
/// A restored VM gets it back, so it knows exactly what its guest kernel runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LivePatchState {
    pub area_slot_va: u64,
    /// Guest-physical address of the area's page table (snapshots written before this
    /// field kept it in the area's first page).
    #[serde(default = "table_in_area")]
    pub area_table_gpa: u64,
    pub next: u64,
    pub ledger: patcher::ledger::Ledger,
    /// Guest-physical (start, length) of every redirection site guarded against guest writes.
    #[serde(default)]
    pub protected: Vec<(u64, u64)>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState").finish_non_exhaustive()
    }
}

impl VmSnapshot {
    /// Checks the parts agree with each other (a crafted or mixed-up state file).
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |m: String| Err(SnapshotError::Inconsistent(m));
        if self.vcpus.len() != usize::from(self.machine.cpus) || self.vcpus.is_empty() {
            return bad(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                self.machine.cpus
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.id) != i {
                return bad(format!("vCPU state {i} has id {}", v.id));
            }
        }
        let ram: u64 = self.ram.iter().map(|r| r.1).sum();
        let expected = self.machine.memory_mib << 20;
        if ram != expected && ram != expected + crate::arch::x86_64::layout::PATCH_AREA_SIZE {
            return bad(format!(
                "{ram} bytes of RAM regions for {} MiB",
                self.machine.memory_mib
            ));
        }
        if self.block.is_some() != self.machine.disk.is_some() {
            return bad("disk and block device state disagree".into());
        }
        Ok(())
    }
}

/// Size and SHA-256 of a disk image.
pub fn disk_identity(path: &Path) -> Result<(u64, String), SnapshotError> {
    let err = |source| SnapshotError::Disk {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(err)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(err)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    let hex = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((size, hex))
}

/// Modification time of `path` in nanoseconds since the epoch.
pub fn disk_mtime(path: &Path) -> Result<u128, SnapshotError> {
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(|source| SnapshotError::Disk {
            path: path.display().to_string(),
            source,
        })?;
    Ok(modified
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0))
}

/// How [`check_disk`] recognised the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMatch {
    /// Same size and modification time as at snapshot time: not read.
    SizeAndMtime,
    /// Read in full; its SHA-256 matches.
    Contents,
}

/// Checks that `path` holds the disk `disk` describes: size and mtime when they match
/// (the same file, untouched since), otherwise its whole contents (a copy, say).
pub fn check_disk(disk: &DiskRef, path: &Path) -> Result<DiskMatch, SnapshotError> {
    if let Some(saved) = disk.mtime_ns {
        let len = std::fs::metadata(path).map(|m| m.len()).ok();
        if len == Some(disk.size) && disk_mtime(path)? == saved {
            return Ok(DiskMatch::SizeAndMtime);
        }
    }
    let (size, sha) = disk_identity(path)?;
    let changed = |why: String| SnapshotError::DiskChanged {
        path: path.display().to_string(),
        why,
    };
    if size != disk.size {
        return Err(changed(format!(
            "{size} bytes, the snapshot's disk had {}",
            disk.size
        )));
    }
    if sha != disk.sha256 {
        return Err(changed("its contents differ".into()));
    }
    Ok(DiskMatch::Contents)
}

/// Checks that this host can give the guest the CPU it was snapshotted with.
pub fn check_cpu_template(saved: CpuTemplate) -> Result<(), SnapshotError> {
    let here = CpuTemplate::Auto.resolve();
    let ok = match saved {
        // The pvm template's guest options and masks only make sense under PVM, and a
        // guest started elsewhere has never been through PVM's emulator.
        CpuTemplate::Pvm => here == CpuTemplate::Pvm,
        CpuTemplate::Conservative => true,
        CpuTemplate::Host => here != CpuTemplate::Pvm,
        CpuTemplate::Auto => false,
    };
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::CpuTemplate {
            saved: saved.name().into(),
            here: here.name().into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_identity_detects_changes() {
        let dir = std::env::temp_dir().join(format!("vmm-snapdisk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![7u8; 3 << 20]).unwrap();
        let (size, sha256) = disk_identity(&disk).unwrap();
        let r = DiskRef {
            path: disk.clone(),
            readonly: false,
            size,
            sha256,
            mtime_ns: None,
        };
        assert_eq!(check_disk(&r, &disk).unwrap(), DiskMatch::Contents);
        let copy = dir.join("copy");
        std::fs::copy(&disk, &copy).unwrap();
        check_disk(&r, &copy).unwrap();
        let mut data = std::fs::read(&disk).unwrap();
        data[12345] = 8;
        std::fs::write(&copy, &data).unwrap();
        assert!(check_disk(&r, &copy)
            .unwrap_err()
            .to_string()
            .contains("contents differ"));
        std::fs::write(&copy, &data[..4096]).unwrap();
        assert!(check_disk(&r, &copy)
            .unwrap_err()
            .to_string()
            .contains("4096 bytes"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unchanged_size_and_mtime_skip_the_hash_and_anything_else_is_hashed() {
        let dir = std::env::temp_dir().join(format!("vmm-snapmtime-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let disk = dir.join("disk");
        std::fs::write(&disk, vec![1u8; 1 << 20]).unwrap();
        let (size, sha256) = disk_identity(&disk).unwrap();
        let r = DiskRef {
            path: disk.clone(),
            readonly: false,
            size,
            sha256,
            mtime_ns: Some(disk_mtime(&disk).unwrap()),
        };
        assert_eq!(check_disk(&r, &disk).unwrap(), DiskMatch::SizeAndMtime);
        // Same size, new contents, new mtime: hashed and refused.
        let file = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
        std::os::unix::fs::FileExt::write_at(&file, b"x", 100).unwrap();
        file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        drop(file);
        assert!(check_disk(&r, &disk)
            .unwrap_err()
            .to_string()
            .contains("contents differ"));
        // A copy with the original contents but its own mtime: hashed and accepted.
        let copy = dir.join("copy");
        std::fs::write(&copy, vec![1u8; 1 << 20]).unwrap();
        assert_eq!(check_disk(&r, &copy).unwrap(), DiskMatch::Contents);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_live_patch_state_without_a_table_address_has_the_table_in_the_area() {
        let state = LivePatchState {
            area_slot_va: 0xffff_ffff_8400_0000,
            area_table_gpa: crate::arch::x86_64::layout::PATCH_TABLE_START,
            next: 0,
            ledger: patcher::ledger::Ledger::new(),
            protected: Vec::new(),
        };
        let mut value = serde_json::to_value(&state).unwrap();
        let back: LivePatchState = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(back, state);
        // Written before the table moved below 1 MiB: no field, the area's first page.
        value.as_object_mut().unwrap().remove("area_table_gpa");
        let old: LivePatchState = serde_json::from_value(value).unwrap();
        assert_eq!(
            old.area_table_gpa,
            crate::arch::x86_64::layout::PATCH_AREA_START
        );
    }

    #[test]
    fn cpu_template_rules() {
        assert!(check_cpu_template(CpuTemplate::Conservative).is_ok());
        assert!(check_cpu_template(CpuTemplate::Auto).is_err());
        let pvm_here = CpuTemplate::Auto.resolve() == CpuTemplate::Pvm;
        assert_eq!(check_cpu_template(CpuTemplate::Pvm).is_ok(), pvm_here);
        assert_eq!(check_cpu_template(CpuTemplate::Host).is_ok(), !pvm_here);
    }
}
