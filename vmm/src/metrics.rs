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
    /// Every virtio device, in attach order.
    pub devices: Vec<crate::virtio::DeviceMetrics>,
    /// The host ends of the serial port and the console (pty or socket drops).
    pub endpoints: Vec<(&'static str, Arc<crate::chardev::ChardevCounters>)>,
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
    /// Bytes of `tx_bytes` written without an exit (coalesced by KVM).
    pub tx_coalesced_bytes: u64,
}

/// One virtio device's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSample {
    /// Its name (blk0, net0, console, rng).
    pub name: String,
    /// Its kind (block, net, console, rng, vsock).
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// How often it found a queue unusable and asked the driver for a reset.
    pub needs_reset_events: u64,
    /// Its own counters, by name (see docs/devices.md).
    pub counters: std::collections::BTreeMap<&'static str, u64>,
}

/// A serial or console endpoint's counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EndpointSample {
    /// serial or console.
    pub device: &'static str,
    /// Output bytes nobody read (pty, socket).
    pub dropped_bytes: u64,
    /// Socket clients accepted.
    pub connections: u64,
}

/// All counters at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestLogSample {
    /// The kind (virtio-features, disk-io-error...).
    pub kind: &'static str,
    /// Events seen.
    pub events: u64,
    /// Events whose line was not logged.
    pub suppressed: u64,
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
                tx_coalesced_bytes: load(&self.serial.tx_coalesced),
            },
            devices: self
                .devices
                .iter()
                .map(|d| DeviceSample {
                    name: d.name.clone(),
                    kind: d.kind,
                    needs_reset_events: d.interrupt.needs_reset_events(),
                    counters: d.counters.sample().into_iter().collect(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|(device, c)| EndpointSample {
                    device,
                    dropped_bytes: load(&c.dropped),
                    connections: load(&c.connections),
                })
                .collect(),
            guest_log: quantix_devices::ratelimit::counts()
                .into_iter()
                .map(|(kind, events, suppressed)| GuestLogSample {
                    kind,
                    events,
                    suppressed,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_read_the_live_counters() {
        use quantix_virtio::VirtioDevice;
        let rng = quantix_virtio::rng::Rng::new();
        let interrupt = Arc::new(quantix_virtio::Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        ));
        let m = VmMetrics {
            vcpus: vec![Arc::default(), Arc::default()],
            serial: Arc::default(),
            devices: vec![crate::virtio::DeviceMetrics {
                name: "rng".into(),
                kind: "rng",
                counters: rng.metrics(),
                interrupt: interrupt.clone(),
            }],
            endpoints: vec![("serial", Arc::default())],
        };
        rng.counters().bytes.fetch_add(64, Ordering::Relaxed);
        interrupt.signal_needs_reset();
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
        assert_eq!(s.devices[0].counters["bytes"], 64);
        assert_eq!(s.devices[0].needs_reset_events, 1);
        assert_eq!(s.endpoints[0].dropped_bytes, 0);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["devices"][0]["type"], "rng");
    }
}
