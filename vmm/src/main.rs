//! The `quantix-vmm` command.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use quantix_vmm::config::{
    validate_on_host, validate_vcpus, BootSource, DiskConfig, MemorySize, NetConfig, SerialMode,
    VmConfig, VsockConfig, DEFAULT_CMDLINE,
};
use quantix_vmm::exit::{record_of, write_record, ExitRecord, EXIT_SETUP_ERROR, EXIT_USAGE};
use tracing_subscriber::EnvFilter;

/// Run one virtual machine on KVM.
///
/// Exit status: 0 when the guest powers off or reboots, or on a shutdown request on the
/// control socket; 1 when the VM cannot be set up; 2 on a usage error; 3 on a triple fault;
/// 4 on a KVM error; 5 on an unhandled vCPU exit; 6 when the guest reports a crash;
/// 7 on an internal VMM error; 128+N when stopped by signal N (SIGTERM, SIGINT).
#[derive(Debug, Parser)]
#[command(name = "quantix-vmm", version, about, long_about = None)]
#[command(group(clap::ArgGroup::new("lazy_or_incoming").args(["lazy", "incoming"]).multiple(true)))]
struct Cli {
    /// The whole VM configuration as a JSON file (quantix-vmm-api's VmConfig; see
    /// docs/vmm.md), instead of the VM flags below. `-` reads standard input.
    #[arg(long, value_name = "FILE", conflicts_with_all = VM_FLAGS)]
    config: Option<PathBuf>,
    /// Restore the VM saved in this snapshot directory (its `vmstate` and `memory`), with
    /// its saved configuration, instead of booting; it waits paused for a `resume` on the
    /// control socket unless --resume is given. Of the VM flags only --api-socket may be
    /// given (a restored copy next to the original needs its own control socket), and
    /// --kvm and --seccomp, which apply as for a boot (never the saved values); or
    /// --config FILE, whose host side (files, descriptors, sockets, TAPs) replaces the
    /// saved one, its guest side (vCPUs, memory, devices, MACs, CID) matching it.
    #[arg(long, value_name = "DIR", conflicts_with_all = RESTORE_CONFLICTS)]
    restore: Option<PathBuf>,
    /// Receive a VM by live migration instead of booting: listen on this Unix socket for
    /// one source quantix-vmm (its `migrate` request), build the VM it announces, paused,
    /// fill its memory and state, and run it when the source switches over (docs/migration.md).
    /// Of the VM flags only --api-socket, --kvm and --seccomp may be given, or --config FILE
    /// whose host side replaces the source's (as for --restore).
    #[arg(long, value_name = "SOCKET", conflicts_with_all = RESTORE_CONFLICTS, conflicts_with = "restore")]
    incoming: Option<PathBuf>,
    /// With --restore: run the guest at once.
    #[arg(long, requires = "restore")]
    resume: bool,
    /// With --restore: run the guest before its memory is loaded; each page is read from
    /// the snapshot when first touched (userfaultfd), the rest copied in behind.
    #[arg(long, requires = "restore")]
    lazy: bool,
    /// With --lazy or --incoming: the userfaultfd device to make the descriptor with (an
    /// inherited /dev/fd/N of /dev/userfaultfd, as a jailed VMM gets it) for a lazy restore
    /// or a post-copy migration; default /dev/userfaultfd, else the userfaultfd syscall.
    #[arg(long, value_name = "PATH", requires = "lazy_or_incoming")]
    userfaultfd: Option<PathBuf>,
    /// Linux kernel to boot: an ELF vmlinux (PVH entry used when present) or a bzImage.
    #[arg(
        long,
        value_name = "PATH",
        required_unless_present_any = ["firmware", "config", "restore", "incoming"],
        conflicts_with = "firmware"
    )]
    kernel: Option<PathBuf>,
    /// Initial RAM filesystem (cpio, optionally compressed) for the kernel.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STRING", default_value = DEFAULT_CMDLINE, requires = "kernel")]
    cmdline: String,
    /// Raw firmware image, mapped to end at 4 GiB and started at the reset vector.
    #[arg(long, value_name = "PATH")]
    firmware: Option<PathBuf>,
    /// Number of vCPUs (1-254).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_vcpus)]
    cpus: u8,
    /// Guest memory: a number of MiB, or with a unit: 512M, 2G.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: MemorySize,
    /// Serial console (COM1): stdout, file=PATH, pty, socket=PATH or off.
    #[arg(long, value_name = "MODE", default_value = "stdout")]
    serial: SerialMode,
    /// A virtio entropy device (virtio-rng), so that the guest does not wait for entropy.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    rng: String,
    /// A virtio-blk disk on a raw image: path=PATH[,readonly=on|off][,id=NAME][,aio=io_uring|threads]
    /// (repeatable; the guest sees vda, vdb, ... in this order).
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<DiskConfig>,
    /// A virtio-net card on a TAP: tap=NAME[,mac=MAC] (created if it does not exist) or
    /// fd=N[,mac=MAC] (an open TAP fd with IFF_VNET_HDR from a supervisor); repeatable.
    #[arg(long = "net", value_name = "SPEC")]
    nets: Vec<NetConfig>,
    /// A virtio console (the guest's hvc0): stdout, file=PATH, pty, socket=PATH or off.
    /// Standard input goes to the serial port when it is on stdout, else to this console.
    #[arg(long, value_name = "MODE", default_value = "off")]
    console: SerialMode,
    /// A virtio-vsock device: cid=N,socket=PATH. Guest connections to port P reach the
    /// Unix socket PATH_P; host processes connect to PATH and send `CONNECT P\n`
    /// (see docs/devices.md). At most one.
    #[arg(long, value_name = "SPEC")]
    vsock: Option<VsockConfig>,
    /// Control socket path (JSON lines; see docs/vmm.md).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Where to write, as the VMM exits, a JSON record of why ({"code":N,"reason":"...",
    /// "detail":"..."}), for a supervisor that cannot wait for its status (see docs/vmm.md).
    #[arg(long, value_name = "PATH")]
    exit_file: Option<PathBuf>,
    /// The KVM device: a path, or `/dev/fd/N` for a descriptor opened by a supervisor (a
    /// jailed VMM has no /dev).
    #[arg(long, value_name = "PATH", default_value = "/dev/kvm")]
    kvm: PathBuf,
    /// Seccomp filters per thread: kill (a call outside the allow-list stops the VMM with
    /// exit status 8 and reason `seccomp`), log (allowed, logged by the kernel; for
    /// finding what a filter misses) or off.
    #[arg(long, value_name = "MODE", default_value = "kill")]
    seccomp: quantix_vmm::seccomp::Mode,
    /// Test hook: this kind of thread (vmm, vcpu) makes a forbidden call once filtered.
    #[arg(long, value_name = "KIND", hide = true)]
    seccomp_probe: Option<quantix_vmm::seccomp::Kind>,
    /// Log level of the VMM's own logs on stderr: error, warn, info, debug, trace
    /// (or a tracing filter such as `quantix_vmm=debug`).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
    /// Log format on stderr.
    #[arg(long, value_name = "FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

/// The flags that describe the VM (everything a configuration file holds).
const VM_FLAGS: [&str; 15] = [
    "kernel",
    "initramfs",
    "cmdline",
    "firmware",
    "cpus",
    "memory",
    "serial",
    "rng",
    "disks",
    "nets",
    "console",
    "vsock",
    "api_socket",
    "kvm",
    "seccomp",
];

/// The flags a restore takes from the snapshot instead.
const RESTORE_CONFLICTS: [&str; 12] = [
    "kernel",
    "initramfs",
    "cmdline",
    "firmware",
    "cpus",
    "memory",
    "serial",
    "rng",
    "disks",
    "nets",
    "console",
    "vsock",
];

/// Reads `--config FILE` (`-`: standard input), at most the contract's size cap.
fn read_config(path: &std::path::Path) -> Result<VmConfig, String> {
    use std::io::Read;
    let max = quantix_vmm_api::config::CONFIG_FILE_MAX as u64;
    let mut bytes = Vec::new();
    let what = path.display();
    let read = if path == std::path::Path::new("-") {
        std::io::stdin().take(max + 1).read_to_end(&mut bytes)
    } else {
        // An inherited /dev/fd/N (how the agent hands it over, into a jail without /dev) is
        // used as it is; anything else is opened.
        quantix_hostfs::inherit::open(path, quantix_hostfs::Access::ReadOnly)
            .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
    };
    read.map_err(|e| format!("cannot read --config {what}: {e}"))?;
    VmConfig::from_json(&bytes).map_err(|e| format!("--config {what}: {e}"))
}

fn parse_vcpus(s: &str) -> Result<u8, String> {
    let n: u64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    validate_vcpus(n).map_err(|e| e.to_string())
}

fn init_logging(level: &str, format: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(level).map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { EXIT_USAGE as u8 } else { 0 });
        }
    };
    if let Err(e) = init_logging(&cli.log_level, &cli.log_format) {
        eprintln!("quantix-vmm: {e}");
        return ExitCode::from(EXIT_USAGE as u8);
    }
    tracing::debug!(version = env!("CARGO_PKG_VERSION"), "quantix-vmm starting");
    let exit_file = cli.exit_file;
    let record = |rec: ExitRecord| {
        if let Some(path) = &exit_file {
            if let Err(e) = write_record(&rec, path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write the exit record");
            }
        }
    };
    if cli.restore.is_some() || cli.incoming.is_some() {
        if cli.seccomp == quantix_vmm::seccomp::Mode::Kill {
            if let Some(path) = &exit_file {
                // The SIGSYS handler cannot open files: it writes through this descriptor.
                if let Err(e) = quantix_vmm::seccomp::trap::prepare_exit_record(path) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot prepare the exit record");
                }
            }
        }
        let config = match &cli.config {
            Some(path) => match read_config(path) {
                Ok(c) => Some(Box::new(c)),
                Err(e) => {
                    eprintln!("quantix-vmm: {e}");
                    record(ExitRecord::setup_error(e));
                    return ExitCode::from(EXIT_SETUP_ERROR as u8);
                }
            },
            None => None,
        };
        let start = match (cli.restore, cli.incoming) {
            (_, Some(socket)) => quantix_vmm::runner::Start::Incoming {
                socket,
                userfaultfd: cli.userfaultfd,
                config,
                api_socket: cli.api_socket,
                kvm: cli.kvm,
                seccomp: cli.seccomp,
            },
            (Some(dir), None) => quantix_vmm::runner::Start::Restore {
                dir,
                config,
                api_socket: cli.api_socket,
                kvm: cli.kvm,
                seccomp: cli.seccomp,
                resume: cli.resume,
                memory: if cli.lazy {
                    quantix_vmm::vm::RestoreMemory::Lazy {
                        device: cli.userfaultfd,
                    }
                } else {
                    quantix_vmm::vm::RestoreMemory::Mapped
                },
            },
            (None, None) => return ExitCode::from(EXIT_USAGE as u8),
        };
        return finish(
            quantix_vmm::runner::run_start(start, cli.seccomp_probe),
            &record,
        );
    }
    let config = match &cli.config {
        Some(path) => match read_config(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("quantix-vmm: {e}");
                record(ExitRecord::setup_error(e));
                return ExitCode::from(EXIT_SETUP_ERROR as u8);
            }
        },
        None => {
            let boot = match (cli.kernel, cli.firmware) {
                (Some(kernel), None) => BootSource::Kernel {
                    kernel,
                    initramfs: cli.initramfs,
                    cmdline: cli.cmdline,
                },
                (None, Some(fw)) => BootSource::Firmware(fw),
                // clap enforces exactly one of the two.
                _ => return ExitCode::from(EXIT_USAGE as u8),
            };
            VmConfig {
                boot,
                vcpus: cli.cpus,
                memory: cli.memory,
                serial: cli.serial,
                api_socket: cli.api_socket,
                rng: cli.rng == "on",
                disks: cli.disks,
                nets: cli.nets,
                console: cli.console,
                vsock: cli.vsock,
                kvm: cli.kvm,
                seccomp: cli.seccomp,
            }
        }
    };
    if let Err(e) = validate_on_host(&config) {
        eprintln!("quantix-vmm: {e}");
        record(ExitRecord::setup_error(e.to_string()));
        return ExitCode::from(EXIT_SETUP_ERROR as u8);
    }
    if config.seccomp == quantix_vmm::seccomp::Mode::Kill {
        if let Some(path) = &exit_file {
            // The SIGSYS handler cannot open files: it writes through this descriptor.
            if let Err(e) = quantix_vmm::seccomp::trap::prepare_exit_record(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot prepare the exit record");
            }
        }
    }
    finish(
        quantix_vmm::runner::run(&config, cli.seccomp_probe),
        &record,
    )
}

/// The exit status and record of a run.
fn finish(
    result: Result<quantix_vmm::exit::ExitReason, quantix_vmm::runner::RunError>,
    record: &dyn Fn(ExitRecord),
) -> ExitCode {
    match result {
        Ok(reason) => {
            let code = reason.exit_code();
            tracing::info!(reason = reason.name(), code, "VM stopped");
            record(record_of(&reason));
            ExitCode::from(code as u8)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot run the VM");
            eprintln!("quantix-vmm: {e}");
            record(ExitRecord::setup_error(e.to_string()));
            ExitCode::from(EXIT_SETUP_ERROR as u8)
        }
    }
}
