//! Pausing and resuming a running VM: the control socket's `pause` and `resume`.
//!
//! Pause parks every vCPU thread at the [`PauseGate`] (kicked out of the guest first,
//! with the I/O instruction it was in completed), then pauses every device through the
//! [`DeviceManager`] (a virtio worker stops; a disk completes the requests in flight),
//! and saves the guest's kvm-clock. Resume restores the clock, so that the guest does
//! not see the paused time pass, restarts the devices and lets the vCPUs go. The process
//! keeps serving its control socket while paused. While paused, work on a vCPU (reading
//! its registers) runs on the vCPU's own thread ([`Pauser::vcpu_registers`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_clock_data, kvm_regs, kvm_sregs};
use kvm_ioctls::VmFd;
use tracing::{info, warn};

use crate::control::PauseControl;
use crate::cpu::{kick_thread, PauseGate};
use crate::device_manager::DeviceManager;

/// How long work on one paused vCPU may take.
pub const VCPU_JOB_LIMIT: Duration = Duration::from_secs(5);

/// A paused vCPU's registers, read on its own thread.
#[derive(Debug, Clone, Copy)]
pub struct VcpuRegisters {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

/// How long a pause waits for every vCPU to stop.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(5);

/// Pauses and resumes one VM.
pub struct Pauser {
    gate: Arc<PauseGate>,
    devices: Arc<DeviceManager>,
    vm: Arc<VmFd>,
    vcpus: u8,
    clock: Mutex<Option<kvm_clock_data>>,
}

impl std::fmt::Debug for Pauser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pauser")
            .field("paused", &self.gate.is_paused())
            .field("devices", &self.devices)
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
    /// A pauser over the VM's vCPU gate, its devices and its VM fd; the VM has `vcpus`.
    pub fn new(
        gate: Arc<PauseGate>,
        devices: Arc<DeviceManager>,
        vm: Arc<VmFd>,
        vcpus: u8,
    ) -> Self {
        Self {
            gate,
            devices,
            vm,
            vcpus,
            clock: Mutex::new(None),
        }
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.gate.is_paused()
    }

    /// The guest clock as read when the VM was paused (`None` while it runs, or when KVM
    /// could not read it).
    pub fn paused_clock(&self) -> Option<kvm_clock_data> {
        *self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every vCPU's registers, each read on the vCPU's own thread; the VM must be paused.
    pub fn vcpu_registers(&self) -> Result<Vec<VcpuRegisters>, String> {
        (0..self.vcpus)
            .map(|index| {
                self.gate
                    .run_on(index, VCPU_JOB_LIMIT, |fd| {
                        Ok::<_, kvm_ioctls::Error>(VcpuRegisters {
                            regs: fd.get_regs()?,
                            sregs: fd.get_sregs()?,
                        })
                    })
                    .map_err(|e| e.to_string())?
                    .map_err(|e| format!("vCPU {index}: reading its registers: {e}"))
            })
            .collect()
    }
}

impl Pauser {
    /// Holds the vCPUs at the pause gate while `wait` runs, the devices and the guest
    /// clock running on (a migration's throttle). Does nothing to a paused VM.
    pub fn hold_vcpus(&self, wait: impl FnOnce()) -> Result<(), String> {
        if self.gate.is_paused() {
            return Ok(());
        }
        self.gate
            .pause(PAUSE_LIMIT, kick)
            .map_err(|e| e.to_string())?;
        wait();
        self.gate.resume();
        Ok(())
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
        if let Err(e) = self.devices.pause() {
            self.gate.resume();
            return Err(format!("cannot pause a device: {e}"));
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
        self.devices.resume();
        self.gate.resume();
        info!("VM resumed");
    }

    fn paused(&self) -> bool {
        self.gate.is_paused()
    }
}
