//! virtio-net on a TAP device.
//!
//! One receive and one transmit queue, served by the device's worker thread, which also
//! waits (edge-triggered) on the TAP. Frames carry a 12-byte `virtio_net_hdr_v1` both in
//! the queues and on the TAP (`IFF_VNET_HDR`), so checksum and segmentation offloads pass
//! straight through. Without `MRG_RXBUF`, a received frame must fit in one buffer chain;
//! Linux then posts 64 KiB chains when it accepts TSO ("big packets").
//!
//! A third queue, the control queue (`CTRL_VQ`), carries one command: the driver's
//! acknowledgement of a link announcement (`GUEST_ANNOUNCE`). After a restore (a
//! snapshot's copy, later a migrated VM) the card sets `VIRTIO_NET_S_ANNOUNCE` in its
//! status and raises a configuration interrupt; Linux then sends gratuitous ARPs and
//! IPv6 neighbour advertisements for every address of the interface (so that switches
//! learn the VM's new port) and acknowledges, which clears the bit. Any other control
//! command is answered `VIRTIO_NET_ERR`: none of the features that would make a driver
//! send one (`CTRL_RX`, `CTRL_VLAN`, `MQ`, `CTRL_MAC_ADDR`...) is offered.

pub mod tap;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT, Reader, Writer};

use crate::state::{self, DeviceState, QueueSnapshot, StateError};
use crate::worker::{stop_worker, QueueHandler, Worker};
use crate::{
    device_type, features, pending_buffers, ActivateContext, ActivateError, GuestMemory, Interrupt,
    QueueError, VirtioDevice,
};
pub use tap::{FrameIo, Tap, TapError, VNET_HDR_LEN};

/// Queue size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: 64 KiB of TSO payload plus headers.
pub const MAX_FRAME: usize = 65562;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// Queue size of the control queue.
pub const CTRL_QUEUE_SIZE: u16 = 64;

/// Status bits (config space, offset 6).
pub mod status {
    /// The link is up.
    pub const LINK_UP: u16 = 1;
    /// The driver should announce the device on the network.
    pub const ANNOUNCE: u16 = 2;
}

/// The control queue's protocol (`virtio_net_ctrl_hdr`, then data, then a status byte).
mod ctrl {
    /// Class of the announcement's acknowledgement.
    pub const CLASS_ANNOUNCE: u8 = 3;
    /// The acknowledgement.
    pub const ANNOUNCE_ACK: u8 = 0;
    /// Done.
    pub const OK: u8 = 0;
    /// Refused.
    pub const ERR: u8 = 1;
    /// The longest command read (anything longer is refused unread).
    pub const MAX_COMMAND: usize = 4096;
}

/// Network device feature bits.
pub mod feature {
    /// The device handles partial checksums on transmit.
    pub const CSUM: u64 = 1 << 0;
    /// The driver handles partial checksums on receive.
    pub const GUEST_CSUM: u64 = 1 << 1;
    /// The MAC address is in config space.
    pub const MAC: u64 = 1 << 5;
    /// The driver accepts TSOv4.
    pub const GUEST_TSO4: u64 = 1 << 7;
    /// The driver accepts TSOv6.
    pub const GUEST_TSO6: u64 = 1 << 8;
    /// The device accepts TSOv4.
    pub const HOST_TSO4: u64 = 1 << 11;
    /// The device accepts TSOv6.
    pub const HOST_TSO6: u64 = 1 << 12;
    /// Link status in config space.
    pub const STATUS: u64 = 1 << 16;
    /// A control queue.
    pub const CTRL_VQ: u64 = 1 << 17;
    /// The driver announces the device when the status says so.
    pub const GUEST_ANNOUNCE: u64 = 1 << 21;
}

/// Counters of one network device.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes delivered to the guest (without headers).
    pub rx_bytes: AtomicU64,
    /// Frames dropped on receive (buffer too small, bad buffer).
    pub rx_dropped: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Bytes sent by the guest (without headers).
    pub tx_bytes: AtomicU64,
    /// Frames dropped on transmit (malformed, too large, TAP refused).
    pub tx_dropped: AtomicU64,
    /// Times a direction waited for its rate limit.
    pub throttled: AtomicU64,
    /// Link announcements asked of the driver (after a restore).
    pub announces: AtomicU64,
    /// Announcements the driver acknowledged.
    pub announces_acked: AtomicU64,
    /// Control commands refused (unknown or malformed).
    pub ctrl_refused: AtomicU64,
}

/// A network card.
pub struct Net {
    name: String,
    tap: Arc<Tap>,
    mac: [u8; 6],
    /// The status word of config space, which the worker changes (an acknowledged
    /// announcement) while the transport reads it.
    status: Arc<AtomicU16>,
    counters: Arc<NetCounters>,
    worker: Option<Worker<NetHandler>>,
    /// Restored: ask the driver to announce the card when it serves again.
    announce_pending: bool,
    /// A frame read from the TAP but not delivered when the device was paused.
    pending_frame: Option<Vec<u8>>,
    /// Limits of each direction (the same limits, one set of buckets each).
    rate_limit: crate::ratelimit::RateLimit,
}

impl Net {
    /// Limits each direction of the card's traffic (bytes and frames per second).
    pub fn with_rate_limit(mut self, limit: crate::ratelimit::RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// A card named `name` on `tap` with MAC address `mac`.
    pub fn new(name: &str, tap: Tap, mac: [u8; 6]) -> Self {
        Self {
            name: name.to_string(),
            tap: Arc::new(tap),
            mac,
            status: Arc::new(AtomicU16::new(status::LINK_UP)),
            counters: Arc::default(),
            worker: None,
            announce_pending: false,
            pending_frame: None,
            rate_limit: Default::default(),
        }
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// The TAP interface name.
    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    /// Config space: MAC, status, one queue pair.
    fn config(&self) -> [u8; 10] {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&self.status.load(Ordering::Acquire).to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config
    }
}

impl crate::CounterSet for NetCounters {
    fn sample(&self) -> Vec<(&'static str, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("rx_frames", load(&self.rx_frames)),
            ("rx_bytes", load(&self.rx_bytes)),
            ("rx_dropped", load(&self.rx_dropped)),
            ("tx_frames", load(&self.tx_frames)),
            ("tx_bytes", load(&self.tx_bytes)),
            ("tx_dropped", load(&self.tx_dropped)),
            ("throttled", load(&self.throttled)),
            ("announces", load(&self.announces)),
            ("announces_acked", load(&self.announces_acked)),
            ("ctrl_refused", load(&self.ctrl_refused)),
        ]
    }
}

impl VirtioDevice for Net {
    fn metrics(&self) -> Arc<dyn crate::CounterSet> {
        self.counters.clone()
    }
    fn device_type(&self) -> u32 {
        device_type::NET
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::CSUM
            | feature::GUEST_CSUM
            | feature::MAC
            | feature::GUEST_TSO4
            | feature::GUEST_TSO6
            | feature::HOST_TSO4
            | feature::HOST_TSO6
            | feature::STATUS
            | feature::CTRL_VQ
            | feature::GUEST_ANNOUNCE
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config(), offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let rx = ctx.take_ready_queue(RX)?;
        let tx = ctx.take_ready_queue(TX)?;
        let acked = ctx.acked_features;
        // The control queue exists for a driver that accepted it (and must be set up then).
        let ctrl = if acked & feature::CTRL_VQ != 0 {
            Some(ctx.take_ready_queue(CTRL)?)
        } else {
            None
        };
        // What the guest accepts on receive decides what the TAP may hand us.
        let mut offload = 0;
        if acked & feature::GUEST_CSUM != 0 {
            offload |= tap::TUN_F_CSUM;
            if acked & feature::GUEST_TSO4 != 0 {
                offload |= tap::TUN_F_TSO4;
            }
            if acked & feature::GUEST_TSO6 != 0 {
                offload |= tap::TUN_F_TSO6;
            }
        }
        self.tap.set_offload(offload)?;
        let mut frame = vec![0u8; MAX_FRAME];
        let frame_len = self.pending_frame.take().map(|f| {
            frame[..f.len()].copy_from_slice(&f);
            f.len()
        });
        let interrupt = ctx.interrupt.clone();
        let handler = NetHandler {
            mem: ctx.mem,
            rx,
            tx,
            ctrl,
            status: self.status.clone(),
            interrupt: ctx.interrupt,
            tap: self.tap.clone(),
            counters: self.counters.clone(),
            frame,
            frame_len,
            name: self.name.clone(),
            tx_limit: limiter(self.rate_limit)?,
            rx_limit: limiter(self.rate_limit)?,
        };
        // Host events: 0 the TAP, then the timers of the transmit and receive limits.
        let mut fds = vec![self.tap.as_raw_fd()];
        fds.extend(handler.tx_limit.as_ref().map(|l| l.fd()));
        fds.extend(handler.rx_limit.as_ref().map(|l| l.fd()));
        self.worker = Some(Worker::spawn_with_fds(
            format!("virtio-{}", self.name),
            ctx.queue_evts,
            &fds,
            handler,
        )?);
        debug!(device = %self.name, tap = self.tap.name(), offload, "virtio-net active");
        if std::mem::take(&mut self.announce_pending) {
            let can = feature::CTRL_VQ | feature::GUEST_ANNOUNCE;
            if acked & can == can {
                self.status.fetch_or(status::ANNOUNCE, Ordering::AcqRel);
                self.counters.announces.fetch_add(1, Ordering::Relaxed);
                interrupt.signal_config();
                info!(device = %self.name, "virtio-net: asking the guest to announce the card");
            } else {
                debug!(device = %self.name, "virtio-net: the driver cannot announce the card");
            }
        }
        Ok(())
    }
    fn reset(&mut self) {
        let _ = stop_worker(&mut self.worker, &self.name);
        self.pending_frame = None;
        self.status.store(status::LINK_UP, Ordering::Release);
        self.announce_pending = false;
    }
    fn pause(&mut self) -> Result<DeviceState, StateError> {
        let mut queues = Vec::new();
        if let Some(h) = stop_worker(&mut self.worker, &self.name)? {
            queues.push((RX, QueueSnapshot::of(&h.rx)));
            queues.push((TX, QueueSnapshot::of(&h.tx)));
            if let Some(c) = &h.ctrl {
                queues.push((CTRL, QueueSnapshot::of(c)));
            }
            self.pending_frame = h.frame_len.map(|n| h.frame[..n].to_vec());
        }
        Ok(DeviceState {
            queues,
            device: state::to_value(&NetState {
                mac: self.mac,
                pending_frame: self.pending_frame.clone(),
            }),
        })
    }
    fn restore(&mut self, saved: &serde_json::Value) -> Result<(), StateError> {
        let saved: NetState = state::from_value(&self.name, saved)?;
        if saved.mac != self.mac {
            // A copy beside its original gets its own MAC: the card shows it from now
            // on; the guest's driver read the saved one at probe and keeps it until the
            // card is probed again (a driver rebind, or the guest agent setting it).
            info!(
                device = %self.name,
                saved = %quantix_vmm_api::mac::format(&saved.mac),
                now = %quantix_vmm_api::mac::format(&self.mac),
                "virtio-net: restored with a new MAC; the guest takes it when it probes the card again"
            );
        }
        if let Some(f) = &saved.pending_frame {
            if !(VNET_HDR_LEN..=MAX_FRAME).contains(&f.len()) {
                return Err(StateError::Invalid(format!(
                    "{}: a pending frame of {} bytes",
                    self.name,
                    f.len()
                )));
            }
        }
        self.pending_frame = saved.pending_frame;
        // A restored card may sit on another port of the network than the one the
        // guest's neighbours knew: have the guest announce it.
        self.announce_pending = true;
        Ok(())
    }
}

/// A card's own saved state.
#[derive(serde::Serialize, serde::Deserialize)]
struct NetState {
    /// The MAC the card had (a restore may give it another).
    mac: [u8; 6],
    /// A received frame (with its virtio-net header) not yet delivered to the guest.
    pending_frame: Option<Vec<u8>>,
}

pub(crate) struct NetHandler {
    mem: Arc<GuestMemory>,
    rx: Queue,
    tx: Queue,
    /// The control queue, when the driver accepted it.
    ctrl: Option<Queue>,
    status: Arc<AtomicU16>,
    interrupt: Arc<Interrupt>,
    tap: Arc<dyn FrameIo>,
    counters: Arc<NetCounters>,
    /// A frame read from the TAP, waiting for a receive buffer.
    frame: Vec<u8>,
    frame_len: Option<usize>,
    name: String,
    tx_limit: Option<crate::ratelimit::RateLimiter>,
    rx_limit: Option<crate::ratelimit::RateLimiter>,
}

fn limiter(
    limit: crate::ratelimit::RateLimit,
) -> std::io::Result<Option<crate::ratelimit::RateLimiter>> {
    limit
        .is_limited()
        .then(|| crate::ratelimit::RateLimiter::new(limit))
        .transpose()
}

impl NetHandler {
    /// A handler on `io` (fuzz targets and tests; the device builds its own).
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn for_fuzzing(
        mem: Arc<GuestMemory>,
        rx: Queue,
        tx: Queue,
        interrupt: Arc<Interrupt>,
        io: Arc<dyn FrameIo>,
    ) -> Self {
        Self {
            mem,
            rx,
            tx,
            ctrl: None,
            status: Arc::new(AtomicU16::new(status::LINK_UP)),
            interrupt,
            tap: io,
            counters: Arc::default(),
            frame: vec![0u8; MAX_FRAME],
            frame_len: None,
            name: "fuzz".into(),
            tx_limit: None,
            rx_limit: None,
        }
    }

    /// Its counters.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn counters(&self) -> &NetCounters {
        &self.counters
    }

    /// Moves frames from the TAP to the guest until the TAP is empty or the guest has
    /// no buffers (then the frame waits and the RX queue's notification resumes us).
    fn receive(&mut self) -> Result<(), QueueError> {
        let mem = self.mem.clone();
        let mut delivered = false;
        loop {
            let len = match self.frame_len {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.frame) {
                    Ok(n) => {
                        self.frame_len = Some(n);
                        n
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        warn!(device = %self.name, error = %e, "TAP read failed");
                        break;
                    }
                },
            };
            if let Some(l) = self.rx_limit.as_mut() {
                // The frame waits (read from the TAP, not delivered) for the rx timer.
                if !l.consume(len as u64) {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            if pending_buffers(&self.rx, mem.as_ref())? == 0 {
                // Ask to be told when buffers arrive; they may have arrived meanwhile.
                if self.rx.enable_notification(mem.as_ref())? {
                    continue;
                }
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(mem.as_ref()) else {
                break;
            };
            let head = chain.head_index();
            let written = match Writer::new(mem.as_ref(), chain) {
                Ok(mut w) if w.available_bytes() >= len => {
                    use std::io::Write;
                    match w.write_all(&self.frame[..len]) {
                        Ok(()) => len as u32,
                        Err(_) => 0,
                    }
                }
                _ => 0,
            };
            if written == 0 {
                self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .rx_bytes
                    .fetch_add((len - VNET_HDR_LEN.min(len)) as u64, Ordering::Relaxed);
            }
            self.rx.add_used(mem.as_ref(), head, written)?;
            self.frame_len = None;
            delivered = true;
        }
        if delivered && self.rx.needs_notification(mem.as_ref())? {
            self.interrupt.signal_used();
        }
        Ok(())
    }

    /// Answers the driver's control commands: the acknowledgement of an announcement
    /// clears the status bit; anything else is refused.
    fn control(&mut self) -> Result<(), QueueError> {
        let Some(queue) = self.ctrl.as_mut() else {
            return Ok(());
        };
        let (mem, status, counters, name) =
            (self.mem.as_ref(), &self.status, &self.counters, &self.name);
        crate::serve_queue(queue, mem, &self.interrupt, |chain| {
            let mut command = Vec::new();
            let mut reader = match Reader::new(mem, chain.clone()) {
                Ok(r) if r.available_bytes() <= ctrl::MAX_COMMAND => r,
                _ => {
                    counters.ctrl_refused.fetch_add(1, Ordering::Relaxed);
                    return 0;
                }
            };
            {
                use std::io::Read;
                if reader.read_to_end(&mut command).is_err() {
                    counters.ctrl_refused.fetch_add(1, Ordering::Relaxed);
                    return 0;
                }
            }
            let reply = match command.as_slice() {
                [ctrl::CLASS_ANNOUNCE, ctrl::ANNOUNCE_ACK, ..] => {
                    status.fetch_and(!status::ANNOUNCE, Ordering::AcqRel);
                    counters.announces_acked.fetch_add(1, Ordering::Relaxed);
                    info!(device = %name, "virtio-net: the guest announced the card");
                    ctrl::OK
                }
                _ => {
                    counters.ctrl_refused.fetch_add(1, Ordering::Relaxed);
                    let (class, cmd) = (command.first().copied(), command.get(1).copied());
                    quantix_devices::guest_warn!("virtio-net-ctrl", device = %name, class = ?class, cmd = ?cmd, "virtio-net: unsupported control command");
                    ctrl::ERR
                }
            };
            match Writer::new(mem, chain) {
                Ok(mut w) if w.available_bytes() >= 1 => {
                    use std::io::Write;
                    if w.write_all(&[reply]).is_ok() {
                        1
                    } else {
                        0
                    }
                }
                _ => {
                    counters.ctrl_refused.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
        })
    }

    /// Sends every frame the guest queued (that its rate limit lets through now).
    fn transmit(&mut self) -> Result<(), QueueError> {
        let (mem, tap, counters, limit) = (
            self.mem.as_ref(),
            &self.tap,
            &self.counters,
            &mut self.tx_limit,
        );
        let mut buf = Vec::with_capacity(MAX_FRAME);
        crate::serve_queue_deferred(&mut self.tx, mem, &self.interrupt, |chain| {
            if let Some(l) = limit.as_mut() {
                let bytes: u64 = chain.clone().take(256).map(|d| u64::from(d.len())).sum();
                if !l.consume(bytes) {
                    counters.throttled.fetch_add(1, Ordering::Relaxed);
                    return crate::Served::Busy;
                }
            }
            buf.clear();
            let ok = match Reader::new(mem, chain) {
                Ok(mut r) if (VNET_HDR_LEN..=MAX_FRAME).contains(&r.available_bytes()) => {
                    use std::io::Read;
                    r.read_to_end(&mut buf).is_ok()
                }
                _ => false,
            };
            if ok && tap.write_frame(&buf).is_ok() {
                counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                counters
                    .tx_bytes
                    .fetch_add((buf.len() - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            } else {
                counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            // Transmit buffers are only read; nothing is written into them.
            crate::Served::Done(0)
        })
    }
}

impl QueueHandler for NetHandler {
    fn process(&mut self, index: usize) -> Result<(), QueueError> {
        match index {
            RX => self.receive(),
            TX => self.transmit(),
            CTRL => self.control(),
            _ => Ok(()),
        }
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn host_event(&mut self, index: usize) -> Result<(), QueueError> {
        // 0: the TAP; then the tx limit's timer (if any), then the rx limit's.
        let tx_timer = self.tx_limit.as_ref().map(|_| 1);
        let rx_timer = self
            .rx_limit
            .as_ref()
            .map(|_| 1 + usize::from(tx_timer.is_some()));
        if Some(index) == tx_timer {
            if let Some(l) = self.tx_limit.as_mut() {
                l.on_timer();
            }
            return self.transmit();
        }
        if Some(index) == rx_timer {
            if let Some(l) = self.rx_limit.as_mut() {
                l.on_timer();
            }
        }
        self.receive()
    }
}

/// Parses a unicast MAC address (the configuration's parser).
pub use quantix_vmm_api::mac::parse as parse_mac;

/// A random locally administered unicast MAC address in QEMU's 52:54:00 style prefix.
pub fn random_mac() -> [u8; 6] {
    let mut tail = [0u8; 3];
    // SAFETY: filling a 3-byte local buffer.
    let n = unsafe { libc::getrandom(tail.as_mut_ptr().cast(), 3, 0) };
    if n != 3 {
        // Fall back to something unique per process.
        let pid = std::process::id().to_le_bytes();
        tail.copy_from_slice(&pid[..3]);
    }
    [0x52, 0x54, 0x00, tail[0], tail[1], tail[2]]
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counting(std::sync::atomic::AtomicUsize);
    impl FrameIo for Counting {
        fn read_frame(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn write_frame(&self, f: &[u8]) -> io::Result<usize> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(f.len())
        }
    }

    #[test]
    fn a_transmit_rate_limit_holds_frames_in_the_ring() {
        use crate::worker::QueueHandler;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::GuestAddress;
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        for i in 0..6u64 {
            let chain = [RawDescriptor::from(SplitDescriptor::new(
                0x8_0000 + i * 0x1000,
                (VNET_HDR_LEN + 60) as u32,
                0,
                0,
            ))];
            vq.add_desc_chains(&chain, i as u16).unwrap();
        }
        let io = Arc::new(Counting(Default::default()));
        let interrupt = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        ));
        let mut h = NetHandler::for_fuzzing(
            mem.clone(),
            Queue::new(16).unwrap(),
            vq.create_queue().unwrap(),
            interrupt,
            io.clone(),
        );
        // Two frames at once, then 50 a second.
        h.tx_limit = limiter(crate::ratelimit::RateLimit {
            ops_per_sec: 50,
            ops_burst: 2,
            ..Default::default()
        })
        .unwrap();
        h.process(TX).unwrap();
        assert_eq!(io.0.load(Ordering::Relaxed), 2, "the burst, and no more");
        assert!(h.counters.throttled.load(Ordering::Relaxed) >= 1);
        // The tx limiter's timer (host event 1) lets the rest through as it refills.
        let start = std::time::Instant::now();
        while io.0.load(Ordering::Relaxed) < 6 {
            let mut p = libc::pollfd {
                fd: h.tx_limit.as_ref().unwrap().fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut p, 1, 200) };
            h.host_event(1).unwrap();
            assert!(start.elapsed() < std::time::Duration::from_secs(10));
        }
        assert!(start.elapsed() >= std::time::Duration::from_millis(60));
    }

    #[test]
    fn the_acknowledged_announcement_clears_the_status_bit_and_other_commands_fail() {
        use crate::worker::QueueHandler;
        use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
        use virtio_queue::mock::MockSplitQueue;
        use vm_memory::{Bytes, GuestAddress};
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap());
        let vq = MockSplitQueue::new(mem.as_ref(), 16);
        const NEXT: u16 = 1; // VRING_DESC_F_NEXT
        const WRITE: u16 = 2; // VRING_DESC_F_WRITE
                              // Three commands: the ACK, an unknown one (class 0 = RX, cmd 0 = promisc, 1 data
                              // byte), and one without room for the status byte.
        let commands: [(&[u8], bool); 3] = [(&[3, 0], true), (&[0, 0, 1], true), (&[3, 0], false)];
        for (i, (cmd, reply)) in commands.iter().enumerate() {
            let base = 0x8_0000 + i as u64 * 0x1000;
            mem.write_slice(cmd, GuestAddress(base)).unwrap();
            let head = (i * 2) as u16;
            let mut chain = vec![RawDescriptor::from(SplitDescriptor::new(
                base,
                cmd.len() as u32,
                if *reply { NEXT } else { 0 },
                head + 1,
            ))];
            if *reply {
                mem.write_slice(&[0xff], GuestAddress(base + 0x800))
                    .unwrap();
                chain.push(RawDescriptor::from(SplitDescriptor::new(
                    base + 0x800,
                    1,
                    WRITE,
                    0,
                )));
            }
            vq.add_desc_chains(&chain, head).unwrap();
        }
        let interrupt = Arc::new(Interrupt::new(
            vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        ));
        let io = Arc::new(Counting(Default::default()));
        let mut h = NetHandler::for_fuzzing(
            mem.clone(),
            Queue::new(16).unwrap(),
            Queue::new(16).unwrap(),
            interrupt,
            io,
        );
        h.ctrl = Some(vq.create_queue().unwrap());
        h.status
            .store(status::LINK_UP | status::ANNOUNCE, Ordering::Release);
        h.process(CTRL).unwrap();
        assert_eq!(h.status.load(Ordering::Acquire), status::LINK_UP);
        let byte = |a: u64| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(byte(0x8_0800), ctrl::OK);
        assert_eq!(byte(0x8_1800), ctrl::ERR);
        let c = h.counters();
        assert_eq!(
            c.announces_acked.load(Ordering::Relaxed),
            2,
            "the ACK without a reply byte still acknowledges"
        );
        assert_eq!(c.ctrl_refused.load(Ordering::Relaxed), 2);
        // Every chain was given back.
        assert_eq!(vq.used().idx().load(), 3);
    }

    #[test]
    fn mac_addresses() {
        assert_eq!(
            parse_mac("52:54:00:12:34:ab"),
            Some([0x52, 0x54, 0, 0x12, 0x34, 0xab])
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:zz",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "525400123456",
            "52:54:00:12:34:567",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad:?}");
        }
        let m = random_mac();
        assert_eq!(&m[..3], &[0x52, 0x54, 0]);
    }
}
