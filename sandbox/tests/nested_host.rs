//! Boots the real nested KVM host (QEMU TCG + Debian cloud kernel + kvm-amd)
//! and checks the job protocol end to end. Needs the assets of
//! `scripts/sandbox-assets`; without them these tests fail and say so.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{InfraFailure, Job, Payload, Sandbox, SandboxError};

fn sandbox() -> Sandbox {
    match Sandbox::from_env() {
        Ok(sandbox) => sandbox,
        Err(e) => panic!("{e}"),
    }
}

/// A sandbox with a work directory of its own (a fresh retry ledger, no lock shared with
/// the other tests): for the tests that cause retries on purpose, which must not count in
/// the ledger `scripts/test` reports.
fn sandbox_apart(name: &str) -> Sandbox {
    let mut sandbox = sandbox();
    let dir = std::env::temp_dir().join(format!("qx-sandbox-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    sandbox.config_mut().work_dir = dir;
    sandbox
}

#[test]
fn jobs_report_status_output_and_timeouts() {
    let sandbox = sandbox();
    let mut payload = Payload::new();
    payload
        .add_bytes(
            "/payload/hello.sh",
            "#!/bin/sh\necho \"hello from $(uname -n)\"\necho to-stderr >&2\n",
            0o755,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let jobs = [
        Job::shell(
            "kvm",
            "test -c /dev/kvm && echo kvm-present; grep -qw svm /proc/cpuinfo && echo svm-flag",
        )
        .timeout(Duration::from_secs(30)),
        Job::new("payload", ["hello.sh"]).timeout(Duration::from_secs(30)),
        Job::shell("exit3", "echo about to exit 3; exit 3").timeout(Duration::from_secs(30)),
        Job::shell("sleepy", "echo sleeping; sleep 600").timeout(Duration::from_secs(3)),
        Job::shell("after", "echo still alive").timeout(Duration::from_secs(30)),
    ];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "nested host ready after {:?} (uptime {:?}); run {:?}; initramfs {} bytes; log {}",
        report.host_ready_after,
        report.host_uptime_at_ready,
        report.total,
        report.initramfs_bytes,
        report.log_path.display()
    );

    assert_eq!(report.jobs.len(), jobs.len());
    let job = |name: &str| {
        report
            .job(name)
            .unwrap_or_else(|| panic!("no result for {name}"))
    };

    let kvm = job("kvm");
    assert!(kvm.success(), "{kvm:?}");
    assert!(kvm.output.contains("kvm-present"), "{kvm:?}");
    assert!(kvm.output.contains("svm-flag"), "{kvm:?}");

    let payload = job("payload");
    assert!(payload.success(), "{payload:?}");
    assert!(
        payload.output.contains("hello from qx-host\n"),
        "{payload:?}"
    );
    assert!(payload.output.contains("to-stderr\n"), "{payload:?}");

    let exit3 = job("exit3");
    assert_eq!(exit3.status, Some(3), "{exit3:?}");
    assert!(!exit3.timed_out, "{exit3:?}");
    assert_eq!(exit3.output, "about to exit 3\n");

    let sleepy = job("sleepy");
    assert!(sleepy.timed_out, "{sleepy:?}");
    assert!(sleepy.elapsed >= Duration::from_secs(3), "{sleepy:?}");
    assert!(sleepy.elapsed < Duration::from_secs(30), "{sleepy:?}");
    assert!(!sleepy.success());

    let after = job("after");
    assert!(after.success(), "{after:?}");
    assert_eq!(after.output, "still alive\n");

    assert!(
        report.console.contains("QX-HOST-READY"),
        "no readiness frame in the console"
    );
    assert!(report.log_path.is_file());
    assert!(report.host_ready_after > Duration::ZERO);
}

/// A nested host that does not come up in time is an infrastructure
/// failure, retried once, and QEMU is killed each time.
#[test]
fn a_host_that_never_gets_ready_is_an_infrastructure_failure() {
    let mut sandbox = sandbox_apart("never-ready");
    let config = sandbox.config_mut();
    config.boot_timeout = Duration::from_millis(500);
    config.retries = 1;
    let err = sandbox
        .run(&Payload::new(), &[Job::shell("never", "true")])
        .expect_err("a 0.5 s boot limit cannot be met");
    let SandboxError::Infrastructure {
        failure,
        attempts,
        log,
        ..
    } = &err
    else {
        panic!("expected an infrastructure failure, got {err}");
    };
    assert!(
        matches!(failure, InfraFailure::HostNotReady { .. }),
        "{err}"
    );
    assert_eq!(*attempts, 2, "{err}");
    assert!(log.is_file(), "{err}");
    assert!(err.is_infrastructure());
    // No QEMU of this run is left (its command line names the run directory).
    let run_dir = log
        .parent()
        .map(|d| d.display().to_string())
        .unwrap_or_default();
    let left = processes_mentioning(&run_dir);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

/// Without SVM, kvm-amd cannot load: the nested host says so at once and
/// the failure is not retried (it would fail the same way).
#[test]
fn a_host_without_kvm_fails_fast_with_its_log() {
    let mut sandbox = sandbox();
    sandbox.config_mut().cpu_model = "qemu64,-svm".to_string();
    let err = sandbox
        .run(&Payload::new(), &[Job::shell("never", "true")])
        .expect_err("kvm-amd cannot load without SVM");
    let SandboxError::Infrastructure {
        failure,
        attempts,
        console_tail,
        ..
    } = &err
    else {
        panic!("expected an infrastructure failure, got {err}");
    };
    assert!(
        matches!(failure, InfraFailure::HostSetup { reason, .. } if reason == "module-load"),
        "{err}"
    );
    assert_eq!(*attempts, 1, "{err}");
    assert!(console_tail.contains("kvm-amd"), "{err}");
}

/// Bad input is not an infrastructure failure and starts nothing.
#[test]
fn invalid_jobs_are_rejected_before_booting() {
    let err = sandbox()
        .run(&Payload::new(), &[Job::shell("a b", "true")])
        .expect_err("a name with a space is invalid");
    assert!(matches!(err, SandboxError::InvalidJob { .. }), "{err}");
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(needle))
                .unwrap_or(false)
        })
        .collect()
}

/// A nested host that dies once a job under test has begun is a product failure: not
/// retried, with the job named, the jobs before it, and the host's panic on the console.
#[test]
fn a_host_that_dies_in_a_job_under_test_is_not_retried() {
    let mut sandbox = sandbox_apart("dies-under-test");
    sandbox.config_mut().retries = 1;
    let ledger = sandbox
        .config()
        .work_dir
        .join(quantix_sandbox::RETRY_LEDGER);
    let retries_before = std::fs::read_to_string(&ledger).unwrap_or_default();
    let jobs = [
        Job::shell("setup", "echo setting up").reference(),
        Job::shell("first", "echo first done"),
        Job::shell(
            "crash",
            "echo crashing the host; echo c > /proc/sysrq-trigger; sleep 30",
        ),
        Job::shell("never", "echo never runs"),
    ];
    let err = sandbox
        .run(&Payload::new(), &jobs)
        .expect_err("the host panics in `crash`");
    let SandboxError::HostDied(d) = &err else {
        panic!("expected HostDied, got {err}");
    };
    let (failure, job, completed, job_output_tail, attempts, death) = (
        &d.failure,
        &d.job,
        &d.completed,
        &d.job_output_tail,
        &d.attempts,
        &d.death,
    );
    assert_eq!(job, "crash", "{err}");
    assert!(d.in_job, "{err}");
    assert_eq!(
        *attempts, 1,
        "a death in a job under test is never retried: {err}"
    );
    assert!(matches!(failure, InfraFailure::QemuExited { .. }), "{err}");
    let names: Vec<&str> = completed.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["setup", "first"], "{err}");
    assert!(job_output_tail.contains("crashing the host"), "{err}");
    assert!(death.contains("Kernel panic"), "{err}");
    assert!(!err.is_infrastructure());
    // Nothing was recorded as a retry.
    let retries_after = std::fs::read_to_string(&ledger).unwrap_or_default();
    assert_eq!(retries_before, retries_after);
}

/// A nested host that dies while only reference jobs ran is infrastructure: retried
/// (here it dies again), and each retry is written to the ledger that `scripts/test`
/// reports.
#[test]
fn a_host_that_dies_in_a_reference_job_is_retried_and_recorded() {
    let mut sandbox = sandbox_apart("dies-in-reference");
    sandbox.config_mut().retries = 1;
    let ledger = sandbox
        .config()
        .work_dir
        .join(quantix_sandbox::RETRY_LEDGER);
    let before = std::fs::read_to_string(&ledger).unwrap_or_default();
    let jobs = [
        Job::shell("qemu-only", "echo c > /proc/sysrq-trigger; sleep 30").reference(),
        Job::shell("product", "echo never runs"),
    ];
    let err = sandbox
        .run(&Payload::new(), &jobs)
        .expect_err("the host panics in `qemu-only`, twice");
    let SandboxError::Infrastructure {
        failure, attempts, ..
    } = &err
    else {
        panic!("expected an infrastructure failure, got {err}");
    };
    assert!(matches!(failure, InfraFailure::QemuExited { .. }), "{err}");
    assert_eq!(*attempts, 2, "{err}");
    let after = std::fs::read_to_string(&ledger).unwrap_or_default();
    let added = after.strip_prefix(before.as_str()).unwrap_or(&after);
    assert_eq!(added.lines().count(), 1, "one retry recorded: {added}");
    assert!(added.contains("QEMU exited"), "{added}");
}
