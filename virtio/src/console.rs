//! virtio-console: the guest's `hvc0`, connected to a host endpoint.
//!
//! One port, no multiport or resize support. What the guest transmits goes to the sink
//! (standard output, a file, a pty, a socket: the VMM chooses); bytes from the host input
//! fd, when there is one, fill the guest's receive buffers. Input is read only while the
//! guest has buffers to take it, so a guest that does not read pushes back on the host
//! side (a pipe or pty fills up) instead of growing a buffer in the VMM.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::debug;
use virtio_queue::{Queue, QueueT, Reader, Writer};

use crate::state::{self, DeviceState, QueueSnapshot, StateError};
use crate::worker::{stop_worker, QueueHandler, Worker};
use crate::{
    device_type, features, pending_buffers, serve_queue, ActivateContext, ActivateError,
    GuestMemory, Interrupt, QueueError, VirtioDevice,
};

/// Queue size of both queues.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes taken from one transmit request (a bound against a hostile driver).
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Bytes read from the host input at a time.
const INPUT_CHUNK: usize = 4096;
const RECEIVE: usize = 0;
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
    /// Host input bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
}

/// The console device.
pub struct Console {
    sink: Arc<Mutex<ConsoleSink>>,
    input: Option<Arc<OwnedFd>>,
    counters: Arc<ConsoleCounters>,
    worker: Option<Worker<ConsoleHandler>>,
    /// Host input read but not delivered when the device was paused.
    pending_input: Vec<u8>,
}

impl Console {
    /// A console writing to `sink` and, when `input` is given, reading from it (any fd
    /// epoll can watch: a pipe, a pty, a terminal).
    pub fn new(sink: ConsoleSink, input: Option<OwnedFd>) -> Self {
        Self {
            sink: Arc::new(Mutex::new(sink)),
            input: input.map(Arc::new),
            counters: Arc::default(),
            worker: None,
            pending_input: Vec::new(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<ConsoleCounters> {
        self.counters.clone()
    }
}

impl crate::CounterSet for ConsoleCounters {
    fn sample(&self) -> Vec<(&'static str, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("tx_bytes", load(&self.tx_bytes)),
            ("tx_lost", load(&self.tx_lost)),
            ("rx_bytes", load(&self.rx_bytes)),
        ]
    }
}

impl VirtioDevice for Console {
    fn metrics(&self) -> Arc<dyn crate::CounterSet> {
        self.counters.clone()
    }
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
        // Without host input the receive queue is never used; a driver may leave it off.
        let input = match &self.input {
            Some(fd) => Some(Input {
                rx: ctx.take_ready_queue(RECEIVE)?,
                fd: fd.clone(),
                pending: std::mem::take(&mut self.pending_input),
                closed: false,
            }),
            None => None,
        };
        let host_fds: Vec<_> = self.input.iter().map(|fd| fd.as_raw_fd()).collect();
        let handler = ConsoleHandler {
            mem: ctx.mem,
            tx,
            input,
            interrupt: ctx.interrupt,
            sink: self.sink.clone(),
            counters: self.counters.clone(),
        };
        self.worker = Some(Worker::spawn_with_fds(
            "virtio-console".into(),
            ctx.queue_evts,
            &host_fds,
            handler,
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        let _ = stop_worker(&mut self.worker, "console");
        self.pending_input.clear();
    }
    fn pause(&mut self) -> Result<DeviceState, StateError> {
        let Some(h) = stop_worker(&mut self.worker, "console")? else {
            return Ok(DeviceState {
                queues: Vec::new(),
                device: state::to_value(&ConsoleState {
                    pending_input: self.pending_input.clone(),
                }),
            });
        };
        let mut queues = vec![(TRANSMIT, QueueSnapshot::of(&h.tx))];
        if let Some(input) = h.input {
            queues.push((RECEIVE, QueueSnapshot::of(&input.rx)));
            self.pending_input = input.pending;
        }
        Ok(DeviceState {
            queues,
            device: state::to_value(&ConsoleState {
                pending_input: self.pending_input.clone(),
            }),
        })
    }
    fn restore(&mut self, saved: &serde_json::Value) -> Result<(), StateError> {
        let saved: ConsoleState = state::from_value("console", saved)?;
        if saved.pending_input.len() > INPUT_CHUNK {
            return Err(StateError::Invalid(format!(
                "console: {} bytes of pending input, more than the {INPUT_CHUNK} it can hold",
                saved.pending_input.len()
            )));
        }
        self.pending_input = saved.pending_input;
        Ok(())
    }
}

/// The console's own saved state.
#[derive(serde::Serialize, serde::Deserialize)]
struct ConsoleState {
    /// Host input read but not yet in a guest buffer.
    pending_input: Vec<u8>,
}

/// The receive side: host input waiting for the guest's buffers.
pub(crate) struct Input {
    rx: Queue,
    fd: Arc<OwnedFd>,
    /// Read from the host, not yet in a guest buffer.
    pending: Vec<u8>,
    /// End of input (or a read error): nothing more will come.
    closed: bool,
}

impl Input {
    /// Input from `fd` into the receive queue `rx`.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn new(rx: Queue, fd: Arc<OwnedFd>) -> Self {
        Self {
            rx,
            fd,
            pending: Vec::new(),
            closed: false,
        }
    }

    /// Reads what the host fd has now, without blocking (the fd may be a blocking one:
    /// standard input). `false` when there is nothing to read.
    fn fill(&mut self) -> bool {
        let fd = self.fd.as_raw_fd();
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own, zero timeout.
        if unsafe { libc::poll(&mut poll, 1, 0) } != 1 {
            return false;
        }
        self.pending.resize(INPUT_CHUNK, 0);
        // SAFETY: reading into our buffer of INPUT_CHUNK bytes from an fd we hold open;
        // poll said a read will not block.
        let n = unsafe { libc::read(fd, self.pending.as_mut_ptr().cast(), INPUT_CHUNK) };
        if n <= 0 {
            self.pending.clear();
            let e = io::Error::last_os_error();
            if n == 0
                || !matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                )
            {
                debug!("console input closed");
                self.closed = true;
            }
            return false;
        }
        self.pending.truncate(n as usize);
        true
    }

    /// Moves host input into the guest's receive buffers until either runs out.
    pub(crate) fn receive(
        &mut self,
        mem: &GuestMemory,
        interrupt: &Interrupt,
        counters: &ConsoleCounters,
    ) -> Result<(), QueueError> {
        let mut delivered = false;
        // A bound on one pass: a driver that keeps adding zero-length buffers cannot
        // keep the worker here; the next notification resumes.
        let mut budget = 4 * usize::from(self.rx.size());
        while budget > 0 {
            if self.pending.is_empty() && (self.closed || !self.fill()) {
                break;
            }
            if pending_buffers(&self.rx, mem)? == 0 {
                // Ask to be told when buffers arrive; they may have arrived meanwhile.
                if self.rx.enable_notification(mem)? {
                    continue;
                }
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                break;
            };
            budget -= 1;
            let head = chain.head_index();
            let written = match Writer::new(mem, chain) {
                Ok(mut w) => {
                    let n = w.available_bytes().min(self.pending.len());
                    w.write_all(&self.pending[..n]).map(|()| n).unwrap_or(0)
                }
                Err(_) => 0,
            };
            self.pending.drain(..written);
            counters
                .rx_bytes
                .fetch_add(written as u64, Ordering::Relaxed);
            self.rx.add_used(mem, head, written as u32)?;
            delivered = true;
        }
        if delivered && self.rx.needs_notification(mem)? {
            interrupt.signal_used();
        }
        Ok(())
    }
}

struct ConsoleHandler {
    mem: Arc<GuestMemory>,
    tx: Queue,
    input: Option<Input>,
    interrupt: Arc<Interrupt>,
    sink: Arc<Mutex<ConsoleSink>>,
    counters: Arc<ConsoleCounters>,
}

/// Copies one transmit request to the sink.
pub(crate) fn transmit_request(
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

    fn receive(&mut self) -> Result<(), QueueError> {
        match &mut self.input {
            Some(input) => input.receive(&self.mem, &self.interrupt, &self.counters),
            None => Ok(()),
        }
    }
}

impl QueueHandler for ConsoleHandler {
    fn process(&mut self, index: usize) -> Result<(), QueueError> {
        match index {
            TRANSMIT => self.transmit(),
            RECEIVE => self.receive(),
            _ => Ok(()),
        }
    }

    fn host_event(&mut self, _index: usize) -> Result<(), QueueError> {
        self.receive()
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
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
            input: None,
            interrupt: Arc::new(Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            )),
            sink: Arc::new(Mutex::new(Box::new(out.clone()))),
            counters: Arc::default(),
        };
        h.process(TRANSMIT).unwrap();
        assert_eq!(&*out.0.lock().unwrap(), b"hello hvc0\n");
        assert_eq!(h.counters.tx_bytes.load(Ordering::Relaxed), 11);
        assert_eq!(h.counters.tx_lost.load(Ordering::Relaxed), 1);
        assert_eq!(vq.used().idx().load(), 3);
    }

    fn pipe() -> (OwnedFd, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: pipe writes two fds into our array.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        use std::os::fd::FromRawFd;
        // SAFETY: fresh fds owned by nobody else.
        unsafe {
            (
                OwnedFd::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        }
    }

    #[test]
    fn host_input_fills_receive_buffers_and_waits_for_more() {
        const WRITE: u16 = 2; // VRING_DESC_F_WRITE
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let rxq = MockSplitQueue::new(mem.as_ref(), 16);
        // Two 4-byte buffers, then (below) none: the rest of the input has to wait.
        rxq.build_multiple_desc_chains(&[
            RawDescriptor::from(SplitDescriptor::new(0x8000, 4, WRITE, 0)),
            RawDescriptor::from(SplitDescriptor::new(0x9000, 4, WRITE, 0)),
        ])
        .unwrap();
        let txq = MockSplitQueue::create(mem.as_ref(), GuestAddress(0x2_0000), 16);
        let (read_end, mut write_end) = pipe();
        write_end.write_all(b"hello hvc0").unwrap();
        let mut h = ConsoleHandler {
            mem: mem.clone(),
            tx: txq.create_queue().unwrap(),
            input: Some(Input {
                rx: rxq.create_queue().unwrap(),
                fd: Arc::new(read_end),
                pending: Vec::new(),
                closed: false,
            }),
            interrupt: Arc::new(Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            )),
            sink: Arc::new(Mutex::new(Box::new(std::io::sink()))),
            counters: Arc::default(),
        };
        h.host_event(0).unwrap();
        let mut got = [0u8; 4];
        mem.read_slice(&mut got, GuestAddress(0x8000)).unwrap();
        assert_eq!(&got, b"hell");
        mem.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(&got, b"o hv");
        assert_eq!(rxq.used().idx().load(), 2);
        assert_eq!(h.counters.rx_bytes.load(Ordering::Relaxed), 8);
        let input = h.input.as_ref().unwrap();
        assert_eq!(input.pending, b"c0", "kept until the guest offers a buffer");

        // End of input: what is pending still arrives, then the input is closed.
        drop(write_end);
        h.host_event(0).unwrap();
        assert_eq!(h.counters.rx_bytes.load(Ordering::Relaxed), 8);
    }
}
