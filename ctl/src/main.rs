//! `quantixctl`: the command-line client of the node agent.

mod output;
mod spec;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quantix_proto::v1::node_service_client::NodeServiceClient;
use quantix_proto::v1::vm_service_client::VmServiceClient;
use quantix_proto::v1::{
    console_input, ConsoleAttach, ConsoleDevice, ConsoleInput, CreateVmRequest,
    DeleteSnapshotRequest, DeleteVmRequest, GetNodeRequest, GetSnapshotRequest, GetVmRequest,
    ListSnapshotsRequest, ListVmsRequest, PauseVmRequest, RebootVmRequest, RestoreVmRequest,
    ResumeVmRequest, SnapshotVmRequest, StartVmRequest, StopVmRequest, WatchVmsRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// Exit statuses scripts can rely on.
mod status {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const NOT_FOUND: u8 = 3;
    pub const ALREADY_EXISTS: u8 = 4;
    pub const FAILED_PRECONDITION: u8 = 5;
    pub const INVALID_ARGUMENT: u8 = 6;
    pub const RESOURCE_EXHAUSTED: u8 = 7;
    pub const UNAVAILABLE: u8 = 8;
    pub const TIMEOUT: u8 = 9;
    pub const PERMISSION_DENIED: u8 = 10;
}

/// What `--help` and the man page say of the exit statuses.
const EXIT_STATUSES: &str = "\
Exit status:
  0   success
  1   other error
  2   usage error
  3   not found
  4   already exists
  5   failed precondition (the VM is in the wrong state)
  6   invalid argument
  7   resource exhausted (the node lacks vCPUs or memory)
  8   agent unavailable (no socket, connection refused, TLS failure)
  9   `console --until` text not seen in time
  10  permission denied (the caller's role, a path outside the agent's image
      directories, or the socket's mode)";

/// Command-line client of the Quantix node agent.
#[derive(Debug, Parser)]
#[command(name = "quantixctl", version, about, long_about = None, after_help = EXIT_STATUSES)]
struct Cli {
    /// The agent: unix:PATH, https://HOST:PORT (mutual TLS) or http://HOST:PORT (an agent
    /// run with --insecure-tcp). Default: $QUANTIX_AGENT, else
    /// unix:/var/lib/quantix-agent/agent.sock.
    #[arg(long, global = true, value_name = "ADDR")]
    agent: Option<String>,
    /// CA certificate (PEM) that signed the agent's certificate [env: QUANTIX_TLS_CA].
    #[arg(long, global = true, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This client's certificate (PEM) [env: QUANTIX_TLS_CERT].
    #[arg(long, global = true, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// This client's private key (PEM) [env: QUANTIX_TLS_KEY].
    #[arg(long, global = true, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// The name the agent's certificate must carry, when it is not the host of --agent
    /// [env: QUANTIX_TLS_SERVER_NAME].
    #[arg(long, global = true, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Output format: table, wide (more columns), json or yaml (the API's objects in the
    /// canonical proto3 JSON mapping; `get -o yaml` is a valid `create -f` file), name (ids).
    #[arg(long, short, global = true, value_enum, default_value_t = output::Format::Table)]
    output: output::Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create a VM from flags and/or a YAML or JSON spec file (flags win).
    Create(Box<spec::CreateArgs>),
    /// List VMs.
    List {
        /// Only VMs with this label (KEY=VALUE; repeatable).
        #[arg(long = "selector", short = 'l', value_name = "KEY=VALUE")]
        selector: Vec<String>,
        /// VMs per request page.
        #[arg(long, default_value_t = 100)]
        page_size: u32,
    },
    /// Show one VM.
    Get { id: String },
    /// Start a VM.
    Start { id: String },
    /// Stop a VM: press its power button, then stop its VMM if the guest has not powered off.
    Stop {
        id: String,
        /// Seconds the guest has to power off after the power button is pressed.
        #[arg(long, default_value_t = 10)]
        timeout: u32,
        /// Kill at once.
        #[arg(long)]
        force: bool,
    },
    /// Reboot a VM.
    Reboot { id: String },
    /// Pause a VM.
    Pause { id: String },
    /// Resume a paused VM.
    Resume { id: String },
    /// Delete a VM.
    Delete {
        id: String,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// Attach to a VM's serial console (Ctrl-] detaches on a terminal).
    Console {
        id: String,
        /// Which console: the serial port (ttyS0), or the virtio console (hvc0) of a VM
        /// created with --virtio-console.
        #[arg(long, value_enum, default_value_t = ConsoleChoice::Serial)]
        device: ConsoleChoice,
        /// Do not print the recent output first.
        #[arg(long)]
        no_replay: bool,
        /// Exit (0) at the end of the first output line that contains this text (9 if the
        /// console ends or --timeout passes first); for scripts.
        #[arg(long, value_name = "TEXT")]
        until: Option<String>,
        /// Give up after this many seconds (status 9 with --until).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
        /// Type this line into the console once attached (a newline is added); with
        /// --until, for scripts that drive a guest's shell.
        #[arg(long, value_name = "TEXT")]
        send: Option<String>,
    },
    /// Stream VM events (all VMs, or one).
    Events {
        id: Option<String>,
        /// First print each VM's current state.
        #[arg(long)]
        initial: bool,
        /// Stop after this many events.
        #[arg(long, value_name = "N")]
        count: Option<usize>,
    },
    /// Save VMs as snapshots; list and delete them.
    Snapshot {
        #[command(subcommand)]
        cmd: SnapshotCmd,
    },
    /// Create a VM from a snapshot: it goes on from where the snapshot was taken.
    Restore {
        /// The snapshot.
        snapshot: String,
        /// The new VM's id.
        #[arg(long)]
        id: String,
        /// The new VM's name (default: the snapshot's VM's, which another VM must not
        /// have).
        #[arg(long)]
        name: Option<String>,
        /// Its cards' TAPs, in order (default: the snapshot's VM's; a copy beside the
        /// original needs its own), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "TAP,...")]
        taps: Vec<String>,
        /// Its cards' MACs, in order (default: the snapshot's VM's). The card shows the
        /// new MAC at once; the running guest takes it when it probes the card again (a
        /// driver rebind, or a guest agent).
        #[arg(long, value_delimiter = ',', value_name = "MAC,...")]
        macs: Vec<String>,
        /// Its disks' images, in order (default: the snapshot's VM's; a copy beside the
        /// original needs its own copies of the read-write ones), comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "PATH,...")]
        disks: Vec<String>,
        /// Its vsock CID (default: the snapshot's VM's).
        #[arg(long, value_name = "CID")]
        cid: Option<u32>,
        /// Start it now.
        #[arg(long)]
        start: bool,
        /// Run the guest before its memory is loaded (pages read on first touch).
        #[arg(long)]
        lazy: bool,
    },
    /// Show the node's capabilities, capacity and commitments.
    Node,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `quantixctl man | man -l -`.
    Man,
}

#[derive(Debug, Subcommand)]
enum SnapshotCmd {
    /// Save a running or paused VM's state and memory as snapshot NAME.
    Create {
        /// The VM.
        vm: String,
        /// The snapshot's id.
        name: String,
        /// Only the pages written since this VMM's previous snapshot.
        #[arg(long)]
        diff: bool,
        /// What the VM does afterwards.
        #[arg(long, value_enum, default_value_t = After::Keep)]
        after: After,
    },
    /// List snapshots (of one VM, or all).
    List {
        /// Only this VM's.
        vm: Option<String>,
    },
    /// Show one snapshot.
    Get {
        /// The snapshot.
        name: String,
    },
    /// Delete a snapshot (no diff may stand on it).
    Delete {
        /// The snapshot.
        name: String,
    },
}

/// What a VM does after its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum After {
    /// What it did before.
    Keep,
    /// Run.
    Resume,
    /// Stay paused.
    Pause,
    /// Stop (restore the snapshot to go on).
    Stop,
}

impl From<After> for quantix_proto::v1::SnapshotAfter {
    fn from(a: After) -> Self {
        match a {
            After::Keep => Self::Keep,
            After::Resume => Self::Resume,
            After::Pause => Self::Pause,
            After::Stop => Self::Stop,
        }
    }
}

/// While `fut` runs, shows on a terminal's stderr what it waits for and for how long.
async fn with_progress<F: std::future::Future>(what: String, fut: F) -> F::Output {
    if !std::io::stderr().is_terminal() {
        return fut.await;
    }
    let started = std::time::Instant::now();
    tokio::pin!(fut);
    let out = loop {
        eprint!("\r{what}: {:.0} s", started.elapsed().as_secs_f64());
        let _ = std::io::stderr().flush();
        tokio::select! {
            out = &mut fut => break out,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    eprintln!("\r{what}: done in {:.1} s", started.elapsed().as_secs_f64());
    out
}

/// Awaits `fut` (a SnapshotVm call) showing on the terminal how much of snapshot `name`
/// is written, from the agent's SNAPSHOT_PROGRESS events.
async fn snapshot_progress<F, S>(what: String, name: &str, mut events: S, fut: F) -> F::Output
where
    F: std::future::Future,
    S: tokio_stream::Stream<Item = Result<quantix_proto::v1::VmEvent, tonic::Status>> + Unpin,
{
    use quantix_proto::v1::EventKind;
    let started = std::time::Instant::now();
    tokio::pin!(fut);
    let mut written = String::new();
    let mut events_open = true;
    let out = loop {
        eprint!(
            "\r{what}: {:.0} s{written}\x1b[K",
            started.elapsed().as_secs_f64()
        );
        let _ = std::io::stderr().flush();
        tokio::select! {
            out = &mut fut => break out,
            ev = events.next(), if events_open => match ev {
                Some(Ok(ev)) if ev.kind == EventKind::SnapshotProgress as i32 && ev.snapshot_id == name => {
                    if let Some(p) = ev.progress {
                        written = progress_text(&p);
                    }
                }
                Some(_) => {}
                None => events_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    eprintln!(
        "\r{what}: done in {:.1} s\x1b[K",
        started.elapsed().as_secs_f64()
    );
    out
}

/// `, 120 of at most 256 MiB written (47 %)`.
fn progress_text(p: &quantix_proto::v1::SnapshotProgress) -> String {
    let percent = (p.written_bytes as f64 * 100.0 / p.memory_bytes.max(1) as f64).min(100.0);
    format!(
        ", {} of at most {} MiB written ({percent:.0} %)",
        p.written_bytes >> 20,
        p.memory_bytes >> 20
    )
}

/// Gives each of `items` (the snapshot VM's cards or disks) its value from `flag`, in
/// order; none given changes nothing, another count than the items' is a usage error.
fn replace_each<T>(
    flag: &str,
    given: Vec<String>,
    items: &mut [T],
    what: &str,
    set: impl Fn(&mut T, String),
) -> Result<(), Failure> {
    if given.is_empty() {
        return Ok(());
    }
    if given.len() != items.len() {
        return Err(fail(
            status::USAGE,
            format!(
                "{flag}: {} given, the snapshot's VM has {} {what}",
                given.len(),
                items.len()
            ),
        ));
    }
    for (item, value) in items.iter_mut().zip(given) {
        set(item, value);
    }
    Ok(())
}

/// A failure with its exit status.
struct Failure {
    status: u8,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        use tonic::Code;
        let status = match s.code() {
            Code::NotFound => status::NOT_FOUND,
            Code::AlreadyExists => status::ALREADY_EXISTS,
            Code::FailedPrecondition => status::FAILED_PRECONDITION,
            Code::InvalidArgument => status::INVALID_ARGUMENT,
            Code::ResourceExhausted => status::RESOURCE_EXHAUSTED,
            Code::Unavailable => status::UNAVAILABLE,
            Code::PermissionDenied | Code::Unauthenticated => status::PERMISSION_DENIED,
            _ => status::ERROR,
        };
        Failure {
            status,
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

fn fail(status: u8, message: impl Into<String>) -> Failure {
    Failure {
        status,
        message: message.into(),
    }
}

/// The TLS files of a client, from flags or the environment.
#[derive(Debug, Default)]
struct TlsFiles {
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    server_name: Option<String>,
}

impl TlsFiles {
    fn from_cli(cli: &Cli) -> Self {
        let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        Self {
            ca: cli
                .tls_ca
                .clone()
                .or_else(|| env("QUANTIX_TLS_CA").map(PathBuf::from)),
            cert: cli
                .tls_cert
                .clone()
                .or_else(|| env("QUANTIX_TLS_CERT").map(PathBuf::from)),
            key: cli
                .tls_key
                .clone()
                .or_else(|| env("QUANTIX_TLS_KEY").map(PathBuf::from)),
            server_name: cli.tls_server_name.clone().or_else(|| {
                env("QUANTIX_TLS_SERVER_NAME").map(|v| v.to_string_lossy().into_owned())
            }),
        }
    }

    fn config(&self) -> Result<tonic::transport::ClientTlsConfig, Failure> {
        let read = |flag: &str, p: &PathBuf| {
            std::fs::read(p)
                .map_err(|e| fail(status::USAGE, format!("--{flag} {}: {e}", p.display())))
        };
        let mut tls = tonic::transport::ClientTlsConfig::new();
        match &self.ca {
            Some(ca) => {
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(
                    "tls-ca", ca,
                )?))
            }
            None => {
                return Err(fail(
                    status::USAGE,
                    "an https:// agent needs --tls-ca (or QUANTIX_TLS_CA): the CA that signed its certificate",
                ))
            }
        }
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    read("tls-cert", c)?,
                    read("tls-key", k)?,
                ))
            }
            (None, None) => {
                return Err(fail(
                    status::USAGE,
                    "an https:// agent needs a client certificate: --tls-cert and --tls-key \
                     (or QUANTIX_TLS_CERT and QUANTIX_TLS_KEY)",
                ))
            }
            _ => return Err(fail(status::USAGE, "--tls-cert and --tls-key go together")),
        }
        if let Some(n) = &self.server_name {
            tls = tls.domain_name(n.clone());
        }
        Ok(tls)
    }
}

/// An error and every cause under it, on one line: tonic's transport errors say little at
/// the top ("transport error") and the reason (a certificate problem) at the bottom.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// The kind of the first I/O error among `e`'s causes.
fn io_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = c.source();
    }
    None
}

async fn connect(addr: &str, tls: &TlsFiles) -> Result<Channel, Failure> {
    if let Some(path) = addr.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        let display = path.display().to_string();
        // The URI is not used for a Unix socket; the connector ignores it.
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
            .map_err(|e| {
                let kind = io_kind(&e);
                if kind == Some(std::io::ErrorKind::PermissionDenied) {
                    fail(
                        status::PERMISSION_DENIED,
                        format!(
                            "cannot reach the agent at unix:{display}: permission denied \
                             (the socket is open to its group only: ask for membership, or \
                             run as root)"
                        ),
                    )
                } else {
                    let why = match kind {
                        Some(std::io::ErrorKind::NotFound) => {
                            "no such socket (is quantix-agent running, with this state \
                             directory? --agent or $QUANTIX_AGENT choose another)"
                                .to_string()
                        }
                        Some(std::io::ErrorKind::ConnectionRefused) => {
                            "connection refused (the socket file is there but no agent \
                             listens: it is not running, or is restarting)"
                                .to_string()
                        }
                        _ => chain(&e),
                    };
                    fail(
                        status::UNAVAILABLE,
                        format!("cannot reach the agent at unix:{display}: {why}"),
                    )
                }
            })
    } else {
        let mut ep = Endpoint::from_shared(addr.to_string())
            .map_err(|e| fail(status::USAGE, format!("--agent {addr:?}: {e}")))?;
        if addr.starts_with("https://") {
            ep = ep
                .tls_config(tls.config()?)
                .map_err(|e| fail(status::USAGE, format!("TLS: {}", chain(&e))))?;
        } else if tls.cert.is_some() || tls.ca.is_some() {
            return Err(fail(
                status::USAGE,
                format!("--agent {addr}: TLS files were given; use an https:// address"),
            ));
        }
        ep.connect().await.map_err(|e| {
            fail(
                status::UNAVAILABLE,
                format!("cannot reach the agent at {addr}: {}", chain(&e)),
            )
        })
    }
}

fn main() -> ExitCode {
    // Output into a closed pipe (`quantixctl ... | grep -q`, `| head`) ends the process
    // quietly, as for any Unix tool, instead of a panic from println!.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                status::USAGE
            } else {
                status::OK
            });
        }
    };
    // Offline commands: nothing to connect to.
    match &cli.cmd {
        Cmd::Completion { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(*shell, &mut cmd, "quantixctl", &mut std::io::stdout());
            return ExitCode::from(status::OK);
        }
        Cmd::Man => {
            use clap::CommandFactory;
            let man = clap_mangen::Man::new(Cli::command());
            return match man.render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::from(status::OK),
                Err(e) => {
                    eprintln!("quantixctl: {e}");
                    ExitCode::from(status::ERROR)
                }
            };
        }
        _ => {}
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("quantixctl: {e}");
            return ExitCode::from(status::ERROR);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::from(status::OK),
        Err(f) => {
            eprintln!("quantixctl: {}", f.message);
            ExitCode::from(f.status)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let addr = cli
        .agent
        .clone()
        .or_else(|| std::env::var("QUANTIX_AGENT").ok())
        .unwrap_or_else(|| "unix:/var/lib/quantix-agent/agent.sock".into());
    let channel = connect(&addr, &TlsFiles::from_cli(&cli)).await?;
    let mut vms = VmServiceClient::new(channel.clone());
    let format = cli.output;
    match cli.cmd {
        Cmd::Create(args) => {
            let (id, spec, start) = (*args).build().map_err(|e| fail(status::USAGE, e))?;
            let vm = vms
                .create_vm(CreateVmRequest {
                    vm_id: id,
                    spec: Some(spec),
                    start,
                })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::List {
            selector,
            page_size,
        } => {
            let mut label_selector = std::collections::HashMap::new();
            for s in selector {
                let (k, v) = s.split_once('=').ok_or_else(|| {
                    fail(
                        status::USAGE,
                        format!("--selector {s:?}: expected KEY=VALUE"),
                    )
                })?;
                label_selector.insert(k.to_string(), v.to_string());
            }
            let mut all = Vec::new();
            let mut token = String::new();
            loop {
                let page = vms
                    .list_vms(ListVmsRequest {
                        label_selector: label_selector.clone(),
                        page_size,
                        page_token: token,
                    })
                    .await?
                    .into_inner();
                all.extend(page.vms);
                if page.next_page_token.is_empty() {
                    break;
                }
                token = page.next_page_token;
            }
            output::vms(&all, format, false);
        }
        Cmd::Get { id } => {
            let vm = vms.get_vm(GetVmRequest { vm_id: id }).await?.into_inner();
            output::vm_detail(&vm, format);
        }
        Cmd::Start { id } => {
            let vm = vms
                .start_vm(StartVmRequest { vm_id: id })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::Stop { id, timeout, force } => {
            let vm = vms
                .stop_vm(StopVmRequest {
                    vm_id: id,
                    timeout_ms: timeout.saturating_mul(1000),
                    force,
                })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::Reboot { id } => {
            let vm = vms
                .reboot_vm(RebootVmRequest { vm_id: id })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::Pause { id } => {
            let vm = vms
                .pause_vm(PauseVmRequest { vm_id: id })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::Resume { id } => {
            let vm = vms
                .resume_vm(ResumeVmRequest { vm_id: id })
                .await?
                .into_inner();
            output::vms(&[vm], format, false);
        }
        Cmd::Delete { id, force } => {
            vms.delete_vm(DeleteVmRequest {
                vm_id: id.clone(),
                force,
            })
            .await?;
            match format {
                output::Format::Json | output::Format::Yaml => {
                    output::document(&serde_json::json!({ "deleted": id }), format)
                }
                output::Format::Name => println!("{id}"),
                _ => println!("deleted {id}"),
            }
        }
        Cmd::Console {
            id,
            device,
            no_replay,
            until,
            timeout,
            send,
        } => {
            let to = ConsoleTarget {
                id,
                device: device.into(),
                replay: !no_replay,
            };
            console(&mut vms, to, until, timeout, send).await?
        }
        Cmd::Events { id, initial, count } => {
            let mut stream = vms
                .watch_vms(WatchVmsRequest {
                    vm_id: id.unwrap_or_default(),
                    initial_state: initial,
                })
                .await?
                .into_inner();
            let mut seen = 0;
            while let Some(ev) = stream.next().await {
                output::event(&ev?, format);
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
        }
        Cmd::Completion { .. } | Cmd::Man => {}
        Cmd::Snapshot { cmd } => match cmd {
            SnapshotCmd::Create {
                vm,
                name,
                diff,
                after,
            } => {
                let what = format!(
                    "{} snapshot {name} of VM {vm}",
                    if diff { "diff" } else { "full" }
                );
                // The agent reports the writing on the Watch stream: opened first, so no
                // progress event is missed (without it, the elapsed time only).
                let progress = if std::io::stderr().is_terminal() {
                    vms.watch_vms(WatchVmsRequest {
                        vm_id: vm.clone(),
                        initial_state: false,
                    })
                    .await
                    .ok()
                    .map(|r| r.into_inner())
                } else {
                    None
                };
                let request = SnapshotVmRequest {
                    vm_id: vm,
                    snapshot_id: name.clone(),
                    diff,
                    after: quantix_proto::v1::SnapshotAfter::from(after) as i32,
                };
                let call = vms.clone();
                let s = match progress {
                    Some(events) => {
                        snapshot_progress(what, &name, events, async move {
                            call.clone().snapshot_vm(request).await
                        })
                        .await
                    }
                    None => with_progress(what, call.clone().snapshot_vm(request)).await,
                }?
                .into_inner();
                output::snapshot_detail(&s, format);
            }
            SnapshotCmd::List { vm } => {
                let list = vms
                    .list_snapshots(ListSnapshotsRequest {
                        vm_id: vm.unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                output::snapshots(&list.snapshots, format, false);
            }
            SnapshotCmd::Get { name } => {
                let s = vms
                    .get_snapshot(GetSnapshotRequest { snapshot_id: name })
                    .await?
                    .into_inner();
                output::snapshot_detail(&s, format);
            }
            SnapshotCmd::Delete { name } => {
                vms.delete_snapshot(DeleteSnapshotRequest {
                    snapshot_id: name.clone(),
                })
                .await?;
                if format == output::Format::Name {
                    println!("{name}");
                } else {
                    println!("snapshot {name} deleted");
                }
            }
        },
        Cmd::Restore {
            snapshot,
            id,
            name,
            taps,
            macs,
            disks,
            cid,
            start,
            lazy,
        } => {
            // The snapshot's spec, with what is asked changed; the agent checks the rest.
            let saved = vms
                .get_snapshot(GetSnapshotRequest {
                    snapshot_id: snapshot.clone(),
                })
                .await?
                .into_inner();
            let mut spec = saved.spec.unwrap_or_default();
            if let Some(n) = name {
                spec.name = n;
            }
            replace_each("--taps", taps, &mut spec.nics, "cards", |n, t| n.tap = t)?;
            replace_each("--macs", macs, &mut spec.nics, "cards", |n, m| n.mac = m)?;
            replace_each("--disks", disks, &mut spec.disks, "disks", |d, p| {
                d.path = p
            })?;
            if let Some(c) = cid {
                match spec.vsock.as_mut() {
                    Some(v) => v.guest_cid = c,
                    None => {
                        return Err(fail(
                            status::USAGE,
                            "--cid: the snapshot's VM has no vsock device",
                        ))
                    }
                }
            }
            let request = RestoreVmRequest {
                snapshot_id: snapshot.clone(),
                vm_id: id.clone(),
                spec: Some(spec),
                start,
                lazy,
            };
            let vm = if start {
                with_progress(
                    format!("restoring VM {id} from snapshot {snapshot}"),
                    vms.restore_vm(request),
                )
                .await?
            } else {
                vms.restore_vm(request).await?
            }
            .into_inner();
            output::vms(&[vm], format, true);
        }
        Cmd::Node => {
            let node = NodeServiceClient::new(channel)
                .get_node(GetNodeRequest {})
                .await?
                .into_inner();
            output::node(&node, format);
        }
    }
    Ok(())
}

/// Puts a terminal in raw mode and restores it on drop.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn enter() -> Self {
        if !std::io::stdin().is_terminal() {
            return Self(None);
        }
        // SAFETY: tcgetattr fills a termios we own; a zeroed termios is a valid value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 is stdin and `t` is a valid termios to fill.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return Self(None);
        }
        let saved = t;
        // SAFETY: cfmakeraw edits the termios we own.
        unsafe { libc::cfmakeraw(&mut t) };
        // SAFETY: applies a termios we own to stdin.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(t) = self.0 {
            // SAFETY: restores the termios saved by `enter` on stdin.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// `quantixctl console --device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ConsoleChoice {
    /// The serial port (the guest's ttyS0).
    Serial,
    /// The virtio console (the guest's hvc0).
    Virtio,
}

impl From<ConsoleChoice> for ConsoleDevice {
    fn from(c: ConsoleChoice) -> Self {
        match c {
            ConsoleChoice::Serial => ConsoleDevice::Serial,
            ConsoleChoice::Virtio => ConsoleDevice::Virtio,
        }
    }
}

/// Which console `quantixctl console` attaches to.
struct ConsoleTarget {
    id: String,
    device: ConsoleDevice,
    /// Print the recent output first.
    replay: bool,
}

async fn console(
    vms: &mut VmServiceClient<Channel>,
    to: ConsoleTarget,
    until: Option<String>,
    timeout: Option<u64>,
    send: Option<String>,
) -> Result<(), Failure> {
    let ConsoleTarget { id, device, replay } = to;
    let (tx, rx) = tokio::sync::mpsc::channel::<ConsoleInput>(64);
    let _ = tx
        .send(ConsoleInput {
            input: Some(console_input::Input::Attach(ConsoleAttach {
                vm_id: id,
                replay,
                device: device as i32,
            })),
        })
        .await;
    let mut output = vms
        .attach_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    if let Some(line) = &send {
        // Attached: what the guest prints in answer comes after this.
        let data = format!("{line}\n").into_bytes();
        if tx
            .send(ConsoleInput {
                input: Some(console_input::Input::Data(data)),
            })
            .await
            .is_err()
        {
            return Err(fail(status::ERROR, "the console closed before --send"));
        }
    }
    let interactive = std::io::stdin().is_terminal() && until.is_none() && send.is_none();
    let _raw = if interactive {
        eprintln!("[attached; Ctrl-] detaches]\r");
        Some(RawTerminal::enter())
    } else {
        None
    };
    let (detach_tx, mut detach_rx) = tokio::sync::oneshot::channel::<()>();
    if until.is_none() {
        // Forward stdin; Ctrl-] (0x1d) detaches.
        std::thread::spawn(move || {
            use std::io::Read;
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 1024];
            loop {
                match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let data = &buf[..n];
                        if let Some(p) = data.iter().position(|b| *b == 0x1d) {
                            if p > 0 {
                                let _ = tx.blocking_send(ConsoleInput {
                                    input: Some(console_input::Input::Data(data[..p].to_vec())),
                                });
                            }
                            let _ = detach_tx.send(());
                            return;
                        }
                        if tx
                            .blocking_send(ConsoleInput {
                                input: Some(console_input::Input::Data(data.to_vec())),
                            })
                            .is_err()
                        {
                            break;
                        }
                    }
                }
            }
            // Keep the request stream open after stdin ends, so output still flows.
            std::mem::forget(tx);
        });
    }
    let deadline = timeout.map(|s| tokio::time::Instant::now() + Duration::from_secs(s));
    let mut seen: Vec<u8> = Vec::new();
    let mut stdout = std::io::stdout();
    // Whether the detach channel can still fire: once it resolved (a detach, or the stdin
    // thread ended without one) it must not be polled again.
    let mut detach_open = true;
    loop {
        let next = async {
            match deadline {
                Some(d) => tokio::time::timeout_at(d, output.next()).await.ok(),
                None => Some(output.next().await),
            }
        };
        tokio::select! {
            // Ctrl-]; the sender dropped at the end of stdin is not a detach.
            r = &mut detach_rx, if detach_open => match r {
                Ok(()) => return Ok(()),
                Err(_) => detach_open = false,
            },
            item = next => match item {
                None => {
                    return match until {
                        Some(t) => Err(fail(status::TIMEOUT, format!("{t:?} not seen on the console in time"))),
                        None => Ok(()),
                    };
                }
                Some(None) => {
                    return match until {
                        Some(t) => Err(fail(status::TIMEOUT, format!("the console ended before {t:?} was seen"))),
                        None => Ok(()),
                    };
                }
                Some(Some(msg)) => {
                    let data = msg?.data;
                    let _ = stdout.write_all(&data);
                    let _ = stdout.flush();
                    if let Some(t) = &until {
                        seen.extend_from_slice(&data);
                        let t = t.as_bytes();
                        match seen.windows(t.len().max(1)).position(|w| w == t) {
                            // Done at the end of the line that holds the text.
                            Some(p) if seen[p + t.len()..].contains(&b'\n') => return Ok(()),
                            Some(p) => {
                                seen.drain(..p);
                            }
                            None => {
                                let keep = seen.len().saturating_sub(t.len());
                                seen.drain(..keep);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reads_as_a_share_of_the_memory() {
        let p = |written_bytes, memory_bytes| quantix_proto::v1::SnapshotProgress {
            written_bytes,
            memory_bytes,
            elapsed_ms: 1000,
        };
        assert_eq!(
            progress_text(&p(120 << 20, 256 << 20)),
            ", 120 of at most 256 MiB written (47 %)"
        );
        // Never past 100 %, nor a division by zero.
        assert!(progress_text(&p(300 << 20, 256 << 20)).ends_with("(100 %)"));
        assert!(progress_text(&p(0, 0)).ends_with("(0 %)"));
    }
}
