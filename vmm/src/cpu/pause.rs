//! Parking vCPU threads: the mechanism under the control socket's `pause` and `resume`.
//!
//! Each vCPU thread registers with the [`PauseGate`] when it starts and checks it before
//! every `KVM_RUN`. [`PauseGate::pause`] raises the request, kicks every registered
//! thread out of the guest (the kick signal sets `immediate_exit`, see
//! [`super::vcpu`]) and waits until each one has parked; [`PauseGate::resume`] lets them
//! go. A thread that ends (the VM stops) unregisters, so a pause never waits for it;
//! [`PauseGate::release`] wakes parked threads for good when the VM stops while paused.
//!
//! While parked, a vCPU thread runs the jobs [`PauseGate::run_on`] hands it: work on the
//! vCPU that KVM wants done by the thread that runs it (reading or loading its
//! registers for a snapshot). The gate is generic over what a job receives (the vCPU's
//! fd in the VMM, anything in tests).

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
    /// Work on a vCPU needs the VM paused.
    #[error("the VM is not paused")]
    NotPaused,
    /// No running thread has this vCPU.
    #[error("vCPU {0} is not running")]
    NoVcpu(u8),
    /// The vCPU's thread did not do the job in time, or was let go first.
    #[error("vCPU {index} did not do the work asked of it ({why})")]
    JobLost {
        /// The vCPU.
        index: u8,
        /// What happened.
        why: &'static str,
    },
}

/// Work for a parked vCPU thread.
type Job<T> = Box<dyn FnOnce(&T) + Send>;

struct GateState<T: ?Sized> {
    paused: bool,
    released: bool,
    parked: usize,
    /// Registered threads and the vCPU each runs.
    threads: Vec<(libc::pthread_t, u8)>,
    /// Jobs for parked vCPUs, by vCPU index, oldest first.
    jobs: Vec<(u8, Job<T>)>,
}

impl<T: ?Sized> Default for GateState<T> {
    fn default() -> Self {
        Self {
            paused: false,
            released: false,
            parked: 0,
            threads: Vec::new(),
            jobs: Vec::new(),
        }
    }
}

/// Where vCPU threads park while the VM is paused; a parked thread does the jobs given
/// to its vCPU, each with a `&T` (its vCPU fd).
pub struct PauseGate<T: ?Sized = kvm_ioctls::VcpuFd> {
    requested: AtomicBool,
    state: Mutex<GateState<T>>,
    changed: Condvar,
}

impl<T: ?Sized> std::fmt::Debug for PauseGate<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("PauseGate")
            .field("paused", &s.paused)
            .field("parked", &s.parked)
            .field("threads", &s.threads.len())
            .finish_non_exhaustive()
    }
}

impl<T: ?Sized> Default for PauseGate<T> {
    fn default() -> Self {
        Self {
            requested: AtomicBool::new(false),
            state: Mutex::default(),
            changed: Condvar::new(),
        }
    }
}

impl<T: ?Sized> PauseGate<T> {
    /// A gate that lets every thread through.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, GateState<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers the calling thread as the one running vCPU `index` (at its start).
    pub fn enter(&self, index: u8) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.lock().threads.push((me, index));
    }

    /// Whether a pause is asked for (cheap: read before every `KVM_RUN`).
    pub fn pause_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Unregisters the calling thread (a vCPU thread, as it ends).
    pub fn leave(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut s = self.lock();
        // SAFETY: pthread_equal only compares the two ids.
        s.threads
            .retain(|(t, _)| unsafe { libc::pthread_equal(*t, me) } == 0);
        drop(s);
        self.changed.notify_all();
    }

    /// Called by vCPU `index`'s thread before each `KVM_RUN`: parks it while a pause is
    /// on, doing the jobs given to the vCPU meanwhile (each gets `vcpu`). `parking` runs
    /// once before the thread blocks (e.g. to tell KVM the vCPU is paused).
    pub fn park_if_requested(&self, index: u8, vcpu: &T, parking: impl FnOnce()) {
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
            if let Some(at) = s.jobs.iter().position(|(i, _)| *i == index) {
                let (_, job) = s.jobs.remove(at);
                drop(s);
                job(vcpu);
                s = self.lock();
                continue;
            }
            s = self.changed.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.parked -= 1;
    }

    /// Runs `job` on vCPU `index`'s thread, which must be parked (the VM paused), and
    /// returns what it returned; waits at most `limit`.
    pub fn run_on<R: Send + 'static>(
        &self,
        index: u8,
        limit: Duration,
        job: impl FnOnce(&T) -> R + Send + 'static,
    ) -> Result<R, PauseError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        {
            let mut s = self.lock();
            if s.released {
                return Err(PauseError::Stopping);
            }
            if !s.paused {
                return Err(PauseError::NotPaused);
            }
            if !s.threads.iter().any(|(_, i)| *i == index) {
                return Err(PauseError::NoVcpu(index));
            }
            s.jobs.push((
                index,
                Box::new(move |vcpu: &T| {
                    let _ = tx.send(job(vcpu));
                }),
            ));
        }
        self.changed.notify_all();
        rx.recv_timeout(limit).map_err(|e| PauseError::JobLost {
            index,
            why: match e {
                std::sync::mpsc::RecvTimeoutError::Timeout => "timed out",
                std::sync::mpsc::RecvTimeoutError::Disconnected => "the VM resumed or stopped",
            },
        })
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
        for (t, _) in &s.threads {
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
        // Jobs not done are dropped: their callers learn it.
        s.jobs.clear();
        self.requested.store(false, Ordering::Release);
        drop(s);
        self.changed.notify_all();
    }

    /// Lets every thread through for good: the VM is stopping.
    pub fn release(&self) {
        let mut s = self.lock();
        s.released = true;
        s.paused = false;
        s.jobs.clear();
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
    /// A gate whose jobs get the vCPU's index (the VMM's get its fd).
    type TestGate = PauseGate<u8>;

    fn spinners(
        gate: &Arc<TestGate>,
        n: usize,
    ) -> (
        Vec<std::thread::JoinHandle<()>>,
        Arc<AtomicU64>,
        Arc<AtomicBool>,
    ) {
        let rounds = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for index in 0..n as u8 {
            let (gate, rounds, stop) = (gate.clone(), rounds.clone(), stop.clone());
            handles.push(std::thread::spawn(move || {
                gate.enter(index);
                while !stop.load(Ordering::Acquire) {
                    gate.park_if_requested(index, &index, || {});
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
        let gate = Arc::new(TestGate::new());
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
        let gate = Arc::new(TestGate::new());
        let (handles, rounds, stop) = spinners(&gate, 1);
        // This test thread registers and never parks, like a vCPU stuck in a device.
        gate.enter(9);
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
        let gate = Arc::new(TestGate::new());
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
        let gate = Arc::new(TestGate::new());
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

    #[test]
    fn jobs_run_on_the_parked_vcpus_own_thread_and_need_a_pause() {
        let gate = Arc::new(TestGate::new());
        let (handles, _rounds, stop) = spinners(&gate, 2);
        let me = std::thread::current().id();
        assert_eq!(
            gate.run_on(0, Duration::from_secs(1), |i| *i),
            Err(PauseError::NotPaused)
        );
        gate.pause(Duration::from_secs(5), |_| {}).unwrap();
        for index in 0..2u8 {
            let (got, thread) = gate
                .run_on(index, Duration::from_secs(5), |i| {
                    (*i, std::thread::current().id())
                })
                .unwrap();
            assert_eq!(got, index, "the job ran with vCPU {index}'s context");
            assert_ne!(thread, me, "on the vCPU's thread");
        }
        assert_eq!(
            gate.run_on(7, Duration::from_secs(1), |i| *i),
            Err(PauseError::NoVcpu(7))
        );
        gate.resume();
        stop.store(true, Ordering::Release);
        for h in handles {
            h.join().unwrap();
        }
    }
}
