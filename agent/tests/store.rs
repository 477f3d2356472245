//! The agent keeps working when its store goes wrong: a damaged store file is reported with
//! what to do, and a lost store is rebuilt from the VMs' directories, their VMMs re-adopted.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

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

/// A full disk under the state directory: a VM that stops meanwhile is reported stopped at
/// once and its VMM's end is noticed, and after the disk has room again a restarted agent
/// finds it stopped. (That the store's failures keep the record in memory is proven by the
/// manager's unit test: whether redb must grow its file here depends on its free pages.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_leaves_no_vm_stuck() {
    // SAFETY: geteuid cannot fail and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    if !have_kvm() || !root {
        eprintln!("SKIPPED: needs /dev/kvm and root (it mounts a small tmpfs)");
        return;
    }
    let dir = scratch("store-full");
    let g = guests(&dir);
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m,mode=0711", "tmpfs"])
        .arg(&state)
        .status()
        .unwrap();
    assert!(mounted.success(), "mount a tmpfs");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(state.clone());
    let mut agent = Agent::start(&state, "store-full");
    let mut c = agent.client().await;
    create(
        &mut c,
        "f1",
        spec("f1", &g.idle, RestartPolicy::Never),
        true,
    )
    .await;
    wait_state(&mut c, "f1", VmState::Running, Duration::from_secs(20)).await;

    // Fill the file system.
    let filler = state.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    stop(&mut c, "f1").await;
    let vm = wait_state(&mut c, "f1", VmState::Stopped, Duration::from_secs(20)).await;
    // The VMM's own exit record may not fit on the full disk either: then its status says
    // how it ended.
    let reason = vm.status.unwrap().last_exit.unwrap().reason;
    assert!(reason == "api-shutdown" || reason == "exited", "{reason}");
    // Room again; a restarted agent finds the VM stopped (the record landed, from memory
    // or at once: which one depends on whether the store had to grow its file).
    std::fs::remove_file(&filler).unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    agent.kill();
    agent.spawn();
    let mut c = agent.client().await;
    let vm = get(&mut c, "f1").await;
    assert_eq!(common::state(&vm), VmState::Stopped);
    drop(agent);
}
