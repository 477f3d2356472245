//! The PC devices on the port I/O bus: COM1 (with KVM's coalescing of its transmit
//! writes), the i8042's reset line and the ACPI power-management port; and their part of
//! the [`Lifecycle`].

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use quantix_devices::legacy::i8042::I8042;
use quantix_devices::legacy::serial::{SerialCounters, SerialDevice, SerialSnapshot};
use quantix_devices::power::AcpiPowerDevice;
use quantix_devices::BusDevice;

use super::coalesced::SerialTxCoalescer;
use super::{restore_stateless, Lifecycle};

/// COM1: the UART and, once the vCPUs exist, the coalescing of its transmit writes.
///
/// Every access to the UART's ports first replays the writes KVM coalesced, so that no
/// access overtakes an earlier write, and every write lets the coalescer follow the
/// guest's interrupt settings (see [`super::coalesced`]). This is the only place that
/// knows of the coalescing: the vCPUs' exit dispatch sees one more bus device.
pub struct Uart {
    serial: Arc<Mutex<SerialDevice>>,
    tx: OnceLock<Arc<SerialTxCoalescer>>,
}

impl Uart {
    /// COM1 around `serial`; not coalescing until [`Uart::coalesce`].
    pub fn new(serial: SerialDevice) -> Self {
        Self {
            serial: Arc::new(Mutex::new(serial)),
            tx: OnceLock::new(),
        }
    }

    fn serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The UART, for host input (the console's feed into its receive FIFO).
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// The UART's counters.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.serial().counters()
    }

    /// Starts coalescing transmit writes (a second call is ignored).
    pub fn coalesce(&self, tx: Arc<SerialTxCoalescer>) {
        let _ = self.tx.set(tx);
    }

    /// The coalescer, when KVM coalesces the port.
    pub fn coalescer(&self) -> Option<&Arc<SerialTxCoalescer>> {
        self.tx.get()
    }

    /// Plays what KVM coalesced and flushes the sink (the VM stops).
    pub fn flush(&self) {
        if let Some(tx) = self.tx.get() {
            tx.replay();
        }
        self.serial().flush();
    }

    fn replay(&self) {
        if let Some(tx) = self.tx.get() {
            tx.replay();
        }
    }
}

/// COM1's place on the bus.
pub struct UartPort(pub Arc<Uart>);

impl BusDevice for UartPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.0.replay();
        self.0.serial().read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.replay();
        self.0.serial().write(offset, data);
        if let Some(tx) = self.0.tx.get() {
            // The write may have changed the UART's IER or MCR.
            tx.follow_guest();
        }
    }
}

impl Lifecycle for UartPort {
    fn pause(&mut self) -> Result<(), String> {
        // What the guest wrote before the pause belongs before it on the output.
        self.0.flush();
        Ok(())
    }

    fn save(&mut self) -> Result<serde_json::Value, String> {
        self.0.replay();
        serde_json::to_value(self.0.serial().save()).map_err(|e| e.to_string())
    }

    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let saved: SerialSnapshot =
            serde_json::from_value(state.clone()).map_err(|e| format!("invalid state: {e}"))?;
        self.0.serial().restore(&saved).map_err(|e| e.to_string())?;
        if let Some(tx) = self.0.tx.get() {
            tx.follow_guest();
        }
        Ok(())
    }
}

impl Lifecycle for I8042 {
    // The controller reports an empty, ready status and keeps no register.
    fn save(&mut self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        restore_stateless(state)
    }
}

impl Lifecycle for AcpiPowerDevice {
    // The PM port acts on each write; it holds nothing between them.
    fn save(&mut self) -> Result<serde_json::Value, String> {
        Ok(serde_json::Value::Null)
    }
    fn restore(&mut self, state: &serde_json::Value) -> Result<(), String> {
        restore_stateless(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantix_devices::legacy::IrqTrigger;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn uart() -> UartPort {
        let irq = IrqTrigger::new(EventFd::new(EFD_NONBLOCK).unwrap());
        UartPort(Arc::new(Uart::new(SerialDevice::new(
            irq,
            Box::new(std::io::sink()),
        ))))
    }

    #[test]
    fn the_uart_saves_through_the_bus_device_and_refuses_bad_states() {
        let mut a = uart();
        a.write(7, &[0x42]); // scratch register
        a.write(1, &[0x01]); // IER
        let saved = a.save().unwrap();
        let mut b = uart();
        b.restore(&saved).unwrap();
        let mut v = [0u8];
        b.read(7, &mut v);
        assert_eq!(v, [0x42]);
        assert_eq!(b.save().unwrap(), saved);
        assert!(b.restore(&serde_json::json!({"scratch": "x"})).is_err());
        let mut overfull = saved.clone();
        overfull["in_buffer"] = serde_json::json!(vec![0u8; 65]);
        assert!(b.restore(&overfull).unwrap_err().contains("FIFO"));
    }

    #[test]
    fn stateless_devices_accept_only_null() {
        assert!(restore_stateless(&serde_json::Value::Null).is_ok());
        assert!(restore_stateless(&serde_json::json!(1)).is_err());
    }
}
