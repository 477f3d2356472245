//! The agent end to end on this host's /dev/kvm: a real agent process, real quantix-vmm
//! processes running hand-made guests, and a real gRPC client.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use quantix_proto::v1::{
    CreateVmRequest, DeleteVmRequest, EventKind, GetNodeRequest, GetVmRequest, ListVmsRequest,
    PauseVmRequest, RebootVmRequest, RestartPolicy, ResumeVmRequest, StartVmRequest,
    StopVmRequest, VmState,
};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(20);

macro_rules! require_kvm {
    () => {
        if !have_kvm() {
            eprintln!("SKIPPED: /dev/kvm is not available on this host");
            return;
        }
    };
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_console_events_pause_stop_delete() {
    require_kvm!();
    let dir = scratch("lifecycle");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "lifecycle");
    let mut c = agent.client().await;
    let mut events = watch(&mut c, "").await;

    let mut s = spec("web-1", &g.idle, RestartPolicy::Never);
    s.labels.insert("tier".into(), "web".into());
    let vm = create(&mut c, "vm-1", s.clone(), false).await;
    assert_eq!(state(&vm), VmState::Created);
    assert_eq!(pid(&vm), 0);
    // Idempotent: the same id and spec return the same VM.
    let again = create(&mut c, "vm-1", s.clone(), false).await;
    assert_eq!(again.status.unwrap().created_unix_ms, vm.status.unwrap().created_unix_ms);

    let vm = start(&mut c, "vm-1").await;
    assert_eq!(state(&vm), VmState::Running);
    let vmm_pid = pid(&vm);
    assert!(vmm_pid > 0);
    assert!(std::path::Path::new(&format!("/proc/{vmm_pid}")).exists());
    let out = console_until(&mut c, "vm-1", "hello from guest", LIMIT).await;
    assert!(out.contains("hello from guest"), "{out}");

    let seen = wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Started as i32).await;
    assert!(seen.iter().any(|e| e.kind == EventKind::Created as i32 && e.vm_id == "vm-1"));

    let listed = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.vms.len(), 1);
    assert_eq!(listed.vms[0].spec.as_ref().unwrap().labels["tier"], "web");

    // Pause freezes the VMM (the kernel shows it stopped); resume thaws it.
    let vm = c
        .pause_vm(PauseVmRequest { vm_id: "vm-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Paused);
    let stat = std::fs::read_to_string(format!("/proc/{vmm_pid}/stat")).unwrap();
    assert!(stat.contains(") T "), "{stat}");
    wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Paused as i32).await;
    let vm = c
        .resume_vm(ResumeVmRequest { vm_id: "vm-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Running);
    let stat = std::fs::read_to_string(format!("/proc/{vmm_pid}/stat")).unwrap();
    assert!(!stat.contains(") T "), "{stat}");

    // Reboot: a new VMM process, the guest prints again.
    let vm = c
        .reboot_vm(RebootVmRequest { vm_id: "vm-1".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Running);
    assert_ne!(pid(&vm), vmm_pid);
    let out = console_until(&mut c, "vm-1", "hello from guest\nhello from guest", LIMIT).await;
    assert!(out.matches("hello from guest").count() >= 2);
    let vmm_pid = pid(&vm);

    let vm = stop(&mut c, "vm-1").await;
    assert_eq!(state(&vm), VmState::Stopped);
    assert_eq!(pid(&vm), 0);
    let exit = vm.status.unwrap().last_exit.unwrap();
    assert_eq!(exit.reason, "api-shutdown");
    assert!(!exit.failure);
    assert!(!std::path::Path::new(&format!("/proc/{vmm_pid}")).exists());
    let seen = wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Exited as i32).await;
    assert!(seen.iter().any(|e| e.kind == EventKind::Stopping as i32));

    delete(&mut c, "vm-1", false).await;
    let err = c
        .get_vm(GetVmRequest { vm_id: "vm-1".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!dir.join("state/vms/vm-1").exists());
    wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Deleted as i32).await;

    // The metrics endpoint counted the calls.
    let addr = std::fs::read_to_string(dir.join("state/metrics.addr")).unwrap();
    let body = http_get(&addr).await;
    assert!(body.contains("quantix_agent_requests_total{method=\"StartVm\",code=\"Ok\"} 1"), "{body}");
    assert!(body.contains("quantix_agent_request_seconds_count{method=\"GetVm\"}"), "{body}");
}

async fn http_get(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr.trim()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_names_the_field() {
    require_kvm!();
    let dir = scratch("errors");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "errors");
    let mut c = agent.client().await;

    // INVALID_ARGUMENT, naming the field.
    let mut bad = spec("bad", &g.idle, RestartPolicy::Never);
    bad.vcpus = 0;
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "bad".into(),
            spec: Some(bad),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("spec.vcpus:"), "{}", e.message());
    let mut bad = spec("bad", &g.idle, RestartPolicy::Never);
    bad.boot.as_mut().unwrap().kernel = "/no/such/kernel".into();
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "bad".into(),
            spec: Some(bad),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("spec.boot.kernel:"), "{}", e.message());
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "a/b".into(),
            spec: Some(spec("ok", &g.idle, RestartPolicy::Never)),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("vm_id:"), "{}", e.message());
    let e = c
        .list_vms(ListVmsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("page_size:"), "{}", e.message());

    // NOT_FOUND.
    for e in [
        c.get_vm(GetVmRequest { vm_id: "nope".into() }).await.unwrap_err(),
        c.start_vm(StartVmRequest { vm_id: "nope".into() }).await.unwrap_err(),
        c.delete_vm(DeleteVmRequest { vm_id: "nope".into(), force: true }).await.unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("\"nope\""), "{}", e.message());
    }

    // ALREADY_EXISTS: the same id with another spec, or the same name under another id.
    create(&mut c, "a", spec("alpha", &g.idle, RestartPolicy::Never), false).await;
    let mut other = spec("alpha", &g.idle, RestartPolicy::Never);
    other.vcpus = 2;
    let e = c
        .create_vm(CreateVmRequest { vm_id: "a".into(), spec: Some(other), start: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().starts_with("vm_id:"), "{}", e.message());
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "a2".into(),
            spec: Some(spec("alpha", &g.idle, RestartPolicy::Never)),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists);
    assert!(e.message().starts_with("spec.name:"), "{}", e.message());

    // FAILED_PRECONDITION: start a running VM, stop/pause a stopped one, delete a running one.
    start(&mut c, "a").await;
    let e = c.start_vm(StartVmRequest { vm_id: "a".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is running"), "{}", e.message());
    let e = c.delete_vm(DeleteVmRequest { vm_id: "a".into(), force: false }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c.resume_vm(ResumeVmRequest { vm_id: "a".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    create(&mut c, "b", spec("beta", &g.idle, RestartPolicy::Never), false).await;
    let e = c
        .stop_vm(StopVmRequest { vm_id: "b".into(), timeout_ms: 0, force: false })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("created"), "{}", e.message());
    let e = c.pause_vm(PauseVmRequest { vm_id: "b".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // RESOURCE_EXHAUSTED: the agent allows 4 vCPUs; "a" holds 1, this one wants 4.
    let mut big = spec("big", &g.idle, RestartPolicy::Never);
    big.vcpus = 4;
    create(&mut c, "big", big, false).await;
    let e = c.start_vm(StartVmRequest { vm_id: "big".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().starts_with("spec.vcpus:"), "{}", e.message());
    let mut fat = spec("fat", &g.idle, RestartPolicy::Never);
    fat.memory_mib = 2000;
    create(&mut c, "fat", fat, false).await;
    let e = c.start_vm(StartVmRequest { vm_id: "fat".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().starts_with("spec.memory_mib:"), "{}", e.message());
    assert_eq!(state(&get(&mut c, "big").await), VmState::Created);

    // The node reports what is committed against what is allowed.
    let node = agent.node_client().await.get_node(GetNodeRequest {}).await.unwrap().into_inner();
    assert_eq!(node.committed.unwrap().vcpus, 1);
    assert_eq!(node.committed.unwrap().memory_mib, 64);
    assert_eq!(node.allocatable.unwrap().vcpus, 4);
    assert_eq!(node.vms_total, 4);
    assert_eq!(node.vms_running, 1);
    assert!(node.kvm.as_ref().unwrap().available);
    assert!(node.kvm.unwrap().capabilities.iter().any(|c| c == "irqchip"));
    assert!(node.vmm_version.starts_with("quantix-vmm"), "{}", node.vmm_version);

    delete(&mut c, "a", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_pages_and_label_filters() {
    require_kvm!();
    let dir = scratch("list");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "list");
    let mut c = agent.client().await;
    for i in 0..7 {
        let mut s = spec(&format!("vm-{i}"), &g.idle, RestartPolicy::Never);
        s.labels.insert("parity".into(), if i % 2 == 0 { "even" } else { "odd" }.into());
        create(&mut c, &format!("id-{i}"), s, false).await;
    }
    let mut ids = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_vms(ListVmsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.vms.len() <= 3);
        ids.extend(page.vms.into_iter().map(|v| v.id));
        pages += 1;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(ids, (0..7).map(|i| format!("id-{i}")).collect::<Vec<_>>());
    let odd = c
        .list_vms(ListVmsRequest {
            label_selector: HashMap::from([("parity".into(), "odd".into())]),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(odd.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["id-1", "id-3"]);
    assert_eq!(odd.next_page_token, "id-3");
    let rest = c
        .list_vms(ListVmsRequest {
            label_selector: HashMap::from([("parity".into(), "odd".into())]),
            page_size: 2,
            page_token: odd.next_page_token,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), ["id-5"]);
    assert!(rest.next_page_token.is_empty());
}
