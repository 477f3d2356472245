//! Snapshots through the agent on this host's /dev/kvm: a real agent (jailing its VMMs),
//! real quantix-vmm processes running a hand-made guest that counts the keys typed on its
//! serial console, and a real gRPC client. A restored guest must go on counting from where
//! its snapshot was taken: its registers, its memory and its devices came back.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use quantix_proto::v1::vm_service_client::VmServiceClient;
use quantix_proto::v1::{
    console_input, ConsoleInput, DeleteSnapshotRequest, EventKind, GetSnapshotRequest,
    ListSnapshotsRequest, RestartPolicy, RestoreVmRequest, Snapshot, SnapshotAfter, SnapshotKind,
    SnapshotVmRequest, VmSpec, VmState,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

/// Where the guest keeps its count (guest-physical, identity-mapped, unused by the boot).
const COUNTER: u32 = 0x30_0000;

/// Prints "counter ready\n", then for every byte received on COM1 adds one to the byte at
/// COUNTER and prints it as the digit '0' + count (busy polling the line status).
fn counter_guest(dir: &Path) -> PathBuf {
    let mut code = delay();
    code.extend(asm::print(b"counter ready\n"));
    let addr = COUNTER.to_le_bytes();
    code.extend([0x66, 0xba, 0xfd, 0x03]); // loop: mov dx, 0x3fd (line status)
    code.push(0xec); // in al, dx
    code.extend([0xa8, 0x01]); // test al, 1 (data ready)
    code.extend([0x74, 0xf7]); // jz loop
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.push(0xec); // in al, dx (take the byte)
    code.extend([0xfe, 0x04, 0x25]); // inc byte [COUNTER]
    code.extend(addr);
    code.extend([0x8a, 0x04, 0x25]); // mov al, [COUNTER]
    code.extend(addr);
    code.extend([0x04, b'0']); // add al, '0'
    code.push(0xee); // out dx, al
    code.extend([0xeb, 0xdf]); // jmp loop (33 bytes back)
    let path = dir.join("images/counter.elf");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, elf64(&code)).unwrap();
    path
}

/// Types one key on the VM's serial console and returns the digit the guest answers with.
/// Waits first for the agent's console pump to be connected to the VMM (a key typed before
/// would be lost, and typing again would count twice).
async fn type_key(c: &mut VmServiceClient<Channel>, state_dir: &Path, id: &str) -> char {
    let deadline = tokio::time::Instant::now() + LIMIT;
    while serial_connections(state_dir, id) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{id}: no console pump"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, mut out) = attach_console(c, id, false).await;
    // The session is live once the agent has it: give it a moment before typing.
    tokio::time::sleep(Duration::from_millis(200)).await;
    tx.send(ConsoleInput {
        input: Some(console_input::Input::Data(b"k".to_vec())),
    })
    .await
    .unwrap();
    loop {
        match tokio::time::timeout_at(deadline, out.next()).await {
            Ok(Some(Ok(m))) => {
                if let Some(d) = m.data.iter().find(|b| b.is_ascii_digit()) {
                    return *d as char;
                }
            }
            other => panic!("{id}: no answer to a key ({other:?})"),
        }
    }
}

async fn snapshot(
    c: &mut VmServiceClient<Channel>,
    vm: &str,
    id: &str,
    diff: bool,
    after: SnapshotAfter,
) -> Result<Snapshot, tonic::Status> {
    c.snapshot_vm(SnapshotVmRequest {
        vm_id: vm.into(),
        snapshot_id: id.into(),
        diff,
        after: after as i32,
    })
    .await
    .map(|r| r.into_inner())
}

async fn restore(
    c: &mut VmServiceClient<Channel>,
    snapshot: &str,
    vm: &str,
    spec: Option<VmSpec>,
    lazy: bool,
) -> Result<quantix_proto::v1::Vm, tonic::Status> {
    c.restore_vm(RestoreVmRequest {
        snapshot_id: snapshot.into(),
        vm_id: vm.into(),
        spec,
        start: true,
        lazy,
    })
    .await
    .map(|r| r.into_inner())
}

async fn delete_snapshot(c: &mut VmServiceClient<Channel>, id: &str) -> Result<(), tonic::Status> {
    c.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: id.into(),
    })
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_the_guest_where_it_was_and_keep_their_chain() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let dir = scratch("snapshots");
    let state_dir = dir.join("state");
    let kernel = counter_guest(&dir);
    let mut agent = Agent::start(&state_dir, "snapshots");
    let mut c = agent.client().await;
    let mut events = watch(&mut c, "").await;

    create(
        &mut c,
        "src",
        spec("src", &kernel, RestartPolicy::Never),
        true,
    )
    .await;
    console_until(&mut c, "src", "counter ready", LIMIT).await;
    assert_eq!(type_key(&mut c, &state_dir, "src").await, '1');
    assert_eq!(type_key(&mut c, &state_dir, "src").await, '2');

    // A full snapshot of the running VM; it runs on.
    let full = snapshot(&mut c, "src", "s1", false, SnapshotAfter::Keep)
        .await
        .unwrap();
    assert_eq!(full.kind, SnapshotKind::Full as i32);
    assert_eq!((full.vm_id.as_str(), full.parent_id.as_str()), ("src", ""));
    assert_eq!(full.memory_bytes, 64 << 20);
    assert!(full.data_bytes > 0 && full.data_bytes < full.memory_bytes);
    let files = PathBuf::from(&full.directory);
    assert!(files.starts_with(&state_dir), "{files:?}");
    for f in ["vmstate", "memory"] {
        let m = std::fs::metadata(files.join(f)).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o444, "{f} is sealed");
    }
    assert!(
        !state_dir.join("vms/src/root/snapshots").exists(),
        "nothing is left in the VMM's jail"
    );
    let ev = wait_event(&mut events, LIMIT, |e| {
        e.kind == EventKind::SnapshotTaken as i32
    })
    .await;
    let ev = ev.last().unwrap();
    assert_eq!((ev.vm_id.as_str(), ev.snapshot_id.as_str()), ("src", "s1"));
    assert_eq!(ev.state, VmState::Running as i32);
    assert_eq!(state(&get(&mut c, "src").await), VmState::Running);
    assert_eq!(type_key(&mut c, &state_dir, "src").await, '3');

    // A diff holds the pages written since: a small part of the full one.
    let diff = snapshot(&mut c, "src", "s2", true, SnapshotAfter::Pause)
        .await
        .unwrap();
    assert_eq!(diff.kind, SnapshotKind::Diff as i32);
    assert_eq!(diff.parent_id, "s1");
    assert!(
        diff.data_bytes > 0 && diff.data_bytes * 4 <= full.data_bytes,
        "diff {} bytes, full {} bytes",
        diff.data_bytes,
        full.data_bytes
    );
    assert_eq!(state(&get(&mut c, "src").await), VmState::Paused);
    eprintln!(
        "full: {} bytes of pages, {} on disk, paused {} ms; diff: {} bytes, paused {} ms",
        full.data_bytes, full.disk_bytes, full.paused_ms, diff.data_bytes, diff.paused_ms
    );

    // Refusals, each with its code.
    let e = snapshot(&mut c, "src", "s1", false, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    let e = snapshot(&mut c, "src", "bad/id", false, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = snapshot(&mut c, "nobody", "s9", false, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .get_snapshot(GetSnapshotRequest {
            snapshot_id: "missing".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("snapshot_id"), "{e:?}");
    let e = delete_snapshot(&mut c, "s1").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("s2"), "names the diff on it: {e:?}");

    // A last diff, and the VM stops: restoring it is how it goes on.
    let last = snapshot(&mut c, "src", "s3", true, SnapshotAfter::Stop)
        .await
        .unwrap();
    assert_eq!(last.parent_id, "s2");
    let src = wait_state(&mut c, "src", VmState::Stopped, LIMIT).await;
    assert_eq!(pid(&src), 0);
    let e = snapshot(&mut c, "src", "s4", false, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a stopped VM: {e:?}");

    // The snapshot's own spec: its VM's name is taken (the stopped source has it).
    let e = restore(&mut c, "s3", "copy-1", None, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");
    // The guest side must be the snapshot's.
    let mut wrong = full.spec.clone().unwrap();
    wrong.name = "copy-one".into();
    wrong.memory_mib = 128;
    let e = restore(&mut c, "s3", "copy-1", Some(wrong), false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("spec.memory_mib"), "{e:?}");

    // Restored from the end of the chain: the count goes on from 3.
    let mut one = last.spec.clone().unwrap();
    one.name = "copy-one".into();
    let copy = restore(&mut c, "s3", "copy-1", Some(one), false)
        .await
        .unwrap();
    assert_eq!(state(&copy), VmState::Running);
    let st = copy.status.clone().unwrap();
    assert_eq!(
        (st.restored_from.as_str(), st.pending_restore.as_str()),
        ("s3", "")
    );
    assert_eq!(
        st.nic_macs,
        src.status.clone().unwrap().nic_macs,
        "the guest keeps its MACs"
    );
    assert!(
        !state_dir.join("vms/copy-1/root/snapshots").exists(),
        "the chain's links are gone once the VMM has it"
    );
    assert_eq!(type_key(&mut c, &state_dir, "copy-1").await, '4');
    let history = console_until(&mut c, "copy-1", "4", LIMIT).await;
    assert!(
        !history.contains("counter ready"),
        "a restore does not boot: {history:?}"
    );

    // A second copy of the middle of the chain runs beside the first, restored lazily (its
    // jailed VMM gets the agent's /dev/userfaultfd).
    let mut two = diff.spec.clone().unwrap();
    two.name = "copy-two".into();
    let lazy = restore(&mut c, "s2", "copy-2", Some(two), true)
        .await
        .unwrap();
    assert!(!lazy.status.as_ref().unwrap().pending_restore_lazy);
    let (args, _, _) = vmm_config(pid(&lazy));
    assert!(args.iter().any(|a| a == "--lazy"), "{args:?}");
    assert_eq!(type_key(&mut c, &state_dir, "copy-2").await, '4');
    assert_eq!(type_key(&mut c, &state_dir, "copy-1").await, '5');
    // A restored VMM has no base for a diff yet.
    let e = snapshot(&mut c, "copy-1", "c1", true, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // The store survives the agent: the same snapshots, and the copies re-adopted.
    agent.kill();
    agent.spawn();
    let mut c = agent.client().await;
    let list = c
        .list_snapshots(ListSnapshotsRequest {
            vm_id: "src".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    let ids: Vec<&str> = list.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, ["s1", "s2", "s3"]);
    assert_eq!(type_key(&mut c, &state_dir, "copy-1").await, '6');
    // The agent's record of a VMM's last snapshot went with its restart: a diff is refused
    // rather than trusting the parent the VMM would name.
    let full_copy = snapshot(&mut c, "copy-1", "c1", false, SnapshotAfter::Keep)
        .await
        .unwrap();
    assert_eq!(full_copy.parent_id, "");
    agent.kill();
    agent.spawn();
    let mut c = agent.client().await;
    let e = snapshot(&mut c, "copy-1", "c2", true, SnapshotAfter::Keep)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().starts_with("diff:"), "{e:?}");
    delete_snapshot(&mut c, "c1").await.unwrap();

    // Deleting a snapshot leaves the VM restored from it running; the chain is deleted
    // from its end.
    delete_snapshot(&mut c, "s3").await.unwrap();
    assert_eq!(type_key(&mut c, &state_dir, "copy-1").await, '7');
    let e = restore(&mut c, "s3", "copy-3", None, false)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    delete_snapshot(&mut c, "s2").await.unwrap();
    delete_snapshot(&mut c, "s1").await.unwrap();
    assert!(!files.exists(), "its files are gone");
    let left = c
        .list_snapshots(ListSnapshotsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .snapshots;
    assert!(left.is_empty(), "{left:?}");
    delete(&mut c, "copy-1", true).await;
    delete(&mut c, "copy-2", true).await;
    delete(&mut c, "src", false).await;
}
