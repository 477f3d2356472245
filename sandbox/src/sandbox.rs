//! Running jobs in the nested host: build its initramfs, boot it under QEMU
//! TCG, follow the frames with deadlines, retry an infrastructure failure
//! once.

use std::fs::{self, File};
use std::io::{LineWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::assets::{repo_root, Assets, KVM_MODULES, NET_MODULES};
use crate::error::{HostDeath, InfraFailure, SandboxError};
use crate::frames::{Event, Phase, Tracker};
use crate::initramfs::{module_file_name, write_host_initramfs, HostContents};
use crate::job::{self, Job, JobResult};
use crate::lock::RunLock;
use crate::monitor;
use crate::payload::Payload;
use crate::qemu::{Output, QemuCommand, RunningQemu};
use crate::script::{self, InitOptions, KILL_GRACE_SECS};

/// Environment variable overriding the work directory (logs, run files).
pub const WORK_DIR_ENV: &str = "QX_SANDBOX_WORKDIR";
/// Set to `1` to keep each run's host initramfs for inspection.
pub const KEEP_ENV: &str = "QX_SANDBOX_KEEP";

/// How many run directories (logs) are kept in the work directory.
const RUNS_KEPT: usize = 20;

/// Tunables of the nested host and of the deadlines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    /// QEMU CPU model of the nested host (must have SVM for kvm-amd).
    pub cpu_model: String,
    /// vCPUs of the nested host. Default 1, and keep it: with 2 (multi-threaded TCG) the
    /// nested host's kernel itself dies now and then, under QEMU 7.2 and 10.0 alike and
    /// whichever VMM runs the guest (measured 2026-12-01: 5 of 9 nested hosts with 2
    /// vCPUs died, of kernel stack overflows among others; none of 26 with 1;
    /// docs/testing.md).
    /// More than 1 is logged as a warning.
    pub cpus: u32,
    /// Memory of the nested host, MiB.
    pub memory_mib: u32,
    /// Limit from QEMU start to `QX-HOST-READY`.
    pub boot_timeout: Duration,
    /// Extra time on top of a job's own limit (plus the 5 s SIGKILL grace)
    /// before the nested host counts as hung.
    pub job_grace: Duration,
    /// Limit between the end of a job and the start of the next one.
    pub gap_timeout: Duration,
    /// Limit of the whole run (one attempt); `None`: boot + jobs + graces.
    pub overall_timeout: Option<Duration>,
    /// How many times an infrastructure failure is retried.
    pub retries: u32,
    /// Load tun, llc, stp and bridge in the nested host.
    pub network_modules: bool,
    /// Extra arguments for the nested host kernel's command line.
    pub extra_kernel_args: Vec<String>,
    /// Where run directories (console logs) go.
    pub work_dir: PathBuf,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            cpu_model: "EPYC".to_string(),
            cpus: 1,
            memory_mib: 3072,
            boot_timeout: Duration::from_secs(180),
            job_grace: Duration::from_secs(60),
            gap_timeout: Duration::from_secs(60),
            overall_timeout: None,
            retries: 1,
            network_modules: false,
            extra_kernel_args: Vec::new(),
            work_dir: default_work_dir(),
        }
    }
}

/// The outcome of a run whose infrastructure worked. Jobs may have failed:
/// that is a product result, see [`JobResult`].
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// One result per job, in order.
    pub jobs: Vec<JobResult>,
    /// The raw serial console of the nested host (kernel messages, frames,
    /// prefixed job output), `\n`-separated.
    pub console: String,
    /// What QEMU printed on stderr.
    pub qemu_stderr: String,
    /// The console log file of the successful attempt.
    pub log_path: PathBuf,
    /// Attempts made (2 after a retried infrastructure failure).
    pub attempts: u32,
    /// The infrastructure failures that were retried.
    pub retried_after: Vec<String>,
    /// Wall-clock time from QEMU start to `QX-HOST-READY`.
    pub host_ready_after: Duration,
    /// The nested host's uptime at `QX-HOST-READY`.
    pub host_uptime_at_ready: Duration,
    /// Wall-clock time of the successful attempt (QEMU start to exit).
    pub total: Duration,
    /// Size of the nested host's initramfs.
    pub initramfs_bytes: u64,
}

impl Report {
    /// The result of the job called `name`.
    pub fn job(&self, name: &str) -> Option<&JobResult> {
        self.jobs.iter().find(|j| j.name == name)
    }

    /// Every job exited 0 within its time.
    pub fn all_succeeded(&self) -> bool {
        self.jobs.iter().all(JobResult::success)
    }
}

/// Runs job lists in nested KVM hosts.
#[derive(Debug, Clone)]
pub struct Sandbox {
    assets: Assets,
    config: SandboxConfig,
}

/// Why one attempt failed.
enum AttemptError {
    /// Before any job under test began: the sandbox's own failure.
    Infra {
        failure: InfraFailure,
        console_tail: String,
    },
    /// After a job under test began: a product failure until shown otherwise.
    HostDied(Box<HostDeath>),
    Other(SandboxError),
}

/// The file in the work directory where every retried infrastructure failure is
/// recorded, one line each, so that a test run can report how many it had
/// (`scripts/test` prints it at the end).
pub const RETRY_LEDGER: &str = "retries.log";

fn record_retry(work_dir: &Path, line: &str) {
    let path = work_dir.join(RETRY_LEDGER);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let written = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{secs} {}", line.replace('\n', " ")));
    if let Err(e) = written {
        warn!("recording the retry in {}: {e}", path.display());
    }
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Sandbox {
    /// A sandbox with the default configuration.
    pub fn new(assets: Assets) -> Self {
        Self::with_config(assets, SandboxConfig::default())
    }

    /// A sandbox with `config`.
    pub fn with_config(assets: Assets, config: SandboxConfig) -> Self {
        Sandbox { assets, config }
    }

    /// [`Assets::from_env`] and the default configuration.
    pub fn from_env() -> Result<Self, SandboxError> {
        Ok(Self::new(Assets::from_env()?))
    }

    /// The assets in use.
    pub fn assets(&self) -> &Assets {
        &self.assets
    }

    /// The configuration.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// The configuration, to change it.
    pub fn config_mut(&mut self) -> &mut SandboxConfig {
        &mut self.config
    }

    /// Boots a nested host with `payload`, runs `jobs` in order and reports.
    ///
    /// Infrastructure failures are retried `config.retries` times (once by
    /// default), except deterministic ones (QEMU cannot start, the KVM
    /// modules do not load), and each retry is recorded in the work directory's
    /// [`RETRY_LEDGER`]. A nested host that dies or hangs once a job under test has
    /// begun is [`SandboxError::HostDied`], never retried. Runs are serialised per
    /// work directory.
    pub fn run(&self, payload: &Payload, jobs: &[Job]) -> Result<Report, SandboxError> {
        job::validate_all(jobs)?;
        let work_dir = &self.config.work_dir;
        fs::create_dir_all(work_dir)
            .map_err(|e| SandboxError::io(format!("creating {}", work_dir.display()), e))?;
        let _lock = RunLock::acquire(&work_dir.join("sandbox.lock"))?;
        let run_dir = new_run_dir(work_dir)?;

        let nonce = nonce();
        let init = script::host_init(&InitOptions {
            nonce: nonce.clone(),
            kvm_modules: KVM_MODULES
                .iter()
                .map(|m| module_file_name(m).to_string())
                .collect(),
            net_modules: NET_MODULES
                .iter()
                .map(|m| module_file_name(m).to_string())
                .collect(),
            load_net_modules: self.config.network_modules,
        });
        let jobs_script = script::jobs_script(jobs);
        let initramfs = run_dir.join("host-initramfs.cpio");
        let t = Instant::now();
        let initramfs_bytes = write_host_initramfs(
            &initramfs,
            &HostContents {
                assets: &self.assets,
                payload,
                init: &init,
                jobs_script: &jobs_script,
            },
        )?;
        info!(
            bytes = initramfs_bytes,
            "nested host initramfs {} built in {:?}",
            initramfs.display(),
            t.elapsed()
        );

        if self.config.cpus > 1 {
            warn!(
                cpus = self.config.cpus,
                "a nested host with more than one vCPU (multi-threaded TCG) is unstable: its \
                 kernel died in 5 of 9 such hosts measured (docs/testing.md, section 9)"
            );
        }
        let cmd = self.qemu_command(&initramfs);
        let attempts_max = 1 + self.config.retries;
        let mut retried_after = Vec::new();
        let result = loop {
            let attempt = retried_after.len() as u32 + 1;
            let log_path = run_dir.join(format!("console-{attempt}.log"));
            match self.attempt(&cmd, &nonce, jobs, &log_path) {
                Ok(mut report) => {
                    report.attempts = attempt;
                    report.retried_after = retried_after;
                    report.initramfs_bytes = initramfs_bytes;
                    break Ok(report);
                }
                Err(AttemptError::Other(e)) => break Err(e),
                Err(AttemptError::HostDied(mut death)) => {
                    eprintln!(
                        "qx-sandbox: the nested host died {} `{}`: {} (log {}); not retried",
                        if death.in_job { "in job" } else { "after job" },
                        death.job,
                        death.failure,
                        log_path.display()
                    );
                    death.attempts = attempt;
                    break Err(SandboxError::HostDied(death));
                }
                Err(AttemptError::Infra {
                    failure,
                    console_tail,
                }) => {
                    if failure.is_retriable() && attempt < attempts_max {
                        warn!("sandbox infrastructure failure on attempt {attempt}: {failure}; retrying");
                        eprintln!(
                            "qx-sandbox: infrastructure failure on attempt {attempt}: {failure} \
                             (log {}); retrying",
                            log_path.display()
                        );
                        let entry = format!("{failure} (log {})", log_path.display());
                        record_retry(work_dir, &entry);
                        retried_after.push(entry);
                        continue;
                    }
                    break Err(SandboxError::Infrastructure {
                        failure,
                        attempts: attempt,
                        log: log_path,
                        console_tail,
                    });
                }
            }
        };
        if std::env::var(KEEP_ENV).map(|v| v == "1").unwrap_or(false) {
            info!("keeping {}", initramfs.display());
        } else if let Err(e) = fs::remove_file(&initramfs) {
            warn!("removing {}: {e}", initramfs.display());
        }
        prune_runs(&work_dir.join("runs"), &run_dir);
        result
    }

    /// The QEMU command line booting the nested host.
    fn qemu_command(&self, initramfs: &Path) -> QemuCommand {
        let mut append = vec![
            "console=ttyS0".to_string(),
            // Mitigation for the khugepaged soft lockup seen in nested hosts.
            "transparent_hugepage=never".to_string(),
            // A periodic tick (the local APIC timer in periodic mode): QEMU's TCG now and
            // then leaves the nested host halted with its one-shot timer interrupt pending
            // in the APIC and never delivered, and a tickless host has no other interrupt
            // to wake it (docs/testing.md, "A hung nested host").
            "nohz=off".to_string(),
            "highres=off".to_string(),
            "panic=-1".to_string(),
        ];
        append.extend(self.config.extra_kernel_args.iter().cloned());
        let args = [
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            &self.config.cpu_model,
            "-smp",
            &self.config.cpus.to_string(),
            "-m",
            &self.config.memory_mib.to_string(),
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-no-user-config",
            "-serial",
            "stdio",
            "-kernel",
            &self.assets.host_vmlinuz.to_string_lossy(),
            "-initrd",
            &initramfs.to_string_lossy(),
            "-append",
            &append.join(" "),
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let monitor = monitor_socket(initramfs);
        if let Some(socket) = &monitor {
            // The human monitor, asked where the CPU is if the nested host hangs.
            args.extend([
                "-monitor".to_string(),
                format!("unix:{},server=on,wait=off", socket.display()),
            ]);
        }
        if let Some(dir) = &self.assets.host_qemu_data_dir {
            // Its own option ROMs first; Debian's build also searches /usr/share/seabios.
            args.extend(["-L".to_string(), dir.to_string_lossy().into_owned()]);
        }
        QemuCommand {
            program: self.assets.host_qemu.clone(),
            args,
            monitor,
        }
    }

    /// A few samples of the nested host CPU's registers and its local APIC, through
    /// QEMU's monitor.
    fn cpu_state(socket: &Path, kaslr_text: Option<u64>) -> String {
        match monitor::sample(socket, 5, Duration::from_millis(300)) {
            Ok(state) => monitor::describe(&state, kaslr_text),
            Err(e) => format!("(QEMU's monitor did not answer: {e})"),
        }
    }

    /// The limit of one attempt.
    fn overall_timeout(&self, jobs: &[Job]) -> Duration {
        self.config.overall_timeout.unwrap_or_else(|| {
            let per_job: Duration = jobs
                .iter()
                .map(|j| {
                    self.job_limit(Duration::from_secs(j.timeout_secs())) + self.config.gap_timeout
                })
                .sum();
            self.config.boot_timeout + per_job + Duration::from_secs(60)
        })
    }

    /// How long a job with limit `timeout` may take before the nested host
    /// counts as hung.
    fn job_limit(&self, timeout: Duration) -> Duration {
        timeout + Duration::from_secs(KILL_GRACE_SECS) + self.config.job_grace
    }

    fn attempt(
        &self,
        cmd: &QemuCommand,
        nonce: &str,
        jobs: &[Job],
        log_path: &Path,
    ) -> Result<Report, AttemptError> {
        let mut log = ConsoleLog::create(log_path).map_err(AttemptError::Other)?;
        eprintln!(
            "qx-sandbox: nested host console log: {}",
            log_path.display()
        );
        info!("starting nested host: {}", cmd.display());
        log.note(&format!("command: {}", cmd.display()));

        let monitor = &cmd.monitor;
        if let Some(socket) = monitor {
            // A previous attempt's socket; QEMU binds a new one.
            let _ = fs::remove_file(socket);
        }
        let mut kaslr_text: Option<u64> = None;
        let started = Instant::now();
        let mut qemu = match RunningQemu::spawn(cmd) {
            Ok(q) => q,
            Err(failure) => {
                log.note(&format!("infrastructure failure: {failure}"));
                return Err(AttemptError::Infra {
                    failure,
                    console_tail: String::new(),
                });
            }
        };
        let mut tracker = Tracker::new(nonce, jobs);
        let overall_limit = self.overall_timeout(jobs);
        let overall = started + overall_limit;
        let mut last_progress = started;
        let mut ready: Option<(Duration, Duration)> = None;
        // The last job under test that began: from the first one on, a dying host is a
        // product failure.
        let mut under_test_began: Option<String> = None;

        let outcome: Result<(), InfraFailure> = loop {
            let (reference, limit, during) = match tracker.phase() {
                Phase::Booting => (
                    started,
                    self.config.boot_timeout,
                    "while booting".to_string(),
                ),
                Phase::Idle { next } => (
                    last_progress,
                    self.config.gap_timeout,
                    format!("before job `{}` began", job_name(&tracker, next)),
                ),
                Phase::InJob { index } => {
                    let timeout = tracker.job(index).map(|j| j.1).unwrap_or_default();
                    (
                        last_progress,
                        self.job_limit(timeout),
                        format!("in job `{}`", job_name(&tracker, index)),
                    )
                }
                Phase::Done => (
                    last_progress,
                    Duration::from_secs(30),
                    "powering off".to_string(),
                ),
            };
            let (deadline, limit, during) = if overall < reference + limit {
                (
                    overall,
                    overall_limit,
                    format!("{during} (overall limit of the run)"),
                )
            } else {
                (reference + limit, limit, during)
            };
            match qemu.next(deadline) {
                Output::Console(line) => {
                    log.console(&line);
                    if kaslr_text.is_none() {
                        kaslr_text = monitor::kaslr_text(&line);
                    }
                    match tracker.feed(&line) {
                        Ok(Event::Console) => debug!(target: "quantix_sandbox::console", "{line}"),
                        Ok(Event::JobOutput { .. }) => {
                            info!(target: "quantix_sandbox::job", "{line}")
                        }
                        Ok(Event::Ready { uptime_ms }) => {
                            let after = started.elapsed();
                            info!("nested host ready after {after:?} (uptime {uptime_ms} ms)");
                            ready = Some((after, Duration::from_millis(uptime_ms)));
                            last_progress = Instant::now();
                        }
                        Ok(Event::JobStarted { index }) => {
                            info!("job `{}` started", job_name(&tracker, index));
                            if jobs.get(index).is_some_and(Job::under_test) {
                                under_test_began = Some(job_name(&tracker, index));
                            }
                            last_progress = Instant::now();
                        }
                        Ok(Event::JobEnded { index }) => {
                            if let Some(r) = tracker.results().get(index) {
                                info!(
                                    "job `{}` ended: status {:?}, timed out {}, {:?}",
                                    r.name, r.status, r.timed_out, r.elapsed
                                );
                            }
                            last_progress = Instant::now();
                        }
                        Ok(Event::Done) => last_progress = Instant::now(),
                        Err(failure) => break Err(failure),
                    }
                }
                Output::Stderr(line) => {
                    debug!(target: "quantix_sandbox::qemu", "{line}");
                    log.stderr(&line);
                }
                Output::Timeout if tracker.phase() == Phase::Done => break Ok(()),
                Output::Timeout if tracker.phase() == Phase::Booting => {
                    break Err(InfraFailure::HostNotReady { waited: limit })
                }
                Output::Timeout => {
                    break Err(InfraFailure::HostHung {
                        during,
                        waited: limit,
                    })
                }
                Output::Closed if tracker.phase() == Phase::Done => break Ok(()),
                Output::Closed => {
                    let status = qemu.finish(Duration::from_secs(5));
                    break Err(InfraFailure::QemuExited { status, during });
                }
            }
        };

        // A hung host: where its CPU is, before it is killed.
        let cpu = match (&outcome, monitor) {
            (Err(InfraFailure::HostHung { .. }), Some(socket)) => {
                let text = Self::cpu_state(socket, kaslr_text);
                log.note(&format!("where the nested host's CPU was:\n{text}"));
                text
            }
            _ => String::new(),
        };
        let running = tracker
            .running()
            .map(|(name, output)| (name.to_string(), output.to_string()));
        // A host that failed to set up explains why on the console (module
        // errors, lsmod) before powering off: keep reading for a while.
        if let Err(InfraFailure::HostSetup { .. }) = &outcome {
            let until = Instant::now() + Duration::from_secs(15);
            loop {
                match qemu.next(until) {
                    Output::Console(line) => log.console(&line),
                    Output::Stderr(line) => log.stderr(&line),
                    Output::Closed | Output::Timeout => break,
                }
            }
        }
        // A host that is done or failed to set up powers itself off; a hung
        // one is killed at once.
        let grace = match &outcome {
            Ok(()) => Duration::from_secs(30),
            Err(InfraFailure::HostSetup { .. }) => Duration::from_secs(5),
            Err(_) => Duration::ZERO,
        };
        let status = qemu.finish(grace);
        for out in qemu.drain() {
            match out {
                Output::Console(line) => log.console(&line),
                Output::Stderr(line) => log.stderr(&line),
                Output::Closed | Output::Timeout => {}
            }
        }
        drop(qemu);
        let total = started.elapsed();
        log.note(&format!("QEMU {status} after {total:?}"));

        match outcome {
            Ok(()) => {
                let (host_ready_after, host_uptime_at_ready) = ready.unwrap_or_default();
                Ok(Report {
                    jobs: tracker.into_results(),
                    console: log.console_text,
                    qemu_stderr: log.stderr_text,
                    log_path: log_path.to_path_buf(),
                    attempts: 1,
                    retried_after: Vec::new(),
                    host_ready_after,
                    host_uptime_at_ready,
                    total,
                    initramfs_bytes: 0,
                })
            }
            Err(failure) if under_test_began.is_some() => {
                let in_job = running.is_some();
                let (job, output) = match running {
                    Some((name, output)) => (name, output),
                    None => (under_test_began.unwrap_or_default(), String::new()),
                };
                log.note(&format!(
                    "the nested host died in job `{job}` (a job under test had begun): {failure}"
                ));
                Err(AttemptError::HostDied(Box::new(HostDeath {
                    failure,
                    job,
                    in_job,
                    completed: tracker.into_results(),
                    job_output_tail: last_lines(&output, 40),
                    death: crate::death::death_lines(&log.console_text),
                    cpu,
                    attempts: 0,
                    log: log_path.to_path_buf(),
                    console_tail: log.tail(60),
                })))
            }
            Err(failure) => {
                log.note(&format!("infrastructure failure: {failure}"));
                Err(AttemptError::Infra {
                    failure,
                    console_tail: log.tail(40),
                })
            }
        }
    }
}

fn job_name(tracker: &Tracker, index: usize) -> String {
    tracker
        .job(index)
        .map(|j| j.0.to_string())
        .unwrap_or_default()
}

/// The console log of one attempt: written as it comes (so a hang can be
/// watched with `tail -f`) and kept in memory for the report.
struct ConsoleLog {
    file: Option<LineWriter<File>>,
    console_text: String,
    stderr_text: String,
}

impl ConsoleLog {
    fn create(path: &Path) -> Result<Self, SandboxError> {
        let file = File::create(path)
            .map_err(|e| SandboxError::io(format!("creating {}", path.display()), e))?;
        Ok(ConsoleLog {
            file: Some(LineWriter::new(file)),
            console_text: String::new(),
            stderr_text: String::new(),
        })
    }

    fn write(&mut self, line: &str) {
        if let Some(file) = &mut self.file {
            if let Err(e) = writeln!(file, "{line}") {
                warn!("writing the console log: {e}; not writing it any more");
                self.file = None;
            }
        }
    }

    fn console(&mut self, line: &str) {
        self.write(line);
        self.console_text.push_str(line);
        self.console_text.push('\n');
    }

    fn stderr(&mut self, line: &str) {
        self.write(&format!("qemu-stderr: {line}"));
        self.stderr_text.push_str(line);
        self.stderr_text.push('\n');
    }

    fn note(&mut self, line: &str) {
        self.write(&format!("qx-sandbox: {line}"));
    }

    fn tail(&self, n: usize) -> String {
        let mut tail = last_lines(&self.console_text, n);
        if !self.stderr_text.is_empty() {
            tail.push_str("\n--- QEMU stderr ---\n");
            tail.push_str(&last_lines(&self.stderr_text, 10));
        }
        tail
    }
}

/// `$QX_SANDBOX_WORKDIR`, else `$CARGO_TARGET_DIR/qx-sandbox`, else
/// `<repo>/target/qx-sandbox`.
pub fn default_work_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(WORK_DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    target.join("qx-sandbox")
}

/// The monitor socket beside the run's initramfs, unless its path is too long for a Unix
/// socket address (then the run has no monitor).
fn monitor_socket(initramfs: &Path) -> Option<PathBuf> {
    let socket = initramfs.with_file_name("monitor.sock");
    (socket.as_os_str().len() < 100).then_some(socket)
}

fn new_run_dir(work_dir: &Path) -> Result<PathBuf, SandboxError> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let dir = work_dir.join("runs").join(format!(
        "{secs:011}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&dir)
        .map_err(|e| SandboxError::io(format!("creating {}", dir.display()), e))?;
    Ok(dir)
}

/// Removes the oldest run directories beyond [`RUNS_KEPT`].
fn prune_runs(runs: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(runs) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p != current)
        .collect();
    dirs.sort();
    let excess = dirs.len().saturating_sub(RUNS_KEPT - 1);
    for dir in dirs.into_iter().take(excess) {
        if let Err(e) = fs::remove_dir_all(&dir) {
            debug!("pruning {}: {e}", dir.display());
        }
    }
}

/// 16 random hex digits (from /dev/urandom; time and pid as a fallback).
fn nonce() -> String {
    let mut bytes = [0u8; 8];
    let random = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if random.is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        bytes = (t ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_hex_and_differ() {
        let a = nonce();
        assert_eq!(a.len(), 16);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, nonce());
    }

    #[test]
    fn prune_keeps_the_newest() {
        let root = std::env::temp_dir().join(format!("qx-prune-{}", std::process::id()));
        for i in 0..(RUNS_KEPT + 5) {
            fs::create_dir_all(root.join(format!("{i:011}-1-0"))).unwrap();
        }
        let current = root.join(format!("{:011}-1-0", RUNS_KEPT + 4));
        prune_runs(&root, &current);
        let left = fs::read_dir(&root).unwrap().count();
        assert!(current.exists());
        assert!(!root.join(format!("{:011}-1-0", 0)).exists());
        assert_eq!(left, RUNS_KEPT);
        let _ = fs::remove_dir_all(&root);
    }
}
