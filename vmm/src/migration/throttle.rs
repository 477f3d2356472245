//! Auto-converge: a guest that dirties memory faster than the migration link carries it
//! has its vCPUs held at the pause gate for a share of every time slice (its devices and
//! its clock run on), a share that grows each round the pre-copy does not converge.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing::{info, warn};

use crate::pause::Pauser;

/// One time slice.
pub const SLICE: Duration = Duration::from_millis(100);
/// The first throttle, percent of each slice.
pub const FIRST_PERCENT: u32 = 20;
/// Added each time it increases.
pub const STEP_PERCENT: u32 = 10;
/// The most.
pub const MAX_PERCENT: u32 = 99;

/// The throttle of one migration; nothing runs until the first [`Throttle::increase`].
pub struct Throttle {
    pauser: Arc<Pauser>,
    percent: Arc<AtomicU32>,
    stop: Arc<Stop>,
    thread: Option<JoinHandle<()>>,
}

/// A stop flag whose waits end as soon as it is set (the switch does not wait for the
/// rest of a slice).
#[derive(Default)]
struct Stop {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl Stop {
    fn set(&self) {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.changed.notify_all();
    }

    fn is_set(&self) -> bool {
        *self.stopped.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits `d`, or less when the flag is set.
    fn wait(&self, d: Duration) {
        let guard = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(guard, d, |stopped| !*stopped);
    }
}

/// The share after `percent`: [`FIRST_PERCENT`], then [`STEP_PERCENT`] more, at most
/// [`MAX_PERCENT`].
pub fn next_percent(percent: u32) -> u32 {
    if percent == 0 {
        FIRST_PERCENT
    } else {
        (percent + STEP_PERCENT).min(MAX_PERCENT)
    }
}

impl Throttle {
    /// A throttle of the VM `pauser` pauses, off.
    pub fn new(pauser: Arc<Pauser>) -> Self {
        Throttle {
            pauser,
            percent: Arc::new(AtomicU32::new(0)),
            stop: Arc::new(Stop::default()),
            thread: None,
        }
    }

    /// The share of each slice the vCPUs are held, percent.
    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// Holds the vCPUs for a larger share; starts the throttle thread the first time.
    pub fn increase(&mut self) {
        let next = next_percent(self.percent());
        self.percent.store(next, Ordering::Relaxed);
        info!(
            percent = next,
            "migration: throttling the vCPUs (auto-converge)"
        );
        if self.thread.is_some() {
            return;
        }
        let (pauser, percent, stop) =
            (self.pauser.clone(), self.percent.clone(), self.stop.clone());
        let spawned = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !stop.is_set() {
                    let p = percent.load(Ordering::Relaxed);
                    let hold = SLICE * p / 100;
                    if let Err(e) = pauser.hold_vcpus(|| stop.wait(hold)) {
                        warn!(error = %e, "throttle: cannot hold the vCPUs");
                        stop.wait(SLICE);
                        continue;
                    }
                    stop.wait(SLICE - hold);
                }
            });
        match spawned {
            Ok(t) => self.thread = Some(t),
            Err(e) => warn!(error = %e, "cannot start the throttle thread; not throttling"),
        }
    }

    /// Stops throttling; the vCPUs run freely when it returns.
    pub fn stop(&mut self) {
        self.stop.set();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.percent.store(0, Ordering::Relaxed);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_throttle_grows_from_twenty_to_ninety_nine_percent() {
        let mut p = 0;
        let mut seen = Vec::new();
        for _ in 0..10 {
            p = next_percent(p);
            seen.push(p);
        }
        assert_eq!(seen, [20, 30, 40, 50, 60, 70, 80, 90, 99, 99]);
    }
}
