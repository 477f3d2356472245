//! Tables for people, JSON for programs.

use quantix_proto::v1::{EventKind, ExitInfo, Node, RestartPolicy, Vm, VmEvent, VmState};
use serde_json::{json, Value};

fn state(s: i32) -> String {
    VmState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("VM_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

fn exit_json(e: &Option<ExitInfo>) -> Value {
    match e {
        None => Value::Null,
        Some(e) => json!({
            "reason": e.reason, "exit_code": e.exit_code, "signal": e.signal,
            "detail": e.detail, "at_unix_ms": e.at_unix_ms, "failure": e.failure,
        }),
    }
}

/// A VM as JSON.
pub fn vm_json(vm: &Vm) -> Value {
    let spec = vm.spec.clone().unwrap_or_default();
    let st = vm.status.clone().unwrap_or_default();
    let boot = spec.boot.clone().unwrap_or_default();
    json!({
        "id": vm.id,
        "spec": {
            "name": spec.name,
            "vcpus": spec.vcpus,
            "memory_mib": spec.memory_mib,
            "kernel": boot.kernel,
            "initramfs": boot.initramfs,
            "cmdline": boot.cmdline,
            "firmware": boot.firmware,
            "rng": spec.rng.unwrap_or(true),
            "disks": spec.disks.iter().map(|d| json!({
                "path": d.path, "readonly": d.readonly, "id": d.id,
                "aio": match quantix_proto::v1::DiskEngine::try_from(d.engine) {
                    Ok(quantix_proto::v1::DiskEngine::Threads) => "threads",
                    _ => "io_uring",
                },
            })).collect::<Vec<_>>(),
            "nics": spec.nics.iter().map(|n| json!({"tap": n.tap, "mac": n.mac})).collect::<Vec<_>>(),
            "vsock": spec.vsock.as_ref().map(|v| json!({"guest_cid": v.guest_cid})),
            "labels": spec.labels,
            "restart_policy": RestartPolicy::try_from(spec.restart_policy)
                .map(|p| p.as_str_name().trim_start_matches("RESTART_POLICY_").to_ascii_lowercase().replace('_', "-"))
                .unwrap_or_default(),
        },
        "status": {
            "state": state(st.state),
            "pid": st.pid,
            "last_exit": exit_json(&st.last_exit),
            "restart_count": st.restart_count,
            "created_unix_ms": st.created_unix_ms,
            "started_unix_ms": st.started_unix_ms,
            "cgroup": st.cgroup,
            "directory": st.directory,
            "vsock_socket": st.vsock_socket,
            "nic_macs": st.nic_macs,
        }
    })
}

/// VMs: a table or a JSON array.
pub fn vms(vms: &[Vm], json: bool) {
    if json {
        let v: Vec<Value> = vms.iter().map(vm_json).collect();
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!(
        "{:<20} {:<20} {:<9} {:>5} {:>8} {:>8}  LAST EXIT",
        "ID", "NAME", "STATE", "CPUS", "MEM MiB", "PID"
    );
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        let st = vm.status.clone().unwrap_or_default();
        println!(
            "{:<20} {:<20} {:<9} {:>5} {:>8} {:>8}  {}",
            vm.id,
            spec.name,
            state(st.state),
            spec.vcpus,
            spec.memory_mib,
            if st.pid == 0 {
                "-".into()
            } else {
                st.pid.to_string()
            },
            st.last_exit.map(|e| e.reason).unwrap_or_else(|| "-".into())
        );
    }
}

/// One VM in detail.
pub fn vm_detail(vm: &Vm) {
    let v = vm_json(vm);
    fn walk(prefix: &str, v: &Value) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v);
                }
            }
            other => println!("{prefix:<28} {other}"),
        }
    }
    walk("", &v);
}

/// One event per line.
pub fn event(ev: &VmEvent, json: bool) {
    let kind = EventKind::try_from(ev.kind)
        .map(|k| {
            k.as_str_name()
                .trim_start_matches("EVENT_KIND_")
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            json!({
                "sequence": ev.sequence, "vm_id": ev.vm_id, "kind": kind,
                "state": state(ev.state), "exit": exit_json(&ev.exit),
                "message": ev.message, "at_unix_ms": ev.at_unix_ms,
            })
        );
    } else {
        println!(
            "{:>6} {:<20} {:<10} {:<9} {}",
            ev.sequence,
            ev.vm_id,
            kind,
            state(ev.state),
            ev.message
        );
    }
}

/// The node.
pub fn node(n: &Node, json: bool) {
    let cap = n.capacity.unwrap_or_default();
    let alloc = n.allocatable.unwrap_or_default();
    let com = n.committed.unwrap_or_default();
    let kvm = n.kvm.clone().unwrap_or_default();
    let cg = n.cgroups.clone().unwrap_or_default();
    let v = json!({
        "hostname": n.hostname,
        "capacity": {"vcpus": cap.vcpus, "memory_mib": cap.memory_mib},
        "allocatable": {"vcpus": alloc.vcpus, "memory_mib": alloc.memory_mib},
        "committed": {"vcpus": com.vcpus, "memory_mib": com.memory_mib},
        "vms_total": n.vms_total,
        "vms_running": n.vms_running,
        "kvm": {"available": kvm.available, "api_version": kvm.api_version, "max_vcpus": kvm.max_vcpus,
                "capabilities": kvm.capabilities, "detail": kvm.detail},
        "cgroups": {"available": cg.available, "version": cg.version, "detail": cg.detail},
        "agent_version": n.agent_version,
        "vmm_version": n.vmm_version,
        "kernel_release": n.kernel_release,
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("hostname      {}", n.hostname);
    println!("kernel        {}", n.kernel_release);
    println!("versions      agent {}, {}", n.agent_version, n.vmm_version);
    println!("              {:>8} {:>12}", "vCPUs", "memory MiB");
    println!("capacity      {:>8} {:>12}", cap.vcpus, cap.memory_mib);
    println!("allocatable   {:>8} {:>12}", alloc.vcpus, alloc.memory_mib);
    println!("committed     {:>8} {:>12}", com.vcpus, com.memory_mib);
    println!(
        "VMs           {} total, {} running",
        n.vms_total, n.vms_running
    );
    println!(
        "KVM           {} (API {}, max {} vCPUs) {}",
        if kvm.available {
            "available"
        } else {
            "unavailable"
        },
        kvm.api_version,
        kvm.max_vcpus,
        kvm.detail
    );
    println!("KVM caps      {}", kvm.capabilities.join(" "));
    println!(
        "cgroups       {} {}: {}",
        if cg.available { "yes" } else { "no" },
        cg.version,
        cg.detail
    );
}
