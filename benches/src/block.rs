//! `block`: virtio-blk throughput and IOPS, quantix-vmm against QEMU microvm
//! (`virtio-blk-device`, the same virtio-mmio transport), alternating in one nested host,
//! on the same raw image in the nested host's tmpfs. The guest runs `qx-io blk` on
//! `/dev/vda` with `O_DIRECT`; the host side wraps each VMM in `qx-io monitor`, which
//! samples the VMM's CPU time around each workload.

use std::time::Duration;

use quantix_sandbox::{build, GuestInitramfs, Job, Payload, Sandbox};
use serde::Serialize;

use crate::boot::{shell_words, Vmm};
use crate::error::BenchError;
use crate::iobench::{self, IoSample, Kind, NestedHost, RunOutcome, TestSummary};
use crate::report;

/// `qx-io` in the nested host and in the guest.
pub const QX_IO_PATH: &str = "/payload/qx-io";
/// The guest initramfs of the block runs.
const INITRAMFS: &str = "/payload/blk-bench.cpio";
/// The disk image, in the nested host's tmpfs.
pub const IMAGE: &str = "/tmp/bench.img";
/// Guest command line (quiet: fewer kernel lines on the console between records).
pub const CMDLINE: &str = "console=ttyS0 quiet qx.action=script";

/// The virtio-blk modules of the guest kernel, in load order.
pub const BLK_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// Settings of `block`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockOptions {
    /// VMM runs per VMM (alternating), each running every test once.
    pub iterations: u32,
    /// Seconds per test.
    pub seconds: u32,
    /// Guest threads per test (the queue depth).
    pub threads: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// Disk image size, MiB.
    pub disk_mib: u32,
    /// vCPUs of the nested host (1: the VMM's threads and the guest share one CPU, so
    /// the VMM's CPU time is close to the wall time).
    pub host_cpus: u32,
}

/// The tests, in the order the guest runs them: (id, `--rw`, block size).
pub fn tests() -> Vec<(String, &'static str, u64)> {
    let mut v = Vec::new();
    for (bs, label) in [(1u64 << 20, "1m"), (4096, "4k")] {
        for rw in ["write", "read", "randwrite", "randread"] {
            v.push((format!("{rw}-{label}"), rw, bs));
        }
    }
    v
}

/// The guest script body: one `qx-io blk` per test.
pub fn guest_body(o: &BlockOptions) -> String {
    let mut s = String::new();
    for (id, rw, bs) in tests() {
        s.push_str(&format!(
            "{QX_IO_PATH} blk --dev /dev/vda --rw {rw} --bs {bs} --threads {} --seconds {} --direct on --id {id} || echo \"QX-FAIL {id}\"\n",
            o.threads, o.seconds
        ));
    }
    s
}

/// Builds a guest initramfs with `modules` (as `/qx-mod-N.ko`, loaded in order), `qx-io`
/// and a script running `body`.
pub fn guest_initramfs(
    sandbox: &Sandbox,
    modules: &[&str],
    qx_io: Vec<u8>,
    body: &str,
) -> Result<Vec<u8>, BenchError> {
    let assets = sandbox.assets();
    Ok(GuestInitramfs::new(assets)
        .file(QX_IO_PATH, qx_io, 0o755)
        .script_after_modules(assets, modules, body)?
        .build()?)
}

/// The VMM command line of a block run.
pub fn vmm_argv(vmm: Vmm, o: &BlockOptions) -> Result<Vec<String>, BenchError> {
    iobench::vmm_argv(
        vmm,
        INITRAMFS,
        CMDLINE,
        o.cpus,
        o.memory_mib,
        &["--disk", "path=/tmp/bench.img,id=bench"],
        &[
            "-drive",
            "id=bench,file=/tmp/bench.img,format=raw,if=none",
            "-device",
            "virtio-blk-device,drive=bench",
        ],
    )
}

/// Everything `block` measured.
#[derive(Debug, Clone, Serialize)]
pub struct BlockResults {
    /// `block`.
    pub benchmark: &'static str,
    /// When.
    pub date: String,
    /// Settings.
    pub options: BlockOptions,
    /// The nested host.
    pub nested_host: NestedHost,
    /// quantix-vmm's revision (the workspace's).
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

/// A benchmark's nested host, payload, jobs and plan (VMM, iteration, job name), ready to
/// run (`block` and `jail` share it).
pub struct Planned {
    /// The nested host.
    pub sandbox: Sandbox,
    /// What goes into it.
    pub payload: Payload,
    /// The jobs, in order.
    pub jobs: Vec<Job>,
    /// The VMM runs among them.
    pub plan: Vec<(Vmm, u32, String)>,
}

/// The block runs of `vmms`, alternating, `o.iterations` each, after a setup job that makes
/// the image.
pub fn prepare(o: &BlockOptions, vmms: &[Vmm]) -> Result<Planned, BenchError> {
    let mut sandbox = Sandbox::from_env()?;
    sandbox.config_mut().cpus = o.host_cpus;
    eprintln!("quantix-bench: building the static binaries for the nested host");
    let qx_io = build::static_binary("quantix-bench", "qx-io")?;
    let qx_io_bytes = std::fs::read(&qx_io)
        .map_err(|e| BenchError::io(format!("reading {}", qx_io.display()), e))?;
    let mut payload = Payload::new();
    crate::boot::add_vmms(&mut payload, &sandbox, vmms)?;
    payload.add_file(&qx_io, QX_IO_PATH)?;
    payload.add_bytes(
        INITRAMFS,
        guest_initramfs(&sandbox, BLK_MODULES, qx_io_bytes, &guest_body(o))?,
        0o644,
    )?;
    let per_run = Duration::from_secs(120 + tests().len() as u64 * (u64::from(o.seconds) + 10));
    let mut jobs = vec![Job::shell(
        "setup",
        format!(
            "dd if=/dev/zero of={IMAGE} bs=1M count={} 2>/dev/null && ls -l {IMAGE}",
            o.disk_mib
        ),
    )
    .reference()];
    let mut plan = Vec::new();
    for i in 1..=o.iterations {
        for &v in vmms {
            let name = format!("{}-{i}", v.name());
            let mut argv = vec![
                QX_IO_PATH.to_string(),
                "monitor".into(),
                "--timeout-s".into(),
                per_run.as_secs().to_string(),
            ];
            if v == Vmm::QuantixJailed {
                // The jailer's child is the VMM whose CPU counts.
                argv.extend(["--pid-file".into(), crate::boot::JAIL_PID_FILE.into()]);
            }
            argv.push("--".into());
            argv.extend(vmm_argv(v, o)?);
            let job = Job::new(&name, argv).timeout(per_run + Duration::from_secs(20));
            // A nested host that dies while only QEMU ran is the sandbox's failure.
            jobs.push(if v == Vmm::Qemu { job.reference() } else { job });
            plan.push((v, i, name));
        }
    }
    eprintln!(
        "quantix-bench: {} VMM runs × {} tests of {} s in one nested host",
        plan.len(),
        tests().len(),
        o.seconds
    );
    Ok(Planned {
        sandbox,
        payload,
        jobs,
        plan,
    })
}

/// Runs the benchmark.
pub fn run(o: &BlockOptions) -> Result<BlockResults, BenchError> {
    let vmms = [Vmm::Quantix, Vmm::Qemu];
    let p = prepare(o, &vmms)?;
    let report = p.sandbox.run(&p.payload, &p.jobs)?;
    let expected: Vec<String> = tests().into_iter().map(|t| t.0).collect();
    let (runs, samples) = iobench::judge_all(&report, &p.plan, &expected);
    let tests = iobench::summarize(&samples, |_| Kind::Throughput);
    Ok(BlockResults {
        benchmark: "block",
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
pub fn format(r: &BlockResults) -> String {
    let o = &r.options;
    let title = format!(
        "quantix-bench block: {} run(s) per VMM, {} s per test, {} guest threads (queue depth), O_DIRECT on /dev/vda, {} MiB raw image on tmpfs, {} vCPU, {} MiB",
        o.iterations, o.seconds, o.threads, o.disk_mib, o.cpus, o.memory_mib
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

/// Fails when a VMM produced no sample at all.
pub fn check(runs: &[RunOutcome], samples: &[IoSample]) -> Result<(), BenchError> {
    for v in [Vmm::Quantix, Vmm::Qemu] {
        if !samples.iter().any(|s| s.vmm == v) {
            return Err(BenchError::NoSamples {
                vmm: v.title().into(),
                detail: runs
                    .iter()
                    .filter(|r| r.vmm == v)
                    .filter_map(|r| r.failure.clone())
                    .collect::<Vec<_>>()
                    .join("; "),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_and_tests() {
        let o = BlockOptions {
            iterations: 1,
            seconds: 3,
            threads: 4,
            cpus: 1,
            memory_mib: 256,
            disk_mib: 128,
            host_cpus: 1,
        };
        assert_eq!(
            shell_words(&vmm_argv(Vmm::Qemu, &o).unwrap()),
            "/usr/bin/qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256 -smp 1 \
             -nodefaults -no-user-config -nographic -no-reboot -serial stdio -kernel /guest/vmlinuz \
             -initrd /payload/blk-bench.cpio -append 'console=ttyS0 quiet qx.action=script' \
             -drive id=bench,file=/tmp/bench.img,format=raw,if=none -device virtio-blk-device,drive=bench"
        );
        assert!(shell_words(&vmm_argv(Vmm::Quantix, &o).unwrap())
            .contains("--disk path=/tmp/bench.img,id=bench"));
        let t = tests();
        assert_eq!(t.len(), 8);
        assert_eq!(t[0], ("write-1m".to_string(), "write", 1 << 20));
        assert_eq!(t[7], ("randread-4k".to_string(), "randread", 4096));
        let body = guest_body(&o);
        assert!(body.contains(
            "blk --dev /dev/vda --rw randread --bs 4096 --threads 4 --seconds 3 --direct on --id randread-4k"
        ));
    }
}
