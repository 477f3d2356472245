//! Serialisable device state, for snapshots and live migration.
//!
//! A device is saved in two layers. The transport ([`crate::mmio::MmioState`]) holds what
//! the driver negotiated: status, features, the queues' configuration and positions, and
//! the interrupt status. The device adds its own state as a JSON value: what it read from
//! its backend and had not delivered yet (a network frame, console input), and what must
//! match on restore (a disk's capacity, a card's MAC address). Every saved value is
//! untrusted on restore: queues are validated by virtio-queue, sizes and lengths checked.
//!
//! Saving needs a paused device: [`crate::VirtioDevice::pause`] stops its worker once
//! every request it started is complete, so no request is half done in a snapshot.

use serde::{Deserialize, Serialize};
use thiserror::Error;
use virtio_queue::{Queue, QueueState};

/// Why a state could not be saved or restored.
#[derive(Debug, Error)]
pub enum StateError {
    /// The saved state is for another kind of device or configuration.
    #[error("{0}")]
    Mismatch(String),
    /// A saved value is out of range or malformed.
    #[error("invalid saved state: {0}")]
    Invalid(String),
    /// The device's worker could not be stopped cleanly.
    #[error("device {0}: its worker thread ended abnormally; its state is lost")]
    WorkerLost(String),
}

/// The live state of one queue (virtio-queue's `QueueState`, serialisable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available ring entry the device reads.
    pub next_avail: u16,
    /// Next used ring entry the device writes.
    pub next_used: u16,
    /// Event index negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// Ready bit.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl QueueSnapshot {
    /// Of a live queue.
    pub fn of(queue: &Queue) -> Self {
        queue.state().into()
    }

    /// A queue with this state, validated (size a power of two within `max_size`...).
    pub fn to_queue(&self) -> Result<Queue, StateError> {
        let state = QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx_enabled,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| StateError::Invalid(format!("queue: {e:?}")))
    }
}

/// What a paused device returns.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Live positions of the queues the device was serving, by queue index.
    pub queues: Vec<(usize, QueueSnapshot)>,
    /// The device's own state.
    pub device: serde_json::Value,
}

/// Reads a device's own state saved as `T`.
pub fn from_value<T: serde::de::DeserializeOwned>(
    device: &str,
    value: &serde_json::Value,
) -> Result<T, StateError> {
    serde_json::from_value(value.clone()).map_err(|e| StateError::Invalid(format!("{device}: {e}")))
}

/// Saves a device's own state.
pub fn to_value<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_snapshots_round_trip_and_bad_ones_are_refused() {
        let mut q = Queue::new(256).unwrap();
        use virtio_queue::QueueT;
        q.set_size(64);
        q.set_next_avail(17);
        q.set_next_used(15);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_ready(true);
        let snap = QueueSnapshot::of(&q);
        let json = serde_json::to_string(&snap).unwrap();
        let back: QueueSnapshot = serde_json::from_str(&json).unwrap();
        let restored = back.to_queue().unwrap();
        assert_eq!(restored.state(), q.state());

        let mut bad = snap;
        bad.size = 100; // not a power of two
        assert!(bad.to_queue().is_err());
        let mut bad = snap;
        bad.size = 512; // larger than max_size
        assert!(bad.to_queue().is_err());
    }
}
