//! `qx-io`: block and network I/O workloads and the data-integrity checker, run in the
//! nested guest (on `/dev/vda`, as the TCP server) and in the nested host (TCP client,
//! image checks, CPU accounting of the VMM). Standard library and libc only; built
//! statically by `quantix-bench block|net` and by `vmm/tests/nested_integrity.rs`.
//!
//! ```text
//! qx-io blk --dev PATH --rw read|write|randread|randwrite --bs SIZE --threads N
//!           --seconds S [--max-bytes SIZE] [--direct on|off|auto] [--id ID]
//! qx-io verify --dev PATH --seed N --pass N [--write] [--read] [--threads N]
//!           [--io-blocks N] [--direct on|off|auto] [--id ID]
//! qx-io net-server --listen ADDR:PORT
//! qx-io net-client --connect ADDR:PORT --test send|recv|echo|ping|quit [--amount N]
//!           [--wait-s S] [--cpu-pid PID] [--id ID]
//! qx-io monitor --timeout-s S [--pid-file FILE] -- CMD [ARGS...]
//! ```
//!
//! Each workload prints `QX-IO-BEGIN id=...` before it starts and one line
//! `QX-IO id=... key=value ...` after (see `quantix_bench::iorecord`); `verify` prints
//! `QX-VERIFY ...` per phase and `QX-VERIFY-BAD ...` for the first mismatching blocks,
//! and exits 1 if any block does not match. `monitor` runs a VMM, passes its output
//! through, and after each guest `QX-IO` line prints `QX-CPU id=... cpu_ms=...` with the
//! VMM's CPU time (all threads, `/proc/PID/stat`) since the matching `QX-IO-BEGIN`; the
//! VMM is CMD's process, or with `--pid-file` the one whose pid FILE holds (a VMM that a
//! jailer started).
//! Exit status: 0 success, 1 failure, 2 usage error.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use quantix_bench::blockio::{self, Access, Direct, VerifySpec, Workload};
use quantix_bench::iorecord::{self, Line, BEGIN_MARKER, CPU_MARKER, IO_MARKER, VERIFY_MARKER};
use quantix_bench::netio::{self, NetTest};
use quantix_bench::procstat::CpuTicks;
use quantix_bench::stats;

const USAGE: &str =
    "usage: qx-io blk|verify|net-server|net-client|monitor [OPTIONS] (see the source's header)";

/// Options as `--key value` pairs and bare `--flag`s, up to an optional `--`.
struct Opts {
    values: HashMap<String, String>,
    flags: Vec<String>,
    rest: Vec<String>,
}

/// Flags that take no value.
const FLAGS: &[&str] = &["--write", "--read"];

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            values: HashMap::new(),
            flags: Vec::new(),
            rest: Vec::new(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            if a == "--" {
                o.rest = it.cloned().collect();
                break;
            }
            if FLAGS.contains(&a.as_str()) {
                o.flags.push(a.clone());
            } else if a.starts_with("--") {
                let v = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                o.values.insert(a.clone(), v.clone());
            } else {
                return Err(format!("unexpected argument {a:?}"));
            }
        }
        Ok(o)
    }

    fn str(&self, k: &str) -> Result<&str, String> {
        self.values
            .get(k)
            .map(String::as_str)
            .ok_or_else(|| format!("{k} is required"))
    }

    fn opt(&self, k: &str, default: &str) -> String {
        self.values
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }

    fn num(&self, k: &str, default: Option<u64>) -> Result<u64, String> {
        match self.values.get(k) {
            Some(v) => parse_size(v).ok_or_else(|| format!("{k}: bad number {v:?}")),
            None => default.ok_or_else(|| format!("{k} is required")),
        }
    }

    fn flag(&self, k: &str) -> bool {
        self.flags.iter().any(|f| f == k)
    }

    fn direct(&self) -> Result<Direct, String> {
        match self.opt("--direct", "auto").as_str() {
            "on" => Ok(Direct::On),
            "off" => Ok(Direct::Off),
            "auto" => Ok(Direct::Auto),
            v => Err(format!("--direct: on, off or auto, not {v:?}")),
        }
    }
}

/// `4096`, `4k`, `1m`, `64M`, `1g`.
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last()? {
        (i, 'k' | 'K') => (&s[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&s[..i], 1 << 20),
        (i, 'g' | 'G') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let opts = match Opts::parse(rest) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("qx-io: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let r = match cmd.as_str() {
        "blk" => blk(&opts),
        "verify" => verify(&opts),
        "net-server" => net_server(&opts),
        "net-client" => net_client(&opts),
        "monitor" => monitor(&opts),
        _ => Err(Failure::Usage(format!("unknown command {cmd:?}"))),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("qx-io {cmd}: {e}\n{USAGE}");
            ExitCode::from(2)
        }
        Err(Failure::Failed(e)) => {
            eprintln!("qx-io {cmd}: {e}");
            say(Line::new("QX-IO-FAIL")
                .kv("cmd", cmd)
                .kv("error", &e)
                .finish());
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Usage(String),
    Failed(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Usage(s)
    }
}

fn failed(e: impl std::fmt::Display) -> Failure {
    Failure::Failed(e.to_string())
}

fn blk(o: &Opts) -> Result<(), Failure> {
    let dev = PathBuf::from(o.str("--dev")?);
    let rw = o.str("--rw")?;
    let access = Access::parse(rw).ok_or_else(|| format!("--rw: unknown pattern {rw:?}"))?;
    let bs = o.num("--bs", None)?;
    let w = Workload {
        access,
        block_size: usize::try_from(bs).map_err(|_| "--bs too large".to_string())?,
        threads: o.num("--threads", Some(4))? as usize,
        duration: Duration::from_secs(o.num("--seconds", Some(5))?),
        max_bytes: o.num("--max-bytes", Some(0))?,
        seed: o.num("--seed", Some(1))?,
    };
    let id = o.opt("--id", &format!("{}-{bs}", access.name()));
    say(Line::new(BEGIN_MARKER).kv("id", &id).finish());
    let r = blockio::run_workload(&dev, &w, o.direct()?).map_err(failed)?;
    say(Line::new(IO_MARKER)
        .kv("id", &id)
        .kv("kind", "blk")
        .kv("rw", access.name())
        .kv("bs", bs)
        .kv("threads", w.threads)
        .kv("ops", r.ops)
        .kv("bytes", r.bytes)
        .f("secs", r.secs, 3)
        .f("mbps", r.mbps(), 2)
        .f("iops", r.iops(), 1)
        .kv("direct", u8::from(r.direct))
        .kv("dev_bytes", r.device_bytes)
        .finish());
    Ok(())
}

fn verify(o: &Opts) -> Result<(), Failure> {
    let dev = PathBuf::from(o.str("--dev")?);
    let spec = VerifySpec {
        seed: o.num("--seed", None)?,
        pass: o.num("--pass", None)?,
        threads: o.num("--threads", Some(4))? as usize,
        io_blocks: o.num("--io-blocks", Some(16))? as usize,
    };
    let (write, read) = match (o.flag("--write"), o.flag("--read")) {
        (false, false) => (true, true),
        x => x,
    };
    let id = o.opt("--id", "verify");
    let direct = o.direct()?;
    if write {
        let w = blockio::verify_write(&dev, &spec, direct).map_err(failed)?;
        say(Line::new(VERIFY_MARKER)
            .kv("id", &id)
            .kv("phase", "write")
            .kv("seed", spec.seed)
            .kv("pass", spec.pass)
            .kv("threads", spec.threads)
            .kv("blocks", w.blocks)
            .kv("requests", w.requests)
            .f("secs", w.secs, 3)
            .kv("direct", u8::from(w.direct))
            .finish());
    }
    if read {
        let r = blockio::verify_read(&dev, &spec, direct).map_err(failed)?;
        say(Line::new(VERIFY_MARKER)
            .kv("id", &id)
            .kv("phase", "read")
            .kv("seed", spec.seed)
            .kv("pass", spec.pass)
            .kv("blocks", r.blocks)
            .kv("verified", r.verified)
            .kv("mismatches", r.mismatches)
            .f("secs", r.secs, 3)
            .kv("direct", u8::from(r.direct))
            .finish());
        for (block, m) in &r.listed {
            say(Line::new("QX-VERIFY-BAD")
                .kv("id", &id)
                .kv("block", block)
                .kv("what", m)
                .finish());
        }
        if !r.clean() {
            return Err(failed(format!(
                "{} of {} blocks verified, {} do not match",
                r.verified, r.blocks, r.mismatches
            )));
        }
    }
    Ok(())
}

fn net_server(o: &Opts) -> Result<(), Failure> {
    let addr = o.str("--listen")?;
    let listener = TcpListener::bind(addr).map_err(|e| failed(format!("bind {addr}: {e}")))?;
    say(format!("qx-io net-server: listening on {addr}"));
    netio::serve(listener).map_err(failed)
}

fn net_client(o: &Opts) -> Result<(), Failure> {
    let addr = o.str("--connect")?;
    let name = o.str("--test")?;
    let test = NetTest::parse(name).ok_or_else(|| format!("--test: unknown test {name:?}"))?;
    let amount = o.num("--amount", Some(0))?;
    let wait = Duration::from_secs(o.num("--wait-s", Some(10))?);
    let pid = match o.values.get("--cpu-pid") {
        Some(p) => Some(
            p.parse::<u32>()
                .map_err(|_| format!("--cpu-pid: bad pid {p:?}"))?,
        ),
        None => None,
    };
    let id = o.opt("--id", name);
    let stream = netio::connect(addr, wait).map_err(|e| failed(format!("connect {addr}: {e}")))?;
    let before = pid.and_then(CpuTicks::read);
    let t = Instant::now();
    let r = netio::run_client(stream, test, amount).map_err(failed)?;
    let wall = t.elapsed().as_secs_f64();
    let cpu = match (pid.and_then(CpuTicks::read), before) {
        (Some(a), Some(b)) => Some(a.since(b)),
        _ => None,
    };
    if test == NetTest::Quit {
        return Ok(());
    }
    let mut line = Line::new(IO_MARKER)
        .kv("id", &id)
        .kv("kind", "net")
        .kv("test", name)
        .kv("amount", r.amount)
        .f("secs", r.secs, 4)
        .f("wall_s", wall, 4);
    if matches!(test, NetTest::Send | NetTest::Recv) {
        line = line.f("mbps", r.mbps(), 2);
    } else {
        let s = stats::summarize(&r.rtts_us);
        let p99 = stats::percentile(&r.rtts_us, 99.0);
        if let (Some(s), Some(p99)) = (s, p99) {
            line = line
                .f("rtt_median_us", s.median, 1)
                .f("rtt_p99_us", p99, 1)
                .f("rtt_min_us", s.min, 1);
        }
    }
    if let Some(c) = cpu {
        line = line
            .f("cpu_ms", c.total_ms(), 1)
            .f("guest_ms", c.guest_ms(), 1);
    }
    say(line.finish());
    Ok(())
}

fn monitor(o: &Opts) -> Result<(), Failure> {
    let timeout = Duration::from_secs(o.num("--timeout-s", Some(600))?);
    let Some((prog, args)) = o.rest.split_first() else {
        return Err(Failure::Usage("missing `-- CMD`".into()));
    };
    let mut child = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("spawning {prog}: {e}")))?;
    let child_pid = child.id();
    let started = Instant::now();
    say(Line::new("QX-VMM-START").kv("pid", child_pid).finish());
    // The process whose CPU is sampled: the child, or (`--pid-file`, a VMM that a jailer
    // started and waits for) the pid the file names once it exists.
    let pid_file = o.values.get("--pid-file").cloned();
    let mut measured: Option<u32> = pid_file.is_none().then_some(child_pid);
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| failed("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut begun: HashMap<String, (CpuTicks, Instant)> = HashMap::new();
    let deadline = started + timeout;
    let mut timed_out = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                if measured.is_none() {
                    measured = pid_file
                        .as_deref()
                        .and_then(|f| std::fs::read_to_string(f).ok())
                        .and_then(|s| s.trim().parse().ok());
                }
                let now = measured.and_then(CpuTicks::read);
                say(line.clone());
                if let Some(r) = iorecord::parse_line(&line, BEGIN_MARKER) {
                    if let (Some(id), Some(t)) = (r.get("id"), now) {
                        begun.insert(id.clone(), (t, Instant::now()));
                    }
                } else if let Some(r) = iorecord::parse_line(&line, IO_MARKER) {
                    let found = r.get("id").and_then(|id| begun.remove(id).map(|b| (id, b)));
                    if let (Some((id, (t0, w0))), Some(t1)) = (found, now) {
                        let d = t1.since(t0);
                        say(Line::new(CPU_MARKER)
                            .kv("id", id)
                            .f("cpu_ms", d.total_ms(), 1)
                            .f("guest_ms", d.guest_ms(), 1)
                            .f("wall_ms", w0.elapsed().as_secs_f64() * 1000.0, 1)
                            .finish());
                    }
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let status = child
        .wait()
        .map_err(|e| failed(format!("waiting for {prog}: {e}")))?;
    say(Line::new("QX-VMM-EXIT")
        .kv(
            "status",
            status.code().map_or("none".into(), |c| c.to_string()),
        )
        .kv("timed_out", u8::from(timed_out))
        .f("wall_ms", started.elapsed().as_secs_f64() * 1000.0, 0)
        .finish());
    if timed_out || !status.success() {
        return Err(failed(format!(
            "{prog} {}",
            if timed_out {
                "was killed after the time limit".to_string()
            } else {
                format!("exited with {status}")
            }
        )));
    }
    Ok(())
}
