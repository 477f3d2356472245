//! A VM's serial console as the agent serves it: one connection to the VMM's serial socket
//! (or a tail of its serial file), a ring buffer of recent output for late attachers, and a
//! fan-out to every attached client; input from any client goes to the guest.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, watch};
use tracing::debug;

/// Default ring size.
pub const DEFAULT_RING_BYTES: usize = 64 * 1024;

/// After the VMM exited, how long the pump still reads what it wrote last.
const FINAL_READ: Duration = Duration::from_secs(1);

/// Resolves once `stop` is (or was) set; holds no borrow of the channel when it does.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Where the console's bytes come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// The VMM's `--serial socket=PATH` (or `--console socket=PATH`): read and write. With
    /// the VMM's control socket, a reconnection skips the part of the VMM's history replay
    /// already published.
    Socket {
        /// The serial port's or the virtio console's socket.
        socket: PathBuf,
        /// The VMM's control socket, to learn where each connection's stream begins.
        control: Option<PathBuf>,
        /// The endpoint's name in the VMM's metrics: `serial` or `console`.
        endpoint: &'static str,
    },
    /// The VMM's `--serial file=PATH` (or `--console file=PATH`): output only.
    File(PathBuf),
}

struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(data);
    }
}

/// Bytes of one serial connection on their way to the hub.
struct Feed {
    /// How many of the connection's first bytes to drop, once known.
    skip: Option<u64>,
    /// Bytes held until `skip` is known (a reconnection), else `None`.
    held: Option<Vec<u8>>,
    /// Bytes received on this connection.
    received: u64,
}

/// The most a reconnection holds while it waits for the VMM (its history, and more).
const MAX_HELD: usize = 4 * 64 * 1024;

impl Feed {
    fn push(&mut self, console: &Console, data: &[u8]) {
        let at = self.received;
        self.received += data.len() as u64;
        match (&mut self.held, self.skip) {
            (Some(held), None) => {
                held.extend_from_slice(data);
                if held.len() > MAX_HELD {
                    // The VMM does not say: publish rather than hold without end.
                    self.skip = Some(0);
                    self.release(console);
                }
            }
            (_, skip) => {
                let drop = skip.unwrap_or(0).saturating_sub(at).min(data.len() as u64);
                if (drop as usize) < data.len() {
                    console.publish(&data[drop as usize..]);
                }
            }
        }
    }

    /// Publishes what was held, past `skip`.
    fn release(&mut self, console: &Console) {
        if let (Some(held), Some(skip)) = (self.held.take(), self.skip) {
            let drop = usize::try_from(skip).unwrap_or(usize::MAX).min(held.len());
            if drop < held.len() {
                console.publish(&held[drop..]);
            }
        }
    }
}

/// The serial socket's accepted connections so far, from the VMM; `Some(0)` when the VMM
/// has no control socket yet (it is starting, so nobody connected before), `None` when it
/// cannot say (an older VMM, no answer in time).
async fn connections_before(control: &std::path::Path, endpoint: &str) -> Option<u64> {
    if !control.exists() {
        return Some(0);
    }
    endpoint_sample(control, endpoint)
        .await
        .map(|e| e.connections)
}

/// The offset at which the connection accepted after `before` others begins, once the VMM
/// reports it; `None` when it does not (an older VMM, a newer client came meanwhile, no
/// answer within a second).
async fn stream_start(control: &std::path::Path, endpoint: &str, before: u64) -> Option<u64> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while tokio::time::Instant::now() < deadline {
        if let Some(e) = endpoint_sample(control, endpoint).await {
            match e.client {
                Some(c) if c.connection == before + 1 => return Some(c.start_offset),
                Some(c) if c.connection > before + 1 => return None,
                None if e.connections > before => return None,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    None
}

async fn endpoint_sample(
    control: &std::path::Path,
    endpoint: &str,
) -> Option<quantix_vmm_api::metrics::EndpointSample> {
    let sample = crate::control::call::<quantix_vmm_api::control::GetMetrics>(
        control,
        Duration::from_millis(500),
    )
    .await
    .ok()?;
    sample.endpoints.into_iter().find(|e| e.device == endpoint)
}

/// One VM's console hub. It outlives VMM restarts, so the ring spans them.
pub struct Console {
    ring: Mutex<Ring>,
    out: broadcast::Sender<Arc<[u8]>>,
    input: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
}

/// A client's view: the replay and the live stream, with no gap or overlap between them.
pub struct Attachment {
    /// Recent output (empty when not asked for).
    pub replay: Vec<u8>,
    /// Live output.
    pub live: broadcast::Receiver<Arc<[u8]>>,
}

impl Console {
    /// A console keeping `ring_bytes` of output.
    pub fn new(ring_bytes: usize) -> Arc<Self> {
        let (out, _) = broadcast::channel(1024);
        Arc::new(Self {
            ring: Mutex::new(Ring {
                buf: VecDeque::new(),
                cap: ring_bytes.max(1),
            }),
            out,
            input: Mutex::new(None),
        })
    }

    fn publish(&self, data: &[u8]) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.push(data);
        // Sent under the ring's lock, so an attacher sees each byte exactly once.
        let _ = self.out.send(Arc::from(data));
    }

    /// Attaches a client.
    pub fn attach(&self, replay: bool) -> Attachment {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let live = self.out.subscribe();
        Attachment {
            replay: if replay {
                ring.buf.iter().copied().collect()
            } else {
                Vec::new()
            },
            live,
        }
    }

    /// Sends bytes to the guest; false when the console takes no input now.
    pub async fn write(&self, data: Vec<u8>) -> bool {
        let tx = self.input.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => tx.send(data).await.is_ok(),
            None => false,
        }
    }

    /// Pumps one VMM process's console until `stop` fires (the VMM has exited) and what
    /// the VMM wrote last is read. Started once per VMM process.
    pub fn pump(self: &Arc<Self>, source: Source, stop: tokio::sync::watch::Receiver<bool>) {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            match source {
                Source::Socket {
                    socket,
                    control,
                    endpoint,
                } => me.run_socket(socket, control, endpoint, stop).await,
                Source::File(path) => me.run_file(path, stop).await,
            }
            me.close_input();
        });
    }

    fn close_input(&self) {
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Every connection to the VMM's serial socket begins with the VMM's history (its
    /// newest 64 KiB of output) and goes on with the live output. The first connection to
    /// a VMM publishes all of it: after an agent restart, that is how the console's history
    /// comes back. A later connection (the VMM dropped this one for a newer client) would
    /// repeat what was published: it holds its bytes until the VMM says where its stream
    /// begins, then skips what was already published.
    async fn run_socket(
        self: &Arc<Self>,
        path: PathBuf,
        control: Option<PathBuf>,
        endpoint: &'static str,
        mut stop: watch::Receiver<bool>,
    ) {
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        // The offset in the VMM's output just past the last byte published, when known.
        let mut seen_end: Option<u64> = None;
        loop {
            let before = match &control {
                Some(c) => connections_before(c, endpoint).await,
                None => None,
            };
            let stream = match UnixStream::connect(&path).await {
                Ok(s) => s,
                Err(_) => {
                    // The VMM binds its socket a few ms after it starts (it keeps what the
                    // guest writes meanwhile): retry quickly.
                    tokio::select! {
                        _ = stopped(&mut stop) => return,
                        _ = tokio::time::sleep(Duration::from_millis(2)) => continue,
                    }
                }
            };
            debug!(path = %path.display(), "console connected");
            let (mut r, mut w) = stream.into_split();
            let mut buf = vec![0u8; 8192];
            let mut start = Box::pin(async {
                match (&control, before) {
                    (Some(c), Some(n)) => stream_start(c, endpoint, n).await,
                    _ => None,
                }
            });
            let mut start_known: Option<Option<u64>> = None;
            let mut feed = Feed {
                skip: None,
                held: seen_end.map(|_| Vec::new()),
                received: 0,
            };
            loop {
                tokio::select! {
                    s = &mut start, if start_known.is_none() => {
                        start_known = Some(s);
                        feed.skip = match (s, seen_end) {
                            (Some(s), Some(end)) => Some(end.saturating_sub(s)),
                            _ => Some(0),
                        };
                        feed.release(self);
                    }
                    n = r.read(&mut buf) => match n {
                        Ok(0) | Err(_) => break,
                        Ok(n) => feed.push(self, &buf[..n]),
                    },
                    Some(data) = rx.recv() => {
                        if w.write_all(&data).await.is_err() {
                            break;
                        }
                    }
                    _ = stopped(&mut stop) => {
                        // The VMM has exited, but what it wrote last (the guest's last
                        // line before a poweroff) may still be in the socket: read to its
                        // end, never reconnecting (the path may be a new VMM's by now).
                        self.close_input();
                        let _ = tokio::time::timeout(FINAL_READ, async {
                            while let Ok(n @ 1..) = r.read(&mut buf).await {
                                feed.push(self, &buf[..n]);
                            }
                        })
                        .await;
                        feed.skip.get_or_insert(0);
                        feed.release(self);
                        return;
                    }
                }
            }
            // What this connection published ends at its start plus what it received.
            seen_end = match start_known {
                Some(Some(s)) => Some(s + feed.received),
                _ => None,
            };
            if feed.held.is_some() {
                feed.skip.get_or_insert(0);
                feed.release(self);
            }
            tokio::select! {
                _ = stopped(&mut stop) => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
    }

    async fn run_file(self: &Arc<Self>, path: PathBuf, mut stop: watch::Receiver<bool>) {
        let mut pos = 0u64;
        let mut buf = vec![0u8; 8192];
        loop {
            // The pass that starts after the stop reads what the VMM wrote last.
            let stopping = *stop.borrow();
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(std::io::SeekFrom::Start(pos)).await.is_ok() {
                    while let Ok(n) = f.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        pos += n as u64;
                        self.publish(&buf[..n]);
                    }
                }
            }
            if stopping {
                return;
            }
            tokio::select! {
                _ = stopped(&mut stop) => {}
                _ = tokio::time::sleep(Duration::from_millis(25)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring {
            buf: VecDeque::new(),
            cap: 4,
        };
        r.push(b"ab");
        r.push(b"cde");
        assert_eq!(r.buf.iter().copied().collect::<Vec<_>>(), b"bcde");
        r.push(b"0123456");
        assert_eq!(r.buf.iter().copied().collect::<Vec<_>>(), b"3456");
    }

    #[tokio::test]
    async fn fan_out_replay_and_input_through_a_fake_serial_socket() {
        let dir = std::env::temp_dir().join(format!("qx-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("serial.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let console = Console::new(8);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        console.pump(
            Source::Socket {
                socket: path.clone(),
                control: None,
                endpoint: "serial",
            },
            stop_rx,
        );
        let (mut guest, _) = listener.accept().await.unwrap();

        let mut early = console.attach(false);
        guest.write_all(b"hello world").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 11 {
            got.extend_from_slice(&early.live.recv().await.unwrap());
        }
        assert_eq!(got, b"hello world");

        // A late attacher gets the last 8 bytes, then live output.
        let mut late = console.attach(true);
        assert_eq!(late.replay, b"lo world");
        guest.write_all(b"!").await.unwrap();
        assert_eq!(&*late.live.recv().await.unwrap(), b"!");
        assert_eq!(&*early.live.recv().await.unwrap(), b"!");

        // Input from a client reaches the guest.
        assert!(console.write(b"ls\n".to_vec()).await);
        let mut buf = [0u8; 3];
        guest.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ls\n");

        // The VMM writes its last bytes and exits; the agent stops the pump at once. The
        // bytes still reach the console (the guest's last line before a poweroff).
        guest.write_all(b" bye").await.unwrap();
        drop(guest);
        stop_tx.send(true).unwrap();
        let mut last = Vec::new();
        while !last.ends_with(b" bye") {
            let chunk = tokio::time::timeout(Duration::from_secs(5), early.live.recv())
                .await
                .expect("the last bytes never came")
                .unwrap();
            last.extend_from_slice(&chunk);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!console.write(b"x".to_vec()).await);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
