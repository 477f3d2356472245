//! Where device threads come from.
//!
//! Devices start their worker threads when the guest's driver activates them, which
//! happens on a vCPU thread. A vCPU thread under its seccomp filter may not create
//! threads, so the VMM installs a [`Spawner`] that hands the request to a thread that may
//! (the VMM's launcher, which also puts the new thread under the device filter). Without
//! one (tests, fuzzers), threads are created directly.

use std::io;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Starts a named thread running `body`.
pub trait Spawner: Send + Sync {
    /// Starts it, or says why not.
    fn spawn(&self, name: String, body: Box<dyn FnOnce() + Send>) -> io::Result<()>;
}

static SPAWNER: OnceLock<Box<dyn Spawner>> = OnceLock::new();

/// Installs the process's spawner (once; later calls are ignored and return false).
pub fn set_spawner(s: Box<dyn Spawner>) -> bool {
    SPAWNER.set(s).is_ok()
}

struct Slot<T> {
    state: Mutex<(bool, Option<T>)>,
    done: Condvar,
}

/// Marks the slot finished even when the body unwinds.
struct Finish<T>(Arc<Slot<T>>, Option<T>);

impl<T> Drop for Finish<T> {
    fn drop(&mut self) {
        let mut st = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
        *st = (true, self.1.take());
        self.0.done.notify_all();
    }
}

/// Waits for a thread started by [`spawn`] and takes its result.
pub struct Joiner<T> {
    slot: Arc<Slot<T>>,
}

impl<T> Joiner<T> {
    /// Waits until the thread ends; `None` if it panicked.
    pub fn join(self) -> Option<T> {
        let mut st = self.slot.state.lock().unwrap_or_else(|p| p.into_inner());
        while !st.0 {
            st = self.slot.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.1.take()
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.slot.state.lock().map(|s| s.0).unwrap_or(true)
    }
}

/// Starts thread `name` running `f` (through the installed spawner, if any).
pub fn spawn<T, F>(name: String, f: F) -> io::Result<Joiner<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let slot = Arc::new(Slot {
        state: Mutex::new((false, None)),
        done: Condvar::new(),
    });
    // The guard lives in the closure: a body dropped without being run (its thread could
    // not start) still marks the slot finished, so that `join` returns.
    let finish = Finish(slot.clone(), None);
    let body: Box<dyn FnOnce() + Send> = Box::new(move || {
        // The whole guard moves in (not only the field the body writes).
        let mut finish = finish;
        finish.1 = Some(f());
    });
    match SPAWNER.get() {
        Some(sp) => sp.spawn(name, body)?,
        None => {
            std::thread::Builder::new().name(name).spawn(body)?;
        }
    }
    Ok(Joiner { slot })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_panics() {
        let j = spawn("t-ok".into(), || 41 + 1).unwrap();
        assert_eq!(j.join(), Some(42));
        let j = spawn("t-panic".into(), || -> u8 { panic!("boom") }).unwrap();
        assert_eq!(j.join(), None);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let j = spawn("t-wait".into(), move || rx.recv().is_ok()).unwrap();
        assert!(!j.is_finished());
        tx.send(()).unwrap();
        assert_eq!(j.join(), Some(true));
    }

    #[test]
    fn a_body_that_never_runs_still_ends_its_joiner() {
        let slot = Arc::new(Slot::<u8> {
            state: Mutex::new((false, None)),
            done: Condvar::new(),
        });
        let finish = Finish(slot.clone(), None);
        let body: Box<dyn FnOnce() + Send> = Box::new(move || drop(finish));
        drop(body);
        assert_eq!(Joiner { slot }.join(), None);
    }
}
