//! Proof that a nested guest works: Debian's QEMU (`-M microvm`, KVM) runs
//! inside the nested host and boots the unmodified cloud kernel to the
//! guest initramfs, whose `QX-GUEST-INIT` line comes back through the
//! frames. Benchmarks reuse this setup (`guest_qemu_job`).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{paths, GuestInit, Job, Payload, Sandbox};

/// QEMU microvm booting `kernel` (a path inside the nested host) as a guest
/// with 2 vCPUs and 256 MiB.
fn guest_qemu_job(name: &str, kernel: &str) -> Job {
    Job::new(
        name,
        [
            paths::QEMU,
            "-M",
            "microvm",
            "-enable-kvm",
            "-cpu",
            "host",
            "-m",
            "256",
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
            "-serial",
            "stdio",
            "-L",
            paths::QEMU_FIRMWARE_DIR,
            "-kernel",
            kernel,
            "-initrd",
            paths::GUEST_INITRAMFS,
            "-append",
            "console=ttyS0 reboot=t panic=-1 qx.action=poweroff",
        ],
    )
    .timeout(Duration::from_secs(240))
    .reference()
}

#[test]
fn qemu_microvm_boots_the_cloud_kernel_in_the_nested_host() {
    let sandbox = match Sandbox::from_env() {
        Ok(sandbox) => sandbox,
        Err(e) => panic!("{e}"),
    };
    let mut payload = Payload::new();
    let assets = sandbox.assets().clone();
    payload.add_qemu(&assets).unwrap_or_else(|e| panic!("{e}"));
    let jobs = [guest_qemu_job("qemu-microvm", paths::GUEST_VMLINUZ)];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    let job = &report.jobs[0];
    eprintln!(
        "nested host ready after {:?}; QEMU microvm job {:?} (status {:?}); initramfs {} bytes; log {}",
        report.host_ready_after,
        job.elapsed,
        job.status,
        report.initramfs_bytes,
        report.log_path.display()
    );
    assert!(job.success(), "QEMU microvm job failed: {job:?}");
    let init = GuestInit::find(&job.output).unwrap_or_else(|| {
        panic!(
            "no QX-GUEST-INIT line in the guest's output:\n{}",
            job.output
        )
    });
    eprintln!("guest: {init:?}");
    assert_eq!(init.cpus, 2, "{init:?}");
    assert_eq!(init.kernel, assets.kernel_version, "{init:?}");
    assert!(
        init.memtotal_kb > 100_000 && init.memtotal_kb < 262_144,
        "{init:?}"
    );
}
