//! Putting virtio devices on the VM: a virtio-mmio window and a GSI each, an irqfd for
//! the interrupt, and a KVM ioeventfd per queue on the QueueNotify register so that
//! notifications wake the device's worker thread without a trip through a vCPU thread.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use quantix_devices::Bus;
use quantix_virtio::mmio::{MmioTransport, QUEUE_NOTIFY};
use quantix_virtio::{GuestMemory, VirtioDevice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::VirtioMmioDesc;
use crate::layout::{VIRTIO_GSI_END, VIRTIO_GSI_START, VIRTIO_MMIO_START, VIRTIO_MMIO_STRIDE};
use crate::vm::VmError;

/// The virtio devices of a VM, as attached.
pub struct Attached {
    /// What the DSDT must describe.
    pub descs: Vec<VirtioMmioDesc>,
    /// Live handles on each device's counters, for the metrics.
    pub metrics: Vec<DeviceMetrics>,
    /// The transports, to pause and resume the devices.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// Attaches `devices` in order.
pub fn attach(
    vm: &VmFd,
    mem: &Arc<GuestMemory>,
    mmio: &mut Bus,
    devices: Vec<Box<dyn VirtioDevice>>,
) -> Result<Attached, VmError> {
    let available = (VIRTIO_GSI_END - VIRTIO_GSI_START + 1) as usize;
    if devices.len() > available {
        return Err(VmError::TooManyDevices {
            count: devices.len(),
            max: available,
        });
    }
    let mut descs = Vec::with_capacity(devices.len());
    let mut metrics = Vec::with_capacity(devices.len());
    let mut transports = Vec::with_capacity(devices.len());
    for (i, device) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_STRIDE;
        let gsi = VIRTIO_GSI_START + i as u32;
        let name = device.name().to_string();
        let host_err = |source| VmError::Host {
            what: "virtio device eventfd",
            source,
        };
        let irq = EventFd::new(EFD_NONBLOCK).map_err(host_err)?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| VmError::Kvm {
                op: "IRQFD (virtio)",
                source,
            })?;
        let transport = MmioTransport::new(device, mem.clone(), irq).map_err(host_err)?;
        for (q, evt) in transport.queue_evts().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(|source| VmError::Kvm {
                    op: "IOEVENTFD (virtio queue)",
                    source,
                })?;
        }
        let (counters, interrupt) = transport.metrics();
        metrics.push(DeviceMetrics {
            name: name.clone(),
            kind: type_name(transport.device_type()),
            counters,
            interrupt,
        });
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_STRIDE)?;
        transports.push(transport);
        tracing::info!(device = %name, base = format_args!("{base:#x}"), gsi, "virtio-mmio device attached");
        descs.push(VirtioMmioDesc { base, gsi });
    }
    Ok(Attached {
        descs,
        metrics,
        transports,
    })
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

fn type_name(device_type: u32) -> &'static str {
    use quantix_virtio::device_type as t;
    match device_type {
        t::BLOCK => "block",
        t::NET => "net",
        t::CONSOLE => "console",
        t::RNG => "rng",
        t::VSOCK => "vsock",
        _ => "other",
    }
}
