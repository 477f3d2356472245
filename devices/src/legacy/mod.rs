//! Legacy PC devices: the 16550 UART and the i8042 controller's reset line.

pub mod i8042;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// Raises an interrupt by writing to an eventfd registered with KVM as an irqfd.
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// Wraps an eventfd; the VMM registers a clone of it as the irqfd of the device's GSI.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// The eventfd behind this trigger.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}
