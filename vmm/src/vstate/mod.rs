//! KVM objects: the VM, its vCPUs, and why the VM stopped.

pub mod exit;
pub mod parked_cpus;
pub mod pause;
pub mod vcpu;
pub mod vm;
