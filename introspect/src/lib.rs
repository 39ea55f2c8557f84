//! Guest kernel introspection: a pure library over two inputs, guest-physical memory
//! (`memory::GuestPhysMemory`) and vCPU registers (`cpu::Vcpus`), so the same code reads a
//! live VM, a snapshot's memory file or a raw dump. Layouts and algorithms: shared/reference/guest-introspection.md.

pub mod btf;
pub mod cpu;
pub mod guest;
pub mod host_code;
pub mod kallsyms;
pub mod kernel;
pub mod memory;
pub mod modules;
pub mod orc;
pub mod paging;
pub mod stacks;
pub mod tasks;
pub mod virt;
pub mod vmcoreinfo;
pub mod workers;
