//! The host side of the device: guest connections mapped to Unix sockets, Firecracker
//! style.
//!
//! - Guest-initiated: a REQUEST to host port `P` connects to the Unix socket
//!   `<path>_<P>`; RESPONSE if that works, RST if not.
//! - Host-initiated: a process connects to the listening socket `<path>` and writes
//!   `CONNECT <P>\n`; the muxer sends the guest a REQUEST to port `P` from a fresh host
//!   port, and on the guest's RESPONSE writes `OK <host port>\n` to the process. On RST
//!   (nobody listens in the guest) it closes the socket.
//!
//! The muxer has an epoll set of its own holding the listener, the sockets still
//! waiting for their `CONNECT` line and the connections' sockets. That epoll fd is the
//! one host fd the device worker waits on ([`crate::worker::Worker::spawn_with_fds`]),
//! so sockets come and go without the worker knowing. A socket is in the set only
//! while the muxer wants something from it (bytes to read while the guest has credit,
//! room to write while bytes wait for it), so every event it reports lets some work
//! progress and the level-triggered set never spins.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, Effect, RxPacket};
use super::packet::{op, Header};
use super::VsockCounters;

/// The most a device buffers for host sockets that do not read (each connection may hold
/// its credit, `CONN_BUF_SIZE`, of the guest's data): what one guest can pin of host memory
/// through vsock.
pub const DEVICE_BUFFER_BUDGET: usize = 64 << 20;
/// Most connections at once (the budget over each connection's credit); more REQUESTs get
/// RST, more host connections are closed.
pub const MAX_CONNECTIONS: usize = DEVICE_BUFFER_BUDGET / super::connection::CONN_BUF_SIZE as usize;
/// Most host sockets accepted but still waiting for their `CONNECT` line.
pub const MAX_PENDING_HOST: usize = 64;
/// Longest `CONNECT <port>\n` line.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most RSTs to unknown connections waiting for guest buffers; beyond, they are dropped.
pub const MAX_RST_BACKLOG: usize = 256;
/// First host port given to host-initiated connections (Firecracker uses the same).
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How long the guest has to answer a host-initiated REQUEST (Firecracker's value);
/// then the guest gets an RST and the host socket is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host socket has to send its `CONNECT` line; then it is closed, so that
/// silent clients cannot hold the [`MAX_PENDING_HOST`] slots.
pub const CONNECT_LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often pending host connections are checked while there are some.
const CONNECT_CHECK: Duration = Duration::from_millis(250);

const TOKEN_LISTENER: u64 = 0;
const TOKEN_KICK: u64 = 1;
const TOKEN_TIMER: u64 = 2;
const FIRST_TOKEN: u64 = 16;

/// A connection's key: (host port, guest port).
pub type Key = (u32, u32);

struct Entry {
    conn: Connection,
    /// None once the connection is closed (the RST may still be owed).
    stream: Option<UnixStream>,
    token: u64,
    /// Events the stream is registered for in the epoll set (empty: not registered).
    registered: EventSet,
    in_rxq: bool,
}

/// A host socket that has not sent its `CONNECT` line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

enum Target {
    Conn(Key),
    Pending,
}

/// The connection table and the host sockets.
pub struct Muxer {
    guest_cid: u64,
    path: PathBuf,
    listener: Option<Arc<UnixListener>>,
    epoll: Epoll,
    kick: EventFd,
    /// Ticks while host-initiated connections wait for the guest's answer.
    timer: TimerFd,
    /// Host-initiated connections waiting for RESPONSE, with when they were requested.
    connecting: BTreeMap<Key, Instant>,
    conns: BTreeMap<Key, Entry>,
    pending: HashMap<u64, PendingHost>,
    tokens: HashMap<u64, Target>,
    next_token: u64,
    next_local_port: u32,
    /// Connections with a packet for the guest, in turn.
    rxq: VecDeque<Key>,
    /// RSTs for packets that named no connection.
    rst_backlog: VecDeque<Header>,
    counters: Arc<VsockCounters>,
}

impl Muxer {
    /// A muxer for the guest `guest_cid`, connecting to `<path>_<port>` and serving
    /// host-initiated connections on `listener` (bound to `path`), if given.
    pub fn new(
        guest_cid: u64,
        path: &Path,
        listener: Option<Arc<UnixListener>>,
        counters: Arc<VsockCounters>,
    ) -> io::Result<Muxer> {
        let epoll = Epoll::new()?;
        let kick = EventFd::new(EFD_NONBLOCK)?;
        epoll.ctl(
            ControlOperation::Add,
            kick.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_KICK),
        )?;
        let timer = TimerFd::new()?;
        // SAFETY: fcntl(2) on the timer fd we own; reads then never block.
        let r = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_TIMER),
        )?;
        if let Some(l) = &listener {
            l.set_nonblocking(true)?;
            epoll.ctl(
                ControlOperation::Add,
                l.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
            )?;
        }
        Ok(Muxer {
            guest_cid,
            path: path.to_path_buf(),
            listener,
            epoll,
            kick,
            timer,
            connecting: BTreeMap::new(),
            conns: BTreeMap::new(),
            pending: HashMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_TOKEN,
            next_local_port: FIRST_LOCAL_PORT,
            rxq: VecDeque::new(),
            rst_backlog: VecDeque::new(),
            counters,
        })
    }

    /// The epoll fd that becomes readable when a host socket needs attention.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Makes the epoll fd readable so that the worker comes back (work left over after
    /// a bounded round).
    pub fn kick(&self) {
        let _ = self.kick.write(1);
    }

    /// The connections, for inspection.
    pub fn connections(&self) -> impl Iterator<Item = &Connection> {
        self.conns.values().map(|e| &e.conn)
    }

    /// True when a packet for the guest may be waiting.
    pub fn has_rx(&self) -> bool {
        !self.rst_backlog.is_empty() || !self.rxq.is_empty()
    }

    fn count(&self, c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn queue_rst(&mut self, to: &Header) {
        if to.op == op::RST {
            return; // never answer an RST with an RST
        }
        if self.rst_backlog.len() >= MAX_RST_BACKLOG {
            self.count(&self.counters.rx_dropped);
            return;
        }
        self.rst_backlog.push_back(to.rst_reply());
    }

    /// A packet from the guest that failed validation: answered with RST when it names
    /// a connection, which is then reset.
    pub fn invalid_packet(&mut self, hdr: &Header, wants_rst: bool) {
        self.count(&self.counters.invalid_packets);
        if !wants_rst {
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if self.conns.contains_key(&key) {
            self.reset(key);
        } else {
            self.queue_rst(hdr);
        }
    }

    /// Handles a validated packet from the guest (`data` is its payload).
    pub fn guest_packet(&mut self, hdr: &Header, data: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        if !self.conns.contains_key(&key) {
            if hdr.op == op::REQUEST {
                self.guest_connect(hdr);
            } else {
                // Not for a connection we know: RST (unless it is one).
                self.count(&self.counters.unknown_conn_packets);
                self.queue_rst(hdr);
            }
            return;
        }
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        match e.conn.on_guest_packet(hdr, data) {
            Ok(Effect::Reset) => {
                debug!(local = key.0, peer = key.1, "guest reset the connection");
                self.remove(key);
                return;
            }
            Ok(Effect::Established) => {
                debug!(
                    local = key.0,
                    peer = key.1,
                    "guest accepted a host connection"
                );
            }
            Ok(Effect::None) => {}
            Err(err) => {
                // Debug, not warn: a guest could flood the log; the counters tell.
                debug!(local = key.0, peer = key.1, error = %err, "vsock protocol error; resetting");
                if matches!(err, super::connection::ProtocolError::Credit { .. }) {
                    self.count(&self.counters.credit_violations);
                } else {
                    self.count(&self.counters.invalid_packets);
                }
                self.reset(key);
                return;
            }
        }
        if hdr.op == op::RW {
            self.counters
                .tx_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        self.flush_to_host(key);
        self.update(key);
    }

    fn guest_connect(&mut self, req: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.count(&self.counters.conns_refused);
            self.queue_rst(req);
            return;
        }
        let target = socket_for_port(&self.path, req.dst_port);
        match connect_nonblocking(&target) {
            Ok(stream) => {
                debug!(port = req.dst_port, peer = req.src_port, socket = %target.display(), "guest connected");
                self.count(&self.counters.conns_opened);
                let conn = Connection::guest_initiated(self.guest_cid, req);
                let key = (conn.local_port, conn.peer_port);
                self.insert(key, conn, stream);
            }
            Err(e) => {
                debug!(port = req.dst_port, socket = %target.display(), error = %e, "guest connection refused");
                self.count(&self.counters.conns_refused);
                self.queue_rst(req);
            }
        }
    }

    fn insert(&mut self, key: Key, conn: Connection, stream: UnixStream) {
        let token = self.next_token;
        self.next_token += 1;
        self.tokens.insert(token, Target::Conn(key));
        self.conns.insert(
            key,
            Entry {
                conn,
                stream: Some(stream),
                token,
                registered: EventSet::empty(),
                in_rxq: false,
            },
        );
        self.update(key);
    }

    /// Resets a connection: its socket is closed and an RST is owed to the guest.
    fn reset(&mut self, key: Key) {
        if let Some(e) = self.conns.get_mut(&key) {
            e.conn.reset();
            self.counters.rst_sent.fetch_add(1, Ordering::Relaxed);
        }
        self.update(key);
    }

    fn remove(&mut self, key: Key) {
        self.connecting.remove(&key);
        if let Some(mut e) = self.conns.remove(&key) {
            self.tokens.remove(&e.token);
            self.close_stream(&mut e);
        }
    }

    fn close_stream(&self, e: &mut Entry) {
        if let Some(s) = e.stream.take() {
            if !e.registered.is_empty() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    s.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            e.registered = EventSet::empty();
        }
    }

    /// Writes what waits for the host socket; resets the connection if the socket is
    /// gone; shuts its write side down once the guest has sent everything.
    fn flush_to_host(&mut self, key: Key) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        let Some(stream) = &e.stream else { return };
        let mut failed = false;
        while !e.conn.to_host.is_empty() {
            let (front, _) = e.conn.to_host.as_slices();
            match send_nosignal(stream.as_raw_fd(), front) {
                Ok(n) => e.conn.host_wrote(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    debug!(local = key.0, peer = key.1, error = %err, "host socket write failed");
                    failed = true;
                    break;
                }
            }
        }
        if failed {
            self.reset(key);
            return;
        }
        if e.conn.wants_host_write_shutdown() {
            let _ = stream.shutdown(std::net::Shutdown::Write);
            e.conn.host_write_shut = true;
        }
    }

    /// Brings a connection's registration and turn in the rx queue up to date with its
    /// state, and forgets it when it is finished.
    fn update(&mut self, key: Key) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        e.conn.finish_if_done();
        if e.conn.state == super::connection::State::Closed {
            if let Some(s) = e.stream.take() {
                if !e.registered.is_empty() {
                    let _ = self.epoll.ctl(
                        ControlOperation::Delete,
                        s.as_raw_fd(),
                        EpollEvent::default(),
                    );
                }
                e.registered = EventSet::empty();
            }
        }
        if e.conn.is_finished() {
            self.remove(key);
            return;
        }
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        let mut want = EventSet::empty();
        if e.conn.wants_host_read() && !e.conn.host_readable {
            want |= EventSet::IN;
        }
        if !e.conn.to_host.is_empty() {
            want |= EventSet::OUT;
        }
        if want != e.registered {
            if let Some(s) = &e.stream {
                let fd = s.as_raw_fd();
                let ev = EpollEvent::new(want, e.token);
                let r = if e.registered.is_empty() {
                    self.epoll.ctl(ControlOperation::Add, fd, ev)
                } else if want.is_empty() {
                    self.epoll
                        .ctl(ControlOperation::Delete, fd, EpollEvent::default())
                } else {
                    self.epoll.ctl(ControlOperation::Modify, fd, ev)
                };
                match r {
                    Ok(()) => e.registered = want,
                    Err(err) => {
                        warn!(error = %err, "cannot watch a vsock host socket; resetting");
                        e.conn.reset();
                        e.registered = EventSet::empty();
                        e.stream = None;
                    }
                }
            }
        }
        if e.conn.wants_rx() && !e.in_rxq {
            e.in_rxq = true;
            self.rxq.push_back(key);
        }
    }

    /// Handles whatever host sockets are ready; true if anything happened.
    pub fn process_events(&mut self) -> bool {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                warn!(error = %e, "vsock muxer epoll failed");
                return false;
            }
        };
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                TOKEN_KICK => {
                    let _ = self.kick.read();
                }
                TOKEN_LISTENER => self.accept(),
                TOKEN_TIMER => self.expire_connecting(Instant::now()),
                token => match self.tokens.get(&token) {
                    Some(Target::Conn(key)) => {
                        let key = *key;
                        self.conn_event(key, set);
                    }
                    Some(Target::Pending) => self.pending_event(token),
                    None => {}
                },
            }
        }
        n > 0
    }

    fn conn_event(&mut self, key: Key, set: EventSet) {
        let Some(e) = self.conns.get_mut(&key) else {
            return;
        };
        if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && e.registered.contains(EventSet::IN)
        {
            // Read (or find end of file / an error) when building the next packet.
            e.conn.host_readable = true;
        }
        if !e.conn.to_host.is_empty() {
            self.flush_to_host(key);
        } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR)
            && !e.registered.contains(EventSet::IN)
        {
            // Nothing to write, not reading: a hang-up with nothing to do is the end.
            self.reset(key);
            return;
        }
        self.update(key);
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(error = %e, "vsock listener accept failed");
                    return;
                }
            };
            if self.pending.len() >= MAX_PENDING_HOST || stream.set_nonblocking(true).is_err() {
                self.count(&self.counters.host_rejected);
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            let ev = EpollEvent::new(EventSet::IN, token);
            if self
                .epoll
                .ctl(ControlOperation::Add, stream.as_raw_fd(), ev)
                .is_err()
            {
                self.count(&self.counters.host_rejected);
                continue;
            }
            self.tokens.insert(token, Target::Pending);
            self.arm_timer();
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    since: Instant::now(),
                },
            );
        }
    }

    fn drop_pending(&mut self, token: u64) -> Option<UnixStream> {
        self.tokens.remove(&token);
        let p = self.pending.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            p.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(p.stream)
    }

    /// Reads a waiting host socket's `CONNECT` line byte by byte (what follows it is
    /// data for the guest, which must stay in the socket).
    fn pending_event(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match (&p.stream).read(&mut byte) {
                Ok(0) => break Err("closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if p.line.len() >= MAX_CONNECT_LINE => break Err("CONNECT line too long"),
                Ok(_) => p.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Err("read failed"),
            }
        };
        let port = done.and_then(|()| parse_connect(&p.line).ok_or("malformed CONNECT line"));
        let Some(stream) = self.drop_pending(token) else {
            return;
        };
        let port = match port {
            Ok(port) => port,
            Err(why) => {
                debug!(why, "host connection rejected");
                self.count(&self.counters.host_rejected);
                return;
            }
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            self.count(&self.counters.host_rejected);
            return;
        }
        let Some(local) = self.allocate_local_port(port) else {
            self.count(&self.counters.host_rejected);
            return;
        };
        debug!(port, local, "host connects to the guest");
        self.count(&self.counters.conns_opened);
        let conn = Connection::host_initiated(self.guest_cid, local, port);
        self.insert((local, port), conn, stream);
        self.arm_timer();
        self.connecting.insert((local, port), Instant::now());
    }

    /// Starts the periodic check if nothing is waiting yet (call before adding).
    fn arm_timer(&mut self) {
        if self.connecting.is_empty() && self.pending.is_empty() {
            if let Err(e) = self.timer.reset(CONNECT_CHECK, Some(CONNECT_CHECK)) {
                warn!(error = %e, "cannot arm the vsock connect timer");
            }
        }
    }

    /// Host sockets still waiting for their `CONNECT` line.
    pub fn pending_hosts(&self) -> usize {
        self.pending.len()
    }

    /// Closes host sockets that sent no `CONNECT` line within [`CONNECT_LINE_TIMEOUT`] and
    /// resets host-initiated connections the guest left unanswered for
    /// [`CONNECT_TIMEOUT`] (at `now`); stops the timer when nothing is left waiting.
    pub fn expire_connecting(&mut self, now: Instant) {
        // Consume the expirations (the fd is non-blocking).
        let _ = self.timer.wait();
        let silent: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.since) >= CONNECT_LINE_TIMEOUT)
            .map(|(t, _)| *t)
            .collect();
        for token in silent {
            debug!("a host connection sent no CONNECT line in time; closing it");
            self.drop_pending(token);
            self.count(&self.counters.host_rejected);
        }
        let expired: Vec<Key> = self
            .connecting
            .iter()
            .filter(|(_, t)| now.saturating_duration_since(**t) >= CONNECT_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            debug!(
                local = key.0,
                peer = key.1,
                "the guest did not answer a host connection"
            );
            self.connecting.remove(&key);
            self.count(&self.counters.connect_timeouts);
            self.reset(key);
        }
        if self.connecting.is_empty() && self.pending.is_empty() {
            let _ = self.timer.clear();
        }
    }

    fn allocate_local_port(&mut self, peer: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(p, peer)) {
                return Some(p);
            }
        }
        None
    }

    /// The next packet for the guest, with at most `buf.len()` payload bytes read into
    /// `buf`, and the connection it belongs to (None for RSTs to unknown connections).
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(RxPacket, Option<Key>)> {
        if let Some(hdr) = self.rst_backlog.pop_front() {
            self.count(&self.counters.rst_sent);
            return Some((RxPacket { hdr, len: 0 }, None));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(e) = self.conns.get_mut(&key) else {
                continue;
            };
            e.in_rxq = false;
            let stream = e.stream.as_ref();
            let pkt = e.conn.next_packet(buf, |b| match stream {
                Some(mut s) => s.read(b),
                None => Err(io::ErrorKind::NotConnected.into()),
            });
            self.update(key);
            if let Some(p) = pkt {
                if p.hdr.op == op::RW {
                    self.counters
                        .rx_bytes
                        .fetch_add(p.len as u64, Ordering::Relaxed);
                }
                return Some((p, Some(key)));
            }
        }
        None
    }

    /// A packet taken from a connection could not be written into the guest's buffer:
    /// its bytes are lost, so the stream is broken and reset.
    pub fn rx_failed(&mut self, key: Option<Key>) {
        self.count(&self.counters.rx_dropped);
        if let Some(key) = key {
            self.reset(key);
        }
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for k in keys {
            self.remove(k);
        }
    }
}

/// `<path>_<port>`.
pub fn socket_for_port(path: &Path, port: u32) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(format!("_{port}"));
    PathBuf::from(s)
}

/// Parses `CONNECT <port>` (a trailing `\r` is allowed).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line.strip_prefix("CONNECT ")?;
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

/// Longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Connects to a Unix stream socket without blocking (a full backlog fails at once
/// instead of stalling the device). A symlink is refused: a guest's connection to port P
/// reaches `PATH_P` and nothing a symlink there points at (another daemon's socket).
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() > MAX_SOCKET_PATH || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the socket path is a symlink; it is not followed",
        ));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket that nothing else owns; the stream closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: `addr` is a valid sockaddr_un whose path (NUL-terminated, as the array
    // was zeroed and the path is shorter than it) fits in `len` bytes.
    let r = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(stream)
}

/// send(2) with MSG_NOSIGNAL: a peer that went away is an EPIPE, not a SIGPIPE.
fn send_nosignal(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `data`, which outlives the call.
    let n = unsafe {
        libc::send(
            fd,
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    #[test]
    fn a_symlinked_port_socket_is_not_followed() {
        let dir = std::env::temp_dir().join(format!("qx-vsock-link-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let real = dir.join("daemon.sock");
        let _l = std::os::unix::net::UnixListener::bind(&real).unwrap();
        let link = dir.join("v.sock_1234");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = connect_nonblocking(&link).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        connect_nonblocking(&real).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
