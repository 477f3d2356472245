//! Pausing and resuming a running VM: the control socket's `pause` and `resume`.
//!
//! Pause parks every vCPU thread at the [`PauseGate`] (kicked out of the guest first),
//! then pauses every virtio device (its worker stops; a disk completes the requests in
//! flight), and saves the guest's kvm-clock. Resume restores the clock, so that the
//! guest does not see the paused time pass, restarts the devices and lets the vCPUs go.
//! The process keeps serving its control socket while paused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;
use quantix_virtio::mmio::MmioTransport;
use tracing::{info, warn};

use crate::api::PauseControl;
use crate::cpu::{kick_thread, PauseGate};

/// How long a pause waits for every vCPU to stop.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// Pauses and resumes one VM.
pub struct Pauser {
    gate: Arc<PauseGate>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    vm: Arc<VmFd>,
    clock: Mutex<Option<kvm_clock_data>>,
}

impl std::fmt::Debug for Pauser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pauser")
            .field("paused", &self.gate.is_paused())
            .field("devices", &self.transports.len())
            .finish_non_exhaustive()
    }
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: the gate hands out only threads that registered and have not yet
    // unregistered (they do so before ending), so the id is a live thread's.
    if let Err(rc) = unsafe { kick_thread(thread) } {
        warn!(rc, "failed to kick a vCPU thread for a pause");
    }
}

impl Pauser {
    /// A pauser over the VM's vCPU gate, its virtio transports and its VM fd.
    pub fn new(
        gate: Arc<PauseGate>,
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        vm: Arc<VmFd>,
    ) -> Self {
        Self {
            gate,
            transports,
            vm,
            clock: Mutex::new(None),
        }
    }

    fn resume_devices(&self, upto: usize) {
        for t in &self.transports[..upto] {
            t.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }
}

impl PauseControl for Pauser {
    /// Pauses the VM; pausing a paused VM succeeds (and keeps the clock saved at the
    /// first pause).
    fn pause(&self) -> Result<(), String> {
        if self.gate.is_paused() {
            return Ok(());
        }
        self.gate
            .pause(PAUSE_LIMIT, kick)
            .map_err(|e| e.to_string())?;
        for (i, t) in self.transports.iter().enumerate() {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = t.pause() {
                drop(t);
                self.resume_devices(i);
                self.gate.resume();
                return Err(format!("cannot pause a device: {e}"));
            }
        }
        match self.vm.get_clock() {
            Ok(clock) => *self.clock.lock().unwrap_or_else(|p| p.into_inner()) = Some(clock),
            Err(e) => warn!(error = %e, "cannot read the guest clock; it will jump on resume"),
        }
        info!("VM paused");
        Ok(())
    }

    /// Resumes a paused VM; resuming a running VM does nothing.
    fn resume(&self) {
        if !self.gate.is_paused() {
            return;
        }
        if let Some(mut clock) = self.clock.lock().unwrap_or_else(|p| p.into_inner()).take() {
            // Without flags KVM takes the value as is: the guest's clock goes on from the
            // moment of the pause (KVM_CLOCK_REALTIME would add the time paused).
            clock.flags = 0;
            if let Err(e) = self.vm.set_clock(&clock) {
                warn!(error = %e, "cannot restore the guest clock; it jumps by the time paused");
            }
        }
        self.resume_devices(self.transports.len());
        self.gate.resume();
        info!("VM resumed");
    }

    fn paused(&self) -> bool {
        self.gate.is_paused()
    }
}
