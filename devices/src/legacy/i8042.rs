//! The i8042 keyboard controller, as far as a VM needs it: the CPU reset line.
//!
//! Linux falls back to pulsing the reset line (command 0xFE on port 0x64) when the
//! ACPI reset register is not used. The controller reports an empty, ready status.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::power::{PowerAction, PowerControl};

/// First port of the controller (data port 0x60 .. command/status port 0x64).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Number of ports covered, 0x60 to 0x64.
pub const I8042_PORT_LEN: u64 = 5;

struct ResetLine(Arc<dyn PowerControl>);

impl Trigger for ResetLine {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        tracing::info!("guest pulsed the i8042 reset line");
        self.0.request(PowerAction::Reset);
        Ok(())
    }
}

/// The i8042 controller on the port I/O bus.
pub struct I8042 {
    inner: I8042Device<ResetLine>,
}

impl I8042 {
    /// A controller whose reset line reports to `control`.
    pub fn new(control: Arc<dyn PowerControl>) -> Self {
        Self {
            inner: I8042Device::new(ResetLine(control)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |off| self.inner.read(off));
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            // The trigger is infallible.
            let _ = self.inner.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::power::tests::Recorded;

    #[test]
    fn reset_command_requests_reset() {
        let rec = Arc::new(Recorded::default());
        let mut dev = I8042::new(rec.clone());
        dev.write(0, &[0xfe]); // data port: no effect
        dev.write(4, &[0xaa]); // other command: no effect
        assert!(rec.0.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*rec.0.lock().unwrap(), vec![PowerAction::Reset]);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(
            status,
            [0],
            "status: output buffer empty, input buffer empty"
        );
    }
}
