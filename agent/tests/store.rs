//! The agent keeps working when its store goes wrong: a damaged store file is reported with
//! what to do, and a lost store is rebuilt from the VMs' directories, their VMMs re-adopted.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use quantix_proto::v1::{ListVmsRequest, RestartPolicy, VmState};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_store_is_rebuilt_from_the_vm_directories() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let dir = scratch("store-lost");
    let g = guests(&dir);
    let state = dir.join("state");
    let mut agent = Agent::start(&state, "store-lost");
    let mut c = agent.client().await;
    create(
        &mut c,
        "s1",
        spec("s1", &g.idle, RestartPolicy::Never),
        true,
    )
    .await;
    create(
        &mut c,
        "s2",
        spec("s2", &g.idle, RestartPolicy::Never),
        false,
    )
    .await;
    let vm = wait_state(&mut c, "s1", VmState::Running, Duration::from_secs(20)).await;
    let vmm = pid(&vm);
    agent.kill();
    // The store is gone (a damaged file moved aside, as the agent's message says).
    std::fs::rename(state.join("state.redb"), state.join("state.redb.broken")).unwrap();
    agent.spawn();
    let mut c = agent.client().await;
    let vm = wait_state(&mut c, "s1", VmState::Running, Duration::from_secs(20)).await;
    assert_eq!(pid(&vm), vmm, "the running VMM was re-adopted, not killed");
    assert_eq!(vm.spec.as_ref().unwrap().name, "s1");
    let list = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<&str> = list.vms.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2"]);
    assert_eq!(common::state(&list.vms[1]), VmState::Stopped);
    stop(&mut c, "s1").await;
}

#[test]
fn a_damaged_store_file_is_reported_with_what_to_do() {
    let dir = scratch("store-damaged");
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("state.redb"), vec![0x5a; 64 * 1024]).unwrap();
    let out = Command::new(bin("quantix-agent"))
        .arg("--state-dir")
        .arg(&state)
        .args(["--metrics-listen", ""])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("cannot be opened") && err.contains("move the file aside"),
        "{err}"
    );
    // Nothing was overwritten.
    assert_eq!(
        std::fs::read(state.join("state.redb")).unwrap(),
        vec![0x5a; 64 * 1024]
    );
}
