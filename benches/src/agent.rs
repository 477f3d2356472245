//! `agent`: the node agent's API latency and throughput on this host's /dev/kvm, with a
//! tiny guest that prints one line and halts (so that a start measures the agent and the
//! VMM, not a guest's boot).
//!
//! Phases, against one real `quantix-agent` (release build) driving real `quantix-vmm`s:
//! 1. create-and-start `vms` VMs from `clients` concurrent clients: the latency of each
//!    `CreateVm(start=true)` (it returns once the VMM answers on its control socket), and
//!    VMs started per second over the whole phase;
//! 2. `ListVms` of all of them from `clients` concurrent clients;
//! 3. the agent's resident memory and CPU time per managed VM while they idle;
//! 4. `StopVm` of each from `clients` concurrent clients; then everything is deleted.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quantix_proto::v1::vm_service_client::VmServiceClient;
use quantix_proto::v1::{
    BootSource, CreateVmRequest, DeleteVmRequest, ListVmsRequest, StopVmRequest, VmSpec, VmState,
};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use crate::report::{format_targets, Target};
use crate::stats::percentile;
use crate::BenchError;

/// Options of the `agent` benchmark.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// VMs created, listed and stopped.
    pub vms: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// List calls per client.
    pub lists: usize,
    /// Directory holding release builds of quantix-agent, quantix-jailer and quantix-vmm.
    pub bin_dir: PathBuf,
}

/// p50/p99 of one call, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Calls measured.
    pub n: usize,
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile (nearest rank).
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

fn latency(samples: &[f64]) -> Latency {
    Latency {
        n: samples.len(),
        p50_ms: percentile(samples, 50.0).unwrap_or(f64::NAN),
        p99_ms: percentile(samples, 99.0).unwrap_or(f64::NAN),
        max_ms: percentile(samples, 100.0).unwrap_or(f64::NAN),
    }
}

/// The figures.
#[derive(Debug, Clone, Serialize)]
pub struct AgentReport {
    /// VMs.
    pub vms: usize,
    /// Concurrent clients.
    pub clients: usize,
    /// CreateVm(start=true) to RUNNING.
    pub create_to_running: Latency,
    /// VMs started per second over phase 1.
    pub starts_per_second: f64,
    /// ListVms of every VM.
    pub list: Latency,
    /// StopVm.
    pub stop: Latency,
    /// The agent's resident memory before any VM, KiB.
    pub agent_rss_idle_kb: u64,
    /// The agent's resident memory with every VM running, KiB.
    pub agent_rss_loaded_kb: u64,
    /// (loaded - idle) / vms, KiB.
    pub agent_rss_per_vm_kb: f64,
    /// The agent's CPU time per VM per second of wall time while the VMs idle, ms/s.
    pub agent_cpu_ms_per_vm_per_s: f64,
    /// Median resident memory of one VMM (64 MiB guest that touched little), KiB.
    pub vmm_rss_median_kb: u64,
    /// Targets from the issue.
    pub targets: Vec<Target>,
}

fn proc_field(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn guest_elf() -> Vec<u8> {
    // "ok\n" to COM1, then hlt; jmp $-1.
    let mut code = vec![0x66, 0xba, 0xf8, 0x03];
    for b in b"ok\n" {
        code.extend([0xb0, *b, 0xee]);
    }
    code.extend([0xf4, 0xeb, 0xfd]);
    crate::guest::elf64_code(&code)
}

struct AgentProcess {
    child: Child,
    state: PathBuf,
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

async fn channel(path: &Path) -> Result<Channel, BenchError> {
    let path = path.to_path_buf();
    Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .map_err(|e| BenchError::Agent(format!("cannot connect to the agent: {e}")))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the benchmark.
pub fn run(opts: &AgentOptions) -> Result<AgentReport, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Agent(format!("tokio: {e}")))?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &AgentOptions) -> Result<AgentReport, BenchError> {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Err(BenchError::Agent("/dev/kvm is not usable here".into()));
    }
    let state = std::env::temp_dir().join(format!("qx-bench-agent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    std::fs::create_dir_all(&state)
        .map_err(|e| BenchError::Agent(format!("{}: {e}", state.display())))?;
    let kernel = state.join("guest.elf");
    std::fs::write(&kernel, guest_elf())
        .map_err(|e| BenchError::Agent(format!("{}: {e}", kernel.display())))?;
    let agent_bin = opts.bin_dir.join("quantix-agent");
    let child = Command::new(&agent_bin)
        .arg("--state-dir")
        .arg(state.join("state"))
        .args(["--metrics-listen", "", "--log-level", "warn"])
        .arg("--vmm")
        .arg(opts.bin_dir.join("quantix-vmm"))
        .arg("--image-dir")
        .arg(&state)
        .args(["--max-vcpus", "100000", "--max-memory-mib", "100000000"])
        .args(["--cgroup-name", &format!("qx-bench-{}", std::process::id())])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| BenchError::Agent(format!("{}: {e}", agent_bin.display())))?;
    let agent = AgentProcess {
        child,
        state: state.clone(),
    };
    let agent_pid = agent.child.id();
    let sock = state.join("state/agent.sock");
    let t = Instant::now();
    while !sock.exists() {
        if t.elapsed() > Duration::from_secs(20) {
            return Err(BenchError::Agent("the agent did not come up".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ch = channel(&sock).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let agent_rss_idle_kb = proc_field(agent_pid, "VmRSS:").unwrap_or(0);

    // 1. Create-to-running.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..opts.clients {
        let mut c = VmServiceClient::new(ch.clone());
        let next = next.clone();
        let kernel = kernel.display().to_string();
        let total = opts.vms;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return Ok::<_, String>(lat);
                }
                let spec = VmSpec {
                    name: format!("bench-{i}"),
                    vcpus: 1,
                    memory_mib: 64,
                    boot: Some(BootSource {
                        kernel: kernel.clone(),
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let t = Instant::now();
                let vm = c
                    .create_vm(CreateVmRequest {
                        vm_id: format!("b{i:04}"),
                        spec: Some(spec),
                        start: true,
                    })
                    .await
                    .map_err(|e| format!("create b{i:04}: {e}"))?
                    .into_inner();
                lat.push(ms(t.elapsed()));
                let state = vm.status.map(|s| s.state).unwrap_or_default();
                if state != VmState::Running as i32 {
                    return Err(format!("b{i:04} is in state {state} after create"));
                }
            }
        }));
    }
    let mut create = Vec::new();
    for t in tasks {
        create.extend(
            t.await
                .map_err(|e| BenchError::Agent(e.to_string()))?
                .map_err(BenchError::Agent)?,
        );
    }
    let phase1 = started.elapsed();
    let starts_per_second = opts.vms as f64 / phase1.as_secs_f64();

    // 2. List.
    let mut tasks = Vec::new();
    for _ in 0..opts.clients {
        let mut c = VmServiceClient::new(ch.clone());
        let n = opts.lists;
        let want = opts.vms;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            for _ in 0..n {
                let t = Instant::now();
                let page = c
                    .list_vms(ListVmsRequest {
                        page_size: 1000,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| format!("list: {e}"))?
                    .into_inner();
                lat.push(ms(t.elapsed()));
                if page.vms.len() != want {
                    return Err(format!("list returned {} VMs, not {want}", page.vms.len()));
                }
            }
            Ok::<_, String>(lat)
        }));
    }
    let mut list = Vec::new();
    for t in tasks {
        list.extend(
            t.await
                .map_err(|e| BenchError::Agent(e.to_string()))?
                .map_err(BenchError::Agent)?,
        );
    }

    // 3. The agent's footprint with every VM running and idle.
    let agent_rss_loaded_kb = proc_field(agent_pid, "VmRSS:").unwrap_or(0);
    let ticks0 = cpu_ticks(agent_pid).unwrap_or(0);
    let window = Duration::from_secs(3);
    tokio::time::sleep(window).await;
    let ticks1 = cpu_ticks(agent_pid).unwrap_or(0);
    // SAFETY: sysconf takes a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let agent_cpu_ms_per_vm_per_s =
        (ticks1.saturating_sub(ticks0) as f64 / hz * 1e3) / window.as_secs_f64() / opts.vms as f64;
    let mut c = VmServiceClient::new(ch.clone());
    let all = c
        .list_vms(ListVmsRequest {
            page_size: 1000,
            ..Default::default()
        })
        .await
        .map_err(|e| BenchError::Agent(format!("list: {e}")))?
        .into_inner();
    let mut vmm_rss: Vec<f64> = all
        .vms
        .iter()
        .filter_map(|v| v.status.as_ref().map(|s| s.pid))
        .filter_map(|pid| proc_field(pid, "VmRSS:"))
        .map(|kb| kb as f64)
        .collect();
    vmm_rss.sort_by(f64::total_cmp);
    let vmm_rss_median_kb = crate::stats::median(&vmm_rss).unwrap_or(0.0) as u64;

    // 4. Stop.
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..opts.clients {
        let mut c = VmServiceClient::new(ch.clone());
        let next = next.clone();
        let total = opts.vms;
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return Ok::<_, String>(lat);
                }
                let t = Instant::now();
                c.stop_vm(StopVmRequest {
                    vm_id: format!("b{i:04}"),
                    timeout_ms: 5000,
                    force: false,
                })
                .await
                .map_err(|e| format!("stop b{i:04}: {e}"))?;
                lat.push(ms(t.elapsed()));
                c.delete_vm(DeleteVmRequest {
                    vm_id: format!("b{i:04}"),
                    force: true,
                })
                .await
                .map_err(|e| format!("delete b{i:04}: {e}"))?;
            }
        }));
    }
    let mut stop = Vec::new();
    for t in tasks {
        stop.extend(
            t.await
                .map_err(|e| BenchError::Agent(e.to_string()))?
                .map_err(BenchError::Agent)?,
        );
    }
    drop(agent);

    let create_to_running = latency(&create);
    let list = latency(&list);
    let stop = latency(&stop);
    let targets = vec![
        Target {
            target: format!("List p99 under 5 ms with {} VMs", opts.vms),
            measured: format!("p99 {:.2} ms", list.p99_ms),
            met: (opts.vms >= 100).then_some(list.p99_ms < 5.0),
        },
        Target {
            target: "Create-to-Running: agent + VMM add under 50 ms".into(),
            measured: format!(
                "p50 {:.1} ms with a guest that needs no boot time",
                create_to_running.p50_ms
            ),
            met: Some(create_to_running.p50_ms < 50.0),
        },
    ];
    Ok(AgentReport {
        vms: opts.vms,
        clients: opts.clients,
        create_to_running,
        starts_per_second,
        list,
        stop,
        agent_rss_idle_kb,
        agent_rss_loaded_kb,
        agent_rss_per_vm_kb: agent_rss_loaded_kb.saturating_sub(agent_rss_idle_kb) as f64
            / opts.vms as f64,
        agent_cpu_ms_per_vm_per_s,
        vmm_rss_median_kb,
        targets,
    })
}

/// The printed report.
pub fn format(r: &AgentReport) -> String {
    let row = |name: &str, l: &Latency| {
        format!(
            "  {name:<22} {:>6} {:>10.2} {:>10.2} {:>10.2}\n",
            l.n, l.p50_ms, l.p99_ms, l.max_ms
        )
    };
    let mut s = format!(
        "node agent, {} VMs, {} concurrent clients (tiny guest: start = agent + VMM only)\n",
        r.vms, r.clients
    );
    s.push_str(&format!(
        "  {:<22} {:>6} {:>10} {:>10} {:>10}\n",
        "call", "n", "p50 ms", "p99 ms", "max ms"
    ));
    s.push_str(&row("CreateVm(start) -> up", &r.create_to_running));
    s.push_str(&row("ListVms (all)", &r.list));
    s.push_str(&row("StopVm", &r.stop));
    s.push_str(&format!(
        "  VMs started per second: {:.1}\n  agent RSS: {} KiB idle, {} KiB with {} VMs ({:.1} KiB per VM)\n  agent CPU while VMs idle: {:.3} ms per VM per second\n  VMM RSS (median): {} KiB\n",
        r.starts_per_second,
        r.agent_rss_idle_kb,
        r.agent_rss_loaded_kb,
        r.vms,
        r.agent_rss_per_vm_kb,
        r.agent_cpu_ms_per_vm_per_s,
        r.vmm_rss_median_kb
    ));
    s.push_str(&format_targets(&r.targets));
    s
}
