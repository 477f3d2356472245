//! The virtio-mmio transport (virtio 1.2, 4.2), version 2 ("modern") register layout.
//!
//! Each device has a 4 KiB window on the MMIO bus and one interrupt line; queue
//! notifications go through per-queue eventfds (KVM ioeventfds on the QueueNotify
//! register, with the queue index as data match).

use std::sync::Arc;

use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::state::{QueueSnapshot, StateError};
use crate::{status, ActivateContext, GuestMemory, Interrupt, VirtioDevice};
use quantix_devices::BusDevice;
use serde::{Deserialize, Serialize};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the QueueNotify register (where ioeventfds are registered).
pub const QUEUE_NOTIFY: u64 = 0x50;
const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5854_4e51; // "QNTX"
const CONFIG_START: u64 = 0x100;

/// One device on the MMIO bus.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: Arc<GuestMemory>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
    /// Set while paused for a snapshot: the device's own state.
    paused: Option<serde_json::Value>,
}

fn new_queues(device: &dyn VirtioDevice) -> Result<Vec<Queue>, virtio_queue::Error> {
    device
        .queue_max_sizes()
        .iter()
        .map(|max| Queue::new(*max))
        .collect()
}

impl MmioTransport {
    /// A transport for `device`, raising interrupts through `irq`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Arc<GuestMemory>,
        irq: EventFd,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref())
            .map_err(|e| std::io::Error::other(format!("invalid queue size: {e:?}")))?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            queues,
            queue_evts,
            interrupt: Arc::new(Interrupt::new(irq)),
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            paused: None,
        })
    }

    /// The queues' notification eventfds, to register with KVM as ioeventfds at
    /// `base + QUEUE_NOTIFY` with the queue index as data match.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        self.device.name()
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Live handles on the device's counters and on its interrupt (whose reset requests
    /// are counted too).
    pub fn metrics(&self) -> (Arc<dyn crate::CounterSet>, Arc<Interrupt>) {
        (self.device.metrics(), self.interrupt.clone())
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        // Queue layout may only change before the driver marks the device live.
        if self.status & status::DRIVER_OK != 0 {
            return;
        }
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        match new_queues(self.device.as_ref()) {
            Ok(q) => self.queues = q,
            Err(e) => warn!(device = self.device.name(), error = ?e, "cannot recreate queues"),
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.clear();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            debug!(device = self.device.name(), "driver reset the device");
            self.reset();
            return;
        }
        // Feature negotiation: the driver may accept only what was offered, and a
        // modern transport requires VERSION_1.
        if value & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let offered = self.device.features();
            let ok = self.driver_features & !offered == 0
                && self.driver_features & crate::features::VERSION_1 != 0;
            if !ok {
                quantix_devices::guest_warn!(
                    "virtio-features",
                    device = self.device.name(),
                    offered,
                    accepted = self.driver_features,
                    "driver accepted features that were not offered"
                );
                self.status = value & !status::FEATURES_OK;
                return;
            }
        }
        let becomes_live = value & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0;
        self.status = value;
        if becomes_live && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let name = self.device.name().to_string();
        if self.status & status::FEATURES_OK == 0 {
            quantix_devices::guest_warn!("virtio-status", device = %name, "DRIVER_OK without FEATURES_OK");
            self.needs_reset();
            return;
        }
        let event_idx = self.driver_features & crate::features::RING_EVENT_IDX != 0;
        for (i, q) in self.queues.iter_mut().enumerate() {
            q.set_event_idx(event_idx);
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                quantix_devices::guest_warn!("virtio-queue-config", device = %name, queue = i, "driver configured an invalid queue");
                self.needs_reset();
                return;
            }
        }
        let queue_evts = match self.queue_evts.iter().map(EventFd::try_clone).collect() {
            Ok(e) => e,
            Err(e) => {
                warn!(device = %name, error = %e, "cannot clone queue eventfds");
                self.needs_reset();
                return;
            }
        };
        // The device gets its own copies; the transport keeps the configuration it reports.
        let queues = match self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()).map(Some))
            .collect()
        {
            Ok(q) => q,
            Err(e) => {
                warn!(device = %name, error = ?e, "cannot hand the queues to the device");
                self.needs_reset();
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                info!(device = %name, features = format_args!("{:#x}", self.driver_features), "virtio device activated");
            }
            Err(e) => {
                quantix_devices::guest_warn!("virtio-activate", device = %name, error = %e, "virtio device activation failed");
                self.needs_reset();
            }
        }
    }

    fn needs_reset(&mut self) {
        self.status |= status::DEVICE_NEEDS_RESET;
        self.interrupt.signal_config();
    }

    fn read_register(&self, offset: u64) -> u32 {
        let q = self.queues.get(self.queue_sel as usize);
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.features();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => q.map_or(0, |q| u32::from(q.max_size())),
            0x44 => q.map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status(),
            0x70 => {
                if self.interrupt.needs_reset() {
                    self.status | status::DEVICE_NEEDS_RESET
                } else {
                    self.status
                }
            }
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x14 => self.device_features_sel = value,
            0x20 => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            0x24 => self.driver_features_sel = value,
            0x30 => self.queue_sel = value,
            0x38 => self.with_queue(|q| q.set_size(value as u16)),
            0x44 => self.with_queue(|q| q.set_ready(value == 1)),
            QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd in KVM; this is the fallback path.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    let _ = evt.write(1);
                }
            }
            0x64 => self.interrupt.ack(value),
            0x70 => self.set_status(value),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(value), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(value))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(value), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(value))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(value), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(value))),
            _ => debug!(
                device = self.device.name(),
                offset, "write to a read-only or unknown virtio-mmio register"
            ),
        }
    }
}

/// Everything a virtio-mmio device holds, for a snapshot (see [`crate::state`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmioState {
    /// The device's virtio type; restore refuses another kind of device.
    pub device_type: u32,
    /// The device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// Whether the device was serving its queues.
    pub activated: bool,
    /// Whether the device had found a queue broken and waits for the driver's reset.
    #[serde(default)]
    pub needs_reset: bool,
    /// Every queue: configuration and, for the queues the device served, live positions.
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state.
    pub device: serde_json::Value,
}

impl MmioTransport {
    /// Stops the device for a snapshot (see [`VirtioDevice::pause`]) and records the live
    /// positions of its queues. Idempotent; [`MmioTransport::resume`] serves again.
    pub fn pause(&mut self) -> Result<(), StateError> {
        if self.paused.is_some() {
            return Ok(());
        }
        let state = self.device.pause()?;
        for (index, snap) in &state.queues {
            let queue = snap.to_queue()?;
            match self.queues.get_mut(*index) {
                Some(q) => *q = queue,
                None => {
                    return Err(StateError::Invalid(format!(
                        "{}: the device reported queue {index} of {}",
                        self.device.name(),
                        self.queues.len()
                    )))
                }
            }
        }
        self.paused = Some(state.device);
        Ok(())
    }

    /// Serves again after [`MmioTransport::pause`], from where the queues stopped.
    pub fn resume(&mut self) {
        if self.paused.take().is_some() && self.activated {
            self.activated = false;
            self.activate();
        }
    }

    /// The state of a paused device.
    pub fn save(&self) -> Result<MmioState, StateError> {
        let device = self.paused.clone().ok_or_else(|| {
            StateError::Invalid(format!(
                "{}: save needs a paused device",
                self.device.name()
            ))
        })?;
        Ok(MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            needs_reset: self.interrupt.needs_reset(),
            queues: self.queues.iter().map(QueueSnapshot::of).collect(),
            device,
        })
    }

    /// Takes `state` into a new transport whose device was built from the same
    /// configuration and is not active yet; the device starts serving again where it
    /// stopped (after [`MmioTransport::resume`]). Every saved value is checked.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), StateError> {
        let name = self.device.name().to_string();
        if self.activated || self.status != 0 {
            return Err(StateError::Invalid(format!(
                "{name}: restore needs a device the driver has not touched"
            )));
        }
        if state.device_type != self.device.device_type() {
            return Err(StateError::Mismatch(format!(
                "{name}: saved as device type {}, configured as {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() {
            return Err(StateError::Mismatch(format!(
                "{name}: saved with {} queues, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        if state.driver_features & !self.device.features() != 0 {
            return Err(StateError::Mismatch(format!(
                "{name}: saved features {:#x} include some this device does not offer ({:#x})",
                state.driver_features,
                self.device.features()
            )));
        }
        let mut queues = Vec::with_capacity(state.queues.len());
        for (snap, max) in state.queues.iter().zip(self.device.queue_max_sizes()) {
            if snap.max_size != *max {
                return Err(StateError::Mismatch(format!(
                    "{name}: a queue saved with maximum size {}, the device offers {max}",
                    snap.max_size
                )));
            }
            let q = snap.to_queue()?;
            if q.ready() && !q.is_valid(self.mem.as_ref()) {
                return Err(StateError::Invalid(format!(
                    "{name}: a saved queue lies outside guest memory"
                )));
            }
            queues.push(q);
        }
        self.device.restore(&state.device)?;
        self.queues = queues;
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.restore(state.interrupt_status);
        self.interrupt.restore_needs_reset(state.needs_reset);
        // Serving starts at `resume`, like a paused device's.
        self.activated = state.activated;
        self.paused = Some(state.device.clone());
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        match <[u8; 4]>::try_from(&mut *data) {
            Ok(_) if offset.is_multiple_of(4) => {
                let v = self.read_register(offset);
                data.copy_from_slice(&v.to_le_bytes());
            }
            _ => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(bytes))
            }
            _ => debug!(
                device = self.device.name(),
                offset,
                len = data.len(),
                "ignored unaligned virtio-mmio register write"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{features, ActivateError};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<Mutex<Option<u64>>>,
    }

    impl VirtioDevice for Dummy {
        fn metrics(&self) -> Arc<dyn crate::CounterSet> {
            struct None;
            impl crate::CounterSet for None {
                fn sample(&self) -> Vec<(&'static str, u64)> {
                    Vec::new()
                }
            }
            Arc::new(None)
        }
        fn device_type(&self) -> u32 {
            crate::device_type::RNG
        }
        fn name(&self) -> &str {
            "dummy"
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | features::RING_EVENT_IDX
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::read_config_bytes(&[0xaa, 0xbb], offset, data);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            *self.activated.lock().unwrap() = Some(ctx.acked_features);
            Ok(())
        }
        fn reset(&mut self) {
            *self.activated.lock().unwrap() = None;
        }
        fn pause(&mut self) -> Result<crate::state::DeviceState, StateError> {
            Ok(crate::state::DeviceState::default())
        }
        fn restore(&mut self, _: &serde_json::Value) -> Result<(), StateError> {
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<u64>>>) {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let activated = Arc::new(Mutex::new(None));
        let dev = Dummy {
            activated: activated.clone(),
        };
        (
            MmioTransport::new(Box::new(dev), mem, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap(),
            activated,
        )
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport) {
        w(t, 0x30, 0);
        w(t, 0x38, 16);
        w(t, 0x80, 0x1000);
        w(t, 0x90, 0x2000);
        w(t, 0xa0, 0x3000);
        w(t, 0x44, 1);
    }

    #[test]
    fn identity_and_config() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, 0), MAGIC);
        assert_eq!(r(&mut t, 4), 2);
        assert_eq!(r(&mut t, 8), crate::device_type::RNG);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1 in the high word");
        assert_eq!(r(&mut t, 0x34), 16);
        let mut c = [0u8; 4];
        t.read(0x100, &mut c);
        assert_eq!(c, [0xaa, 0xbb, 0, 0]);
        // Unaligned and narrow register reads are zero, not garbage.
        let mut narrow = [0xffu8; 2];
        t.read(0x0, &mut narrow);
        assert_eq!(narrow, [0, 0]);
    }

    #[test]
    fn handshake_activates_with_the_accepted_features_and_reset_undoes_it() {
        let (mut t, activated) = transport();
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        setup_queue(&mut t);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), Some(features::VERSION_1));
        // Queue layout is frozen while live.
        w(&mut t, 0x38, 8);
        w(&mut t, 0x70, 0);
        assert_eq!(*activated.lock().unwrap(), None);
        assert_eq!(r(&mut t, 0x70), 0);
        assert_eq!(r(&mut t, 0x44), 0, "queues are reset too");
    }

    #[test]
    fn features_not_offered_are_refused() {
        let (mut t, activated) = transport();
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, 1 << 5); // not offered
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(r(&mut t, 0x70) & status::FEATURES_OK, 0);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), None);
    }

    #[test]
    fn a_queue_outside_guest_memory_sets_needs_reset() {
        let (mut t, activated) = transport();
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        setup_queue(&mut t);
        w(&mut t, 0x30, 0);
        // Reconfigure the used ring beyond the 1 MiB of memory (not live yet, so allowed).
        w(&mut t, 0xa0, 0xfff_f000);
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), None);
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, 0x60) & 2, 0, "config interrupt raised");
    }

    #[test]
    fn notify_register_falls_back_to_the_eventfd() {
        let (mut t, _) = transport();
        w(&mut t, QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().unwrap(), 1);
        // Out-of-range queue index: ignored.
        w(&mut t, QUEUE_NOTIFY, 7);
    }

    /// An entropy device serves two requests, is paused and saved; the state goes through
    /// JSON into a new transport and a new device, which serves the next request from the
    /// position where the first stopped.
    #[test]
    fn a_saved_device_continues_where_it_stopped_on_a_new_transport() {
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        const WRITE: u16 = 2;
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap());
        let vq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x1000), 16);
        let new_transport = || {
            MmioTransport::new(
                Box::new(crate::rng::Rng::new()),
                mem.clone(),
                EventFd::new(EFD_NONBLOCK).unwrap(),
            )
            .unwrap()
        };
        let mut t = new_transport();
        w(&mut t, 0x70, status::ACKNOWLEDGE | status::DRIVER);
        w(&mut t, 0x24, 1);
        w(&mut t, 0x20, 1); // VERSION_1
        w(
            &mut t,
            0x70,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 16);
        w(&mut t, 0x80, vq.desc_table_addr().0 as u32);
        w(&mut t, 0x90, vq.avail_addr().0 as u32);
        w(&mut t, 0xa0, vq.used_addr().0 as u32);
        w(&mut t, 0x44, 1);
        let live = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut t, 0x70, live);

        let wait_used = |n: u16| {
            let start = std::time::Instant::now();
            while vq.used().idx().load() < n {
                assert!(start.elapsed().as_secs() < 10, "used index stuck below {n}");
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        };
        vq.add_desc_chains(
            &[
                RawDescriptor::from(SplitDescriptor::new(0x8000, 32, WRITE, 0)),
                RawDescriptor::from(SplitDescriptor::new(0x9000, 32, WRITE, 0)),
            ],
            0,
        )
        .unwrap();
        w(&mut t, QUEUE_NOTIFY, 0);
        wait_used(2);

        t.pause().unwrap();
        let saved = t.save().unwrap();
        assert_eq!(saved.queues[0].next_avail, 2);
        assert_eq!(saved.queues[0].next_used, 2);
        assert!(saved.activated);
        let json = serde_json::to_string(&saved).unwrap();
        drop(t);

        let mut restored = new_transport();
        let state: MmioState = serde_json::from_str(&json).unwrap();
        restored.restore(&state).unwrap();
        assert_eq!(r(&mut restored, 0x70), live);
        restored.resume();
        vq.add_desc_chains(
            &[RawDescriptor::from(SplitDescriptor::new(
                0xa000, 32, WRITE, 0,
            ))],
            2,
        )
        .unwrap();
        w(&mut restored, QUEUE_NOTIFY, 0);
        wait_used(3);
        let entry = vq.used().ring().ref_at(2).unwrap().load();
        assert_eq!(
            (entry.id(), entry.len()),
            (2, 32),
            "the third request, served after restore"
        );
    }

    #[test]
    fn a_state_for_another_device_or_outside_memory_is_refused() {
        let (mut t, _) = transport();
        w(&mut t, 0x70, status::ACKNOWLEDGE);
        t.pause().unwrap();
        let saved = t.save().unwrap();

        let (mut fresh, _) = transport();
        let mut other = saved.clone();
        other.device_type = crate::device_type::BLOCK;
        assert!(matches!(
            fresh.restore(&other),
            Err(StateError::Mismatch(_))
        ));
        let mut more_queues = saved.clone();
        more_queues.queues.push(more_queues.queues[0]);
        assert!(matches!(
            fresh.restore(&more_queues),
            Err(StateError::Mismatch(_))
        ));
        let mut outside = saved.clone();
        outside.queues[0].size = 16;
        outside.queues[0].ready = true;
        outside.queues[0].desc_table = 1 << 40;
        assert!(fresh.restore(&outside).is_err());
        let mut bad_size = saved.clone();
        bad_size.queues[0].size = 3;
        assert!(fresh.restore(&bad_size).is_err());
        let mut features = saved;
        features.driver_features = 1 << 40;
        assert!(matches!(
            fresh.restore(&features),
            Err(StateError::Mismatch(_))
        ));
        // Nothing was taken from the refused states.
        assert_eq!(r(&mut fresh, 0x70), 0);
    }
}
