//! Serializable state of a virtio-mmio transport and its queues, for snapshots.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// A virtqueue's driver-visible configuration and the device's ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx_enabled: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx_enabled: s.event_idx_enabled,
            next_avail: s.next_avail,
            next_used: s.next_used,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx_enabled: s.event_idx_enabled,
            next_avail: s.next_avail,
            next_used: s.next_used,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

/// The transport registers, the queues as the driver configured them, and the queues the
/// activated device is working on (empty when the device is not active).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSnapshot {
    pub device_type: u32,
    pub device_features: u64,
    pub device_features_sel: u32,
    pub driver_features: u64,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSnapshot>,
    pub device_queues: Vec<QueueSnapshot>,
}
