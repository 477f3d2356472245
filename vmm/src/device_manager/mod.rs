//! The devices of a VM, owned in one place under stable ids.
//!
//! Every device (the UART, the i8042, the ACPI power-management port, the power button
//! and each virtio device) is attached once, under a [`DeviceId`] derived from the VM's
//! configuration alone, so that the same configuration gives the same ids on the host
//! that saves a VM and on the one that restores it. Each device has one lifecycle
//! interface ([`Lifecycle`]): pause (its own activity stops; a disk completes the
//! requests in flight), resume, save (its state as a JSON value) and restore. The
//! [`DeviceManager`] walks them in attach order to pause and save, and in reverse to
//! resume; a saved VM's device states must match its devices id for id.
//!
//! Building happens in two phases: a [`DeviceSetup`] attaches devices and lays out the
//! port I/O and MMIO buses; [`DeviceSetup::finish`] freezes the buses (vCPU threads
//! share them) into the [`DeviceManager`] that the running VM keeps.

pub mod coalesced;
pub mod legacy;
pub mod power_button;
pub mod virtio;
pub mod vmgenid;

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use quantix_devices::{Bus, BusDevice, BusError};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::acpi::VirtioMmioDesc;
use crate::cpu::IoBuses;
use legacy::Uart;
use virtio::DeviceMetrics;

/// A device's stable name: its kind and its name within the kind ("uart:com1",
/// "virtio-block:disk0").
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    /// The kind of device.
    pub kind: &'static str,
    /// Its name among devices of its kind.
    pub name: String,
}

impl DeviceId {
    /// The id of the `name` device of `kind`.
    pub fn new(kind: &'static str, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
        }
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.name)
    }
}

/// Why a device could not be attached, paused, saved or restored.
#[derive(Debug, Error)]
pub enum DeviceError {
    /// One device failed.
    #[error("device {id}: {reason}")]
    Device {
        /// The device.
        id: String,
        /// What went wrong.
        reason: String,
    },
    /// Two devices would have one id.
    #[error("two devices are named {0}")]
    DuplicateId(String),
    /// A saved VM lacks the state of one of this VM's devices.
    #[error("the saved state has no device {0}, which this VM has")]
    Missing(String),
    /// A saved VM has the state of a device this VM lacks.
    #[error("the saved state has a device {0}, which this VM does not have")]
    Unknown(String),
    /// A device's range collides with another's.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// More virtio devices than interrupt lines.
    #[error("{count} virtio devices asked for; at most {max} fit")]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
        /// Devices that fit.
        max: usize,
    },
    /// KVM refused to wire a device (an irqfd, an ioeventfd).
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A host resource (an eventfd) could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What every device of a VM can do besides answering the guest.
pub trait Lifecycle: Send {
    /// Stops the device's own activity (worker threads), completing what it started.
    /// Idempotent. A device that works only on vCPU threads has nothing to stop.
    fn pause(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Starts the device's own activity again after a pause.
    fn resume(&mut self) {}
    /// The device's state; the device is paused.
    fn save(&mut self) -> Result<serde_json::Value, String>;
    /// Takes a saved state into a device built from the same configuration, before the
    /// guest runs. The state is untrusted: every value is checked.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String>;
    /// What the device writes into guest memory for a boot (a restored or arriving VM's
    /// memory already holds it).
    fn boot(&mut self) -> Result<(), String> {
        Ok(())
    }
    /// Takes the state of the same VM arriving by live migration: as [`Lifecycle::restore`],
    /// but what marks a copy of a VM (the VM Generation ID) stays as it was.
    fn restore_migrated(&mut self, state: &serde_json::Value) -> Result<(), String> {
        self.restore(state)
    }
}

/// How saved device states come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// From a snapshot: a new copy of the VM.
    Restore,
    /// By live migration: the same VM, moved.
    Migration,
}

/// `restore` of a device with no state of its own: it saves `null` and accepts only that.
pub fn restore_stateless(state: &serde_json::Value) -> Result<(), String> {
    match state {
        serde_json::Value::Null => Ok(()),
        other => Err(format!("expected no state, found {other}")),
    }
}

/// One device's saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedDevice {
    /// Its id, as [`DeviceId`] displays it.
    pub id: String,
    /// What its [`Lifecycle::save`] returned.
    pub state: serde_json::Value,
}

type Managed = Arc<Mutex<dyn Lifecycle>>;

fn lock(device: &Managed) -> MutexGuard<'_, dyn Lifecycle + 'static> {
    // A device whose lock a panicking thread held is still the best state there is.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

/// A VM's devices while it is being built.
#[derive(Default)]
pub struct DeviceSetup {
    devices: Vec<(DeviceId, Managed)>,
    pio: Bus,
    mmio: Bus,
    virtio: Vec<VirtioMmioDesc>,
    metrics: Vec<DeviceMetrics>,
    uart: Option<Arc<Uart>>,
}

impl DeviceSetup {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn check_id(&self, id: &DeviceId) -> Result<(), DeviceError> {
        if self.devices.iter().any(|(other, _)| other == id) {
            return Err(DeviceError::DuplicateId(id.to_string()));
        }
        Ok(())
    }

    /// Attaches a device on the port I/O bus at `[base, base + len)`.
    pub fn add_pio<D: BusDevice + Lifecycle + 'static>(
        &mut self,
        id: DeviceId,
        device: Arc<Mutex<D>>,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.add_on_bus(false, id, device, base, len)
    }

    /// Attaches a device on the MMIO bus at `[base, base + len)`.
    pub fn add_mmio<D: BusDevice + Lifecycle + 'static>(
        &mut self,
        id: DeviceId,
        device: Arc<Mutex<D>>,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.add_on_bus(true, id, device, base, len)
    }

    fn add_on_bus<D: BusDevice + Lifecycle + 'static>(
        &mut self,
        mmio: bool,
        id: DeviceId,
        device: Arc<Mutex<D>>,
        base: u64,
        len: u64,
    ) -> Result<(), DeviceError> {
        self.check_id(&id)?;
        let bus = if mmio { &mut self.mmio } else { &mut self.pio };
        bus.insert(device.clone(), base, len)?;
        self.devices.push((id, device));
        Ok(())
    }

    /// Registers a device that is on no bus (the power button).
    pub fn add_offbus<D: Lifecycle + 'static>(
        &mut self,
        id: DeviceId,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError> {
        self.check_id(&id)?;
        self.devices.push((id, device));
        Ok(())
    }

    /// Records COM1, which the console's input and the coalescing of its writes reach.
    pub fn set_uart(&mut self, uart: Arc<Uart>) {
        self.uart = Some(uart);
    }

    /// Freezes the layout: the buses are shared with the vCPU threads from now on.
    pub fn finish(self) -> DeviceManager {
        DeviceManager {
            devices: self.devices,
            buses: IoBuses {
                pio: Arc::new(self.pio),
                mmio: Arc::new(self.mmio),
            },
            virtio: self.virtio,
            metrics: self.metrics,
            uart: self.uart,
        }
    }
}

/// A built VM's devices.
pub struct DeviceManager {
    devices: Vec<(DeviceId, Managed)>,
    buses: IoBuses,
    virtio: Vec<VirtioMmioDesc>,
    metrics: Vec<DeviceMetrics>,
    uart: Option<Arc<Uart>>,
}

impl fmt::Debug for DeviceManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceManager")
            .field("devices", &self.ids())
            .finish_non_exhaustive()
    }
}

impl DeviceManager {
    /// Every device's id, in attach order.
    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|(id, _)| id.to_string()).collect()
    }

    /// The buses the vCPUs dispatch their I/O exits to.
    pub fn buses(&self) -> IoBuses {
        self.buses.clone()
    }

    /// What the DSDT describes of the virtio devices.
    pub fn virtio_descs(&self) -> &[VirtioMmioDesc] {
        &self.virtio
    }

    /// Live handles on the virtio devices' counters.
    pub fn virtio_metrics(&self) -> &[DeviceMetrics] {
        &self.metrics
    }

    /// The UART (COM1), if the VM has one.
    pub fn uart(&self) -> Option<&Arc<Uart>> {
        self.uart.as_ref()
    }

    /// Pauses every device in attach order; on a failure, the devices already paused
    /// are resumed and the error names the device.
    pub fn pause(&self) -> Result<(), DeviceError> {
        for (i, (id, device)) in self.devices.iter().enumerate() {
            let result = lock(device).pause();
            if let Err(reason) = result {
                self.resume_first(i);
                return Err(DeviceError::Device {
                    id: id.to_string(),
                    reason,
                });
            }
        }
        Ok(())
    }

    fn resume_first(&self, count: usize) {
        for (_, device) in self.devices[..count].iter().rev() {
            lock(device).resume();
        }
    }

    /// Resumes every device, in reverse attach order.
    pub fn resume(&self) {
        self.resume_first(self.devices.len());
    }

    /// Lets every device write what a boot needs into guest memory ([`Lifecycle::boot`]).
    pub fn boot(&self) -> Result<(), DeviceError> {
        for (id, device) in &self.devices {
            lock(device).boot().map_err(|reason| DeviceError::Device {
                id: id.to_string(),
                reason,
            })?;
        }
        Ok(())
    }

    /// Every device's state, in attach order; the devices must be paused.
    pub fn save(&self) -> Result<Vec<SavedDevice>, DeviceError> {
        self.devices
            .iter()
            .map(|(id, device)| {
                let state = lock(device).save().map_err(|reason| DeviceError::Device {
                    id: id.to_string(),
                    reason,
                })?;
                Ok(SavedDevice {
                    id: id.to_string(),
                    state,
                })
            })
            .collect()
    }

    /// Takes saved states into this VM's devices (built from the same configuration):
    /// one state per device, no more and no fewer, checked before any is applied.
    pub fn restore(&self, saved: &[SavedDevice]) -> Result<(), DeviceError> {
        self.restore_as(saved, Arrival::Restore)
    }

    /// [`DeviceManager::restore`], for a VM that comes back as `arrival` says.
    pub fn restore_as(&self, saved: &[SavedDevice], arrival: Arrival) -> Result<(), DeviceError> {
        let ids = self.ids();
        for (i, s) in saved.iter().enumerate() {
            if !ids.contains(&s.id) {
                return Err(DeviceError::Unknown(s.id.clone()));
            }
            if saved[..i].iter().any(|other| other.id == s.id) {
                return Err(DeviceError::DuplicateId(s.id.clone()));
            }
        }
        if let Some(missing) = ids.iter().find(|id| !saved.iter().any(|s| &s.id == *id)) {
            return Err(DeviceError::Missing(missing.clone()));
        }
        for (id, device) in &self.devices {
            let name = id.to_string();
            let Some(state) = saved.iter().find(|s| s.id == name) else {
                return Err(DeviceError::Missing(name));
            };
            let mut d = lock(device);
            match arrival {
                Arrival::Restore => d.restore(&state.state),
                Arrival::Migration => d.restore_migrated(&state.state),
            }
            .map_err(|reason| DeviceError::Device { id: name, reason })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that records its lifecycle calls and holds one number as its state.
    #[derive(Default)]
    struct Probe {
        log: Arc<Mutex<Vec<String>>>,
        name: &'static str,
        value: u64,
        fail_pause: bool,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.value as u8);
        }
        fn write(&mut self, _: u64, data: &[u8]) {
            self.value = u64::from(data[0]);
        }
    }

    impl Lifecycle for Probe {
        fn pause(&mut self) -> Result<(), String> {
            self.log
                .lock()
                .unwrap()
                .push(format!("pause {}", self.name));
            if self.fail_pause {
                return Err("stuck".into());
            }
            Ok(())
        }
        fn resume(&mut self) {
            self.log
                .lock()
                .unwrap()
                .push(format!("resume {}", self.name));
        }
        fn save(&mut self) -> Result<serde_json::Value, String> {
            Ok(serde_json::json!(self.value))
        }
        fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
            self.value = state.as_u64().ok_or("not a number")?;
            Ok(())
        }
    }

    fn setup(
        log: &Arc<Mutex<Vec<String>>>,
        fail_b: bool,
    ) -> (DeviceManager, Vec<Arc<Mutex<Probe>>>) {
        let mut s = DeviceSetup::new();
        let probe = |name, fail_pause| {
            Arc::new(Mutex::new(Probe {
                log: log.clone(),
                name,
                fail_pause,
                ..Default::default()
            }))
        };
        let (a, b, c) = (probe("a", false), probe("b", fail_b), probe("c", false));
        s.add_pio(DeviceId::new("probe", "a"), a.clone(), 0x10, 1)
            .unwrap();
        s.add_mmio(DeviceId::new("probe", "b"), b.clone(), 0x1000, 0x100)
            .unwrap();
        s.add_offbus(DeviceId::new("other", "c"), c.clone())
            .unwrap();
        (s.finish(), vec![a, b, c])
    }

    #[test]
    fn devices_pause_in_order_resume_in_reverse_and_a_failure_undoes_the_pause() {
        let log = Arc::default();
        let (m, _) = setup(&log, false);
        assert_eq!(m.ids(), ["probe:a", "probe:b", "other:c"]);
        m.pause().unwrap();
        m.resume();
        assert_eq!(
            *log.lock().unwrap(),
            ["pause a", "pause b", "pause c", "resume c", "resume b", "resume a"]
        );

        let log = Arc::default();
        let (m, _) = setup(&log, true);
        let err = m.pause().unwrap_err();
        assert_eq!(err.to_string(), "device probe:b: stuck");
        assert_eq!(*log.lock().unwrap(), ["pause a", "pause b", "resume a"]);
    }

    #[test]
    fn states_round_trip_by_id_and_mismatched_sets_are_refused() {
        let log = Arc::default();
        let (m, probes) = setup(&log, false);
        // The buses reach the devices the manager owns.
        m.buses().pio.write(0x10, &[7]);
        m.buses().mmio.write(0x1000, &[9]);
        let saved = m.save().unwrap();
        assert_eq!(
            serde_json::to_string(&saved).unwrap(),
            r#"[{"id":"probe:a","state":7},{"id":"probe:b","state":9},{"id":"other:c","state":0}]"#
        );

        let (other, other_probes) = setup(&log, false);
        other.restore(&saved).unwrap();
        let values: Vec<u64> = other_probes
            .iter()
            .map(|p| p.lock().unwrap().value)
            .collect();
        assert_eq!(values, [7, 9, 0]);
        assert_eq!(probes[0].lock().unwrap().value, 7);

        let (fresh, fresh_probes) = setup(&log, false);
        let mut missing = saved.clone();
        missing.pop();
        assert!(
            matches!(fresh.restore(&missing), Err(DeviceError::Missing(id)) if id == "other:c")
        );
        let mut unknown = saved.clone();
        unknown[2].id = "other:d".into();
        assert!(
            matches!(fresh.restore(&unknown), Err(DeviceError::Unknown(id)) if id == "other:d")
        );
        let mut twice = saved.clone();
        twice.push(saved[0].clone());
        assert!(matches!(
            fresh.restore(&twice),
            Err(DeviceError::DuplicateId(_))
        ));
        // Nothing was applied by the refused restores.
        assert_eq!(fresh_probes[0].lock().unwrap().value, 0);
        let mut bad = saved.clone();
        bad[1].state = serde_json::json!("nine");
        assert_eq!(
            fresh.restore(&bad).unwrap_err().to_string(),
            "device probe:b: not a number"
        );
    }

    #[test]
    fn one_id_and_one_range_per_device() {
        let mut s = DeviceSetup::new();
        let d = || Arc::new(Mutex::new(Probe::default()));
        s.add_pio(DeviceId::new("probe", "a"), d(), 0x10, 2)
            .unwrap();
        assert!(matches!(
            s.add_pio(DeviceId::new("probe", "a"), d(), 0x20, 1),
            Err(DeviceError::DuplicateId(_))
        ));
        assert!(matches!(
            s.add_pio(DeviceId::new("probe", "b"), d(), 0x11, 1),
            Err(DeviceError::Bus(_))
        ));
    }
}
