//! The control socket: a Unix stream socket speaking JSON, one request and one
//! response per line. See `docs/vmm.md` for the protocol.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use crate::control::{
    MigrationControl, MigrationRefusal, PauseControl, PowerButtonControl, SnapshotControl,
};
use crate::exit::{ExitReason, ExitSignal};

use quantix_vmm_api::control::{
    error_line, ok_line, AfterSnapshot, ErrorCode, ErrorReply, PowerButtonReply, RunState,
    StateChange, StateReply, VersionReply, PROTOCOL_VERSION,
};
pub use quantix_vmm_api::control::{Request, MAX_REQUEST_BYTES};

/// Most simultaneous client connections.
pub const MAX_CONNECTIONS: usize = 64;

/// Errors setting up the socket.
#[derive(Debug, Error)]
pub enum ApiError {
    /// Another process is serving this socket.
    #[error("control socket {0} is in use by another process")]
    InUse(PathBuf),
    /// The path exists and is not a socket.
    #[error("control socket path {0} exists and is not a socket; refusing to replace it")]
    NotASocket(PathBuf),
    /// Binding failed.
    #[error("cannot create control socket {path}: {source}")]
    Bind {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What the VM reports about itself.
#[derive(Debug, Clone)]
pub struct VmInfo {
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// What it boots: "elf-pvh", "elf", "bzimage" or "firmware".
    pub boot: &'static str,
    /// The VMM's process id.
    pub pid: u32,
    /// The VMM's version.
    pub version: &'static str,
    /// The VM's counters (sampled by the `metrics` request).
    pub metrics: crate::metrics::VmMetrics,
    /// The guest's power button.
    pub power_button: Option<Arc<dyn PowerButtonControl>>,
    /// Pause and resume.
    pub pause: Option<Arc<dyn PauseControl>>,
    /// Snapshots.
    pub snapshot: Option<Arc<dyn SnapshotControl>>,
    /// Live migration.
    pub migration: Option<Arc<dyn MigrationControl>>,
}

/// Computes the response line for one request line.
pub fn respond(line: &[u8], info: &VmInfo, started: Instant, exit: &ExitSignal) -> String {
    let request: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => {
            return error_line(&ErrorReply::new(
                ErrorCode::InvalidRequest,
                format!("invalid request: {e}"),
            ))
        }
    };
    match answer(&request, info, started, exit) {
        Ok(line) => line,
        Err(refusal) => error_line(&refusal),
    }
}

fn answer(
    request: &Request,
    info: &VmInfo,
    started: Instant,
    exit: &ExitSignal,
) -> Result<String, ErrorReply> {
    let unsupported = |what: &str| ErrorReply::new(ErrorCode::Unsupported, what);
    Ok(match request {
        Request::Version {} => ok_line(&VersionReply {
            protocol: PROTOCOL_VERSION,
            vmm_version: info.version.to_string(),
            ops: Request::ALL.iter().map(|r| r.op().to_string()).collect(),
        }),
        Request::State {} => {
            let reason = exit.reason();
            ok_line(&StateReply {
                state: if reason.is_some() {
                    RunState::Stopping
                } else if info.pause.as_ref().is_some_and(|p| p.paused()) {
                    RunState::Paused
                } else {
                    RunState::Running
                },
                stop_reason: reason.as_ref().map(|r| r.name().to_string()),
                uptime_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                vcpus: info.vcpus,
                memory_mib: info.memory_mib,
                boot: info.boot.to_string(),
                pid: info.pid,
                version: info.version.to_string(),
                protocol: PROTOCOL_VERSION,
            })
        }
        Request::Metrics {} => ok_line(&info.metrics.sample()),
        Request::PowerButton {} => {
            let button = info
                .power_button
                .as_ref()
                .ok_or_else(|| unsupported("this VM has no power button"))?;
            let guest_enabled = button.press().map_err(|e| {
                ErrorReply::new(
                    ErrorCode::Failed,
                    format!("cannot press the power button: {e}"),
                )
            })?;
            if !guest_enabled {
                info!("power button pressed, but the guest has not enabled it (no ACPI?)");
            }
            ok_line(&PowerButtonReply { guest_enabled })
        }
        Request::Pause {} | Request::Resume {} if exit.reason().is_some() => {
            return Err(ErrorReply::new(ErrorCode::Conflict, "the VM is stopping"))
        }
        Request::Pause {}
        | Request::Resume {}
        | Request::Snapshot { .. }
        | Request::Migrate { .. }
            if info.migration.as_ref().is_some_and(|m| m.active()) =>
        {
            return Err(ErrorReply::new(
                ErrorCode::Conflict,
                "a migration is under way (migrate-cancel stops it)",
            ))
        }
        Request::Pause {} => {
            let p = info
                .pause
                .as_ref()
                .ok_or_else(|| unsupported("this VM cannot be paused"))?;
            p.pause()
                .map_err(|e| ErrorReply::new(ErrorCode::Failed, format!("cannot pause: {e}")))?;
            ok_line(&StateChange {
                state: RunState::Paused,
            })
        }
        Request::Resume {} => {
            let p = info
                .pause
                .as_ref()
                .ok_or_else(|| unsupported("this VM cannot be paused"))?;
            p.resume();
            ok_line(&StateChange {
                state: RunState::Running,
            })
        }
        Request::Snapshot { .. } if exit.reason().is_some() => {
            return Err(ErrorReply::new(ErrorCode::Conflict, "the VM is stopping"))
        }
        Request::Snapshot { dir, after, diff } => {
            let s = info
                .snapshot
                .as_ref()
                .ok_or_else(|| unsupported("this VM cannot take snapshots"))?;
            let was_paused = info.pause.as_ref().is_some_and(|p| p.paused());
            let mut reply = s.snapshot(Path::new(dir), *diff).map_err(|e| match e {
                crate::control::SnapshotFailure::NoBase(why) => ErrorReply::new(
                    ErrorCode::Conflict,
                    format!("cannot take the snapshot: {why}"),
                ),
                crate::control::SnapshotFailure::Failed(why) => ErrorReply::new(
                    ErrorCode::Failed,
                    format!("cannot take the snapshot: {why}"),
                ),
            })?;
            let resume = || match &info.pause {
                Some(p) => {
                    p.resume();
                    RunState::Running
                }
                None => RunState::Paused,
            };
            reply.state = match after {
                AfterSnapshot::Keep if was_paused => RunState::Paused,
                AfterSnapshot::Keep | AfterSnapshot::Resume => resume(),
                AfterSnapshot::Pause => RunState::Paused,
                AfterSnapshot::Stop => {
                    info!("stopping after the snapshot, as asked");
                    exit.request(ExitReason::ApiShutdown);
                    RunState::Stopping
                }
            };
            ok_line(&reply)
        }
        Request::Migrate { .. } if exit.reason().is_some() => {
            return Err(ErrorReply::new(ErrorCode::Conflict, "the VM is stopping"))
        }
        Request::Migrate { to, policy } => {
            let m = migration(info)?;
            let to = Path::new(to);
            if !to.is_absolute() {
                return Err(ErrorReply::new(
                    ErrorCode::InvalidRequest,
                    format!("`to` must be an absolute path, not {}", to.display()),
                ));
            }
            ok_line(&m.start(to, *policy).map_err(refusal)?)
        }
        Request::Migration {} => ok_line(&migration(info)?.status()),
        Request::MigrateCancel {} => ok_line(&migration(info)?.cancel().map_err(refusal)?),
        Request::Shutdown {} => {
            info!("shutdown requested on the control socket");
            exit.request(ExitReason::ApiShutdown);
            ok_line(&StateChange {
                state: RunState::Stopping,
            })
        }
    })
}

fn migration(info: &VmInfo) -> Result<&Arc<dyn MigrationControl>, ErrorReply> {
    info.migration
        .as_ref()
        .ok_or_else(|| ErrorReply::new(ErrorCode::Unsupported, "this VM cannot migrate"))
}

fn refusal(r: MigrationRefusal) -> ErrorReply {
    match r {
        MigrationRefusal::Conflict(why) => ErrorReply::new(ErrorCode::Conflict, why),
        MigrationRefusal::Failed(why) => {
            ErrorReply::new(ErrorCode::Failed, format!("cannot migrate: {why}"))
        }
    }
}

fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(ApiError::InUse(path.to_path_buf()));
            }
            // A stale socket left by a process that died.
            std::fs::remove_file(path).map_err(|source| ApiError::Bind {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ApiError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ApiError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(listener)
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The control socket server, driven by the VMM's event loop.
pub struct ApiServer {
    path: PathBuf,
    listener: UnixListener,
    conns: HashMap<i32, Conn>,
    info: VmInfo,
    started: Instant,
    exit: Arc<ExitSignal>,
}

impl ApiServer {
    /// Binds the socket at `path`.
    pub fn bind(path: &Path, info: VmInfo, exit: Arc<ExitSignal>) -> Result<Self, ApiError> {
        let listener = bind(path)?;
        info!(path = %path.display(), "control socket listening");
        Ok(Self {
            path: path.to_path_buf(),
            listener,
            conns: HashMap::new(),
            info,
            started: Instant::now(),
            exit,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        warn!("control socket: too many connections; refusing one");
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        warn!(error = ?e, "control socket: cannot watch a connection");
                        continue;
                    }
                    debug!(fd, "control socket: client connected");
                    self.conns.insert(
                        fd,
                        Conn {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!(error = %e, "control socket: accept failed");
                    break;
                }
            }
        }
    }

    /// Reads what the client sent and answers complete lines; false to close it.
    fn serve(&mut self, fd: i32) -> bool {
        let Some(conn) = self.conns.get_mut(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 4096];
        // A client that sends its request and half-closes at once (`printf ... | socat`)
        // still gets its answer: the end of its input ends the last line, and the
        // connection closes only after the requests read so far are answered.
        let mut eof = false;
        loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
            if conn.buf.len() > MAX_REQUEST_BYTES {
                break;
            }
        }
        if eof && !conn.buf.is_empty() && !conn.buf.ends_with(b"\n") {
            conn.buf.push(b'\n');
        }
        while let Some(pos) = conn.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let line = line.trim_ascii();
            if line.is_empty() {
                continue;
            }
            let mut reply = respond(line, &self.info, self.started, &self.exit);
            reply.push('\n');
            // Replies are small; a client that does not read them is dropped.
            conn.stream.set_nonblocking(false).ok();
            conn.stream
                .set_write_timeout(Some(std::time::Duration::from_secs(1)))
                .ok();
            let ok = conn.stream.write_all(reply.as_bytes()).is_ok();
            conn.stream.set_nonblocking(true).ok();
            if !ok {
                return false;
            }
        }
        if conn.buf.len() > MAX_REQUEST_BYTES {
            let mut msg = error_line(&ErrorReply::new(
                ErrorCode::TooLong,
                format!("request longer than {MAX_REQUEST_BYTES} bytes"),
            ));
            msg.push('\n');
            let _ = conn.stream.write_all(msg.as_bytes());
            return false;
        }
        !eof
    }
}

impl MutEventSubscriber for ApiServer {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let keep = !events.event_set().intersects(EventSet::ERROR) && self.serve(fd);
        if !keep {
            if let Some(conn) = self.conns.remove(&fd) {
                let _ = ops.remove(Events::empty(&conn.stream));
                debug!(fd, "control socket: client disconnected");
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            warn!(error = ?e, "control socket: cannot watch the listener");
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> VmInfo {
        VmInfo {
            vcpus: 2,
            memory_mib: 256,
            boot: "bzimage",
            pid: 1,
            version: "test",
            metrics: crate::metrics::VmMetrics {
                vcpus: vec![Default::default(), Default::default()],
                ..Default::default()
            },
            power_button: None,
            pause: None,
            snapshot: None,
            migration: None,
        }
    }

    #[derive(Debug, Default)]
    struct FakePause {
        paused: std::sync::atomic::AtomicBool,
        fail: bool,
    }

    impl PauseControl for FakePause {
        fn pause(&self) -> Result<(), String> {
            if self.fail {
                return Err("vCPU 1 did not stop".into());
            }
            self.paused
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Ok(())
        }
        fn resume(&self) {
            self.paused
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
        fn paused(&self) -> bool {
            self.paused.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[test]
    fn pause_and_resume_show_in_the_state() {
        let exit = ExitSignal::new().unwrap();
        let pausable = VmInfo {
            pause: Some(Arc::new(FakePause::default())),
            snapshot: None,
            migration: None,
            ..info()
        };
        let ask = |req: &[u8], info: &VmInfo| -> serde_json::Value {
            serde_json::from_str(&respond(req, info, Instant::now(), &exit)).unwrap()
        };
        assert_eq!(ask(br#"{"op":"pause"}"#, &pausable)["state"], "paused");
        assert_eq!(ask(br#"{"op":"state"}"#, &pausable)["state"], "paused");
        assert_eq!(ask(br#"{"op":"resume"}"#, &pausable)["state"], "running");
        assert_eq!(ask(br#"{"op":"state"}"#, &pausable)["state"], "running");
        let failing = VmInfo {
            pause: Some(Arc::new(FakePause {
                fail: true,
                ..Default::default()
            })),
            ..info()
        };
        let v = ask(br#"{"op":"pause"}"#, &failing);
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "cannot pause: vCPU 1 did not stop");
        assert_eq!(ask(br#"{"op":"state"}"#, &failing)["state"], "running");
        assert_eq!(v["code"], "failed");
        let v = ask(br#"{"op":"pause"}"#, &info());
        assert_eq!(v["error"], "this VM cannot be paused");
        assert_eq!(v["code"], "unsupported");
        // Once a stop is under way, neither is accepted.
        exit.request(ExitReason::ApiShutdown);
        let v = ask(br#"{"op":"pause"}"#, &pausable);
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "the VM is stopping");
        assert_eq!(v["code"], "conflict");
    }

    /// A button whose guest has (or has not) enabled its interrupt, or that fails.
    #[derive(Debug)]
    struct FakeButton {
        enabled: io::Result<bool>,
        presses: std::sync::atomic::AtomicU32,
    }

    impl PowerButtonControl for FakeButton {
        fn press(&self) -> io::Result<bool> {
            self.presses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match &self.enabled {
                Ok(e) => Ok(*e),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            }
        }
    }

    #[test]
    fn power_button_reports_whether_the_guest_listens() {
        let exit = ExitSignal::new().unwrap();
        let press = |info: &VmInfo| -> serde_json::Value {
            serde_json::from_str(&respond(
                br#"{"op":"power-button"}"#,
                info,
                Instant::now(),
                &exit,
            ))
            .unwrap()
        };
        for enabled in [true, false] {
            let button = Arc::new(FakeButton {
                enabled: Ok(enabled),
                presses: Default::default(),
            });
            let info = VmInfo {
                power_button: Some(button.clone()),
                ..info()
            };
            let v = press(&info);
            assert_eq!(v["ok"], true, "{v}");
            assert_eq!(v["guest_enabled"], enabled, "{v}");
            assert_eq!(button.presses.load(std::sync::atomic::Ordering::Relaxed), 1);
        }
        let failing = VmInfo {
            power_button: Some(Arc::new(FakeButton {
                enabled: Err(io::Error::from_raw_os_error(libc::EBADF)),
                presses: Default::default(),
            })),
            ..info()
        };
        let v = press(&failing);
        assert_eq!(v["ok"], false);
        assert!(v["error"]
            .as_str()
            .unwrap()
            .starts_with("cannot press the power button"));
        let v = press(&info());
        assert_eq!(v["ok"], false);
        assert_eq!(v["error"], "this VM has no power button");
        // Pressing the button never stops the VM by itself: that is the guest's decision.
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn version_lists_every_op_and_the_typed_client_reads_it() {
        use quantix_vmm_api::control::{parse_reply, GetState, GetVersion, Op};
        let exit = ExitSignal::new().unwrap();
        let ask = |r: &Request| {
            respond(
                r.to_line().trim_end().as_bytes(),
                &info(),
                Instant::now(),
                &exit,
            )
        };
        let v: VersionReply =
            parse_reply(&GetVersion::REQUEST, &ask(&GetVersion::REQUEST)).unwrap();
        assert_eq!(v.protocol, PROTOCOL_VERSION);
        assert_eq!(v.ops.len(), Request::ALL.len());
        // Every op the VMM lists is one it answers (not with "invalid request"), with the
        // fields a client sends for it.
        for r in Request::ALL {
            assert!(v.ops.contains(&r.op().to_string()));
            let line = respond(
                r.to_line().trim_end().as_bytes(),
                &info(),
                Instant::now(),
                &ExitSignal::new().unwrap(),
            );
            assert!(!line.contains("invalid-request"), "{}: {line}", r.op());
        }
        // A snapshot without a directory is malformed; one on a VM that cannot snapshot is
        // unsupported.
        let bare = respond(br#"{"op":"snapshot"}"#, &info(), Instant::now(), &exit);
        assert!(bare.contains("missing field `dir`"), "{bare}");
        let unsupported = respond(
            br#"{"op":"snapshot","dir":"/x","after":"pause"}"#,
            &info(),
            Instant::now(),
            &exit,
        );
        assert!(
            unsupported.contains("\"code\":\"unsupported\""),
            "{unsupported}"
        );
        let s: StateReply = parse_reply(&GetState::REQUEST, &ask(&GetState::REQUEST)).unwrap();
        assert_eq!(
            (s.state, s.vcpus, s.protocol),
            (RunState::Running, 2, PROTOCOL_VERSION)
        );
    }

    #[test]
    fn state_then_shutdown() {
        let exit = ExitSignal::new().unwrap();
        let started = Instant::now();
        let v: serde_json::Value =
            serde_json::from_str(&respond(br#"{"op":"state"}"#, &info(), started, &exit)).unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["state"], "running");
        assert_eq!(v["vcpus"], 2);
        assert_eq!(v["memory_mib"], 256);
        let v: serde_json::Value =
            serde_json::from_str(&respond(br#"{"op":"shutdown"}"#, &info(), started, &exit))
                .unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(exit.reason(), Some(ExitReason::ApiShutdown));
        let v: serde_json::Value =
            serde_json::from_str(&respond(br#"{"op":"state"}"#, &info(), started, &exit)).unwrap();
        assert_eq!(v["state"], "stopping");
        assert_eq!(v["stop_reason"], "api-shutdown");
    }

    #[test]
    fn metrics_list_every_vcpu() {
        let exit = ExitSignal::new().unwrap();
        let v: serde_json::Value = serde_json::from_str(&respond(
            br#"{"op":"metrics"}"#,
            &info(),
            Instant::now(),
            &exit,
        ))
        .unwrap();
        assert_eq!(v["ok"], true);
        assert_eq!(v["vcpus"].as_array().unwrap().len(), 2);
        assert_eq!(v["vcpus"][1]["index"], 1);
        assert_eq!(v["serial"]["tx_bytes"], 0);
    }

    #[test]
    fn malformed_requests_get_errors() {
        let exit = ExitSignal::new().unwrap();
        for bad in [
            &b"{"[..],
            br#"{"op":"launch-missiles"}"#,
            br#"{"op":"state","x":1}"#,
            b"\xff\xfe",
            b"[]",
        ] {
            let v: serde_json::Value =
                serde_json::from_str(&respond(bad, &info(), Instant::now(), &exit)).unwrap();
            assert_eq!(v["ok"], false, "{bad:?}");
            assert_eq!(v["code"], "invalid-request", "{bad:?}");
            assert!(v["error"].as_str().unwrap().starts_with("invalid request"));
        }
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn refuses_to_replace_a_file_or_a_live_socket() {
        let dir = std::env::temp_dir().join(format!("qx-api-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(bind(&file), Err(ApiError::NotASocket(_))));
        let sock = dir.join("sock");
        let live = bind(&sock).unwrap();
        assert!(matches!(bind(&sock), Err(ApiError::InUse(_))));
        drop(live);
        // Now stale: replaced.
        let _again = bind(&sock).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }
}
