//! `boot`: boot-to-init time and VMM memory, quantix-vmm against QEMU microvm (and
//! Firecracker and Cloud Hypervisor when their binaries are given), all in one nested
//! host, alternating.

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
/// The guest kernel command line, for every VMM (Firecracker's ends the guest by a reset
/// instead: [`firecracker_cmdline`]).
pub const GUEST_CMDLINE: &str = "console=ttyS0 qx.action=poweroff";
/// Firecracker in the nested host (a peer, with its glibc libraries).
pub const FIRECRACKER_PATH: &str = "/payload/firecracker";
/// Firecracker's configuration file in the nested host (written for the run's options).
pub const FIRECRACKER_CONFIG: &str = "/payload/firecracker.json";
/// Cloud Hypervisor in the nested host (a peer, with its glibc libraries).
pub const CLOUD_HYPERVISOR_PATH: &str = "/payload/cloud-hypervisor";
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
    /// A Firecracker binary to compare with (`../shared/peers/firecracker`); none: no
    /// Firecracker runs.
    pub firecracker: Option<PathBuf>,
    /// A Cloud Hypervisor binary to compare with; none: no Cloud Hypervisor runs.
    pub cloud_hypervisor: Option<PathBuf>,
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
    /// Firecracker, a peer (`boot --firecracker PATH` only).
    #[value(skip)]
    Firecracker,
    /// Cloud Hypervisor, a peer (`boot --cloud-hypervisor PATH` only).
    #[value(skip)]
    CloudHypervisor,
}

impl Vmm {
    /// Short name (`quantix`, `qemu`): job names and the probe's `vmm` field.
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Quantix => "quantix",
            Vmm::Qemu => "qemu",
            Vmm::QuantixJailed => "quantix-jailed",
            Vmm::QuantixUnconfined => "quantix-unconfined",
            Vmm::Firecracker => "firecracker",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// Name in tables.
    pub fn title(self) -> &'static str {
        match self {
            Vmm::Quantix => "quantix-vmm",
            Vmm::Qemu => "QEMU microvm",
            Vmm::QuantixJailed => "quantix-vmm jailed",
            Vmm::QuantixUnconfined => "quantix-vmm unconfined",
            Vmm::Firecracker => "Firecracker",
            Vmm::CloudHypervisor => "Cloud Hypervisor",
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
        // Its guest, command line included, is in the configuration file
        // (`firecracker_config`). The log goes to /dev/null: without `--log-path` it would
        // share stdout with the serial console; a fatal error still reaches stderr.
        Vmm::Firecracker => vec![
            FIRECRACKER_PATH,
            "--no-api",
            "--config-file",
            FIRECRACKER_CONFIG,
            "--log-path",
            "/dev/null",
        ],
        Vmm::CloudHypervisor => vec![
            CLOUD_HYPERVISOR_PATH,
            "--kernel",
            kernel,
            "--initramfs",
            paths::GUEST_INITRAMFS,
            "--cmdline",
            "{cmdline}",
            "--cpus",
            "boot={cpus}",
            "--memory",
            "size={mem}M",
            "--serial",
            "tty",
            "--console",
            "off",
        ],
    };
    let argv = v.into_iter().map(|a| match a {
        "{cpus}" => g.cpus.to_string(),
        "{mem}" => g.memory_mib.to_string(),
        "{cmdline}" => g.cmdline.to_string(),
        "boot={cpus}" => format!("boot={}", g.cpus),
        "size={mem}M" => format!("size={}M", g.memory_mib),
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

/// Firecracker's guest command line for `cmdline`: Firecracker has no ACPI power-off, so
/// its guest's init reboots instead (`qx.action=reboot`) through the keyboard controller
/// (`reboot=k`), which ends the Firecracker process as a power-off ends the others.
pub fn firecracker_cmdline(cmdline: &str) -> String {
    let mut words: Vec<&str> = cmdline
        .split_whitespace()
        .map(|w| {
            if w == "qx.action=poweroff" {
                "qx.action=reboot"
            } else {
                w
            }
        })
        .collect();
    if !words.iter().any(|w| w.starts_with("reboot=")) {
        words.push("reboot=k");
    }
    words.join(" ")
}

/// Firecracker's configuration file for `g` (`--no-api --config-file`): the same kernel,
/// initramfs, vCPUs and memory as the other VMMs, no devices.
pub fn firecracker_config(g: &GuestBoot) -> String {
    serde_json::json!({
        "boot-source": {
            "kernel_image_path": g.kernel.path(),
            "initrd_path": paths::GUEST_INITRAMFS,
            "boot_args": firecracker_cmdline(g.cmdline),
        },
        "drives": [],
        "machine-config": {"vcpu_count": g.cpus, "mem_size_mib": g.memory_mib, "smt": false},
    })
    .to_string()
}

/// The guest of a `boot` run.
pub fn guest_boot<'a>(o: &BootOptions, cmdline: &'a str) -> GuestBoot<'a> {
    GuestBoot {
        kernel: o.kernel,
        cpus: o.cpus,
        memory_mib: o.memory_mib,
        cmdline,
        log_level: "warn",
    }
}

/// The VMM command line of a run.
pub fn vmm_argv(vmm: Vmm, o: &BootOptions) -> Vec<String> {
    guest_argv(vmm, &guest_boot(o, &o.cmdline()))
}

/// A VMM that was asked for and is not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Which VMM.
    pub vmm: Vmm,
    /// Why it is not run.
    pub reason: String,
}

/// The VMMs of a run, in their order within each iteration (quantix-vmm, QEMU, then the
/// peers whose binaries are given), and the peers that cannot boot this guest.
pub fn vmms(o: &BootOptions) -> (Vec<Vmm>, Vec<Skipped>) {
    let mut run = vec![Vmm::Quantix, Vmm::Qemu];
    let mut skipped = Vec::new();
    if o.firecracker.is_some() {
        run.push(Vmm::Firecracker);
    }
    if o.cloud_hypervisor.is_some() {
        if o.kernel == Kernel::Vmlinux {
            run.push(Vmm::CloudHypervisor);
        } else {
            skipped.push(Skipped {
                vmm: Vmm::CloudHypervisor,
                reason: "Cloud Hypervisor boots ELF kernels only (PVH): run with --kernel vmlinux"
                    .into(),
            });
        }
    }
    (run, skipped)
}

/// Adds the peers of `o` to `payload`: each binary with its shared libraries, and
/// Firecracker's configuration file.
pub fn add_peers(payload: &mut Payload, o: &BootOptions) -> Result<(), BenchError> {
    let (run, _) = vmms(o);
    for (vmm, path, dest) in [
        (Vmm::Firecracker, &o.firecracker, FIRECRACKER_PATH),
        (
            Vmm::CloudHypervisor,
            &o.cloud_hypervisor,
            CLOUD_HYPERVISOR_PATH,
        ),
    ] {
        let Some(path) = path.as_ref().filter(|_| run.contains(&vmm)) else {
            continue;
        };
        if !path.is_file() {
            return Err(BenchError::MissingPeer {
                vmm: vmm.title().into(),
                path: path.clone(),
            });
        }
        payload.add_host_binary(path, dest)?;
    }
    if run.contains(&Vmm::Firecracker) {
        let cmdline = o.cmdline();
        payload.add_bytes(
            FIRECRACKER_CONFIG,
            firecracker_config(&guest_boot(o, &cmdline)),
            0o644,
        )?;
    }
    Ok(())
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
    // A nested host that dies while only reference VMMs ran is the sandbox's failure.
    if vmm.is_quantix() {
        job
    } else {
        job.reference()
    }
}

/// The jobs of a whole benchmark: quantix, qemu, (firecracker, cloud-hypervisor,)
/// quantix, qemu...
pub fn jobs(o: &BootOptions) -> Vec<(Vmm, u32, Job)> {
    let (run, _) = vmms(o);
    (1..=o.iterations)
        .flat_map(|i| run.iter().map(move |&v| (v, i, probe_job(v, i, o))))
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

/// quantix-vmm against one other VMM: ratios quantix/other of the medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratios {
    /// The other VMM.
    pub against: Vmm,
    /// Spawn to init.
    pub start_to_init: Option<f64>,
    /// Guest uptime at init.
    pub guest_uptime: Option<f64>,
    /// Total RSS.
    pub rss: Option<f64>,
    /// Overhead.
    pub overhead: Option<f64>,
}

/// The best other VMM for one figure (lowest median), and quantix-vmm against it.
#[derive(Debug, Clone, Serialize)]
pub struct BestPeer {
    /// The figure (`start_to_init_ms`, `overhead_mib`).
    pub figure: &'static str,
    /// The VMM with the lowest median of the others.
    pub vmm: Vmm,
    /// Its median.
    pub median: f64,
    /// quantix-vmm's median.
    pub quantix: f64,
    /// quantix / best.
    pub ratio: f64,
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
    /// The exact VMM command lines (as run by the probe inside the nested host), and
    /// Firecracker's configuration file as `firecracker.json`.
    pub commands: BTreeMap<String, String>,
    /// Peers asked for that could not boot this guest.
    pub skipped: Vec<Skipped>,
    /// Every run, in order.
    pub samples: Vec<BootSample>,
    /// Per VMM, in the order of the runs (quantix-vmm first).
    pub vmms: Vec<VmmSummary>,
    /// quantix-vmm against every other VMM.
    pub ratios: Vec<Ratios>,
    /// quantix-vmm against the best of the others, boot time and memory overhead.
    pub best: Vec<BestPeer>,
    /// The targets.
    pub targets: Vec<Target>,
}

impl BootResults {
    /// The summary of `vmm`, if it ran.
    pub fn summary(&self, vmm: Vmm) -> Option<&VmmSummary> {
        self.vmms.iter().find(|s| s.vmm == vmm)
    }

    /// quantix-vmm against `vmm`, if both ran.
    pub fn ratios_against(&self, vmm: Vmm) -> Option<&Ratios> {
        self.ratios.iter().find(|r| r.against == vmm)
    }
}

/// Runs the benchmark: builds the static binaries, runs all jobs in one nested host,
/// collects the samples.
pub fn run(o: &BootOptions) -> Result<BootResults, BenchError> {
    let sandbox = Sandbox::from_env()?;
    let (run, skipped) = vmms(o);
    for s in &skipped {
        eprintln!("quantix-bench: {} skipped: {}", s.vmm.title(), s.reason);
    }
    eprintln!("quantix-bench: building static quantix-vmm and qx-probe for the nested host");
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm")?;
    let probe = build::static_binary("quantix-bench", "qx-probe")?;
    let mut payload = Payload::new();
    payload.add_file(&vmm, VMM_PATH)?;
    payload.add_file(&probe, PROBE_PATH)?;
    payload.add_qemu(sandbox.assets())?;
    add_peers(&mut payload, o)?;
    let plan = jobs(o);
    let job_list: Vec<Job> = plan.iter().map(|(_, _, j)| j.clone()).collect();
    eprintln!(
        "quantix-bench: {} runs in one nested host (TCG; this takes several minutes), alternating {}",
        job_list.len(),
        run.iter().map(|v| v.name()).collect::<Vec<_>>().join("/")
    );
    let report = sandbox.run(&payload, &job_list)?;
    Ok(collect(o, &sandbox, &plan, &report))
}

/// quantix-vmm's summary against `other`'s.
pub fn ratios(quantix: &VmmSummary, other: &VmmSummary) -> Ratios {
    let med = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
    Ratios {
        against: other.vmm,
        start_to_init: ratio(med(&quantix.start_to_init_ms), med(&other.start_to_init_ms)),
        guest_uptime: ratio(med(&quantix.guest_uptime_s), med(&other.guest_uptime_s)),
        rss: ratio(med(&quantix.rss_mib), med(&other.rss_mib)),
        overhead: ratio(med(&quantix.overhead_mib), med(&other.overhead_mib)),
    }
}

/// quantix-vmm against the other VMM with the lowest median of `figure`.
pub fn best_peer(
    summaries: &[VmmSummary],
    figure: &'static str,
    get: impl Fn(&VmmSummary) -> Option<&Summary>,
) -> Option<BestPeer> {
    let quantix = get(summaries.iter().find(|s| s.vmm == Vmm::Quantix)?)?.median;
    let (vmm, median) = summaries
        .iter()
        .filter(|s| !s.vmm.is_quantix())
        .filter_map(|s| get(s).map(|m| (s.vmm, m.median)))
        .min_by(|a, b| a.1.total_cmp(&b.1))?;
    (median > 0.0).then(|| BestPeer {
        figure,
        vmm,
        median,
        quantix,
        ratio: quantix / median,
    })
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
    let (run, skipped) = vmms(o);
    let summaries: Vec<VmmSummary> = run.iter().map(|v| summarize(*v, &samples)).collect();
    let config = sandbox.config();
    let mut commands: BTreeMap<String, String> = run
        .iter()
        .map(|v| (v.name().to_string(), shell_words(&vmm_argv(*v, o))))
        .collect();
    if run.contains(&Vmm::Firecracker) {
        commands.insert(
            "firecracker.json".into(),
            firecracker_config(&guest_boot(o, &o.cmdline())),
        );
    }
    let nested_host = NestedHostFacts {
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
    };
    results(o, nested_host, commands, skipped, samples, summaries)
}

/// Ratios, the best peers and the targets of `summaries` (quantix-vmm's first).
fn results(
    o: &BootOptions,
    nested_host: NestedHostFacts,
    commands: BTreeMap<String, String>,
    skipped: Vec<Skipped>,
    samples: Vec<BootSample>,
    summaries: Vec<VmmSummary>,
) -> BootResults {
    let quantix = summaries.iter().find(|s| s.vmm == Vmm::Quantix);
    let all_ratios: Vec<Ratios> = match quantix {
        Some(q) => summaries
            .iter()
            .filter(|s| !s.vmm.is_quantix())
            .map(|s| ratios(q, s))
            .collect(),
        None => Vec::new(),
    };
    let best = [
        best_peer(&summaries, "start_to_init_ms", |s| {
            s.start_to_init_ms.as_ref()
        }),
        best_peer(&summaries, "overhead_mib", |s| s.overhead_mib.as_ref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let targets = match quantix {
        Some(q) => targets(q, all_ratios.iter().find(|r| r.against == Vmm::Qemu)),
        None => Vec::new(),
    };
    BootResults {
        benchmark: "boot",
        date: report::now_utc(),
        options: o.clone(),
        host: report::HostFacts::read(),
        nested_host,
        commands,
        skipped,
        samples,
        vmms: summaries,
        ratios: all_ratios,
        best,
        targets,
    }
}

/// The `boot` targets, judged on medians: boot time against QEMU's, memory overhead.
pub fn targets(quantix: &VmmSummary, vs_qemu: Option<&Ratios>) -> Vec<Target> {
    let start_to_init = vs_qemu.and_then(|r| r.start_to_init);
    let boot = Target {
        target: format!("boot-to-init ≤ {BOOT_RATIO_TARGET} × QEMU's"),
        measured: match start_to_init {
            Some(r) => format!("quantix/QEMU = {r:.2} (medians of start→init)"),
            None => "not measured (no successful runs of one VMM)".into(),
        },
        met: start_to_init.map(|r| r <= BOOT_RATIO_TARGET),
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

/// Width of one VMM's column in the table: `median (min–max)`.
const COLUMN: usize = 24;

/// One table cell: the median, and the range when there is one.
fn cell(s: Option<&Summary>, decimals: usize) -> String {
    let [median, min, max] = report::cells(s, decimals);
    match s {
        Some(s) if s.n > 1 => format!("{median} ({min}–{max})"),
        _ => median,
    }
}

/// The readable report.
pub fn format(r: &BootResults) -> String {
    let o = &r.options;
    let mut s = String::new();
    let order = r
        .vmms
        .iter()
        .map(|v| v.vmm.name())
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        s,
        "quantix-bench boot — {}\n{} runs per VMM, alternating ({order}), {} vCPU(s), {} MiB, kernel {}, cmdline '{}'",
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
    for skipped in &r.skipped {
        let _ = writeln!(s, "skipped {}: {}", skipped.vmm.title(), skipped.reason);
    }
    s.push('\n');

    let _ = write!(s, "{:<26}", "median (min–max)");
    for v in &r.vmms {
        let _ = write!(s, " {:>COLUMN$}", v.vmm.title());
    }
    s.push('\n');
    type Figure = fn(&VmmSummary) -> Option<&Summary>;
    let rows: [(&str, Figure, usize); 8] = [
        ("start→init (ms)", |v| v.start_to_init_ms.as_ref(), 0),
        (
            "start→kernel banner (ms)",
            |v| v.kernel_banner_ms.as_ref(),
            0,
        ),
        ("guest uptime at init (s)", |v| v.guest_uptime_s.as_ref(), 2),
        ("VMM RSS at init (MiB)", |v| v.rss_mib.as_ref(), 1),
        ("  guest RAM RSS (MiB)", |v| v.guest_rss_mib.as_ref(), 1),
        ("  overhead (MiB)", |v| v.overhead_mib.as_ref(), 2),
        ("VmHWM at init (MiB)", |v| v.hwm_mib.as_ref(), 1),
        ("start→exit (ms)", |v| v.total_ms.as_ref(), 0),
    ];
    for (label, figure, decimals) in rows {
        let _ = write!(s, "{label:<26}");
        for v in &r.vmms {
            let _ = write!(s, " {:>COLUMN$}", cell(figure(v), decimals));
        }
        s.push('\n');
    }
    let _ = write!(s, "{:<26}", "runs counted");
    for v in &r.vmms {
        let _ = write!(s, " {:>COLUMN$}", format!("{}/{} ok", v.ok, v.runs));
    }
    s.push('\n');
    let _ = write!(s, "{:<26}", "exit statuses");
    for v in &r.vmms {
        let statuses = v
            .exit_statuses
            .iter()
            .map(|(k, n)| format!("{k} ×{n}"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = write!(s, " {statuses:>COLUMN$}");
    }
    s.push_str("\n\n");
    let fmt_ratio = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
    for ra in &r.ratios {
        let _ = writeln!(
            s,
            "ratio quantix/{} of the medians: start→init {}, guest uptime at init {}, RSS {}, overhead {}",
            ra.against.name(),
            fmt_ratio(ra.start_to_init),
            fmt_ratio(ra.guest_uptime),
            fmt_ratio(ra.rss),
            fmt_ratio(ra.overhead)
        );
    }
    for b in &r.best {
        let (label, decimals) = match b.figure {
            "start_to_init_ms" => ("start→init (ms)", 0),
            "overhead_mib" => ("overhead (MiB)", 2),
            other => (other, 2),
        };
        let _ = writeln!(
            s,
            "against the best of the others, {label}: quantix-vmm {:.decimals$} vs {} {:.decimals$}, ratio {:.2}",
            b.quantix,
            b.vmm.title(),
            b.median,
            b.ratio
        );
    }
    s.push('\n');
    s.push_str(&report::format_targets(&r.targets));

    for v in &r.vmms {
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

/// Fails when a VMM that ran has no successful run: there is nothing to compare.
pub fn check_samples(r: &BootResults) -> Result<(), BenchError> {
    for v in &r.vmms {
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
            firecracker: None,
            cloud_hypervisor: None,
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
        let ratios = ratios(&q, &m);
        assert_eq!(ratios.against, Vmm::Qemu);
        assert_eq!(ratios.start_to_init, Some(0.75));
        let t = targets(&q, Some(&ratios));
        assert_eq!(t[0].met, Some(false)); // 0.75 > 0.7
        assert_eq!(t[1].met, Some(false)); // 5.0 is not < 5
        assert_eq!(t[2].met, None);

        let missing = sample_from_job(Vmm::Qemu, 3, 4, &job("qemu-3", "x".into(), 143), "", false);
        assert!(missing.failure.unwrap().contains("no QX-PROBE line"));
        assert!(missing.output_tail.is_some());
    }

    fn peers() -> BootOptions {
        BootOptions {
            kernel: Kernel::Vmlinux,
            firecracker: Some("/x/firecracker".into()),
            cloud_hypervisor: Some("/x/cloud-hypervisor".into()),
            ..opts()
        }
    }

    #[test]
    fn peer_command_lines_and_plan() {
        let o = peers();
        assert_eq!(
            shell_words(&vmm_argv(Vmm::CloudHypervisor, &o)),
            "/payload/cloud-hypervisor --kernel /guest/vmlinux --initramfs /guest/initramfs.cpio \
             --cmdline 'console=ttyS0 qx.action=poweroff' --cpus boot=2 --memory size=256M \
             --serial tty --console off"
        );
        assert_eq!(
            shell_words(&vmm_argv(Vmm::Firecracker, &o)),
            "/payload/firecracker --no-api --config-file /payload/firecracker.json --log-path /dev/null"
        );
        let cmdline = o.cmdline();
        let cfg: serde_json::Value =
            serde_json::from_str(&firecracker_config(&guest_boot(&o, &cmdline))).unwrap();
        assert_eq!(cfg["boot-source"]["kernel_image_path"], "/guest/vmlinux");
        assert_eq!(cfg["boot-source"]["initrd_path"], paths::GUEST_INITRAMFS);
        assert_eq!(
            cfg["boot-source"]["boot_args"],
            "console=ttyS0 qx.action=reboot reboot=k"
        );
        assert_eq!(cfg["machine-config"]["vcpu_count"], 2);
        assert_eq!(cfg["machine-config"]["mem_size_mib"], 256);
        assert_eq!(cfg["drives"], serde_json::json!([]));
        // A command line that already chooses a reboot method keeps it.
        assert_eq!(
            firecracker_cmdline("console=ttyS0 reboot=t qx.action=poweroff quiet"),
            "console=ttyS0 reboot=t qx.action=reboot quiet"
        );

        let (run, skipped) = vmms(&o);
        assert_eq!(
            run,
            [
                Vmm::Quantix,
                Vmm::Qemu,
                Vmm::Firecracker,
                Vmm::CloudHypervisor
            ]
        );
        assert!(skipped.is_empty());
        let plan = jobs(&o);
        let names: Vec<&str> = plan.iter().map(|(_, _, j)| j.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "quantix-1",
                "qemu-1",
                "firecracker-1",
                "cloud-hypervisor-1",
                "quantix-2",
                "qemu-2",
                "firecracker-2",
                "cloud-hypervisor-2"
            ]
        );
        // Peers are reference software: a nested host that dies under them alone is the
        // sandbox's failure, as under QEMU.
        assert!(!plan[2].2.under_test());
        assert!(plan[0].2.under_test());

        // Cloud Hypervisor cannot boot a bzImage: skipped with the reason, not run.
        let bz = BootOptions {
            kernel: Kernel::Vmlinuz,
            ..peers()
        };
        let (run, skipped) = vmms(&bz);
        assert_eq!(run, [Vmm::Quantix, Vmm::Qemu, Vmm::Firecracker]);
        assert_eq!(skipped[0].vmm, Vmm::CloudHypervisor);
        assert!(skipped[0].reason.contains("--kernel vmlinux"));
        // Without peers: quantix and QEMU only.
        assert_eq!(vmms(&opts()).0, [Vmm::Quantix, Vmm::Qemu]);
    }

    #[test]
    fn a_missing_peer_binary_is_named() {
        let o = BootOptions {
            firecracker: Some("/nonexistent/firecracker".into()),
            ..opts()
        };
        let e = add_peers(&mut Payload::new(), &o).unwrap_err();
        assert!(matches!(e, BenchError::MissingPeer { .. }));
        assert!(e.to_string().contains("/nonexistent/firecracker"), "{e}");
    }

    #[test]
    fn the_io_benchmarks_refuse_peers() {
        let e = crate::iobench::vmm_argv(Vmm::Firecracker, "/i", "c", 1, 64, &[], &[]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the I/O benchmarks (block, net) cannot run Firecracker"
        );
    }

    #[test]
    fn results_compare_against_every_vmm_and_the_best() {
        let o = peers();
        let mut samples = Vec::new();
        for (i, (vmm, ms, overhead_kb)) in [
            (Vmm::Quantix, 9000.0, 2048),
            (Vmm::Qemu, 12000.0, 40 * 1024),
            (Vmm::Firecracker, 10000.0, 3 * 1024),
            (Vmm::CloudHypervisor, 9500.0, 6 * 1024),
        ]
        .into_iter()
        .enumerate()
        {
            let r = record(vmm, ms, overhead_kb);
            let j = job(
                &format!("{}-1", vmm.name()),
                format!("QX-PROBE {}", r.to_json()),
                0,
            );
            samples.push(sample_from_job(vmm, 1, i, &j, "", false));
        }
        // A Firecracker run that failed counts in `runs`, not in the medians.
        let failed = job("firecracker-2", "QX-PROBE {}".into(), 1);
        samples.push(sample_from_job(Vmm::Firecracker, 2, 4, &failed, "", false));
        let (run, skipped) = vmms(&o);
        let summaries = run.iter().map(|v| summarize(*v, &samples)).collect();
        let nested = NestedHostFacts {
            kernel: "k".into(),
            cpu_model: "EPYC".into(),
            cpus: 1,
            memory_mib: 3072,
            ready_after_s: 1.0,
            total_s: 2.0,
            attempts: 1,
            retried_after: Vec::new(),
            log: "/log".into(),
            note: "n".into(),
        };
        let r = results(&o, nested, BTreeMap::new(), skipped, samples, summaries);
        assert_eq!(r.vmms.len(), 4);
        assert_eq!(
            r.summary(Vmm::Firecracker).map(|s| (s.ok, s.runs)),
            Some((1, 2))
        );
        let against: Vec<Vmm> = r.ratios.iter().map(|x| x.against).collect();
        assert_eq!(against, [Vmm::Qemu, Vmm::Firecracker, Vmm::CloudHypervisor]);
        assert_eq!(
            r.ratios_against(Vmm::Firecracker).unwrap().start_to_init,
            Some(0.9)
        );
        // The best of the others: Cloud Hypervisor for boot time, Firecracker for memory.
        assert_eq!(r.best[0].figure, "start_to_init_ms");
        assert_eq!(r.best[0].vmm, Vmm::CloudHypervisor);
        assert!((r.best[0].ratio - 9000.0 / 9500.0).abs() < 1e-9);
        assert_eq!(r.best[1].figure, "overhead_mib");
        assert_eq!(r.best[1].vmm, Vmm::Firecracker);
        assert!((r.best[1].ratio - 2.0 / 3.0).abs() < 1e-9);
        // The QEMU target is still judged against QEMU, not against the best peer.
        assert_eq!(r.targets[0].met, Some(false)); // 9000 / 12000 = 0.75 > 0.7
        assert!(r.targets[0].measured.contains("quantix/QEMU = 0.75"));
        let text = format(&r);
        for title in [
            "quantix-vmm",
            "QEMU microvm",
            "Firecracker",
            "Cloud Hypervisor",
        ] {
            assert!(text.contains(title), "{title} missing in\n{text}");
        }
        assert!(text.contains("ratio quantix/firecracker of the medians: start→init 0.90"));
        assert!(
            text.contains("start→init (ms): quantix-vmm 9000 vs Cloud Hypervisor 9500, ratio 0.95"),
            "{text}"
        );
        assert!(
            text.contains("overhead (MiB): quantix-vmm 2.00 vs Firecracker 3.00, ratio 0.67"),
            "{text}"
        );
        assert!(
            text.contains("firecracker-2:"),
            "the failed run is listed:\n{text}"
        );
        assert!(check_samples(&r).is_ok());
    }
}
