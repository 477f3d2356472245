//! Entry points for the fuzz targets in fuzz/: the devices a guest reaches through port
//! I/O, driven by an arbitrary sequence of accesses.

use std::sync::Arc;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::BusDevice;
use crate::legacy::i8042::I8042;
use crate::legacy::serial::SerialDevice;
use crate::legacy::IrqTrigger;
use crate::power::{AcpiPowerDevice, PowerAction, PowerControl};

struct Ignore;
impl PowerControl for Ignore {
    fn request(&self, _: PowerAction) {}
}

/// The UART, the i8042 and the ACPI power port: each 4-byte record of `data` is
/// `[device u8][offset u8][width-and-direction u8][value u8]` (device % 3; offset % 16;
/// bit 7 of the third byte: write; its low bits: access width 1, 2 or 4).
pub fn legacy(data: &[u8]) {
    let Ok(evt) = EventFd::new(EFD_NONBLOCK) else {
        return;
    };
    let mut serial = SerialDevice::new(IrqTrigger::new(evt), Box::new(std::io::sink()));
    let mut i8042 = I8042::new(Arc::new(Ignore));
    let mut power = AcpiPowerDevice::new(Arc::new(Ignore));
    for rec in data.chunks_exact(4) {
        let dev: &mut dyn BusDevice = match rec[0] % 3 {
            0 => &mut serial,
            1 => &mut i8042,
            _ => &mut power,
        };
        let offset = u64::from(rec[1] % 16);
        let width = [1usize, 2, 4][usize::from(rec[2] & 0x3) % 3];
        let mut buf = [rec[3]; 4];
        if rec[2] & 0x80 != 0 {
            dev.write(offset, &buf[..width]);
        } else {
            dev.read(offset, &mut buf[..width]);
        }
    }
    // Reading what the guest sent must not fail either.
    let mut rx = [0u8; 1];
    serial.read(0, &mut rx);
}
