//! End to end, on a real KVM: `quantix-vmm` boots Debian's unmodified cloud kernel (its
//! bzImage and the vmlinux extracted from it, PVH entry) inside the nested sandbox, and
//! the guest's init reports the vCPUs and memory it was given. Poweroff and reboot end
//! the VMM with status 0. 16 vCPUs is the least the MADT must bring online.
//! See docs/testing.md.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{build, paths, GuestInit, Job, JobResult, Payload, Sandbox};

const VMM: &str = "/payload/quantix-vmm";

struct Case {
    name: &'static str,
    kernel: &'static str,
    cpus: u32,
    memory_mib: u64,
    action: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "bzimage-1cpu-poweroff",
        kernel: paths::GUEST_VMLINUZ,
        cpus: 1,
        memory_mib: 256,
        action: "poweroff",
    },
    Case {
        name: "bzimage-4cpu-reboot",
        kernel: paths::GUEST_VMLINUZ,
        cpus: 4,
        memory_mib: 512,
        action: "reboot",
    },
    Case {
        name: "vmlinux-1cpu-reboot",
        kernel: paths::GUEST_VMLINUX,
        cpus: 1,
        memory_mib: 384,
        action: "reboot",
    },
    Case {
        name: "vmlinux-4cpu-poweroff",
        kernel: paths::GUEST_VMLINUX,
        cpus: 4,
        memory_mib: 320,
        action: "poweroff",
    },
];

fn job(case: &Case) -> Job {
    let cpus = case.cpus.to_string();
    let memory = format!("{}M", case.memory_mib);
    let cmdline = format!("console=ttyS0 qx.action={}", case.action);
    Job::new(
        case.name,
        [
            VMM,
            "--kernel",
            case.kernel,
            "--initramfs",
            paths::GUEST_INITRAMFS,
            "--cpus",
            &cpus,
            "--memory",
            &memory,
            "--cmdline",
            &cmdline,
        ],
    )
    .timeout(Duration::from_secs(180))
}

fn check(case: &Case, result: &JobResult) {
    let context = || {
        format!(
            "job {}: status {:?}, timed out {}\n{}",
            case.name, result.status, result.timed_out, result.output
        )
    };
    assert!(!result.timed_out, "{}", context());
    assert_eq!(result.status, Some(0), "{}", context());
    let init = GuestInit::find(&result.output)
        .unwrap_or_else(|| panic!("no QX-GUEST-INIT line: {}", context()));
    assert_eq!(
        init.cpus,
        case.cpus,
        "vCPUs online in the guest: {}",
        context()
    );
    // MemTotal is RAM less what the kernel keeps for itself and the BIOS area.
    let mem_kb = case.memory_mib * 1024;
    assert!(
        init.memtotal_kb > mem_kb * 8 / 10 && init.memtotal_kb < mem_kb,
        "MemTotal {} kB for --memory {} MiB: {}",
        init.memtotal_kb,
        case.memory_mib,
        context()
    );
    let expected_reason = if case.action == "reboot" {
        "reason=\"reboot\""
    } else {
        "reason=\"poweroff\""
    };
    assert!(
        result.output.contains(expected_reason),
        "expected {expected_reason}: {}",
        context()
    );
    // The serial console carried the kernel's own messages too, not only init's line.
    assert!(result.output.contains("Linux version"), "{}", context());
    // Guest time runs on kvm-clock.
    assert!(
        result
            .output
            .contains("clocksource: Switched to clocksource kvm-clock"),
        "{}",
        context()
    );
    eprintln!(
        "{}: {:?} (guest init at {:.2} s uptime, job {:?})",
        case.name, init, init.uptime_s, result.elapsed
    );
}

#[test]
fn debian_cloud_kernel_boots_to_init_with_the_requested_vcpus_and_memory() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm").unwrap_or_else(|e| panic!("{e}"));
    let mut payload = Payload::new();
    payload
        .add_file(&vmm, VMM)
        .unwrap_or_else(|e| panic!("{e}"));
    let jobs: Vec<Job> = CASES.iter().map(job).collect();
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nested host ready after {:?}; log {}",
        report.host_ready_after,
        report.log_path.display()
    );
    for (case, result) in CASES.iter().zip(&report.jobs) {
        check(case, result);
    }
}
