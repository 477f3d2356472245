//! `boot`: boot-to-init time and VMM memory, quantix-vmm against QEMU microvm, both in
//! one nested host, alternating.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use quantix_sandbox::{build, paths, GuestInit, Job, JobResult, Payload, Report, Sandbox};
use serde::Serialize;

use crate::error::BenchError;
use crate::probe::{find_probe_record, MappingInfo, ProbeRecord, PROBE_MARKER};
use crate::report::{self, mib, ratio, Target};
use crate::stats::{self, Summary};

/// Where the VMM and the probe go in the nested host.
pub const VMM_PATH: &str = "/payload/quantix-vmm";
/// The probe in the nested host.
pub const PROBE_PATH: &str = "/payload/qx-probe";
/// The guest kernel command line, for both VMMs.
pub const GUEST_CMDLINE: &str = "console=ttyS0 qx.action=poweroff";
/// Target: quantix-vmm's boot-to-init at most this fraction of QEMU's.
pub const BOOT_RATIO_TARGET: f64 = 0.7;
/// Target: VMM memory overhead below this many MiB.
pub const OVERHEAD_TARGET_MIB: f64 = 5.0;
/// Extra time the sandbox gives a job beyond the probe's own limit.
const JOB_SLACK: Duration = Duration::from_secs(20);

/// The guest kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Kernel {
    /// The bzImage.
    Vmlinuz,
    /// The ELF extracted from it (PVH entry).
    Vmlinux,
}

impl Kernel {
    /// Its path in the nested host.
    pub fn path(self) -> &'static str {
        match self {
            Kernel::Vmlinuz => paths::GUEST_VMLINUZ,
            Kernel::Vmlinux => paths::GUEST_VMLINUX,
        }
    }
}

/// The settings of one `boot` benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootOptions {
    /// Runs per VMM.
    pub iterations: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest kernel.
    pub kernel: Kernel,
    /// Per-run limit in the nested host (the probe kills the VMM then), seconds.
    pub run_timeout_s: u64,
    /// Append `quiet` to the guest command line (for both VMMs): the kernel then prints
    /// almost nothing, and the serial console's cost drops out of the boot time.
    pub quiet: bool,
    /// Keep each run's whole guest console, every line with its time since the spawn
    /// (in the sandbox log, and in the JSON samples as `output`).
    pub console: bool,
}

impl BootOptions {
    /// The guest kernel command line.
    pub fn cmdline(&self) -> String {
        if self.quiet {
            format!("{GUEST_CMDLINE} quiet")
        } else {
            GUEST_CMDLINE.to_string()
        }
    }
}

/// The VMMs, and quantix-vmm jailed as the agent runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Vmm {
    /// This project's VMM.
    Quantix,
    /// Debian's QEMU, `-M microvm`.
    Qemu,
    /// quantix-vmm through `qx-jail` and `quantix-jailer`: its files and TAPs passed as
    /// descriptors, its own uid, namespaces, root and cgroup, seccomp filters (the agent's
    /// jail; `quantix-bench jail`).
    QuantixJailed,
    /// quantix-vmm with neither jail nor seccomp filters (`--seccomp off`): the baseline of
    /// `quantix-bench jail`.
    QuantixUnconfined,
}

impl Vmm {
    /// Short name (`quantix`, `qemu`): job names and the probe's `vmm` field.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Quantix => "quantix",
            Vmm::Qemu => "qemu",
            Vmm::QuantixJailed => "quantix-jailed",
            Vmm::QuantixUnconfined => "quantix-unconfined",
        }
    }

    /// Name in tables.
    pub fn title(self) -> &'static str {
        match self {
            Vmm::Quantix => "quantix-vmm",
            Vmm::Qemu => "QEMU microvm",
            Vmm::QuantixJailed => "quantix-vmm jailed",
            Vmm::QuantixUnconfined => "quantix-vmm unconfined",
        }
    }

    /// quantix-vmm, jailed or not.
    pub fn is_quantix(self) -> bool {
        matches!(
            self,
            Vmm::Quantix | Vmm::QuantixJailed | Vmm::QuantixUnconfined
        )
    }
}

/// `qx-jail` in the nested host (jailed runs).
pub const QX_JAIL_PATH: &str = "/payload/qx-jail";
/// `quantix-jailer` in the nested host.
pub const JAILER_PATH: &str = "/payload/quantix-jailer";
/// Where a jailed VMM's pid is written (the process to measure; one run at a time).
pub const JAIL_PID_FILE: &str = "/tmp/qx-jail.pid";
/// The jailed VMM's uid (the first of the agent's default range).
pub const JAIL_UID: u32 = 2_100_000_000;

/// The jail in front of a jailed run's quantix-vmm command line: the agent's jail, with
/// its cgroup limits for `cpus` vCPUs and `memory_mib` of guest memory.
pub fn jail_prefix(cpus: u32, memory_mib: u32) -> Vec<String> {
    [
        QX_JAIL_PATH,
        "--jailer",
        JAILER_PATH,
        "--root",
        "/tmp/qx-jail",
        "--uid",
        &JAIL_UID.to_string(),
        "--cgroup",
        "/sys/fs/cgroup/qx-bench/vm",
        "--guest-mib",
        &memory_mib.to_string(),
        "--vcpus",
        &cpus.to_string(),
        "--pid-file",
        JAIL_PID_FILE,
        "--",
    ]
    .map(String::from)
    .to_vec()
}

/// Adds the static binaries of `vmms` to `payload`: quantix-vmm, and for jailed runs
/// `qx-jail` and `quantix-jailer`; QEMU when asked for.
pub fn add_vmms(payload: &mut Payload, sandbox: &Sandbox, vmms: &[Vmm]) -> Result<(), BenchError> {
    if vmms.iter().any(|v| v.is_quantix()) {
        payload.add_file(
            &build::static_binary("quantix-vmm", "quantix-vmm")?,
            VMM_PATH,
        )?;
    }
    if vmms.contains(&Vmm::QuantixJailed) {
        payload.add_file(
            &build::static_binary("quantix-bench", "qx-jail")?,
            QX_JAIL_PATH,
        )?;
        payload.add_file(
            &build::static_binary("quantix-jailer", "quantix-jailer")?,
            JAILER_PATH,
        )?;
    }
    if vmms.contains(&Vmm::Qemu) {
        payload.add_qemu(sandbox.assets())?;
    }
    Ok(())
}

/// A guest that boots Debian's kernel with the guest initramfs, as either VMM runs it.
#[derive(Debug, Clone, Copy)]
pub struct GuestBoot<'a> {
    /// Guest kernel.
    pub kernel: Kernel,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest kernel command line.
    pub cmdline: &'a str,
    /// quantix-vmm's `--log-level`.
    pub log_level: &'a str,
}

/// The command line of `vmm` booting `g` (`boot` and `smp` share it).
pub fn guest_argv(vmm: Vmm, g: &GuestBoot) -> Vec<String> {
    let kernel = g.kernel.path();
    let v: Vec<&str> = match vmm {
        Vmm::Quantix | Vmm::QuantixJailed | Vmm::QuantixUnconfined => vec![
            VMM_PATH,
            "--kernel",
            kernel,
            "--initramfs",
            paths::GUEST_INITRAMFS,
            "--cpus",
            "{cpus}",
            "--memory",
            "{mem}",
            "--cmdline",
            "{cmdline}",
            "--log-level",
            g.log_level,
        ],
        Vmm::Qemu => vec![
            paths::QEMU,
            "-M",
            "microvm,rtc=on",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            "{mem}",
            "-smp",
            "{cpus}",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-kernel",
            kernel,
            "-initrd",
            paths::GUEST_INITRAMFS,
            "-append",
            "{cmdline}",
        ],
    };
    let argv = v.into_iter().map(|a| match a {
        "{cpus}" => g.cpus.to_string(),
        "{mem}" => g.memory_mib.to_string(),
        "{cmdline}" => g.cmdline.to_string(),
        a => a.to_string(),
    });
    match vmm {
        Vmm::QuantixJailed => jail_prefix(g.cpus, g.memory_mib)
            .into_iter()
            .chain(argv)
            .collect(),
        Vmm::QuantixUnconfined => argv
            .chain(["--seccomp".to_string(), "off".to_string()])
            .collect(),
        _ => argv.collect(),
    }
}

/// The VMM command line of a run.
pub fn vmm_argv(vmm: Vmm, o: &BootOptions) -> Vec<String> {
    guest_argv(
        vmm,
        &GuestBoot {
            kernel: o.kernel,
            cpus: o.cpus,
            memory_mib: o.memory_mib,
            cmdline: &o.cmdline(),
            log_level: "warn",
        },
    )
}

/// Quotes an argv for display (single quotes where needed).
pub fn shell_words(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=,:".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The sandbox job of run `iteration` of `vmm`.
pub fn probe_job(vmm: Vmm, iteration: u32, o: &BootOptions) -> Job {
    let label = format!("{}-{iteration}", vmm.name());
    let mut argv = vec![
        PROBE_PATH.to_string(),
        "--vmm".into(),
        vmm.name().into(),
        "--label".into(),
        label.clone(),
        "--guest-mib".into(),
        o.memory_mib.to_string(),
        "--timeout-s".into(),
        o.run_timeout_s.to_string(),
    ];
    if o.console {
        argv.push("--echo-console".into());
    }
    argv.push("--".into());
    argv.extend(vmm_argv(vmm, o));
    let job = Job::new(label, argv).timeout(Duration::from_secs(o.run_timeout_s) + JOB_SLACK);
    // A nested host that dies while only QEMU ran is the sandbox's failure.
    if vmm == Vmm::Qemu {
        job.reference()
    } else {
        job
    }
}

/// The jobs of a whole benchmark: quantix, qemu, quantix, qemu...
pub fn jobs(o: &BootOptions) -> Vec<(Vmm, u32, Job)> {
    (1..=o.iterations)
        .flat_map(|i| [Vmm::Quantix, Vmm::Qemu].map(|v| (v, i, probe_job(v, i, o))))
        .collect()
}

/// One run, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct BootSample {
    /// Which VMM.
    pub vmm: Vmm,
    /// 1-based iteration.
    pub iteration: u32,
    /// Position in the nested host's job order (0-based).
    pub order: usize,
    /// Sandbox job name.
    pub job: String,
    /// The job's (probe's) exit status.
    pub job_status: Option<i32>,
    /// The sandbox's time limit hit the job (the probe itself did not report in time).
    pub job_timed_out: bool,
    /// The job's wall time on the nested host's clock, ms.
    pub job_elapsed_ms: f64,
    /// The probe's record, if it printed one.
    pub probe: Option<ProbeRecord>,
    /// The guest's init line, parsed.
    pub guest: Option<GuestInit>,
    /// Why the run is excluded from the statistics; `None` if it counts.
    pub failure: Option<String>,
    /// The end of the job's output, for failed runs; all of it with `--console`.
    pub output_tail: Option<String>,
}

impl BootSample {
    /// Counts in the statistics.
    pub fn ok(&self) -> bool {
        self.failure.is_none()
    }

    fn mem<T>(&self, f: impl Fn(&crate::probe::MemorySnapshot) -> Option<T>) -> Option<T> {
        self.probe.as_ref()?.memory.as_ref().and_then(f)
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Turns one job's result into a sample. `console` is the nested host's whole console,
/// searched for the probe line when a kernel message broke it out of the job's output.
pub fn sample_from_job(
    vmm: Vmm,
    iteration: u32,
    order: usize,
    job: &JobResult,
    console: &str,
    keep_output: bool,
) -> BootSample {
    let mut found = find_probe_record(&job.output);
    if found.is_err() {
        let marker = format!("[{}] {PROBE_MARKER}", job.name);
        let lines: String = console
            .lines()
            .filter_map(|l| l.find(&marker).map(|at| &l[at + job.name.len() + 3..]))
            .collect::<Vec<_>>()
            .join("\n");
        if let Ok(r) = find_probe_record(&lines) {
            found = Ok(r);
        }
    }
    let (probe, mut failure) = match found {
        Ok(r) => {
            let failure = r.failure();
            (Some(r), failure)
        }
        Err(e) => (
            None,
            Some(format!(
                "{e} from the probe (job status {}{})",
                job.status.map_or("none".to_string(), |s| s.to_string()),
                if job.timed_out {
                    ", timed out in the sandbox"
                } else {
                    ""
                }
            )),
        ),
    };
    if failure.is_none() && probe.as_ref().is_some_and(|p| p.vmm != vmm.name()) {
        failure = Some("the probe reported another VMM".into());
    }
    let guest = probe
        .as_ref()
        .and_then(|p| p.init_line.as_deref())
        .and_then(GuestInit::parse_line);
    BootSample {
        vmm,
        iteration,
        order,
        job: job.name.clone(),
        job_status: job.status,
        job_timed_out: job.timed_out,
        job_elapsed_ms: job.elapsed.as_secs_f64() * 1000.0,
        output_tail: if keep_output {
            Some(job.output.clone())
        } else {
            failure.as_ref().map(|_| tail(&job.output, 80))
        },
        probe,
        guest,
        failure,
    }
}

/// Statistics of one VMM's successful runs.
#[derive(Debug, Clone, Serialize)]
pub struct VmmSummary {
    /// Which VMM.
    pub vmm: Vmm,
    /// Runs made.
    pub runs: usize,
    /// Runs that count.
    pub ok: usize,
    /// Runs excluded (failed or timed out), with why.
    pub failed: Vec<String>,
    /// Spawn to the first console line, ms.
    pub first_output_ms: Option<Summary>,
    /// Spawn to the kernel's `Linux version` banner, ms.
    pub kernel_banner_ms: Option<Summary>,
    /// Spawn to the guest's init line, ms.
    pub start_to_init_ms: Option<Summary>,
    /// Guest uptime at its init line, s.
    pub guest_uptime_s: Option<Summary>,
    /// VMM RSS (sum over smaps) at init, MiB.
    pub rss_mib: Option<Summary>,
    /// RSS of the guest RAM mapping(s), MiB.
    pub guest_rss_mib: Option<Summary>,
    /// RSS minus guest RAM RSS, MiB.
    pub overhead_mib: Option<Summary>,
    /// VmHWM (peak RSS) at init, MiB.
    pub hwm_mib: Option<Summary>,
    /// Spawn to exit, ms.
    pub total_ms: Option<Summary>,
    /// Exit statuses of all runs (`0`, `1`, `signal 9`, `none`) and their counts.
    pub exit_statuses: BTreeMap<String, usize>,
    /// How the guest RAM was identified (distinct rules seen).
    pub guest_rules: Vec<String>,
    /// VmFlags of the guest RAM mapping(s) (distinct values seen).
    pub guest_vmflags: Vec<String>,
    /// The largest non-guest mappings of the run whose overhead is closest to the median.
    pub largest_other: Vec<MappingInfo>,
}

/// Summarises the samples of `vmm`.
pub fn summarize(vmm: Vmm, samples: &[BootSample]) -> VmmSummary {
    let mine: Vec<&BootSample> = samples.iter().filter(|s| s.vmm == vmm).collect();
    let ok: Vec<&BootSample> = mine.iter().copied().filter(|s| s.ok()).collect();
    let collect = |f: &dyn Fn(&BootSample) -> Option<f64>| -> Option<Summary> {
        stats::summarize(&ok.iter().filter_map(|s| f(s)).collect::<Vec<_>>())
    };
    let mut exit_statuses = BTreeMap::new();
    for s in &mine {
        let key = match &s.probe {
            Some(p) => match (p.exit_code, p.exit_signal) {
                (Some(c), _) => c.to_string(),
                (None, Some(sig)) => format!("signal {sig}"),
                (None, None) => "none".into(),
            },
            None => "no record".into(),
        };
        *exit_statuses.entry(key).or_insert(0) += 1;
    }
    let overhead = collect(&|s| s.mem(|m| m.overhead_kb).map(mib));
    let mut guest_rules = Vec::new();
    let mut guest_vmflags = Vec::new();
    for s in &ok {
        if let Some(m) = s.probe.as_ref().and_then(|p| p.memory.as_ref()) {
            let rule = m
                .guest_rule
                .clone()
                .unwrap_or_else(|| "guest RAM mapping not found".into());
            if !guest_rules.contains(&rule) {
                guest_rules.push(rule);
            }
            for g in &m.guest_mappings {
                if !guest_vmflags.contains(&g.vmflags) {
                    guest_vmflags.push(g.vmflags.clone());
                }
            }
        }
    }
    let representative = overhead.and_then(|o| {
        ok.iter()
            .filter_map(|s| {
                s.mem(|m| m.overhead_kb)
                    .map(|kb| (s, (mib(kb) - o.median).abs()))
            })
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| *s)
    });
    VmmSummary {
        vmm,
        runs: mine.len(),
        ok: ok.len(),
        failed: mine
            .iter()
            .filter_map(|s| s.failure.as_ref().map(|f| format!("{}: {f}", s.job)))
            .collect(),
        first_output_ms: collect(&|s| s.probe.as_ref()?.first_output_ms),
        kernel_banner_ms: collect(&|s| s.probe.as_ref()?.kernel_banner_ms),
        start_to_init_ms: collect(&|s| s.probe.as_ref()?.start_to_init_ms),
        guest_uptime_s: collect(&|s| s.probe.as_ref()?.guest_uptime_s),
        rss_mib: collect(&|s| s.mem(|m| Some(mib(m.smaps_rss_kb)))),
        guest_rss_mib: collect(&|s| s.mem(|m| m.guest_rss_kb).map(mib)),
        overhead_mib: overhead,
        hwm_mib: collect(&|s| s.mem(|m| m.vm_hwm_kb).map(mib)),
        total_ms: collect(&|s| Some(s.probe.as_ref()?.total_ms)),
        exit_statuses,
        guest_rules,
        guest_vmflags,
        largest_other: representative
            .and_then(|s| s.probe.as_ref()?.memory.as_ref())
            .map(|m| m.largest_other.clone())
            .unwrap_or_default(),
    }
}

/// Facts about the nested host the runs were made in.
#[derive(Debug, Clone, Serialize)]
pub struct NestedHostFacts {
    /// Kernel of the nested host, which is also the guest kernel.
    pub kernel: String,
    /// QEMU CPU model emulated by TCG.
    pub cpu_model: String,
    /// vCPUs of the nested host.
    pub cpus: u32,
    /// Memory of the nested host, MiB.
    pub memory_mib: u32,
    /// QEMU start to the nested host's readiness, s.
    pub ready_after_s: f64,
    /// Wall time of the whole sandbox run, s.
    pub total_s: f64,
    /// Attempts (2 after a retried infrastructure failure).
    pub attempts: u32,
    /// Infrastructure failures that were retried.
    pub retried_after: Vec<String>,
    /// Console log of the run.
    pub log: PathBuf,
    /// A reminder of what the numbers are worth.
    pub note: String,
}

/// Ratios quantix/QEMU of the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// Spawn to init.
    pub start_to_init: Option<f64>,
    /// Guest uptime at init.
    pub guest_uptime: Option<f64>,
    /// Total RSS.
    pub rss: Option<f64>,
    /// Overhead.
    pub overhead: Option<f64>,
}

/// Everything `boot` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BootResults {
    /// Always `boot`.
    pub benchmark: &'static str,
    /// When (UTC).
    pub date: String,
    /// The settings.
    pub options: BootOptions,
    /// This machine.
    pub host: report::HostFacts,
    /// The nested host.
    pub nested_host: NestedHostFacts,
    /// The exact VMM command lines (as run by the probe inside the nested host).
    pub commands: BTreeMap<String, String>,
    /// Every run, in order.
    pub samples: Vec<BootSample>,
    /// Per VMM.
    pub quantix: VmmSummary,
    /// Per VMM.
    pub qemu: VmmSummary,
    /// quantix / QEMU.
    pub ratios: Ratios,
    /// The targets.
    pub targets: Vec<Target>,
}

/// Runs the benchmark: builds the static binaries, runs all jobs in one nested host,
/// collects the samples.
pub fn run(o: &BootOptions) -> Result<BootResults, BenchError> {
    let sandbox = Sandbox::from_env()?;
    eprintln!("quantix-bench: building static quantix-vmm and qx-probe for the nested host");
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm")?;
    let probe = build::static_binary("quantix-bench", "qx-probe")?;
    let mut payload = Payload::new();
    payload.add_file(&vmm, VMM_PATH)?;
    payload.add_file(&probe, PROBE_PATH)?;
    payload.add_qemu(sandbox.assets())?;
    let plan = jobs(o);
    let job_list: Vec<Job> = plan.iter().map(|(_, _, j)| j.clone()).collect();
    eprintln!(
        "quantix-bench: {} runs in one nested host (TCG; this takes several minutes), alternating quantix/qemu",
        job_list.len()
    );
    let report = sandbox.run(&payload, &job_list)?;
    Ok(collect(o, &sandbox, &plan, &report))
}

fn collect(
    o: &BootOptions,
    sandbox: &Sandbox,
    plan: &[(Vmm, u32, Job)],
    report: &Report,
) -> BootResults {
    let samples: Vec<BootSample> = plan
        .iter()
        .enumerate()
        .map(|(order, (vmm, i, job))| match report.job(&job.name) {
            Some(r) => sample_from_job(*vmm, *i, order, r, &report.console, o.console),
            None => BootSample {
                vmm: *vmm,
                iteration: *i,
                order,
                job: job.name.clone(),
                job_status: None,
                job_timed_out: false,
                job_elapsed_ms: 0.0,
                probe: None,
                guest: None,
                failure: Some("the sandbox returned no result for this job".into()),
                output_tail: None,
            },
        })
        .collect();
    let quantix = summarize(Vmm::Quantix, &samples);
    let qemu = summarize(Vmm::Qemu, &samples);
    let med = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
    let ratios = Ratios {
        start_to_init: ratio(med(&quantix.start_to_init_ms), med(&qemu.start_to_init_ms)),
        guest_uptime: ratio(med(&quantix.guest_uptime_s), med(&qemu.guest_uptime_s)),
        rss: ratio(med(&quantix.rss_mib), med(&qemu.rss_mib)),
        overhead: ratio(med(&quantix.overhead_mib), med(&qemu.overhead_mib)),
    };
    let targets = targets(&quantix, &ratios);
    let config = sandbox.config();
    let commands = [Vmm::Quantix, Vmm::Qemu]
        .iter()
        .map(|v| (v.name().to_string(), shell_words(&vmm_argv(*v, o))))
        .collect();
    BootResults {
        benchmark: "boot",
        date: report::now_utc(),
        options: o.clone(),
        host: report::HostFacts::read(),
        nested_host: NestedHostFacts {
            kernel: sandbox.assets().kernel_version.clone(),
            cpu_model: config.cpu_model.clone(),
            cpus: config.cpus,
            memory_mib: config.memory_mib,
            ready_after_s: report.host_ready_after.as_secs_f64(),
            total_s: report.total.as_secs_f64(),
            attempts: report.attempts,
            retried_after: report.retried_after.clone(),
            log: report.log_path.clone(),
            note: "timings come from a nested host emulated by QEMU TCG: absolute numbers are \
                   many times slower than on hardware and vary ±30 % between runs; only \
                   ratios between VMMs measured in the same nested host mean something"
                .into(),
        },
        commands,
        samples,
        quantix,
        qemu,
        ratios,
        targets,
    }
}

/// The two `boot` targets, judged on medians.
pub fn targets(quantix: &VmmSummary, ratios: &Ratios) -> Vec<Target> {
    let boot = Target {
        target: format!("boot-to-init ≤ {BOOT_RATIO_TARGET} × QEMU's"),
        measured: match ratios.start_to_init {
            Some(r) => format!("quantix/QEMU = {r:.2} (medians of start→init)"),
            None => "not measured (no successful runs of one VMM)".into(),
        },
        met: ratios.start_to_init.map(|r| r <= BOOT_RATIO_TARGET),
    };
    let overhead = Target {
        target: format!("VMM memory overhead < {OVERHEAD_TARGET_MIB} MiB"),
        measured: match &quantix.overhead_mib {
            Some(s) => format!("quantix-vmm median {:.2} MiB (max {:.2})", s.median, s.max),
            None => "not measured".into(),
        },
        met: quantix
            .overhead_mib
            .as_ref()
            .map(|s| s.median < OVERHEAD_TARGET_MIB),
    };
    let first = Target {
        target: "process start → first guest instruction < 10 ms".into(),
        measured: "see `quantix-bench first-insn`".into(),
        met: None,
    };
    vec![boot, overhead, first]
}

/// The readable report.
pub fn format(r: &BootResults) -> String {
    let o = &r.options;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "quantix-bench boot — {}\n{} runs per VMM, alternating (quantix first), {} vCPU(s), {} MiB, kernel {}, cmdline '{}'",
        r.date,
        o.iterations,
        o.cpus,
        o.memory_mib,
        o.kernel.path(),
        o.cmdline()
    );
    let n = &r.nested_host;
    let _ = writeln!(
        s,
        "nested host: Linux {} under QEMU TCG (-cpu {}, {} vCPU, {} MiB), ready after {:.1} s, whole run {:.0} s, attempt(s) {}; log {}",
        n.kernel,
        n.cpu_model,
        n.cpus,
        n.memory_mib,
        n.ready_after_s,
        n.total_s,
        n.attempts,
        n.log.display()
    );
    for retried in &n.retried_after {
        let _ = writeln!(s, "  retried after an infrastructure failure: {retried}");
    }
    let _ = writeln!(s, "NOTE: {}.", n.note);
    let _ = writeln!(
        s,
        "this machine: Linux {}, {} CPUs ({}), /dev/kvm from {}; workspace at {}",
        r.host.kernel, r.host.cpus, r.host.cpu_model, r.host.kvm_module, r.host.revision
    );
    for (name, cmd) in &r.commands {
        let _ = writeln!(s, "command {name}: {cmd}");
    }
    s.push('\n');

    let (q, m) = (&r.quantix, &r.qemu);
    let _ = writeln!(
        s,
        "{:<26} {:>29}   {:>29}",
        "",
        format!("{:-^29}", format!(" {} ", Vmm::Quantix.title())),
        format!("{:-^29}", format!(" {} ", Vmm::Qemu.title()))
    );
    let _ = writeln!(
        s,
        "{:<26} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
        "", "median", "min", "max", "median", "min", "max"
    );
    let rows: [(&str, &Option<Summary>, &Option<Summary>, usize); 8] = [
        (
            "start→init (ms)",
            &q.start_to_init_ms,
            &m.start_to_init_ms,
            0,
        ),
        (
            "start→kernel banner (ms)",
            &q.kernel_banner_ms,
            &m.kernel_banner_ms,
            0,
        ),
        (
            "guest uptime at init (s)",
            &q.guest_uptime_s,
            &m.guest_uptime_s,
            2,
        ),
        ("VMM RSS at init (MiB)", &q.rss_mib, &m.rss_mib, 1),
        (
            "  guest RAM RSS (MiB)",
            &q.guest_rss_mib,
            &m.guest_rss_mib,
            1,
        ),
        ("  overhead (MiB)", &q.overhead_mib, &m.overhead_mib, 2),
        ("VmHWM at init (MiB)", &q.hwm_mib, &m.hwm_mib, 1),
        ("start→exit (ms)", &q.total_ms, &m.total_ms, 0),
    ];
    for (label, a, b, d) in rows {
        let a = report::cells(a.as_ref(), d);
        let b = report::cells(b.as_ref(), d);
        let _ = writeln!(
            s,
            "{label:<26} {:>9} {:>9} {:>9}   {:>9} {:>9} {:>9}",
            a[0], a[1], a[2], b[0], b[1], b[2]
        );
    }
    let runs = |v: &VmmSummary| format!("{}/{} ok", v.ok, v.runs);
    let _ = writeln!(
        s,
        "{:<26} {:>29}   {:>29}",
        "runs counted",
        runs(q),
        runs(m)
    );
    let statuses = |v: &VmmSummary| {
        v.exit_statuses
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let _ = writeln!(
        s,
        "{:<26} {:>29}   {:>29}",
        "exit statuses",
        statuses(q),
        statuses(m)
    );
    s.push('\n');
    let fmt_ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    let _ = writeln!(
        s,
        "ratio quantix/QEMU of the medians: start→init {}, guest uptime at init {}, RSS {}, overhead {}",
        fmt_ratio(r.ratios.start_to_init),
        fmt_ratio(r.ratios.guest_uptime),
        fmt_ratio(r.ratios.rss),
        fmt_ratio(r.ratios.overhead)
    );
    s.push('\n');
    s.push_str(&report::format_targets(&r.targets));

    for v in [q, m] {
        let _ = writeln!(
            s,
            "\n{}: guest RAM identified as {}",
            v.vmm.title(),
            v.guest_rules.join(" / ")
        );
        if !v.guest_vmflags.is_empty() {
            let _ = writeln!(s, "  its VmFlags: {}", v.guest_vmflags.join(" / "));
        }
        if !v.largest_other.is_empty() {
            let _ = writeln!(
                s,
                "  largest other mappings by RSS (run with the median overhead):"
            );
            for mp in &v.largest_other {
                let _ = writeln!(
                    s,
                    "    {:>8} KiB RSS {:>9} KiB size  {} {}",
                    mp.rss_kb,
                    mp.size_kb,
                    mp.perms,
                    if mp.name.is_empty() {
                        "[anonymous]"
                    } else {
                        &mp.name
                    }
                );
            }
        }
    }

    let failed: Vec<&BootSample> = r.samples.iter().filter(|x| !x.ok()).collect();
    if !failed.is_empty() {
        let _ = writeln!(
            s,
            "\n{} run(s) failed and are excluded from the statistics:",
            failed.len()
        );
        for f in failed {
            let _ = writeln!(s, "  {}: {}", f.job, f.failure.as_deref().unwrap_or("?"));
        }
    }
    s
}

/// Fails when a VMM has no successful run: there is nothing to compare.
pub fn check_samples(r: &BootResults) -> Result<(), BenchError> {
    for v in [&r.quantix, &r.qemu] {
        if v.ok == 0 {
            return Err(BenchError::NoSamples {
                vmm: v.vmm.title().into(),
                detail: v.failed.join("; "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::MemorySnapshot;

    fn opts() -> BootOptions {
        BootOptions {
            iterations: 2,
            cpus: 2,
            memory_mib: 256,
            kernel: Kernel::Vmlinuz,
            run_timeout_s: 300,
            quiet: false,
            console: false,
        }
    }

    #[test]
    fn command_lines() {
        let o = opts();
        assert_eq!(
            shell_words(&vmm_argv(Vmm::Qemu, &o)),
            "/usr/bin/qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256 -smp 2 \
             -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel /guest/vmlinuz \
             -initrd /guest/initramfs.cpio -append 'console=ttyS0 qx.action=poweroff'"
        );
        assert_eq!(
            shell_words(&vmm_argv(Vmm::Quantix, &o)),
            "/payload/quantix-vmm --kernel /guest/vmlinuz --initramfs /guest/initramfs.cpio \
             --cpus 2 --memory 256 --cmdline 'console=ttyS0 qx.action=poweroff' --log-level warn"
        );
        let plan = jobs(&o);
        let names: Vec<&str> = plan.iter().map(|(_, _, j)| j.name.as_str()).collect();
        assert_eq!(names, ["quantix-1", "qemu-1", "quantix-2", "qemu-2"]);
        let j = &plan[1].2;
        assert_eq!(j.argv[..2], [PROBE_PATH, "--vmm"]);
        assert_eq!(j.argv[10], paths::QEMU);
        assert_eq!(j.timeout, Duration::from_secs(320));
        assert_eq!(shell_words(&["it's".into()]), r"'it'\''s'");
        let quiet = BootOptions {
            quiet: true,
            kernel: Kernel::Vmlinux,
            ..opts()
        };
        let argv = vmm_argv(Vmm::Qemu, &quiet);
        assert_eq!(
            argv.last().map(String::as_str),
            Some("console=ttyS0 qx.action=poweroff quiet")
        );
        assert!(argv.contains(&"/guest/vmlinux".to_string()));
    }

    fn record(vmm: Vmm, ms: f64, overhead_kb: u64) -> ProbeRecord {
        ProbeRecord {
            vmm: vmm.name().into(),
            label: "x".into(),
            guest_mib: 256,
            start_to_init_ms: Some(ms),
            init_line: Some(format!(
                "QX-GUEST-INIT cpus=2 memtotal_kb=200000 uptime={:.2} kernel=6.1.0-56-cloud-amd64",
                ms / 2000.0
            )),
            guest_uptime_s: Some(ms / 2000.0),
            memory: Some(MemorySnapshot {
                smaps_rss_kb: 40_000 + overhead_kb,
                guest_rss_kb: Some(40_000),
                overhead_kb: Some(overhead_kb),
                guest_rule: Some("the one".into()),
                ..MemorySnapshot::default()
            }),
            exit_code: Some(0),
            total_ms: ms + 1000.0,
            console_lines: 300,
            ..ProbeRecord::default()
        }
    }

    fn job(name: &str, output: String, status: i32) -> JobResult {
        JobResult {
            name: name.into(),
            status: Some(status),
            timed_out: false,
            output,
            elapsed: Duration::from_secs(10),
            timeout: Duration::from_secs(320),
        }
    }

    #[test]
    fn samples_summaries_failures_and_targets() {
        let q1 = record(Vmm::Quantix, 8000.0, 4 * 1024);
        let q2 = record(Vmm::Quantix, 10000.0, 6 * 1024);
        let m1 = record(Vmm::Qemu, 12000.0, 30 * 1024);
        let mut m2 = record(Vmm::Qemu, 1.0, 1);
        m2.exit_code = Some(1);
        let jobs = [
            (
                Vmm::Quantix,
                job("quantix-1", format!("QX-PROBE {}", q1.to_json()), 0),
            ),
            (
                Vmm::Qemu,
                job("qemu-1", format!("QX-PROBE {}", m1.to_json()), 0),
            ),
            (Vmm::Quantix, job("quantix-2", "lost\n".into(), 0)),
            (
                Vmm::Qemu,
                job("qemu-2", format!("QX-PROBE {}", m2.to_json()), 1),
            ),
        ];
        // quantix-2's line was broken out of its job output by a kernel message.
        let console = format!("[ 99.1] kvm: x[quantix-2] QX-PROBE {}\n", q2.to_json());
        let samples: Vec<BootSample> = jobs
            .iter()
            .enumerate()
            .map(|(i, (v, j))| sample_from_job(*v, 1 + i as u32 / 2, i, j, &console, false))
            .collect();
        assert!(samples[2].ok(), "{:?}", samples[2].failure);
        assert_eq!(samples[3].failure.as_deref(), Some("exit status 1"));
        assert_eq!(samples[0].guest.as_ref().unwrap().cpus, 2);

        let q = summarize(Vmm::Quantix, &samples);
        let m = summarize(Vmm::Qemu, &samples);
        assert_eq!((q.ok, q.runs, m.ok, m.runs), (2, 2, 1, 2));
        assert_eq!(q.start_to_init_ms.unwrap().median, 9000.0);
        assert_eq!(q.overhead_mib.unwrap().median, 5.0);
        assert_eq!(m.failed, ["qemu-2: exit status 1"]);
        assert_eq!(m.exit_statuses.get("1"), Some(&1));
        let ratios = Ratios {
            start_to_init: ratio(Some(9000.0), Some(12000.0)),
            guest_uptime: None,
            rss: None,
            overhead: None,
        };
        let t = targets(&q, &ratios);
        assert_eq!(t[0].met, Some(false)); // 0.75 > 0.7
        assert_eq!(t[1].met, Some(false)); // 5.0 is not < 5
        assert_eq!(t[2].met, None);

        let missing = sample_from_job(Vmm::Qemu, 3, 4, &job("qemu-3", "x".into(), 143), "", false);
        assert!(missing.failure.unwrap().contains("no QX-PROBE line"));
        assert!(missing.output_tail.is_some());
    }
}
