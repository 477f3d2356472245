//! Counters the VMM keeps while the VM runs, read through the control socket
//! (`{"op":"metrics"}`); the node agent exports them to Prometheus.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quantix_devices::legacy::serial::SerialCounters;
use serde::Serialize;

use crate::cpu::VcpuCounters;

/// Live handles on every counter of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmMetrics {
    /// Per vCPU, in index order.
    pub vcpus: Vec<Arc<VcpuCounters>>,
    /// COM1.
    pub serial: Arc<SerialCounters>,
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

/// All counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsSample {
    /// Per vCPU.
    pub vcpus: Vec<VcpuSample>,
    /// COM1.
    pub serial: SerialSample,
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
        };
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
    }
}
