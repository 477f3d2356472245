//! virtio-console: the guest's `hvc0`, written to a host sink.
//!
//! One port, no multiport or resize support. What the guest transmits goes to the sink
//! (standard output or a file); the receive queue is offered but, for now, nothing is
//! sent to the guest on it.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;
use virtio_queue::{Queue, Reader};

use crate::worker::{QueueHandler, Worker};
use crate::{
    device_type, features, serve_queue, ActivateContext, ActivateError, GuestMemory, Interrupt,
    QueueError, VirtioDevice,
};

/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit request (a bound against a hostile driver).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const TRANSMIT: usize = 1;

/// Where the console's output goes.
pub type ConsoleSink = Box<dyn Write + Send>;

/// Counters of the console.
#[derive(Debug, Default)]
pub struct ConsoleCounters {
    /// Bytes the guest wrote that reached the sink.
    pub tx_bytes: AtomicU64,
    /// Bytes lost (sink errors, oversized or malformed requests).
    pub tx_lost: AtomicU64,
}

/// The console device.
pub struct Console {
    sink: Arc<Mutex<ConsoleSink>>,
    counters: Arc<ConsoleCounters>,
    worker: Option<Worker>,
}

impl Console {
    /// A console writing to `sink`.
    pub fn new(sink: ConsoleSink) -> Self {
        Self {
            sink: Arc::new(Mutex::new(sink)),
            counters: Arc::default(),
            worker: None,
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<ConsoleCounters> {
        self.counters.clone()
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }
    fn name(&self) -> &str {
        "console"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: unused without SIZE, MULTIPORT, EMERG_WRITE.
        crate::read_config_bytes(&[0u8; 12], offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let tx = ctx.take_ready_queue(TRANSMIT)?;
        let handler = ConsoleHandler {
            mem: ctx.mem,
            tx,
            interrupt: ctx.interrupt,
            sink: self.sink.clone(),
            counters: self.counters.clone(),
            broken: false,
        };
        self.worker = Some(Worker::spawn(
            "virtio-console".into(),
            ctx.queue_evts,
            handler,
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        if let Some(w) = self.worker.take() {
            w.stop();
        }
    }
}

struct ConsoleHandler {
    mem: Arc<GuestMemory>,
    tx: Queue,
    interrupt: Arc<Interrupt>,
    sink: Arc<Mutex<ConsoleSink>>,
    counters: Arc<ConsoleCounters>,
    broken: bool,
}

/// Copies one transmit request to the sink.
fn transmit_request(
    mem: &GuestMemory,
    sink: &Mutex<ConsoleSink>,
    counters: &ConsoleCounters,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) {
    let mut buf = Vec::new();
    match Reader::new(mem, chain) {
        Ok(r) if r.available_bytes() <= MAX_REQUEST_BYTES => {
            use std::io::Read;
            let mut r = r;
            if r.read_to_end(&mut buf).is_err() {
                counters.tx_lost.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        Ok(r) => {
            counters
                .tx_lost
                .fetch_add(r.available_bytes() as u64, Ordering::Relaxed);
            return;
        }
        Err(_) => {
            counters.tx_lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
    match sink.write_all(&buf).and_then(|()| sink.flush()) {
        Ok(()) => counters
            .tx_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed),
        Err(_) => counters
            .tx_lost
            .fetch_add(buf.len() as u64, Ordering::Relaxed),
    };
}

impl ConsoleHandler {
    fn transmit(&mut self) -> Result<(), QueueError> {
        let (mem, sink, counters) = (self.mem.as_ref(), &self.sink, &self.counters);
        serve_queue(&mut self.tx, mem, &self.interrupt, |chain| {
            transmit_request(mem, sink, counters, chain);
            0
        })
    }
}

impl QueueHandler for ConsoleHandler {
    fn process(&mut self, index: usize) {
        if self.broken || index != TRANSMIT {
            return;
        }
        if let Err(e) = self.transmit() {
            warn!(error = %e, "virtio-console queue is broken; the device needs a reset");
            self.broken = true;
            self.interrupt.signal_config();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_sink_in_order() {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        mem.write_slice(b"hello ", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"hvc0\n", GuestAddress(0x9000)).unwrap();
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        vq.build_multiple_desc_chains(&[
            RawDescriptor::from(SplitDescriptor::new(0x8000, 6, 0, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 5, 0, 0)),
            // A buffer outside guest memory is lost, not fatal.
            RawDescriptor::from(SplitDescriptor::new(0x4000_0000, 5, 0, 0)),
        ])
        .unwrap();
        let out = Shared::default();
        let mut h = ConsoleHandler {
            mem: mem.clone(),
            tx: vq.create_queue().unwrap(),
            interrupt: Arc::new(Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            )),
            sink: Arc::new(Mutex::new(Box::new(out.clone()))),
            counters: Arc::default(),
            broken: false,
        };
        h.process(TRANSMIT);
        assert_eq!(&*out.0.lock().unwrap(), b"hello hvc0\n");
        assert_eq!(h.counters.tx_bytes.load(Ordering::Relaxed), 11);
        assert_eq!(h.counters.tx_lost.load(Ordering::Relaxed), 1);
        assert_eq!(vq.used().idx().load(), 3);
        assert!(!h.broken);
    }
}
