//! One vCPU's complete architectural state, saved and restored in the order KVM needs.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

use crate::arch::x86_64::regs::MSR_KERNEL_GS_BASE;

/// Errors while saving or restoring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {vcpu}: {what} failed: {source}")]
    Kvm {
        vcpu: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM saved {saved} of {wanted} MSRs; MSR {index:#x} could not be {verb}")]
    PartialMsrs {
        vcpu: u8,
        saved: usize,
        wanted: usize,
        index: u32,
        verb: &'static str,
    },
    #[error("cannot build the MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
}

/// MSRs that are not in KVM's index list but that a running Linux guest depends on.
const EXTRA_MSRS: &[u32] = &[];

/// Everything KVM holds for one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<(u32, u64)>,
    pub events: kvm_vcpu_events,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The MSRs to save: KVM's list of MSRs it saves and restores, plus `EXTRA_MSRS`.
pub fn msr_indices(kvm: &Kvm) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|source| VcpuStateError::Kvm {
            vcpu: 0,
            what: "KVM_GET_MSR_INDEX_LIST",
            source,
        })?;
    let mut v: Vec<u32> = list.as_slice().to_vec();
    v.extend_from_slice(EXTRA_MSRS);
    v.sort_unstable();
    v.dedup();
    Ok(v)
}

fn kvm_err(vcpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { vcpu, what, source }
}

/// Reads the MSRs in `indices` that this vCPU has. KVM stops at the first MSR it cannot
/// read; that one is skipped and the rest are read again, so the result is every readable
/// MSR of the list.
fn read_msrs(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, VcpuStateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::MsrList)?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm_err(vcpu, "KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        if n < rest.len() {
            tracing::debug!("vCPU {vcpu}: MSR {:#x} is not readable; skipped", rest[n]);
            rest = &rest[n + 1..];
        } else {
            rest = &[];
        }
    }
    Ok(out)
}

/// Saves a vCPU that is outside `KVM_RUN` (paused).
pub fn save(fd: &VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    // Events first: KVM_GET_VCPU_EVENTS reports pending exceptions/interrupts that the other
    // reads do not change.
    let events = fd
        .get_vcpu_events()
        .map_err(kvm_err(id, "KVM_GET_VCPU_EVENTS"))?;
    let mp_state = fd.get_mp_state().map_err(kvm_err(id, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm_err(id, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm_err(id, "KVM_GET_XCRS"))?;
    let debugregs = fd
        .get_debug_regs()
        .map_err(kvm_err(id, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err(id, "KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, id, msr_indices)?;
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        xsave: xsave.region.to_vec(),
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// The part of a paused vCPU's state that reading the guest kernel needs: general and
/// special registers and `MSR_KERNEL_GS_BASE` (three ioctls, against the dozen of a
/// full [`save`]; a live patch's stop-the-world check reads this on every attempt).
/// After an I/O exit the registers are those of the exit (the access not yet
/// completed); RIP and the stack registers are what the check needs, and they are
/// the same either way.
#[derive(Debug, Clone, Copy)]
pub struct KernelView {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub kernel_gs_base: u64,
}

/// Reads a [`KernelView`] of a paused vCPU.
pub fn read_kernel_view(fd: &VcpuFd, id: u8) -> Result<KernelView, VcpuStateError> {
    let regs = fd.get_regs().map_err(kvm_err(id, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err(id, "KVM_GET_SREGS"))?;
    let kernel_gs_base = read_msrs(fd, id, &[MSR_KERNEL_GS_BASE])?
        .first()
        .map_or(0, |(_, v)| *v);
    Ok(KernelView {
        regs,
        sregs,
        kernel_gs_base,
    })
}

/// Restores a saved vCPU into a fresh one whose CPUID is already set (the same template).
/// The order follows KVM's dependencies: sregs before MSRs (EFER), LAPIC before the
/// events and MP state that refer to it, and the vCPU events last.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), VcpuStateError> {
    let id = state.id;
    fd.set_sregs(&state.sregs)
        .map_err(kvm_err(id, "KVM_SET_SREGS"))?;
    fd.set_regs(&state.regs)
        .map_err(kvm_err(id, "KVM_SET_REGS"))?;
    let mut xsave = kvm_xsave::default();
    let n = xsave.region.len().min(state.xsave.len());
    xsave.region[..n].copy_from_slice(&state.xsave[..n]);
    // SAFETY: `xsave` is a KVM_GET_XSAVE image of a vCPU of the same CPU template, so it
    // describes only state components this vCPU supports.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm_err(id, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs)
        .map_err(kvm_err(id, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm_err(id, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic)
        .map_err(kvm_err(id, "KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(VcpuStateError::MsrList)?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err(id, "KVM_SET_MSRS"))?;
    if n < entries.len() {
        return Err(VcpuStateError::PartialMsrs {
            vcpu: id,
            saved: n,
            wanted: entries.len(),
            index: entries[n].index,
            verb: "restored",
        });
    }
    fd.set_mp_state(state.mp_state)
        .map_err(kvm_err(id, "KVM_SET_MP_STATE"))?;
    fd.set_vcpu_events(&state.events)
        .map_err(kvm_err(id, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Finishes an I/O access the vCPU exited for (KVM completes it on the next `KVM_RUN`),
/// without running guest code: `KVM_RUN` with `immediate_exit` set. Call this on a paused
/// vCPU before [`save`], so the saved state has no half-done instruction.
pub fn complete_pending_io(fd: &mut VcpuFd, id: u8) -> Result<(), VcpuStateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Ok(()) => Ok(()),
        Err(source) => Err(VcpuStateError::Kvm {
            vcpu: id,
            what: "KVM_RUN (completing pending I/O)",
            source,
        }),
    }
}
