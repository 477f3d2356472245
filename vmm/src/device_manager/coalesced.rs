//! Coalesced port I/O for the serial port's transmit register.
//!
//! Every byte a Linux guest prints on its 8250 console costs two exits to user space: a
//! read of the line status register (LSR), to see that the transmitter is empty, and a
//! write of the transmit holding register (THR). An exit to user space is cheap on bare
//! metal but costs about 100 µs in a nested host, and a distribution kernel prints tens of
//! kilobytes while it boots. With `KVM_CAP_COALESCED_PIO`, KVM appends writes to a
//! registered port range to a ring page shared with the VMM instead of exiting; the
//! THR write of each byte then costs nothing, and only the LSR read exits.
//!
//! The VMM replays the ring on the serial device, in order:
//! - before it handles any other access of any vCPU to the UART, so that the guest never
//!   sees a register access overtake an earlier write (a divisor latch write, a loopback
//!   byte); when the ring is full KVM makes the next write an ordinary exit, which replays
//!   first;
//! - every 50 ms on a `serial-flush` thread, so that the last line a quiet guest printed
//!   (a panic, say) reaches the sink (a thread of its own: a sink that blocks, such as a
//!   full stdout pipe, must not stall the main loop and its control socket);
//! - when the VM stops.
//!
//! A delayed THR write is otherwise invisible to a guest, except through an interrupt it
//! may wait for: the THR-empty interrupt (IER bit 1, interrupt-driven transmission by the
//! Linux tty layer once a process writes to the terminal), which the guest waits for after
//! each burst, and in loopback mode (MCR bit 4) the received-data interrupt of the byte
//! coming back. Either would come only at the next replay. So the port is coalesced only
//! while neither applies; [`SerialTxCoalescer::follow_guest`], called after every write
//! to the UART, registers and unregisters the zone as the guest's IER and MCR change.
//! Linux polls the console (interrupts disabled) for every kernel message, boot included.
//!
//! Only the UART's own registers can observe the order of its writes, so the ring is
//! replayed before exits to the UART's ports, not before every exit: a sink that blocks
//! (a full stdout pipe) then stalls only the vCPUs that use the UART, as it did before.

use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, VmFd};
use quantix_devices::legacy::serial::{
    SerialCounters, SerialDevice, COM1_PORT_BASE, COM1_PORT_LEN,
};
use quantix_devices::BusDevice;
use tracing::{debug, warn};

/// How long coalesced output may wait when the guest makes no I/O exit.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(50);

/// One write KVM recorded instead of exiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CoalescedWrite {
    /// Port (or guest-physical address, for an MMIO zone).
    pub addr: u64,
    /// Bytes written, 1 to 8.
    pub len: usize,
    /// The data; only `len` bytes count.
    pub data: [u8; 8],
    /// A port write (else MMIO).
    pub pio: bool,
}

impl CoalescedWrite {
    /// The bytes written.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// Who owns the ring page.
enum Backing {
    /// A `MAP_SHARED` mapping of a vCPU fd's coalesced-MMIO page, `len` bytes.
    Mmap { len: usize },
    /// A heap page that stands in for KVM's in tests.
    #[cfg(test)]
    Heap(#[allow(dead_code)] Box<[u64]>),
}

/// KVM's ring of coalesced writes (one per VM; every vCPU fd maps the same page).
///
/// KVM appends at `last`; the VMM consumes at `first`. Consumers are serialised by a lock,
/// so any thread may drain.
pub struct CoalescedRing {
    page: NonNull<u8>,
    /// Entries that fit in the page (`KVM_COALESCED_MMIO_MAX`).
    capacity: u32,
    backing: Backing,
    consumer: Mutex<()>,
    warned: AtomicBool,
}

// SAFETY: the page is shared memory that the kernel writes concurrently anyway; this type
// only touches it through atomics (`first`, `last`) and volatile reads of entries that the
// kernel published before it advanced `last`, and one consumer at a time (`consumer` lock).
unsafe impl Send for CoalescedRing {}
// SAFETY: as for Send: every access goes through atomics or the consumer lock.
unsafe impl Sync for CoalescedRing {}

const HEADER: usize = std::mem::size_of::<kvm_coalesced_mmio_ring>();
const ENTRY: usize = std::mem::size_of::<kvm_coalesced_mmio>();

impl CoalescedRing {
    /// Maps the ring page through a vCPU fd.
    pub fn map(vcpu: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: sysconf has no memory effects; the result is checked.
        let page_size = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(io::Error::last_os_error()),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page_size as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of a vCPU fd at the offset KVM documents
        // for the coalesced ring; nothing else is mapped over; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page_size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                offset,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let page = NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap at 0"))?;
        Ok(Self::from_page(
            page,
            page_size,
            Backing::Mmap { len: page_size },
        ))
    }

    fn from_page(page: NonNull<u8>, page_size: usize, backing: Backing) -> Self {
        Self {
            page,
            capacity: ((page_size - HEADER) / ENTRY) as u32,
            backing,
            consumer: Mutex::new(()),
            warned: AtomicBool::new(false),
        }
    }

    fn first(&self) -> &AtomicU32 {
        // SAFETY: `first` is the ring's first field, a 4-aligned u32 at the start of a
        // page that lives as long as `self`.
        unsafe { AtomicU32::from_ptr(self.page.as_ptr().cast::<u32>()) }
    }

    fn last(&self) -> &AtomicU32 {
        // SAFETY: `last` is the u32 right after `first`, in the same live page.
        unsafe { AtomicU32::from_ptr(self.page.as_ptr().cast::<u32>().add(1)) }
    }

    /// Whether KVM recorded nothing since the last drain (a hint: it may append any time).
    pub fn is_empty(&self) -> bool {
        self.first().load(Ordering::Acquire) == self.last().load(Ordering::Acquire)
    }

    /// Hands every recorded write to `replay`, oldest first, and frees its slot. Returns
    /// how many there were.
    pub fn drain(&self, mut replay: impl FnMut(CoalescedWrite)) -> usize {
        let _one_consumer = self.consumer.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        loop {
            let first = self.first().load(Ordering::Relaxed);
            // Acquire: the entry's contents were written before KVM published `last`.
            let last = self.last().load(Ordering::Acquire);
            if first == last {
                return n;
            }
            if first >= self.capacity || last >= self.capacity {
                // Not a state KVM produces; start over rather than read out of the page.
                // (KVM itself refuses to append while `last` is out of range: writes exit.)
                if !self.warned.swap(true, Ordering::Relaxed) {
                    warn!(
                        first,
                        last, "coalesced I/O ring indices out of range; ring reset"
                    );
                }
                self.first()
                    .store(last.min(self.capacity - 1), Ordering::Release);
                return n;
            }
            // SAFETY: `first` < capacity, so the entry lies inside the page; KVM finished
            // writing it before it advanced `last` past it, and does not touch it again
            // until we advance `first`.
            let entry = unsafe {
                self.page
                    .as_ptr()
                    .add(HEADER + first as usize * ENTRY)
                    .cast::<kvm_coalesced_mmio>()
                    .read_volatile()
            };
            replay(CoalescedWrite {
                addr: entry.phys_addr,
                len: (entry.len as usize).clamp(1, 8),
                data: entry.data,
                // SAFETY: `pad` and `pio` are both a u32 at the same place; any value is valid.
                pio: unsafe { entry.__bindgen_anon_1.pio } != 0,
            });
            n += 1;
            // Release: we are done with the slot before KVM may reuse it.
            self.first()
                .store((first + 1) % self.capacity, Ordering::Release);
        }
    }
}

impl Drop for CoalescedRing {
    fn drop(&mut self) {
        match self.backing {
            Backing::Mmap { len } => {
                // SAFETY: unmapping the page this ring mapped; nothing refers to it after drop.
                unsafe { libc::munmap(self.page.as_ptr().cast(), len) };
            }
            #[cfg(test)]
            Backing::Heap(_) => {}
        }
    }
}

/// Coalesces the guest's writes to COM1's transmit register while it polls the port.
pub struct SerialTxCoalescer {
    ring: CoalescedRing,
    vm: Arc<VmFd>,
    /// The UART the writes were meant for (replayed on it directly: the bus entry of the
    /// port is locked while an access to it replays the ring).
    serial: Arc<Mutex<SerialDevice>>,
    /// A THR write has a guest-visible effect besides output (kept by the serial device).
    tx_side_effects: Arc<AtomicBool>,
    /// The zone is registered with KVM. Read without a lock; changed only under `zone`.
    active: AtomicBool,
    /// Serialises (un)registration; true once KVM refused a change (then left as it is).
    zone: Mutex<bool>,
    /// Counts the bytes that reached the device without an exit.
    counters: Arc<SerialCounters>,
}

impl SerialTxCoalescer {
    /// Sets up coalescing of COM1's THR writes, registered at once (a guest starts with
    /// the port's interrupts disabled). `None` when KVM lacks `KVM_CAP_COALESCED_PIO` or
    /// the ring cannot be mapped: every write then exits, as without it.
    pub fn new(
        vm: Arc<VmFd>,
        vcpu: &impl AsRawFd,
        serial: Arc<Mutex<SerialDevice>>,
    ) -> Option<Self> {
        if !vm.check_extension(Cap::CoalescedPio) {
            debug!("KVM has no coalesced port I/O; every serial write exits");
            return None;
        }
        let ring = match CoalescedRing::map(vcpu) {
            Ok(ring) => ring,
            Err(e) => {
                warn!(error = %e, "cannot map the coalesced I/O ring; every serial write exits");
                return None;
            }
        };
        let (tx_side_effects, counters) = {
            let s = serial.lock().unwrap_or_else(|p| p.into_inner());
            (s.tx_side_effects(), s.counters())
        };
        let this = Self {
            ring,
            vm,
            serial,
            tx_side_effects,
            active: AtomicBool::new(false),
            zone: Mutex::new(false),
            counters,
        };
        this.follow_guest();
        Some(this)
    }

    /// Whether THR writes are being coalesced now.
    pub fn active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    /// Starts the thread that replays the ring every [`FLUSH_INTERVAL`] while the zone is
    /// registered, until `stop` is set and the thread unparked.
    pub fn spawn_flusher(self: &Arc<Self>, stop: Arc<AtomicBool>) -> io::Result<JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("serial-flush".into())
            .spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    std::thread::park_timeout(FLUSH_INTERVAL);
                    if this.active() {
                        this.replay();
                    }
                }
            })
    }

    /// Plays every recorded write on the UART, oldest first. Cheap when none.
    pub fn replay(&self) {
        if self.ring.is_empty() {
            return;
        }
        let mut bytes = 0;
        let uart = COM1_PORT_BASE..COM1_PORT_BASE + COM1_PORT_LEN;
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        self.ring.drain(|w| {
            // Only COM1's THR is ever registered; anything else is not a state KVM
            // produces, and is dropped as an unclaimed write would be.
            if !w.pio || !uart.contains(&w.addr) {
                return;
            }
            if w.addr == COM1_PORT_BASE && w.len == 1 {
                bytes += 1;
            }
            serial.write(w.addr - COM1_PORT_BASE, w.bytes());
        });
        self.counters
            .tx_coalesced
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// Registers the zone while the guest polls the port and unregisters it while a THR
    /// write has an effect the guest can wait for. Called after every write to the UART.
    pub fn follow_guest(&self) {
        // SeqCst here and in the UART's store: a vCPU that changed the IER either sees the
        // zone state another vCPU set, or that vCPU (still under the lock) sees its IER.
        let want = |this: &Self| !this.tx_side_effects.load(Ordering::SeqCst);
        if self.active.load(Ordering::SeqCst) == want(self) {
            return;
        }
        let mut failed = self.zone.lock().unwrap_or_else(|p| p.into_inner());
        // Until the zone matches the IER as it is now, not as it was when we looked.
        while !*failed && self.active.load(Ordering::SeqCst) != want(self) {
            let wanted = want(self);
            let addr = IoEventAddress::Pio(COM1_PORT_BASE);
            let result = if wanted {
                self.vm.register_coalesced_mmio(addr, 1)
            } else {
                self.vm.unregister_coalesced_mmio(addr, 1)
            };
            match result {
                Ok(()) => {
                    self.active.store(wanted, Ordering::SeqCst);
                    debug!(
                        coalescing = wanted,
                        "serial transmit coalescing follows the guest's UART settings"
                    );
                }
                Err(e) => {
                    // Not retried on every write: a registered zone left behind still
                    // works, only with interrupts delayed to the flush thread's tick.
                    warn!(coalescing = wanted, error = %e, "cannot change the coalesced serial zone; coalescing stays as it is");
                    *failed = true;
                }
            }
        }
        drop(failed);
        // Writes another vCPU made while the zone was still registered.
        self.replay();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A heap page laid out like KVM's ring, and a writer that appends as KVM does.
    fn heap_ring() -> CoalescedRing {
        let mut page = vec![0u64; 4096 / 8].into_boxed_slice();
        let ptr = NonNull::new(page.as_mut_ptr().cast::<u8>()).unwrap();
        CoalescedRing::from_page(ptr, 4096, Backing::Heap(page))
    }

    /// Appends like the kernel's coalesced_mmio_write; false when full.
    fn kvm_append(ring: &CoalescedRing, addr: u64, data: &[u8]) -> bool {
        let last = ring.last().load(Ordering::Relaxed);
        let first = ring.first().load(Ordering::Acquire);
        if (last + 1) % ring.capacity == first {
            return false;
        }
        let mut e = kvm_coalesced_mmio {
            phys_addr: addr,
            len: data.len() as u32,
            ..Default::default()
        };
        e.__bindgen_anon_1.pio = 1;
        e.data[..data.len()].copy_from_slice(data);
        // SAFETY: test helper; `last` < capacity so the slot is inside the page.
        unsafe {
            ring.page
                .as_ptr()
                .add(HEADER + last as usize * ENTRY)
                .cast::<kvm_coalesced_mmio>()
                .write_volatile(e);
        }
        ring.last()
            .store((last + 1) % ring.capacity, Ordering::Release);
        true
    }

    fn drained(ring: &CoalescedRing) -> Vec<CoalescedWrite> {
        let mut out = Vec::new();
        ring.drain(|w| out.push(w));
        out
    }

    #[test]
    fn layout_matches_kvm() {
        assert_eq!(HEADER, 8);
        assert_eq!(ENTRY, 24);
        // KVM_COALESCED_MMIO_MAX for a 4 KiB page.
        assert_eq!(heap_ring().capacity, 170);
    }

    #[test]
    fn writes_come_back_in_order_across_the_wrap() {
        let ring = heap_ring();
        assert!(ring.is_empty());
        let mut expected = Vec::new();
        for round in 0..5u32 {
            // 100 per round: the indices wrap around the 170 slots more than once.
            for i in 0..100u32 {
                let byte = ((round * 100 + i) % 251) as u8;
                assert!(kvm_append(&ring, 0x3f8, &[byte]));
                expected.push(byte);
            }
            let got = drained(&ring);
            assert_eq!(got.len(), 100);
            assert!(got.iter().all(|w| w.addr == 0x3f8 && w.len == 1 && w.pio));
            let bytes: Vec<u8> = got.iter().map(|w| w.data[0]).collect();
            assert_eq!(bytes, expected[expected.len() - 100..]);
            assert!(ring.is_empty());
        }
    }

    #[test]
    fn a_full_ring_refuses_until_drained() {
        let ring = heap_ring();
        let mut n = 0;
        while kvm_append(&ring, 0x3f8, &[n as u8]) {
            n += 1;
        }
        assert_eq!(n, 169, "one slot stays free, as in KVM");
        assert_eq!(drained(&ring).len(), 169);
        assert!(kvm_append(&ring, 0x3f8, b"x"));
    }

    #[test]
    fn wider_writes_keep_their_length_and_bad_lengths_are_clamped() {
        let ring = heap_ring();
        assert!(kvm_append(&ring, 0x80, &[1, 2, 3, 4]));
        let got = drained(&ring);
        assert_eq!(got[0].bytes(), &[1, 2, 3, 4]);
        // A length KVM never writes still cannot reach past the entry's data.
        assert!(kvm_append(&ring, 0x80, &[9]));
        // SAFETY: test: patch the entry's len field in place.
        unsafe {
            let slot = ring
                .page
                .as_ptr()
                .add(HEADER + ENTRY)
                .cast::<kvm_coalesced_mmio>();
            (*slot).len = 4000;
        }
        assert_eq!(drained(&ring)[0].len, 8);
    }

    #[test]
    fn out_of_range_indices_reset_the_ring_instead_of_reading_outside_it() {
        let ring = heap_ring();
        ring.last().store(5000, Ordering::Release);
        assert!(drained(&ring).is_empty());
        assert!(ring.first().load(Ordering::Relaxed) < ring.capacity);
    }
}
