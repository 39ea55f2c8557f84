//! KVM objects: the VM, its vCPUs, and why the VM stopped.

pub mod exit;
pub mod pause;
pub mod vcpu;
pub mod vm;
