//! `quantix-agent`: the node agent.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use quantix_agent::access::{Door, PeerStream};
use quantix_agent::config::{Config, ConsoleMode};
use quantix_agent::grpc::Api;
use quantix_agent::listen;
use quantix_agent::manager::Manager;
use quantix_agent::metrics::{self, ApiMetrics};
use quantix_agent::services;
use tokio::net::TcpListener;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_stream::StreamExt;
use tracing::{debug, error, info, warn};
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
    /// gRPC on TCP, HOST:PORT, with mutual TLS (--tls-cert, --tls-key, --tls-client-ca);
    /// none by default ("" disables; port 0 picks one, written to <state-dir>/tcp.addr).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// The agent's TLS certificate chain (PEM) for --listen.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<String>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<String>,
    /// The CA (PEM) whose certificates clients must present.
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<String>,
    /// Plain TCP on --listen, only on a loopback address; every caller is then an admin.
    #[arg(long)]
    insecure_tcp: bool,
    /// gRPC on a Unix socket (default <state-dir>/agent.sock).
    #[arg(long, value_name = "PATH")]
    socket: Option<String>,
    /// The Unix socket's group (name or number; default: quantix when it exists, else root).
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// A group whose members are admins (repeatable; default: quantix-admin if it exists).
    #[arg(long = "admin-group", value_name = "GROUP")]
    admin_groups: Vec<String>,
    /// A group whose members are viewers (repeatable; default: the socket's group).
    #[arg(long = "viewer-group", value_name = "GROUP")]
    viewer_groups: Vec<String>,
    /// A directory that kernels, initramfs and disk images may come from (repeatable;
    /// default <state-dir>/images).
    #[arg(long = "image-dir", value_name = "DIR")]
    image_dirs: Vec<PathBuf>,
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
    /// Whether VMs need their cgroups: required (default) or off.
    #[arg(long, value_name = "MODE", value_parser = ["required", "off"])]
    cgroups: Option<String>,
    /// Run VMMs without a jail (own uid, namespaces, pivot_root). For debugging only.
    #[arg(long)]
    no_jail: bool,
    /// The quantix-jailer binary.
    #[arg(long, value_name = "PATH")]
    jailer: Option<String>,
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
    if let Some(v) = &cli.tls_cert {
        c.tls_cert = v.clone();
    }
    if let Some(v) = &cli.tls_key {
        c.tls_key = v.clone();
    }
    if let Some(v) = &cli.tls_client_ca {
        c.tls_client_ca = v.clone();
    }
    if cli.insecure_tcp {
        c.insecure_tcp = true;
    }
    if let Some(v) = &cli.socket_group {
        c.socket_group = Some(v.clone());
    }
    if !cli.admin_groups.is_empty() {
        c.admin_groups = Some(cli.admin_groups.clone());
    }
    if !cli.image_dirs.is_empty() {
        c.image_dirs = cli.image_dirs.clone();
    }
    if !cli.viewer_groups.is_empty() {
        c.viewer_groups = Some(cli.viewer_groups.clone());
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
    if let Some(v) = &cli.cgroups {
        c.cgroups = if v == "off" {
            quantix_agent::config::CgroupMode::Off
        } else {
            quantix_agent::config::CgroupMode::Required
        };
    }
    if cli.no_jail {
        c.jail = false;
    }
    if let Some(v) = &cli.jailer {
        c.jailer_binary = v.clone();
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
    // Everything the agent creates is private unless it says otherwise (the socket is
    // opened to its group explicitly); VMMs inherit this.
    // SAFETY: umask cannot fail; no other thread exists yet.
    unsafe { libc::umask(0o077) };
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
    const GROUP_FILE: &str = "/etc/group";
    // SAFETY: geteuid cannot fail.
    if cfg.jail && unsafe { libc::geteuid() } != 0 {
        return Err(
            "every VMM runs in a jail (its own uid, namespaces and root), which needs \
                    root: run the agent as root, or set jail = false (--no-jail) to run VMMs \
                    unjailed as the agent's user"
                .into(),
        );
    }
    listen::prepare_state_dir(&cfg.state_dir).map_err(|e| e.to_string())?;
    let group_file = std::path::Path::new(GROUP_FILE);
    let policy = cfg.policy(group_file).map_err(|e| e.to_string())?;
    let socket_gid = cfg.socket_gid(group_file).map_err(|e| e.to_string())?;
    let tls = if !cfg.listen.is_empty() && !cfg.insecure_tcp {
        Some(
            listen::server_tls(
                cfg.tls_cert.as_ref(),
                cfg.tls_key.as_ref(),
                cfg.tls_client_ca.as_ref(),
            )
            .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let host = quantix_agent::node::host_resources();
    let manager = Manager::open(cfg.clone(), host).map_err(|e| e.to_string())?;
    manager
        .recover()
        .await
        .map_err(|e| format!("recovery: {e}"))?;
    let api_metrics = Arc::new(ApiMetrics::default());
    tokio::spawn(manager.clone().rotate_logs_forever());
    tokio::spawn(manager.clone().retry_pending_forever());
    info!(
        admin_uids = ?policy.admin_uids,
        admin_gids = ?policy.admin_gids,
        viewer_gids = ?policy.viewer_gids,
        "roles"
    );
    let api = Api::new(manager.clone(), api_metrics.clone(), policy);
    let health = services::Health::new().await;
    // The VMs are recovered: the agent takes calls from its first connection on (a probe
    // that saw NOT_SERVING between listening and this point would be wrong).
    health.serving().await;

    let sock = cfg.socket_path();
    let unix = listen::bind_unix(&sock, socket_gid).map_err(|e| e.to_string())?;
    info!(
        socket = %sock.display(),
        group = socket_gid.map(|g| g.to_string()).unwrap_or_else(|| "0 (root only)".into()),
        "gRPC listening on a Unix socket (mode 0660)"
    );
    let mut tasks = tokio::task::JoinSet::new();
    let incoming = UnixListenerStream::new(unix).map(|conn| {
        conn.and_then(|s| {
            let p = PeerStream::new(s)?;
            debug!(peer = %p.peer(), "connection on the Unix socket");
            Ok(p)
        })
    });
    let routes = services::routes(api.clone(), &health).map_err(|e| e.to_string())?;
    tasks.spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming),
    );
    if !cfg.listen.is_empty() {
        let tcp = TcpListener::bind(&cfg.listen)
            .await
            .map_err(|e| format!("cannot listen for gRPC on {}: {e}", cfg.listen))?;
        let addr = tcp.local_addr().map_err(|e| e.to_string())?;
        let _ = std::fs::write(cfg.state_dir.join("tcp.addr"), addr.to_string());
        let mut server = tonic::transport::Server::builder();
        let door = match tls {
            Some(tls) => {
                server = server
                    .tls_config(tls)
                    .map_err(|e| format!("tls_cert/tls_key/tls_client_ca: {e}"))?;
                info!(%addr, "gRPC listening on TCP with mutual TLS");
                Door::Tls
            }
            None => {
                warn!(
                    %addr,
                    "gRPC listening on plain TCP (--insecure-tcp): every local user can act as an admin"
                );
                Door::InsecureTcp
            }
        };
        let routes = services::routes(api.door(door), &health).map_err(|e| e.to_string())?;
        tasks.spawn(
            server
                .add_routes(routes)
                .serve_with_incoming(TcpListenerStream::new(tcp)),
        );
    }
    if !cfg.metrics_listen.is_empty() {
        match TcpListener::bind(&cfg.metrics_listen).await {
            Ok(l) => {
                if let Ok(a) = l.local_addr() {
                    let _ = std::fs::write(cfg.state_dir.join("metrics.addr"), a.to_string());
                }
                let exporter = metrics::Exporter::new(
                    manager.clone(),
                    (*api_metrics).clone(),
                    quantix_agent::process::vmm_version(manager.vmm_binary()),
                );
                tokio::spawn(metrics::serve(l, Arc::new(exporter)));
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
    health.not_serving().await;
    Ok(())
}
