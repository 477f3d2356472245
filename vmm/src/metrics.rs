//! Counters the VMM keeps while the VM runs, read through the control socket
//! (`{"op":"metrics"}`); the node agent exports them to Prometheus.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use quantix_devices::legacy::serial::SerialCounters;
pub use quantix_vmm_api::metrics::{
    DeviceSample, EndpointSample, GuestLogSample, MetricsSample, SerialSample, VcpuSample,
};

use crate::cpu::VcpuCounters;

/// Live handles on every counter of one VM.
#[derive(Debug, Clone, Default)]
pub struct VmMetrics {
    /// Per vCPU, in index order.
    pub vcpus: Vec<Arc<VcpuCounters>>,
    /// COM1.
    pub serial: Arc<SerialCounters>,
    /// Every virtio device, in attach order.
    pub devices: Vec<crate::device_manager::virtio::DeviceMetrics>,
    /// The host ends of the serial port and the console (pty or socket drops).
    pub endpoints: Vec<(&'static str, Arc<crate::chardev::ChardevCounters>)>,
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
                    kind: d.kind.to_string(),
                    needs_reset_events: d.interrupt.needs_reset_events(),
                    counters: d
                        .counters
                        .sample()
                        .into_iter()
                        .map(|(k, v)| (k.to_string(), v))
                        .collect(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|(device, c)| EndpointSample {
                    device: device.to_string(),
                    dropped_bytes: load(&c.dropped),
                    connections: load(&c.connections),
                    client: *c.client.lock().unwrap_or_else(|p| p.into_inner()),
                })
                .collect(),
            guest_log: quantix_devices::ratelimit::counts()
                .into_iter()
                .map(|(kind, events, suppressed)| GuestLogSample {
                    kind: kind.to_string(),
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
            devices: vec![crate::device_manager::virtio::DeviceMetrics {
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
