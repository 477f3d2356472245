//! `qx-sandbox`: run ad-hoc jobs in the nested KVM host.
//!
//! ```text
//! qx-sandbox --file target/release/quantix-vmm:/payload/quantix-vmm \
//!     --job 'kvm=ls -l /dev/kvm' -- quantix-vmm --help
//! ```
//!
//! `--vmm` builds this workspace's `quantix-vmm` statically and adds it as
//! `/payload/quantix-vmm` (the payload directory is on the jobs' `PATH`).
//!
//! Exit status: 0 all jobs succeeded, 1 a job failed or timed out,
//! 2 infrastructure failure, 3 bad usage or missing assets.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use quantix_sandbox::{Job, Payload, Sandbox, SandboxError};

/// Runs jobs in a nested KVM host (QEMU TCG + Debian cloud kernel + kvm-amd).
#[derive(Debug, Parser)]
#[command(name = "qx-sandbox", version)]
struct Args {
    /// Add a host file: SRC:DEST (DEST absolute inside the nested host).
    #[arg(long = "file", value_name = "SRC:DEST")]
    files: Vec<String>,
    /// Add a host executable with every shared library `ldd` names: SRC:DEST.
    #[arg(long = "binary", value_name = "SRC:DEST")]
    binaries: Vec<String>,
    /// Add a host directory tree: SRC:DEST.
    #[arg(long = "dir", value_name = "SRC:DEST")]
    dirs: Vec<String>,
    /// Add Debian's qemu-system-x86_64 (with libraries and microvm firmware).
    #[arg(long)]
    qemu: bool,
    /// Build quantix-vmm statically from this workspace and add it as /payload/quantix-vmm.
    #[arg(long)]
    vmm: bool,
    /// A job running a shell command: NAME=COMMAND (repeatable, run in order).
    #[arg(long = "job", value_name = "NAME=COMMAND")]
    jobs: Vec<String>,
    /// Per-job time limit in seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Load tun/bridge modules in the nested host.
    #[arg(long)]
    net: bool,
    /// Memory of the nested host in MiB.
    #[arg(long, default_value_t = 3072)]
    memory: u32,
    /// vCPUs of the nested host.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Extra argument for the nested host kernel's command line (repeatable).
    #[arg(long = "host-arg", value_name = "ARG")]
    host_args: Vec<String>,
    /// Do not retry an infrastructure failure.
    #[arg(long)]
    no_retry: bool,
    /// Print the whole console log at the end.
    #[arg(long)]
    console: bool,
    /// A last job (named `cmd`) running this program and arguments.
    #[arg(last = true, value_name = "CMD")]
    command: Vec<String>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(false)
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("qx-sandbox: {e}");
            ExitCode::from(if e.is_infrastructure() { 2 } else { 3 })
        }
    }
}

fn run(args: &Args) -> Result<ExitCode, SandboxError> {
    let mut sandbox = Sandbox::from_env()?;
    let config = sandbox.config_mut();
    config.memory_mib = args.memory;
    config.cpus = args.cpus;
    config.network_modules = args.net;
    config
        .extra_kernel_args
        .extend(args.host_args.iter().cloned());
    if args.no_retry {
        config.retries = 0;
    }

    let mut payload = Payload::new();
    for spec in &args.files {
        let (src, dest) = split_spec(spec)?;
        payload.add_file(src, dest)?;
    }
    for spec in &args.binaries {
        let (src, dest) = split_spec(spec)?;
        payload.add_host_binary(src, dest)?;
    }
    for spec in &args.dirs {
        let (src, dest) = split_spec(spec)?;
        payload.add_dir(src, dest)?;
    }
    if args.vmm {
        let vmm = quantix_sandbox::build::static_binary("quantix-vmm", "quantix-vmm")?;
        payload.add_file(vmm, "/payload/quantix-vmm")?;
    }
    if args.qemu {
        let assets = sandbox.assets().clone();
        payload.add_qemu(&assets)?;
    }

    let timeout = Duration::from_secs(args.timeout);
    let mut jobs = Vec::new();
    for spec in &args.jobs {
        let (name, command) = spec
            .split_once('=')
            .ok_or_else(|| SandboxError::InvalidJob {
                name: spec.clone(),
                reason: "expected NAME=COMMAND".to_string(),
            })?;
        jobs.push(Job::shell(name, command).timeout(timeout));
    }
    if !args.command.is_empty() {
        jobs.push(Job::new("cmd", args.command.clone()).timeout(timeout));
    }
    if jobs.is_empty() {
        return Err(SandboxError::InvalidJob {
            name: String::new(),
            reason: "no job given (use --job NAME=COMMAND or -- CMD ARGS)".to_string(),
        });
    }

    let report = sandbox.run(&payload, &jobs)?;
    if args.console {
        println!("{}", report.console);
    }
    println!(
        "nested host ready after {:.2?} (uptime {:.2?}), run took {:.2?}, initramfs {} bytes, attempts {}",
        report.host_ready_after,
        report.host_uptime_at_ready,
        report.total,
        report.initramfs_bytes,
        report.attempts
    );
    for job in &report.jobs {
        println!(
            "job {}: status {} timed_out {} elapsed {:.2?}",
            job.name,
            job.status.map_or("none".to_string(), |s| s.to_string()),
            job.timed_out,
            job.elapsed
        );
    }
    println!("console log: {}", report.log_path.display());
    Ok(if report.all_succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn split_spec(spec: &str) -> Result<(PathBuf, &str), SandboxError> {
    match spec.rsplit_once(':') {
        Some((src, dest)) if !src.is_empty() && dest.starts_with('/') => {
            Ok((PathBuf::from(src), dest))
        }
        _ => Err(SandboxError::InvalidPayload {
            dest: spec.to_string(),
            reason: "expected SRC:DEST with an absolute DEST".to_string(),
        }),
    }
}
