//! Virtio 1.x devices for the Quantix KVM hypervisor, and the virtio-mmio transport that
//! puts them on the VM's MMIO bus. See `docs/devices.md`.
//!
//! A device ([`VirtioDevice`]) offers features, a config space and queues; the transport
//! ([`mmio::MmioTransport`]) runs the driver's side of the handshake and, on DRIVER_OK,
//! hands the device its queues, their notification eventfds and an [`Interrupt`]. Devices
//! then serve their queues on a worker thread of their own ([`worker`]), never on a vCPU
//! thread. Everything a guest puts in a queue is untrusted: a malformed request fails
//! with the proper virtio status and is counted, it never panics the VMM.

pub mod block;
pub mod console;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod mmio;
pub mod net;
pub mod ratelimit;
pub mod rng;
pub mod state;
pub mod threads;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use thiserror::Error;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: with a dirty bitmap, so that every write a device
/// makes through vm-memory marks the guest pages it touched (for snapshots and live
/// migration; the guest's own writes are in KVM's dirty log).
pub type GuestMemory = GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// A reader of a descriptor chain in [`GuestMemory`].
pub type ChainReader<'a> =
    virtio_queue::Reader<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;
/// A writer of a descriptor chain in [`GuestMemory`] (its writes mark the pages dirty).
pub type ChainWriter<'a> =
    virtio_queue::Writer<'a, vm_memory::bitmap::BS<'a, vm_memory::bitmap::AtomicBitmap>>;

/// Virtio device types (virtio 1.2, 5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bits common to all devices.
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// Virtio 1.x (modern) device.
    pub const VERSION_1: u64 = 1 << 32;
}

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Interrupt status bits.
const INT_USED_RING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// The device's interrupt: the InterruptStatus register and the eventfd registered
/// with KVM as the irqfd of the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irq: EventFd,
    /// Set by a device that found its queues unusable (the transport then reports
    /// DEVICE_NEEDS_RESET in its status register until the driver resets it).
    needs_reset: std::sync::atomic::AtomicBool,
    /// How often that happened since the VM started.
    needs_reset_events: std::sync::atomic::AtomicU64,
}

impl Interrupt {
    /// An interrupt raised through `irq`.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
            needs_reset: Default::default(),
            needs_reset_events: Default::default(),
        }
    }

    /// Tells the driver that used buffers are ready.
    pub fn signal_used(&self) {
        self.raise(INT_USED_RING);
    }

    /// Tells the driver that the configuration changed (or that the device needs a reset).
    pub fn signal_config(&self) {
        self.raise(INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if let Err(e) = self.irq.write(1) {
            tracing::warn!(error = %e, "cannot raise a virtio interrupt");
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges the given bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The device cannot go on (a corrupt queue): DEVICE_NEEDS_RESET, and a configuration
    /// interrupt so that the driver looks (virtio 1.2, 2.1.2).
    pub fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.needs_reset_events.fetch_add(1, Ordering::Relaxed);
        self.signal_config();
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// How many times a device asked for a reset since the VM started.
    pub fn needs_reset_events(&self) -> u64 {
        self.needs_reset_events.load(Ordering::Relaxed)
    }

    /// Restores a saved needs-reset flag (not counted as a new event).
    pub fn restore_needs_reset(&self, needs_reset: bool) {
        self.needs_reset.store(needs_reset, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
    }

    /// Restores a saved InterruptStatus, raising the line again if a bit is pending (a
    /// level the driver had not acknowledged when the state was saved).
    pub fn restore(&self, status: u32) {
        let status = status & (INT_USED_RING | INT_CONFIG);
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            if let Err(e) = self.irq.write(1) {
                tracing::warn!(error = %e, "cannot raise a virtio interrupt");
            }
        }
    }
}

/// Why a device could not be activated.
#[derive(Debug, Error)]
pub enum ActivateError {
    /// The driver set up a queue badly (size, addresses outside guest memory).
    #[error("queue {0} is not valid")]
    InvalidQueue(usize),
    /// The device needs a queue the driver did not make ready.
    #[error("queue {0} was not made ready by the driver")]
    QueueNotReady(usize),
    /// A host resource could not be created (thread, eventfd).
    #[error("cannot start the device: {0}")]
    Host(#[from] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: Arc<GuestMemory>,
    /// The queues as the driver configured them; see [`ActivateContext::take_ready_queue`].
    pub queues: Vec<Option<Queue>>,
    /// One eventfd per queue, written when the driver notifies the queue.
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<Interrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
}

impl ActivateContext {
    /// Takes queue `index`, which the driver must have made ready.
    pub fn take_ready_queue(&mut self, index: usize) -> Result<Queue, ActivateError> {
        use virtio_queue::QueueT;
        let queue = self
            .queues
            .get_mut(index)
            .and_then(Option::take)
            .ok_or(ActivateError::QueueNotReady(index))?;
        if !queue.ready() {
            return Err(ActivateError::QueueNotReady(index));
        }
        Ok(queue)
    }
}

/// A device's counters, for the metrics: name and value pairs read at one moment.
pub trait CounterSet: Send + Sync {
    /// Every counter's current value.
    fn sample(&self) -> Vec<(&'static str, u64)>;
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Its counters (live: the handle keeps reading the device's atomics).
    fn metrics(&self) -> Arc<dyn CounterSet>;
    /// Its virtio device type ([`device_type`]).
    fn device_type(&self) -> u32;
    /// A short name for logs (e.g. "rng", "blk0").
    fn name(&self) -> &str;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features it offers.
    fn features(&self) -> u64;
    /// Reads its configuration space; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes its configuration space (most devices ignore it).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues (device reset by the driver) and returns to the
    /// pre-activation state.
    fn reset(&mut self);
    /// Stops serving for a snapshot, once every request the device started is completed,
    /// and returns the live positions of the queues it served and its own state (see
    /// [`state`]). Until the next [`VirtioDevice::activate`] the device touches neither
    /// guest memory nor its backend; whatever it read from the backend and could not
    /// deliver yet is kept, saved, and delivered after activation.
    fn pause(&mut self) -> Result<state::DeviceState, state::StateError>;
    /// Takes back the device's own state saved by [`VirtioDevice::pause`], on a new device
    /// built from the same configuration, before it is activated.
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), state::StateError>;
}

/// A queue the driver left in a state the device cannot serve.
#[derive(Debug, Error)]
pub enum QueueError {
    /// virtio-queue refused an access (ring outside guest memory...).
    #[error("virtio queue: {0:?}")]
    Queue(virtio_queue::Error),
    /// An entry of the available ring could not be read.
    #[error("an available ring entry is unreadable")]
    AvailRingUnreadable,
    /// The available index claims more new buffers than the queue holds.
    #[error("available index {avail} is {pending} entries ahead of {next}, more than the queue size {size}")]
    AvailIndex {
        /// The driver's available index.
        avail: u16,
        /// The device's next index.
        next: u16,
        /// The difference.
        pending: u16,
        /// The queue size.
        size: u16,
    },
}

impl From<virtio_queue::Error> for QueueError {
    fn from(e: virtio_queue::Error) -> Self {
        QueueError::Queue(e)
    }
}

/// How many new buffers the driver made available, refusing an index that runs ahead of
/// the queue (a hostile or broken driver would otherwise make the device spin).
pub fn pending_buffers<Q: virtio_queue::QueueT>(
    queue: &Q,
    mem: &GuestMemory,
) -> Result<u16, QueueError> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)?
        .0;
    let next = queue.next_avail();
    let pending = avail.wrapping_sub(next);
    if pending > queue.size() {
        return Err(QueueError::AvailIndex {
            avail,
            next,
            pending,
            size: queue.size(),
        });
    }
    Ok(pending)
}

/// Completes every request the driver made available in `queue`, each with the used
/// length `serve` returns, using event-index notification suppression; raises the used
/// interrupt if the driver asked for one. An error means the queue itself is corrupt.
pub fn serve_queue<F>(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    mut serve: F,
) -> Result<(), QueueError>
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
{
    serve_queue_deferred(queue, mem, interrupt, |chain| Served::Done(serve(chain)))
}

/// What a device did with a request in [`serve_queue_deferred`].
pub enum Served {
    /// Completed, with this used length.
    Done(u32),
    /// Started; the device completes it later (asynchronous I/O).
    Started,
    /// Not taken: the device is at its limit; the request stays in the available ring
    /// and the device serves the queue again when it has room.
    Busy,
}

/// Like [`serve_queue`], but `serve` may complete a request later (it then adds the used
/// entry itself) or refuse it for now.
pub fn serve_queue_deferred<F>(
    queue: &mut virtio_queue::Queue,
    mem: &GuestMemory,
    interrupt: &Interrupt,
    mut serve: F,
) -> Result<(), QueueError>
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Served,
{
    use virtio_queue::QueueT;
    // A driver keeps adding buffers while we drain, so we look again after re-enabling
    // notifications; but never forever: a used ring laid over the available ring makes
    // every completion look like a new request. After this many rounds the worker waits
    // for the next notification instead (notifications are enabled, so a real driver's
    // new buffers still wake it).
    let max_rounds = 4 * usize::from(queue.size()).max(1);
    let mut completed = false;
    'rounds: for _ in 0..max_rounds {
        queue.disable_notification(mem)?;
        for _ in 0..pending_buffers(queue, mem)? {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                return Err(QueueError::AvailRingUnreadable);
            };
            let head = chain.head_index();
            match serve(chain) {
                Served::Done(used) => {
                    queue.add_used(mem, head, used)?;
                    completed = true;
                }
                Served::Started => {}
                Served::Busy => {
                    // Put it back: the next pass pops it again.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    queue.enable_notification(mem)?;
                    break 'rounds;
                }
            }
        }
        if !queue.enable_notification(mem)? {
            break;
        }
    }
    if completed && queue.needs_notification(mem)? {
        interrupt.signal_used();
    }
    Ok(())
}

/// Copies `data.len()` bytes of `config` from `offset` into `data`; zeros past its end.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&config, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&config, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_set_and_acked() {
        let i = Interrupt::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
        i.signal_used();
        i.signal_config();
        assert_eq!(i.status(), 3);
        i.ack(1);
        assert_eq!(i.status(), 2);
        assert_eq!(i.irq.read().unwrap(), 2);
    }
}
