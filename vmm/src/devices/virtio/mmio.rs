//! The virtio-mmio transport, version 2 ("modern", virtio 1.2 section 4.2.2).
//!
//! Register window (offsets from the slot base, all 32-bit registers below 0x100):
//!
//! ```text
//! 0x000 MagicValue  R   0x000 "virt"          0x050 QueueNotify      W
//! 0x004 Version     R   2                     0x060 InterruptStatus  R
//! 0x008 DeviceID    R                         0x064 InterruptACK     W
//! 0x00c VendorID    R                         0x070 Status           RW
//! 0x010 DeviceFeatures     R                  0x080/0x084 QueueDescLow/High     W
//! 0x014 DeviceFeaturesSel  W                  0x090/0x094 QueueDriverLow/High   W
//! 0x020 DriverFeatures     W                  0x0a0/0x0a4 QueueDeviceLow/High   W
//! 0x024 DriverFeaturesSel  W                  0x0ac SHMSel W, 0x0b0.. SHMLen/Base R
//! 0x030 QueueSel    W                         0x0fc ConfigGeneration R
//! 0x034 QueueNumMax R                         0x100.. device configuration space
//! 0x038 QueueNum    W
//! 0x044 QueueReady  RW
//! ```
//!
//! Malformed guest accesses (wrong width, misaligned, unknown offsets, writes at the wrong
//! time) are logged and ignored; reads of them return zeros. Nothing a guest does panics.

use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::persist::MmioSnapshot;
use super::{
    feature, status, VirtioDevice, VirtioInterrupt, INT_CONFIG_CHANGE, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::devices::bus::BusDevice;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio layout.
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported to the guest.
pub const MMIO_VENDOR_ID: u32 = 0;

/// Register offsets.
pub const REG_MAGIC_VALUE: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_SHM_SEL: u64 = 0x0ac;
pub const REG_SHM_LEN_LOW: u64 = 0x0b0;
pub const REG_SHM_LEN_HIGH: u64 = 0x0b4;
pub const REG_SHM_BASE_LOW: u64 = 0x0b8;
pub const REG_SHM_BASE_HIGH: u64 = 0x0bc;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Start of the device configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Offset of QueueNotify: register the queue ioeventfds at `slot_base + NOTIFY_REG_OFFSET`
/// with a 4-byte datamatch on the queue index.
pub const NOTIFY_REG_OFFSET: u64 = REG_QUEUE_NOTIFY;

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("the device has no queues")]
    NoQueues,
    #[error("queue {index}: invalid maximum size {size} (must be a power of two, 1..=32768)")]
    InvalidQueueSize { index: usize, size: u16 },
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    #[error("virtio-mmio snapshot does not fit the device: {0}")]
    SnapshotMismatch(String),
}

/// A virtio-mmio (version 2) register window in front of a [`VirtioDevice`].
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, whose queues live in `mem`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
    ) -> Result<Self, MmioError> {
        let (device_type, device_features, max_sizes) = {
            let dev = lock(&device);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes().to_vec(),
            )
        };
        if max_sizes.is_empty() {
            return Err(MmioError::NoQueues);
        }
        let queues = max_sizes
            .iter()
            .enumerate()
            .map(|(index, &size)| {
                Queue::new(size).map_err(|_| MmioError::InvalidQueueSize { index, size })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let interrupt = Arc::new(VirtioInterrupt::new().map_err(MmioError::EventFd)?);
        Ok(Self {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One notification eventfd per queue, to register as KVM ioeventfds at
    /// `slot_base + NOTIFY_REG_OFFSET` with datamatch = queue index (`u32`).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device interrupt; register `interrupt().irq_evt()` as a KVM irqfd.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The Status register.
    pub fn device_status(&self) -> u32 {
        self.status
    }

    /// The transport's state for a snapshot. The device's queues must not be moving: the
    /// vCPUs are paused and the device loop is idle.
    pub fn save_state(&self) -> MmioSnapshot {
        MmioSnapshot {
            device_type: self.device_type,
            device_features: self.device_features,
            device_features_sel: self.device_features_sel,
            driver_features: self.driver_features,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            device_queues: lock(&self.device)
                .active_queue_states()
                .into_iter()
                .map(Into::into)
                .collect(),
        }
    }

    /// A transport for `device` in the state `snap` describes. An active device is
    /// activated again on the queues it was working on, so in-flight ring positions carry
    /// over. Fails without side effects on the device when `snap` does not fit it.
    pub fn restore(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        snap: &MmioSnapshot,
    ) -> Result<Self, MmioError> {
        let mut t = Self::new(mem, device)?;
        if snap.device_type != t.device_type
            || snap.device_features != t.device_features
            || snap.queues.len() != t.queues.len()
        {
            return Err(MmioError::SnapshotMismatch(format!(
                "snapshot has device type {} with features {:#x} and {} queues, this device is \
                 type {} with features {:#x} and {} queues",
                snap.device_type,
                snap.device_features,
                snap.queues.len(),
                t.device_type,
                t.device_features,
                t.queues.len()
            )));
        }
        for (i, (q, s)) in t.queues.iter_mut().zip(&snap.queues).enumerate() {
            *q = Queue::try_from(QueueState::from(*s))
                .map_err(|e| MmioError::SnapshotMismatch(format!("queue {i}: {e}")))?;
        }
        t.device_features_sel = snap.device_features_sel;
        t.driver_features = snap.driver_features;
        t.driver_features_sel = snap.driver_features_sel;
        t.queue_sel = snap.queue_sel;
        t.status = snap.status;
        t.config_generation = snap.config_generation;
        let active = snap.status & status::DRIVER_OK != 0
            && snap.status & (status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        if active {
            let queues = snap
                .device_queues
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    Queue::try_from(QueueState::from(*s))
                        .map_err(|e| MmioError::SnapshotMismatch(format!("device queue {i}: {e}")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let evts = t
                .queue_evts
                .iter()
                .map(|e| e.try_clone().map_err(MmioError::EventFd))
                .collect::<Result<Vec<_>, _>>()?;
            lock(&t.device)
                .activate(
                    t.mem.clone(),
                    t.interrupt.clone(),
                    queues,
                    evts,
                    t.driver_features,
                )
                .map_err(|e| MmioError::SnapshotMismatch(format!("re-activation: {e}")))?;
        }
        if snap.interrupt_status != 0 {
            // Pending bits the driver has not acknowledged; pulsing the line again is
            // harmless (the driver reads InterruptStatus) and covers an edge lost in between.
            t.interrupt
                .trigger(snap.interrupt_status)
                .map_err(MmioError::EventFd)?;
        }
        Ok(t)
    }

    /// Announces a device configuration change to the driver: bumps ConfigGeneration and
    /// raises the configuration-change interrupt once the driver is running.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if self.status & status::DRIVER_OK != 0 {
            if let Err(e) = self.interrupt.trigger(INT_CONFIG_CHANGE) {
                tracing::warn!("virtio-mmio: cannot raise the config interrupt: {e}");
            }
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    /// The selected queue, if the driver may configure queues now: features negotiated,
    /// driver not yet running, device not failed.
    fn configurable_queue(&mut self, reg: u64) -> Option<&mut Queue> {
        let st = self.status;
        let allowed = st & status::FEATURES_OK != 0
            && st & (status::DRIVER_OK | status::FAILED | status::DEVICE_NEEDS_RESET) == 0;
        if !allowed {
            tracing::warn!(
                "virtio-mmio: queue register {reg:#x} written in status {st:#x}; ignored"
            );
            return None;
        }
        let sel = self.queue_sel;
        let q = self.queues.get_mut(sel as usize);
        if q.is_none() {
            tracing::warn!("virtio-mmio: queue register {reg:#x} written for missing queue {sel}");
        }
        q
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device_type,
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| q.max_size().into()),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| q.ready().into()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            REG_QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            REG_QUEUE_DRIVER_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            REG_QUEUE_DRIVER_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            REG_QUEUE_DEVICE_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            REG_QUEUE_DEVICE_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: a length of all-ones means "absent".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::warn!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES => {
                let st = self.status;
                if st & status::DRIVER == 0 || st & status::FEATURES_OK != 0 {
                    tracing::warn!(
                        "virtio-mmio: DriverFeatures written in status {st:#x}; ignored"
                    );
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    sel if v != 0 => {
                        tracing::warn!("virtio-mmio: driver acked features {v:#x} in word {sel}")
                    }
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.configurable_queue(offset) {
                    match u16::try_from(v).ok().filter(|&n| q.try_set_size(n).is_ok()) {
                        Some(_) => {}
                        None => tracing::warn!(
                            "virtio-mmio: invalid queue size {v} (max {})",
                            q.max_size()
                        ),
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.configurable_queue(offset) {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.configurable_queue(offset) {
                    set_queue_address(q, offset, v);
                }
            }
            REG_SHM_SEL => {}
            _ => tracing::warn!(
                "virtio-mmio: write of {v:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }

    /// A QueueNotify write that was not caught by an ioeventfd: signal the same eventfd.
    fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("virtio-mmio: cannot signal queue {index}: {e}");
                }
            }
            None => tracing::warn!("virtio-mmio: notification for missing queue {index}"),
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        // DEVICE_NEEDS_RESET belongs to the device; the driver cannot set or clear it.
        let requested = v & !status::DEVICE_NEEDS_RESET;
        let old_driver_bits = old & !status::DEVICE_NEEDS_RESET;
        if requested & old_driver_bits != old_driver_bits {
            tracing::warn!(
                "virtio-mmio: status {v:#x} clears bits of {old:#x} without a reset; ignored"
            );
            return;
        }
        let known = status::ACKNOWLEDGE
            | status::DRIVER
            | status::FEATURES_OK
            | status::DRIVER_OK
            | status::FAILED;
        if requested & !known != 0 {
            tracing::warn!(
                "virtio-mmio: unknown status bits {:#x} ignored",
                requested & !known
            );
        }
        if requested & status::FAILED != 0 {
            self.status |= status::FAILED;
        }
        // The initialization sequence: each step requires the previous one.
        let steps = [
            (status::ACKNOWLEDGE, 0),
            (status::DRIVER, status::ACKNOWLEDGE),
            (status::FEATURES_OK, status::DRIVER),
            (status::DRIVER_OK, status::FEATURES_OK),
        ];
        for (bit, prerequisite) in steps {
            if requested & bit == 0 || self.status & bit != 0 {
                continue;
            }
            if self.status & prerequisite != prerequisite {
                tracing::warn!(
                    "virtio-mmio: status bit {bit:#x} set out of order (status {:#x})",
                    self.status
                );
                return;
            }
            match bit {
                status::FEATURES_OK if !self.features_acceptable() => return,
                status::DRIVER_OK => {
                    if self.status & (status::FAILED | status::DEVICE_NEEDS_RESET) != 0 {
                        tracing::warn!("virtio-mmio: DRIVER_OK on a failed device ignored");
                        return;
                    }
                    self.status |= status::DRIVER_OK;
                    self.activate();
                }
                _ => self.status |= bit,
            }
        }
    }

    /// Whether the driver's feature selection can be accepted (FEATURES_OK).
    fn features_acceptable(&self) -> bool {
        let unknown = self.driver_features & !self.device_features;
        if unknown != 0 {
            tracing::warn!(
                "virtio-mmio: driver acked features {unknown:#x} the device does not offer"
            );
            return false;
        }
        if self.driver_features & feature(VIRTIO_F_VERSION_1) == 0 {
            tracing::warn!("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & feature(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => return self.activation_failed(&e.to_string()),
            }
        }
        for evt in &self.queue_evts {
            match evt.try_clone() {
                Ok(e) => evts.push(e),
                Err(e) => return self.activation_failed(&e.to_string()),
            }
        }
        let result = lock(&self.device).activate(
            self.mem.clone(),
            self.interrupt.clone(),
            queues,
            evts,
            self.driver_features,
        );
        if let Err(e) = result {
            self.activation_failed(&e.to_string());
        }
    }

    fn activation_failed(&mut self, why: &str) {
        tracing::warn!("virtio-mmio: device activation failed: {why}");
        self.status |= status::DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(INT_CONFIG_CHANGE) {
            tracing::warn!("virtio-mmio: cannot raise the config interrupt: {e}");
        }
    }

    /// Device reset: back to the state after creation (the eventfds stay).
    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }
}

fn set_queue_address(q: &mut Queue, reg: u64, v: u32) {
    let (current, high) = match reg {
        REG_QUEUE_DESC_LOW => (q.desc_table(), false),
        REG_QUEUE_DESC_HIGH => (q.desc_table(), true),
        REG_QUEUE_DRIVER_LOW => (q.avail_ring(), false),
        REG_QUEUE_DRIVER_HIGH => (q.avail_ring(), true),
        REG_QUEUE_DEVICE_LOW => (q.used_ring(), false),
        _ => (q.used_ring(), true),
    };
    let addr = if high {
        (current & 0xffff_ffff) | (u64::from(v) << 32)
    } else {
        (current & !0xffff_ffff) | u64::from(v)
    };
    let addr = vm_memory::GuestAddress(addr);
    let result = match reg {
        REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => q.try_set_desc_table_address(addr),
        REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => q.try_set_avail_ring_address(addr),
        _ => q.try_set_used_ring_address(addr),
    };
    if let Err(e) = result {
        tracing::warn!("virtio-mmio: register {reg:#x} = {v:#x}: {e}");
    }
}

fn lock(dev: &Arc<Mutex<dyn VirtioDevice>>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

fn valid_config_width(len: usize) -> bool {
    matches!(len, 1 | 2 | 4 | 8)
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !valid_config_width(data.len()) {
                tracing::warn!(
                    "virtio-mmio: {}-byte config read at {offset:#x}",
                    data.len()
                );
                data.fill(0);
                return;
            }
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            tracing::warn!(
                "virtio-mmio: {}-byte register read at {offset:#x}",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            if !valid_config_width(data.len()) {
                tracing::warn!(
                    "virtio-mmio: {}-byte config write at {offset:#x}",
                    data.len()
                );
                return;
            }
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!(
                "virtio-mmio: {}-byte register write at {offset:#x}",
                data.len()
            );
            return;
        };
        if offset & 3 != 0 {
            tracing::warn!("virtio-mmio: misaligned register write at {offset:#x}");
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{VirtioError, INT_USED_RING, VIRTIO_ID_BLOCK};
    use vm_memory::GuestAddress;

    /// What the dummy device saw.
    #[derive(Default)]
    struct Record {
        activations: Vec<(Vec<QueueSnapshot>, usize, u64)>,
        resets: usize,
        config_writes: Vec<(u64, Vec<u8>)>,
    }

    #[derive(Debug, PartialEq, Eq)]
    struct QueueSnapshot {
        size: u16,
        ready: bool,
        desc: u64,
        avail: u64,
        used: u64,
        event_idx: bool,
    }

    struct Dummy {
        record: Arc<Mutex<Record>>,
        max_sizes: Vec<u16>,
        fail_activate: bool,
        config: [u8; 12],
        active: Vec<QueueState>,
    }

    const DUMMY_FEATURES: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 0b101;

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn avail_features(&self) -> u64 {
            DUMMY_FEATURES
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.max_sizes
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = usize::try_from(offset)
                    .ok()
                    .and_then(|o| self.config.get(o + i).copied())
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            self.record
                .lock()
                .unwrap()
                .config_writes
                .push((offset, data.to_vec()));
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            interrupt: Arc<VirtioInterrupt>,
            queues: Vec<Queue>,
            queue_evts: Vec<EventFd>,
            acked_features: u64,
        ) -> Result<(), VirtioError> {
            if self.fail_activate {
                return Err(VirtioError::QueueNotReady(0));
            }
            let snaps = queues
                .iter()
                .map(|q| QueueSnapshot {
                    size: q.size(),
                    ready: q.ready(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    event_idx: q.event_idx_enabled(),
                })
                .collect();
            self.active = queues.iter().map(|q| q.state()).collect();
            // The device can raise interrupts through what it was given.
            interrupt.trigger(INT_USED_RING).unwrap();
            self.record
                .lock()
                .unwrap()
                .activations
                .push((snaps, queue_evts.len(), acked_features));
            Ok(())
        }
        fn reset(&mut self) {
            self.active.clear();
            self.record.lock().unwrap().resets += 1;
        }
        fn active_queue_states(&self) -> Vec<QueueState> {
            self.active.clone()
        }
    }

    fn transport_with(
        max_sizes: Vec<u16>,
        fail_activate: bool,
    ) -> (MmioTransport, Arc<Mutex<Record>>) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let record = Arc::new(Mutex::new(Record::default()));
        let dev = Dummy {
            record: record.clone(),
            max_sizes,
            fail_activate,
            config: *b"0123456789ab",
            active: Vec::new(),
        };
        (
            MmioTransport::new(mem, Arc::new(Mutex::new(dev))).unwrap(),
            record,
        )
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
        transport_with(vec![16, 8], false)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, REG_STATUS, status::ACKNOWLEDGE);
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        wr(t, REG_QUEUE_SEL, index);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, base as u32);
        wr(t, REG_QUEUE_DESC_HIGH, (base >> 32) as u32);
        wr(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        wr(t, REG_QUEUE_DRIVER_HIGH, 0);
        wr(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        wr(t, REG_QUEUE_DEVICE_HIGH, 0);
        wr(t, REG_QUEUE_READY, 1);
    }

    const DRIVER_OK_ALL: u32 =
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;

    #[test]
    fn virtio_mmio_snapshot_restores_registers_and_reactivates() {
        let (mut t, _) = transport();
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        wr(&mut t, REG_QUEUE_SEL, 1);
        let snap = t.save_state();
        assert_eq!(snap.device_queues.len(), 2);
        assert_eq!(snap.interrupt_status, INT_USED_RING);

        let (fresh, record) = transport_with(vec![16, 8], false);
        let mut r = MmioTransport::restore(fresh.mem.clone(), fresh.device.clone(), &snap).unwrap();
        assert_eq!(r.save_state(), snap);
        assert_eq!(rd(&mut r, REG_STATUS), DRIVER_OK_ALL);
        assert_eq!(rd(&mut r, REG_QUEUE_NUM_MAX), 8); // QueueSel 1 carried over
        assert_eq!(rd(&mut r, REG_INTERRUPT_STATUS), INT_USED_RING);
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations.len(), 1);
        assert_eq!(rec.activations[0].0[0].desc, 0x1_0000);
        assert_eq!(rec.activations[0].0[1].size, 8);
        assert_eq!(rec.activations[0].2, DUMMY_FEATURES);
    }

    #[test]
    fn virtio_mmio_snapshot_of_another_device_is_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, DUMMY_FEATURES);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        let snap = t.save_state();
        let (other, record) = transport_with(vec![16], false);
        let err = MmioTransport::restore(other.mem.clone(), other.device.clone(), &snap)
            .err()
            .expect("a one-queue device cannot take a two-queue snapshot")
            .to_string();
        assert!(
            err.contains("2 queues") && err.contains("1 queues"),
            "{err}"
        );
        assert!(record.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn virtio_mmio_identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), VIRTIO_ID_BLOCK);
        assert_eq!(rd(&mut t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 0);
        assert_eq!(rd(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        assert_eq!(rd(&mut t, REG_SHM_LEN_HIGH), u32::MAX);
        assert_eq!(t.queue_evts().len(), 2);
    }

    #[test]
    fn virtio_mmio_bad_accesses_are_ignored() {
        let (mut t, _) = transport();
        // Wrong widths and misaligned offsets read as zero.
        let mut b1 = [0xaa; 1];
        t.read(REG_MAGIC_VALUE, &mut b1);
        assert_eq!(b1, [0]);
        let mut b2 = [0xaa; 2];
        t.read(REG_VERSION, &mut b2);
        assert_eq!(b2, [0, 0]);
        let mut b8 = [0xaa; 8];
        t.read(REG_MAGIC_VALUE, &mut b8);
        assert_eq!(b8, [0; 8]);
        assert_eq!(rd(&mut t, REG_MAGIC_VALUE + 1), 0);
        // Unknown and write-only registers read as zero.
        assert_eq!(rd(&mut t, 0x0f0), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NOTIFY), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_ACK), 0);
        // Writes to read-only registers or with bad widths change nothing.
        wr(&mut t, REG_MAGIC_VALUE, 0);
        wr(&mut t, REG_DEVICE_ID, 7);
        t.write(REG_STATUS, &[status::ACKNOWLEDGE as u8]);
        t.write(REG_STATUS, &[1, 0, 0, 0, 0, 0, 0, 0]);
        wr(&mut t, REG_STATUS + 2, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, REG_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), VIRTIO_ID_BLOCK);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // Odd config widths and offsets far past the config space do not panic.
        let mut b3 = [0xaa; 3];
        t.read(CONFIG_SPACE_OFFSET, &mut b3);
        assert_eq!(b3, [0; 3]);
        t.write(CONFIG_SPACE_OFFSET, &[1, 2, 3]);
        assert_eq!(rd(&mut t, 0xffc), 0);
        t.read(u64::MAX - 3, &mut [0u8; 4]);
        t.write(u64::MAX - 3, &[0u8; 4]);
        t.read(0x40, &mut []);
        t.write(0x40, &[]);
    }

    #[test]
    fn virtio_mmio_feature_negotiation() {
        let (mut t, _) = transport();
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), DUMMY_FEATURES as u32);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            rd(&mut t, REG_DEVICE_FEATURES),
            (DUMMY_FEATURES >> 32) as u32
        );
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 2);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0);

        // Driver features before DRIVER are ignored.
        wr(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1 | 1);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
        );
        // Once FEATURES_OK is set, the features are frozen.
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(t.driver_features, 1 << VIRTIO_F_VERSION_1 | 1);
    }

    #[test]
    fn virtio_mmio_rejects_bad_feature_sets() {
        // A feature the device does not offer.
        let (mut t, _) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1 | 0b10);
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // A legacy driver (no VERSION_1).
        let (mut t, _) = transport();
        negotiate(&mut t, 1);
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // DRIVER_OK without FEATURES_OK does not activate.
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
    }

    #[test]
    fn virtio_mmio_status_must_follow_the_init_sequence() {
        let (mut t, record) = transport();
        // DRIVER before ACKNOWLEDGE.
        wr(&mut t, REG_STATUS, status::DRIVER);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        // Everything at once from zero stops at the first failing step (FEATURES_OK: no
        // VERSION_1 acked), so the device is not activated.
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // Clearing bits without a reset is ignored.
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        assert_eq!(rd(&mut t, REG_STATUS), status::ACKNOWLEDGE | status::DRIVER);
        // FAILED sticks and prevents activation.
        wr(&mut t, REG_DRIVER_FEATURES, 0);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::FAILED,
        );
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL | status::FAILED);
        assert_eq!(rd(&mut t, REG_STATUS) & status::DRIVER_OK, 0);
        assert!(record.lock().unwrap().activations.is_empty());
    }

    #[test]
    fn virtio_mmio_queue_setup_and_driver_ok_activates() {
        let (mut t, record) = transport();
        // Queue registers are ignored before FEATURES_OK.
        setup_queue(&mut t, 0, 8, 0x1_0000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);

        let features = 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_RING_F_EVENT_IDX;
        negotiate(&mut t, features);
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 8);
        wr(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        // Writes for a missing queue are ignored.
        wr(&mut t, REG_QUEUE_NUM, 4);
        wr(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);

        setup_queue(&mut t, 0, 8, 0x1_0000);
        // Invalid sizes (not a power of two, above the maximum, zero) and misaligned
        // addresses keep the previous values.
        wr(&mut t, REG_QUEUE_NUM, 6);
        wr(&mut t, REG_QUEUE_NUM, 32);
        wr(&mut t, REG_QUEUE_NUM, 0);
        wr(&mut t, REG_QUEUE_NUM, 0x1_0008);
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x1_0004);
        assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0x1_0000);
        assert_eq!(rd(&mut t, REG_QUEUE_DRIVER_LOW), 0x1_1000);
        assert_eq!(rd(&mut t, REG_QUEUE_DEVICE_LOW), 0x1_2000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        setup_queue(&mut t, 1, 4, 0x2_0000);

        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_eq!(rd(&mut t, REG_STATUS), DRIVER_OK_ALL);
        {
            let rec = record.lock().unwrap();
            assert_eq!(rec.activations.len(), 1);
            let (queues, evts, acked) = &rec.activations[0];
            assert_eq!(*evts, 2);
            assert_eq!(*acked, features);
            assert_eq!(
                queues[0],
                QueueSnapshot {
                    size: 8,
                    ready: true,
                    desc: 0x1_0000,
                    avail: 0x1_1000,
                    used: 0x1_2000,
                    event_idx: true
                }
            );
            assert_eq!(queues[1].size, 4);
            assert_eq!(queues[1].desc, 0x2_0000);
        }
        // The device raised an interrupt through the shared VirtioInterrupt.
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_USED_RING);
        assert_eq!(t.interrupt().irq_evt().read().unwrap(), 1);
        // Queue registers are frozen while the driver runs.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 4);
        wr(&mut t, REG_QUEUE_DESC_LOW, 0x5_0000);
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0x1_0000);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        // Setting DRIVER_OK again does not activate twice.
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_eq!(record.lock().unwrap().activations.len(), 1);
    }

    #[test]
    fn virtio_mmio_activation_failure_sets_needs_reset() {
        let (mut t, record) = transport_with(vec![16], true);
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_eq!(
            rd(&mut t, REG_STATUS),
            DRIVER_OK_ALL | status::DEVICE_NEEDS_RESET
        );
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        assert!(record.lock().unwrap().activations.is_empty());
        // The driver cannot clear NEEDS_RESET except by resetting.
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn virtio_mmio_queue_notify_signals_eventfd() {
        let (mut t, _) = transport();
        assert!(t.queue_evts()[1].read().is_err()); // nothing pending (EAGAIN)
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_evts()[1].read().unwrap(), 2);
        assert!(t.queue_evts()[0].read().is_err());
        // A notification for a missing queue is ignored.
        wr(&mut t, REG_QUEUE_NOTIFY, 2);
        wr(&mut t, REG_QUEUE_NOTIFY, u32::MAX);
        assert!(t.queue_evts()[0].read().is_err());
        assert!(t.queue_evts()[1].read().is_err());
    }

    #[test]
    fn virtio_mmio_interrupt_status_and_ack() {
        let (mut t, _) = transport();
        t.interrupt()
            .trigger(INT_USED_RING | INT_CONFIG_CHANGE)
            .unwrap();
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 3);
        wr(&mut t, REG_INTERRUPT_ACK, INT_USED_RING);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), INT_CONFIG_CHANGE);
        wr(&mut t, REG_INTERRUPT_ACK, INT_CONFIG_CHANGE);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        // InterruptStatus is read-only.
        wr(&mut t, REG_INTERRUPT_STATUS, 3);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn virtio_mmio_reset_on_status_zero() {
        let (mut t, record) = transport();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 8, 0x1_0000);
        setup_queue(&mut t, 1, 8, 0x2_0000);
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        assert_eq!(record.lock().unwrap().activations.len(), 1);

        wr(&mut t, REG_STATUS, 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        for q in 0..2 {
            wr(&mut t, REG_QUEUE_SEL, q);
            assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
            assert_eq!(rd(&mut t, REG_QUEUE_DESC_LOW), 0);
        }
        assert_eq!(t.driver_features, 0);
        // The device can be brought up again.
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, 16, 0x3_0000);
        setup_queue(&mut t, 1, 8, 0x4_0000);
        wr(&mut t, REG_STATUS, DRIVER_OK_ALL);
        let rec = record.lock().unwrap();
        assert_eq!(rec.activations.len(), 2);
        assert_eq!(rec.activations[1].0[0].size, 16);
        assert_eq!(rec.activations[1].0[0].desc, 0x3_0000);
        assert!(!rec.activations[1].0[0].event_idx);
    }

    #[test]
    fn virtio_mmio_config_space_forwarding() {
        let (mut t, record) = transport();
        let mut b = [0u8; 4];
        t.read(CONFIG_SPACE_OFFSET + 4, &mut b);
        assert_eq!(&b, b"4567");
        let mut b8 = [0u8; 8];
        t.read(CONFIG_SPACE_OFFSET, &mut b8);
        assert_eq!(&b8, b"01234567");
        let mut b1 = [0u8; 1];
        t.read(CONFIG_SPACE_OFFSET + 11, &mut b1);
        assert_eq!(&b1, b"b");
        // Past the end of the device's config space: zeros.
        t.read(CONFIG_SPACE_OFFSET + 10, &mut b);
        assert_eq!(&b, b"ab\0\0");
        t.write(CONFIG_SPACE_OFFSET + 2, &[9, 9]);
        assert_eq!(record.lock().unwrap().config_writes, vec![(2, vec![9, 9])]);
        // A config change bumps the generation; the interrupt waits for DRIVER_OK.
        t.config_changed();
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), 1);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
    }

    #[test]
    fn virtio_mmio_rejects_devices_without_valid_queues() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        for sizes in [vec![], vec![0], vec![3], vec![16, 65535]] {
            let dev = Dummy {
                record: Arc::default(),
                max_sizes: sizes,
                fail_activate: false,
                config: [0; 12],
                active: Vec::new(),
            };
            assert!(MmioTransport::new(mem.clone(), Arc::new(Mutex::new(dev))).is_err());
        }
    }

    #[test]
    fn virtio_mmio_random_accesses_never_panic() {
        let (mut t, _) = transport();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let r = next();
            let offset = if r & 1 == 0 {
                (r >> 8) % 0x1000
            } else {
                ((r >> 8) % 0x40) * 4
            };
            let len = [1usize, 2, 4, 8, 3][((r >> 4) % 5) as usize];
            let mut data = vec![0u8; len];
            if r & 2 == 0 {
                t.read(offset, &mut data);
            } else {
                let v = next();
                // Bias status writes towards the interesting values.
                let v = if offset == REG_STATUS && v & 1 == 0 {
                    (v >> 1) as u32 & 0xff
                } else {
                    v as u32
                };
                for (i, b) in data.iter_mut().enumerate() {
                    *b = (u64::from(v) >> (8 * (i % 4))) as u8;
                }
                t.write(offset, &data);
            }
        }
    }
}
