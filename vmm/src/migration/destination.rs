//! The receiving side of a live migration (`quantix-vmm --incoming SOCKET`): one
//! connection from the source; `hello` says what VM to build, which is built paused (the
//! same steps as a boot); pages arrive into its memory while the source's guest runs;
//! then the state, loaded as a restore loads a snapshot's; on `go` the guest runs here.
//!
//! The guest never runs before `go`: a source that goes away or gives up before it makes
//! this process exit with an error, and the half-received VM with it.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};

use thiserror::Error;
use tracing::{info, warn};
use vm_memory::Bytes;

use super::protocol::{self, Batch, Hello, Kind, MemoryTransfer, Message, ProtocolError, Running};
use crate::memory::GuestRam;
use crate::snapshot::{MemoryRegion, SnapshotState, PAGE_SIZE};

/// How long a destination waits for the source between two messages.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why an incoming migration failed.
#[derive(Debug, Error)]
pub enum IncomingError {
    /// The listening socket.
    #[error("migration socket {path}: {reason}")]
    Socket {
        /// Its path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The stream.
    #[error("incoming migration: {0}")]
    Protocol(#[from] ProtocolError),
    /// The source sent something that does not fit the VM.
    #[error("incoming migration: {0}")]
    Refused(String),
    /// The source gave up.
    #[error("incoming migration: the source gave up: {0}")]
    Abandoned(String),
    /// The VM could not be built or loaded.
    #[error("incoming migration: {0}")]
    Vm(String),
}

/// Listens on `path` (a new socket; a stale one is replaced, anything else refused),
/// accepts the source's connection, and removes the socket: one migration per process.
pub fn accept(path: &Path) -> Result<UnixStream, IncomingError> {
    let err = |reason: String| IncomingError::Socket {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(err("another process listens on it".into()));
            }
            std::fs::remove_file(path)
                .map_err(|e| err(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(err(
                "exists and is not a socket; refusing to replace it".into()
            ))
        }
        Err(_) => {}
    }
    // Bound (and listening) under another name, then renamed into place: a source that
    // sees the socket can connect at once (a bind shows the file before its listen).
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}.tmp", std::process::id()));
    let staging = std::path::PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging).map_err(|e| err(e.to_string()))?;
    if let Err(e) = std::fs::rename(&staging, path) {
        let _ = std::fs::remove_file(&staging);
        return Err(err(format!("putting the socket in place: {e}")));
    }
    info!(socket = %path.display(), "waiting for the migration source");
    let accepted = listener.accept();
    let _ = std::fs::remove_file(path);
    let (conn, _) = accepted.map_err(|e| err(format!("accept: {e}")))?;
    conn.set_read_timeout(Some(IDLE_TIMEOUT))
        .and_then(|()| conn.set_write_timeout(Some(IDLE_TIMEOUT)))
        .map_err(|e| err(e.to_string()))?;
    Ok(conn)
}

/// Reads the source's `hello` and checks its version and memory layout (against the
/// configuration's, which [`Hello::config`] carries: the regions must be exactly the RAM
/// layout a boot of that configuration makes); with a memory hand-over, receives the
/// memfd too.
pub fn hello(conn: &mut UnixStream) -> Result<(Hello, Option<std::fs::File>), IncomingError> {
    let hello = match protocol::receive(conn, &[])? {
        Message::Hello(h) => *h,
        other => {
            return Err(IncomingError::Refused(format!(
                "expected hello, got {}",
                other.name()
            )))
        }
    };
    if hello.version != protocol::VERSION {
        return Err(IncomingError::Refused(format!(
            "the source speaks migration protocol version {}, this VMM {}",
            hello.version,
            protocol::VERSION
        )));
    }
    let expected = expected_regions(&hello.config);
    if hello.regions != expected {
        return Err(IncomingError::Refused(format!(
            "the source's memory layout {:?} is not the layout of its configuration {:?}",
            hello.regions, expected
        )));
    }
    info!(from = %hello.written_by, vcpus = hello.config.vcpus, memory_mib = hello.config.memory.0,
        memory = ?hello.memory, "migration source connected");
    let memory = match hello.memory {
        MemoryTransfer::Copy => None,
        MemoryTransfer::Fd => Some(protocol::receive_memory_fd(conn)?),
    };
    Ok((hello, memory))
}

/// The RAM regions a boot of `config` makes, back to back in the memfd.
pub fn expected_regions(config: &quantix_vmm_api::VmConfig) -> Vec<MemoryRegion> {
    let mut offset = 0;
    crate::layout::ram_regions(config.memory.bytes())
        .into_iter()
        .map(|(a, size)| {
            let r = MemoryRegion {
                guest_addr: a.0,
                size,
                file_offset: offset,
            };
            offset += size;
            r
        })
        .collect()
}

/// Tells the source why this side gives up (best effort: it may be gone already).
pub fn abandon(conn: &mut UnixStream, why: &str) {
    if let Err(e) = protocol::send(conn, Kind::Abandon, why.as_bytes()) {
        warn!(error = %e, "cannot tell the migration source that this side gives up");
    }
}

/// Tells the source the VM is built and waits for memory.
pub fn ready(conn: &mut UnixStream) -> Result<(), IncomingError> {
    Ok(protocol::send(conn, Kind::Ready, &[])?)
}

/// What arrived before the switch.
pub struct Received {
    /// The state, parsed and checked.
    pub state: SnapshotState,
    /// When it came.
    pub at: Instant,
    /// For a post-copy switch: the pages still to come, one bitmap per region.
    pub missing: Option<Vec<Vec<u64>>>,
}

/// Receives memory into `ram` until the state comes.
pub fn receive_memory(
    conn: &mut UnixStream,
    ram: &GuestRam,
    regions: &[MemoryRegion],
    shared: bool,
) -> Result<Received, IncomingError> {
    let mut missing = None;
    let mut batches = 0u64;
    let mut bytes = 0u64;
    let started = Instant::now();
    loop {
        match protocol::receive(conn, regions)? {
            Message::Memory(_) if shared => {
                return Err(IncomingError::Refused(
                    "memory pages for a memory that was handed over".into(),
                ))
            }
            Message::Memory(batch) => {
                bytes += write_batch(ram, &batch)?;
                batches += 1;
            }
            Message::PostCopy(_) if shared => {
                return Err(IncomingError::Refused(
                    "post-copy of a memory that was handed over".into(),
                ))
            }
            Message::PostCopy(bitmaps) => missing = Some(bitmaps),
            Message::State(body) => {
                let at = Instant::now();
                let state = SnapshotState::parse(&body)
                    .map_err(|e| IncomingError::Refused(format!("the state: {e}")))?;
                if state.memory.regions != regions {
                    return Err(IncomingError::Refused(
                        "the state's memory layout is not the one announced".into(),
                    ));
                }
                info!(
                    batches,
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    post_copy = missing.is_some(),
                    "migration: memory received; loading the state"
                );
                return Ok(Received { state, at, missing });
            }
            Message::Abandon(why) => return Err(IncomingError::Abandoned(why)),
            other => {
                return Err(IncomingError::Refused(format!(
                    "expected memory or state, got {}",
                    other.name()
                )))
            }
        }
    }
}

/// Writes a batch into guest memory; zero ranges are punched out of the memfd (they read
/// as zeros and take no memory). Returns the data bytes written.
fn write_batch(ram: &GuestRam, batch: &Batch) -> Result<u64, IncomingError> {
    let mut bytes = 0;
    for (range, data) in batch.pieces() {
        match data {
            Some(d) => {
                ram.mem
                    .write_slice(d, protocol::addr(&range))
                    .map_err(|e| {
                        IncomingError::Vm(format!("writing guest memory at {:#x}: {e}", range.addr))
                    })?;
                bytes += d.len() as u64;
            }
            None => {
                // `parse_batch` checked the range lies in one region.
                let len = u64::from(range.pages) * PAGE_SIZE;
                ram.punch_hole(range.addr, len).map_err(|e| {
                    IncomingError::Vm(format!("zeroing guest memory at {:#x}: {e}", range.addr))
                })?;
            }
        }
    }
    Ok(bytes)
}

/// Tells the source the state is loaded and waits for `go`.
pub fn loaded_then_go(
    conn: &mut UnixStream,
    regions: &[MemoryRegion],
) -> Result<(), IncomingError> {
    protocol::send(conn, Kind::Loaded, &[])?;
    match protocol::receive(conn, regions)? {
        Message::Go => Ok(()),
        Message::Abandon(why) => Err(IncomingError::Abandoned(why)),
        other => Err(IncomingError::Refused(format!(
            "expected go, got {}",
            other.name()
        ))),
    }
}

/// Tells the source the guest runs here (the state came at `state_at`).
pub fn running(conn: &mut UnixStream, state_at: Instant) {
    let r = Running {
        load_us: state_at.elapsed().as_micros() as u64,
    };
    if let Err(e) = protocol::send_json(conn, Kind::Running, &r) {
        // The source stays paused, its outcome unknown, until its supervisor decides.
        warn!(error = %e, "cannot tell the migration source that the VM runs here");
    }
}
