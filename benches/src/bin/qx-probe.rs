//! `qx-probe`: runs one VMM command inside the nested host and measures it.
//!
//! ```text
//! qx-probe --vmm NAME --label LABEL --guest-mib MIB --timeout-s SECS [--echo-console]
//!          -- CMD [ARGS...]
//! ```
//!
//! Takes a monotonic timestamp, spawns `CMD` (stdin `/dev/null`, stdout piped, stderr to
//! `/tmp/<LABEL>.stderr`), reads its stdout line by line and, when the guest's
//! `QX-GUEST-INIT` line appears, records the time since the spawn, the guest's uptime
//! from that line and the VMM's memory (`/proc/PID/status`, `/proc/PID/smaps`: total RSS,
//! the guest RAM mapping's RSS, the overhead). It then waits for the VMM's exit (killing
//! it after `SECS` in all) and prints one line `QX-PROBE {json}` (see
//! `quantix_bench::probe::ProbeRecord`), then the VMM's stderr and, if the run failed,
//! the end of the guest console; with `--echo-console`, the whole console, each line
//! with its time since the spawn (`guest| +1234.5ms <line>`). Exit status 0 if the run
//! succeeded, 1 if not, 2 on usage errors.
//!
//! Built statically and put into the nested host by `quantix-bench boot`. Uses the
//! standard library and libc only.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use quantix_bench::probe::{self, MemorySnapshot, ProbeRecord, GUEST_INIT_MARKER, KERNEL_BANNER};

/// Console lines kept for the failure report.
const TAIL_LINES: usize = 60;
/// VMM stderr lines echoed after the record.
const STDERR_LINES: usize = 30;

struct Args {
    vmm: String,
    label: String,
    guest_mib: u64,
    timeout: Duration,
    echo_console: bool,
    argv: Vec<OsString>,
}

/// The guest console as read: (ms since spawn, line). Only the last [`TAIL_LINES`]
/// unless everything is to be echoed.
struct Console {
    lines: VecDeque<(f64, String)>,
    keep_all: bool,
}

fn usage(msg: &str) -> ExitCode {
    eprintln!(
        "qx-probe: {msg}\nusage: qx-probe --vmm NAME --label LABEL --guest-mib MIB --timeout-s SECS [--echo-console] -- CMD [ARGS...]"
    );
    ExitCode::from(2)
}

fn parse_args(mut it: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let (mut vmm, mut label, mut guest_mib, mut timeout) = (None, None, None, None);
    let mut echo_console = false;
    loop {
        let Some(flag) = it.next() else {
            return Err("missing `-- CMD`".into());
        };
        if flag == "--" {
            break;
        }
        if flag == "--echo-console" {
            echo_console = true;
            continue;
        }
        let flag = flag.to_string_lossy().into_owned();
        let value = it
            .next()
            .map(|v| v.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--vmm" => vmm = Some(value),
            "--label" => label = Some(value),
            "--guest-mib" => {
                guest_mib = Some(
                    value
                        .parse::<u64>()
                        .map_err(|e| format!("--guest-mib: {e}"))?,
                )
            }
            "--timeout-s" => {
                timeout = Some(Duration::from_secs(
                    value
                        .parse::<u64>()
                        .map_err(|e| format!("--timeout-s: {e}"))?,
                ))
            }
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    let argv: Vec<OsString> = it.collect();
    if argv.is_empty() {
        return Err("no command after --".into());
    }
    Ok(Args {
        vmm: vmm.ok_or("--vmm is required")?,
        label: label.ok_or("--label is required")?,
        guest_mib: guest_mib.ok_or("--guest-mib is required")?,
        timeout: timeout.ok_or("--timeout-s is required")?,
        echo_console,
        argv,
    })
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => return usage(&e),
    };
    let stderr_path = format!("/tmp/{}.stderr", args.label);
    let (record, console) = run(&args, &stderr_path);
    let mut out = io::stdout().lock();
    // The result line first, in one write, so it cannot be split by our own output.
    let _ = out.write_all(format!("{}{}\n", probe::PROBE_MARKER, record.to_json()).as_bytes());
    if let Ok(text) = fs::read(&stderr_path) {
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text.lines().collect();
        let skip = lines.len().saturating_sub(STDERR_LINES);
        for line in &lines[skip..] {
            let _ = writeln!(out, "vmm-stderr| {line}");
        }
    }
    let failure = record.failure();
    if let Some(why) = &failure {
        let _ = writeln!(out, "qx-probe: run failed: {why}; console:");
    }
    if failure.is_some() || args.echo_console {
        if console.lines.len() as u64 != record.console_lines {
            let _ = writeln!(out, "guest| ... (last {} lines)", console.lines.len());
        }
        for (at, line) in &console.lines {
            let _ = writeln!(out, "guest| +{at:.1}ms {line}");
        }
    }
    let _ = out.flush();
    if record.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Runs the command and measures it; also returns the last console lines.
fn run(args: &Args, stderr_path: &str) -> (ProbeRecord, Console) {
    let mut record = ProbeRecord {
        vmm: args.vmm.clone(),
        label: args.label.clone(),
        guest_mib: args.guest_mib,
        ..ProbeRecord::default()
    };
    let mut console = Console {
        lines: VecDeque::new(),
        keep_all: args.echo_console,
    };
    let stderr = match File::create(stderr_path) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::inherit(),
    };
    let start = Instant::now();
    let deadline = start + args.timeout;
    let spawned = Command::new(&args.argv[0])
        .args(&args.argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            record.spawn_error = Some(e.to_string());
            record.total_ms = ms(start.elapsed());
            return (record, console);
        }
    };
    if let Some(stdout) = child.stdout.take() {
        read_console(
            &mut child,
            stdout,
            start,
            deadline,
            &mut record,
            &mut console,
        );
    }
    wait_exit(&mut child, deadline, &mut record);
    record.total_ms = ms(start.elapsed());
    (record, console)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Reads the VMM's stdout until EOF or the deadline, watching for the init line.
fn read_console(
    child: &mut Child,
    mut stdout: ChildStdout,
    start: Instant,
    deadline: Instant,
    record: &mut ProbeRecord,
    console: &mut Console,
) {
    let fd = stdout.as_raw_fd();
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let now = Instant::now();
        if now >= deadline {
            record.timed_out = true;
            let _ = child.kill();
            break;
        }
        let wait_ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid, initialised pollfd that lives across the call, and
        // nfds is 1; `fd` is the open read end of the child's stdout pipe.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms.max(1)) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if ready == 0 {
            continue; // the deadline check above ends the loop
        }
        let n = match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            on_line(child, &line, start, record, console);
        }
    }
    if !pending.is_empty() {
        let line = std::mem::take(&mut pending);
        on_line(child, &line, start, record, console);
    }
}

/// One line of guest console.
fn on_line(
    child: &Child,
    raw: &[u8],
    start: Instant,
    record: &mut ProbeRecord,
    console: &mut Console,
) {
    let at = ms(start.elapsed());
    let line = String::from_utf8_lossy(raw);
    let line = line.trim_end_matches(['\n', '\r']);
    record.console_lines += 1;
    if record.first_output_ms.is_none() {
        record.first_output_ms = Some(at);
    }
    if record.kernel_banner_ms.is_none() && line.contains(KERNEL_BANNER) {
        record.kernel_banner_ms = Some(at);
    }
    if record.start_to_init_ms.is_none() && line.contains(GUEST_INIT_MARKER) {
        record.start_to_init_ms = Some(at);
        record.memory = Some(snapshot(child.id(), record.guest_mib));
        record.guest_uptime_s = probe::guest_uptime(line);
        record.init_line = Some(line.to_string());
    }
    if !console.keep_all && console.lines.len() == TAIL_LINES {
        console.lines.pop_front();
    }
    console.lines.push_back((at, line.to_string()));
}

/// The VMM's memory now. The child has not been waited for, so its /proc entry is its.
fn snapshot(pid: u32, guest_mib: u64) -> MemorySnapshot {
    let status = fs::read_to_string(format!("/proc/{pid}/status"));
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"));
    match (status, smaps) {
        (Ok(status), Ok(smaps)) => MemorySnapshot::from_proc(&status, &smaps, guest_mib),
        (status, smaps) => MemorySnapshot {
            error: Some(format!(
                "reading /proc/{pid}: status {}, smaps {}",
                status.err().map_or("ok".to_string(), |e| e.to_string()),
                smaps.err().map_or("ok".to_string(), |e| e.to_string()),
            )),
            ..MemorySnapshot::default()
        },
    }
}

/// Waits for the VMM to exit, killing it at the deadline.
fn wait_exit(child: &mut Child, deadline: Instant, record: &mut ProbeRecord) {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                record.exit_code = status.code();
                record.exit_signal = status.signal();
                return;
            }
            Ok(None) => {}
            Err(_) => break,
        }
        if Instant::now() >= deadline {
            record.timed_out = true;
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if let Ok(status) = child.wait() {
        record.exit_code = status.code();
        record.exit_signal = status.signal();
    }
}
