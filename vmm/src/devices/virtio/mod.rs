//! virtio devices, reached by the guest through the virtio-mmio (version 2) transport.
//!
//! * [`mmio::MmioTransport`] is the register window the guest driver programs; it sits on
//!   the MMIO bus and owns the virtqueue configuration until the driver sets `DRIVER_OK`.
//! * A device model ([`VirtioDevice`], e.g. [`block::Block`]) receives the queues, the guest
//!   memory and the interrupt on activation and then processes requests from the VMM event
//!   loop (it is also an `event_manager::MutEventSubscriber`).
//!
//! Interrupts: a device sets a bit in [`VirtioInterrupt`]'s status and writes its eventfd,
//! which the VMM registers as a KVM irqfd on the device's GSI. Queue notifications: the
//! transport owns one eventfd per queue, registered as KVM ioeventfds on the QueueNotify
//! register (datamatch = queue index); notifications that reach the transport through the
//! bus instead are forwarded to the same eventfds.
//!
//! [`attach_block`] wires a virtio-blk device into a VM in one call.

pub mod block;
pub mod mmio;
pub mod persist;

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::VIRTIO_MMIO_SLOT_SIZE;
use crate::devices::bus::{Bus, BusError};
use crate::vstate::vm::Vm;

pub use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
pub use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
pub use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
pub use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Device status bits (virtio 1.2, 2.1), as `u32` register values.
pub mod status {
    pub const ACKNOWLEDGE: u32 = super::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    pub const DRIVER: u32 = super::VIRTIO_CONFIG_S_DRIVER;
    pub const FEATURES_OK: u32 = super::VIRTIO_CONFIG_S_FEATURES_OK;
    pub const DRIVER_OK: u32 = super::VIRTIO_CONFIG_S_DRIVER_OK;
    pub const DEVICE_NEEDS_RESET: u32 = super::VIRTIO_CONFIG_S_NEEDS_RESET;
    pub const FAILED: u32 = super::VIRTIO_CONFIG_S_FAILED;
}

/// Interrupt status bit: the device used buffers in a virtqueue.
pub const INT_USED_RING: u32 = VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration (or status) changed.
pub const INT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Turns a feature bit number into a feature mask.
pub const fn feature(bit: u32) -> u64 {
    1u64 << bit
}

/// Errors of device activation and of wiring devices into a VM.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("the device expects {expected} queues, the transport handed over {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {0} was not made ready by the driver")]
    QueueNotReady(usize),
    #[error("queue {0} has rings outside guest memory")]
    QueueInvalid(usize),
    #[error("the device is already active")]
    AlreadyActive,
    #[error("cannot signal activation: {0}")]
    ActivateEvent(io::Error),
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] mmio::MmioError),
    #[error("virtio-blk: {0}")]
    Block(#[from] block::BlockError),
    #[error("cannot place the device on the MMIO bus: {0}")]
    Bus(#[from] BusError),
    #[error("cannot register the interrupt irqfd on GSI {gsi}: {source}")]
    Irqfd { gsi: u32, source: kvm_ioctls::Error },
    #[error("cannot register the ioeventfd of queue {queue} at {addr:#x}: {source}")]
    Ioeventfd {
        queue: usize,
        addr: u64,
        source: kvm_ioctls::Error,
    },
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register plus the eventfd
/// the VMM registers as a KVM irqfd (edge) on the device's GSI.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq_evt: EventFd,
}

impl VirtioInterrupt {
    /// A new interrupt with no pending bits and a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            irq_evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Sets `bits` (`INT_USED_RING` and/or `INT_CONFIG_CHANGE`) and pulses the interrupt line.
    pub fn trigger(&self, bits: u32) -> io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irq_evt.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The eventfd to register as an irqfd.
    pub fn irq_evt(&self) -> &EventFd {
        &self.irq_evt
    }
}

/// A device model behind a virtio-mmio transport.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_*`).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (constant for the device's lifetime).
    fn avail_features(&self) -> u64;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space at `offset`.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Called when the driver sets DRIVER_OK: hands over the guest memory, the interrupt,
    /// the configured queues, one notification eventfd per queue and the negotiated features.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
        queue_evts: Vec<EventFd>,
        acked_features: u64,
    ) -> Result<(), VirtioError>;
    /// Device reset (the driver wrote 0 to Status): drop the queues and return to the
    /// pre-activation state.
    fn reset(&mut self);
    /// The queues the device is working on since activation (ring positions included);
    /// empty when it is not active. Used by snapshots.
    fn active_queue_states(&self) -> Vec<virtio_queue::QueueState>;
}

/// The event manager type the VMM runs its devices on.
pub type SubscriberManager = EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;

/// Places `device` behind a virtio-mmio transport at `base` on `mmio_bus` (new, or in the
/// state `snapshot` describes), routes its interrupt to `gsi` (irqfd) and its queue
/// notifications to ioeventfds, and returns the transport.
///
/// The caller still has to add the device to the event loop (see [`attach_block`]).
pub fn attach_mmio_device(
    vm: &Vm,
    mmio_bus: &mut Bus,
    device: Arc<Mutex<dyn VirtioDevice>>,
    base: u64,
    gsi: u32,
    snapshot: Option<&persist::MmioSnapshot>,
) -> Result<Arc<Mutex<mmio::MmioTransport>>, VirtioError> {
    let transport = match snapshot {
        Some(snap) => mmio::MmioTransport::restore(vm.memory().clone(), device, snap)?,
        None => mmio::MmioTransport::new(vm.memory().clone(), device)?,
    };
    vm.fd()
        .register_irqfd(transport.interrupt().irq_evt(), gsi)
        .map_err(|source| VirtioError::Irqfd { gsi, source })?;
    let addr = base + mmio::NOTIFY_REG_OFFSET;
    for (queue, evt) in transport.queue_evts().iter().enumerate() {
        vm.fd()
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), queue as u32)
            .map_err(|source| VirtioError::Ioeventfd {
                queue,
                addr,
                source,
            })?;
    }
    let transport = Arc::new(Mutex::new(transport));
    mmio_bus.insert(transport.clone(), base, VIRTIO_MMIO_SLOT_SIZE)?;
    Ok(transport)
}

/// Creates a virtio-blk device for `file` (opened read-write unless `read_only`), places it
/// on the virtio-mmio slot at `base` with interrupt `gsi` (in the state `snapshot`
/// describes, if given), and adds it to `event_manager`.
/// The disk serial (GET_ID) is derived from the file name of `path`.
#[allow(clippy::too_many_arguments)]
pub fn attach_block(
    vm: &Vm,
    mmio_bus: &mut Bus,
    event_manager: &mut SubscriberManager,
    file: File,
    path: &Path,
    read_only: bool,
    base: u64,
    gsi: u32,
    snapshot: Option<&persist::MmioSnapshot>,
) -> Result<Arc<Mutex<mmio::MmioTransport>>, VirtioError> {
    let serial = block::serial_from_path(path);
    let blk = Arc::new(Mutex::new(block::Block::new(file, read_only, &serial)?));
    let transport = attach_mmio_device(vm, mmio_bus, blk.clone(), base, gsi, snapshot)?;
    event_manager.add_subscriber(blk);
    tracing::debug!(
        "virtio-blk {} at {base:#x}, GSI {gsi}{}",
        path.display(),
        if read_only { " (read-only)" } else { "" }
    );
    Ok(transport)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_interrupt_trigger_and_ack() {
        let irq = VirtioInterrupt::new().unwrap();
        assert_eq!(irq.status(), 0);
        irq.trigger(INT_USED_RING).unwrap();
        irq.trigger(INT_CONFIG_CHANGE).unwrap();
        assert_eq!(irq.status(), INT_USED_RING | INT_CONFIG_CHANGE);
        assert_eq!(irq.irq_evt().read().unwrap(), 2);
        irq.ack(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
        irq.ack(u32::MAX);
        assert_eq!(irq.status(), 0);
    }
}
