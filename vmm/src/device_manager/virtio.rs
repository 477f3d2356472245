//! Putting virtio devices on the VM: a virtio-mmio window and a GSI each, an irqfd for
//! the interrupt, and a KVM ioeventfd per queue on the QueueNotify register so that
//! notifications wake the device's worker thread without a trip through a vCPU thread.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use quantix_virtio::mmio::{MmioState, MmioTransport, QUEUE_NOTIFY};
use quantix_virtio::{GuestMemory, VirtioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, DeviceId, DeviceSetup, Lifecycle};
use crate::acpi::VirtioMmioDesc;
use crate::layout::{VIRTIO_GSI_END, VIRTIO_GSI_START, VIRTIO_MMIO_START, VIRTIO_MMIO_STRIDE};

/// How many virtio devices fit (one GSI each).
pub const MAX_DEVICES: usize = (VIRTIO_GSI_END - VIRTIO_GSI_START + 1) as usize;

impl DeviceSetup {
    /// Attaches a virtio device in the next virtio-mmio window, with the next GSI. Its
    /// id is its kind and its name ("virtio-block:disk0").
    pub fn add_virtio(
        &mut self,
        vm: &VmFd,
        mem: &Arc<GuestMemory>,
        device: Box<dyn VirtioDevice>,
    ) -> Result<(), DeviceError> {
        let i = self.virtio.len();
        if i >= MAX_DEVICES {
            return Err(DeviceError::TooManyDevices {
                count: i + 1,
                max: MAX_DEVICES,
            });
        }
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_STRIDE;
        let gsi = VIRTIO_GSI_START + i as u32;
        let name = device.name().to_string();
        let kind = type_name(device.device_type());
        let host_err = |source| DeviceError::Host {
            what: "virtio device eventfd",
            source,
        };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Kvm {
                op: "IRQFD (virtio)",
                source,
            })?;
        let transport = MmioTransport::new(device, mem.clone(), irq).map_err(host_err)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|source| DeviceError::Kvm {
                    op: "IOEVENTFD (virtio queue)",
                    source,
                })?;
        }
        let (counters, interrupt) = transport.metrics();
        let id = DeviceId::new(kind, name.clone());
        self.add_mmio(
            id,
            Arc::new(Mutex::new(transport)),
            base,
            VIRTIO_MMIO_STRIDE,
        )?;
        self.metrics.push(DeviceMetrics {
            name: name.clone(),
            kind: kind.strip_prefix("virtio-").unwrap_or(kind),
            counters,
            interrupt,
        });
        tracing::info!(device = %name, base = format_args!("{base:#x}"), gsi, "virtio-mmio device attached");
        self.virtio.push(VirtioMmioDesc { base, gsi });
        Ok(())
    }
}

/// The transport carries the device: its state holds the device's own (see
/// `quantix_virtio::state`).
impl Lifecycle for MmioTransport {
    fn pause(&mut self) -> Result<(), String> {
        MmioTransport::pause(self).map_err(|e| e.to_string())
    }
    fn resume(&mut self) {
        MmioTransport::resume(self);
    }
    fn save(&mut self) -> Result<serde_json::Value, String> {
        let state = MmioTransport::save(self).map_err(|e| e.to_string())?;
        serde_json::to_value(state).map_err(|e| e.to_string())
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let state: MmioState =
            serde_json::from_value(state.clone()).map_err(|e| format!("invalid state: {e}"))?;
        MmioTransport::restore(self, &state).map_err(|e| e.to_string())
    }
}

/// Live handles on one virtio device's counters.
#[derive(Clone)]
pub struct DeviceMetrics {
    /// Its name (blk0, net0, console, rng...).
    pub name: String,
    /// Its kind.
    pub kind: &'static str,
    /// Its own counters.
    pub counters: Arc<dyn quantix_virtio::CounterSet>,
    /// Its interrupt, which counts reset requests.
    pub interrupt: Arc<quantix_virtio::Interrupt>,
}

impl std::fmt::Debug for DeviceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMetrics")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

/// The id kind of a virtio device type.
fn type_name(device_type: u32) -> &'static str {
    use quantix_virtio::device_type as t;
    match device_type {
        t::BLOCK => "virtio-block",
        t::NET => "virtio-net",
        t::CONSOLE => "virtio-console",
        t::RNG => "virtio-rng",
        t::VSOCK => "virtio-vsock",
        _ => "virtio-other",
    }
}
