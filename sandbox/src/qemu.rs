//! The QEMU process running the nested host: spawn, read its console line
//! by line with deadlines, and make sure it never outlives us.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::error::InfraFailure;

/// A QEMU command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QemuCommand {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// The Unix socket of its human monitor (in `args` as `-monitor unix:...`), if any.
    pub monitor: Option<PathBuf>,
}

impl QemuCommand {
    /// The command line as a shell would show it (for messages).
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for a in &self.args {
            s.push(' ');
            if a.contains(' ') {
                s.push_str(&format!("'{a}'"));
            } else {
                s.push_str(a);
            }
        }
        s
    }
}

/// Something QEMU printed, or the end of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Output {
    /// A line of the serial console (stdout), without `\r\n`.
    Console(String),
    /// A line QEMU itself printed on stderr.
    Stderr(String),
    /// QEMU closed its stdout (it exited).
    Closed,
    /// Nothing before the deadline.
    Timeout,
}

/// A running QEMU; killed (and reaped) when dropped.
pub(crate) struct RunningQemu {
    child: Child,
    rx: Receiver<Output>,
    readers: Vec<JoinHandle<()>>,
    stdout_open: bool,
    exit: Option<ExitStatus>,
}

impl RunningQemu {
    /// Starts QEMU with stdin from /dev/null and piped stdout/stderr.
    ///
    /// QEMU gets SIGKILL if the thread that started it dies
    /// (`PR_SET_PDEATHSIG`), so a killed test run leaves nothing behind.
    pub fn spawn(cmd: &QemuCommand) -> Result<Self, InfraFailure> {
        let mut command = Command::new(&cmd.program);
        command
            .args(&cmd.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl(2), which is async-signal-safe; it touches no
        // memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| InfraFailure::QemuSpawn {
            command: cmd.display(),
            reason: e.to_string(),
        })?;
        let (tx, rx) = mpsc::channel();
        let mut readers = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let tx = tx.clone();
            readers.push(std::thread::spawn(move || {
                read_lines(stdout, tx, Output::Console, true)
            }));
        }
        if let Some(stderr) = child.stderr.take() {
            readers.push(std::thread::spawn(move || {
                read_lines(stderr, tx, Output::Stderr, false)
            }));
        }
        Ok(RunningQemu {
            child,
            rx,
            readers,
            stdout_open: true,
            exit: None,
        })
    }

    /// The next output before `deadline`.
    pub fn next(&mut self, deadline: Instant) -> Output {
        if !self.stdout_open {
            // Drain what stderr still has, then report the end again.
            return match self.rx.try_recv() {
                Ok(out) => out,
                Err(_) => Output::Closed,
            };
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.rx.recv_timeout(wait) {
            Ok(Output::Closed) => {
                self.stdout_open = false;
                Output::Closed
            }
            Ok(out) => out,
            Err(RecvTimeoutError::Timeout) => Output::Timeout,
            Err(RecvTimeoutError::Disconnected) => {
                self.stdout_open = false;
                Output::Closed
            }
        }
    }

    /// Waits up to `within` for QEMU to exit; kills it if it does not.
    /// Returns the exit status as text (`exit status: 0`, `killed`).
    pub fn finish(&mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    self.exit = Some(status);
                    return status.to_string();
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Ok(None) => {
                    warn!(
                        pid = self.child.id(),
                        "QEMU did not exit in {within:?}: killing it"
                    );
                    self.kill();
                    return "killed by the sandbox".to_string();
                }
                Err(e) => {
                    warn!("waiting for QEMU: {e}");
                    self.kill();
                    return format!("unknown ({e})");
                }
            }
        }
    }

    /// After QEMU exited (see [`RunningQemu::finish`]): waits for the
    /// readers to reach EOF and returns what they still had.
    pub fn drain(&mut self) -> Vec<Output> {
        self.kill();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        self.rx
            .try_iter()
            .filter(|o| !matches!(o, Output::Closed))
            .collect()
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if self.exit.is_some() {
            return;
        }
        if let Err(e) = self.child.kill() {
            debug!("kill QEMU: {e}");
        }
        match self.child.wait() {
            Ok(status) => self.exit = Some(status),
            Err(e) => warn!("reaping QEMU: {e}"),
        }
    }
}

impl Drop for RunningQemu {
    fn drop(&mut self) {
        self.kill();
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Sends each line of `from` (lossy UTF-8, `\r` stripped) until EOF; then
/// `Closed` if `report_close`.
fn read_lines(from: impl Read, tx: Sender<Output>, wrap: fn(String) -> Output, report_close: bool) {
    let mut reader = BufReader::with_capacity(64 * 1024, from);
    let mut buf = Vec::with_capacity(1024);
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) => break,
            Ok(_) => {
                while matches!(buf.last(), Some(b'\n' | b'\r')) {
                    buf.pop();
                }
                let line = String::from_utf8_lossy(&buf).replace('\r', "");
                if tx.send(wrap(line)).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                debug!("reading QEMU output: {e}");
                break;
            }
        }
    }
    if report_close {
        let _ = tx.send(Output::Closed);
    }
}
