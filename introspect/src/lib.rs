//! Guest kernel introspection: a pure library over guest-physical memory (and, for
//! later parts, a vCPU's registers), so the same code reads a live VM, a snapshot's
//! memory file or a raw dump. Layouts and algorithms: shared/reference/guest-introspection.md.

pub mod btf;
pub mod kallsyms;
pub mod kernel;
pub mod memory;
pub mod orc;
pub mod paging;
pub mod vmcoreinfo;
