//! Host ends of the guest's character devices (the 16550 serial port and virtio-console).
//!
//! Each device gets an *output* (a [`Write`] the device calls from a vCPU or device thread)
//! and optionally an *input* (a readable fd whose bytes go to the guest). The modes:
//!
//! | mode          | output                        | input                              |
//! |---------------|-------------------------------|------------------------------------|
//! | `stdout`      | standard output (blocking)    | standard input, for one device     |
//! | `file=PATH`   | appended to PATH              | none                               |
//! | `pty`         | a new pseudo-terminal         | the same pseudo-terminal           |
//! | `socket=PATH` | the client of a Unix socket   | the same client                    |
//! | `off`         | discarded                     | none                               |
//!
//! Output to a pty or a socket never blocks the guest: when nobody reads, bytes are dropped
//! and counted in [`ChardevCounters::dropped`]. A socket keeps the newest 64 KiB of output
//! (its history) and sends it to every new client before the live output, so that a
//! supervisor that attaches late, or again after its own restart, gets the console's recent
//! history; [`ChardevCounters::client`] tells where that client's stream begins (reported in
//! the control socket's `metrics`), so a client that reconnects can skip what it already
//! has. Output written while no client is attached is lost only when it falls out of the
//! history (counted as dropped). The VMM keeps the pty's
//! other end open, so that the pty stays usable when clients come and go, and on exit gives
//! the pty's reader a moment to take the last output (see `PtyPeer`). A socket accepts one
//! client at a time; a new connection replaces the current one (a supervisor that restarts
//! can always attach again). Input from a socket client passes through a pipe, so the device sees one stable fd
//! and the pipe's capacity gives backpressure towards the client.

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quantix_vmm_api::metrics::{ClientReplay, HISTORY_BYTES};

use thiserror::Error;
use tracing::{debug, info, warn};

use crate::config::SerialMode;

/// Why a character device's host end could not be opened.
#[derive(Debug, Error)]
pub enum ChardevError {
    /// The output file cannot be opened.
    #[error("{role}: cannot open output file {path}: {source}")]
    File {
        /// serial or console.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No pseudo-terminal could be allocated.
    #[error("{role}: cannot allocate a pseudo-terminal: {source}")]
    Pty {
        /// serial or console.
        role: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The Unix socket cannot be created.
    #[error("{role}: cannot listen on {path}: {source}")]
    Socket {
        /// serial or console.
        role: &'static str,
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process listens on the socket path.
    #[error("{role}: {path} is in use by a live listener")]
    SocketInUse {
        /// serial or console.
        role: &'static str,
        /// The socket path.
        path: PathBuf,
    },
    /// A host resource (pipe, thread) could not be created.
    #[error("{role}: cannot create {what}: {source}")]
    Host {
        /// serial or console.
        role: &'static str,
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Counters of a character device's host end.
#[derive(Debug, Default)]
pub struct ChardevCounters {
    /// Output bytes dropped because nobody was reading (pty, socket).
    pub dropped: AtomicU64,
    /// Socket clients accepted so far.
    pub connections: AtomicU64,
    /// How the newest socket client's stream began (set under the socket's lock).
    pub client: Mutex<Option<ClientReplay>>,
}

/// The host end of one character device.
pub struct Chardev {
    /// Where the device writes.
    pub output: Box<dyn Write + Send>,
    /// What the guest reads, when the mode has an input.
    pub input: Option<OwnedFd>,
    /// Where a user finds it (a pty's path), for logs and the control socket.
    pub endpoint: Option<String>,
    /// Drop and connection counters.
    pub counters: Arc<ChardevCounters>,
    _keep: Keep,
}

/// What stays with the VMM once a device took a [`Chardev`]'s output.
pub struct ChardevHandle {
    /// What the guest reads, until a device takes it.
    pub input: Option<OwnedFd>,
    /// Where a user finds it (a pty's path or the socket path).
    pub endpoint: Option<String>,
    /// Drop and connection counters.
    pub counters: Arc<ChardevCounters>,
    _keep: Keep,
}

impl Chardev {
    /// Splits off the output, for the device.
    pub fn into_parts(self) -> (Box<dyn Write + Send>, ChardevHandle) {
        (
            self.output,
            ChardevHandle {
                input: self.input,
                endpoint: self.endpoint,
                counters: self.counters,
                _keep: self._keep,
            },
        )
    }
}

/// Resources that must live as long as the device: a pty's other end, a socket file.
#[derive(Default)]
struct Keep {
    _pty_peer: Option<PtyPeer>,
    _socket_file: Option<SocketFile>,
}

/// How long an exiting VMM waits for a pty reader that stopped taking bytes.
const PTY_DRAIN_STALL: Duration = Duration::from_millis(500);
/// The longest an exiting VMM waits for a pty reader in all.
const PTY_DRAIN_LIMIT: Duration = Duration::from_secs(2);
/// How often the pty's input queue is looked at while draining.
const PTY_DRAIN_POLL: Duration = Duration::from_millis(20);
/// Empty readings in a row that count as drained (100 ms).
const PTY_EMPTY_CHECKS: u32 = 5;

/// The pty's slave end (so the terminal stays usable while clients come and go) and a
/// duplicate of its master.
///
/// When the last master descriptor closes, the kernel hangs the slave up and throws away
/// whatever its reader has not read yet: the guest's last words (a panic, a poweroff
/// message) would be lost whenever the VMM exits faster than the reader reads. On drop this
/// waits, before any master descriptor can close, until the slave's input queue is empty,
/// it stops shrinking for [`PTY_DRAIN_STALL`] (nobody reads), or [`PTY_DRAIN_LIMIT`] passes.
struct PtyPeer {
    slave: OwnedFd,
    _master: OwnedFd,
}

impl PtyPeer {
    /// Bytes written by the guest that the slave's reader has not read yet.
    fn unread(&self) -> usize {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int into `n`, which we own; the fd is ours.
        let rc = unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::FIONREAD, &mut n) };
        if rc == 0 {
            usize::try_from(n).unwrap_or(0)
        } else {
            0
        }
    }
}

impl Drop for PtyPeer {
    fn drop(&mut self) {
        let start = Instant::now();
        let (mut previous, mut changed) = (usize::MAX, start);
        let mut empty_checks = 0;
        loop {
            // FIONREAD counts the line discipline's buffer (up to 4 KiB), not bytes still
            // in the tty's flip buffer, which a kernel worker moves over a little later;
            // so the queue counts as drained only after PTY_EMPTY_CHECKS empty readings.
            let unread = self.unread();
            let now = Instant::now();
            if unread != previous {
                (previous, changed) = (unread, now);
            }
            if unread == 0 {
                empty_checks += 1;
                if empty_checks == PTY_EMPTY_CHECKS {
                    return;
                }
            } else {
                empty_checks = 0;
                if now - changed >= PTY_DRAIN_STALL {
                    debug!(unread, "nobody reads the pty; its last output is discarded");
                    return;
                }
            }
            if now - start >= PTY_DRAIN_LIMIT {
                debug!(
                    unread,
                    "the pty's reader is too slow; its last output is discarded"
                );
                return;
            }
            std::thread::sleep(PTY_DRAIN_POLL);
        }
    }
}

/// Opens the host end of `mode` for the device `role` ("serial" or "console").
/// `with_stdin` gives standard input to this device (only one device may have it).
pub fn open(
    mode: &SerialMode,
    role: &'static str,
    with_stdin: bool,
) -> Result<Chardev, ChardevError> {
    let counters = Arc::new(ChardevCounters::default());
    let plain = |output: Box<dyn Write + Send>, input| Chardev {
        output,
        input,
        endpoint: None,
        counters: counters.clone(),
        _keep: Keep::default(),
    };
    match mode {
        SerialMode::Stdout => {
            // Regular files and /dev/null cannot be polled: no interactive input then.
            let input = if with_stdin && pollable(0) {
                // SAFETY: duplicating fd 0, which the process owns; the result is checked.
                let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 3) };
                if fd < 0 {
                    None // no standard input (closed): nothing to read
                } else {
                    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
                    Some(unsafe { OwnedFd::from_raw_fd(fd) })
                }
            } else {
                None
            };
            Ok(plain(Box::new(io::stdout()), input))
        }
        SerialMode::Off => Ok(plain(Box::new(io::sink()), None)),
        SerialMode::File(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            // O_NOFOLLOW: a symlink planted at the log's path is not written through.
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(path)
                .map_err(|source| ChardevError::File {
                    role,
                    path: path.clone(),
                    source,
                })?;
            Ok(plain(Box::new(file), None))
        }
        SerialMode::Pty => open_pty(role, counters),
        SerialMode::Socket(path) => open_socket(role, path, counters),
    }
}

fn open_pty(role: &'static str, counters: Arc<ChardevCounters>) -> Result<Chardev, ChardevError> {
    let err = |source| ChardevError::Pty { role, source };
    let (mut master, mut slave) = (-1, -1);
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: openpty writes two fds and a NUL-terminated name into buffers we own; the
    // name buffer is larger than any pts path; termios and winsize may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            name.as_mut_ptr(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: openpty succeeded, so both are fresh descriptors owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: openpty NUL-terminated the name within the buffer.
    let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // Raw mode on the guest's side: no echo, no line editing, bytes pass unchanged.
    // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw edits it, tcsetattr reads it.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            libc::cfmakeraw(&mut t);
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        set_cloexec(fd).map_err(err)?;
    }
    set_nonblocking(master.as_raw_fd()).map_err(err)?;
    let input = master.try_clone().map_err(err)?;
    let master_dup = master.try_clone().map_err(err)?;
    info!(device = role, pty = %path, "{role} is on a pseudo-terminal");
    Ok(Chardev {
        output: Box::new(NonBlockingOutput {
            fd: master,
            counters: counters.clone(),
            is_socket: false,
        }),
        input: Some(input),
        endpoint: Some(path),
        counters,
        _keep: Keep {
            _pty_peer: Some(PtyPeer {
                slave,
                _master: master_dup,
            }),
            ..Keep::default()
        },
    })
}

/// The socket file, removed when the VMM ends.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `path`, replacing a stale socket file but never a live listener.
pub fn bind_unix_listener(path: &Path) -> Result<UnixListener, BindError> {
    match UnixListener::bind(path) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            if UnixStream::connect(path).is_ok() {
                return Err(BindError::InUse);
            }
            std::fs::remove_file(path).map_err(BindError::Io)?;
            UnixListener::bind(path).map_err(BindError::Io)
        }
        Err(e) => Err(BindError::Io(e)),
    }
}

/// Why [`bind_unix_listener`] failed.
#[derive(Debug)]
pub enum BindError {
    /// A live process listens there.
    InUse,
    /// Another failure.
    Io(io::Error),
}

fn open_socket(
    role: &'static str,
    path: &Path,
    counters: Arc<ChardevCounters>,
) -> Result<Chardev, ChardevError> {
    let listener = bind_unix_listener(path).map_err(|e| match e {
        BindError::InUse => ChardevError::SocketInUse {
            role,
            path: path.to_path_buf(),
        },
        BindError::Io(source) => ChardevError::Socket {
            role,
            path: path.to_path_buf(),
            source,
        },
    })?;
    let file = SocketFile(path.to_path_buf());
    let host = |what| move |source| ChardevError::Host { role, what, source };
    let (pipe_read, pipe_write) = pipe().map_err(host("an input pipe"))?;
    let client: Arc<Mutex<Peer>> = Arc::default();
    let output = SocketOutput {
        client: client.clone(),
        counters: counters.clone(),
    };
    let acceptor = Acceptor {
        role,
        listener,
        client,
        input: Arc::new(Mutex::new(std::fs::File::from(pipe_write))),
        counters: counters.clone(),
    };
    std::thread::Builder::new()
        .name(format!("{role}-socket"))
        .spawn(move || {
            // A host-facing thread: the main thread's filter.
            if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Vmm) {
                warn!(device = role, error = %e, "cannot install the seccomp filter; the socket thread stops");
                return;
            }
            acceptor.run()
        })
        .map_err(host("the socket thread"))?;
    info!(device = role, socket = %path.display(), "{role} is on a Unix socket");
    Ok(Chardev {
        output: Box::new(output),
        input: Some(pipe_read),
        endpoint: Some(path.display().to_string()),
        counters,
        _keep: Keep {
            _socket_file: Some(file),
            ..Keep::default()
        },
    })
}

/// Accepts socket clients; the newest one is the device's peer.
struct Acceptor {
    role: &'static str,
    listener: UnixListener,
    client: Arc<Mutex<Peer>>,
    input: Arc<Mutex<std::fs::File>>,
    counters: Arc<ChardevCounters>,
}

impl Acceptor {
    fn run(self) {
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => Arc::new(s),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!(device = self.role, error = %e, "socket accept failed; no more clients");
                    return;
                }
            };
            let previous = {
                let mut peer = self.client.lock().unwrap_or_else(|p| p.into_inner());
                // The history goes first, under the lock, so that it cannot interleave
                // with new output, and the client can learn where its stream begins.
                let connection = self.counters.connections.fetch_add(1, Ordering::Relaxed) + 1;
                let (front, back) = peer.history.as_slices();
                for part in [front, back] {
                    if !part.is_empty() {
                        let _ = send_or_drop(stream.as_raw_fd(), part, true, &self.counters);
                    }
                }
                let replayed = peer.history.len() as u64;
                *self
                    .counters
                    .client
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(ClientReplay {
                    connection,
                    start_offset: peer.written - replayed,
                    replayed_bytes: replayed,
                });
                peer.unsent = 0;
                peer.client.replace(stream.clone())
            };
            if let Some(old) = previous {
                // Its reader thread sees end-of-file and ends.
                let _ = old.shutdown(std::net::Shutdown::Both);
                info!(device = self.role, "a new client replaced the previous one");
            } else {
                info!(device = self.role, "client attached");
            }
            let (role, input, client) = (self.role, self.input.clone(), self.client.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("{role}-client"))
                .spawn(move || forward_input(role, stream, input, client));
            if let Err(e) = spawned {
                warn!(device = self.role, error = %e, "cannot start a client reader");
            }
        }
    }
}

/// Copies a client's bytes into the device's input pipe until the client goes away.
fn forward_input(
    role: &'static str,
    stream: Arc<UnixStream>,
    input: Arc<Mutex<std::fs::File>>,
    client: Arc<Mutex<Peer>>,
) {
    let mut buf = [0u8; 4096];
    loop {
        let n = match (&*stream).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        // Blocks while the guest does not read: backpressure towards the client. One
        // client writes at a time (the lock), so input of two clients never interleaves.
        let mut pipe = input.lock().unwrap_or_else(|p| p.into_inner());
        if pipe.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let mut peer = client.lock().unwrap_or_else(|p| p.into_inner());
    if peer
        .client
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(c, &stream))
    {
        peer.client = None;
        debug!(device = role, "client detached");
    }
}

/// Output a socket keeps and replays to every new client.
pub const SOCKET_BACKLOG: usize = HISTORY_BYTES;

/// The socket's current client, and the newest output.
#[derive(Default)]
struct Peer {
    client: Option<Arc<UnixStream>>,
    /// The newest output, at most [`SOCKET_BACKLOG`] bytes, whether or not a client was
    /// attached: every new client gets it first, so that a supervisor that attaches after
    /// boot, or again after its own restart, has the console's recent history.
    history: VecDeque<u8>,
    /// Every byte ever written: the offset just past `history`'s last byte.
    written: u64,
    /// How many of `history`'s newest bytes no client was sent (written while none was
    /// attached); those that fall out of the history are lost, and counted as dropped.
    unsent: usize,
}

/// Output to the current socket client, and into the history; dropped (and counted)
/// when the client does not read.
struct SocketOutput {
    client: Arc<Mutex<Peer>>,
    counters: Arc<ChardevCounters>,
}

impl Write for SocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut peer = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let peer = &mut *peer;
        // The newest SOCKET_BACKLOG bytes of `buf` are all the history can hold of it.
        let kept = &buf[buf.len().saturating_sub(SOCKET_BACKLOG)..];
        peer.history.extend(kept);
        let excess = peer.history.len().saturating_sub(SOCKET_BACKLOG);
        peer.history.drain(..excess);
        peer.written += buf.len() as u64;
        match peer.client.clone() {
            None => {
                peer.unsent = peer.unsent.saturating_add(buf.len());
                let lost = peer.unsent.saturating_sub(peer.history.len());
                if lost > 0 {
                    peer.unsent = peer.history.len();
                    self.counters
                        .dropped
                        .fetch_add(lost as u64, Ordering::Relaxed);
                }
            }
            Some(stream) => {
                if let Err(e) = send_or_drop(stream.as_raw_fd(), buf, true, &self.counters) {
                    debug!(error = %e, "socket client gone");
                    let _ = stream.shutdown(std::net::Shutdown::Both);
                    peer.client = None;
                }
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Output to a non-blocking fd (a pty's master side).
struct NonBlockingOutput {
    fd: OwnedFd,
    counters: Arc<ChardevCounters>,
    is_socket: bool,
}

impl Write for NonBlockingOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = send_or_drop(self.fd.as_raw_fd(), buf, self.is_socket, &self.counters) {
            debug!(error = %e, "output failed; bytes dropped");
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes what the fd takes without blocking; counts the rest as dropped. Errors other
/// than "would block" are returned (the peer is gone).
fn send_or_drop(
    fd: RawFd,
    mut buf: &[u8],
    socket: bool,
    counters: &ChardevCounters,
) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length; the fd stays open during the call.
        let n = unsafe {
            if socket {
                libc::send(
                    fd,
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            } else {
                libc::write(fd, buf.as_ptr().cast(), buf.len())
            }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => break,
                _ => {
                    counters
                        .dropped
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
        buf = &buf[n as usize..];
    }
    counters
        .dropped
        .fetch_add(buf.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Whether epoll can watch `fd` (regular files and /dev/null cannot be watched).
fn pollable(fd: RawFd) -> bool {
    let Ok(epoll) = vmm_sys_util::epoll::Epoll::new() else {
        return false;
    };
    epoll
        .ctl(
            vmm_sys_util::epoll::ControlOperation::Add,
            fd,
            vmm_sys_util::epoll::EpollEvent::new(vmm_sys_util::epoll::EventSet::IN, 0),
        )
        .is_ok()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we own; the result is checked.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both are fresh descriptors owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on an fd we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on an fd we own; no memory is passed.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qx-chardev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn read_some(fd: &OwnedFd, want: usize) -> Vec<u8> {
        let mut file = std::fs::File::from(fd.try_clone().unwrap());
        let mut out = vec![0u8; want];
        file.read_exact(&mut out).unwrap();
        out
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn socket_output_goes_to_the_newest_client_and_input_comes_back() {
        let dir = scratch("sock");
        let path = dir.join("serial.sock");
        let mut dev = open(&SerialMode::Socket(path.clone()), "serial", false).unwrap();
        // Nobody attached: output is kept for the first client (the newest 64 KiB).
        dev.output.write_all(&vec![b'x'; SOCKET_BACKLOG]).unwrap();
        dev.output.write_all(b"kept").unwrap();
        assert_eq!(dev.counters.dropped.load(Ordering::Relaxed), 4);

        let mut first = UnixStream::connect(&path).unwrap();
        wait_for("first client", || {
            dev.counters.connections.load(Ordering::Relaxed) == 1
        });
        let mut replay = vec![0u8; SOCKET_BACKLOG];
        first.read_exact(&mut replay).unwrap();
        assert!(replay.ends_with(b"kept"), "the newest output is replayed");
        let client = || dev.counters.client.lock().unwrap().unwrap();
        wait_for("first client's replay", || {
            dev.counters.client.lock().unwrap().is_some()
        });
        assert_eq!(
            client(),
            ClientReplay {
                connection: 1,
                start_offset: 4,
                replayed_bytes: SOCKET_BACKLOG as u64,
            }
        );
        dev.output.write_all(b"one").unwrap();
        let mut got = [0u8; 3];
        first.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"one");
        first.write_all(b"in1").unwrap();
        assert_eq!(read_some(dev.input.as_ref().unwrap(), 3), b"in1");

        // A second client replaces the first, which sees end-of-file.
        let mut second = UnixStream::connect(&path).unwrap();
        wait_for("second client", || {
            dev.counters.connections.load(Ordering::Relaxed) == 2
        });
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // It too gets the history first, although the first client saw all of it: the
        // newest 64 KiB, ending with what the first client was sent live.
        second.read_exact(&mut replay).unwrap();
        assert!(replay.ends_with(b"keptone"), "the history spans clients");
        wait_for("second client's replay", || client().connection == 2);
        assert_eq!(client().start_offset, 7);
        assert_eq!(client().replayed_bytes, SOCKET_BACKLOG as u64);
        // Nothing was lost meanwhile: a client was attached.
        assert_eq!(dev.counters.dropped.load(Ordering::Relaxed), 4);
        dev.output.write_all(b"two").unwrap();
        second.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"two");
        second.write_all(b"in2").unwrap();
        assert_eq!(read_some(dev.input.as_ref().unwrap(), 3), b"in2");

        drop(dev);
        assert!(!path.exists(), "the socket file is removed");
    }

    #[test]
    fn a_client_that_does_not_read_costs_dropped_bytes_not_a_stall() {
        let dir = scratch("slow");
        let path = dir.join("c.sock");
        let mut dev = open(&SerialMode::Socket(path.clone()), "console", false).unwrap();
        let _client = UnixStream::connect(&path).unwrap();
        wait_for("client", || {
            dev.counters.connections.load(Ordering::Relaxed) == 1
        });
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..64 {
            dev.output.write_all(&chunk).unwrap(); // returns although nobody reads
        }
        assert!(dev.counters.dropped.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn a_live_listener_is_not_replaced_but_a_stale_file_is() {
        let dir = scratch("inuse");
        let path = dir.join("s.sock");
        let _live = UnixListener::bind(&path).unwrap();
        assert!(matches!(
            open(&SerialMode::Socket(path.clone()), "serial", false),
            Err(ChardevError::SocketInUse { .. })
        ));
        let stale = dir.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap()); // leaves the file behind
        assert!(stale.exists());
        let dev = open(&SerialMode::Socket(stale.clone()), "serial", false).unwrap();
        assert!(UnixStream::connect(&stale).is_ok());
        drop(dev);
    }

    #[test]
    fn pty_passes_bytes_both_ways_raw() {
        let mut dev = open(&SerialMode::Pty, "serial", false).unwrap();
        let path = dev.endpoint.clone().unwrap();
        assert!(path.starts_with("/dev/pts/"), "{path}");
        let mut peer = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        dev.output.write_all(b"out\n").unwrap();
        let mut got = [0u8; 4];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"out\n", "raw mode: no CR added");
        peer.write_all(b"in\n").unwrap();
        // The master is non-blocking: poll for the bytes.
        let input = dev.input.as_ref().unwrap().as_raw_fd();
        let mut buf = [0u8; 8];
        let mut n = -1;
        wait_for("pty input", || {
            // SAFETY: reading into a local buffer from an fd the test owns.
            n = unsafe { libc::read(input, buf.as_mut_ptr().cast(), buf.len()) };
            n > 0
        });
        assert_eq!(&buf[..n as usize], b"in\n");
        // Nobody reads the pty: output is eventually dropped, never blocking.
        drop(peer);
        for _ in 0..64 {
            dev.output.write_all(&[b'y'; 4096]).unwrap();
        }
        assert!(dev.counters.dropped.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn the_last_pty_output_reaches_a_reader_that_is_late() {
        let mut dev = open(&SerialMode::Pty, "serial", false).unwrap();
        let path = dev.endpoint.clone().unwrap();
        let mut peer = OpenOptions::new().read(true).open(&path).unwrap();
        dev.output.write_all(b"last words\n").unwrap();
        // The VMM ends (every master fd closes) before the reader gets to read.
        let closing = std::thread::spawn(move || drop(dev));
        std::thread::sleep(Duration::from_millis(50));
        let mut got = [0u8; 11];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"last words\n");
        closing.join().unwrap();
        // Now the terminal is hung up.
        assert!(peer.read(&mut got).map_or(true, |n| n == 0));
    }

    #[test]
    fn an_unread_pty_delays_the_exit_only_briefly() {
        let mut dev = open(&SerialMode::Pty, "serial", false).unwrap();
        dev.output.write_all(b"nobody reads this\n").unwrap();
        // Until the kernel has moved the bytes to where FIONREAD sees them.
        let peer = dev._keep._pty_peer.as_ref().unwrap();
        wait_for("the bytes in the pty's input queue", || peer.unread() > 0);
        let start = Instant::now();
        drop(dev);
        let took = start.elapsed();
        assert!(took >= PTY_DRAIN_STALL, "{took:?}");
        assert!(took < PTY_DRAIN_LIMIT + Duration::from_secs(1), "{took:?}");
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let e = open(
            &SerialMode::File("/nonexistent-dir/x.log".into()),
            "serial",
            false,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/x.log"), "{e}");
        let e = open(
            &SerialMode::Socket("/nonexistent-dir/x.sock".into()),
            "console",
            false,
        )
        .err()
        .unwrap();
        assert!(e.to_string().starts_with("console: cannot listen"), "{e}");
    }
}
