//! A 16550A UART on the port I/O bus (COM1 at 0x3f8, IRQ 4), built on vm-superio.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tracing::warn;
use vm_superio::serial::{Error as SerialError, SerialEvents, SerialState};
use vm_superio::Serial;

use super::IrqTrigger;
use crate::bus::BusDevice;

/// Base port of COM1.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// Number of UART registers.
pub const COM1_PORT_LEN: u64 = 8;
/// ISA IRQ (and GSI) of COM1.
pub const COM1_IRQ: u32 = 4;

/// Counters of a serial port, readable by the metrics exporter.
#[derive(Debug, Default)]
pub struct SerialCounters {
    /// Bytes the guest wrote that reached the sink.
    pub tx_bytes: AtomicU64,
    /// Bytes the guest wrote that the sink failed to take.
    pub tx_lost: AtomicU64,
    /// Bytes the guest read from the input FIFO.
    pub rx_reads: AtomicU64,
    /// Bytes of `tx_bytes` that KVM coalesced: written without an exit to the VMM.
    pub tx_coalesced: AtomicU64,
}

/// `SerialEvents` that feed [`SerialCounters`].
#[derive(Clone, Default)]
pub struct CountingEvents(pub Arc<SerialCounters>);

impl SerialEvents for CountingEvents {
    fn buffer_read(&self) {
        self.0.rx_reads.fetch_add(1, Ordering::Relaxed);
    }
    fn out_byte(&self) {
        self.0.tx_bytes.fetch_add(1, Ordering::Relaxed);
    }
    fn tx_lost_byte(&self) {
        self.0.tx_lost.fetch_add(1, Ordering::Relaxed);
    }
    fn in_buffer_empty(&self) {}
}

/// The UART's registers and receive FIFO, as saved in a snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read yet (at most [`FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

/// Size of the UART's receive FIFO.
pub const FIFO_SIZE: usize = 64;

/// Why a saved UART state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SerialStateError {
    /// More received bytes than the FIFO holds.
    #[error("saved serial state holds {0} received bytes; the FIFO holds {FIFO_SIZE}")]
    FifoOverflow(usize),
    /// The interrupt line could not be re-raised or its eventfd duplicated.
    #[error("serial interrupt: {0}")]
    Interrupt(String),
}

/// Where the guest's serial output goes.
pub type SerialSink = Box<dyn Write + Send>;

/// The UART device.
pub struct SerialDevice {
    uart: Serial<IrqTrigger, CountingEvents, SerialSink>,
    counters: Arc<SerialCounters>,
    warned_output: bool,
    tx_side_effects: Arc<AtomicBool>,
}

/// Registers whose writes decide what a THR write does besides output (LCR because its
/// divisor latch bit decides whether offset 1 is the IER).
const IER_OFFSET: u8 = 1;
const LCR_OFFSET: u8 = 3;
const MCR_OFFSET: u8 = 4;
/// IER bit: interrupt when the transmit holding register is empty.
const IER_THR_EMPTY: u8 = 0b10;
/// MCR bit: loopback (transmitted bytes come back as received ones).
const MCR_LOOP: u8 = 0b1_0000;

impl SerialDevice {
    /// A UART that writes to `sink` and raises its interrupt through `irq`.
    pub fn new(irq: IrqTrigger, sink: SerialSink) -> Self {
        let events = CountingEvents::default();
        let counters = events.0.clone();
        Self {
            uart: Serial::with_events(irq, events, sink),
            counters,
            warned_output: false,
            tx_side_effects: Arc::default(),
        }
    }

    /// Whether a THR write does anything the guest can wait for besides output: raise the
    /// THR-empty interrupt (enabled in the IER) or come back as input (loopback in the
    /// MCR). Kept up to date as the guest writes those registers; the VMM coalesces
    /// transmit writes only while it is false.
    pub fn tx_side_effects(&self) -> Arc<AtomicBool> {
        self.tx_side_effects.clone()
    }

    /// The port's counters.
    pub fn counters(&self) -> Arc<SerialCounters> {
        self.counters.clone()
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input for the guest; returns how many bytes were taken (the FIFO
    /// may be full, in which case the caller retries later).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                warn!(error = ?e, "failed to raise the serial receive interrupt");
                0
            }
        }
    }

    /// Flushes buffered output to the sink.
    pub fn flush(&mut self) {
        let _ = self.uart.writer_mut().flush();
    }

    /// The registers and the receive FIFO (the guest must not be running).
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Puts the UART in a saved state, keeping its sink, interrupt and counters; a
    /// pending interrupt is raised again. A refused state leaves the UART as it was.
    pub fn restore(&mut self, saved: &SerialSnapshot) -> Result<(), SerialStateError> {
        if saved.in_buffer.len() > FIFO_SIZE {
            return Err(SerialStateError::FifoOverflow(saved.in_buffer.len()));
        }
        let state = SerialState {
            baud_divisor_low: saved.baud_divisor_low,
            baud_divisor_high: saved.baud_divisor_high,
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        let irq = self
            .uart
            .interrupt_evt()
            .eventfd()
            .try_clone()
            .map_err(|e| SerialStateError::Interrupt(e.to_string()))?;
        let events = self.uart.events().clone();
        let placeholder: SerialSink = Box::new(std::io::sink());
        let mut uart = Serial::from_state(&state, IrqTrigger::new(irq), events, placeholder)
            .map_err(|e| SerialStateError::Interrupt(format!("{e:?}")))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        self.update_tx_side_effects();
        Ok(())
    }

    fn update_tx_side_effects(&self) {
        let state = self.uart.state();
        let effects =
            state.interrupt_enable & IER_THR_EMPTY != 0 || state.modem_control & MCR_LOOP != 0;
        // SeqCst: pairs with the VMM's check of its coalescing zone (see quantix-vmm's
        // coalesced module).
        self.tx_side_effects.store(effects, Ordering::SeqCst);
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) => self.uart.read(off),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(off), [value]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.uart.write(off, *value) {
            // The guest keeps running; the byte is counted as lost. Warn once, not per byte.
            if !self.warned_output {
                warn!(error = ?e, "serial output failed; further failures are only counted");
                self.warned_output = true;
            }
        }
        if matches!(off, IER_OFFSET | LCR_OFFSET | MCR_OFFSET) {
            self.update_tx_side_effects();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_sink_and_receives_input_with_interrupt() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut dev = SerialDevice::new(
            IrqTrigger::new(evt.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.counters().tx_bytes.load(Ordering::Relaxed), 3);

        // Enable the received-data interrupt, queue input, see the IRQ and read it back.
        dev.write(1, &[0x01]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(evt.read().unwrap() >= 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0u8];
        dev.read(0, &mut byte);
        assert_eq!(byte, [b'o']);

        // Wide accesses are ignored, not misinterpreted.
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
    }

    #[test]
    fn follows_the_guests_thr_interrupt_enable_and_loopback() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(IrqTrigger::new(evt), Box::new(std::io::sink()));
        let thri = dev.tx_side_effects();
        assert!(!thri.load(Ordering::Relaxed));
        dev.write(1, &[0x03]); // IER: received data and THR empty
        assert!(thri.load(Ordering::Relaxed));
        // With the divisor latch open, offset 1 is the divisor's high byte, not IER.
        dev.write(3, &[0x80]);
        dev.write(1, &[0x00]);
        assert!(thri.load(Ordering::Relaxed));
        dev.write(3, &[0x03]);
        dev.write(1, &[0x01]);
        assert!(!thri.load(Ordering::Relaxed));
        dev.write(4, &[0x10]); // MCR: loopback
        assert!(thri.load(Ordering::Relaxed));
        dev.write(4, &[0x03]);
        assert!(!thri.load(Ordering::Relaxed));
    }

    #[test]
    fn a_saved_uart_continues_on_a_new_one_and_bad_states_are_refused() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(IrqTrigger::new(evt), Box::new(std::io::sink()));
        dev.write(3, &[0x80]); // divisor latch
        dev.write(0, &[0x01]);
        dev.write(3, &[0x03]); // 8N1
        dev.write(1, &[0x03]); // IER: data and THR empty
        dev.write(7, &[0x5a]); // scratch
        assert_eq!(dev.enqueue_input(b"abc"), 3);
        let saved = dev.save();
        assert_eq!(saved.in_buffer, b"abc");
        let json = serde_json::to_string(&saved).unwrap();

        let evt2 = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let mut other = SerialDevice::new(
            IrqTrigger::new(evt2.try_clone().unwrap()),
            Box::new(out.clone()),
        );
        other
            .restore(&serde_json::from_str(&json).unwrap())
            .unwrap();
        assert_eq!(other.save(), saved);
        assert!(
            evt2.read().unwrap() >= 1,
            "the pending interrupt is raised again"
        );
        assert!(other.tx_side_effects().load(Ordering::Relaxed));
        let mut b = [0u8];
        other.read(7, &mut b);
        assert_eq!(b, [0x5a]);
        other.read(0, &mut b);
        assert_eq!(b, [b'a'], "the FIFO goes on where it was");
        other.write(0, b"z");
        assert_eq!(&*out.0.lock().unwrap(), b"z", "the sink is kept");

        let mut bad = saved.clone();
        bad.in_buffer = vec![0; FIFO_SIZE + 1];
        assert_eq!(
            other.restore(&bad),
            Err(SerialStateError::FifoOverflow(FIFO_SIZE + 1))
        );
        assert!(serde_json::from_str::<SerialSnapshot>(r#"{"scratch":1,"extra":2}"#).is_err());
    }
}
