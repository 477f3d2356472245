//! `snapshot`: full and diff snapshots and restore-to-running, quantix-vmm side by side
//! with Firecracker (its snapshot API) and QEMU (migration to a file), for guests of
//! several sizes: on this host's /dev/kvm ([`run`]), or in one nested host of the KVM
//! sandbox ([`run_in_sandbox`], which runs this same benchmark there).
//!
//! Every VMM runs the same hand-made guest ([`guest::fill_and_tick`]): it writes every
//! page of its RAM, says so on COM1, then writes a tick byte to COM1 every 200 µs and no
//! memory. Per VMM and size, one source VM is started and, each iteration:
//!
//! 1. a full snapshot is taken while it runs (the VMM pauses it, writes, resumes it);
//! 2. one second later a diff (the pages written since; Firecracker's `Diff`, QEMU has
//!    none);
//! 3. the full snapshot is restored in a new process, the source paused meanwhile (a
//!    running source would take its share of the CPU from the restore: half of a nested
//!    host's one CPU): spawn to the restored guest's first tick byte on the new
//!    process's stdout is restore-to-running.
//!
//! Sizes are the blocks the snapshot's files take on disk (`st_blocks`), so sparse files
//! count what they hold.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use quantix_sandbox::{build, paths, Job, Payload, Sandbox};
use quantix_vmm_api::control::{parse_reply, AfterSnapshot, Request, SnapshotReply};
use quantix_vmm_api::{MemorySize, SerialMode, VmConfig};
use serde::{Deserialize, Serialize};

use crate::boot::FIRECRACKER_PATH;
use crate::error::BenchError;
use crate::first_insn::build_vmm;
use crate::guest;
use crate::iobench::NestedHost;
use crate::report::{self, ratio, HostFacts, Target};
use crate::stats::{self, Summary};

/// Target: a diff snapshot of an idle guest, at most this share of the full one.
pub const DIFF_SHARE_TARGET: f64 = 0.05;
/// The guest's tick period on /dev/kvm, µs.
pub const TICK_US: u64 = 200;
/// The guest's tick period in the nested host, µs: every tick is a port write that exits
/// to the VMM, which costs tens of µs under TCG, so 200 µs ticks would take most of the
/// nested host's one CPU from the snapshot being measured.
pub const SANDBOX_TICK_US: u64 = 2000;
/// quantix-bench itself in the nested host (it runs the benchmark there).
const BENCH_PATH: &str = "/payload/quantix-bench";
/// quantix-vmm in the nested host.
const SANDBOX_VMM_PATH: &str = "/payload/quantix-vmm";
/// Where the nested run writes its JSON.
const SANDBOX_JSON: &str = "/tmp/qx-snapshot.json";
/// Lines around the JSON in the nested job's output.
const JSON_BEGIN: &str = "QX-SNAPSHOT-JSON-BEGIN";
const JSON_END: &str = "QX-SNAPSHOT-JSON-END";

/// Settings of one `snapshot` benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotOptions {
    /// Iterations per VMM and size.
    pub iterations: u32,
    /// Guest sizes, MiB.
    pub sizes: Vec<u32>,
    /// The quantix-vmm binary; `None`: build `target/release/quantix-vmm`.
    pub vmm_bin: Option<PathBuf>,
    /// The QEMU binary; `None`: no QEMU column.
    pub qemu: Option<String>,
    /// A Firecracker binary; `None`: no Firecracker column.
    pub firecracker: Option<PathBuf>,
    /// Limit of each step (a snapshot, a restore's first byte).
    pub timeout: Duration,
    /// The guest's tick period, µs.
    pub tick_us: u64,
}

/// The VMMs compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    /// quantix-vmm: its control socket's `snapshot`, `--restore DIR --resume`.
    Quantix,
    /// Firecracker: `PUT /snapshot/create` (Full, Diff), `PUT /snapshot/load`.
    Firecracker,
    /// QEMU microvm: `migrate` to `exec:cat > FILE`, `-incoming exec:cat FILE`.
    Qemu,
}

impl Vmm {
    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Quantix => "quantix",
            Vmm::Firecracker => "firecracker",
            Vmm::Qemu => "qemu",
        }
    }
}

/// One iteration's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// 1-based.
    pub iteration: u32,
    /// Request to done, full snapshot, ms.
    pub full_ms: Option<f64>,
    /// The guest paused for it, ms (as the VMM reports it: quantix-vmm's `paused_ms`,
    /// QEMU's `downtime`; Firecracker's pause-to-resume, which the benchmark times).
    pub full_paused_ms: Option<f64>,
    /// Bytes on disk.
    pub full_bytes: Option<u64>,
    /// The same for the diff.
    pub diff_ms: Option<f64>,
    /// Paused for the diff, ms.
    pub diff_paused_ms: Option<f64>,
    /// Bytes on disk.
    pub diff_bytes: Option<u64>,
    /// Restore-to-running of the full snapshot: spawn to the first tick byte, ms.
    pub restore_ms: Option<f64>,
    /// Why part of this iteration failed.
    pub failure: Option<String>,
}

/// One VMM at one size.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    /// The VMM.
    pub vmm: Vmm,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Every iteration.
    pub samples: Vec<Sample>,
    /// Why the whole row failed (the source VM did not start), if it did.
    pub failure: Option<String>,
    /// Full snapshot, ms.
    pub full_ms: Option<Summary>,
    /// Paused for it, ms.
    pub full_paused_ms: Option<Summary>,
    /// Its size, MiB.
    pub full_mib: Option<Summary>,
    /// Diff snapshot, ms.
    pub diff_ms: Option<Summary>,
    /// Its size, MiB.
    pub diff_mib: Option<Summary>,
    /// Restore-to-running, ms.
    pub restore_ms: Option<Summary>,
}

/// The benchmark's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotResults {
    /// When.
    pub date: String,
    /// Where: this host, or the nested host the benchmark ran in.
    pub host: HostFacts,
    /// The nested host, when the benchmark ran in the sandbox (filled in by the outer
    /// run, which also sets `host.revision`: the nested host has no git).
    #[serde(default, skip_deserializing)]
    pub nested_host: Option<NestedHost>,
    /// Settings.
    pub options: SnapshotOptions,
    /// Per VMM and size.
    pub rows: Vec<Row>,
    /// The issue's targets against the figures.
    pub targets: Vec<Target>,
}

/// What a VMM's serial port (its stdout) said so far.
#[derive(Debug, Default)]
struct ConsoleState {
    first_byte: Option<Instant>,
    filled: bool,
    ticks: u64,
    closed: bool,
}

/// A reader thread drains a VMM's stdout into a [`ConsoleState`].
#[derive(Clone, Default)]
struct Console(Arc<(Mutex<ConsoleState>, Condvar)>);

impl Console {
    fn attach(mut out: impl Read + Send + 'static) -> Console {
        let console = Console::default();
        let c = console.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = out.read(&mut buf).unwrap_or(0);
                let (lock, cond) = &*c.0;
                let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
                if n == 0 {
                    s.closed = true;
                    cond.notify_all();
                    return;
                }
                if s.first_byte.is_none() {
                    s.first_byte = Some(Instant::now());
                }
                for &b in &buf[..n] {
                    match b {
                        guest::FILLED_BYTE => s.filled = true,
                        guest::TICK_BYTE => s.ticks += 1,
                        _ => {}
                    }
                }
                cond.notify_all();
            }
        });
        console
    }

    /// Waits until `done` holds, or the output closes, or `timeout`.
    fn wait(&self, timeout: Duration, done: impl Fn(&ConsoleState) -> bool) -> Result<(), String> {
        let (lock, cond) = &*self.0;
        let deadline = Instant::now() + timeout;
        let mut s = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if done(&s) {
                return Ok(());
            }
            if s.closed {
                return Err("the VMM's output closed (it exited)".into());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("nothing after {} s", timeout.as_secs()));
            }
            s = cond
                .wait_timeout(s, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn first_byte(&self) -> Option<Instant> {
        self.0
             .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .first_byte
    }

    fn ticks(&self) -> u64 {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).ticks
    }
}

/// A VMM process, killed when dropped.
struct Process {
    child: Child,
    console: Console,
    spawned: Instant,
    stderr: PathBuf,
}

impl Process {
    fn spawn(argv: &[String], stderr: &Path) -> Result<Process, String> {
        let err = File::create(stderr).map_err(|e| format!("{}: {e}", stderr.display()))?;
        let spawned = Instant::now();
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", argv[0]))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| "no stdout pipe".to_string())?;
        Ok(Process {
            child,
            console: Console::attach(out),
            spawned,
            stderr: stderr.to_path_buf(),
        })
    }

    /// `why`, with the end of the process's stderr.
    fn failed(&self, why: impl std::fmt::Display) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let tail = crate::boot::tail(&text, 3);
        if tail.is_empty() {
            why.to_string()
        } else {
            format!("{why}; stderr: {}", tail.replace('\n', " | "))
        }
    }

    /// Spawn to the first byte, ms, waiting up to `timeout` for it.
    fn first_byte_ms(&self, timeout: Duration) -> Result<f64, String> {
        self.console
            .wait(timeout, |s| s.first_byte.is_some())
            .map_err(|e| self.failed(e))?;
        let at = self.console.first_byte().ok_or("no byte")?;
        Ok(ms(at.duration_since(self.spawned)))
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bytes the files directly in `dir` (or the file `dir`) take on disk.
pub fn disk_bytes(path: &Path) -> Result<u64, String> {
    let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_dir() {
        return Ok(meta.blocks() * 512);
    }
    let mut sum = 0;
    for e in fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
        let e = e.map_err(|e| format!("{}: {e}", path.display()))?;
        let m = e.metadata().map_err(|e| format!("{}: {e}", e))?;
        if m.is_file() {
            sum += m.blocks() * 512;
        }
    }
    Ok(sum)
}

/// The TSC's frequency in kHz, from the CPU's nominal MHz in /proc/cpuinfo (the guest
/// only needs an order of magnitude: it ticks every [`SnapshotOptions::tick_us`]).
fn tsc_khz() -> u64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("cpu MHz"))
                .and_then(|l| l.split_once(':'))
                .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        })
        .map_or(2_000_000, |mhz| (mhz * 1000.0) as u64)
}

/// One step's result: time, paused time, bytes.
struct Taken {
    ms: f64,
    paused_ms: f64,
    bytes: u64,
}

/// A running source VM of one VMM, and how to snapshot and restore it.
struct Source {
    vmm: Vmm,
    process: Process,
    dir: PathBuf,
    socket: PathBuf,
    /// quantix-vmm or firecracker binary, or the QEMU argv without `-qmp`.
    argv: Vec<String>,
    /// quantix-vmm's configuration (the host side of its restores too).
    config: Option<VmConfig>,
    qmp: Option<Qmp>,
    timeout: Duration,
}

impl Source {
    fn start(
        vmm: Vmm,
        bin: &str,
        dir: &Path,
        memory_mib: u32,
        tick_us: u64,
        timeout: Duration,
    ) -> Result<Source, String> {
        let period = (tsc_khz() * tick_us / 1000).min(u64::from(u32::MAX)) as u32;
        let code = guest::fill_and_tick(memory_mib, period);
        let s = |p: &Path| p.display().to_string();
        let socket = dir.join(format!("{}.sock", vmm.name()));
        let _ = fs::remove_file(&socket);
        let mem = memory_mib.to_string();
        let mut config = None;
        let (argv, run): (Vec<String>, Vec<String>) = match vmm {
            Vmm::Quantix => {
                let elf = dir.join("guest.elf");
                fs::write(&elf, guest::elf64_code(&code)).map_err(|e| e.to_string())?;
                let mut vm = VmConfig::with_kernel(&elf);
                vm.memory = MemorySize(u64::from(memory_mib));
                vm.serial = SerialMode::Stdout;
                vm.api_socket = Some(socket.clone());
                let file = dir.join("quantix.json");
                write_config(&file, &vm)?;
                config = Some(vm);
                let run = [bin, "--config", &s(&file), "--log-level", "warn"]
                    .map(String::from)
                    .to_vec();
                (vec![bin.to_string()], run)
            }
            Vmm::Firecracker => {
                let elf = dir.join("guest.elf");
                fs::write(&elf, guest::elf64_code(&code)).map_err(|e| e.to_string())?;
                let config = serde_json::json!({
                    "boot-source": {"kernel_image_path": elf, "boot_args": "console=ttyS0"},
                    "drives": [],
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib,
                        "smt": false, "track_dirty_pages": true},
                });
                let cfg = dir.join("firecracker.json");
                fs::write(&cfg, config.to_string()).map_err(|e| e.to_string())?;
                let log = dir.join("firecracker.log");
                File::create(&log).map_err(|e| e.to_string())?;
                let run = [
                    bin,
                    "--api-sock",
                    &s(&socket),
                    "--config-file",
                    &s(&cfg),
                    "--log-path",
                    &s(&log),
                    "--level",
                    "Warning",
                ]
                .map(String::from)
                .to_vec();
                (vec![bin.to_string()], run)
            }
            Vmm::Qemu => {
                let elf = dir.join("guest-pvh.elf");
                fs::write(&elf, guest::elf64_pvh_code(&code)).map_err(|e| e.to_string())?;
                let argv: Vec<String> = [
                    bin,
                    "-M",
                    "microvm",
                    "-enable-kvm",
                    "-m",
                    &mem,
                    "-nodefaults",
                    "-no-user-config",
                    "-nographic",
                    "-serial",
                    "stdio",
                    "-kernel",
                    &s(&elf),
                ]
                .map(String::from)
                .to_vec();
                let mut run = argv.clone();
                run.extend([
                    "-qmp".into(),
                    format!("unix:{},server=on,wait=off", s(&socket)),
                ]);
                (argv, run)
            }
        };
        let process = Process::spawn(&run, &dir.join(format!("{}-source.err", vmm.name())))?;
        // Filling 1 GiB is about a million emulated instructions on PVM.
        let fill_limit = timeout + Duration::from_millis(u64::from(memory_mib) * 20);
        process
            .console
            .wait(fill_limit, |s| s.filled && s.ticks > 0)
            .map_err(|e| process.failed(format!("the guest did not fill its memory: {e}")))?;
        let qmp = match vmm {
            Vmm::Qemu => Some(Qmp::connect(&socket, timeout).map_err(|e| process.failed(e))?),
            _ => None,
        };
        Ok(Source {
            vmm,
            process,
            dir: dir.to_path_buf(),
            socket,
            argv,
            config,
            qmp,
            timeout,
        })
    }

    /// Takes snapshot `name` (full, or a diff on the previous one).
    fn take(&mut self, name: &str, diff: bool) -> Result<Option<Taken>, String> {
        let out = self.dir.join(name);
        let _ = fs::remove_dir_all(&out);
        let taken = match self.vmm {
            Vmm::Quantix => {
                let request = Request::Snapshot {
                    dir: out.display().to_string(),
                    after: AfterSnapshot::Keep,
                    diff,
                };
                let t = Instant::now();
                let reply: SnapshotReply = control_call(&self.socket, &request, self.timeout)?;
                Taken {
                    ms: ms(t.elapsed()),
                    paused_ms: reply.paused_ms as f64,
                    bytes: disk_bytes(&out)?,
                }
            }
            Vmm::Firecracker => {
                fs::create_dir(&out).map_err(|e| e.to_string())?;
                let kind = if diff { "Diff" } else { "Full" };
                let body = serde_json::json!({
                    "snapshot_type": kind,
                    "snapshot_path": out.join("vmstate"),
                    "mem_file_path": out.join("memory"),
                });
                let t = Instant::now();
                http(&self.socket, "PATCH", "/vm", r#"{"state":"Paused"}"#)?;
                http(&self.socket, "PUT", "/snapshot/create", &body.to_string())?;
                http(&self.socket, "PATCH", "/vm", r#"{"state":"Resumed"}"#)?;
                let took = ms(t.elapsed());
                Taken {
                    ms: took,
                    paused_ms: took,
                    bytes: disk_bytes(&out)?,
                }
            }
            Vmm::Qemu => {
                if diff {
                    return Ok(None);
                }
                fs::create_dir(&out).map_err(|e| e.to_string())?;
                let file = out.join("migration");
                let qmp = self.qmp.as_mut().ok_or("no QMP connection")?;
                let t = Instant::now();
                qmp.execute(
                    "migrate",
                    serde_json::json!({"uri": format!("exec:cat > {}", file.display())}),
                )?;
                let downtime = loop {
                    let r = qmp.execute("query-migrate", serde_json::json!({}))?;
                    match r["status"].as_str() {
                        Some("completed") => break r["downtime"].as_f64(),
                        Some("failed") | Some("cancelled") => {
                            return Err(format!("QEMU's migration to a file failed: {r}"))
                        }
                        _ if t.elapsed() > self.timeout => {
                            return Err(format!("QEMU's migration did not end: {r}"))
                        }
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                };
                let took = ms(t.elapsed());
                // The source stops at the end of a migration; the guest runs on. QEMU reports
                // `completed` before its migration thread has finished: `cont` is refused
                // ("Migration is not finalized yet") for a moment, and a migration started
                // meanwhile fails ("duplicate yank instance").
                loop {
                    match qmp.execute("cont", serde_json::json!({})) {
                        Ok(_) => break,
                        Err(e) if e.contains("not finalized") && t.elapsed() < self.timeout => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(e) => return Err(e),
                    }
                }
                Taken {
                    ms: took,
                    paused_ms: downtime.unwrap_or(f64::NAN),
                    bytes: disk_bytes(&out)?,
                }
            }
        };
        // The guest runs on: a tick after the snapshot.
        let ticks = self.process.console.ticks();
        self.process
            .console
            .wait(self.timeout, |s| s.ticks > ticks)
            .map_err(|e| {
                self.process
                    .failed(format!("the guest did not run on: {e}"))
            })?;
        Ok(Some(taken))
    }

    /// Pauses (`true`) or resumes the source, through its own API.
    fn hold(&mut self, pause: bool) -> Result<(), String> {
        match self.vmm {
            Vmm::Quantix => {
                let request = if pause {
                    Request::Pause {}
                } else {
                    Request::Resume {}
                };
                let _: serde_json::Value = control_call(&self.socket, &request, self.timeout)?;
            }
            Vmm::Firecracker => {
                let state = if pause { "Paused" } else { "Resumed" };
                http(
                    &self.socket,
                    "PATCH",
                    "/vm",
                    &format!(r#"{{"state":"{state}"}}"#),
                )?;
            }
            Vmm::Qemu => {
                let qmp = self.qmp.as_mut().ok_or("no QMP connection")?;
                qmp.execute(if pause { "stop" } else { "cont" }, serde_json::json!({}))?;
            }
        }
        Ok(())
    }

    /// Restores snapshot `name` in a new process: spawn to its first tick, ms.
    fn restore(&self, name: &str) -> Result<f64, String> {
        let snap = self.dir.join(name);
        let s = |p: &Path| p.display().to_string();
        let err = self.dir.join(format!("{}-restore.err", self.vmm.name()));
        match self.vmm {
            Vmm::Quantix => {
                // The host side of the restored VM: the source's, without a control socket.
                let mut config = self.config.clone().ok_or("no quantix-vmm configuration")?;
                config.api_socket = None;
                let rebind = self.dir.join("rebind.json");
                write_config(&rebind, &config)?;
                let argv = [
                    &self.argv[0],
                    "--restore",
                    &s(&snap),
                    "--config",
                    &s(&rebind),
                    "--resume",
                    "--log-level",
                    "warn",
                ]
                .map(String::from);
                let p = Process::spawn(&argv, &err)?;
                p.first_byte_ms(self.timeout)
            }
            Vmm::Firecracker => {
                let socket = self.dir.join("firecracker-restore.sock");
                let _ = fs::remove_file(&socket);
                let log = self.dir.join("firecracker-restore.log");
                File::create(&log).map_err(|e| e.to_string())?;
                let argv = [
                    &self.argv[0],
                    "--api-sock",
                    &s(&socket),
                    "--log-path",
                    &s(&log),
                    "--level",
                    "Warning",
                ]
                .map(String::from);
                let p = Process::spawn(&argv, &err)?;
                let deadline = Instant::now() + self.timeout;
                while std::os::unix::net::UnixStream::connect(&socket).is_err() {
                    if Instant::now() > deadline {
                        return Err(p.failed("Firecracker's API socket did not come up"));
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                let body = serde_json::json!({
                    "snapshot_path": snap.join("vmstate"),
                    "mem_backend": {"backend_path": snap.join("memory"), "backend_type": "File"},
                    "resume_vm": true,
                });
                http(&socket, "PUT", "/snapshot/load", &body.to_string())
                    .map_err(|e| p.failed(e))?;
                p.first_byte_ms(self.timeout)
            }
            Vmm::Qemu => {
                let mut argv = self.argv.clone();
                argv.extend([
                    "-incoming".into(),
                    format!("exec:cat {}", s(&snap.join("migration"))),
                ]);
                let p = Process::spawn(&argv, &err)?;
                p.first_byte_ms(self.timeout)
            }
        }
    }

    /// One iteration: full, diff, restore of the full one; the files removed after.
    fn iteration(&mut self, i: u32) -> Sample {
        let mut sample = Sample {
            iteration: i,
            ..Sample::default()
        };
        let (full, diff) = (format!("full-{i}"), format!("diff-{i}"));
        fn fail(sample: &mut Sample, what: &str, e: String) {
            sample.failure.get_or_insert_with(|| format!("{what}: {e}"));
        }
        match self.take(&full, false) {
            Ok(Some(t)) => {
                sample.full_ms = Some(t.ms);
                sample.full_paused_ms = Some(t.paused_ms);
                sample.full_bytes = Some(t.bytes);
            }
            Ok(None) => {}
            Err(e) => fail(&mut sample, "full snapshot", e),
        }
        if sample.failure.is_none() {
            std::thread::sleep(Duration::from_secs(1));
            match self.take(&diff, true) {
                Ok(Some(t)) => {
                    sample.diff_ms = Some(t.ms);
                    sample.diff_paused_ms = Some(t.paused_ms);
                    sample.diff_bytes = Some(t.bytes);
                }
                Ok(None) => {}
                Err(e) => fail(&mut sample, "diff snapshot", e),
            }
            // The source is paused meanwhile: a running source takes its share of the
            // host's CPUs from the restore measured (half of the nested host's one CPU).
            match self.hold(true).and_then(|()| self.restore(&full)) {
                Ok(t) => sample.restore_ms = Some(t),
                Err(e) => fail(&mut sample, "restore", e),
            }
            if let Err(e) = self.hold(false) {
                fail(&mut sample, "resuming the source", e);
            }
        }
        for d in [&full, &diff] {
            let _ = fs::remove_dir_all(self.dir.join(d));
        }
        sample
    }
}

/// Writes a quantix-vmm configuration file.
fn write_config(path: &Path, config: &VmConfig) -> Result<(), String> {
    let json = serde_json::to_string(config).map_err(|e| e.to_string())?;
    fs::write(path, json).map_err(|e| format!("{}: {e}", path.display()))
}

/// One call on quantix-vmm's control socket.
fn control_call<T: serde::de::DeserializeOwned>(
    socket: &Path,
    request: &Request,
    timeout: Duration,
) -> Result<T, String> {
    let stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    w.write_all(request.to_line().as_bytes())
        .map_err(|e| format!("sending {}: {e}", request.op()))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(|e| format!("reading the {} reply: {e}", request.op()))?;
    parse_reply(request, &line).map_err(|e| e.to_string())
}

/// One HTTP/1.1 request on a Unix socket (Firecracker's API); a 2xx status or an error
/// with the body.
fn http(socket: &Path, method: &str, path: &str, body: &str) -> Result<String, String> {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Bytes;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(conn);
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("Host", "localhost")
            .header("Content-Type", "application/json")
            .header("Accept", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status.is_success() {
            Ok(text)
        } else {
            Err(format!("{method} {path}: {status}: {}", text.trim()))
        }
    })
}

/// A QMP connection (QEMU's JSON control protocol, one object per line).
struct Qmp {
    reader: BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(socket: &Path, timeout: Duration) -> Result<Qmp, String> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("QMP socket {}: {e}", socket.display()))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = qmp.read()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("not a QMP greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        // Migration to a file as fast as the disk takes it (the default is 128 MiB/s).
        qmp.execute(
            "migrate-set-parameters",
            serde_json::json!({"max-bandwidth": 64u64 << 30}),
        )?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        if self
            .reader
            .read_line(&mut line)
            .map_err(|e| format!("QMP: {e}"))?
            == 0
        {
            return Err("QMP: QEMU closed the connection".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("QMP: {e}: {line}"))
    }

    /// Runs `command`; its `return`, or its `error` as an error (events are skipped).
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        let request = serde_json::json!({"execute": command, "arguments": arguments});
        writeln!(self.writer, "{request}").map_err(|e| format!("QMP {command}: {e}"))?;
        loop {
            let reply = self.read()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(format!("QMP {command}: {e}"));
            }
        }
    }
}

/// Runs the benchmark.
pub fn run(o: &SnapshotOptions) -> Result<SnapshotResults, BenchError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| BenchError::Unavailable(format!("cannot open /dev/kvm: {e}")))?;
    if let Some(fc) = &o.firecracker {
        if !fc.is_file() {
            return Err(BenchError::MissingPeer {
                vmm: "firecracker".into(),
                path: fc.clone(),
            });
        }
    }
    let vmm_bin = match &o.vmm_bin {
        Some(p) => p.clone(),
        None => build_vmm()?,
    };
    let dir = std::env::temp_dir().join(format!("qx-bench-snapshot-{}", std::process::id()));
    fs::create_dir_all(&dir)
        .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
    let mut vmms = vec![(Vmm::Quantix, vmm_bin.display().to_string())];
    if let Some(fc) = &o.firecracker {
        vmms.push((Vmm::Firecracker, fc.display().to_string()));
    }
    if let Some(q) = &o.qemu {
        vmms.push((Vmm::Qemu, q.clone()));
    }
    let mut rows = Vec::new();
    for &size in &o.sizes {
        for (vmm, bin) in &vmms {
            let sub = dir.join(format!("{}-{size}", vmm.name()));
            let _ = fs::create_dir_all(&sub);
            eprintln!("quantix-bench: snapshot: {} with {size} MiB", vmm.name());
            let row = match Source::start(*vmm, bin, &sub, size, o.tick_us, o.timeout) {
                Ok(mut source) => {
                    let samples: Vec<Sample> = (1..=o.iterations)
                        .map(|i| {
                            let s = source.iteration(i);
                            if let Some(f) = &s.failure {
                                eprintln!("quantix-bench:   iteration {i}: {f}");
                            }
                            s
                        })
                        .collect();
                    summarize(*vmm, size, samples, None)
                }
                Err(e) => {
                    eprintln!("quantix-bench:   {e}");
                    summarize(*vmm, size, Vec::new(), Some(e))
                }
            };
            let _ = fs::remove_dir_all(&sub);
            rows.push(row);
        }
    }
    let _ = fs::remove_dir_all(&dir);
    let targets = targets(&rows);
    Ok(SnapshotResults {
        date: report::now_utc(),
        host: HostFacts::read(),
        nested_host: None,
        options: o.clone(),
        rows,
        targets,
    })
}

/// The nested host's memory for guests of up to `largest_mib`: the source, its full
/// snapshot in the nested host's RAM (its /tmp), and QEMU's restored copy next to them.
pub fn sandbox_memory_mib(largest_mib: u32) -> u32 {
    (1536 + 4 * largest_mib).max(3072)
}

/// The nested job's command: this benchmark, run in the nested host against its
/// /dev/kvm with the binaries of the payload, writing its JSON between two marker lines.
pub fn sandbox_script(o: &SnapshotOptions) -> String {
    let sizes: Vec<String> = o.sizes.iter().map(u32::to_string).collect();
    let mut argv = vec![
        BENCH_PATH.to_string(),
        "snapshot".into(),
        "--vmm-bin".into(),
        SANDBOX_VMM_PATH.into(),
        "--iterations".into(),
        o.iterations.to_string(),
        "--sizes".into(),
        sizes.join(","),
        "--timeout".into(),
        o.timeout.as_secs().to_string(),
        "--tick-us".into(),
        o.tick_us.to_string(),
        "--json".into(),
        SANDBOX_JSON.into(),
    ];
    if o.firecracker.is_some() {
        argv.extend(["--firecracker".into(), FIRECRACKER_PATH.into()]);
    }
    match o.qemu {
        Some(_) => argv.extend(["--qemu".into(), paths::QEMU.into()]),
        None => argv.push("--no-qemu".into()),
    }
    format!(
        "{} >&2; rc=$?; echo {JSON_BEGIN}; cat {SANDBOX_JSON}; echo; echo {JSON_END}; exit $rc",
        argv.join(" ")
    )
}

/// The results between the marker lines of the nested job's output.
pub fn parse_sandbox_output(output: &str) -> Result<SnapshotResults, String> {
    let mut lines = output.lines();
    if !lines.any(|l| l.trim_end() == JSON_BEGIN) {
        return Err("the nested run wrote no results".into());
    }
    let json: Vec<&str> = lines.take_while(|l| l.trim_end() != JSON_END).collect();
    serde_json::from_str(&json.join("\n"))
        .map_err(|e| format!("the nested run's results do not parse: {e}"))
}

/// Runs the benchmark in one nested host of the sandbox: builds static quantix-vmm and
/// quantix-bench, puts them (and Firecracker with its libraries, and QEMU) in the
/// payload, and runs [`run`] there as one job. The nested host's /dev/kvm is the real
/// KVM (kvm-amd) under TCG: absolute times are many times slower than on hardware,
/// ratios between VMMs of one run are what counts.
pub fn run_in_sandbox(o: &SnapshotOptions) -> Result<SnapshotResults, BenchError> {
    let mut sandbox = Sandbox::from_env()?;
    let largest = o.sizes.iter().copied().max().unwrap_or(256);
    sandbox.config_mut().memory_mib = sandbox_memory_mib(largest);
    let mut payload = Payload::new();
    let vmm = match &o.vmm_bin {
        Some(p) => p.clone(),
        None => {
            eprintln!(
                "quantix-bench: building static quantix-vmm and quantix-bench for the nested host"
            );
            build::static_binary("quantix-vmm", "quantix-vmm")?
        }
    };
    payload.add_file(&vmm, SANDBOX_VMM_PATH)?;
    payload.add_file(
        &build::static_binary("quantix-bench", "quantix-bench")?,
        BENCH_PATH,
    )?;
    if let Some(fc) = &o.firecracker {
        if !fc.is_file() {
            return Err(BenchError::MissingPeer {
                vmm: "firecracker".into(),
                path: fc.clone(),
            });
        }
        payload.add_host_binary(fc, FIRECRACKER_PATH)?;
    }
    if o.qemu.is_some() {
        payload.add_qemu(sandbox.assets())?;
    }
    // Every step may take its limit: the fills, the snapshots and the restores.
    let vmms = 1 + u64::from(o.firecracker.is_some()) + u64::from(o.qemu.is_some());
    let steps = vmms * o.sizes.len() as u64 * (2 + 3 * u64::from(o.iterations));
    let limit = Duration::from_secs((o.timeout.as_secs() * steps).min(6 * 3600));
    let job = Job::shell("snapshot", sandbox_script(o)).timeout(limit);
    eprintln!(
        "quantix-bench: snapshot in one nested host ({} MiB; TCG: this takes many minutes)",
        sandbox.config().memory_mib
    );
    let report = sandbox.run(&payload, &[job])?;
    let Some(result) = report.job("snapshot") else {
        return Err(BenchError::Unavailable(
            "the sandbox returned no result for the snapshot job".into(),
        ));
    };
    let mut results = parse_sandbox_output(&result.output).map_err(|e| {
        let tail: Vec<&str> = result.output.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        BenchError::Unavailable(format!(
            "{e} (status {:?}{}); its last lines:\n{}",
            result.status,
            if result.timed_out { ", timed out" } else { "" },
            tail.join("\n")
        ))
    })?;
    results.host.revision = HostFacts::read().revision;
    results.nested_host = Some(NestedHost::of(&sandbox, &report));
    results.options.vmm_bin = o.vmm_bin.clone();
    results.options.firecracker = o.firecracker.clone();
    Ok(results)
}

/// A row's statistics, over the iterations where each figure was measured.
pub fn summarize(vmm: Vmm, memory_mib: u32, samples: Vec<Sample>, failure: Option<String>) -> Row {
    let pick = |f: &dyn Fn(&Sample) -> Option<f64>| -> Option<Summary> {
        let v: Vec<f64> = samples.iter().filter_map(f).collect();
        stats::summarize(&v)
    };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    Row {
        vmm,
        memory_mib,
        full_ms: pick(&|s| s.full_ms),
        full_paused_ms: pick(&|s| s.full_paused_ms),
        full_mib: pick(&|s| s.full_bytes.map(mib)),
        diff_ms: pick(&|s| s.diff_ms),
        diff_mib: pick(&|s| s.diff_bytes.map(mib)),
        restore_ms: pick(&|s| s.restore_ms),
        samples,
        failure,
    }
}

/// The issue's targets: quantix-vmm's diff of the idle guest under 5 % of its full
/// snapshot; its restore-to-running at most the best peer's, per size.
pub fn targets(rows: &[Row]) -> Vec<Target> {
    let median = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
    let mut out = Vec::new();
    let mut sizes: Vec<u32> = rows.iter().map(|r| r.memory_mib).collect();
    sizes.dedup();
    for size in sizes {
        let at: Vec<&Row> = rows.iter().filter(|r| r.memory_mib == size).collect();
        let Some(q) = at.iter().find(|r| r.vmm == Vmm::Quantix) else {
            continue;
        };
        let share = ratio(median(&q.diff_mib), median(&q.full_mib));
        out.push(Target {
            target: format!(
                "{size} MiB: diff of the idle guest < {:.0} % of the full snapshot",
                DIFF_SHARE_TARGET * 100.0
            ),
            measured: share
                .map_or_else(|| "not measured".into(), |r| format!("{:.2} %", r * 100.0)),
            met: share.map(|r| r < DIFF_SHARE_TARGET),
        });
        let best_peer = at
            .iter()
            .filter(|r| r.vmm != Vmm::Quantix)
            .filter_map(|r| median(&r.restore_ms).map(|m| (r.vmm, m)))
            .min_by(|a, b| a.1.total_cmp(&b.1));
        let mine = median(&q.restore_ms);
        out.push(Target {
            target: format!("{size} MiB: restore-to-running ≤ the best peer's"),
            measured: match (mine, best_peer) {
                (Some(m), Some((p, pm))) => {
                    format!("{m:.2} ms vs {} {pm:.2} ms ({:.2}×)", p.name(), m / pm)
                }
                (Some(m), None) => format!("{m:.2} ms; no peer measured"),
                _ => "not measured".into(),
            },
            met: match (mine, best_peer) {
                (Some(m), Some((_, pm))) => Some(m <= pm),
                _ => None,
            },
        });
    }
    out
}

/// The printed report.
pub fn format(r: &SnapshotResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "snapshot: {} iteration(s) per VMM and size, {} on {} ({}, {} CPUs, /dev/kvm by {}), quantix at {}",
        r.options.iterations,
        r.date,
        r.host.kernel,
        r.host.cpu_model,
        r.host.cpus,
        r.host.kvm_module,
        r.host.revision
    );
    let _ = writeln!(
        s,
        "guest: writes every page of its RAM, then a byte on COM1 every {} µs (no memory); medians\n",
        r.options.tick_us
    );
    if let Some(n) = &r.nested_host {
        let _ = writeln!(s, "{}\n", n.summary());
    }
    let _ = writeln!(
        s,
        "{:<12} {:>5}  {:>9} {:>9} {:>9}  {:>9} {:>9} {:>7}  {:>10}  failures",
        "vmm",
        "MiB",
        "full ms",
        "paused ms",
        "full MiB",
        "diff ms",
        "diff MiB",
        "diff %",
        "restore ms",
    );
    let cell = |v: Option<f64>, d: usize| v.map_or_else(|| "-".to_string(), |v| format!("{v:.d$}"));
    for row in &r.rows {
        let m = |x: &Option<Summary>| x.as_ref().map(|s| s.median);
        let failed = row.samples.iter().filter(|s| s.failure.is_some()).count();
        let failures = match &row.failure {
            Some(f) => format!("did not start: {f}"),
            None if failed > 0 => format!("{failed} of {}", row.samples.len()),
            None => String::new(),
        };
        let share = ratio(m(&row.diff_mib), m(&row.full_mib)).map(|r| r * 100.0);
        let _ = writeln!(
            s,
            "{:<12} {:>5}  {:>9} {:>9} {:>9}  {:>9} {:>9} {:>7}  {:>10}  {}",
            row.vmm.name(),
            row.memory_mib,
            cell(m(&row.full_ms), 1),
            cell(m(&row.full_paused_ms), 1),
            cell(m(&row.full_mib), 1),
            cell(m(&row.diff_ms), 1),
            cell(m(&row.diff_mib), 3),
            cell(share, 2),
            cell(m(&row.restore_ms), 2),
            failures
        );
    }
    let _ = writeln!(
        s,
        "\nfull/diff ms: request to done (quantix: control socket round trip; firecracker: \
         pause + create + resume; qemu: migrate to a file until completed, then cont).\n\
         paused ms: quantix's paused_ms, firecracker's pause-to-resume, qemu's downtime.\n\
         restore ms: spawn of a new process to the restored guest's first byte (firecracker: \
         its API socket, then PUT /snapshot/load with resume_vm; qemu: -incoming).\n\
         QEMU has no diff snapshot: '-'."
    );
    for row in &r.rows {
        for smp in &row.samples {
            if let Some(f) = &smp.failure {
                let _ = writeln!(
                    s,
                    "  {} {} MiB iteration {}: {f}",
                    row.vmm.name(),
                    row.memory_mib,
                    smp.iteration
                );
            }
        }
    }
    s.push('\n');
    s.push_str(&report::format_targets(&r.targets));
    s
}

/// Fails when quantix-vmm has no complete iteration at some size.
pub fn check(r: &SnapshotResults) -> Result<(), BenchError> {
    for row in r.rows.iter().filter(|r| r.vmm == Vmm::Quantix) {
        if row.restore_ms.is_none() || row.full_ms.is_none() {
            let detail = row
                .failure
                .clone()
                .or_else(|| row.samples.iter().find_map(|s| s.failure.clone()))
                .unwrap_or_else(|| "no iteration".into());
            return Err(BenchError::NoSamples {
                vmm: format!("quantix-vmm ({} MiB)", row.memory_mib),
                detail,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(i: u32, full: u64, diff: Option<u64>, restore: Option<f64>) -> Sample {
        Sample {
            iteration: i,
            full_ms: Some(100.0),
            full_paused_ms: Some(90.0),
            full_bytes: Some(full),
            diff_ms: diff.map(|_| 5.0),
            diff_paused_ms: diff.map(|_| 4.0),
            diff_bytes: diff,
            restore_ms: restore,
            failure: None,
        }
    }

    #[test]
    fn targets_compare_quantix_with_the_best_peer() {
        let mib = 1u64 << 20;
        let rows = vec![
            summarize(
                Vmm::Quantix,
                256,
                vec![sample(1, 256 * mib, Some(mib / 4), Some(5.0))],
                None,
            ),
            summarize(
                Vmm::Firecracker,
                256,
                vec![sample(1, 256 * mib, Some(mib), Some(8.0))],
                None,
            ),
            summarize(
                Vmm::Qemu,
                256,
                vec![sample(1, 256 * mib, None, Some(40.0))],
                None,
            ),
        ];
        let t = targets(&rows);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].met, Some(true), "{:?}", t[0]);
        assert!(t[0].measured.starts_with("0.10 %"), "{:?}", t[0]);
        assert_eq!(t[1].met, Some(true));
        assert!(t[1].measured.contains("firecracker 8.00 ms"), "{:?}", t[1]);
        // A quantix restore slower than a peer's misses.
        let slow = vec![
            summarize(
                Vmm::Quantix,
                1024,
                vec![sample(1, mib, Some(mib), Some(9.0))],
                None,
            ),
            summarize(
                Vmm::Firecracker,
                1024,
                vec![sample(1, mib, Some(mib), Some(8.0))],
                None,
            ),
        ];
        let t = targets(&slow);
        assert_eq!(t[0].met, Some(false), "a diff as big as the full one");
        assert_eq!(t[1].met, Some(false));
        // Without peers there is nothing to compare.
        let alone = vec![summarize(Vmm::Quantix, 256, vec![], Some("x".into()))];
        let t = targets(&alone);
        assert_eq!(t[1].met, None);
        assert!(check(&results(alone, t)).is_err());
    }

    fn options() -> SnapshotOptions {
        SnapshotOptions {
            iterations: 2,
            sizes: vec![256, 1024],
            vmm_bin: None,
            qemu: Some("qemu-system-x86_64".into()),
            firecracker: Some("/somewhere/firecracker".into()),
            timeout: Duration::from_secs(30),
            tick_us: SANDBOX_TICK_US,
        }
    }

    fn results(rows: Vec<Row>, targets: Vec<Target>) -> SnapshotResults {
        SnapshotResults {
            date: String::new(),
            host: HostFacts::read(),
            nested_host: None,
            options: options(),
            rows,
            targets,
        }
    }

    #[test]
    fn the_nested_job_runs_this_benchmark_with_the_payloads_binaries() {
        let script = sandbox_script(&options());
        assert!(script.starts_with(
            "/payload/quantix-bench snapshot --vmm-bin /payload/quantix-vmm --iterations 2 \
             --sizes 256,1024 --timeout 30 --tick-us 2000 --json /tmp/qx-snapshot.json \
             --firecracker /payload/firecracker --qemu /usr/bin/qemu-system-x86_64 >&2"
        ));
        assert!(script.ends_with("exit $rc"), "{script}");
        let mut o = options();
        o.qemu = None;
        o.firecracker = None;
        let script = sandbox_script(&o);
        assert!(script.contains("--no-qemu") && !script.contains("firecracker"));
        assert_eq!(sandbox_memory_mib(256), 3072);
        assert_eq!(sandbox_memory_mib(1024), 5632);
    }

    #[test]
    fn the_nested_results_are_read_between_the_markers() {
        let rows = vec![summarize(
            Vmm::Quantix,
            256,
            vec![sample(1, 1 << 28, Some(1 << 20), Some(30.0))],
            None,
        )];
        let t = targets(&rows);
        let r = results(rows, t);
        let json = serde_json::to_string_pretty(&r).expect("encodes");
        let output = format!(
            "quantix-bench: snapshot: quantix with 256 MiB\nsome report\n{JSON_BEGIN}\n{json}\n\n{JSON_END}\n"
        );
        let back = parse_sandbox_output(&output).expect("parses");
        assert_eq!(back.rows.len(), 1);
        assert_eq!(back.rows[0].samples, r.rows[0].samples);
        assert_eq!(back.targets, r.targets);
        assert_eq!(back.options, r.options);
        assert!(back.nested_host.is_none());
        let e = parse_sandbox_output("quantix-bench: cannot open /dev/kvm").unwrap_err();
        assert!(e.contains("no results"), "{e}");
        let cut = format!("{JSON_BEGIN}\n{}\n{JSON_END}", &json[..json.len() / 2]);
        let e = parse_sandbox_output(&cut).unwrap_err();
        assert!(e.contains("do not parse"), "{e}");
    }

    #[test]
    fn the_console_counts_fills_and_ticks() {
        let c = Console::attach(std::io::Cursor::new(b"xFTTT".to_vec()));
        c.wait(Duration::from_secs(5), |s| s.closed).unwrap_or(());
        let s = c.0 .0.lock().unwrap();
        assert!(s.filled && s.first_byte.is_some());
        assert_eq!(s.ticks, 3);
    }

    #[test]
    fn disk_bytes_counts_blocks_not_lengths() {
        let dir = std::env::temp_dir().join(format!("qx-snapbench-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = File::create(dir.join("sparse")).unwrap();
        f.set_len(64 << 20).unwrap();
        fs::write(dir.join("data"), vec![1u8; 8192]).unwrap();
        let b = disk_bytes(&dir).unwrap();
        assert!((8192..64 << 20).contains(&b), "{b}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
