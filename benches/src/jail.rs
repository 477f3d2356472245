//! `jail`: what the agent's jail costs quantix-vmm. Boot, block and network, each in one
//! nested host, quantix-vmm unjailed and jailed alternating (unjailed first). Jailed is the
//! agent's jail (`qx-jail` then `quantix-jailer`): every file, `/dev/kvm` and the TAP passed
//! as descriptors, its own uid without capabilities, new mount/PID/IPC/UTS/network
//! namespaces, `pivot_root`, a cgroup with the agent's memory and CPU limits, and the
//! seccomp filters; the baseline is quantix-vmm with neither (`--seccomp off`: the filters
//! are its default even without a jail).

use std::fmt::Write as _;

use quantix_sandbox::{build, Payload, Sandbox};
use serde::Serialize;

use crate::block::{self, BlockOptions};
use crate::boot::{self, BootOptions, BootSample, Vmm, PROBE_PATH};
use crate::error::BenchError;
use crate::iobench::{self, IoSample, Kind, NestedHost, RunOutcome};
use crate::net::{self, NetOptions};
use crate::report;
use crate::stats::Summary;

/// Target: the jail and the filters cost less than this fraction.
pub const COST_TARGET: f64 = 0.02;

/// The sides, in the order they alternate: neither jail nor filters, the filters alone
/// (quantix-vmm's default run by hand), and the agent's jail with the filters.
pub const SIDES: [Vmm; 3] = [Vmm::QuantixUnconfined, Vmm::Quantix, Vmm::QuantixJailed];

/// Which parts to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Part {
    /// Boot to the guest's init.
    Boot,
    /// virtio-blk.
    Block,
    /// virtio-net.
    Net,
}

/// Settings of `jail`.
#[derive(Debug, Clone, Serialize)]
pub struct JailOptions {
    /// The parts, in order.
    pub parts: Vec<Part>,
    /// The boot part's settings.
    pub boot: BootOptions,
    /// The block part's.
    pub block: BlockOptions,
    /// The network part's.
    pub net: NetOptions,
}

/// One measured quantity, both sides.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `boot`, `block` or `net`.
    pub part: &'static str,
    /// What (a test id and its unit).
    pub metric: String,
    /// Unjailed, unfiltered.
    pub unjailed: Option<Summary>,
    /// Seccomp filters only.
    pub filtered: Option<Summary>,
    /// Jailed (with the filters).
    pub jailed: Option<Summary>,
    /// What the jail and filters cost, as a fraction of the unconfined median (positive:
    /// worse).
    pub cost: Option<f64>,
    /// What the filters alone cost, the same way.
    pub filter_cost: Option<f64>,
    /// Whether the row counts toward the target (host CPU rows are shown, not judged).
    pub judged: bool,
}

impl Row {
    fn new(
        part: &'static str,
        metric: String,
        [unjailed, filtered, jailed]: [Option<Summary>; 3],
        higher_is_better: bool,
        judged: bool,
    ) -> Row {
        let cost = |x: &Option<Summary>| match (&unjailed, x) {
            (Some(u), Some(j)) if u.median > 0.0 => Some(if higher_is_better {
                1.0 - j.median / u.median
            } else {
                j.median / u.median - 1.0
            }),
            _ => None,
        };
        Row {
            part,
            metric,
            cost: cost(&jailed),
            filter_cost: cost(&filtered),
            unjailed,
            filtered,
            jailed,
            judged,
        }
    }
}

/// Everything `jail` measured.
#[derive(Debug, Clone, Serialize)]
pub struct JailResults {
    /// `jail`.
    pub benchmark: &'static str,
    /// When.
    pub date: String,
    /// Settings.
    pub options: JailOptions,
    /// The workspace's revision.
    pub revision: String,
    /// The nested host of each part.
    pub nested_hosts: Vec<(Part, NestedHost)>,
    /// The command lines of each part and side.
    pub commands: Vec<(String, String)>,
    /// Every boot.
    pub boot_samples: Vec<BootSample>,
    /// Every block and network sample (test ids prefixed with the part).
    pub io_samples: Vec<IoSample>,
    /// Every block and network run.
    pub runs: Vec<RunOutcome>,
    /// The comparison.
    pub rows: Vec<Row>,
}

impl JailResults {
    /// The target, judged on the judged rows' medians: met when every one costs less
    /// than [`COST_TARGET`]; unknown when one is missing.
    pub fn target(&self) -> report::Target {
        let judged: Vec<&Row> = self.rows.iter().filter(|r| r.judged).collect();
        let worst = judged
            .iter()
            .filter_map(|r| r.cost.map(|c| (c, r)))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        report::Target {
            target: format!(
                "the jail and seccomp filters cost < {:.0} % (boot, block, network)",
                COST_TARGET * 100.0
            ),
            measured: match worst {
                Some((c, r)) => format!(
                    "worst: {} {} {:+.1} % (medians)",
                    r.part,
                    r.metric,
                    c * 100.0
                ),
                None => "not measured".into(),
            },
            met: if judged.is_empty() || judged.iter().any(|r| r.cost.is_none()) {
                None
            } else {
                Some(
                    judged
                        .iter()
                        .all(|r| r.cost.is_some_and(|c| c < COST_TARGET)),
                )
            },
        }
    }
}

/// Runs the parts.
pub fn run(o: &JailOptions) -> Result<JailResults, BenchError> {
    let mut r = JailResults {
        benchmark: "jail",
        date: report::now_utc(),
        options: o.clone(),
        revision: report::git_revision(),
        nested_hosts: Vec::new(),
        commands: Vec::new(),
        boot_samples: Vec::new(),
        io_samples: Vec::new(),
        runs: Vec::new(),
        rows: Vec::new(),
    };
    for part in &o.parts {
        match part {
            Part::Boot => run_boot(&o.boot, &mut r)?,
            Part::Block => run_block(&o.block, &mut r)?,
            Part::Net => run_net(&o.net, &mut r)?,
        }
    }
    Ok(r)
}

fn run_boot(o: &BootOptions, r: &mut JailResults) -> Result<(), BenchError> {
    let sandbox = Sandbox::from_env()?;
    eprintln!("quantix-bench: building the static binaries for the nested host");
    let mut payload = Payload::new();
    boot::add_vmms(&mut payload, &sandbox, &SIDES)?;
    payload.add_file(
        &build::static_binary("quantix-bench", "qx-probe")?,
        PROBE_PATH,
    )?;
    let plan: Vec<(Vmm, u32, quantix_sandbox::Job)> = (1..=o.iterations)
        .flat_map(|i| SIDES.map(|v| (v, i, boot::probe_job(v, i, o))))
        .collect();
    let jobs: Vec<_> = plan.iter().map(|p| p.2.clone()).collect();
    eprintln!(
        "quantix-bench: {} boots in one nested host, unjailed and jailed alternating",
        jobs.len()
    );
    let report = sandbox.run(&payload, &jobs)?;
    for (order, (v, i, job)) in plan.iter().enumerate() {
        let Some(res) = report.job(&job.name) else {
            continue;
        };
        let mut s = boot::sample_from_job(*v, *i, order, res, &report.console, false);
        if *v == Vmm::QuantixJailed {
            // The probe measured its child, the jailer, not the VMM: no memory figures.
            if let Some(p) = s.probe.as_mut() {
                p.memory = None;
            }
        }
        r.boot_samples.push(s);
    }
    let s = SIDES.map(|v| boot::summarize(v, &r.boot_samples));
    r.rows.push(Row::new(
        "boot",
        "start→init (ms)".into(),
        s.clone().map(|x| x.start_to_init_ms),
        false,
        true,
    ));
    r.rows.push(Row::new(
        "boot",
        "first console output (ms)".into(),
        s.clone().map(|x| x.first_output_ms),
        false,
        false,
    ));
    r.rows.push(Row::new(
        "boot",
        "start→exit (ms)".into(),
        s.map(|x| x.total_ms),
        false,
        false,
    ));
    for v in SIDES {
        r.commands.push((
            format!("boot {}", v.name()),
            boot::shell_words(&boot::vmm_argv(v, o)),
        ));
    }
    r.nested_hosts
        .push((Part::Boot, NestedHost::of(&sandbox, &report)));
    Ok(())
}

fn run_block(o: &BlockOptions, r: &mut JailResults) -> Result<(), BenchError> {
    let p = block::prepare(o, &SIDES)?;
    let report = p.sandbox.run(&p.payload, &p.jobs)?;
    let expected: Vec<String> = block::tests().into_iter().map(|t| t.0).collect();
    let (runs, samples) = iobench::judge_all(&report, &p.plan, &expected);
    io_rows(
        "block",
        &samples,
        &expected,
        |_| Kind::Throughput,
        &mut r.rows,
    );
    r.runs.extend(runs);
    r.io_samples.extend(prefixed("block", samples));
    for v in SIDES {
        r.commands.push((
            format!("block {}", v.name()),
            boot::shell_words(&block::vmm_argv(v, o)?),
        ));
    }
    r.nested_hosts
        .push((Part::Block, NestedHost::of(&p.sandbox, &report)));
    Ok(())
}

fn run_net(o: &NetOptions, r: &mut JailResults) -> Result<(), BenchError> {
    let p = net::prepare(o, &SIDES)?;
    let report = p.sandbox.run(&p.payload, &p.jobs)?;
    net::check_setup(&report)?;
    let expected = net::expected();
    let (runs, samples) = iobench::judge_all(&report, &p.plan, &expected);
    io_rows("net", &samples, &expected, net::kind_of, &mut r.rows);
    r.runs.extend(runs);
    r.io_samples.extend(prefixed("net", samples));
    for v in SIDES {
        r.commands.push((
            format!("net {}", v.name()),
            boot::shell_words(&net::vmm_argv(v, o)?),
        ));
    }
    r.nested_hosts
        .push((Part::Net, NestedHost::of(&p.sandbox, &report)));
    Ok(())
}

fn prefixed(part: &str, samples: Vec<IoSample>) -> Vec<IoSample> {
    samples
        .into_iter()
        .map(|mut s| {
            s.test = format!("{part}/{}", s.test);
            s
        })
        .collect()
}

/// A row per test (MB/s, or the median round trip) and one of host CPU per unit.
fn io_rows(
    part: &'static str,
    samples: &[IoSample],
    tests: &[String],
    kind_of: impl Fn(&str) -> Kind,
    rows: &mut Vec<Row>,
) {
    for t in tests {
        let kind = kind_of(t);
        let st = SIDES.map(|v| {
            let of: Vec<&IoSample> = samples
                .iter()
                .filter(|s| &s.test == t && s.vmm == v)
                .collect();
            iobench::vmm_stats(kind, &of)
        });
        let cpu = st.clone().map(|x| x.cpu_per_unit);
        match kind {
            Kind::Throughput => {
                rows.push(Row::new(
                    part,
                    format!("{t} (MB/s)"),
                    st.map(|x| x.mbps),
                    true,
                    true,
                ));
                rows.push(Row::new(
                    part,
                    format!("{t} host CPU (s/GB)"),
                    cpu,
                    false,
                    false,
                ));
            }
            Kind::Latency => {
                rows.push(Row::new(
                    part,
                    format!("{t} round trip (µs)"),
                    st.map(|x| x.rtt_median_us),
                    false,
                    true,
                ));
                rows.push(Row::new(
                    part,
                    format!("{t} host CPU (µs/trip)"),
                    cpu,
                    false,
                    false,
                ));
            }
        }
    }
}

/// The readable report.
pub fn format(r: &JailResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "quantix-bench jail — {}\nquantix-vmm unconfined (--seccomp off), with its seccomp filters only, and jailed as the agent jails it (descriptors, own uid, namespaces, pivot_root, cgroup limits, seccomp), alternating in one nested host per part; workspace at {}",
        r.date, r.revision
    );
    for (part, n) in &r.nested_hosts {
        let _ = writeln!(s, "{part:?}: {}", n.summary());
    }
    for (name, cmd) in &r.commands {
        let _ = writeln!(s, "command {name}: {cmd}");
    }
    let failed: Vec<String> = r
        .boot_samples
        .iter()
        .filter_map(|b| b.failure.as_ref().map(|f| format!("{}: {f}", b.job)))
        .chain(
            r.runs
                .iter()
                .filter_map(|x| x.failure.as_ref().map(|f| format!("{}: {f}", x.job))),
        )
        .collect();
    for f in &failed {
        let _ = writeln!(s, "excluded run {f}");
    }
    s.push('\n');
    let _ = writeln!(
        s,
        "{:<6} {:<34} {:>21} {:>21} {:>21} {:>8} {:>8}",
        "part",
        "metric (median [min–max])",
        "unconfined",
        "seccomp only",
        "jailed+seccomp",
        "filters",
        "cost"
    );
    let cell = |x: &Option<Summary>| match x {
        Some(x) => format!("{:.1} [{:.0}–{:.0}]", x.median, x.min, x.max),
        None => "-".into(),
    };
    let pct = |c: Option<f64>| c.map_or("-".into(), |c| format!("{:+.1} %", c * 100.0));
    for row in &r.rows {
        let _ = writeln!(
            s,
            "{:<6} {:<34} {:>21} {:>21} {:>21} {:>8} {:>8}{}",
            row.part,
            row.metric,
            cell(&row.unjailed),
            cell(&row.filtered),
            cell(&row.jailed),
            pct(row.filter_cost),
            pct(row.cost),
            if row.judged { "" } else { "  (shown)" }
        );
    }
    let _ = writeln!(
        s,
        "cost: jailed+seccomp against unconfined; filters: seccomp only against unconfined"
    );
    let t = r.target();
    let _ = writeln!(
        s,
        "\ntarget: {} — {} — {}",
        t.target,
        t.measured,
        match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "unknown",
        }
    );
    let _ = writeln!(
        s,
        "NOTE: a nested host emulated by TCG spreads single runs by ±30 % (boot) and ±10 % (I/O); \
         a cost within the min–max spread of both sides is not a measured cost."
    );
    s
}

/// Exits 1 (through the error) when a side had no successful run at all.
pub fn check(r: &JailResults) -> Result<(), BenchError> {
    for v in SIDES {
        let boots = r.boot_samples.iter().filter(|s| s.vmm == v).count();
        let ok = r
            .boot_samples
            .iter()
            .filter(|s| s.vmm == v && s.ok())
            .count();
        let io = r.runs.iter().filter(|x| x.vmm == v).count();
        let io_ok = r
            .runs
            .iter()
            .filter(|x| x.vmm == v && x.failure.is_none())
            .count();
        if (boots > 0 && ok == 0) || (io > 0 && io_ok == 0) {
            return Err(BenchError::NoSamples {
                vmm: v.title().into(),
                detail: format!("{ok}/{boots} boots and {io_ok}/{io} I/O runs succeeded"),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(median: f64) -> Option<Summary> {
        crate::stats::summarize(&[median])
    }

    fn row(a: Option<Summary>, b: Option<Summary>, higher: bool, judged: bool) -> Row {
        Row::new("block", "m".into(), [a, None, b], higher, judged)
    }

    #[test]
    fn cost_is_worse_in_both_directions() {
        let t = row(summary(100.0), summary(97.0), true, true);
        assert!((t.cost.unwrap() - 0.03).abs() < 1e-9);
        assert!(t.filter_cost.is_none());
        let l = row(summary(100.0), summary(101.0), false, true);
        assert!((l.cost.unwrap() - 0.01).abs() < 1e-9);
        let faster = row(summary(100.0), summary(90.0), false, true);
        assert!(faster.cost.unwrap() < 0.0);
        assert!(row(None, summary(1.0), false, true).cost.is_none());
        let f = Row::new(
            "net",
            "x".into(),
            [summary(10.0), summary(11.0), None],
            false,
            true,
        );
        assert!((f.filter_cost.unwrap() - 0.1).abs() < 1e-9);
    }

    #[test]
    fn the_target_is_judged_on_judged_rows_only() {
        let mut r = JailResults {
            benchmark: "jail",
            date: String::new(),
            options: JailOptions {
                parts: vec![],
                boot: BootOptions {
                    iterations: 1,
                    cpus: 1,
                    memory_mib: 256,
                    kernel: boot::Kernel::Vmlinuz,
                    run_timeout_s: 10,
                    quiet: false,
                    console: false,
                    firecracker: None,
                    cloud_hypervisor: None,
                },
                block: BlockOptions {
                    iterations: 1,
                    seconds: 1,
                    threads: 1,
                    cpus: 1,
                    memory_mib: 256,
                    disk_mib: 16,
                    host_cpus: 1,
                },
                net: NetOptions {
                    iterations: 1,
                    repeat: 1,
                    bytes: 1,
                    round_trips: 10,
                    cpus: 1,
                    memory_mib: 256,
                    host_cpus: 1,
                },
            },
            revision: String::new(),
            nested_hosts: vec![],
            commands: vec![],
            boot_samples: vec![],
            io_samples: vec![],
            runs: vec![],
            rows: vec![],
        };
        assert_eq!(r.target().met, None);
        r.rows.push(row(summary(100.0), summary(99.0), true, true));
        r.rows.push(row(summary(1.0), summary(2.0), false, false));
        assert_eq!(r.target().met, Some(true));
        let mut b = row(summary(10.0), summary(10.5), false, true);
        b.part = "net";
        b.metric = "b".into();
        r.rows.push(b);
        let t = r.target();
        assert_eq!(t.met, Some(false));
        assert!(t.measured.contains("net b +5.0 %"), "{}", t.measured);
        r.rows.push(row(None, summary(1.0), false, true));
        assert_eq!(r.target().met, None);
    }
}
