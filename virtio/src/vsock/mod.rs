//! virtio-vsock (device type 19): stream sockets between the guest and host processes,
//! mapped to Unix sockets on the host the way Firecracker does it (see [`muxer`]).
//!
//! - [`packet`]: the 44-byte header, its parsing and validation.
//! - [`connection`]: one connection's state machine and credit accounting, plain data.
//! - [`muxer`]: the connection table, the Unix sockets and their epoll set.
//! - this module: the device, its three queues (rx, tx, event) and its worker.
//!
//! The device's worker thread ([`crate::worker`]) waits on the queues' eventfds and on
//! one host fd: the muxer's own epoll fd, which is readable when any host socket needs
//! attention. Connections come and go inside the muxer's epoll set; the worker never
//! sees them. Everything the guest sends is checked; a bad packet is counted in
//! [`VsockCounters`] and answered with RST when it names a connection.

pub mod connection;
pub mod muxer;
pub mod packet;

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tracing::{debug, info, warn};
use virtio_queue::{Queue, QueueT, Reader, Writer};

use crate::state::{self, DeviceState, QueueSnapshot, StateError};
use crate::worker::{stop_worker, QueueHandler, Worker};
use crate::{
    device_type, features, pending_buffers, serve_queue, ActivateContext, ActivateError,
    GuestMemory, Interrupt, QueueError, VirtioDevice,
};
use muxer::Muxer;
use packet::{Header, HDR_LEN, MAX_PKT_DATA};

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// The guest CID range (0-2 are the hypervisor, local and host; `u32::MAX` is
/// `VMADDR_CID_ANY`).
pub use quantix_vmm_api::limits::{MAX_GUEST_CID, MIN_GUEST_CID};
/// Rounds of host events and rx filling per wake-up before the worker yields to its
/// other events (it kicks itself to come back).
const MAX_ROUNDS: usize = 64;

/// Counters of the vsock device.
#[derive(Debug, Default)]
pub struct VsockCounters {
    /// Packets the guest put on the tx queue.
    pub tx_packets: AtomicU64,
    /// Payload bytes from the guest accepted for host sockets.
    pub tx_bytes: AtomicU64,
    /// Packets delivered to the guest.
    pub rx_packets: AtomicU64,
    /// Payload bytes delivered to the guest.
    pub rx_bytes: AtomicU64,
    /// Malformed guest packets (short, bad CID, type, operation or length, bad
    /// descriptors, operations a connection's state does not allow).
    pub invalid_packets: AtomicU64,
    /// Guest packets for connections that do not exist (answered with RST).
    pub unknown_conn_packets: AtomicU64,
    /// Guest data beyond the credit we gave (the connection is reset).
    pub credit_violations: AtomicU64,
    /// Packets for the guest that were lost: unusable rx buffers, full RST backlog.
    pub rx_dropped: AtomicU64,
    /// RSTs sent to the guest.
    pub rst_sent: AtomicU64,
    /// Connections established or requested (either side).
    pub conns_opened: AtomicU64,
    /// Guest connection requests refused (no host socket, too many connections).
    pub conns_refused: AtomicU64,
    /// Host sockets closed without a connection (bad `CONNECT` line, limits).
    pub host_rejected: AtomicU64,
    /// Host-initiated connections the guest did not answer in time.
    pub connect_timeouts: AtomicU64,
    /// Queues the guest corrupted (the device then needs a reset).
    pub queue_errors: AtomicU64,
}

/// Errors setting up the device.
#[derive(Debug, Error)]
pub enum VsockError {
    /// A CID outside 3..=u32::MAX-1.
    #[error("guest CID {0} is reserved or too large: use 3 to {MAX_GUEST_CID}")]
    Cid(u64),
    /// The socket path (with a `_<port>` suffix) does not fit in `sun_path`.
    #[error("socket path {0} is too long: with its _<port> suffix it must fit in {max} bytes", max = muxer::MAX_SOCKET_PATH)]
    PathTooLong(PathBuf),
    /// The socket's directory does not exist.
    #[error("the directory of socket path {0} does not exist")]
    NoParent(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// A live listener already owns the path.
    #[error("socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// Binding or removing the socket failed.
    #[error("cannot listen on {path}: {source}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What is at a socket path.
enum PathState {
    Free,
    Stale,
}

fn inspect_socket_path(path: &Path) -> Result<PathState, VsockError> {
    let len = path.as_os_str().len() + "_4294967295".len();
    if len > muxer::MAX_SOCKET_PATH {
        return Err(VsockError::PathTooLong(path.to_path_buf()));
    }
    let parent = match path.parent() {
        Some(p) if p.as_os_str().is_empty() => Path::new("."),
        Some(p) => p,
        None => return Err(VsockError::NoParent(path.to_path_buf())),
    };
    if !parent.is_dir() {
        return Err(VsockError::NoParent(path.to_path_buf()));
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(PathState::Free),
        Ok(m) if !m.file_type().is_socket() => Err(VsockError::NotASocket(path.to_path_buf())),
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => Err(VsockError::InUse(path.to_path_buf())),
            Err(_) => Ok(PathState::Stale),
        },
    }
}

/// Checks `cid` and the socket path without changing anything: the path fits, its
/// directory exists, and nothing but a stale socket (no live listener) is there.
pub fn check_config(cid: u64, path: &Path) -> Result<(), VsockError> {
    if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
        return Err(VsockError::Cid(cid));
    }
    inspect_socket_path(path).map(drop)
}

/// The vsock device.
pub struct Vsock {
    cid: u64,
    path: PathBuf,
    listener: Arc<UnixListener>,
    /// Inode of the socket we bound, so that we only remove our own on drop.
    inode: u64,
    config: [u8; 8],
    counters: Arc<VsockCounters>,
    worker: Option<Worker<VsockHandler>>,
    /// The connections of a paused device, kept for `activate` to resume with.
    paused_muxer: Option<Muxer>,
    /// Restored from a snapshot: the host ends of the guest's connections are gone, so the
    /// guest is told to drop them all (VIRTIO_VSOCK_EVENT_TRANSPORT_RESET) on activation.
    transport_reset_pending: bool,
}

impl Vsock {
    /// A device for the guest `cid`, listening on `path` (a stale socket there is
    /// replaced) and connecting to `<path>_<port>`.
    pub fn new(cid: u64, path: &Path) -> Result<Self, VsockError> {
        check_config(cid, path)?;
        let bind_err = |source| VsockError::Bind {
            path: path.to_path_buf(),
            source,
        };
        if let PathState::Stale = inspect_socket_path(path)? {
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        let inode = std::fs::symlink_metadata(path)
            .map(|m| m.ino())
            .map_err(bind_err)?;
        Ok(Vsock {
            cid,
            path: path.to_path_buf(),
            listener: Arc::new(listener),
            inode,
            config: cid.to_le_bytes(),
            counters: Arc::default(),
            worker: None,
            paused_muxer: None,
            transport_reset_pending: false,
        })
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<VsockCounters> {
        self.counters.clone()
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.reset();
        if std::fs::symlink_metadata(&self.path).map(|m| m.ino()).ok() == Some(self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }
    fn name(&self) -> &str {
        "vsock"
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let rx = ctx.take_ready_queue(RX)?;
        let tx = ctx.take_ready_queue(TX)?;
        // The event queue only carries transport resets, sent after a restore.
        let evt = ctx.take_ready_queue(EVT)?;
        let muxer = match self.paused_muxer.take() {
            Some(m) => m,
            None => Muxer::new(
                self.cid,
                &self.path,
                Some(self.listener.clone()),
                self.counters.clone(),
            )?,
        };
        let fds = [muxer.epoll_fd()];
        let handler = VsockHandler {
            mem: ctx.mem,
            rx,
            tx,
            interrupt: ctx.interrupt,
            muxer,
            counters: self.counters.clone(),
            buf: vec![0u8; MAX_PKT_DATA],
            guest_cid: self.cid,
            evt: None,
        };
        let mut handler = handler;
        handler.evt = Some(evt);
        if std::mem::take(&mut self.transport_reset_pending) {
            handler.send_transport_reset();
        }
        self.worker = Some(Worker::spawn_with_fds(
            "virtio-vsock".into(),
            ctx.queue_evts,
            &fds,
            handler,
        )?);
        debug!(cid = self.cid, path = %self.path.display(), "virtio-vsock active");
        Ok(())
    }
    fn reset(&mut self) {
        let _ = stop_worker(&mut self.worker, "vsock");
        self.paused_muxer = None; // the driver's reset ends every connection
        self.transport_reset_pending = false;
    }
    fn metrics(&self) -> Arc<dyn crate::CounterSet> {
        self.counters.clone()
    }
    fn pause(&mut self) -> Result<DeviceState, StateError> {
        let mut queues = Vec::new();
        if let Some(h) = stop_worker(&mut self.worker, "vsock")? {
            queues.push((RX, QueueSnapshot::of(&h.rx)));
            queues.push((TX, QueueSnapshot::of(&h.tx)));
            if let Some(evt) = &h.evt {
                queues.push((EVT, QueueSnapshot::of(evt)));
            }
            // Live connections stay open while paused; resuming carries on with them.
            self.paused_muxer = Some(h.muxer);
        }
        Ok(DeviceState {
            queues,
            device: state::to_value(&VsockState { cid: self.cid }),
        })
    }
    fn restore(&mut self, saved: &serde_json::Value) -> Result<(), StateError> {
        let saved: VsockState = state::from_value("vsock", saved)?;
        if saved.cid != self.cid {
            // A copy restored beside the original has a CID of its own: the guest's driver
            // reads the configuration's CID again when it handles the transport reset.
            info!(
                saved = saved.cid,
                now = self.cid,
                "vsock: restored with a new guest CID"
            );
        }
        // Host sockets do not survive a snapshot: the guest must drop its connections (and
        // reads its CID again).
        self.transport_reset_pending = true;
        Ok(())
    }
}

/// The vsock device's own saved state. Connections are not saved: their host ends are
/// Unix sockets of this process; a restored guest is sent a transport reset instead.
#[derive(serde::Serialize, serde::Deserialize)]
struct VsockState {
    cid: u64,
}

impl crate::CounterSet for VsockCounters {
    fn sample(&self) -> Vec<(&'static str, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("tx_packets", load(&self.tx_packets)),
            ("tx_bytes", load(&self.tx_bytes)),
            ("rx_packets", load(&self.rx_packets)),
            ("rx_bytes", load(&self.rx_bytes)),
            ("invalid_packets", load(&self.invalid_packets)),
            ("unknown_conn_packets", load(&self.unknown_conn_packets)),
            ("credit_violations", load(&self.credit_violations)),
            ("rx_dropped", load(&self.rx_dropped)),
            ("rst_sent", load(&self.rst_sent)),
            ("conns_opened", load(&self.conns_opened)),
            ("conns_refused", load(&self.conns_refused)),
            ("host_rejected", load(&self.host_rejected)),
            ("connect_timeouts", load(&self.connect_timeouts)),
            ("queue_errors", load(&self.queue_errors)),
        ]
    }
}

pub(crate) struct VsockHandler {
    pub(crate) mem: Arc<GuestMemory>,
    pub(crate) rx: Queue,
    pub(crate) tx: Queue,
    pub(crate) interrupt: Arc<Interrupt>,
    pub(crate) muxer: Muxer,
    pub(crate) counters: Arc<VsockCounters>,
    pub(crate) buf: Vec<u8>,
    pub(crate) guest_cid: u64,
    /// The event queue (transport resets).
    pub(crate) evt: Option<Queue>,
}

/// Reads one packet from a tx chain and hands it to the muxer.
pub(crate) fn handle_tx_chain(
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
    muxer: &mut Muxer,
    counters: &VsockCounters,
    buf: &mut [u8],
    guest_cid: u64,
) {
    counters.tx_packets.fetch_add(1, Ordering::Relaxed);
    let invalid = || {
        counters.invalid_packets.fetch_add(1, Ordering::Relaxed);
    };
    let Ok(mut r) = Reader::new(mem, chain) else {
        return invalid();
    };
    let available = r.available_bytes();
    let mut hb = [0u8; HDR_LEN];
    if available < HDR_LEN || r.read_exact(&mut hb).is_err() {
        return invalid();
    }
    let hdr = Header::parse(&hb);
    if let Err(e) = hdr.validate_tx(guest_cid, available) {
        debug!(error = %e, "invalid vsock packet from the guest");
        return muxer.invalid_packet(&hdr, e.wants_rst());
    }
    let len = hdr.len as usize;
    let Some(data) = buf.get_mut(..len) else {
        return muxer.invalid_packet(&hdr, true);
    };
    if r.read_exact(data).is_err() {
        return muxer.invalid_packet(&hdr, true);
    }
    muxer.guest_packet(&hdr, data);
}

impl VsockHandler {
    fn process_tx(&mut self) -> Result<(), QueueError> {
        let mem = self.mem.clone();
        let (muxer, counters, buf, cid) = (
            &mut self.muxer,
            &self.counters,
            &mut self.buf,
            self.guest_cid,
        );
        serve_queue(&mut self.tx, &mem, &self.interrupt, |chain| {
            handle_tx_chain(&mem, chain, muxer, counters, buf, cid);
            // Transmit buffers are only read.
            0
        })
    }

    /// Moves packets from the muxer into the guest's rx buffers while both have some;
    /// returns how many buffers were used.
    pub(crate) fn fill_rx(&mut self) -> Result<usize, QueueError> {
        let mem = self.mem.clone();
        let mem = mem.as_ref();
        let mut used = 0;
        while self.muxer.has_rx() {
            if pending_buffers(&self.rx, mem)? == 0 {
                // Ask to be told when buffers arrive; they may have arrived meanwhile.
                if self.rx.enable_notification(mem)? {
                    continue;
                }
                break;
            }
            let Some(chain) = self.rx.pop_descriptor_chain(mem) else {
                return Err(QueueError::AvailRingUnreadable);
            };
            let head = chain.head_index();
            let mut w = match Writer::new(mem, chain) {
                Ok(w) if w.available_bytes() >= HDR_LEN => w,
                _ => {
                    // Unusable buffer: give it back empty, keep the packet for the next.
                    self.counters
                        .invalid_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.rx.add_used(mem, head, 0)?;
                    used += 1;
                    continue;
                }
            };
            let room = (w.available_bytes() - HDR_LEN).min(MAX_PKT_DATA);
            let Some((pkt, key)) = self.muxer.next_rx_packet(&mut self.buf[..room]) else {
                // Nothing to send after all: the buffer stays the guest's.
                let back = self.rx.next_avail().wrapping_sub(1);
                self.rx.set_next_avail(back);
                break;
            };
            let written = w
                .write_all(&pkt.hdr.to_bytes())
                .and_then(|()| w.write_all(&self.buf[..pkt.len]));
            let len = match written {
                Ok(()) => {
                    self.counters.rx_packets.fetch_add(1, Ordering::Relaxed);
                    (HDR_LEN + pkt.len) as u32
                }
                Err(e) => {
                    quantix_devices::guest_warn!("vsock-guest-memory", error = %e, "cannot write a vsock packet into guest memory");
                    self.muxer.rx_failed(key);
                    0
                }
            };
            self.rx.add_used(mem, head, len)?;
            used += 1;
        }
        if used > 0 && self.rx.needs_notification(mem)? {
            self.interrupt.signal_used();
        }
        Ok(used)
    }

    /// Serves host sockets and fills rx buffers until neither makes progress.
    fn run(&mut self) -> Result<(), QueueError> {
        for _ in 0..MAX_ROUNDS {
            let events = self.muxer.process_events();
            let used = self.fill_rx()?;
            if !events && used == 0 {
                return Ok(());
            }
        }
        self.muxer.kick();
        Ok(())
    }
}

impl VsockHandler {
    /// Tells the driver that every connection is gone (virtio 1.2, 5.10.6.6): one
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` in the next event queue buffer.
    fn send_transport_reset(&mut self) {
        const TRANSPORT_RESET: u32 = 0;
        let Some(evt) = self.evt.as_mut() else {
            return;
        };
        let mem = self.mem.as_ref();
        let Some(chain) = evt.pop_descriptor_chain(mem) else {
            warn!(
                "vsock: no event buffer for the transport reset; the guest keeps stale connections"
            );
            return;
        };
        let head = chain.head_index();
        let written = match Writer::new(mem, chain) {
            Ok(mut w) => match w.write_all(&TRANSPORT_RESET.to_le_bytes()) {
                Ok(()) => 4,
                Err(_) => 0,
            },
            Err(_) => 0,
        };
        if evt.add_used(mem, head, written).is_ok() {
            self.interrupt.signal_used();
        }
    }
}

impl QueueHandler for VsockHandler {
    fn process(&mut self, index: usize) -> Result<(), QueueError> {
        if index == TX {
            self.process_tx()?;
        }
        self.run()
    }

    fn host_event(&mut self, _index: usize) -> Result<(), QueueError> {
        self.run()
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn count_broken(&mut self) {
        self.counters.queue_errors.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
