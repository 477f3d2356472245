//! virtio-rng (entropy device): fills the guest's buffers from the host's getrandom(2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tracing::warn;
use virtio_queue::Queue;
use vm_memory::Bytes;

use crate::state::{DeviceState, QueueSnapshot, StateError};
use crate::worker::{stop_worker, QueueHandler, Worker};
use crate::{
    device_type, features, serve_queue, ActivateContext, ActivateError, GuestMemory, Interrupt,
    QueueError, VirtioDevice,
};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served per request (the driver asks for less; this bounds a hostile one).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// Counters of the entropy device.
#[derive(Debug, Default)]
pub struct RngCounters {
    /// Requests served.
    pub requests: AtomicU64,
    /// Bytes handed to the guest.
    pub bytes: AtomicU64,
    /// Malformed requests or queues (bad addresses, read-only buffers).
    pub invalid: AtomicU64,
}

/// The entropy device.
pub struct Rng {
    counters: Arc<RngCounters>,
    worker: Option<Worker<RngHandler>>,
}

impl Rng {
    /// A new device.
    pub fn new() -> Self {
        Self {
            counters: Arc::default(),
            worker: None,
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<RngCounters> {
        self.counters.clone()
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl crate::CounterSet for RngCounters {
    fn sample(&self) -> Vec<(&'static str, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("requests", load(&self.requests)),
            ("bytes", load(&self.bytes)),
            ("invalid", load(&self.invalid)),
        ]
    }
}

impl VirtioDevice for Rng {
    fn metrics(&self) -> Arc<dyn crate::CounterSet> {
        self.counters.clone()
    }
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn name(&self) -> &str {
        "rng"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx.take_ready_queue(0)?;
        let handler = RngHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            counters: self.counters.clone(),
        };
        self.worker = Some(Worker::spawn("virtio-rng".into(), ctx.queue_evts, handler)?);
        Ok(())
    }
    fn reset(&mut self) {
        let _ = stop_worker(&mut self.worker, "rng");
    }
    fn pause(&mut self) -> Result<DeviceState, StateError> {
        let Some(h) = stop_worker(&mut self.worker, "rng")? else {
            return Ok(DeviceState::default());
        };
        Ok(DeviceState {
            queues: vec![(0, QueueSnapshot::of(&h.queue))],
            device: serde_json::Value::Null,
        })
    }
    fn restore(&mut self, _state: &serde_json::Value) -> Result<(), StateError> {
        Ok(()) // nothing of its own: every request completes when it is served
    }
}

struct RngHandler {
    mem: Arc<GuestMemory>,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    counters: Arc<RngCounters>,
}

/// Fills `buf` from getrandom(2).
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Serves one request; returns the bytes written into guest memory.
pub(crate) fn fill_request(
    mem: &GuestMemory,
    counters: &RngCounters,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> u32 {
    let mut written = 0usize;
    let mut buf = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            counters.invalid.fetch_add(1, Ordering::Relaxed);
            break;
        }
        let len = (desc.len() as usize).min(MAX_REQUEST_BYTES - written);
        if len == 0 {
            break;
        }
        buf.resize(len, 0);
        if let Err(e) = fill_random(&mut buf) {
            warn!(error = %e, "getrandom failed");
            break;
        }
        if mem.write_slice(&buf, desc.addr()).is_err() {
            counters.invalid.fetch_add(1, Ordering::Relaxed);
            break;
        }
        written += len;
    }
    counters.requests.fetch_add(1, Ordering::Relaxed);
    counters.bytes.fetch_add(written as u64, Ordering::Relaxed);
    written as u32
}

impl RngHandler {
    fn process_queue(&mut self) -> Result<(), QueueError> {
        let (mem, counters) = (self.mem.as_ref(), &self.counters);
        serve_queue(&mut self.queue, mem, &self.interrupt, |chain| {
            fill_request(mem, counters, chain)
        })
    }
}

impl QueueHandler for RngHandler {
    fn process(&mut self, _index: usize) -> Result<(), QueueError> {
        self.process_queue()
    }
    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }
    fn count_broken(&mut self) {
        self.counters.invalid.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::worker::{dispatch, Event};

    const VRING_DESC_F_WRITE: u16 = 2;

    fn handler(mem: &Arc<GuestMemory>, queue: Queue) -> RngHandler {
        RngHandler {
            mem: mem.clone(),
            queue,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            counters: Arc::default(),
        }
    }

    #[test]
    fn fills_writable_buffers_and_rejects_readonly_and_out_of_range_ones() {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        let descs = [
            // Request 0: one writable 64-byte buffer.
            RawDescriptor::from(SplitDescriptor::new(0x8000, 64, VRING_DESC_F_WRITE, 0)),
            // Request 1: read-only buffer (invalid for rng).
            RawDescriptor::from(SplitDescriptor::new(0x9000, 64, 0, 0)),
            // Request 2: writable buffer outside guest memory.
            RawDescriptor::from(SplitDescriptor::new(0x4000_0000, 64, VRING_DESC_F_WRITE, 0)),
        ];
        vq.build_multiple_desc_chains(&descs).unwrap();
        let mut h = handler(&mem, vq.create_queue().unwrap());
        dispatch(&mut h, "rng", Event::Queue(0));
        let used = vq.used();
        assert_eq!(used.idx().load(), 3);
        let e0 = used.ring().ref_at(0).unwrap().load();
        assert_eq!(e0.len(), 64);
        let mut out = [0u8; 64];
        mem.read_slice(&mut out, GuestAddress(0x8000)).unwrap();
        assert_ne!(out, [0u8; 64], "random bytes were written");
        assert_eq!(used.ring().ref_at(1).unwrap().load().len(), 0);
        assert_eq!(used.ring().ref_at(2).unwrap().load().len(), 0);
        assert_eq!(h.counters.invalid.load(Ordering::Relaxed), 2);
        assert!(!h.interrupt.needs_reset());
    }

    #[test]
    fn a_corrupt_avail_index_breaks_the_queue_without_panicking() {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        let mut h = handler(&mem, vq.create_queue().unwrap());
        // avail.idx far ahead of anything the driver could have queued.
        vq.avail().idx().store(u16::to_le(1000));
        dispatch(&mut h, "rng", Event::Queue(0));
        assert!(h.interrupt.needs_reset());
        assert_eq!(
            h.interrupt.status() & 2,
            2,
            "config interrupt tells the driver"
        );
        dispatch(&mut h, "rng", Event::Queue(0)); // stays quiet
        assert_eq!(h.counters.invalid.load(Ordering::Relaxed), 1);
    }
}
