//! The thread that serves a device's queues: it sleeps in epoll on the queues'
//! notification eventfds (registered with KVM as ioeventfds, so a guest notification never
//! reaches a vCPU thread's user-space side) and on a stop eventfd.

use crate::threads::Joiner;
use std::io;
use std::os::unix::io::AsRawFd;

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Serves notifications of one device's queues.
pub trait QueueHandler: Send + 'static {
    /// Processes what the driver made available in queue `index`.
    fn process(&mut self, index: usize);
    /// One of the extra host fds given to [`Worker::spawn_with_fds`] is ready
    /// (edge-triggered: the handler must consume until it would block, or remember).
    fn host_event(&mut self, _index: usize) {}
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
                handler.process(i);
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
                        handler.host_event((token - HOST_TOKEN_BASE) as usize);
                        continue;
                    }
                    let index = token as usize;
                    if let Some(evt) = queue_evts.get(index) {
                        let _ = evt.read();
                        handler.process(index);
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

    struct Probe(mpsc::Sender<usize>);
    impl QueueHandler for Probe {
        fn process(&mut self, index: usize) {
            let _ = self.0.send(index);
        }
    }

    #[test]
    fn serves_each_queue_on_notification_and_stops() {
        let evts: Vec<EventFd> = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
            .collect();
        let notify: Vec<EventFd> = evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let (tx, rx) = mpsc::channel();
        let worker = Worker::spawn("test".into(), evts, Probe(tx)).unwrap();
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
