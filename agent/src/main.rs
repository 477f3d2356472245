//! `quantix-agent`: the node agent.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use quantix_agent::config::{Config, ConsoleMode};
use quantix_agent::grpc::Api;
use quantix_agent::manager::Manager;
use quantix_agent::metrics::{self, ApiMetrics};
use quantix_proto::v1::node_service_server::NodeServiceServer;
use quantix_proto::v1::vm_service_server::VmServiceServer;
use tokio::net::{TcpListener, UnixListener};
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// The Quantix node agent: runs VMs in quantix-vmm processes behind a gRPC API.
///
/// Settings come from the embedded defaults, then `--config FILE` (TOML, the keys of
/// docs/agent.md), then these flags. Exit status: 0 on SIGTERM/SIGINT (running VMs keep
/// running), 1 when the agent cannot start, 2 on a usage error.
#[derive(Debug, Parser)]
#[command(name = "quantix-agent", version, about, long_about = None)]
struct Cli {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// State directory (store, VM directories, Unix socket).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// gRPC on TCP, HOST:PORT ("" to disable; port 0 picks one, written to <state-dir>/tcp.addr).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// gRPC on a Unix socket (default <state-dir>/agent.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<String>,
    /// Prometheus metrics, HOST:PORT ("" to disable; port 0 picks one, written to
    /// <state-dir>/metrics.addr).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// The quantix-vmm binary.
    #[arg(long, value_name = "PATH")]
    vmm: Option<String>,
    /// Total vCPUs running VMs may commit.
    #[arg(long, value_name = "N")]
    max_vcpus: Option<u32>,
    /// Total guest memory (MiB) running VMs may commit.
    #[arg(long, value_name = "MIB")]
    max_memory_mib: Option<u64>,
    /// Name of the agent's parent cgroup.
    #[arg(long, value_name = "NAME")]
    cgroup_name: Option<String>,
    /// How consoles are read: auto, socket or file.
    #[arg(long, value_name = "MODE", value_parser = ["auto", "socket", "file"])]
    console: Option<String>,
    /// Log filter (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn config(cli: &Cli) -> Result<Config, String> {
    let mut c = match &cli.config {
        Some(p) => Config::from_file(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    if let Some(v) = &cli.state_dir {
        c.state_dir = v.clone();
    }
    if let Some(v) = &cli.listen {
        c.listen = v.clone();
    }
    if let Some(v) = &cli.socket {
        c.socket = v.clone();
    }
    if let Some(v) = &cli.metrics_listen {
        c.metrics_listen = v.clone();
    }
    if let Some(v) = &cli.vmm {
        c.vmm_binary = v.clone();
    }
    if let Some(v) = cli.max_vcpus {
        c.max_vcpus = v;
    }
    if let Some(v) = cli.max_memory_mib {
        c.max_memory_mib = v;
    }
    if let Some(v) = &cli.cgroup_name {
        c.cgroup_name = v.clone();
    }
    if let Some(v) = &cli.console {
        c.console = match v.as_str() {
            "socket" => ConsoleMode::Socket,
            "file" => ConsoleMode::File,
            _ => ConsoleMode::Auto,
        };
    }
    c.validate().map_err(|e| e.to_string())?;
    Ok(c)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let filter = match EnvFilter::try_new(&cli.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("quantix-agent: invalid --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        b.json().init();
    } else {
        b.init();
    }
    let cfg = match config(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("quantix-agent: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quantix-agent: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            eprintln!("quantix-agent: {e}");
            ExitCode::from(1)
        }
    }
}

async fn run(cfg: Config) -> Result<(), String> {
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("cannot create {}: {e}", cfg.state_dir.display()))?;
    let host = quantix_agent::node::host_resources();
    let manager = Manager::open(cfg.clone(), host).map_err(|e| e.to_string())?;
    manager
        .recover()
        .await
        .map_err(|e| format!("recovery: {e}"))?;
    let api_metrics = Arc::new(ApiMetrics::default());
    let api = Api::new(manager.clone(), api_metrics.clone());

    let sock = cfg.socket_path();
    let _ = std::fs::remove_file(&sock);
    let unix =
        UnixListener::bind(&sock).map_err(|e| format!("cannot bind {}: {e}", sock.display()))?;
    info!(socket = %sock.display(), "gRPC listening on a Unix socket");
    let mut tasks = tokio::task::JoinSet::new();
    let (vm, node) = (
        VmServiceServer::new(api.clone()),
        NodeServiceServer::new(api.clone()),
    );
    tasks.spawn(
        tonic::transport::Server::builder()
            .add_service(vm.clone())
            .add_service(node.clone())
            .serve_with_incoming(UnixListenerStream::new(unix)),
    );
    // The Unix socket is the one endpoint the agent cannot do without; a TCP address that
    // cannot be bound (no loopback in a minimal host, a port in use) is logged and skipped.
    if !cfg.listen.is_empty() {
        match TcpListener::bind(&cfg.listen).await {
            Ok(tcp) => {
                let addr = tcp.local_addr().map_err(|e| e.to_string())?;
                let _ = std::fs::write(cfg.state_dir.join("tcp.addr"), addr.to_string());
                info!(%addr, "gRPC listening on TCP");
                tasks.spawn(
                    tonic::transport::Server::builder()
                        .add_service(vm)
                        .add_service(node)
                        .serve_with_incoming(TcpListenerStream::new(tcp)),
                );
            }
            Err(e) => {
                error!(addr = %cfg.listen, error = %e, "cannot listen for gRPC on TCP; serving on the Unix socket only")
            }
        }
    }
    if !cfg.metrics_listen.is_empty() {
        match TcpListener::bind(&cfg.metrics_listen).await {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    let _ = std::fs::write(cfg.state_dir.join("metrics.addr"), a.to_string());
                }
                tokio::spawn(metrics::serve(l, manager.clone(), api_metrics));
            }
            Err(e) => error!(addr = %cfg.metrics_listen, error = %e, "cannot serve metrics"),
        }
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting; VMs keep running"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting; VMs keep running"),
        r = tasks.join_next() => {
            return Err(format!("a server ended: {r:?}"));
        }
    }
    Ok(())
}
