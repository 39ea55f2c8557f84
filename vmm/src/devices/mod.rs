//! Device models: the legacy PC devices the guest needs and virtio over MMIO.

pub mod acpi_power;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod text_guard;
pub mod virtio;
