//! Prometheus metrics over HTTP: per-VM state, the VMM's vCPU-exit and serial counters, VMM
//! memory and CPU, and the API's request counts and latencies.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quantix_proto::v1::VmState;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::manager::Manager;

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Hist {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// The API's counters.
#[derive(Default)]
pub struct ApiMetrics {
    requests: Mutex<BTreeMap<(String, String), u64>>,
    latency: Mutex<BTreeMap<String, Hist>>,
}

impl ApiMetrics {
    /// Counts one call of `method` that ended with `code` after `elapsed`.
    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        *self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((method.to_string(), format!("{code:?}")))
            .or_default() += 1;
        let secs = elapsed.as_secs_f64();
        let mut lat = self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let h = lat.entry(method.to_string()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if secs <= *b {
                h.counts[i] += 1;
            }
        }
        h.count += 1;
        h.sum += secs;
    }

    fn render(&self, out: &mut String) {
        out.push_str("# HELP quantix_agent_requests_total gRPC calls by method and status code.\n# TYPE quantix_agent_requests_total counter\n");
        for ((m, c), n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                out,
                "quantix_agent_requests_total{{method=\"{m}\",code=\"{c}\"}} {n}"
            );
        }
        out.push_str("# HELP quantix_agent_request_seconds gRPC call latency.\n# TYPE quantix_agent_request_seconds histogram\n");
        for (m, h) in self
            .latency
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "quantix_agent_request_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {}",
                    h.counts[i]
                );
            }
            let _ = writeln!(
                out,
                "quantix_agent_request_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "quantix_agent_request_seconds_sum{{method=\"{m}\"}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "quantix_agent_request_seconds_count{{method=\"{m}\"}} {}",
                h.count
            );
        }
    }
}

/// Renders every metric.
pub async fn render(manager: &Arc<Manager>, api: &ApiMetrics) -> String {
    let mut out = String::new();
    api.render(&mut out);
    let vms = manager.all().unwrap_or_default();
    out.push_str(
        "# HELP quantix_vm_state 1 for the VM's current state.\n# TYPE quantix_vm_state gauge\n",
    );
    for vm in &vms {
        let state = vm.status.as_ref().map(|s| s.state).unwrap_or(0);
        let name = VmState::try_from(state)
            .map(crate::manager::state_name)
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "quantix_vm_state{{vm=\"{}\",state=\"{name}\"}} 1",
            vm.id
        );
    }
    let mut per_vm = String::new();
    for vm in &vms {
        let Some(st) = vm.status.as_ref() else {
            continue;
        };
        if st.pid == 0 {
            continue;
        }
        if let Some(rss) = crate::process::rss_bytes(st.pid) {
            let _ = writeln!(
                per_vm,
                "quantix_vmm_resident_bytes{{vm=\"{}\"}} {rss}",
                vm.id
            );
        }
        if let Some(cpu) = crate::process::cpu_seconds(st.pid) {
            let _ = writeln!(
                per_vm,
                "quantix_vmm_cpu_seconds_total{{vm=\"{}\"}} {cpu}",
                vm.id
            );
        }
        // Only a live VMM has counters (a paused one answers too: pause is inside the VMM).
        if st.state != VmState::Running as i32 && st.state != VmState::Paused as i32 {
            continue;
        }
        let sock = crate::process::VmPaths {
            dir: std::path::PathBuf::from(&st.directory),
        }
        .api_socket();
        let Ok(m) = crate::control::call(&sock, "metrics", Duration::from_millis(200)).await else {
            continue;
        };
        if let Some(vcpus) = m["vcpus"].as_array() {
            for v in vcpus {
                let idx = v["index"].as_u64().unwrap_or(0);
                for key in ["exits", "io_exits", "mmio_exits", "unclaimed_accesses"] {
                    if let Some(n) = v[key].as_u64() {
                        let _ = writeln!(
                            per_vm,
                            "quantix_vm_vcpu_{key}_total{{vm=\"{}\",vcpu=\"{idx}\"}} {n}",
                            vm.id
                        );
                    }
                }
            }
        }
        // Virtio devices: every counter the VMM reports, labelled by device and type.
        if let Some(devices) = m["devices"].as_array() {
            for d in devices {
                let (Some(name), Some(kind)) = (d["name"].as_str(), d["type"].as_str()) else {
                    continue;
                };
                let labels = format!(
                    "vm=\"{}\",device=\"{}\",type=\"{}\"",
                    vm.id,
                    prometheus_label(name),
                    prometheus_label(kind)
                );
                if let Some(n) = d["needs_reset_events"].as_u64() {
                    let _ = writeln!(
                        per_vm,
                        "quantix_vm_device_needs_reset_total{{{labels}}} {n}"
                    );
                }
                if let Some(counters) = d["counters"].as_object() {
                    for (key, v) in counters {
                        let (Some(n), true) = (
                            v.as_u64(),
                            key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
                        ) else {
                            continue;
                        };
                        let _ = writeln!(per_vm, "quantix_vm_device_{key}_total{{{labels}}} {n}");
                    }
                }
            }
        }
        // Guest-triggered log lines: how often the guest tripped each, how many the VMM's
        // rate limit left out of its log.
        if let Some(kinds) = m["guest_log"].as_array() {
            for k in kinds {
                let Some(kind) = k["kind"].as_str() else {
                    continue;
                };
                for key in ["events", "suppressed"] {
                    if let Some(n) = k[key].as_u64() {
                        let _ = writeln!(
                            per_vm,
                            "quantix_vm_guest_log_{key}_total{{vm=\"{}\",kind=\"{}\"}} {n}",
                            vm.id,
                            prometheus_label(kind)
                        );
                    }
                }
            }
        }
        if let Some(serial) = m["serial"].as_object() {
            for (key, v) in serial {
                if let Some(n) = v.as_u64() {
                    let _ = writeln!(
                        per_vm,
                        "quantix_vm_serial_{key}_total{{vm=\"{}\"}} {n}",
                        vm.id
                    );
                }
            }
        }
    }
    out.push_str("# HELP quantix_vmm_resident_bytes and per-VM counters from each VMM.\n");
    out.push_str(&per_vm);
    let me = std::process::id();
    out.push_str("# HELP quantix_agent_store_pending_records VM records the store could not take yet (a full disk); retried every 2 s.\n# TYPE quantix_agent_store_pending_records gauge\n");
    let _ = writeln!(
        out,
        "quantix_agent_store_pending_records {}",
        manager.pending_records()
    );
    if let Some(rss) = crate::process::rss_bytes(me) {
        let _ = writeln!(out, "quantix_agent_resident_bytes {rss}");
    }
    if let Some(cpu) = crate::process::cpu_seconds(me) {
        let _ = writeln!(out, "quantix_agent_cpu_seconds_total {cpu}");
    }
    out
}

/// A label value with `\`, `"` and newlines escaped (Prometheus text format).
fn prometheus_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` (any path, in fact) on `listener`.
pub async fn serve(listener: TcpListener, manager: Arc<Manager>, api: Arc<ApiMetrics>) {
    info!(addr = ?listener.local_addr().ok(), "metrics listening");
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let manager = manager.clone();
        let api = api.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (we answer every request the same way).
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..])).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let body = render(&manager, &api).await;
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            if stream.write_all(head.as_bytes()).await.is_err()
                || stream.write_all(body.as_bytes()).await.is_err()
            {
                warn!("metrics client went away");
            }
        });
    }
}
