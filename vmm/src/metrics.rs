//! Counters the VMM keeps while the VM runs, read through the control socket
//! (`{"op":"metrics"}`); the node agent exports them to Prometheus.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quantix_devices::legacy::serial::SerialCounters;
use quantix_virtio::vsock::VsockCounters;
use serde::Serialize;

use crate::cpu::VcpuCounters;

/// Live handles on every counter of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmMetrics {
    /// Per vCPU, in index order.
    pub vcpus: Vec<Arc<VcpuCounters>>,
    /// COM1.
    pub serial: Arc<SerialCounters>,
    /// The vsock device, if any.
    pub vsock: Option<Arc<VsockCounters>>,
}

/// One vCPU's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SerialSample {
    /// Bytes the guest wrote that reached the sink.
    pub tx_bytes: u64,
    /// Bytes the sink failed to take.
    pub tx_lost_bytes: u64,
    /// Bytes the guest read.
    pub rx_bytes: u64,
}

/// The vsock device's counters at one moment (see `VsockCounters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockSample {
    /// Packets from the guest.
    pub tx_packets: u64,
    /// Payload bytes from the guest.
    pub tx_bytes: u64,
    /// Packets to the guest.
    pub rx_packets: u64,
    /// Payload bytes to the guest.
    pub rx_bytes: u64,
    /// Malformed guest packets.
    pub invalid_packets: u64,
    /// Guest packets for unknown connections.
    pub unknown_conn_packets: u64,
    /// Guest data beyond its credit.
    pub credit_violations: u64,
    /// Packets for the guest that were lost.
    pub rx_dropped: u64,
    /// RSTs sent.
    pub rst_sent: u64,
    /// Connections opened.
    pub conns_opened: u64,
    /// Guest connections refused.
    pub conns_refused: u64,
    /// Host connections rejected.
    pub host_rejected: u64,
    /// Host connections the guest did not answer in time.
    pub connect_timeouts: u64,
    /// Corrupt queues.
    pub queue_errors: u64,
}

impl VsockSample {
    fn of(c: &VsockCounters) -> Self {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        VsockSample {
            tx_packets: load(&c.tx_packets),
            tx_bytes: load(&c.tx_bytes),
            rx_packets: load(&c.rx_packets),
            rx_bytes: load(&c.rx_bytes),
            invalid_packets: load(&c.invalid_packets),
            unknown_conn_packets: load(&c.unknown_conn_packets),
            credit_violations: load(&c.credit_violations),
            rx_dropped: load(&c.rx_dropped),
            rst_sent: load(&c.rst_sent),
            conns_opened: load(&c.conns_opened),
            conns_refused: load(&c.conns_refused),
            host_rejected: load(&c.host_rejected),
            connect_timeouts: load(&c.connect_timeouts),
            queue_errors: load(&c.queue_errors),
        }
    }
}

/// All counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsSample {
    /// Per vCPU.
    pub vcpus: Vec<VcpuSample>,
    /// COM1.
    pub serial: SerialSample,
    /// The vsock device (absent without one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockSample>,
}

impl VmMetrics {
    /// Reads every counter.
    pub fn sample(&self) -> MetricsSample {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        MetricsSample {
            vcpus: self
                .vcpus
                .iter()
                .enumerate()
                .map(|(index, c)| VcpuSample {
                    index,
                    exits: load(&c.exits),
                    io_exits: load(&c.io),
                    mmio_exits: load(&c.mmio),
                    unclaimed_accesses: load(&c.unclaimed),
                })
                .collect(),
            serial: SerialSample {
                tx_bytes: load(&self.serial.tx_bytes),
                tx_lost_bytes: load(&self.serial.tx_lost),
                rx_bytes: load(&self.serial.rx_reads),
            },
            vsock: self.vsock.as_deref().map(VsockSample::of),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_the_live_counters() {
        let m = VmMetrics {
            vcpus: vec![Arc::default(), Arc::default()],
            serial: Arc::default(),
            vsock: Some(Arc::default()),
        };
        if let Some(v) = &m.vsock {
            v.invalid_packets.fetch_add(2, Ordering::Relaxed);
        }
        m.vcpus[1].exits.fetch_add(3, Ordering::Relaxed);
        m.vcpus[1].io.fetch_add(2, Ordering::Relaxed);
        m.serial.tx_bytes.fetch_add(7, Ordering::Relaxed);
        let s = m.sample();
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(
            (s.vcpus[1].index, s.vcpus[1].exits, s.vcpus[1].io_exits),
            (1, 3, 2)
        );
        assert_eq!(s.vcpus[0].exits, 0);
        assert_eq!(s.serial.tx_bytes, 7);
        assert_eq!(s.vsock.map(|v| v.invalid_packets), Some(2));
    }
}
