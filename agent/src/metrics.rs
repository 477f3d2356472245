//! Prometheus metrics over HTTP (`GET /metrics`, OpenMetrics text through
//! `prometheus-client`): the agent's build and process, the node's capacity and commitment,
//! per-VM state, each VMM's process and counters, and the API's request counts and
//! latencies.
//!
//! Every scrape builds one registry: the API's families (which live as long as the agent)
//! and families filled from the VMs' samples, so that each family is written once with all
//! its VMs' lines together. The VMMs are asked in parallel, each within
//! [`VMM_SCRAPE_LIMIT`]; a sample younger than [`SAMPLE_CACHE`] is reused, so that scrapers
//! hitting the agent at once do not multiply the calls on every VMM.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use quantix_proto::v1::{Vm, VmState};
use quantix_vmm_api::control::GetMetrics;
use quantix_vmm_api::metrics::MetricsSample;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::manager::Manager;

/// How long the agent waits for one VMM's counters in a scrape.
pub const VMM_SCRAPE_LIMIT: Duration = Duration::from_millis(200);
/// How long a VMM's sample is reused.
pub const SAMPLE_CACHE: Duration = Duration::from_secs(1);
/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Latency buckets, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodCode {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabel {
    vm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VcpuLabels {
    vm: String,
    vcpu: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceLabels {
    vm: String,
    device: String,
    #[prometheus(flatten)]
    kind: DeviceType,
}

/// `type` is a Rust keyword: its label set is written by hand.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct DeviceType(String);

impl EncodeLabelSet for DeviceType {
    fn encode(
        &self,
        encoder: &mut prometheus_client::encoding::LabelSetEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeLabel;
        ("type", self.0.as_str()).encode(encoder.encode_label())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GuestLogLabels {
    vm: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    vmm_version: String,
}

type HistogramFamily = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// The API's counters, kept for the agent's lifetime.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    requests: Family<MethodCode, Counter>,
    latency: HistogramFamily,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl ApiMetrics {
    /// Counts one call of `method` that ended with `code` after `elapsed`.
    pub fn observe(&self, method: &str, code: tonic::Code, elapsed: Duration) {
        self.requests
            .get_or_create(&MethodCode {
                method: method.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabel {
                method: method.to_string(),
            })
            .observe(elapsed.as_secs_f64());
    }
}

/// A process's figures from /proc, as the Prometheus client libraries' standard
/// `process_*` metrics name them (the Rust client has no collector for them).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let me = std::process::id();
        let Some(p) = crate::process::stats(me) else {
            return Ok(());
        };
        let counter = ConstCounter::new(p.cpu_seconds);
        counter.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds.",
            None,
            counter.metric_type(),
        )?)?;
        let gauges: [(&str, &str, f64); 5] = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                p.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
                p.virtual_bytes as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                p.start_time_seconds,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors.",
                p.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors.",
                p.max_fds as f64,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

/// A VMM's sample and when it was taken.
type CachedSample = (Instant, Arc<MetricsSample>);

/// Serves the metrics of one agent.
pub struct Exporter {
    manager: Arc<Manager>,
    api: ApiMetrics,
    vmm_version: String,
    cache: Mutex<HashMap<String, CachedSample>>,
}

impl Exporter {
    /// An exporter of `manager`'s VMs and `api`'s calls.
    pub fn new(manager: Arc<Manager>, api: ApiMetrics, vmm_version: String) -> Self {
        Self {
            manager,
            api,
            vmm_version,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Every live VM's counters: from the cache, or asked of its VMM (all in parallel).
    async fn samples(&self, vms: &[Vm]) -> BTreeMap<String, Arc<MetricsSample>> {
        let now = Instant::now();
        let mut out = BTreeMap::new();
        let mut asks = tokio::task::JoinSet::new();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            for vm in vms {
                let Some(st) = vm.status.as_ref() else {
                    continue;
                };
                // Only a live VMM has counters (a paused one answers: pause is inside it).
                if st.pid == 0
                    || (st.state != VmState::Running as i32 && st.state != VmState::Paused as i32)
                {
                    continue;
                }
                match cache.get(&vm.id) {
                    Some((at, s)) if now.duration_since(*at) < SAMPLE_CACHE => {
                        out.insert(vm.id.clone(), s.clone());
                    }
                    _ => {
                        let id = vm.id.clone();
                        let sock = crate::process::VmPaths {
                            dir: std::path::PathBuf::from(&st.directory),
                        }
                        .api_socket();
                        asks.spawn(async move {
                            let r =
                                crate::control::call::<GetMetrics>(&sock, VMM_SCRAPE_LIMIT).await;
                            (id, r)
                        });
                    }
                }
            }
        }
        while let Some(joined) = asks.join_next().await {
            let Ok((id, reply)) = joined else { continue };
            match reply {
                Ok(sample) => {
                    out.insert(id, Arc::new(sample));
                }
                // Left out of this scrape; the VM's state line still shows it.
                Err(e) => debug!(vm = %id, error = %e, "no counters from the VMM"),
            }
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|id, (at, _)| {
            vms.iter().any(|v| &v.id == id) && now.duration_since(*at) < SAMPLE_CACHE
        });
        for (id, s) in &out {
            cache.entry(id.clone()).or_insert((now, s.clone()));
        }
        out
    }

    /// Renders every metric in the OpenMetrics text format.
    pub async fn render(&self) -> String {
        let vms = self.manager.all().unwrap_or_default();
        let samples = self.samples(&vms).await;
        let registry = self.registry(&vms, &samples);
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            warn!(error = %e, "cannot encode the metrics");
        }
        out
    }

    fn registry(&self, vms: &[Vm], samples: &BTreeMap<String, Arc<MetricsSample>>) -> Registry {
        let mut r = Registry::default();
        r.register(
            "quantix_agent_build",
            "The agent's and its VMM's versions.",
            Info::new(BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
                vmm_version: self.vmm_version.clone(),
            }),
        );
        r.register_collector(Box::new(ProcessCollector));
        r.register(
            "quantix_agent_requests",
            "gRPC calls by method and status code.",
            self.api.requests.clone(),
        );
        r.register(
            "quantix_agent_request_seconds",
            "gRPC call latency.",
            self.api.latency.clone(),
        );
        let pending: Gauge = Gauge::default();
        pending.set(i64::try_from(self.manager.pending_records()).unwrap_or(i64::MAX));
        r.register(
            "quantix_agent_store_pending_records",
            "VM records the store could not take yet (a full disk); retried every 2 s.",
            pending,
        );
        self.register_node(&mut r);
        register_vms(&mut r, vms, samples);
        r
    }

    fn register_node(&self, r: &mut Registry) {
        let capacity = crate::node::host_resources();
        let allocatable = self.manager.allocatable();
        let committed = self
            .manager
            .committed()
            .map(|(c, _, _)| c)
            .unwrap_or_default();
        for (what, help, res) in [
            ("capacity", "the host's", capacity),
            (
                "allocatable",
                "what VMs may take of the host's",
                allocatable,
            ),
            (
                "committed",
                "what the active VMs' specs take of the host's",
                committed,
            ),
        ] {
            let vcpus: Gauge = Gauge::default();
            vcpus.set(i64::from(res.vcpus));
            r.register(
                format!("quantix_node_{what}_vcpus"),
                format!("vCPUs: {help} CPUs."),
                vcpus,
            );
            let memory: Gauge = Gauge::default();
            memory.set(i64::try_from(res.memory_mib.saturating_mul(1 << 20)).unwrap_or(i64::MAX));
            r.register_with_unit(
                format!("quantix_node_{what}_memory"),
                format!("Memory: {help} RAM."),
                Unit::Bytes,
                memory,
            );
        }
    }
}

/// The per-VM families: state, each VMM's process, and each VMM's counters.
fn register_vms(r: &mut Registry, vms: &[Vm], samples: &BTreeMap<String, Arc<MetricsSample>>) {
    let state: Family<VmStateLabels, Gauge> = Family::default();
    let rss: Family<VmLabel, Gauge> = Family::default();
    let cpu: Family<VmLabel, Counter<f64, AtomicU64>> = Family::default();
    for vm in vms {
        let st = vm.status.as_ref();
        let name = VmState::try_from(st.map(|s| s.state).unwrap_or(0))
            .map(crate::manager::state_name)
            .unwrap_or_default();
        state
            .get_or_create(&VmStateLabels {
                vm: vm.id.clone(),
                state: name.to_string(),
            })
            .set(1);
        let Some(p) = st
            .filter(|s| s.pid != 0)
            .and_then(|s| crate::process::stats(s.pid))
        else {
            continue;
        };
        let l = VmLabel { vm: vm.id.clone() };
        rss.get_or_create(&l)
            .set(i64::try_from(p.resident_bytes).unwrap_or(i64::MAX));
        cpu.get_or_create(&l).inc_by(p.cpu_seconds);
    }
    r.register("quantix_vm_state", "1 for the VM's current state.", state);
    r.register_with_unit(
        "quantix_vmm_resident",
        "Resident memory of the VM's VMM process.",
        Unit::Bytes,
        rss,
    );
    r.register_with_unit(
        "quantix_vmm_cpu",
        "CPU time (user and system) of the VM's VMM process.",
        Unit::Seconds,
        cpu,
    );

    let vcpu: BTreeMap<&str, Family<VcpuLabels, Counter>> =
        ["exits", "io_exits", "mmio_exits", "unclaimed_accesses"]
            .into_iter()
            .map(|k| (k, Family::default()))
            .collect();
    let serial: BTreeMap<&str, Family<VmLabel, Counter>> = [
        "tx_bytes",
        "tx_lost_bytes",
        "rx_bytes",
        "tx_coalesced_bytes",
    ]
    .into_iter()
    .map(|k| (k, Family::default()))
    .collect();
    let needs_reset: Family<DeviceLabels, Counter> = Family::default();
    let mut device: BTreeMap<String, Family<DeviceLabels, Counter>> = BTreeMap::new();
    let guest_events: Family<GuestLogLabels, Counter> = Family::default();
    let guest_suppressed: Family<GuestLogLabels, Counter> = Family::default();
    for (id, m) in samples {
        for v in &m.vcpus {
            let l = VcpuLabels {
                vm: id.clone(),
                vcpu: v.index.to_string(),
            };
            for (key, n) in [
                ("exits", v.exits),
                ("io_exits", v.io_exits),
                ("mmio_exits", v.mmio_exits),
                ("unclaimed_accesses", v.unclaimed_accesses),
            ] {
                if let Some(f) = vcpu.get(key) {
                    f.get_or_create(&l).inc_by(n);
                }
            }
        }
        let l = VmLabel { vm: id.clone() };
        for (key, n) in [
            ("tx_bytes", m.serial.tx_bytes),
            ("tx_lost_bytes", m.serial.tx_lost_bytes),
            ("rx_bytes", m.serial.rx_bytes),
            ("tx_coalesced_bytes", m.serial.tx_coalesced_bytes),
        ] {
            if let Some(f) = serial.get(key) {
                f.get_or_create(&l).inc_by(n);
            }
        }
        for d in &m.devices {
            let l = DeviceLabels {
                vm: id.clone(),
                device: d.name.clone(),
                kind: DeviceType(d.kind.clone()),
            };
            needs_reset.get_or_create(&l).inc_by(d.needs_reset_events);
            for (key, n) in &d.counters {
                // The VMM names its counters; a name that is not a metric name is left out.
                if key.is_empty()
                    || !key
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    continue;
                }
                device
                    .entry(key.clone())
                    .or_default()
                    .get_or_create(&l)
                    .inc_by(*n);
            }
        }
        for k in &m.guest_log {
            let l = GuestLogLabels {
                vm: id.clone(),
                kind: k.kind.clone(),
            };
            guest_events.get_or_create(&l).inc_by(k.events);
            guest_suppressed.get_or_create(&l).inc_by(k.suppressed);
        }
    }
    for (key, f) in vcpu {
        r.register(
            format!("quantix_vm_vcpu_{key}"),
            format!("vCPU {} since the VMM started.", key.replace('_', " ")),
            f,
        );
    }
    for (key, f) in serial {
        r.register(
            format!("quantix_vm_serial_{key}"),
            format!("Serial port (COM1) {}.", key.replace('_', " ")),
            f,
        );
    }
    r.register(
        "quantix_vm_device_needs_reset",
        "Times a virtio device found a queue unusable and asked the driver for a reset.",
        needs_reset,
    );
    for (key, f) in device {
        r.register(
            format!("quantix_vm_device_{key}"),
            format!("Virtio device counter {key} (see docs/devices.md)."),
            f,
        );
    }
    r.register(
        "quantix_vm_guest_log_events",
        "Guest-triggered events of each kind that the VMM logs.",
        guest_events,
    );
    r.register(
        "quantix_vm_guest_log_suppressed",
        "Guest-triggered log lines the VMM's rate limit left out.",
        guest_suppressed,
    );
}

async fn metrics(State(exporter): State<Arc<Exporter>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, CONTENT_TYPE)],
        exporter.render().await,
    )
}

async fn not_found() -> impl IntoResponse {
    (
        StatusCode::NOT_FOUND,
        "not found: metrics are at /metrics\n",
    )
}

/// Serves `GET /metrics` on `listener` (every other path is 404).
pub async fn serve(listener: TcpListener, exporter: Arc<Exporter>) {
    info!(addr = ?listener.local_addr().ok(), "metrics listening");
    let app = axum::Router::new()
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(exporter);
    if let Err(e) = axum::serve(listener, app).await {
        warn!(error = %e, "the metrics server stopped");
    }
}
