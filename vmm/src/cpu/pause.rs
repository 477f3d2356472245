//! Parking vCPU threads: the mechanism under the control socket's `pause` and `resume`.
//!
//! Each vCPU thread registers with the [`PauseGate`] when it starts and checks it before
//! every `KVM_RUN`. [`PauseGate::pause`] raises the request, kicks every registered
//! thread out of the guest (the kick signal sets `immediate_exit`, see
//! [`super::vcpu`]) and waits until each one has parked; [`PauseGate::resume`] lets them
//! go. A thread that ends (the VM stops) unregisters, so a pause never waits for it;
//! [`PauseGate::release`] wakes parked threads for good when the VM stops while paused.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::warn;

/// Why a pause did not happen.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PauseError {
    /// Some vCPU threads did not reach the gate in time (they are let go again).
    #[error("{parked} of {live} vCPUs stopped within {limit:?}; the VM keeps running")]
    Timeout {
        /// Threads that had parked.
        parked: usize,
        /// Threads running.
        live: usize,
        /// How long the pause waited.
        limit: Duration,
    },
    /// The VM is stopping.
    #[error("the VM is stopping")]
    Stopping,
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    released: bool,
    parked: usize,
    threads: Vec<libc::pthread_t>,
}

/// Where vCPU threads park while the VM is paused.
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    state: Mutex<GateState>,
    changed: Condvar,
}

impl PauseGate {
    /// A gate that lets every thread through.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the calling thread (a vCPU thread, at its start).
    pub fn enter(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push(me);
    }

    /// Unregisters the calling thread (a vCPU thread, as it ends).
    pub fn leave(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut s = self.lock();
        // SAFETY: pthread_equal only compares the two ids.
        s.threads
            .retain(|t| unsafe { libc::pthread_equal(*t, me) } == 0);
        drop(s);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks it while a pause is on.
    /// `parking` runs once before the thread blocks (e.g. to tell KVM the vCPU is paused).
    pub fn park_if_requested(&self, parking: impl FnOnce()) {
        if !self.requested.load(Ordering::Acquire) {
            return;
        }
        let mut s = self.lock();
        if !s.paused || s.released {
            return;
        }
        parking();
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !s.released {
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Stops every registered thread at the gate; `kick` forces one out of the guest.
    /// Returns once all have parked, or fails (and lets them go) after `limit`.
    /// Pausing a paused VM succeeds at once.
    pub fn pause(&self, limit: Duration, kick: impl Fn(libc::pthread_t)) -> Result<(), PauseError> {
        let mut s = self.lock();
        if s.released {
            return Err(PauseError::Stopping);
        }
        if s.paused {
            return Ok(());
        }
        s.paused = true;
        self.requested.store(true, Ordering::Release);
        for t in &s.threads {
            kick(*t);
        }
        let deadline = Instant::now() + limit;
        while s.parked < s.threads.len() && !s.released {
            let now = Instant::now();
            if now >= deadline {
                let err = PauseError::Timeout {
                    parked: s.parked,
                    live: s.threads.len(),
                    limit,
                };
                warn!(error = %err, "pause failed; resuming");
                s.paused = false;
                self.requested.store(false, Ordering::Release);
                drop(s);
                self.changed.notify_all();
                return Err(err);
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if s.released {
            return Err(PauseError::Stopping);
        }
        Ok(())
    }

    /// Lets parked threads run again. Resuming a running VM does nothing.
    pub fn resume(&self) {
        let mut s = self.lock();
        s.paused = false;
        self.requested.store(false, Ordering::Release);
        drop(s);
        self.changed.notify_all();
    }

    /// Lets every thread through for good: the VM is stopping.
    pub fn release(&self) {
        let mut s = self.lock();
        s.released = true;
        s.paused = false;
        self.requested.store(false, Ordering::Release);
        drop(s);
        self.changed.notify_all();
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// Asserts that the spinners' round count moves past `before` within 5 s.
    fn assert_progress(rounds: &AtomicU64, before: u64, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while rounds.load(Ordering::Relaxed) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(rounds.load(Ordering::Relaxed) > before, "{what}");
    }

    /// Threads that count loop rounds and park at the gate like vCPU threads.
    fn spinners(
        gate: &Arc<PauseGate>,
        n: usize,
    ) -> (
        Vec<std::thread::JoinHandle<()>>,
        Arc<AtomicU64>,
        Arc<AtomicBool>,
    ) {
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for _ in 0..n {
            let (gate, rounds, stop) = (gate.clone(), rounds.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                gate.enter();
                while !stop.load(Ordering::Acquire) {
                    gate.park_if_requested(|| {});
                    rounds.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_micros(200));
                }
                gate.leave();
            }));
        }
        // Let every thread register.
        while gate.lock().threads.len() < n {
            std::thread::sleep(Duration::from_millis(1));
        }
        (handles, rounds, stop)
    }

    #[test]
    fn paused_threads_make_no_progress_until_resumed() {
        let gate = Arc::new(PauseGate::new());
        let (handles, rounds, stop) = spinners(&gate, 3);
        gate.pause(Duration::from_secs(5), |_| {}).unwrap();
        assert!(gate.is_paused());
        assert_eq!(gate.lock().parked, 3);
        let before = rounds.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            rounds.load(Ordering::Relaxed),
            before,
            "a parked thread ran"
        );
        // Pausing again is a no-op.
        gate.pause(Duration::from_millis(1), |_| {}).unwrap();
        gate.resume();
        assert!(!gate.is_paused());
        assert_progress(&rounds, before, "threads did not resume");
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
        assert!(gate.lock().threads.is_empty());
    }

    #[test]
    fn a_thread_that_never_arrives_fails_the_pause_and_the_vm_runs_on() {
        let gate = Arc::new(PauseGate::new());
        let (handles, rounds, stop) = spinners(&gate, 1);
        // This test thread registers and never parks, like a vCPU stuck in a device.
        gate.enter();
        // A limit long enough for the spinner to park even on a loaded machine.
        let err = gate.pause(Duration::from_secs(2), |_| {}).unwrap_err();
        assert_eq!(
            err,
            PauseError::Timeout {
                parked: 1,
                live: 2,
                limit: Duration::from_secs(2)
            }
        );
        assert!(!gate.is_paused());
        let before = rounds.load(Ordering::Relaxed);
        assert_progress(&rounds, before, "the parked thread was not let go");
        gate.leave();
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn release_frees_parked_threads_and_refuses_new_pauses() {
        let gate = Arc::new(PauseGate::new());
        let (handles, _rounds, stop) = spinners(&gate, 2);
        gate.pause(Duration::from_secs(5), |_| {}).unwrap();
        stop.store(true, Ordering::Release);
        gate.release();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(
            gate.pause(Duration::from_secs(1), |_| {}),
            Err(PauseError::Stopping)
        );
    }

    #[test]
    fn kick_reaches_every_registered_thread() {
        let gate = Arc::new(PauseGate::new());
        let (handles, _rounds, stop) = spinners(&gate, 2);
        let kicked = AtomicU64::new(0);
        gate.pause(Duration::from_secs(5), |_| {
            kicked.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(kicked.load(Ordering::Relaxed), 2);
        gate.resume();
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
    }
}
