//! VMM processes: starting one detached from the agent, finding running ones again after an
//! agent restart, noticing their exit at once (pidfd), and learning why they exited.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use quantix_proto::v1::ExitInfo;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// The exit record `quantix-vmm --exit-file` writes (the contract's type).
use quantix_vmm_api::ExitRecord;

/// Exit reasons that are not failures for the restart policy.
pub fn is_clean_reason(reason: &str) -> bool {
    matches!(reason, "poweroff" | "reboot" | "api-shutdown")
}

/// The first descriptor number a VMM inherits its files as.
pub const FIRST_PASSED_FD: i32 = 3;

/// Starts `binary args...` in its own session (so that it outlives the agent and no
/// terminal signal reaches it), stdin from /dev/null, stdout and stderr appended to `log`,
/// and `files` as descriptors 3, 4, ... (nothing else of the agent's is inherited: every
/// other descriptor is close-on-exec). The agent does not keep a `Child`: it reaps the
/// process itself (see [`wait_exit`]).
pub fn spawn_detached(
    binary: &Path,
    args: &[String],
    log: &Path,
    files: &[std::fs::File],
) -> io::Result<u32> {
    // Dropping a std Child neither kills nor waits for the process; wait_exit reaps it.
    Ok(spawn_child(binary, args, log, files)?.id())
}

/// [`spawn_detached`], keeping the `Child` (for a short-lived process the caller waits for,
/// such as the jailer).
pub fn spawn_child(
    binary: &Path,
    args: &[String],
    log: &Path,
    files: &[std::fs::File],
) -> io::Result<std::process::Child> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // Duplicates numbered above every target (3 .. 3+n), so that placing one never
    // overwrites another that is still to be placed.
    let n = files.len() as i32;
    let mut sources = Vec::with_capacity(files.len());
    for f in files {
        // SAFETY: F_DUPFD_CLOEXEC on an open descriptor returns a new one or -1.
        let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FIRST_PASSED_FD + n) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor nothing else owns; closed when `sources` drops.
        sources.push(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let raw: Vec<i32> = sources.iter().map(|f| f.as_raw_fd()).collect();
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(binary);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: the closure runs in the child between fork and exec and only makes system
    // calls that are async-signal-safe (setsid, dup2, close_range, getrlimit, fcntl),
    // reading `raw`, which was built before the fork and is not modified.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            for (i, fd) in raw.iter().enumerate() {
                // dup2 clears close-on-exec on the new descriptor.
                if libc::dup2(*fd, FIRST_PASSED_FD + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Whatever the agent itself inherited without close-on-exec (a supervisor's
            // pipe, a shell's descriptor) must not reach a VMM either. Marked close-on-exec
            // rather than closed: std's own pipe that reports a failed exec must stay open.
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            let first_free = (FIRST_PASSED_FD + raw.len() as i32) as libc::c_uint;
            if libc::syscall(
                libc::SYS_close_range,
                first_free,
                libc::c_uint::MAX,
                CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                let mut lim = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                    lim.rlim_cur.min(1 << 20) as libc::c_int
                } else {
                    1024
                };
                for fd in first_free as libc::c_int..top {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(sources);
    Ok(child)
}

/// A pidfd for `pid`: readable once the process exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// How the process ended, as far as waitpid tells (only for the agent's own children).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStatus {
    /// Exited with this status.
    Exited(i32),
    /// Killed by this signal.
    Signaled(i32),
    /// Not our child (re-adopted): unknown.
    Unknown,
}

/// Waits until the process behind `pidfd` exits, then reaps it if it is our child.
pub async fn wait_exit(pid: u32, pidfd: OwnedFd) -> io::Result<WaitStatus> {
    // SAFETY: `pidfd` is an OwnedFd moved into the AsyncFd, which keeps it open and
    // unchanged until it is dropped at the end of this function.
    let afd = unsafe { AsyncFd::register_with_interest(pidfd, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    let _guard = afd.readable().await?;
    let mut status: libc::c_int = 0;
    // SAFETY: waitpid writes the status into a local integer; WNOHANG never blocks. A pid
    // that is not our child yields ECHILD, handled below.
    let r = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
    if r == pid as libc::pid_t {
        if libc::WIFEXITED(status) {
            return Ok(WaitStatus::Exited(libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Ok(WaitStatus::Signaled(libc::WTERMSIG(status)));
        }
    }
    Ok(WaitStatus::Unknown)
}

/// Why a VMM exited, from its wait status and its exit record (either may be missing).
pub fn exit_info(status: WaitStatus, exit_file: &Path, now_ms: i64) -> ExitInfo {
    let record: Option<ExitRecord> = std::fs::read(exit_file)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let mut info = ExitInfo {
        at_unix_ms: now_ms,
        exit_code: -1,
        ..Default::default()
    };
    match (status, record) {
        (WaitStatus::Signaled(sig), _) => {
            info.reason = "killed".into();
            info.signal = sig;
            info.detail = format!("the VMM was killed by signal {sig}");
        }
        (_, Some(rec)) => {
            info.exit_code = rec.code;
            info.detail = rec.detail;
            if rec.reason == "signal" {
                info.signal = rec.code - 128;
            }
            info.reason = rec.reason;
        }
        (WaitStatus::Exited(code), None) => {
            info.exit_code = code;
            info.reason = if code == 0 { "exited" } else { "vmm-error" }.into();
            info.detail = format!("the VMM exited with status {code} and left no exit record");
        }
        (WaitStatus::Unknown, None) => {
            info.reason = "killed".into();
            info.detail =
                "the VMM is gone and left no exit record (killed, or died without cleanup)".into();
        }
    }
    info.failure = !is_clean_reason(&info.reason);
    info
}

/// The pid of the live `quantix-vmm` serving the control socket `api_socket`, if any (how
/// a restarted agent finds the VMMs it started, whatever its store says about pids). The
/// kernel names the process that listens on the socket (`SO_PEERCRED` of a connection to
/// it), and that process's executable must be a `quantix-vmm`: neither a command line (which
/// any process can fake) nor a stale pid file decides. The socket lives in the VM's private
/// directory, which only root and the VM's own uid can reach.
pub fn find_vmm(api_socket: &Path) -> Option<u32> {
    use std::os::fd::AsRawFd;
    let stream = std::os::unix::net::UnixStream::connect(api_socket).ok()?;
    let peer = crate::access::UnixPeer::of(stream.as_raw_fd()).ok()?;
    drop(stream);
    let pid = u32::try_from(peer.pid).ok().filter(|p| *p > 0)?;
    if is_zombie(pid) || !is_vmm_executable(pid) {
        return None;
    }
    Some(pid)
}

/// Whether `/proc/PID/exe` is a `quantix-vmm` (also one replaced on disk since it started:
/// "quantix-vmm (deleted)").
fn is_vmm_executable(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|n| n.starts_with("quantix-vmm"))
}

/// The process state letter from /proc/PID/stat ('T' when stopped, 'Z' for a zombie).
pub fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the state follows the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.trim_start().chars().next()
}

fn is_zombie(pid: u32) -> bool {
    matches!(proc_state(pid), Some('Z') | Some('X') | None)
}

/// A process's figures from /proc, as the standard `process_*` metrics name them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcStats {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory (VmRSS), bytes.
    pub resident_bytes: u64,
    /// Virtual memory (VmSize), bytes.
    pub virtual_bytes: u64,
    /// Start time, seconds since the Unix epoch.
    pub start_time_seconds: f64,
    /// Open file descriptors (0 when /proc/PID/fd is not readable).
    pub open_fds: u64,
    /// Its soft limit on open files (0 when not readable).
    pub max_fds: u64,
}

/// Reads `pid`'s figures, if it is alive.
pub fn stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    // The command name is in parentheses and may hold spaces: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Index 0 is field 3 (state) of proc(5): utime 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    // SAFETY: sysconf takes a constant and returns a value; no memory involved.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let kib = |key: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            .saturating_mul(1024)
    };
    let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("btime "))
            .and_then(|v| v.trim().parse::<f64>().ok())
    });
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0);
    let max_fds = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Max open files"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Some(ProcStats {
        cpu_seconds: (field(14)? + field(15)?) / hz,
        resident_bytes: kib("VmRSS:"),
        virtual_bytes: kib("VmSize:"),
        start_time_seconds: boot_time.unwrap_or(0.0) + field(22)? / hz,
        open_fds,
        max_fds,
    })
}

/// Sends `sig` to the process `pid`. Refuses 0 and values that kill(2) would read as a
/// process group or "every process" (an unrecorded pid of 0 once made a stop signal the
/// agent's own process group).
pub fn signal(pid: u32, sig: i32) -> io::Result<()> {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("refusing to signal pid {pid}: not a single process"),
            ))
        }
    };
    // SAFETY: kill(2) takes integers only; `pid` names one process (checked above).
    if unsafe { libc::kill(pid, sig) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Rotates a log that a VMM appends to (`O_APPEND`) once it is larger than `max` bytes:
/// its content goes to `<path>.1` (replacing the previous one) and the file is truncated,
/// so that the writer's next write lands at its start (as logrotate's copytruncate; lines
/// written between the copy and the truncation are lost). True if it rotated.
pub fn rotate_if_larger(path: &Path, max: u64) -> io::Result<bool> {
    let len = match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_file() => m.len(),
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if len <= max {
        return Ok(false);
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::copy(path, &old)?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .set_len(0)?;
    Ok(true)
}

/// The last `max` bytes of a text file, for error messages.
pub fn tail(path: &Path, max: usize) -> String {
    let Ok(bytes) = std::fs::read(path) else {
        return String::new();
    };
    let start = bytes.len().saturating_sub(max);
    String::from_utf8_lossy(&bytes[start..]).trim().to_string()
}

/// `quantix-vmm --version`, or an explanation.
pub fn vmm_version(binary: &Path) -> String {
    match Command::new(binary).arg("--version").output() {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        Ok(o) => format!("unknown ({})", o.status),
        Err(e) => format!("unavailable: {e}"),
    }
}

/// Whether this `quantix-vmm` supports `--serial socket=PATH`.
pub fn vmm_has_serial_socket(binary: &Path) -> bool {
    Command::new(binary)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("socket=PATH"))
        .unwrap_or(false)
}

/// Paths of one VM's files in its directory.
#[derive(Debug, Clone)]
pub struct VmPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// The VMM's jail root (also the root of an unjailed VMM's files): `dir/root`.
    pub fn root(&self) -> PathBuf {
        self.dir.join("root")
    }
    /// Its private directory (mode 0700, the VMM's): sockets, exit record, serial log.
    pub fn run(&self) -> PathBuf {
        self.root().join("run")
    }
    /// The VMM's control socket.
    pub fn api_socket(&self) -> PathBuf {
        self.run().join("api.sock")
    }
    /// The serial console socket (socket mode).
    pub fn serial_socket(&self) -> PathBuf {
        self.run().join("serial.sock")
    }
    /// The serial console output file (file mode).
    pub fn serial_file(&self) -> PathBuf {
        self.run().join("serial.log")
    }
    /// The virtio console's socket (socket mode), when the spec asks for the device.
    pub fn console_socket(&self) -> PathBuf {
        self.run().join("console.sock")
    }
    /// The virtio console's output file (file mode).
    pub fn console_file(&self) -> PathBuf {
        self.run().join("console.log")
    }
    /// The directory of the vsock device's host sockets: root's with the VMM's group, 0770,
    /// kept across restarts (host services bind their `vsock.sock_PORT` listeners there).
    pub fn vsock_dir(&self) -> PathBuf {
        self.root().join("vsock")
    }
    /// The vsock device's own socket (host-initiated connections).
    pub fn vsock_socket(&self) -> PathBuf {
        self.vsock_dir().join("vsock.sock")
    }
    /// The VMM's exit record.
    pub fn exit_file(&self) -> PathBuf {
        self.run().join("exit.json")
    }
    /// The VMM's stdout and stderr (the agent's file, outside the jail).
    pub fn vmm_log(&self) -> PathBuf {
        self.dir.join("vmm.log")
    }
    /// The copy of the VM's record (spec) in its directory.
    pub fn record_file(&self) -> PathBuf {
        self.dir.join("vm.pb")
    }
    /// Writes `vm` there (atomically).
    pub fn write_record(&self, vm: &quantix_proto::v1::Vm) -> io::Result<()> {
        use prost::Message;
        let tmp = self.dir.join("vm.pb.tmp");
        std::fs::write(&tmp, vm.encode_to_vec())?;
        std::fs::rename(&tmp, self.record_file())
    }
    /// Reads it back (None if missing or undecodable; at most 1 MiB is read).
    pub fn read_record(&self) -> Option<quantix_proto::v1::Vm> {
        use prost::Message;
        use std::io::Read;
        let mut bytes = Vec::new();
        std::fs::File::open(self.record_file())
            .ok()?
            .take(1 << 20)
            .read_to_end(&mut bytes)
            .ok()?;
        quantix_proto::v1::Vm::decode(bytes.as_slice()).ok()
    }
    /// The configuration the VMM was last started with (JSON, for people: the VMM reads its
    /// own sealed copy).
    pub fn vmm_config_file(&self) -> PathBuf {
        self.dir.join("vmm-config.json")
    }
    /// Where the jailer writes the VMM's pid.
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("vmm.pid")
    }
    /// How the VMM names `path` (one of the files in [`VmPaths::run`]): `/run/NAME` inside
    /// its jail, else the path itself.
    pub fn for_vmm(&self, path: &Path, jailed: bool) -> String {
        match (jailed, path.strip_prefix(self.root())) {
            (true, Ok(rel)) => Path::new("/").join(rel).display().to_string(),
            _ => path.display().to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pidfd_notices_exit_and_reaps_our_child() {
        let dir = std::env::temp_dir().join(format!("qx-proc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("log");
        let pid = spawn_detached(
            Path::new("/bin/sh"),
            &["-c".into(), "echo hi; exit 3".into()],
            &log,
            &[],
        )
        .unwrap();
        let fd = pidfd_open(pid).unwrap();
        let st = wait_exit(pid, fd).await.unwrap();
        assert_eq!(st, WaitStatus::Exited(3));
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "hi\n");
        // Reaped: the pid is gone.
        assert!(proc_state(pid).is_none());

        let pid = spawn_detached(Path::new("/bin/sleep"), &["30".into()], &log, &[]).unwrap();
        assert!(proc_state(pid).is_some(), "sleep is not running");
        let fd = pidfd_open(pid).unwrap();
        signal(pid, libc::SIGKILL).unwrap();
        assert_eq!(wait_exit(pid, fd).await.unwrap(), WaitStatus::Signaled(9));
        let info = exit_info(WaitStatus::Signaled(9), &dir.join("none"), 1);
        assert_eq!(info.reason, "killed");
        assert!(info.failure);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn files_are_passed_as_descriptors_3_and_up_and_nothing_else_leaks() {
        let dir = std::env::temp_dir().join(format!("qx-passfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a"), dir.join("b"));
        std::fs::write(&a, b"A").unwrap();
        std::fs::write(&b, b"B").unwrap();
        // Opened in reverse so that the agent-side numbers differ from the targets.
        let fb = std::fs::File::open(&b).unwrap();
        let fa = std::fs::File::open(&a).unwrap();
        let log = dir.join("log");
        let pid = spawn_detached(
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "cat <&3; cat <&4; echo; ls /proc/self/fd | wc -l".into(),
            ],
            &log,
            &[fa, fb],
        )
        .unwrap();
        let fd = pidfd_open(pid).unwrap();
        assert_eq!(wait_exit(pid, fd).await.unwrap(), WaitStatus::Exited(0));
        // A binary that cannot run is still an error of the spawn.
        let e = spawn_detached(Path::new("/nonexistent/vmm"), &[], &log, &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        let out = std::fs::read_to_string(&log).unwrap();
        let mut lines = out.lines();
        assert_eq!(lines.next(), Some("AB"), "{out}");
        // 0, 1, 2, 3, 4, and the one `ls` opens for /proc/self/fd.
        assert_eq!(lines.next().map(str::trim), Some("6"), "{out}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn logs_rotate_past_their_cap_and_the_writer_goes_on() {
        use std::io::Write;
        let dir = std::env::temp_dir().join(format!("qx-rotate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        let _ = std::fs::remove_file(&log);
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        w.write_all(&[b'a'; 100]).unwrap();
        assert!(!rotate_if_larger(&log, 100).unwrap(), "not past the cap");
        w.write_all(b"b").unwrap();
        assert!(rotate_if_larger(&log, 100).unwrap());
        assert_eq!(std::fs::read(dir.join("vmm.log.1")).unwrap().len(), 101);
        w.write_all(b"after").unwrap();
        assert_eq!(
            std::fs::read(&log).unwrap(),
            b"after",
            "the writer starts over"
        );
        assert!(!rotate_if_larger(&dir.join("none"), 1).unwrap());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn exit_info_prefers_the_record() {
        let dir = std::env::temp_dir().join(format!("qx-exitinfo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("exit.json");
        std::fs::write(&f, br#"{"code":0,"reason":"poweroff","detail":""}"#).unwrap();
        let i = exit_info(WaitStatus::Unknown, &f, 5);
        assert_eq!(
            (i.reason.as_str(), i.exit_code, i.failure),
            ("poweroff", 0, false)
        );
        std::fs::write(
            &f,
            br#"{"code":3,"reason":"triple-fault","detail":"vCPU 0"}"#,
        )
        .unwrap();
        let i = exit_info(WaitStatus::Exited(3), &f, 5);
        assert_eq!(
            (i.reason.as_str(), i.exit_code, i.failure),
            ("triple-fault", 3, true)
        );
        let i = exit_info(WaitStatus::Unknown, &dir.join("missing"), 5);
        assert_eq!(i.reason, "killed");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

#[cfg(test)]
mod signal_tests {
    use super::signal;

    #[test]
    fn process_groups_and_everyone_are_never_signalled() {
        for pid in [0u32, u32::MAX, 1 << 31] {
            let e = signal(pid, 0).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput, "{pid}");
        }
        signal(std::process::id(), 0).unwrap(); // signal 0: exists, nothing sent
    }
}
