//! Where the agent puts VMMs in the cgroup tree, tested the way systemd acts on a unit:
//! the agent starts in a delegated cgroup v2 group, and killing every process of the
//! agent's own group (`cgroup.kill`) leaves its VMs running; the next agent re-adopts them.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use quantix_proto::v1::{RestartPolicy, VmState};

/// The cgroup v2 hierarchy (pure v2, or the `unified` one of a hybrid host).
fn v2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").exists() && p.join("cgroup.procs").exists())
}

fn procs(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agents_cgroup_leaves_its_vms_running() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let Some(root) = v2_root() else {
        eprintln!("SKIPPED: no cgroup v2 hierarchy here");
        return;
    };
    // The "unit's" delegated group.
    let unit = root.join(format!("qx-test-unit-{}", std::process::id()));
    std::fs::create_dir_all(&unit).unwrap();
    if !unit.join("cgroup.kill").exists() {
        eprintln!("SKIPPED: this kernel has no cgroup.kill");
        return;
    }
    let dir = scratch("cgroup-kill");
    let g = guests(&dir);
    let state = dir.join("state");
    let mut agent = Agent {
        child: None,
        state_dir: state.clone(),
        extra: Vec::new(),
        name: "cgroup-kill".into(),
        cgroup: Some(unit.clone()),
    };
    agent.spawn();
    let mut c = agent.client().await;
    create(
        &mut c,
        "k1",
        spec("k1", &g.idle, RestartPolicy::Never),
        true,
    )
    .await;
    let vm = wait_state(&mut c, "k1", VmState::Running, Duration::from_secs(20)).await;
    let vmm = pid(&vm);
    let agent_pid = agent.child.as_ref().unwrap().id();

    // The agent moved itself into the unit's "agent" leaf; the VMM is beside it.
    let leaf = unit.join("agent");
    assert!(
        procs(&leaf).contains(&agent_pid),
        "agent in {}",
        leaf.display()
    );
    assert!(
        !procs(&leaf).contains(&vmm),
        "the VMM is not in the agent's group"
    );
    let vm_group = unit.join("vms/k1");
    assert!(
        procs(&vm_group).contains(&vmm),
        "the VMM in {}",
        vm_group.display()
    );

    // What systemd does to the agent's group.
    std::fs::write(leaf.join("cgroup.kill"), "1").unwrap();
    let status = agent.child.as_mut().unwrap().wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL), "the agent was killed");
    agent.child = None;
    assert_eq!(
        crate::common::listener_pid(&api_socket(&state, "k1")),
        Some(vmm as i32),
        "the VMM still runs and serves its control socket"
    );

    // A new agent (systemd's restart) re-adopts it.
    agent.spawn();
    let mut c = agent.client().await;
    let vm = wait_state(&mut c, "k1", VmState::Running, Duration::from_secs(20)).await;
    assert_eq!(pid(&vm), vmm, "the same VMM, re-adopted");
    stop(&mut c, "k1").await;
    wait_state(&mut c, "k1", VmState::Stopped, Duration::from_secs(20)).await;
    drop(c);
    drop(agent);
    // Leave no groups behind (the agent's leaf is empty once it is gone).
    std::thread::sleep(Duration::from_millis(200));
    for d in [unit.join("vms/k1"), unit.join("vms"), leaf, unit] {
        let _ = std::fs::remove_dir(&d);
    }
}
