//! Guest-initiated power actions (poweroff, reset) and the ACPI power device.
//!
//! The guest asks to power off or reset through the ACPI sleep control and reset
//! registers of a hardware-reduced ACPI platform (see `docs/vmm.md`), through the
//! i8042 reset line, or by a KVM system event. Devices report these requests through
//! [`PowerControl`]; the VMM decides what they mean for the process.

use std::sync::Arc;

use tracing::{debug, info};

use crate::bus::BusDevice;

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerAction {
    /// The guest powered itself off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// Receives power requests from devices.
pub trait PowerControl: Send + Sync {
    /// Records the request; the first request wins.
    fn request(&self, action: PowerAction);
}

/// The value the guest writes to the reset register (FADT `RESET_VALUE`).
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// The sleep type of S5 (soft off), as declared by the `_S5_` object in the DSDT.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0x7 << SLEEP_TYPE_SHIFT;
const SLEEP_ENABLE: u8 = 1 << 5;

/// The hardware-reduced ACPI sleep control/status and reset register, one I/O port.
///
/// Writing `SLP_EN | (SLP_TYP << 2)` with the S5 sleep type powers off; writing
/// [`ACPI_RESET_VALUE`] resets. Reads return 0 (no wake status).
pub struct AcpiPowerDevice {
    control: Arc<dyn PowerControl>,
}

impl AcpiPowerDevice {
    /// A device that reports to `control`.
    pub fn new(control: Arc<dyn PowerControl>) -> Self {
        Self { control }
    }
}

impl BusDevice for AcpiPowerDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, [value]) = (offset, data) else {
            debug!(
                offset,
                len = data.len(),
                "ignored wide or offset write to ACPI power port"
            );
            return;
        };
        if *value == ACPI_RESET_VALUE {
            info!("guest requested reset through the ACPI reset register");
            self.control.request(PowerAction::Reset);
        } else if value & SLEEP_ENABLE != 0 {
            let sleep_type = (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT;
            if sleep_type == ACPI_S5_SLEEP_TYPE {
                info!("guest entered ACPI S5 (poweroff)");
                self.control.request(PowerAction::PowerOff);
            } else {
                debug!(
                    sleep_type,
                    "ignored request for an unsupported ACPI sleep state"
                );
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub(crate) struct Recorded(pub Mutex<Vec<PowerAction>>);

    impl PowerControl for Recorded {
        fn request(&self, action: PowerAction) {
            self.0.lock().unwrap().push(action);
        }
    }

    #[test]
    fn decodes_s5_and_reset_and_ignores_the_rest() {
        let rec = Arc::new(Recorded::default());
        let mut dev = AcpiPowerDevice::new(rec.clone());
        dev.write(0, &[(5 << 2) | (1 << 5)]);
        dev.write(0, &[ACPI_RESET_VALUE]);
        // S3 is not supported, SLP_EN missing, wide and offset writes ignored.
        dev.write(0, &[(3 << 2) | (1 << 5)]);
        dev.write(0, &[5 << 2]);
        dev.write(0, &[0x34, 0]);
        dev.write(1, &[0x34]);
        assert_eq!(
            *rec.0.lock().unwrap(),
            vec![PowerAction::PowerOff, PowerAction::Reset]
        );
        let mut data = [0xffu8; 1];
        dev.read(0, &mut data);
        assert_eq!(data, [0]);
    }
}
