//! VM-wide state that lives in KVM: the in-kernel PIC pair and IOAPIC, the PIT, the clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors while saving or restoring VM-wide KVM state.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed: {source}")]
pub struct VmStateError {
    what: &'static str,
    source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { what, source }
}

/// The in-kernel devices and the clock of a paused VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip).map_err(err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the VM-wide state; every vCPU must be paused.
pub fn save(fd: &VmFd) -> Result<VmState, VmStateError> {
    let mut clock = fd.get_clock().map_err(err("KVM_GET_CLOCK"))?;
    // Only the value is restored; flags such as KVM_CLOCK_TSC_STABLE describe this host.
    clock.flags = 0;
    Ok(VmState {
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: fd.get_pit2().map_err(err("KVM_GET_PIT2"))?,
        clock,
    })
}

/// Restores the VM-wide state into a VM created with the same irqchip and PIT, before its
/// vCPUs are restored.
pub fn restore(fd: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    fd.set_pit2(&state.pit).map_err(err("KVM_SET_PIT2"))?;
    fd.set_clock(&state.clock).map_err(err("KVM_SET_CLOCK"))?;
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
