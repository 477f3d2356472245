//! Every VMM the agent starts is jailed: checked from outside through /proc, on a real agent
//! with a hand-made guest on this host's /dev/kvm.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::*;
use quantix_proto::v1::{RestartPolicy, VmState};

fn field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_runs_unprivileged_filtered_and_alone() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let dir = scratch("jail");
    let g = guests(&dir);
    let state = dir.join("state");
    let agent = Agent::start(&state, "jail");
    let mut c = agent.client().await;
    let mut s = spec("j1", &g.idle, RestartPolicy::Never);
    s.vcpus = 2;
    s.vsock = Some(quantix_proto::v1::Vsock { guest_cid: 7 });
    create(&mut c, "j1", s, true).await;
    let vm = wait_state(&mut c, "j1", VmState::Running, Duration::from_secs(20)).await;
    let pid = pid(&vm);
    let agent_pid = agent.child.as_ref().unwrap().id();

    // Wait for both vCPU threads, then check every thread.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let threads = loop {
        let t: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        let names: Vec<String> = t
            .iter()
            .filter_map(|p| std::fs::read_to_string(p.join("comm")).ok())
            .collect();
        if names.iter().filter(|n| n.starts_with("vcpu")).count() == 2
            || std::time::Instant::now() > deadline
        {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut uids = Vec::new();
    for t in &threads {
        let st = std::fs::read_to_string(t.join("status")).unwrap();
        let name = field(&st, "Name");
        let uid: u32 = field(&st, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_ne!(uid, 0, "thread {name} runs as root");
        assert_eq!(field(&st, "Seccomp"), "2", "thread {name}");
        assert_eq!(field(&st, "NoNewPrivs"), "1", "thread {name}");
        assert_eq!(field(&st, "CapEff"), "0000000000000000", "thread {name}");
        assert_eq!(field(&st, "CapBnd"), "0000000000000000", "thread {name}");
        uids.push(uid);
    }
    uids.dedup();
    assert_eq!(uids.len(), 1, "one uid for the VMM: {uids:?}");
    assert!(
        uids[0] >= 2_100_000_000,
        "a uid of the jail range: {uids:?}"
    );
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let vmm = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/{agent_pid}/ns/{ns}")).unwrap();
        assert_ne!(vmm, ours, "{ns} namespace");
    }
    let root = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail = std::fs::metadata(state.join("vms/j1/root")).unwrap();
    assert_eq!(
        (root.dev(), root.ino()),
        (jail.dev(), jail.ino()),
        "its root"
    );
    // Its files are descriptors: there is no image, no /dev, no /proc in its root.
    let entries: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root/"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(entries.contains(&"run".to_string()), "{entries:?}");
    for absent in ["dev", "proc", "etc", "images"] {
        assert!(
            !entries.contains(&absent.to_string()),
            "{absent} in {entries:?}"
        );
    }
    // Its vsock socket is in the VM's vsock directory, which host services share with this
    // VMM (its group) and nobody else.
    let vsock_dir = std::fs::metadata(state.join("vms/j1/root/vsock")).unwrap();
    assert_eq!(vsock_dir.mode() & 0o7777, 0o770, "vsock directory mode");
    assert_eq!(vsock_dir.gid(), uids[0], "vsock directory group");
    let vsock = state.join("vms/j1/root/vsock/vsock.sock");
    assert_eq!(
        vm.status.as_ref().unwrap().vsock_socket,
        vsock.display().to_string()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !vsock.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sock = std::fs::symlink_metadata(&vsock).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_socket(&sock.file_type()));
    assert_eq!(sock.uid(), uids[0], "the VMM bound its vsock socket");

    // It is in its own cgroup(s), named after the VM, and so is each of its threads.
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        cg.lines().any(|l| l.ends_with("/j1")),
        "the VMM's cgroups name the VM:\n{cg}"
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let procs = limits
        .lines()
        .find(|l| l.starts_with("Max processes"))
        .unwrap()
        .to_string();
    assert!(
        procs.split_whitespace().any(|w| w == "68"),
        "64 + 2 per vCPU: {procs}"
    );

    // The console still works through the jail, and so does a graceful stop.
    console_until(&mut c, "j1", "hello from guest", Duration::from_secs(20)).await;
    stop(&mut c, "j1").await;
    let vm = wait_state(&mut c, "j1", VmState::Stopped, Duration::from_secs(20)).await;
    // The exit record, written inside the jail, reached the agent.
    let exit = vm.status.unwrap().last_exit.unwrap();
    assert_eq!(exit.reason, "api-shutdown", "{exit:?}");
}
