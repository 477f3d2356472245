//! The agent end to end on this host's /dev/kvm: a real agent process, real quantix-vmm
//! processes running hand-made guests, and a real gRPC client.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use quantix_proto::v1::{
    CreateVmRequest, DeleteVmRequest, EventKind, GetNodeRequest, GetVmRequest, ListVmsRequest,
    PauseVmRequest, RebootVmRequest, RestartPolicy, ResumeVmRequest, StartVmRequest, StopVmRequest,
    VmState,
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
    assert_eq!(
        again.status.unwrap().created_unix_ms,
        vm.status.unwrap().created_unix_ms
    );

    let vm = start(&mut c, "vm-1").await;
    assert_eq!(state(&vm), VmState::Running);
    let vmm_pid = pid(&vm);
    assert!(vmm_pid > 0);
    assert!(alive(vmm_pid));
    let out = console_until(&mut c, "vm-1", "hello from guest", LIMIT).await;
    assert!(out.contains("hello from guest"), "{out}");

    // A running VM's virtio device counters reach the Prometheus endpoint. The agent
    // leaves out a VMM that does not answer within its scrape limit (200 ms): on a loaded
    // machine, ask again.
    let addr = std::fs::read_to_string(dir.join("state/metrics.addr")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let body = loop {
        let body = http_get(&addr).await;
        if body.contains("quantix_vm_device_requests_total{vm=\"vm-1\"")
            || std::time::Instant::now() > deadline
        {
            break body;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        body.contains(
            "quantix_vm_device_requests_total{vm=\"vm-1\",device=\"rng\",type=\"rng\"} 0"
        ),
        "{body}"
    );
    assert!(
        body.contains(
            "quantix_vm_device_needs_reset_total{vm=\"vm-1\",device=\"rng\",type=\"rng\"} 0"
        ),
        "{body}"
    );

    let seen = wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Started as i32).await;
    assert!(seen
        .iter()
        .any(|e| e.kind == EventKind::Created as i32 && e.vm_id == "vm-1"));

    let listed = c
        .list_vms(ListVmsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.vms.len(), 1);
    assert_eq!(listed.vms[0].spec.as_ref().unwrap().labels["tier"], "web");

    // Pause parks the VMM's vCPUs (the VMM itself says so, and keeps answering); resume
    // runs them again.
    let vmm_state = || vmm_state(&dir.join("state"), "vm-1");
    let vm = c
        .pause_vm(PauseVmRequest {
            vm_id: "vm-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Paused);
    assert_eq!(vmm_state(), "paused");
    assert!(alive(vmm_pid));
    wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Paused as i32).await;
    let vm = c
        .resume_vm(ResumeVmRequest {
            vm_id: "vm-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Running);
    assert_eq!(vmm_state(), "running");

    // Reboot: a new VMM process, the guest prints again.
    let vm = c
        .reboot_vm(RebootVmRequest {
            vm_id: "vm-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(state(&vm), VmState::Running);
    assert_ne!(pid(&vm), vmm_pid);
    let out = console_until(&mut c, "vm-1", "hello from guest\nhello from guest", LIMIT).await;
    assert!(out.matches("hello from guest").count() >= 2);
    let vmm_pid = pid(&vm);

    // A graceful stop of a paused VM: resumed first, its power button pressed; this guest
    // has no ACPI and never enabled the button, so the agent does not wait the 30 s for
    // it but stops the VMM in order at once.
    c.pause_vm(PauseVmRequest {
        vm_id: "vm-1".into(),
    })
    .await
    .unwrap();
    let asked = std::time::Instant::now();
    let vm = c
        .stop_vm(StopVmRequest {
            vm_id: "vm-1".into(),
            timeout_ms: 30_000,
            force: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        asked.elapsed() < Duration::from_secs(15),
        "waited {:?} for a guest that cannot hear the button",
        asked.elapsed()
    );
    assert_eq!(state(&vm), VmState::Stopped);
    assert_eq!(pid(&vm), 0);
    let exit = vm.status.unwrap().last_exit.unwrap();
    assert_eq!(exit.reason, "api-shutdown");
    assert!(!exit.failure);
    assert!(!alive(vmm_pid));
    let seen = wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Exited as i32).await;
    assert!(seen.iter().any(|e| e.kind == EventKind::Stopping as i32));

    delete(&mut c, "vm-1", false).await;
    let err = c
        .get_vm(GetVmRequest {
            vm_id: "vm-1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(!dir.join("state/vms/vm-1").exists());
    wait_event(&mut events, LIMIT, |e| e.kind == EventKind::Deleted as i32).await;

    // The metrics endpoint counted the calls.
    let addr = std::fs::read_to_string(dir.join("state/metrics.addr")).unwrap();
    let body = http_get(&addr).await;
    assert!(
        body.contains("quantix_agent_requests_total{method=\"StartVm\",code=\"Ok\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("quantix_agent_request_seconds_count{method=\"GetVm\"}"),
        "{body}"
    );
}

/// Sends `text` to the VM's console and returns what comes back until it is echoed.
async fn console_roundtrip(
    c: &mut quantix_proto::v1::vm_service_client::VmServiceClient<tonic::transport::Channel>,
    id: &str,
    text: &str,
) -> String {
    use quantix_proto::v1::{console_input, ConsoleInput};
    use tokio_stream::StreamExt;
    let (tx, mut out) = common::attach_console(c, id, false).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut next_send = tokio::time::Instant::now();
    while !String::from_utf8_lossy(&got).contains(text) {
        // Resend until echoed: the console pump may still be connecting.
        if tokio::time::Instant::now() >= next_send {
            tx.send(ConsoleInput {
                input: Some(console_input::Input::Data(text.as_bytes().to_vec())),
            })
            .await
            .unwrap();
            next_send = tokio::time::Instant::now() + Duration::from_millis(500);
        }
        match tokio::time::timeout(Duration::from_millis(100), out.next()).await {
            Ok(Some(Ok(m))) => got.extend(m.data),
            Ok(other) => panic!("console of {id} ended: {other:?}"),
            Err(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "{text:?} not echoed by {id}"
            ),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether `pid` runs (a zombie left to a parent that does not reap does not count).
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.contains(") Z "),
        Err(_) => false,
    }
}

async fn http_get(addr: &str) -> String {
    let (head, body) = http_request(addr, "/metrics").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body
}

/// One `GET path` on its own connection: the response's head and body.
async fn http_request(addr: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr.trim()).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.to_string(), body.to_string())
}

/// The exposition parsed by prometheus_client's strict OpenMetrics parser
/// (tests/support/openmetrics_check.py): family name -> {type, help, samples}, or the
/// parser's complaint.
fn parse_openmetrics(text: &str) -> Result<serde_json::Value, String> {
    use std::io::Write;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/openmetrics_check.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (scripts/test installs prometheus_client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "prometheus_client is missing: {stderr}"
    );
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(stderr.into_owned())
    }
}

/// The samples of one family whose labels include every `(key, value)` in `want`.
fn samples_of<'a>(
    families: &'a serde_json::Value,
    family: &str,
    want: &[(&str, &str)],
) -> Vec<&'a serde_json::Value> {
    families[family]["samples"]
        .as_array()
        .unwrap_or_else(|| panic!("no family {family}"))
        .iter()
        .filter(|s| want.iter().all(|(k, v)| s[1][*k] == *v))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_of_two_vms_pass_the_openmetrics_parser() {
    require_kvm!();
    // The parser is strict enough to fail: one family split around another, as the
    // hand-written exporter printed it when two VMs ran.
    let split = "# TYPE a counter\na_total{vm=\"1\"} 1\n# TYPE b gauge\nb 1\n\
                 a_total{vm=\"2\"} 1\n# EOF\n";
    assert!(parse_openmetrics(split).is_err());

    let dir = scratch("metrics");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "metrics");
    let mut c = agent.client().await;
    for id in ["vm-a", "vm-b"] {
        create(&mut c, id, spec(id, &g.idle, RestartPolicy::Never), true).await;
    }
    create(
        &mut c,
        "vm-c",
        spec("vm-c", &g.idle, RestartPolicy::Never),
        false,
    )
    .await;
    let addr = std::fs::read_to_string(dir.join("state/metrics.addr")).unwrap();

    // A VMM that misses the 200 ms scrape limit is left out of that scrape: ask again.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (text, families) = loop {
        let text = http_get(&addr).await;
        let families = parse_openmetrics(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let both = ["vm-a", "vm-b"].iter().all(|vm| {
            families["quantix_vm_device_requests"]["samples"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s[1]["vm"] == *vm))
        });
        if both {
            break (text, families);
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(text.ends_with("# EOF\n"), "{text}");

    // Every family has its help and type once; counters keep their _total samples.
    for (name, family) in families.as_object().unwrap() {
        assert!(
            !family["help"].as_str().unwrap().is_empty(),
            "{name} has no help"
        );
    }
    assert_eq!(families["quantix_vm_device_requests"]["type"], "counter");
    for vm in ["vm-a", "vm-b"] {
        let rng = samples_of(
            &families,
            "quantix_vm_device_requests",
            &[("vm", vm), ("device", "rng"), ("type", "rng")],
        );
        assert_eq!(rng.len(), 1, "{vm}: {rng:?}");
        assert_eq!(rng[0][0], "quantix_vm_device_requests_total");
        let running = samples_of(
            &families,
            "quantix_vm_state",
            &[("vm", vm), ("state", "running")],
        );
        assert_eq!(running.len(), 1, "{vm}");
        assert_eq!(running[0][2], 1.0, "{vm}");
        let rss = samples_of(&families, "quantix_vmm_resident_bytes", &[("vm", vm)]);
        assert!(rss[0][2].as_f64().unwrap() > 0.0, "{vm}: {rss:?}");
    }
    // A created VM has a state but no VMM to ask.
    let created = samples_of(
        &families,
        "quantix_vm_state",
        &[("vm", "vm-c"), ("state", "created")],
    );
    assert_eq!(created[0][2], 1.0);
    assert!(samples_of(&families, "quantix_vmm_resident_bytes", &[("vm", "vm-c")]).is_empty());

    // The standard process metrics, build info, node capacity and commitment.
    let rss = samples_of(&families, "process_resident_memory_bytes", &[]);
    assert!(rss[0][2].as_f64().unwrap() > 1e6, "{rss:?}");
    assert!(
        samples_of(&families, "process_open_fds", &[])[0][2]
            .as_f64()
            .unwrap()
            > 0.0
    );
    let build = samples_of(&families, "quantix_agent_build", &[]);
    assert_eq!(build[0][0], "quantix_agent_build_info");
    assert_eq!(build[0][1]["version"], env!("CARGO_PKG_VERSION"));
    let committed = samples_of(&families, "quantix_node_committed_vcpus", &[]);
    let one = spec("x", &g.idle, RestartPolicy::Never).vcpus as f64;
    assert_eq!(
        committed[0][2].as_f64().unwrap(),
        2.0 * one,
        "running VMs commit vCPUs"
    );
    let capacity = samples_of(&families, "quantix_node_capacity_memory_bytes", &[]);
    assert!(capacity[0][2].as_f64().unwrap() > 0.0);

    // Other paths are not the exporter's.
    let (head, _) = http_request(&addr, "/").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http_request(&addr, "/metrics/x").await;
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    let (head, _) = http_request(&addr, "/metrics").await;
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
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
    // The same field in the standard google.rpc.BadRequest detail.
    let bad = tonic_types::StatusExt::get_details_bad_request(&e).expect("BadRequest");
    assert_eq!(bad.field_violations[0].field, "spec.vcpus");
    assert!(!bad.field_violations[0].description.is_empty());
    let mut bad = spec("bad", &g.idle, RestartPolicy::Never);
    bad.boot.as_mut().unwrap().kernel = dir.join("images/no-such-kernel").display().to_string();
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "bad".into(),
            spec: Some(bad),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("spec.boot.kernel:"),
        "{}",
        e.message()
    );
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
        c.get_vm(GetVmRequest {
            vm_id: "nope".into(),
        })
        .await
        .unwrap_err(),
        c.start_vm(StartVmRequest {
            vm_id: "nope".into(),
        })
        .await
        .unwrap_err(),
        c.delete_vm(DeleteVmRequest {
            vm_id: "nope".into(),
            force: true,
        })
        .await
        .unwrap_err(),
    ] {
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("\"nope\""), "{}", e.message());
    }

    // ALREADY_EXISTS: the same id with another spec, or the same name under another id.
    create(
        &mut c,
        "a",
        spec("alpha", &g.idle, RestartPolicy::Never),
        false,
    )
    .await;
    let mut other = spec("alpha", &g.idle, RestartPolicy::Never);
    other.vcpus = 2;
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "a".into(),
            spec: Some(other),
            start: false,
        })
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
    let e = c
        .start_vm(StartVmRequest { vm_id: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("is running"), "{}", e.message());
    let e = c
        .delete_vm(DeleteVmRequest {
            vm_id: "a".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let e = c
        .resume_vm(ResumeVmRequest { vm_id: "a".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    create(
        &mut c,
        "b",
        spec("beta", &g.idle, RestartPolicy::Never),
        false,
    )
    .await;
    let e = c
        .stop_vm(StopVmRequest {
            vm_id: "b".into(),
            timeout_ms: 0,
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains("created"), "{}", e.message());
    let e = c
        .pause_vm(PauseVmRequest { vm_id: "b".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);

    // A kernel the VMM cannot load: FAILED_PRECONDITION with the VMM's reason; state FAILED.
    let junk = dir.join("images/junk.bin");
    std::fs::write(&junk, b"not a kernel").unwrap();
    create(
        &mut c,
        "junk",
        spec("junk", &junk, RestartPolicy::OnFailure),
        false,
    )
    .await;
    let e = c
        .start_vm(StartVmRequest {
            vm_id: "junk".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(
        e.message().contains("setup-error") && e.message().contains("junk.bin"),
        "{}",
        e.message()
    );
    let vm = get(&mut c, "junk").await;
    assert_eq!(state(&vm), VmState::Failed);
    assert_eq!(vm.status.unwrap().last_exit.unwrap().reason, "setup-error");
    c.delete_vm(DeleteVmRequest {
        vm_id: "junk".into(),
        force: false,
    })
    .await
    .unwrap();

    // RESOURCE_EXHAUSTED: the agent allows 4 vCPUs; "a" holds 1, this one wants 4.
    let mut big = spec("big", &g.idle, RestartPolicy::Never);
    big.vcpus = 4;
    create(&mut c, "big", big, false).await;
    let e = c
        .start_vm(StartVmRequest {
            vm_id: "big".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().starts_with("spec.vcpus:"), "{}", e.message());
    let mut fat = spec("fat", &g.idle, RestartPolicy::Never);
    fat.memory_mib = 2000;
    create(&mut c, "fat", fat, false).await;
    let e = c
        .start_vm(StartVmRequest {
            vm_id: "fat".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().starts_with("spec.memory_mib:"),
        "{}",
        e.message()
    );
    assert_eq!(state(&get(&mut c, "big").await), VmState::Created);

    // The node reports what is committed against what is allowed.
    let node = agent
        .node_client()
        .await
        .get_node(GetNodeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.committed.unwrap().vcpus, 1);
    assert_eq!(node.committed.unwrap().memory_mib, 64);
    assert_eq!(node.allocatable.unwrap().vcpus, 4);
    assert_eq!(node.vms_total, 4);
    assert_eq!(node.vms_running, 1);
    assert!(node.kvm.as_ref().unwrap().available);
    assert!(node
        .kvm
        .unwrap()
        .capabilities
        .iter()
        .any(|c| c == "irqchip"));
    assert!(
        node.vmm_version.starts_with("quantix-vmm"),
        "{}",
        node.vmm_version
    );

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
        s.labels.insert(
            "parity".into(),
            if i % 2 == 0 { "even" } else { "odd" }.into(),
        );
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
    assert_eq!(
        odd.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["id-1", "id-3"]
    );
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
    assert_eq!(
        rest.vms.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["id-5"]
    );
    assert!(rest.next_page_token.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_agent_readopts_running_vms_and_reports_the_dead_one() {
    require_kvm!();
    let dir = scratch("readopt");
    let g = guests(&dir);
    let mut agent = Agent::start(&dir.join("state"), "readopt");
    let mut c = agent.client().await;
    let mut pids = HashMap::new();
    for id in ["one", "two", "three"] {
        let kernel = if id == "two" { &g.echo } else { &g.idle };
        let vm = create(&mut c, id, spec(id, kernel, RestartPolicy::Never), true).await;
        assert_eq!(state(&vm), VmState::Running);
        pids.insert(id, pid(&vm));
    }
    console_until(&mut c, "two", "echo ready", LIMIT).await;
    c.pause_vm(PauseVmRequest {
        vm_id: "two".into(),
    })
    .await
    .unwrap();

    agent.kill();
    // While the agent is down, "three"'s VMM dies.
    // SAFETY: SIGKILL to the test's own VMM.
    unsafe { libc::kill(pids["three"] as i32, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(pids["three"]) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!alive(pids["three"]), "the killed VMM lingers");
    for id in ["one", "two"] {
        assert!(alive(pids[id]), "{id}'s VMM died with the agent");
    }

    agent.spawn();
    let mut c = agent.client().await;
    let one = get(&mut c, "one").await;
    assert_eq!(state(&one), VmState::Running);
    assert_eq!(pid(&one), pids["one"]);
    let two = get(&mut c, "two").await;
    assert_eq!(state(&two), VmState::Paused, "a paused VMM stays paused");
    assert_eq!(vmm_state(&dir.join("state"), "two"), "paused");
    assert_eq!(pid(&two), pids["two"]);
    let three = get(&mut c, "three").await;
    assert_eq!(state(&three), VmState::Failed);
    let exit = three.status.unwrap().last_exit.unwrap();
    assert_eq!(exit.reason, "lost", "{exit:?}");
    // The console history from before the agent's restart is back (the VMM replays its
    // newest 64 KiB to the new agent), once: the guest printed it once, at boot.
    let history = console_until(&mut c, "one", "hello from guest", LIMIT).await;
    assert_eq!(history.matches("hello from guest").count(), 1, "{history}");
    let history = console_until(&mut c, "two", "echo ready", LIMIT).await;
    assert_eq!(history.matches("echo ready").count(), 1, "{history}");
    // Another client takes the serial socket (as an operator's socat would) and gets the
    // same history; the agent, displaced, reconnects and skips what it has already.
    use tokio_stream::StreamExt;
    let serial = api_socket(&dir.join("state"), "one").with_file_name("serial.sock");
    let before = serial_connections(&dir.join("state"), "one");
    {
        use std::io::Read;
        let mut other = std::os::unix::net::UnixStream::connect(&serial).unwrap();
        other
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&got).contains("hello from guest") {
            let n = other.read(&mut buf).unwrap();
            assert!(n > 0, "the serial socket closed before its history");
            got.extend_from_slice(&buf[..n]);
        }
    }
    // The agent reconnects 20 ms after it is displaced: the VMM has counted that once it
    // has accepted two connections more than before ours.
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let (_tx, mut out) = common::attach_console(&mut c, "one", true).await;
        let replay = tokio::time::timeout(Duration::from_secs(1), out.next()).await;
        let replay = match replay {
            Ok(Some(Ok(m))) => String::from_utf8_lossy(&m.data).into_owned(),
            _ => String::new(),
        };
        assert_eq!(replay.matches("hello from guest").count(), 1, "{replay}");
        if serial_connections(&dir.join("state"), "one") >= before + 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Once reconnected, still once.
    let (_tx, mut out) = common::attach_console(&mut c, "one", true).await;
    let m = tokio::time::timeout(LIMIT, out.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let replay = String::from_utf8_lossy(&m.data).into_owned();
    assert_eq!(replay.matches("hello from guest").count(), 1, "{replay}");
    assert!(exit.failure);

    // Re-adopted VMs are fully controllable, and their exits are noticed.
    let mut events = watch(&mut c, "").await;
    c.resume_vm(ResumeVmRequest {
        vm_id: "two".into(),
    })
    .await
    .unwrap();
    // The new agent is on the re-adopted VMM's console: what it sends comes back.
    let echoed = console_roundtrip(&mut c, "two", "after-adoption").await;
    assert!(echoed.contains("after-adoption"), "{echoed}");
    let vm = stop(&mut c, "one").await;
    assert_eq!(state(&vm), VmState::Stopped);
    assert!(!alive(pids["one"]), "the VMM still runs after stop");
    // A re-adopted VMM is not the agent's child: its kill is seen through the pidfd.
    // SAFETY: SIGKILL to the test's own VMM.
    unsafe { libc::kill(pids["two"] as i32, libc::SIGKILL) };
    let seen = wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "two" && e.kind == EventKind::Exited as i32
    })
    .await;
    let ev = seen.last().unwrap();
    assert_eq!(ev.state, VmState::Failed as i32);
    assert_eq!(ev.exit.as_ref().unwrap().reason, "killed");
    // And the restarted VM starts again.
    let vm = start(&mut c, "three").await;
    assert_eq!(state(&vm), VmState::Running);
    delete(&mut c, "three", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_exits_are_seen_at_once_with_their_reason() {
    require_kvm!();
    let dir = scratch("exits");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "exits");
    let mut c = agent.client().await;
    let mut events = watch(&mut c, "").await;

    // Killed VMM: FAILED, signal 9.
    let vm = create(&mut c, "k", spec("k", &g.idle, RestartPolicy::Never), true).await;
    // SAFETY: SIGKILL to the test's own VMM.
    unsafe { libc::kill(pid(&vm) as i32, libc::SIGKILL) };
    let seen = wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "k" && e.kind == EventKind::Exited as i32
    })
    .await;
    let exit = seen.last().unwrap().exit.clone().unwrap();
    assert_eq!(
        (exit.reason.as_str(), exit.signal, exit.failure),
        ("killed", 9, true)
    );
    assert_eq!(state(&get(&mut c, "k").await), VmState::Failed);

    // The guest powers off: STOPPED, not a failure.
    create(
        &mut c,
        "p",
        spec("p", &g.poweroff, RestartPolicy::Never),
        true,
    )
    .await;
    let seen = wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "p" && e.kind == EventKind::Exited as i32
    })
    .await;
    let exit = seen.last().unwrap().exit.clone().unwrap();
    assert_eq!(
        (exit.reason.as_str(), exit.exit_code, exit.failure),
        ("poweroff", 0, false)
    );
    let vm = get(&mut c, "p").await;
    assert_eq!(state(&vm), VmState::Stopped);
    let out = console_until(&mut c, "p", "bye", LIMIT).await;
    assert!(out.contains("bye"));

    // The guest crashes: FAILED with the VMM's own reason from its exit record.
    create(&mut c, "x", spec("x", &g.crash, RestartPolicy::Never), true).await;
    let seen = wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "x" && e.kind == EventKind::Exited as i32
    })
    .await;
    let exit = seen.last().unwrap().exit.clone().unwrap();
    assert!(exit.failure, "{exit:?}");
    assert!(
        ["triple-fault", "kvm-error", "unhandled-exit"].contains(&exit.reason.as_str()),
        "{exit:?}"
    );
    assert!(exit.exit_code > 0, "{exit:?}");
    assert_eq!(state(&get(&mut c, "x").await), VmState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_policies() {
    require_kvm!();
    let dir = scratch("restart");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "restart");
    let mut c = agent.client().await;
    let mut events = watch(&mut c, "").await;

    // on-failure: a killed VMM is restarted with a new pid.
    let vm = create(
        &mut c,
        "of",
        spec("of", &g.idle, RestartPolicy::OnFailure),
        true,
    )
    .await;
    let first = pid(&vm);
    // SAFETY: SIGKILL to the test's own VMM.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    let seen = wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "of" && e.kind == EventKind::Restarting as i32
    })
    .await;
    assert_eq!(seen.last().unwrap().exit.as_ref().unwrap().reason, "killed");
    wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "of" && e.kind == EventKind::Started as i32
    })
    .await;
    let vm = get(&mut c, "of").await;
    assert_eq!(state(&vm), VmState::Running);
    assert_ne!(pid(&vm), first);
    assert_eq!(vm.status.unwrap().restart_count, 1);
    // ...but a clean guest poweroff under on-failure is not restarted.
    create(
        &mut c,
        "ofp",
        spec("ofp", &g.poweroff, RestartPolicy::OnFailure),
        true,
    )
    .await;
    wait_event(&mut events, LIMIT, |e| {
        e.vm_id == "ofp" && e.kind == EventKind::Exited as i32
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let vm = get(&mut c, "ofp").await;
    assert_eq!(state(&vm), VmState::Stopped);
    assert_eq!(vm.status.unwrap().restart_count, 0);

    // always: a guest that powers off keeps coming back, with a growing back-off.
    create(
        &mut c,
        "al",
        spec("al", &g.poweroff, RestartPolicy::Always),
        true,
    )
    .await;
    let mut starts = 0;
    wait_event(&mut events, LIMIT, |e| {
        if e.vm_id == "al" && e.kind == EventKind::Started as i32 {
            starts += 1;
        }
        starts == 3
    })
    .await;
    let vm = get(&mut c, "al").await;
    assert!(vm.status.unwrap().restart_count >= 2);
    // A stop cancels it for good (whether it is running or waiting to restart).
    let _ = c
        .stop_vm(StopVmRequest {
            vm_id: "al".into(),
            timeout_ms: 1000,
            force: false,
        })
        .await;
    let _ = c
        .stop_vm(StopVmRequest {
            vm_id: "al".into(),
            timeout_ms: 1000,
            force: false,
        })
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vm = get(&mut c, "al").await;
    assert!(matches!(state(&vm), VmState::Stopped), "{vm:?}");

    // never: stays failed.
    let vm = create(
        &mut c,
        "nv",
        spec("nv", &g.idle, RestartPolicy::Never),
        true,
    )
    .await;
    // SAFETY: SIGKILL to the test's own VMM.
    unsafe { libc::kill(pid(&vm) as i32, libc::SIGKILL) };
    wait_state(&mut c, "nv", VmState::Failed, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(state(&get(&mut c, "nv").await), VmState::Failed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_input_reaches_the_guest_and_every_reader_sees_the_output() {
    use quantix_proto::v1::{console_input, ConsoleInput};
    use tokio_stream::StreamExt;
    require_kvm!();
    let dir = scratch("echo");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "echo");
    let mut c = agent.client().await;
    create(&mut c, "e", spec("e", &g.echo, RestartPolicy::Never), true).await;
    console_until(&mut c, "e", "echo ready", LIMIT).await;

    // Reader A writes; reader B only listens (attached without replay).
    let (tx_a, mut out_a) = common::attach_console(&mut c, "e", true).await;
    let mut c2 = agent.client().await;
    let (_tx_b, mut out_b) = common::attach_console(&mut c2, "e", false).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    tx_a.send(ConsoleInput {
        input: Some(console_input::Input::Data(b"ping-42".to_vec())),
    })
    .await
    .unwrap();
    for (name, out) in [("A", &mut out_a), ("B", &mut out_b)] {
        let mut got = Vec::new();
        let deadline = tokio::time::Instant::now() + LIMIT;
        while !String::from_utf8_lossy(&got).contains("ping-42") {
            match tokio::time::timeout_at(deadline, out.next()).await {
                Ok(Some(Ok(m))) => got.extend(m.data),
                other => panic!(
                    "reader {name}: no echo ({other:?}); got {:?}",
                    String::from_utf8_lossy(&got)
                ),
            }
        }
    }
    // B attached without replay: it never saw the banner printed before it attached.
    delete(&mut c, "e", true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_reboots_in_a_loop_is_restarted_with_a_growing_back_off() {
    require_kvm!();
    let dir = scratch("reboot-loop");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    // mov al, 0xfe; out 0x64, al: the i8042 reset line, at once.
    let kernel = images.join("reboot.elf");
    std::fs::write(&kernel, elf64(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4])).unwrap();
    let agent = Agent::start(&dir.join("state"), "reboot-loop");
    let mut c = agent.client().await;
    let mut events = watch(&mut c, "").await;
    create(
        &mut c,
        "rl",
        spec("rl", &kernel, RestartPolicy::Never),
        true,
    )
    .await;
    let mut delays = Vec::new();
    while delays.len() < 4 {
        let seen = wait_event(&mut events, Duration::from_secs(30), |e| {
            e.kind == EventKind::Restarting as i32
        })
        .await;
        let msg = &seen.last().unwrap().message;
        let ms: u64 = msg
            .strip_prefix("restarting in ")
            .and_then(|m| m.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{msg}"));
        delays.push(ms);
    }
    // A reboot restarts at once; a guest that keeps rebooting right away waits longer
    // each time.
    assert_eq!(delays[0], 0, "{delays:?}");
    assert!(
        delays[1] > 0 && delays[2] > delays[1] && delays[3] > delays[2],
        "{delays:?}"
    );
    c.stop_vm(quantix_proto::v1::StopVmRequest {
        vm_id: "rl".into(),
        timeout_ms: 1000,
        force: true,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spec_reaches_the_vmm_and_a_derived_mac_stays_across_starts() {
    require_kvm!();
    let dir = scratch("spec-devices");
    let g = guests(&dir);
    let img = images_of(&dir.join("state")).join("data.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let agent = Agent::start(&dir.join("state"), "spec-devices");
    let mut c = agent.client().await;
    let tap = format!("qxs{}", std::process::id() % 100_000);
    let mut s = spec("devices", &g.idle, RestartPolicy::Never);
    s.rng = Some(false);
    s.disks = vec![quantix_proto::v1::Disk {
        path: img.display().to_string(),
        engine: quantix_proto::v1::DiskEngine::Threads as i32,
        ..Default::default()
    }];
    s.nics = vec![quantix_proto::v1::Nic {
        tap: tap.clone(),
        ..Default::default()
    }];
    s.console = Some(quantix_proto::v1::Console {
        ring_bytes: 0,
        virtio: true,
    });
    let vm = create(&mut c, "dev-1", s, false).await;
    let macs = vm.status.as_ref().unwrap().nic_macs.clone();
    assert_eq!(macs.len(), 1, "{vm:?}");
    let mac = quantix_vmm_api::mac::parse(&macs[0]).expect("a unicast MAC");
    assert_eq!(mac[0] & 0x03, 0x02, "locally administered: {}", macs[0]);

    for round in 0..2 {
        start(&mut c, "dev-1").await;
        let vm = wait_state(&mut c, "dev-1", VmState::Running, LIMIT).await;
        let (_, _, config) = vmm_config(pid(&vm));
        assert!(!config.rng, "rng off reached the VMM");
        assert_eq!(config.disks[0].aio, quantix_vmm_api::EngineKind::Threads);
        assert_eq!(config.nets[0].mac, Some(mac), "round {round}: the same MAC");
        assert_eq!(vm.status.as_ref().unwrap().nic_macs, macs);
        // The virtio console is on its own socket, which the agent reads.
        match &config.console {
            quantix_vmm_api::SerialMode::Socket(p) => {
                assert!(p.ends_with("console.sock"), "{p:?}")
            }
            other => panic!("round {round}: virtio console {other:?}"),
        }
        let mut out = attach_device(
            &mut c,
            "dev-1",
            quantix_proto::v1::ConsoleDevice::Virtio as i32,
        )
        .await
        .unwrap();
        // The hand-made guest has no virtio driver: nothing comes, but the call stands.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), out.message())
                .await
                .is_err(),
            "the virtio console is attached and quiet"
        );
        stop(&mut c, "dev-1").await;
    }

    // A firmware image instead of a kernel: real-mode code at the reset vector.
    let mut fw = vec![0xf4u8; 4096];
    // mov dx, 0x3f8; mov al, 'F'; out dx, al; then hlt forever (the filler).
    fw[..6].copy_from_slice(&[0xba, 0xf8, 0x03, 0xb0, b'F', 0xee]);
    let rel = 0xf000u16.wrapping_sub(0xfff3); // jmp near 0xf000 from the reset vector
    fw[0xff0] = 0xe9;
    fw[0xff1..0xff3].copy_from_slice(&rel.to_le_bytes());
    let fw_path = images_of(&dir.join("state")).join("fw.bin");
    std::fs::write(&fw_path, &fw).unwrap();
    let mut s = spec("firmware", &g.idle, RestartPolicy::Never);
    let boot = s.boot.as_mut().unwrap();
    boot.kernel.clear();
    boot.firmware = fw_path.display().to_string();
    create(&mut c, "fw-1", s.clone(), true).await;
    let vm = wait_state(&mut c, "fw-1", VmState::Running, LIMIT).await;
    assert_eq!(
        vmm_config(pid(&vm)).2.boot,
        quantix_vmm_api::BootSource::Firmware("/dev/fd/3".into())
    );
    let out = console_until(&mut c, "fw-1", "F", LIMIT).await;
    assert!(out.contains('F'), "{out}");
    // A VM without a virtio console: attaching to one is FAILED_PRECONDITION.
    let e = attach_device(
        &mut c,
        "fw-1",
        quantix_proto::v1::ConsoleDevice::Virtio as i32,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("virtio console"), "{}", e.message());
    // A device the API does not have is INVALID_ARGUMENT, naming the field.
    let e = attach_device(&mut c, "fw-1", 99).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("attach.device"), "{}", e.message());
    stop(&mut c, "fw-1").await;
    // A kernel and a firmware together are refused, naming the field.
    let mut both = s;
    both.boot.as_mut().unwrap().kernel = g.idle.display().to_string();
    let e = c
        .create_vm(CreateVmRequest {
            vm_id: "fw-2".into(),
            spec: Some(both),
            start: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spec.boot.kernel"), "{}", e.message());
}

/// Attaches to one of a VM's consoles by `ConsoleAttach.device` (a raw value, to send
/// values the API does not have).
async fn attach_device(
    c: &mut quantix_proto::v1::vm_service_client::VmServiceClient<tonic::transport::Channel>,
    id: &str,
    device: i32,
) -> Result<tonic::Streaming<quantix_proto::v1::ConsoleOutput>, tonic::Status> {
    use quantix_proto::v1::{console_input, ConsoleAttach, ConsoleInput};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ConsoleInput {
        input: Some(console_input::Input::Attach(ConsoleAttach {
            vm_id: id.into(),
            replay: true,
            device,
        })),
    })
    .await
    .unwrap();
    // The stream must outlive the call: keep the sender in a task that never sends again.
    tokio::spawn(async move {
        tx.closed().await;
    });
    c.attach_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(tonic::Response::into_inner)
}
