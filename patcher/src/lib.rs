//! `patcher`: live-patch bundles (manifest + compiled code), their builder and checks.
//! It reaches a VM only through a narrow trait that `vmm` implements (added with the
//! linker and the redirection planner).

pub mod build;
pub mod bundle;
pub mod consistency;
pub mod ledger;
pub mod linker;
pub mod manifest;
pub mod object_check;
pub mod redirect;
pub mod system_state;
pub mod target;
pub mod transition;
