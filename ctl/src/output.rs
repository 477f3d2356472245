//! What quantixctl prints: tables for people (`table`, `wide`), the API's own objects for
//! programs (`json`, `yaml`: the canonical proto3 JSON mapping of the messages, so that
//! `get -o yaml` is a valid input of `create -f`), and ids (`name`).

use clap::ValueEnum;
use quantix_proto::v1::{EventKind, Node, Snapshot, SnapshotKind, Vm, VmEvent, VmState};
use serde::Serialize;

/// An output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A table with the main columns.
    Table,
    /// A table with more columns.
    Wide,
    /// The API objects as JSON (canonical proto3 JSON mapping; lists as arrays, events one
    /// per line).
    Json,
    /// The same objects as YAML (lists as sequences, events as documents).
    Yaml,
    /// VM ids, one per line.
    Name,
}

fn state(s: i32) -> String {
    VmState::try_from(s)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("VM_STATE_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| s.to_string())
}

/// Prints `value` as pretty JSON or as YAML.
pub fn document<T: Serialize + ?Sized>(value: &T, format: Format) {
    match format {
        Format::Yaml => match serde_yaml_ng::to_string(value) {
            Ok(text) => print!("{text}"),
            Err(e) => eprintln!("quantixctl: cannot render YAML: {e}"),
        },
        _ => match serde_json::to_string_pretty(value) {
            Ok(text) => println!("{text}"),
            Err(e) => eprintln!("quantixctl: cannot render JSON: {e}"),
        },
    }
}

/// VMs, in `format`. `one` prints a single VM as an object rather than a list of one.
pub fn vms(vms: &[Vm], format: Format, one: bool) {
    match format {
        Format::Json | Format::Yaml if one && vms.len() == 1 => document(&vms[0], format),
        Format::Json | Format::Yaml => document(vms, format),
        Format::Name => {
            for vm in vms {
                println!("{}", vm.id);
            }
        }
        Format::Table | Format::Wide => table(vms, format == Format::Wide),
    }
}

fn table(vms: &[Vm], wide: bool) {
    let mut header = format!(
        "{:<20} {:<20} {:<9} {:>5} {:>8} {:>8}",
        "ID", "NAME", "STATE", "CPUS", "MEM MiB", "PID"
    );
    if wide {
        header.push_str(&format!(
            " {:>8} {:<17} {:<6} {:>5}",
            "RESTARTS", "MAC", "DISKS", "CID"
        ));
    }
    println!("{header}  LAST EXIT");
    for vm in vms {
        let spec = vm.spec.clone().unwrap_or_default();
        let st = vm.status.clone().unwrap_or_default();
        let pid = if st.pid == 0 {
            "-".into()
        } else {
            st.pid.to_string()
        };
        let mut line = format!(
            "{:<20} {:<20} {:<9} {:>5} {:>8} {:>8}",
            vm.id,
            spec.name,
            state(st.state),
            spec.vcpus,
            spec.memory_mib,
            pid
        );
        if wide {
            let mac = st.nic_macs.first().cloned().unwrap_or_else(|| "-".into());
            let cid = spec
                .vsock
                .map(|v| v.guest_cid.to_string())
                .unwrap_or_else(|| "-".into());
            line.push_str(&format!(
                " {:>8} {:<17} {:<6} {:>5}",
                st.restart_count,
                mac,
                spec.disks.len(),
                cid
            ));
        }
        let exit = st.last_exit.map(|e| e.reason).unwrap_or_else(|| "-".into());
        println!("{line}  {exit}");
    }
}

/// One VM in detail: every field of its canonical form, one per line (a table), or the
/// object.
pub fn vm_detail(vm: &Vm, format: Format) {
    if format != Format::Table && format != Format::Wide {
        return vms(std::slice::from_ref(vm), format, true);
    }
    detail(vm);
}

/// Snapshots, in `format`. `one` prints a single snapshot as an object.
pub fn snapshots(list: &[Snapshot], format: Format, one: bool) {
    match format {
        Format::Json | Format::Yaml if one && list.len() == 1 => document(&list[0], format),
        Format::Json | Format::Yaml => document(list, format),
        Format::Name => {
            for s in list {
                println!("{}", s.id);
            }
        }
        Format::Table | Format::Wide => {
            let mib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
            println!(
                "{:<20} {:<20} {:<5} {:<20} {:>8} {:>9} {:>9} {:>9}",
                "ID", "VM", "KIND", "PARENT", "MEM MiB", "DATA MiB", "DISK MiB", "PAUSED ms"
            );
            for s in list {
                let kind = match SnapshotKind::try_from(s.kind) {
                    Ok(SnapshotKind::Diff) => "diff",
                    Ok(SnapshotKind::Full) => "full",
                    _ => "?",
                };
                let parent = if s.parent_id.is_empty() {
                    "-"
                } else {
                    &s.parent_id
                };
                println!(
                    "{:<20} {:<20} {:<5} {:<20} {:>8} {:>9} {:>9} {:>9}",
                    s.id,
                    s.vm_id,
                    kind,
                    parent,
                    s.memory_bytes >> 20,
                    mib(s.data_bytes),
                    mib(s.disk_bytes),
                    s.paused_ms
                );
            }
        }
    }
}

/// One snapshot in detail (as `vm_detail`).
pub fn snapshot_detail(s: &Snapshot, format: Format) {
    if format != Format::Table && format != Format::Wide {
        return snapshots(std::slice::from_ref(s), format, true);
    }
    detail(s);
}

/// Every field of an API object's canonical form, one per line.
fn detail<T: Serialize>(object: &T) {
    let v = serde_json::to_value(object).unwrap_or_default();
    fn walk(prefix: &str, v: &serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    let p = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&p, v);
                }
            }
            serde_json::Value::String(s) => println!("{prefix:<28} {s}"),
            other => println!("{prefix:<28} {other}"),
        }
    }
    walk("", &v);
}

/// One event: a table line, a JSON line, a YAML document or the VM id.
pub fn event(ev: &VmEvent, format: Format) {
    match format {
        Format::Json => match serde_json::to_string(ev) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("quantixctl: cannot render JSON: {e}"),
        },
        Format::Yaml => {
            println!("---");
            document(ev, format);
        }
        Format::Name => println!("{}", ev.vm_id),
        Format::Table | Format::Wide => {
            let kind = EventKind::try_from(ev.kind)
                .map(|k| {
                    k.as_str_name()
                        .trim_start_matches("EVENT_KIND_")
                        .to_ascii_lowercase()
                })
                .unwrap_or_default();
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
}

/// The node.
pub fn node(n: &Node, format: Format) {
    match format {
        Format::Json | Format::Yaml => return document(n, format),
        Format::Name => {
            println!("{}", n.hostname);
            return;
        }
        Format::Table | Format::Wide => {}
    }
    let cap = n.capacity.unwrap_or_default();
    let alloc = n.allocatable.unwrap_or_default();
    let com = n.committed.unwrap_or_default();
    let kvm = n.kvm.clone().unwrap_or_default();
    let cg = n.cgroups.clone().unwrap_or_default();
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
