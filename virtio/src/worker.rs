//! The thread that serves a device's queues: it sleeps in epoll on the queues'
//! notification eventfds (registered with KVM as ioeventfds, so a guest notification never
//! reaches a vCPU thread's user-space side) and on a stop eventfd.
//!
//! The worker is also where a corrupt queue is contained, once for every device: a
//! handler returns a [`QueueError`] when the driver's rings cannot be used, and
//! [`dispatch`] then marks the device as needing a reset (`DEVICE_NEEDS_RESET`, see
//! [`Interrupt::signal_needs_reset`]) and stops calling the handler for the guest until
//! the driver resets the device. The flag lives in the device's [`Interrupt`], which a
//! reset clears, so that there is one fact for "broken", seen by the transport too.

use crate::threads::Joiner;
use std::io;
use std::os::unix::io::AsRawFd;

use tracing::{debug, warn};

use crate::{Interrupt, QueueError};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Serves notifications of one device's queues.
pub trait QueueHandler: Send + 'static {
    /// Processes what the driver made available in queue `index`. An error means the
    /// queue itself is unusable (see [`dispatch`]); a bad request is not an error.
    fn process(&mut self, index: usize) -> Result<(), QueueError>;
    /// One of the extra host fds given to [`Worker::spawn_with_fds`] is ready
    /// (edge-triggered: the handler must consume until it would block, or remember).
    fn host_event(&mut self, _index: usize) -> Result<(), QueueError> {
        Ok(())
    }
    /// What a broken device still does on host event `index`, where it must not touch
    /// the queues (a disk takes its completions, so that no I/O is left behind).
    fn host_event_while_broken(&mut self, _index: usize) {}
    /// The device's interrupt, which carries the needs-reset flag.
    fn interrupt(&self) -> &Interrupt;
    /// Counts a broken queue in the device's own counters, if it has one for it.
    fn count_broken(&mut self) {}
}

/// What woke a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The driver notified queue `i`.
    Queue(usize),
    /// Host fd `i` is ready.
    Host(usize),
}

/// Hands `event` to `handler`, unless the device is broken; a [`QueueError`] marks it
/// broken (needs reset) and is logged, rate-limited, as the guest's doing.
pub fn dispatch<H: QueueHandler + ?Sized>(handler: &mut H, device: &str, event: Event) {
    if handler.interrupt().needs_reset() {
        if let Event::Host(i) = event {
            handler.host_event_while_broken(i);
        }
        return;
    }
    let result = match event {
        Event::Queue(i) => handler.process(i),
        Event::Host(i) => handler.host_event(i),
    };
    if let Err(e) = result {
        quantix_devices::guest_warn!("virtio-queue-broken", device, error = %e, "a virtio queue is broken; the device needs a reset");
        handler.count_broken();
        handler.interrupt().signal_needs_reset();
    }
}

/// Token offset of extra host fds in the epoll set.
const HOST_TOKEN_BASE: u64 = 1 << 32;

/// A running worker thread; stopping it (or dropping it) waits for the thread to end.
/// [`Worker::stop`] hands the handler back, with the queues and backend state it holds,
/// so that a paused device can be saved and served again.
pub struct Worker<H> {
    stop: EventFd,
    thread: Option<Joiner<H>>,
}

const STOP_TOKEN: u64 = u64::MAX;

impl<H: QueueHandler> Worker<H> {
    /// Starts a thread named `name` serving `queue_evts` (queue `i` is `queue_evts[i]`).
    pub fn spawn(name: String, queue_evts: Vec<EventFd>, handler: H) -> io::Result<Worker<H>> {
        Self::spawn_with_fds(name, queue_evts, &[], handler)
    }

    /// Like [`Worker::spawn`], and also wakes the handler (edge-triggered, read and write
    /// readiness) when one of `host_fds` becomes ready; `host_fds[i]` is reported as
    /// `host_event(i)`. The fds must stay open as long as the worker runs.
    pub fn spawn_with_fds(
        name: String,
        queue_evts: Vec<EventFd>,
        host_fds: &[std::os::unix::io::RawFd],
        mut handler: H,
    ) -> io::Result<Worker<H>> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, evt) in queue_evts.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        for (i, fd) in host_fds.iter().enumerate() {
            let set = EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED;
            epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(set, HOST_TOKEN_BASE + i as u64),
            )?;
        }
        let host_count = host_fds.len();
        let stop_evt = stop.try_clone()?;
        let thread = crate::threads::spawn(name.clone(), move || {
            // Buffers the driver made available before it notified are served at once.
            for i in 0..queue_evts.len() {
                dispatch(&mut handler, &name, Event::Queue(i));
            }
            let mut events = vec![EpollEvent::default(); queue_evts.len() + host_count + 1];
            loop {
                let n = match epoll.wait(-1, &mut events) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!(device = %name, error = %e, "device worker: epoll failed; stopping");
                        return handler;
                    }
                };
                for ev in &events[..n] {
                    let token = ev.data();
                    if token == STOP_TOKEN {
                        let _ = stop_evt.read();
                        debug!(device = %name, "device worker stopped");
                        return handler;
                    }
                    if token >= HOST_TOKEN_BASE {
                        let index = (token - HOST_TOKEN_BASE) as usize;
                        dispatch(&mut handler, &name, Event::Host(index));
                        continue;
                    }
                    let index = token as usize;
                    if let Some(evt) = queue_evts.get(index) {
                        let _ = evt.read();
                        dispatch(&mut handler, &name, Event::Queue(index));
                    }
                }
            }
        })?;
        Ok(Worker {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the thread, waits for it, and returns its handler (`None` if it panicked).
    pub fn stop(mut self) -> Option<H> {
        self.shutdown()
    }
}

/// Stops the worker in `slot`, if one runs, and returns its handler. An error means
/// the thread panicked and the device's live state is lost.
pub fn stop_worker<H: QueueHandler>(
    slot: &mut Option<Worker<H>>,
    device: &str,
) -> Result<Option<H>, crate::state::StateError> {
    match slot.take() {
        None => Ok(None),
        Some(w) => w
            .stop()
            .map(Some)
            .ok_or_else(|| crate::state::StateError::WorkerLost(device.to_string())),
    }
}

impl<H> Worker<H> {
    fn shutdown(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        let _ = self.stop.write(1);
        match thread.join() {
            Some(handler) => Some(handler),
            None => {
                warn!("device worker thread panicked");
                None
            }
        }
    }
}

impl<H> Drop for Worker<H> {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Probe(mpsc::Sender<usize>, Interrupt);
    impl QueueHandler for Probe {
        fn process(&mut self, index: usize) -> Result<(), QueueError> {
            let _ = self.0.send(index);
            Ok(())
        }
        fn interrupt(&self) -> &Interrupt {
            &self.1
        }
    }

    fn interrupt() -> Interrupt {
        Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())
    }

    /// Fails queue 0 always; counts calls, and host events while broken.
    #[derive(Default)]
    struct Failing {
        calls: usize,
        broken_host_events: usize,
        counted: usize,
        irq: Option<Interrupt>,
    }
    impl QueueHandler for Failing {
        fn process(&mut self, index: usize) -> Result<(), QueueError> {
            self.calls += 1;
            match index {
                0 => Err(QueueError::AvailRingUnreadable),
                _ => Ok(()),
            }
        }
        fn host_event_while_broken(&mut self, _: usize) {
            self.broken_host_events += 1;
        }
        fn interrupt(&self) -> &Interrupt {
            self.irq.as_ref().unwrap()
        }
        fn count_broken(&mut self) {
            self.counted += 1;
        }
    }

    #[test]
    fn a_broken_queue_stops_the_device_until_a_reset() {
        let mut h = Failing {
            irq: Some(interrupt()),
            ..Default::default()
        };
        dispatch(&mut h, "test", Event::Queue(1));
        assert!(!h.interrupt().needs_reset());
        dispatch(&mut h, "test", Event::Queue(0));
        assert!(h.interrupt().needs_reset());
        assert_eq!((h.calls, h.counted), (2, 1));
        assert_eq!(h.interrupt().needs_reset_events(), 1);
        // Broken: the guest's queues are no longer served; host work still runs.
        dispatch(&mut h, "test", Event::Queue(1));
        dispatch(&mut h, "test", Event::Host(0));
        assert_eq!((h.calls, h.broken_host_events), (2, 1));
        // A device reset clears the flag and the handler is called again.
        h.interrupt().clear();
        dispatch(&mut h, "test", Event::Queue(1));
        assert_eq!(h.calls, 3);
    }

    #[test]
    fn serves_each_queue_on_notification_and_stops() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let notify: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn("test".into(), evts, Probe(tx, interrupt())).unwrap();
        // The initial pass over every queue.
        let mut first: Vec<usize> = (0..2).map(|_| rx.recv().unwrap()).collect();
        first.sort();
        assert_eq!(first, vec![0, 1]);
        notify[1].write(1).unwrap();
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap(),
            1
        );
        let handler = worker.stop().expect("the handler comes back");
        drop(handler);
        assert!(rx.recv().is_err(), "the handler is dropped");
    }
}
