//! Device models: the legacy PC devices the guest needs and virtio over MMIO.

pub mod bus;
pub mod virtio;
