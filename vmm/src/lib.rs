//! `vmm`: a rust-vmm based virtual machine monitor that boots unmodified Linux
//! guests and (in later work) live-patches their kernels from the host.

pub mod api;
pub mod arch;
pub mod builder;
pub mod config;
pub mod console;
pub mod devices;
pub mod guest_image;
pub mod host_check;
pub mod introspection;
pub mod patching;
pub mod persist;
pub mod signals;
pub mod vstate;
