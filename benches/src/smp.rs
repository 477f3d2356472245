//! `smp`: a stress run of multi-vCPU boots, quantix-vmm and QEMU microvm alternating,
//! over several nested hosts, counting clean boots, vCPU faults, guest panics and
//! nested-host deaths for each VMM and vCPU count.
//!
//! It is a reliability tool, not a timing benchmark: every boot of Debian's cloud kernel
//! powers off right after its init reports the vCPUs it brought up, and what counts is
//! how each boot ended. A nested host that dies takes the rest of its jobs with it; the
//! job that was running is charged with the death and the next nested host starts.
//!
//! With `--trace`, the nested host's kernel traces KVM's shutdown exits (a triple fault
//! of a guest vCPU, with the guest RIP KVM saw before it reset the vCPU), the exceptions
//! KVM injected and the MSR accesses it refused; the trace of a failed boot is printed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use quantix_sandbox::{
    kvm_trace, GuestInit, HostDeath, InfraFailure, Job, JobResult, Payload, Sandbox, SandboxError,
};
use serde::Serialize;

use crate::boot::{guest_argv, shell_words, GuestBoot, Kernel, Vmm, GUEST_CMDLINE};
use crate::error::BenchError;
use crate::report;

// Every boot job is under test (QEMU's too), so any death of a nested host after the
// first boot began is a `SandboxError::HostDied`, charged to the running boot. The guest
// powers off right after its init reported (`boot::GUEST_CMDLINE`).

/// The settings of one stress run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SmpOptions {
    /// Nested hosts to boot, one after the other.
    pub hosts: u32,
    /// Boots per VMM and vCPU count in each nested host.
    pub rounds: u32,
    /// Guest vCPU counts, each booted `rounds` times per VMM and host.
    pub cpus: Vec<u32>,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Guest kernel.
    pub kernel: Kernel,
    /// Which VMMs boot (both by default, alternating).
    pub vmms: Vec<Vmm>,
    /// vCPUs of the nested host.
    pub host_cpus: u32,
    /// Extra arguments for the nested host kernel's command line.
    pub host_args: Vec<String>,
    /// Trace KVM's shutdown exits, injected exceptions and refused MSRs in the nested
    /// host, and keep the trace of every boot.
    pub trace: bool,
    /// Limit of one boot, seconds.
    pub boot_timeout_s: u64,
    /// quantix-vmm's `--log-level`.
    pub vmm_log_level: String,
}

/// How one boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Exited 0 after the guest's init reported every vCPU and powered off.
    Clean,
    /// A vCPU triple-faulted (quantix-vmm: exit status 3 or its `triple-fault` reason;
    /// QEMU: its KVM reported a shutdown, seen as a reset without the guest's poweroff).
    TripleFault,
    /// The guest kernel panicked.
    GuestPanic,
    /// The guest's init saw fewer vCPUs than it was given.
    MissingCpus,
    /// The boot did not end within its limit.
    Timeout,
    /// The nested host died (panicked, hung, exited) while this boot ran.
    HostDied,
    /// Any other failure (non-zero status, no init line).
    Failed,
}

impl Outcome {
    /// Every outcome, in table order.
    pub const ALL: [Outcome; 7] = [
        Outcome::Clean,
        Outcome::TripleFault,
        Outcome::GuestPanic,
        Outcome::MissingCpus,
        Outcome::Timeout,
        Outcome::HostDied,
        Outcome::Failed,
    ];

    /// Column title.
    pub fn title(self) -> &'static str {
        match self {
            Outcome::Clean => "clean",
            Outcome::TripleFault => "triple fault",
            Outcome::GuestPanic => "guest panic",
            Outcome::MissingCpus => "missing vCPUs",
            Outcome::Timeout => "timeout",
            Outcome::HostDied => "host died",
            Outcome::Failed => "other failure",
        }
    }
}

/// One boot.
#[derive(Debug, Clone, Serialize)]
pub struct BootRecord {
    /// 1-based nested host.
    pub host: u32,
    /// Sandbox job name.
    pub job: String,
    /// Which VMM.
    pub vmm: Vmm,
    /// Guest vCPUs.
    pub cpus: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Exit status, if it ended.
    pub status: Option<i32>,
    /// Wall time in the nested host, seconds.
    pub elapsed_s: f64,
    /// Guest uptime when its init ran, seconds.
    pub guest_uptime_s: Option<f64>,
    /// For a failed boot: the interesting lines of its output and, with `--trace`, of
    /// the KVM trace that followed it.
    pub detail: Option<String>,
}

/// One nested host.
#[derive(Debug, Clone, Serialize)]
pub struct HostRecord {
    /// 1-based index.
    pub host: u32,
    /// Wall time from start to end (or death), seconds.
    pub wall_s: f64,
    /// How it ended: `ok`, `died in <job>: <failure>`, or `infrastructure: <failure>`.
    pub end: String,
    /// The nested host's console log.
    pub log: Option<PathBuf>,
    /// Lines of the nested host's console that tell why it died (panic, oops, lockup).
    pub death: Option<String>,
}

/// Counts of one VMM at one vCPU count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    /// Boots started (every job that ran or was running when its host died).
    pub boots: u32,
    /// Per outcome.
    pub outcomes: BTreeMap<Outcome, u32>,
}

impl Tally {
    fn count(&self, o: Outcome) -> u32 {
        self.outcomes.get(&o).copied().unwrap_or(0)
    }
}

/// Everything one stress run found.
#[derive(Debug, Clone, Serialize)]
pub struct SmpResults {
    /// Always `smp`.
    pub benchmark: &'static str,
    /// When (UTC).
    pub date: String,
    /// The settings.
    pub options: SmpOptions,
    /// This machine.
    pub host: report::HostFacts,
    /// The nested host's stack.
    pub stack: Stack,
    /// The VMM command lines (for 4 vCPUs).
    pub commands: BTreeMap<String, String>,
    /// Every boot.
    pub boots: Vec<BootRecord>,
    /// Every nested host.
    pub hosts: Vec<HostRecord>,
    /// Counts by VMM and vCPU count.
    pub tallies: BTreeMap<String, Tally>,
    /// Wall time of the whole run, seconds.
    pub wall_s: f64,
}

/// The software the nested hosts ran on.
#[derive(Debug, Clone, Serialize)]
pub struct Stack {
    /// The QEMU that emulates the nested host.
    pub qemu: String,
    /// The QEMU that runs inside it as the reference VMM.
    pub reference_qemu: String,
    /// The nested host's kernel.
    pub host_kernel: String,
    /// The guest kernel.
    pub guest_kernel: String,
    /// The nested host's CPU model.
    pub cpu_model: String,
}

/// The command line of one boot.
pub fn vmm_argv(vmm: Vmm, cpus: u32, o: &SmpOptions) -> Vec<String> {
    guest_argv(
        vmm,
        &GuestBoot {
            kernel: o.kernel,
            cpus,
            memory_mib: o.memory_mib,
            cmdline: GUEST_CMDLINE,
            log_level: &o.vmm_log_level,
        },
    )
}

/// One planned job.
#[derive(Debug, Clone)]
struct Planned {
    job: Job,
    /// The boot it is, or `None` for a trace job.
    boot: Option<(Vmm, u32)>,
}

fn plan(o: &SmpOptions) -> Vec<Planned> {
    let mut jobs = Vec::new();
    if o.trace {
        jobs.push(Planned {
            job: kvm_trace::enable("trace-on", kvm_trace::Extra::ExceptionsAndMsrs),
            boot: None,
        });
    }
    // A vCPU count may be listed twice (`--cpus 4,4,8`): boots are numbered per VMM and count.
    let mut seq: BTreeMap<(Vmm, u32), u32> = BTreeMap::new();
    for _round in 1..=o.rounds {
        for &cpus in &o.cpus {
            for &vmm in &o.vmms {
                let n = seq.entry((vmm, cpus)).or_default();
                *n += 1;
                let name = format!("{}-{cpus}cpu-{n}", vmm.name());
                // Every boot is under test here, QEMU's too: retries are off, and a
                // death is charged to whichever boot was running.
                let job = Job::new(&name, vmm_argv(vmm, cpus, o))
                    .timeout(Duration::from_secs(o.boot_timeout_s));
                jobs.push(Planned {
                    job,
                    boot: Some((vmm, cpus)),
                });
                if o.trace {
                    jobs.push(Planned {
                        job: kvm_trace::take(&format!("trace-{name}")),
                        boot: None,
                    });
                }
            }
        }
    }
    jobs
}

/// Lines of a boot's output worth showing for a failure.
fn interesting(output: &str) -> String {
    const MARKS: [&str; 14] = [
        "triple",
        "Kernel panic",
        "BUG:",
        "Oops",
        "RIP:",
        "vCPU stopped",
        "rip=",
        "cs=",
        "KVM: entry failed",
        "error",
        "failed to boot",
        "do_boot_cpu",
        "QX-GUEST-INIT",
        "reason=",
    ];
    let lines: Vec<&str> = output
        .lines()
        .filter(|l| MARKS.iter().any(|m| l.contains(m)))
        .collect();
    let mut text = lines[lines.len().saturating_sub(30)..].join("\n");
    text.push_str("\n--- last lines ---\n");
    text.push_str(&crate::boot::tail(output, 12));
    text
}

/// How one finished boot ended.
pub fn classify(vmm: Vmm, cpus: u32, r: &JobResult) -> Outcome {
    let out = &r.output;
    if r.timed_out {
        return Outcome::Timeout;
    }
    if out.contains("Kernel panic") {
        return Outcome::GuestPanic;
    }
    let init = GuestInit::find(out);
    let powered_off = out.contains("reboot: Power down");
    match vmm {
        Vmm::Quantix | Vmm::QuantixJailed | Vmm::QuantixUnconfined => {
            if r.status == Some(3) || out.contains("reason=\"triple-fault\"") {
                return Outcome::TripleFault;
            }
        }
        Vmm::Qemu => {
            // QEMU turns a KVM shutdown exit into a reset, which -no-reboot makes an
            // exit with status 0: a boot that ends without the guest's poweroff.
            if r.status == Some(0) && !powered_off {
                return Outcome::TripleFault;
            }
        }
        // Not booted by `smp` (its `--only` does not offer them); no VMM-specific sign.
        Vmm::Firecracker | Vmm::CloudHypervisor => {}
    }
    match init {
        Some(i) if i.cpus < cpus => Outcome::MissingCpus,
        Some(_) if r.status == Some(0) => Outcome::Clean,
        _ => Outcome::Failed,
    }
}

fn tally_key(vmm: Vmm, cpus: u32) -> String {
    format!("{} {cpus} vCPUs", vmm.title())
}

/// Runs the stress: `hosts` nested hosts one after the other, each with the whole plan.
pub fn run(o: &SmpOptions) -> Result<SmpResults, BenchError> {
    let mut sandbox = Sandbox::from_env()?;
    {
        let c = sandbox.config_mut();
        c.cpus = o.host_cpus;
        c.extra_kernel_args = o.host_args.clone();
        // Every death is counted, never retried.
        c.retries = 0;
    }
    let mut payload = Payload::new();
    eprintln!("quantix-bench: building the static binaries for the nested host");
    crate::boot::add_vmms(&mut payload, &sandbox, &o.vmms)?;
    let planned = plan(o);
    let jobs: Vec<Job> = planned.iter().map(|p| p.job.clone()).collect();
    let boots_per_host = planned.iter().filter(|p| p.boot.is_some()).count();
    eprintln!(
        "quantix-bench: {} nested hosts x {boots_per_host} boots ({} vCPUs; {})",
        o.hosts,
        o.cpus
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        o.vmms
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join("/")
    );
    let started = Instant::now();
    let mut boots = Vec::new();
    let mut hosts = Vec::new();
    for host in 1..=o.hosts {
        let t = Instant::now();
        let (results, end, log, death) = match sandbox.run(&payload, &jobs) {
            Ok(report) => (report.jobs, "ok".to_string(), Some(report.log_path), None),
            Err(SandboxError::HostDied(d)) => {
                let HostDeath {
                    failure,
                    job,
                    in_job,
                    completed,
                    job_output_tail,
                    log,
                    death,
                    ..
                } = *d;
                let mut results = completed;
                let end = if in_job {
                    // The boot that was running is charged with the death.
                    results.push(JobResult {
                        name: job.clone(),
                        status: None,
                        timed_out: false,
                        output: job_output_tail,
                        elapsed: Duration::ZERO,
                        timeout: Duration::ZERO,
                    });
                    format!("died in {job}: {failure}")
                } else {
                    format!("died after {job}, between jobs: {failure}")
                };
                (results, end, Some(log), Some(death))
            }
            Err(SandboxError::Infrastructure {
                failure,
                log,
                console_tail,
                ..
            }) => {
                // Before any job under test: a QEMU-only or booting host.
                let dead_in = match &failure {
                    InfraFailure::HostHung { during, .. }
                    | InfraFailure::QemuExited { during, .. } => during.clone(),
                    _ => String::new(),
                };
                (
                    Vec::new(),
                    format!("infrastructure: {failure} {dead_in}"),
                    Some(log),
                    Some(quantix_sandbox::death::death_lines(&console_tail)),
                )
            }
            Err(e) => return Err(e.into()),
        };
        let died = end.starts_with("died in ");
        let last = results.len().saturating_sub(1);
        let mut trace_for: Option<usize> = None;
        for (i, r) in results.iter().enumerate() {
            let Some(p) = planned.iter().find(|p| p.job.name == r.name) else {
                continue;
            };
            match p.boot {
                Some((vmm, cpus)) => {
                    let outcome = if died && i == last {
                        Outcome::HostDied
                    } else {
                        classify(vmm, cpus, r)
                    };
                    let detail = (outcome != Outcome::Clean).then(|| interesting(&r.output));
                    boots.push(BootRecord {
                        host,
                        job: r.name.clone(),
                        vmm,
                        cpus,
                        outcome,
                        status: r.status,
                        elapsed_s: r.elapsed.as_secs_f64(),
                        guest_uptime_s: GuestInit::find(&r.output).map(|g| g.uptime_s),
                        detail,
                    });
                    trace_for = (outcome != Outcome::Clean).then_some(boots.len() - 1);
                }
                None => {
                    // A trace dump: attach it to the failed boot before it.
                    if let Some(b) = trace_for.take() {
                        let trace: Vec<&str> = r
                            .output
                            .lines()
                            .filter(|l| {
                                l.contains("kvm_exit")
                                    || l.contains("kvm_msr")
                                    || l.contains("kvm_inj_exception")
                            })
                            .collect();
                        if let Some(d) = boots[b].detail.as_mut() {
                            let _ = write!(
                                d,
                                "\n--- KVM trace (nested host) ---\n{}",
                                trace[trace.len().saturating_sub(40)..].join("\n")
                            );
                        }
                    }
                }
            }
        }
        eprintln!(
            "quantix-bench: nested host {host}/{}: {end} after {:.0} s",
            o.hosts,
            t.elapsed().as_secs_f64()
        );
        hosts.push(HostRecord {
            host,
            wall_s: t.elapsed().as_secs_f64(),
            end,
            log,
            death,
        });
    }
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    for &cpus in &o.cpus {
        for &vmm in &o.vmms {
            tallies.insert(tally_key(vmm, cpus), Tally::default());
        }
    }
    for b in &boots {
        let t = tallies.entry(tally_key(b.vmm, b.cpus)).or_default();
        t.boots += 1;
        *t.outcomes.entry(b.outcome).or_default() += 1;
    }
    let assets = sandbox.assets();
    let commands = o
        .vmms
        .iter()
        .map(|&v| (v.name().to_string(), shell_words(&vmm_argv(v, 4, o))))
        .collect();
    Ok(SmpResults {
        benchmark: "smp",
        date: report::now_utc(),
        options: o.clone(),
        host: report::HostFacts::read(),
        stack: Stack {
            qemu: qemu_version(&assets.host_qemu),
            reference_qemu: qemu_version(&assets.qemu),
            host_kernel: assets.host_kernel_version.clone(),
            guest_kernel: assets.kernel_version.clone(),
            cpu_model: sandbox.config().cpu_model.clone(),
        },
        commands,
        boots,
        hosts,
        tallies,
        wall_s: started.elapsed().as_secs_f64(),
    })
}

fn qemu_version(qemu: &std::path::Path) -> String {
    std::process::Command::new(qemu)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| qemu.display().to_string())
}

/// The report: one table of outcomes, the nested hosts that died, and every failed boot.
pub fn format(r: &SmpResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "SMP stress: {} nested hosts ({}; nested host kernel {}, {} vCPU(s) {}), guest kernel {}, \
         reference VMM {} -M microvm",
        r.options.hosts,
        r.stack.qemu,
        r.stack.host_kernel,
        r.options.host_cpus,
        r.stack.cpu_model,
        r.stack.guest_kernel,
        r.stack.reference_qemu
    );
    let _ = writeln!(
        s,
        "{} boots in {:.0} s; guest {} MiB, {:?} kernel\n",
        r.boots.len(),
        r.wall_s,
        r.options.memory_mib,
        r.options.kernel
    );
    let _ = write!(s, "{:<26} {:>6}", "VMM, guest vCPUs", "boots");
    for o in Outcome::ALL {
        let _ = write!(s, " {:>13}", o.title());
    }
    s.push('\n');
    for (key, t) in &r.tallies {
        let _ = write!(s, "{key:<26} {:>6}", t.boots);
        for o in Outcome::ALL {
            let _ = write!(s, " {:>13}", t.count(o));
        }
        s.push('\n');
    }
    let died: Vec<&HostRecord> = r.hosts.iter().filter(|h| h.end != "ok").collect();
    let _ = writeln!(
        s,
        "\nnested hosts: {} ran, {} died or hung",
        r.hosts.len(),
        died.len()
    );
    for h in died {
        let _ = writeln!(
            s,
            "\nnested host {}: {} (log {})\n{}",
            h.host,
            h.end,
            h.log
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            h.death.as_deref().unwrap_or("")
        );
    }
    for b in r.boots.iter().filter(|b| b.outcome != Outcome::Clean) {
        let _ = writeln!(
            s,
            "\nhost {} {}: {} (status {:?}, {:.1} s)\n{}",
            b.host,
            b.job,
            b.outcome.title(),
            b.status,
            b.elapsed_s,
            b.detail.as_deref().unwrap_or("")
        );
    }
    s
}

/// Exit status: failures are results, so the run fails only when nothing booted at all.
pub fn check(r: &SmpResults) -> Result<(), BenchError> {
    if r.boots.iter().any(|b| b.outcome == Outcome::Clean) {
        Ok(())
    } else {
        Err(BenchError::NoSamples {
            vmm: "any VMM".into(),
            detail: "no boot ended cleanly".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Option<i32>, output: &str) -> JobResult {
        JobResult {
            name: "x".into(),
            status,
            timed_out: false,
            output: output.into(),
            elapsed: Duration::from_secs(10),
            timeout: Duration::from_secs(100),
        }
    }

    const INIT4: &str =
        "QX-GUEST-INIT cpus=4 memtotal_kb=480696 uptime=9.44 kernel=6.1.0-48-cloud-amd64\n";

    #[test]
    fn boots_are_classified_by_how_they_ended() {
        let clean = format!("{INIT4}[ 11.7] reboot: Power down\n");
        assert_eq!(
            classify(Vmm::Quantix, 4, &result(Some(0), &clean)),
            Outcome::Clean
        );
        assert_eq!(
            classify(Vmm::Qemu, 4, &result(Some(0), &clean)),
            Outcome::Clean
        );
        assert_eq!(
            classify(Vmm::Quantix, 8, &result(Some(0), &clean)),
            Outcome::MissingCpus
        );
        assert_eq!(
            classify(
                Vmm::Quantix,
                4,
                &result(Some(3), "vCPU 2 triple-faulted reason=\"triple-fault\"")
            ),
            Outcome::TripleFault
        );
        // QEMU's reset after a shutdown exit: status 0 but no poweroff.
        assert_eq!(
            classify(Vmm::Qemu, 4, &result(Some(0), "[ 5.1] smp: Bringing up")),
            Outcome::TripleFault
        );
        assert_eq!(
            classify(
                Vmm::Quantix,
                4,
                &result(Some(6), "Kernel panic - not syncing: x")
            ),
            Outcome::GuestPanic
        );
        assert_eq!(
            classify(Vmm::Quantix, 4, &result(Some(1), "no such file")),
            Outcome::Failed
        );
        let mut timed = result(Some(143), &clean);
        timed.timed_out = true;
        assert_eq!(classify(Vmm::Quantix, 4, &timed), Outcome::Timeout);
    }

    #[test]
    fn plan_alternates_vmms_and_marks_qemu_as_reference() {
        let o = SmpOptions {
            hosts: 1,
            rounds: 2,
            cpus: vec![4, 8],
            memory_mib: 512,
            kernel: Kernel::Vmlinuz,
            vmms: vec![Vmm::Quantix, Vmm::Qemu],
            host_cpus: 1,
            host_args: Vec::new(),
            trace: true,
            boot_timeout_s: 300,
            vmm_log_level: "warn".into(),
        };
        let p = plan(&o);
        let boots: Vec<&Planned> = p.iter().filter(|p| p.boot.is_some()).collect();
        assert_eq!(boots.len(), 8);
        assert_eq!(p[0].job.name, "trace-on");
        assert!(!p[0].job.under_test());
        assert_eq!(boots[0].job.name, "quantix-4cpu-1");
        assert!(boots[0].job.under_test());
        assert_eq!(boots[1].job.name, "qemu-4cpu-1");
        // QEMU's boots are under test too: its deaths are counted, not retried away.
        assert!(boots[1].job.under_test());
        assert_eq!(boots[2].boot, Some((Vmm::Quantix, 8)));
        // Each boot is followed by its trace dump.
        assert_eq!(p[2].job.name, "trace-quantix-4cpu-1");
        // The second round numbers on.
        assert_eq!(boots[4].job.name, "quantix-4cpu-2");
        // A count listed twice gets distinct names.
        let twice = plan(&SmpOptions {
            cpus: vec![4, 4],
            rounds: 1,
            trace: false,
            ..o
        });
        let names: Vec<&str> = twice.iter().map(|p| p.job.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "quantix-4cpu-1",
                "qemu-4cpu-1",
                "quantix-4cpu-2",
                "qemu-4cpu-2"
            ]
        );
    }
}
