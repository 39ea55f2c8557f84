//! x86_64 boot, CPU and firmware-table support.

pub mod acpi;
pub mod boot;
pub mod cpu_template;
pub mod emulate;
pub mod layout;
pub mod regs;
