//! The ACPI power button: how a supervisor asks the guest to shut itself down.
//!
//! The DSDT (see [`crate::acpi`]) describes a control-method power button (`PNP0C0C`) and
//! a Generic Event Device (`ACPI0013`) whose interrupt is [`crate::layout::GED_GSI`] and
//! whose `_EVT` method notifies the button. A press is one edge on that interrupt,
//! injected through an irqfd. The guest decides what a press means (a distribution's
//! init powers off); a guest without ACPI never enables the interrupt, which the press
//! reports so that a supervisor need not wait for a shutdown that cannot come.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_irqchip, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::VmFd;
use tracing::info;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceError, Lifecycle};
use crate::control::PowerButtonControl;

/// Mask bit of an I/O APIC redirection table entry.
const IOAPIC_REDIR_MASKED: u64 = 1 << 16;

/// The power button of one VM.
pub struct PowerButton {
    vm: Arc<VmFd>,
    irq: EventFd,
    gsi: u32,
    presses: AtomicU64,
}

impl std::fmt::Debug for PowerButton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerButton")
            .field("gsi", &self.gsi)
            .field("presses", &self.presses.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl PowerButton {
    /// Wires the button to `gsi` of `vm`'s in-kernel I/O APIC.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Result<Self, DeviceError> {
        let irq = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceError::Host {
            what: "power button eventfd",
            source,
        })?;
        vm.register_irqfd(&irq, gsi)
            .map_err(|source| DeviceError::Kvm {
                op: "IRQFD (power button)",
                source,
            })?;
        Ok(Self {
            vm,
            irq,
            gsi,
            presses: AtomicU64::new(0),
        })
    }

    /// Whether the guest has unmasked the button's I/O APIC pin, as an ACPI operating
    /// system's GED driver does when it binds.
    pub fn guest_enabled(&self) -> io::Result<bool> {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        self.vm
            .get_irqchip(&mut chip)
            .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: KVM filled the I/O APIC member of the union, since `chip_id` asked for
        // it; every bit pattern is a valid u64.
        let entries = unsafe { chip.chip.ioapic.redirtbl };
        let entry = entries
            .get(self.gsi as usize)
            .ok_or_else(|| io::Error::other(format!("GSI {} is not an I/O APIC pin", self.gsi)))?;
        // SAFETY: `bits` covers the whole 64-bit entry; every bit pattern is valid.
        let bits = unsafe { entry.bits };
        Ok(bits & IOAPIC_REDIR_MASKED == 0)
    }
}

impl PowerButtonControl for PowerButton {
    /// Presses (and releases) the button.
    fn press(&self) -> io::Result<bool> {
        let enabled = self.guest_enabled()?;
        self.irq.write(1)?;
        let n = self.presses.fetch_add(1, Ordering::Relaxed) + 1;
        info!(
            presses = n,
            guest_enabled = enabled,
            "ACPI power button pressed"
        );
        Ok(enabled)
    }
}

/// The button and the GED as the device manager holds them. They keep no guest-visible
/// state: a press is an edge, and the GED's `_EVT` method notifies the button on every
/// interrupt (the I/O APIC pin's state is the VM's, saved with the interrupt controller).
pub struct Ged(pub Arc<PowerButton>);

impl Lifecycle for Ged {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        super::restore_stateless(state)
    }
}
