//! SMP reliability on a real KVM: in one nested host, `quantix-vmm` boots Debian's
//! unmodified cloud kernel with 4 and 8 vCPUs several times (bzImage and PVH entry), and
//! every boot must bring up every vCPU and power off cleanly. A triple fault, a guest
//! panic or a nested host that dies fails the test; nothing is retried once the first
//! boot began (the sandbox reports such a death as `HostDied`). The nested host's kernel
//! traces KVM's shutdown exits meanwhile, so a triple fault shows the guest RIP KVM saw
//! (on AMD the vCPU's registers are reset before the exit reaches the VMM).
//! `quantix-bench smp` is the same check as a long stress run (benches/README.md).
//!
//! A control case closes the run: a hand-made guest whose only instruction is `ud2`
//! (no IDT: #UD, #GP, #DF, shutdown) must end with status 3, the VMM must say that the
//! registers are lost (AMD), and the trace must hold exactly that shutdown with the
//! guest RIP of the `ud2`: proof that the checks above can see a triple fault.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use quantix_sandbox::{build, kvm_trace, paths, GuestInit, Job, JobResult, Payload, Sandbox};

const VMM: &str = "/payload/quantix-vmm";

/// (job name, kernel, vCPUs)
const BOOTS: &[(&str, &str, u32)] = &[
    ("bzimage-4cpu-1", paths::GUEST_VMLINUZ, 4),
    ("bzimage-8cpu-1", paths::GUEST_VMLINUZ, 8),
    ("vmlinux-4cpu-1", paths::GUEST_VMLINUX, 4),
    ("bzimage-4cpu-2", paths::GUEST_VMLINUZ, 4),
    ("vmlinux-8cpu-1", paths::GUEST_VMLINUX, 8),
    ("bzimage-8cpu-2", paths::GUEST_VMLINUZ, 8),
];

/// Where the triple-fault guest goes, and the address of its `ud2` (the ELF's entry).
const FAULT_GUEST: &str = "/payload/ud2.elf";
const FAULT_RIP: &str = "rip 0x1000078";

fn boot_job(name: &str, kernel: &str, cpus: u32) -> Job {
    let cpus = cpus.to_string();
    Job::new(
        name,
        [
            VMM,
            "--kernel",
            kernel,
            "--initramfs",
            paths::GUEST_INITRAMFS,
            "--cpus",
            &cpus,
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0 qx.action=poweroff",
        ],
    )
    .timeout(Duration::from_secs(240))
}

fn check(name: &str, cpus: u32, r: &JobResult) {
    let context = || {
        format!(
            "boot {name} ({cpus} vCPUs): status {:?}, timed out {}\n{}",
            r.status, r.timed_out, r.output
        )
    };
    assert!(!r.timed_out, "{}", context());
    assert!(
        !r.output.contains("triple"),
        "a vCPU faulted: {}",
        context()
    );
    assert!(!r.output.contains("Kernel panic"), "{}", context());
    assert_eq!(r.status, Some(0), "{}", context());
    let init = GuestInit::find(&r.output)
        .unwrap_or_else(|| panic!("no QX-GUEST-INIT line: {}", context()));
    assert_eq!(init.cpus, cpus, "vCPUs online in the guest: {}", context());
    assert!(
        r.output.contains("reason=\"poweroff\""),
        "expected a poweroff: {}",
        context()
    );
    eprintln!(
        "{name}: {cpus} vCPUs up, init at {:.2} s guest uptime, {:?} in the nested host",
        init.uptime_s, r.elapsed
    );
}

#[test]
fn multi_vcpu_guests_boot_again_and_again_without_a_fault() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm").unwrap_or_else(|e| panic!("{e}"));
    let mut payload = Payload::new();
    payload
        .add_file(&vmm, VMM)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes(FAULT_GUEST, common::elf64(&[0x0f, 0x0b]), 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut jobs = vec![kvm_trace::enable("trace-on", kvm_trace::Extra::Nothing)];
    jobs.extend(BOOTS.iter().map(|(n, k, c)| boot_job(n, k, *c)));
    jobs.push(kvm_trace::take("trace-show"));
    jobs.push(
        Job::new(
            "control-triple-fault",
            [VMM, "--kernel", FAULT_GUEST, "--memory", "64M"],
        )
        .timeout(Duration::from_secs(60)),
    );
    jobs.push(kvm_trace::take("trace-control"));
    // A nested host that dies after the first boot began fails here with its console.
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nested host ready after {:?}, {} attempt(s); log {}",
        report.host_ready_after,
        report.attempts,
        report.log_path.display()
    );
    let trace = report.job("trace-on").expect("trace-on ran");
    assert!(trace.success(), "{}", trace.output);
    for (name, _, cpus) in BOOTS {
        let r = report
            .job(name)
            .unwrap_or_else(|| panic!("no result for {name}"));
        check(name, *cpus, r);
    }
    // No shutdown exit at all, not even one a VMM could have missed or retried past.
    let shown = report.job("trace-show").expect("trace-show ran");
    assert!(shown.output.contains("trace end"), "{}", shown.output);
    assert!(
        !shown.output.contains("kvm_exit"),
        "KVM saw a vCPU shut down (triple fault):\n{}",
        shown.output
    );

    // The control: a triple fault is seen, by its status, the VMM's words and the trace.
    let fault = report.job("control-triple-fault").expect("control ran");
    assert_eq!(fault.status, Some(3), "{}", fault.output);
    assert!(
        fault.output.contains("Its registers are lost"),
        "on the nested AMD host the VMM must say the registers are the INIT state:\n{}",
        fault.output
    );
    let traced = report.job("trace-control").expect("trace-control ran");
    let shutdowns: Vec<&str> = traced
        .output
        .lines()
        .filter(|l| l.contains("kvm_exit"))
        .collect();
    assert_eq!(shutdowns.len(), 1, "{}", traced.output);
    assert!(
        shutdowns[0].contains("shutdown") && shutdowns[0].contains(FAULT_RIP),
        "the trace must carry the guest RIP of the fault: {}",
        shutdowns[0]
    );
}
