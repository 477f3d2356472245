//! What `block` and `net` share: the samples `qx-io` reports, their statistics per test
//! and VMM, the ratios quantix-vmm / QEMU, the target, the table.

use std::fmt::Write as _;
use std::path::PathBuf;

use quantix_sandbox::{JobResult, Report, Sandbox};
use serde::Serialize;

use crate::boot::Vmm;
use crate::iorecord::{self, get_f64, get_u64, Record, CPU_MARKER, IO_MARKER};
use crate::report::{self, ratio, Target};
use crate::stats::{self, Summary};

/// Whether a test measures throughput (higher is better) or latency (lower is better).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// MB/s (and IOPS for block tests); CPU per GB moved.
    Throughput,
    /// Round-trip µs; CPU per round trip.
    Latency,
}

/// One measurement of one test in one VMM run.
#[derive(Debug, Clone, Serialize)]
pub struct IoSample {
    /// Which VMM.
    pub vmm: Vmm,
    /// 1-based VMM run.
    pub iteration: u32,
    /// Test id (`read-4k`, `host-to-guest`, ...).
    pub test: String,
    /// Throughput, MB/s.
    pub mbps: Option<f64>,
    /// Requests per second (block tests).
    pub iops: Option<f64>,
    /// Median round trip, µs (latency tests).
    pub rtt_median_us: Option<f64>,
    /// 99th percentile round trip, µs.
    pub rtt_p99_us: Option<f64>,
    /// Bytes moved, or round trips made.
    pub amount: u64,
    /// Host CPU time of the VMM process during the test (all threads), ms.
    pub cpu_ms: Option<f64>,
    /// Of that, time the vCPU threads spent running the guest, ms.
    pub guest_ms: Option<f64>,
}

impl IoSample {
    /// Builds a sample from a `QX-IO` record and the matching `QX-CPU` record (block
    /// tests; net records carry their own `cpu_ms`).
    pub fn from_records(
        vmm: Vmm,
        iteration: u32,
        io: &Record,
        cpu: Option<&Record>,
    ) -> Option<IoSample> {
        let test = io.get("id")?.clone();
        let amount = get_u64(io, "bytes").or_else(|| get_u64(io, "amount"))?;
        let cpu_src = cpu.unwrap_or(io);
        let s = IoSample {
            vmm,
            iteration,
            test,
            mbps: get_f64(io, "mbps"),
            iops: get_f64(io, "iops"),
            rtt_median_us: get_f64(io, "rtt_median_us"),
            rtt_p99_us: get_f64(io, "rtt_p99_us"),
            amount,
            cpu_ms: get_f64(cpu_src, "cpu_ms"),
            guest_ms: get_f64(cpu_src, "guest_ms"),
        };
        (s.mbps.is_some() || s.rtt_median_us.is_some()).then_some(s)
    }

    /// Host CPU per unit: s per GB (10^9 bytes) for throughput, µs per round trip for
    /// latency. `own`: without the time spent running the guest.
    pub fn cpu_per_unit(&self, kind: Kind, own: bool) -> Option<f64> {
        let ms = self.cpu_ms? - if own { self.guest_ms? } else { 0.0 };
        if self.amount == 0 {
            return None;
        }
        Some(match kind {
            Kind::Throughput => ms / 1000.0 / (self.amount as f64 / 1e9),
            Kind::Latency => ms * 1000.0 / self.amount as f64,
        })
    }
}

/// Every sample in one job's output: `QX-IO` lines, with `QX-CPU` lines matched by id.
pub fn samples_from_output(vmm: Vmm, iteration: u32, output: &str) -> Vec<IoSample> {
    let cpus = iorecord::find_all(output, CPU_MARKER);
    iorecord::find_all(output, IO_MARKER)
        .iter()
        .filter_map(|io| {
            let cpu = io
                .get("id")
                .and_then(|id| cpus.iter().find(|c| c.get("id") == Some(id)));
            IoSample::from_records(vmm, iteration, io, cpu)
        })
        .collect()
}

/// Statistics of one VMM's samples of one test.
#[derive(Debug, Clone, Serialize)]
pub struct VmmStats {
    /// Samples.
    pub n: usize,
    /// MB/s.
    pub mbps: Option<Summary>,
    /// IOPS.
    pub iops: Option<Summary>,
    /// Median round trip of each run, µs.
    pub rtt_median_us: Option<Summary>,
    /// p99 round trip of each run, µs.
    pub rtt_p99_us: Option<Summary>,
    /// Host CPU of the VMM per unit (s/GB, or µs per round trip).
    pub cpu_per_unit: Option<Summary>,
    /// The same without guest time.
    pub own_cpu_per_unit: Option<Summary>,
}

/// The statistics of `s` (one VMM's samples of one test).
pub fn vmm_stats(kind: Kind, s: &[&IoSample]) -> VmmStats {
    let col = |f: &dyn Fn(&IoSample) -> Option<f64>| -> Option<Summary> {
        stats::summarize(&s.iter().filter_map(|x| f(x)).collect::<Vec<_>>())
    };
    VmmStats {
        n: s.len(),
        mbps: col(&|x| x.mbps),
        iops: col(&|x| x.iops),
        rtt_median_us: col(&|x| x.rtt_median_us),
        rtt_p99_us: col(&|x| x.rtt_p99_us),
        cpu_per_unit: col(&|x| x.cpu_per_unit(kind, false)),
        own_cpu_per_unit: col(&|x| x.cpu_per_unit(kind, true)),
    }
}

/// One test, both VMMs.
#[derive(Debug, Clone, Serialize)]
pub struct TestSummary {
    /// Test id.
    pub test: String,
    /// Throughput or latency.
    pub kind: Kind,
    /// quantix-vmm.
    pub quantix: VmmStats,
    /// QEMU.
    pub qemu: VmmStats,
    /// quantix / QEMU of the median MB/s (throughput) or median round trip (latency).
    pub ratio_perf: Option<f64>,
    /// quantix / QEMU of the median CPU per unit.
    pub ratio_cpu: Option<f64>,
}

impl TestSummary {
    /// The target of the issue for this test: at least QEMU's throughput at no more host
    /// CPU (for latency: no slower round trips at no more CPU).
    pub fn target(&self) -> Target {
        let (what, perf_ok) = match self.kind {
            Kind::Throughput => ("throughput ≥ QEMU's", self.ratio_perf.map(|r| r >= 1.0)),
            Kind::Latency => ("round trip ≤ QEMU's", self.ratio_perf.map(|r| r <= 1.0)),
        };
        let cpu_ok = self.ratio_cpu.map(|r| r <= 1.0);
        let f = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.2}"));
        Target {
            target: format!("{}: {what} at ≤ QEMU's CPU", self.test),
            measured: format!(
                "ratio {} , CPU ratio {}",
                f(self.ratio_perf),
                f(self.ratio_cpu)
            ),
            met: match (perf_ok, cpu_ok) {
                (Some(a), Some(b)) => Some(a && b),
                (Some(false), None) => Some(false),
                _ => None,
            },
        }
    }
}

/// Summaries per test, in the order tests first appear in `samples`.
pub fn summarize(samples: &[IoSample], kind_of: impl Fn(&str) -> Kind) -> Vec<TestSummary> {
    let mut tests: Vec<&str> = Vec::new();
    for s in samples {
        if !tests.contains(&s.test.as_str()) {
            tests.push(&s.test);
        }
    }
    tests
        .into_iter()
        .map(|t| {
            let kind = kind_of(t);
            let of = |v: Vmm| -> Vec<&IoSample> {
                samples
                    .iter()
                    .filter(|s| s.test == t && s.vmm == v)
                    .collect()
            };
            let quantix = vmm_stats(kind, &of(Vmm::Quantix));
            let qemu = vmm_stats(kind, &of(Vmm::Qemu));
            let med = |s: &Option<Summary>| s.as_ref().map(|s| s.median);
            let ratio_perf = match kind {
                Kind::Throughput => ratio(med(&quantix.mbps), med(&qemu.mbps)),
                Kind::Latency => ratio(med(&quantix.rtt_median_us), med(&qemu.rtt_median_us)),
            };
            let ratio_cpu = ratio(med(&quantix.cpu_per_unit), med(&qemu.cpu_per_unit));
            TestSummary {
                test: t.to_string(),
                kind,
                quantix,
                qemu,
                ratio_perf,
                ratio_cpu,
            }
        })
        .collect()
}

/// One VMM run (a sandbox job) and what came of it.
#[derive(Debug, Clone, Serialize)]
pub struct RunOutcome {
    /// Which VMM.
    pub vmm: Vmm,
    /// 1-based.
    pub iteration: u32,
    /// Job name.
    pub job: String,
    /// Samples found in its output.
    pub samples: usize,
    /// Why the run is incomplete; `None` if it is not.
    pub failure: Option<String>,
    /// The end of its output, for a failed run.
    pub output_tail: Option<String>,
}

/// Judges every run of `plan` (VMM, iteration, job name) in `report`.
pub fn judge_all(
    report: &quantix_sandbox::Report,
    plan: &[(Vmm, u32, String)],
    expected: &[String],
) -> (Vec<RunOutcome>, Vec<IoSample>) {
    let mut samples = Vec::new();
    let mut runs = Vec::new();
    for (v, i, name) in plan {
        let (run, s) = judge_job(*v, *i, report.job(name), name, expected);
        runs.push(run);
        samples.extend(s);
    }
    (runs, samples)
}

/// Judges one job: its samples, and a failure if it did not succeed or some test is
/// missing.
pub fn judge_job(
    vmm: Vmm,
    iteration: u32,
    job: Option<&JobResult>,
    name: &str,
    expected: &[String],
) -> (RunOutcome, Vec<IoSample>) {
    let Some(job) = job else {
        return (
            RunOutcome {
                vmm,
                iteration,
                job: name.to_string(),
                samples: 0,
                failure: Some("the sandbox returned no result for this job".into()),
                output_tail: None,
            },
            Vec::new(),
        );
    };
    let samples = samples_from_output(vmm, iteration, &job.output);
    let missing: Vec<&str> = expected
        .iter()
        .filter(|t| !samples.iter().any(|s| &s.test == *t))
        .map(String::as_str)
        .collect();
    let failure = if !job.success() {
        Some(format!(
            "job status {}{}; missing tests: {}",
            job.status.map_or("none".into(), |s| s.to_string()),
            if job.timed_out { ", timed out" } else { "" },
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        ))
    } else if !missing.is_empty() {
        Some(format!("no result for {}", missing.join(", ")))
    } else {
        None
    };
    let tail = failure.as_ref().map(|_| {
        let lines: Vec<&str> = job.output.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    });
    (
        RunOutcome {
            vmm,
            iteration,
            job: job.name.clone(),
            samples: samples.len(),
            failure,
            output_tail: tail,
        },
        samples,
    )
}

/// The nested host of a run, in brief.
#[derive(Debug, Clone, Serialize)]
pub struct NestedHost {
    /// Kernel of the nested host (also the guest's).
    pub kernel: String,
    /// QEMU TCG CPU model.
    pub cpu_model: String,
    /// vCPUs.
    pub cpus: u32,
    /// MiB.
    pub memory_mib: u32,
    /// Whole run, s.
    pub total_s: f64,
    /// Attempts.
    pub attempts: u32,
    /// Console log.
    pub log: PathBuf,
}

impl NestedHost {
    /// One line for a report.
    pub fn summary(&self) -> String {
        format!(
            "nested host Linux {} under QEMU TCG (-cpu {}, {} vCPU, {} MiB), {:.0} s, attempt(s) {}; log {}",
            self.kernel,
            self.cpu_model,
            self.cpus,
            self.memory_mib,
            self.total_s,
            self.attempts,
            self.log.display()
        )
    }

    /// From the sandbox and its report.
    pub fn of(sandbox: &Sandbox, report: &Report) -> Self {
        let c = sandbox.config();
        NestedHost {
            kernel: sandbox.assets().kernel_version.clone(),
            cpu_model: c.cpu_model.clone(),
            cpus: c.cpus,
            memory_mib: c.memory_mib,
            total_s: report.total.as_secs_f64(),
            attempts: report.attempts,
            log: report.log_path.clone(),
        }
    }
}

fn cell(s: &Option<Summary>, d: usize) -> String {
    s.as_ref()
        .map_or("-".into(), |s| format!("{:.d$}", s.median))
}

fn range(s: &Option<Summary>, d: usize) -> String {
    s.as_ref()
        .map_or("".into(), |s| format!("{:.d$}–{:.d$}", s.min, s.max))
}

/// The table of medians (with min–max) and ratios.
pub fn format_table(tests: &[TestSummary]) -> String {
    let mut s = String::new();
    let thr: Vec<&TestSummary> = tests
        .iter()
        .filter(|t| t.kind == Kind::Throughput)
        .collect();
    let lat: Vec<&TestSummary> = tests.iter().filter(|t| t.kind == Kind::Latency).collect();
    let r = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    if !thr.is_empty() {
        let _ = writeln!(
            s,
            "{:<16} {:>3} | {:>20} {:>9} {:>8} {:>8} | {:>20} {:>9} {:>8} {:>8} | {:>6} {:>6}",
            "throughput",
            "n",
            "quantix MB/s (range)",
            "IOPS",
            "CPU s/GB",
            "own s/GB",
            "QEMU MB/s (range)",
            "IOPS",
            "CPU s/GB",
            "own s/GB",
            "MB/s÷",
            "CPU÷"
        );
        for t in thr {
            let (q, m) = (&t.quantix, &t.qemu);
            let _ = writeln!(
                s,
                "{:<16} {:>3} | {:>20} {:>9} {:>8} {:>8} | {:>20} {:>9} {:>8} {:>8} | {:>6} {:>6}",
                t.test,
                q.n.min(m.n),
                format!("{} ({})", cell(&q.mbps, 1), range(&q.mbps, 1)),
                cell(&q.iops, 0),
                cell(&q.cpu_per_unit, 2),
                cell(&q.own_cpu_per_unit, 2),
                format!("{} ({})", cell(&m.mbps, 1), range(&m.mbps, 1)),
                cell(&m.iops, 0),
                cell(&m.cpu_per_unit, 2),
                cell(&m.own_cpu_per_unit, 2),
                r(t.ratio_perf),
                r(t.ratio_cpu)
            );
        }
    }
    if !lat.is_empty() {
        let _ = writeln!(
            s,
            "{:<16} {:>3} | {:>20} {:>9} {:>8} {:>8} | {:>20} {:>9} {:>8} {:>8} | {:>6} {:>6}",
            "latency",
            "n",
            "quantix µs (range)",
            "p99 µs",
            "CPU µs/rt",
            "own",
            "QEMU µs (range)",
            "p99 µs",
            "CPU µs/rt",
            "own",
            "rtt÷",
            "CPU÷"
        );
        for t in lat {
            let (q, m) = (&t.quantix, &t.qemu);
            let _ = writeln!(
                s,
                "{:<16} {:>3} | {:>20} {:>9} {:>8} {:>8} | {:>20} {:>9} {:>8} {:>8} | {:>6} {:>6}",
                t.test,
                q.n.min(m.n),
                format!(
                    "{} ({})",
                    cell(&q.rtt_median_us, 0),
                    range(&q.rtt_median_us, 0)
                ),
                cell(&q.rtt_p99_us, 0),
                cell(&q.cpu_per_unit, 0),
                cell(&q.own_cpu_per_unit, 0),
                format!(
                    "{} ({})",
                    cell(&m.rtt_median_us, 0),
                    range(&m.rtt_median_us, 0)
                ),
                cell(&m.rtt_p99_us, 0),
                cell(&m.cpu_per_unit, 0),
                cell(&m.own_cpu_per_unit, 0),
                r(t.ratio_perf),
                r(t.ratio_cpu)
            );
        }
    }
    s.push_str(
        "(medians over the runs; ÷ = quantix-vmm / QEMU of the medians; CPU = utime+stime of the \
         VMM process, all threads; own = CPU minus the vCPU threads' guest time)\n",
    );
    s
}

/// The header lines, the table, the targets and the failed runs.
pub fn format_report(
    title: &str,
    date: &str,
    nested: &NestedHost,
    commands: &[(String, String)],
    tests: &[TestSummary],
    runs: &[RunOutcome],
) -> String {
    let mut s = String::new();
    let host = report::HostFacts::read();
    let _ = writeln!(s, "{title} — {date}");
    let _ = writeln!(
        s,
        "nested host: Linux {} under QEMU TCG (-cpu {}, {} vCPU, {} MiB), whole run {:.0} s, attempt(s) {}; log {}",
        nested.kernel,
        nested.cpu_model,
        nested.cpus,
        nested.memory_mib,
        nested.total_s,
        nested.attempts,
        nested.log.display()
    );
    let _ = writeln!(
        s,
        "NOTE: a nested host emulated by QEMU TCG: absolute figures are far below hardware; \
         only ratios between the VMMs of the same run mean something."
    );
    let _ = writeln!(
        s,
        "this machine: Linux {}, {} CPUs ({}), /dev/kvm from {}; workspace at {}",
        host.kernel, host.cpus, host.cpu_model, host.kvm_module, host.revision
    );
    for (name, cmd) in commands {
        let _ = writeln!(s, "command {name}: {cmd}");
    }
    s.push('\n');
    s.push_str(&format_table(tests));
    s.push('\n');
    let targets: Vec<Target> = tests.iter().map(TestSummary::target).collect();
    s.push_str(&report::format_targets(&targets));
    let failed: Vec<&RunOutcome> = runs.iter().filter(|r| r.failure.is_some()).collect();
    if !failed.is_empty() {
        let _ = writeln!(
            s,
            "\n{} run(s) incomplete (their samples still count):",
            failed.len()
        );
        for f in failed {
            let _ = writeln!(s, "  {}: {}", f.job, f.failure.as_deref().unwrap_or("?"));
            if let Some(t) = &f.output_tail {
                for l in t.lines() {
                    let _ = writeln!(s, "    | {l}");
                }
            }
        }
    }
    s
}

/// The command line of `vmm` for an I/O benchmark: the same kernel, `initramfs`, vCPUs,
/// memory and `cmdline` for both VMMs, no entropy device, the serial console on stdout,
/// and then the benchmark's own `devices` (`quantix` for quantix-vmm, `qemu` for QEMU
/// microvm).
pub fn vmm_argv(
    vmm: crate::boot::Vmm,
    initramfs: &str,
    cmdline: &str,
    cpus: u32,
    memory_mib: u32,
    quantix: &[&str],
    qemu: &[&str],
) -> Result<Vec<String>, crate::error::BenchError> {
    use quantix_sandbox::paths;
    let mut argv = match vmm {
        crate::boot::Vmm::QuantixJailed => crate::boot::jail_prefix(cpus, memory_mib),
        _ => Vec::new(),
    };
    let (cpus, mem) = (cpus.to_string(), memory_mib.to_string());
    let (base, devices): (Vec<&str>, &[&str]) = match vmm {
        crate::boot::Vmm::Quantix
        | crate::boot::Vmm::QuantixJailed
        | crate::boot::Vmm::QuantixUnconfined => (
            vec![
                crate::boot::VMM_PATH,
                "--kernel",
                paths::GUEST_VMLINUZ,
                "--initramfs",
                initramfs,
                "--cpus",
                &cpus,
                "--memory",
                &mem,
                "--rng",
                "off",
            ],
            quantix,
        ),
        crate::boot::Vmm::Qemu => (
            vec![
                paths::QEMU,
                "-M",
                "microvm,rtc=on",
                "-enable-kvm",
                "-cpu",
                "host",
                "-m",
                &mem,
                "-smp",
                &cpus,
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-no-reboot",
                "-serial",
                "stdio",
                "-kernel",
                paths::GUEST_VMLINUZ,
                "-initrd",
                initramfs,
                "-append",
                cmdline,
            ],
            qemu,
        ),
        crate::boot::Vmm::Firecracker | crate::boot::Vmm::CloudHypervisor => {
            return Err(crate::error::BenchError::NotDriven {
                bench: "the I/O benchmarks (block, net)",
                vmm: vmm.title().into(),
            })
        }
    };
    argv.extend(base.into_iter().map(String::from));
    argv.extend(devices.iter().map(|a| a.to_string()));
    if vmm.is_quantix() {
        argv.extend(["--cmdline", cmdline, "--log-level", "warn"].map(String::from));
    }
    if vmm == crate::boot::Vmm::QuantixUnconfined {
        argv.extend(["--seccomp", "off"].map(String::from));
    }
    Ok(argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_stats_ratios_and_targets() {
        let out = |mbps: f64, cpu: f64| {
            format!(
                "QX-IO-BEGIN id=read-4k\n\
                 QX-IO id=read-4k kind=blk rw=read bs=4096 threads=4 ops=1000 bytes=2000000000 secs=2 mbps={mbps} iops=500.0 direct=1\n\
                 QX-CPU id=read-4k cpu_ms={cpu} guest_ms=500.0 wall_ms=2000\n\
                 QX-IO id=host-to-guest kind=net test=echo amount=1000 secs=1 rtt_median_us=80.0 rtt_p99_us=200.0 cpu_ms={cpu} guest_ms=0\n"
            )
        };
        let mut samples = samples_from_output(Vmm::Quantix, 1, &out(10.0, 1000.0));
        samples.extend(samples_from_output(Vmm::Quantix, 2, &out(30.0, 3000.0)));
        samples.extend(samples_from_output(Vmm::Qemu, 1, &out(10.0, 4000.0)));
        assert_eq!(samples.len(), 6);
        assert_eq!(samples[0].cpu_per_unit(Kind::Throughput, false), Some(0.5));
        assert_eq!(samples[0].cpu_per_unit(Kind::Throughput, true), Some(0.25));
        assert_eq!(samples[1].cpu_per_unit(Kind::Latency, false), Some(1000.0));
        let tests = summarize(&samples, |t| {
            if t.starts_with("read") {
                Kind::Throughput
            } else {
                Kind::Latency
            }
        });
        assert_eq!(tests.len(), 2);
        let t = &tests[0];
        assert_eq!((t.quantix.n, t.qemu.n), (2, 1));
        assert_eq!(t.ratio_perf, Some(2.0)); // median 20 vs 10
        assert_eq!(t.ratio_cpu, Some(0.5)); // 1.0 s/GB vs 2.0
        assert_eq!(t.target().met, Some(true));
        let l = &tests[1];
        assert_eq!(l.ratio_perf, Some(1.0));
        assert_eq!(l.ratio_cpu, Some(0.5));
        assert_eq!(l.target().met, Some(true));
        let table = format_table(&tests);
        assert!(table.contains("read-4k"), "{table}");
        assert!(table.contains("host-to-guest"), "{table}");

        let job = JobResult {
            name: "quantix-1".into(),
            status: Some(0),
            timed_out: false,
            output: out(1.0, 1.0),
            elapsed: std::time::Duration::from_secs(1),
            timeout: std::time::Duration::from_secs(9),
        };
        let expected = vec!["read-4k".to_string(), "write-4k".to_string()];
        let (run, s) = judge_job(Vmm::Quantix, 1, Some(&job), "quantix-1", &expected);
        assert_eq!(s.len(), 2);
        assert_eq!(run.failure.as_deref(), Some("no result for write-4k"));
        let (run, _) = judge_job(Vmm::Qemu, 1, None, "qemu-1", &expected);
        assert!(run.failure.is_some());
    }
}
