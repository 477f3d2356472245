//! `net`: virtio-net TCP throughput and latency, guest → host and host → guest,
//! quantix-vmm against QEMU microvm (`virtio-net-device` on a TAP, no vhost), alternating
//! in one nested host. The guest runs `qx-io net-server`; the nested host's `qx-io
//! net-client` drives every test through a TAP on a bridge (`qxbr0`, 10.0.2.1/24; the
//! guest is 10.0.2.2) and samples the VMM's CPU time around each test.

use std::time::Duration;

use quantix_sandbox::{build, Job, Payload, Sandbox, SandboxConfig};
use serde::Serialize;

use crate::block::{guest_initramfs, Planned, QX_IO_PATH};
use crate::boot::{shell_words, Vmm, JAIL_PID_FILE};
use crate::error::BenchError;
use crate::iobench::{self, IoSample, Kind, NestedHost, RunOutcome, TestSummary};
use crate::report;

/// The guest initramfs of the network runs.
const INITRAMFS: &str = "/payload/net-bench.cpio";
/// Guest command line.
const CMDLINE: &str = "console=ttyS0 quiet qx.action=script";
/// The TAP both VMMs use (one at a time).
pub const TAP: &str = "qxtap0";
/// The bridge in the nested host.
pub const BRIDGE: &str = "qxbr0";
/// The guest's server.
pub const GUEST_ADDR: &str = "10.0.2.2:5201";
const MAC: &str = "52:54:00:12:34:56";

/// The virtio-net modules of the guest kernel, in load order.
pub const NET_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
];

/// Settings of `net`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetOptions {
    /// VMM runs per VMM (alternating).
    pub iterations: u32,
    /// Times each test runs in one VMM run.
    pub repeat: u32,
    /// Bytes per throughput test.
    pub bytes: u64,
    /// Round trips per latency test.
    pub round_trips: u64,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// vCPUs of the nested host.
    pub host_cpus: u32,
}

/// The tests: (id, `qx-io net-client --test`, throughput or latency).
pub const TESTS: &[(&str, &str, Kind)] = &[
    ("host-to-guest", "send", Kind::Throughput),
    ("guest-to-host", "recv", Kind::Throughput),
    ("rr-host-first", "echo", Kind::Latency),
    ("rr-guest-first", "ping", Kind::Latency),
];

/// Throughput or latency, by test id.
pub fn kind_of(test: &str) -> Kind {
    TESTS
        .iter()
        .find(|t| t.0 == test)
        .map_or(Kind::Throughput, |t| t.2)
}

/// The VMM command line of a network run.
pub fn vmm_argv(vmm: Vmm, o: &NetOptions) -> Result<Vec<String>, BenchError> {
    let net = format!("tap={TAP},mac={MAC}");
    let netdev = format!("tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off");
    let device = format!("virtio-net-device,netdev=net0,mac={MAC}");
    iobench::vmm_argv(
        vmm,
        INITRAMFS,
        CMDLINE,
        o.cpus,
        o.memory_mib,
        &["--net", &net],
        &["-netdev", &netdev, "-device", &device],
    )
}

/// The nested host's script of one VMM run: start the VMM in the background, put its
/// TAP on the bridge, wait for the guest's server, run the tests, stop the server, wait
/// for the VMM.
pub fn host_script(vmm: Vmm, label: &str, o: &NetOptions) -> Result<String, BenchError> {
    let mut s = format!(
        "{}{} >/tmp/{label}.console 2>&1 &\n\
         job=$!; pid=$job\n\
         {}\
         i=0; while ! ip link show {TAP} >/dev/null 2>&1; do i=$((i+1)); if [ $i -ge 600 ]; then echo 'QX-FAIL no TAP'; break; fi; sleep 0.1; done\n\
         brctl addif {BRIDGE} {TAP} && ip link set {TAP} up || echo 'QX-FAIL bridge'\n\
         C=\"{QX_IO_PATH} net-client --connect {GUEST_ADDR} --cpu-pid $pid\"\n\
         $C --test echo --amount 10 --wait-s 240 --id warmup >/dev/null || echo 'QX-FAIL guest server unreachable'\n\
         for r in $(seq {}); do\n",
        if vmm == Vmm::QuantixJailed {
            format!("rm -f {JAIL_PID_FILE}; ")
        } else {
            String::new()
        },
        shell_words(&vmm_argv(vmm, o)?),
        // A jailed VMM is the jailer's child: its pid is the one to measure.
        if vmm == Vmm::QuantixJailed {
            format!(
                "i=0; while [ ! -s {JAIL_PID_FILE} ]; do i=$((i+1)); if [ $i -ge 600 ]; then echo 'QX-FAIL no pid file'; break; fi; sleep 0.1; done; pid=$(cat {JAIL_PID_FILE})\n"
            )
        } else {
            String::new()
        },
        o.repeat
    );
    for (id, test, kind) in TESTS {
        let amount = match kind {
            Kind::Throughput => o.bytes,
            Kind::Latency => o.round_trips,
        };
        s.push_str(&format!(
            "  $C --test {test} --amount {amount} --id {id} || echo 'QX-FAIL {id}'\n"
        ));
    }
    s.push_str(&format!(
        "done\n\
         $C --test quit || kill $job\n\
         wait $job; status=$?\n\
         echo \"QX-HOST vmm-status=$status\"\n\
         if [ $status -ne 0 ]; then tail -n 40 /tmp/{label}.console; exit 1; fi\n"
    ));
    Ok(s)
}

/// Everything `net` measured.
#[derive(Debug, Clone, Serialize)]
pub struct NetResults {
    /// `net`.
    pub benchmark: &'static str,
    /// When.
    pub date: String,
    /// Settings.
    pub options: NetOptions,
    /// The nested host.
    pub nested_host: NestedHost,
    /// The workspace's revision.
    pub revision: String,
    /// The VMM command lines.
    pub commands: Vec<(String, String)>,
    /// Every sample.
    pub samples: Vec<IoSample>,
    /// Every VMM run.
    pub runs: Vec<RunOutcome>,
    /// Per test.
    pub tests: Vec<TestSummary>,
}

/// The network runs of `vmms`, alternating, `o.iterations` each, after a setup job that
/// makes the bridge (`net` and `jail` share it).
pub fn prepare(o: &NetOptions, vmms: &[Vmm]) -> Result<Planned, BenchError> {
    let assets = quantix_sandbox::Assets::from_env()?;
    let sandbox = Sandbox::with_config(
        assets,
        SandboxConfig {
            network_modules: true,
            cpus: o.host_cpus,
            ..SandboxConfig::default()
        },
    );
    eprintln!("quantix-bench: building the static binaries for the nested host");
    let qx_io = build::static_binary("quantix-bench", "qx-io")?;
    let qx_io_bytes = std::fs::read(&qx_io)
        .map_err(|e| BenchError::io(format!("reading {}", qx_io.display()), e))?;
    let body = format!(
        "ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0 || echo 'QX-FAIL eth0'\n\
         {QX_IO_PATH} net-server --listen 0.0.0.0:5201 || echo 'QX-FAIL net-server'\n"
    );
    let mut payload = Payload::new();
    crate::boot::add_vmms(&mut payload, &sandbox, vmms)?;
    payload.add_file(&qx_io, QX_IO_PATH)?;
    payload.add_bytes(
        INITRAMFS,
        guest_initramfs(&sandbox, NET_MODULES, qx_io_bytes, &body)?,
        0o644,
    )?;
    let per_run = Duration::from_secs(300 + u64::from(o.repeat) * 120);
    let mut jobs = vec![Job::shell(
        "setup",
        format!(
            "brctl addbr {BRIDGE} && ip addr add 10.0.2.1/24 dev {BRIDGE} && ip link set {BRIDGE} up"
        ),
    )
    .reference()];
    let mut plan = Vec::new();
    for i in 1..=o.iterations {
        for &v in vmms {
            let name = format!("{}-{i}", v.name());
            let job = Job::shell(&name, host_script(v, &name, o)?).timeout(per_run);
            // A nested host that dies while only QEMU ran is the sandbox's failure.
            jobs.push(if v == Vmm::Qemu { job.reference() } else { job });
            plan.push((v, i, name));
        }
    }
    eprintln!(
        "quantix-bench: {} VMM runs × {} tests × {} in one nested host",
        plan.len(),
        TESTS.len(),
        o.repeat
    );
    Ok(Planned {
        sandbox,
        payload,
        jobs,
        plan,
    })
}

/// Checks the setup job made the bridge.
pub fn check_setup(report: &quantix_sandbox::Report) -> Result<(), BenchError> {
    if !report.job("setup").is_some_and(|j| j.success()) {
        return Err(BenchError::Unavailable(format!(
            "the bridge could not be set up in the nested host: {}",
            report
                .job("setup")
                .map_or("no result", |j| j.output.as_str())
        )));
    }
    Ok(())
}

/// The test ids, in order.
pub fn expected() -> Vec<String> {
    TESTS.iter().map(|t| t.0.to_string()).collect()
}

/// Runs the benchmark.
pub fn run(o: &NetOptions) -> Result<NetResults, BenchError> {
    let vmms = [Vmm::Quantix, Vmm::Qemu];
    let p = prepare(o, &vmms)?;
    let report = p.sandbox.run(&p.payload, &p.jobs)?;
    check_setup(&report)?;
    let (runs, samples) = iobench::judge_all(&report, &p.plan, &expected());
    let tests = iobench::summarize(&samples, kind_of);
    Ok(NetResults {
        benchmark: "net",
        date: report::now_utc(),
        options: o.clone(),
        nested_host: NestedHost::of(&p.sandbox, &report),
        revision: report::git_revision(),
        commands: vmms
            .iter()
            .map(|v| Ok((v.name().to_string(), shell_words(&vmm_argv(*v, o)?))))
            .collect::<Result<_, BenchError>>()?,
        samples,
        runs,
        tests,
    })
}

/// The readable report.
pub fn format(r: &NetResults) -> String {
    let o = &r.options;
    let title = format!(
        "quantix-bench net: {} run(s) per VMM × {} repeat(s), {} MiB per throughput test, {} round trips per latency test, TAP on a bridge, {} vCPU, {} MiB",
        o.iterations,
        o.repeat,
        o.bytes >> 20,
        o.round_trips,
        o.cpus,
        o.memory_mib
    );
    iobench::format_report(
        &title,
        &r.date,
        &r.nested_host,
        &r.commands,
        &r.tests,
        &r.runs,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_and_script() {
        let o = NetOptions {
            iterations: 1,
            repeat: 2,
            bytes: 1 << 20,
            round_trips: 100,
            cpus: 1,
            memory_mib: 256,
            host_cpus: 1,
        };
        let q = shell_words(&vmm_argv(Vmm::Qemu, &o).unwrap());
        assert!(q.ends_with(
            "-netdev tap,id=net0,ifname=qxtap0,script=no,downscript=no,vhost=off \
             -device virtio-net-device,netdev=net0,mac=52:54:00:12:34:56"
        ));
        assert!(shell_words(&vmm_argv(Vmm::Quantix, &o).unwrap())
            .contains("--net tap=qxtap0,mac=52:54:00:12:34:56"));
        let s = host_script(Vmm::Quantix, "quantix-1", &o).unwrap();
        assert!(s.contains("for r in $(seq 2); do"), "{s}");
        assert!(
            s.contains("$C --test send --amount 1048576 --id host-to-guest"),
            "{s}"
        );
        assert!(
            s.contains("$C --test ping --amount 100 --id rr-guest-first"),
            "{s}"
        );
        assert!(s.contains("brctl addif qxbr0 qxtap0"), "{s}");
        assert_eq!(kind_of("rr-host-first"), Kind::Latency);
        assert_eq!(kind_of("guest-to-host"), Kind::Throughput);
    }
}
