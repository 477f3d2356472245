//! The VMM's counters at one moment: the reply to the control socket's `metrics` op, which
//! the node agent exports to Prometheus. Counters only grow while a VMM runs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One vCPU's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSample {
    /// vCPU index.
    pub index: usize,
    /// Exits to user space.
    pub exits: u64,
    /// Port I/O exits.
    pub io_exits: u64,
    /// MMIO exits.
    pub mmio_exits: u64,
    /// Accesses no device claimed.
    pub unclaimed_accesses: u64,
}

/// The serial port's counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SerialSample {
    /// Bytes the guest wrote that reached the sink.
    pub tx_bytes: u64,
    /// Bytes the sink failed to take.
    pub tx_lost_bytes: u64,
    /// Bytes the guest read.
    pub rx_bytes: u64,
    /// Bytes of `tx_bytes` written without an exit (coalesced by KVM).
    pub tx_coalesced_bytes: u64,
}

/// One virtio device's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSample {
    /// Its name (blk0, net0, console, rng).
    pub name: String,
    /// Its kind (block, net, console, rng, vsock).
    #[serde(rename = "type")]
    pub kind: String,
    /// How often it found a queue unusable and asked the driver for a reset.
    pub needs_reset_events: u64,
    /// Its own counters, by name (see docs/devices.md).
    pub counters: BTreeMap<String, u64>,
}

/// A serial or console endpoint's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointSample {
    /// serial or console.
    pub device: String,
    /// Output bytes nobody read (pty, socket).
    pub dropped_bytes: u64,
    /// Socket clients accepted.
    pub connections: u64,
    /// What the newest socket client was sent first (absent from a VMM before protocol 2,
    /// and until a client connects).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<ClientReplay>,
}

/// How the newest socket client's byte stream begins: every client first gets the
/// endpoint's history (the newest [`HISTORY_BYTES`] of output), then the live output.
/// Offsets count every byte the device ever wrote, so a client that reconnects can tell
/// which of the replayed bytes it has already seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientReplay {
    /// Which accepted connection this is (1 for the first), to match `connections`.
    pub connection: u64,
    /// The offset in the device's output of the client's first byte.
    pub start_offset: u64,
    /// How many of the client's first bytes are history (written before it connected).
    pub replayed_bytes: u64,
}

/// The output history a serial or console socket keeps and replays to each new client.
pub const HISTORY_BYTES: usize = 64 * 1024;

/// All counters at one moment. A part an older VMM does not report reads as empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct MetricsSample {
    /// Per vCPU.
    pub vcpus: Vec<VcpuSample>,
    /// COM1.
    pub serial: SerialSample,
    /// Per virtio device.
    pub devices: Vec<DeviceSample>,
    /// Per character device endpoint.
    pub endpoints: Vec<EndpointSample>,
    /// Log lines the guest triggered, per kind: events and lines left out by the rate limit.
    pub guest_log: Vec<GuestLogSample>,
}

/// One kind of guest-triggered log line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLogSample {
    /// The kind (virtio-features, disk-io-error...).
    pub kind: String,
    /// Events seen.
    pub events: u64,
    /// Events whose line was not logged.
    pub suppressed: u64,
}
