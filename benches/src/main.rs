//! `quantix-bench`: benchmarks of quantix-vmm side by side with QEMU. See
//! `benches/README.md`.
//!
//! Exit status: 0 when the figures were measured (failed runs are reported and excluded,
//! missed targets are reported, neither fails the command); 1 on a setup error (build,
//! assets, /dev/kvm) or when quantix-vmm or QEMU had no successful run at all; 2 on a
//! usage error; 3 when the nested sandbox failed as infrastructure.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use quantix_bench::block::{self, BlockOptions};
use quantix_bench::boot::{self, BootOptions, Kernel};
use quantix_bench::first_insn::{self, FirstInsnOptions};
use quantix_bench::jail::{self, JailOptions, Part};
use quantix_bench::net::{self, NetOptions};
use quantix_bench::report::write_json;
use quantix_bench::snapshot::{self, SnapshotOptions};
use quantix_bench::BenchError;
use tracing_subscriber::EnvFilter;

/// Benchmarks of quantix-vmm side by side with QEMU.
#[derive(Debug, Parser)]
#[command(name = "quantix-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Boot-to-init time and VMM memory overhead, quantix-vmm and QEMU microvm booting
    /// Debian's cloud kernel alternately in one nested KVM host (several minutes).
    Boot {
        /// Runs per VMM.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        iterations: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
        cpus: u32,
        /// Guest memory, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=2048))]
        memory: u32,
        /// Guest kernel: the bzImage or the ELF extracted from it (PVH entry).
        #[arg(long, value_enum, default_value_t = Kernel::Vmlinuz)]
        kernel: Kernel,
        /// Limit of one run inside the nested host, seconds (the VMM is killed then).
        #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..=1800))]
        timeout: u64,
        /// Append `quiet` to the guest kernel command line of both VMMs (the default
        /// boot is dominated by the serial console's ~300 lines of kernel messages).
        #[arg(long)]
        quiet: bool,
        /// Keep every run's whole guest console, each line with its time since the VMM
        /// was spawned (shown live, kept in the sandbox log and in the JSON samples).
        #[arg(long)]
        console: bool,
        /// Also boot with this Firecracker binary (e.g. ../shared/peers/firecracker),
        /// alternating with the others; its shared libraries go with it.
        #[arg(long, value_name = "PATH")]
        firecracker: Option<PathBuf>,
        /// Also boot with this Cloud Hypervisor binary (e.g.
        /// ../shared/peers/cloud-hypervisor); it boots only `--kernel vmlinux`.
        #[arg(long, value_name = "PATH")]
        cloud_hypervisor: Option<PathBuf>,
        /// Also write all raw samples and the summary as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// SMP reliability: boots Debian's cloud kernel with several vCPUs again and again,
    /// quantix-vmm and QEMU microvm alternating, over several nested hosts, and counts
    /// clean boots, triple faults, guest panics and nested-host deaths for each
    /// (a stress tool: about 20 s per 4-vCPU boot, 30 s per 8-vCPU boot).
    Smp {
        /// Nested hosts, booted one after the other.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=200))]
        hosts: u32,
        /// Boots per VMM and vCPU count in each nested host.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=50))]
        rounds: u32,
        /// Guest vCPU counts (comma-separated).
        #[arg(long, value_delimiter = ',', default_values_t = [4u32, 8], value_parser = clap::value_parser!(u32).range(1..=64))]
        cpus: Vec<u32>,
        /// Guest memory, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 512, value_parser = clap::value_parser!(u32).range(128..=2048))]
        memory: u32,
        /// Guest kernel: the bzImage or the ELF extracted from it (PVH entry).
        #[arg(long, value_enum, default_value_t = Kernel::Vmlinuz)]
        kernel: Kernel,
        /// Boot only this VMM (default: both, alternating).
        #[arg(long, value_enum)]
        only: Option<quantix_bench::boot::Vmm>,
        /// vCPUs of the nested host (TCG threads on this machine).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4))]
        host_cpus: u32,
        /// Extra argument for the nested host kernel's command line (repeatable).
        #[arg(long = "host-arg", value_name = "ARG")]
        host_args: Vec<String>,
        /// Trace KVM's shutdown exits, injected exceptions and refused MSRs in the nested
        /// host, and print the trace of every failed boot.
        #[arg(long)]
        trace: bool,
        /// Limit of one boot, seconds.
        #[arg(long, value_name = "SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(30..=1800))]
        timeout: u64,
        /// quantix-vmm's --log-level in the boots.
        #[arg(long, value_name = "LEVEL", default_value = "warn")]
        vmm_log_level: String,
        /// Also write every boot and the tallies as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// virtio-blk throughput and IOPS (sequential and random, 4 KiB and 1 MiB, O_DIRECT)
    /// and the VMM's host CPU per GB, quantix-vmm and QEMU microvm alternating in one
    /// nested KVM host (about 6 min with the defaults).
    Block {
        /// Runs per VMM (each runs every test once).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        iterations: u32,
        /// Seconds per test.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=60))]
        seconds: u32,
        /// Guest threads per test, each with one request in flight (the queue depth).
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        threads: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
        cpus: u32,
        /// Guest memory, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=2048))]
        memory: u32,
        /// Size of the raw disk image (in the nested host's tmpfs), MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(16..=1024))]
        disk: u32,
        /// vCPUs of the nested host (TCG threads on this machine).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        host_cpus: u32,
        /// Also write all raw samples and the summary as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// virtio-net TCP throughput (guest to host, host to guest) and 1-byte round trips,
    /// with the VMM's host CPU, quantix-vmm and QEMU microvm on a TAP on a bridge,
    /// alternating in one nested KVM host (about 6 min with the defaults).
    Net {
        /// Runs per VMM.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        iterations: u32,
        /// Times each test runs within one VMM run.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
        repeat: u32,
        /// MiB per throughput test.
        #[arg(long, value_name = "MIB", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=4096))]
        mib: u64,
        /// Round trips per latency test.
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=1_000_000))]
        round_trips: u64,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
        cpus: u32,
        /// Guest memory, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 256, value_parser = clap::value_parser!(u32).range(64..=2048))]
        memory: u32,
        /// vCPUs of the nested host (TCG threads on this machine).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=2))]
        host_cpus: u32,
        /// Also write all raw samples and the summary as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// What the agent's jail and the seccomp filters cost: boot, block and network,
    /// quantix-vmm jailed and unconfined alternating, one nested host per part (about
    /// 25 min with the defaults).
    Jail {
        /// Parts to run (comma-separated).
        #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Boot, Part::Block, Part::Net])]
        parts: Vec<Part>,
        /// Boots per side.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=100))]
        boot_iterations: u32,
        /// Block and network runs per side.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
        io_iterations: u32,
        /// Seconds per block test.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=60))]
        block_seconds: u32,
        /// Times each network test runs within one VMM run.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=20))]
        net_repeat: u32,
        /// Also write all raw samples and the comparison as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// Process start to first guest instruction on this host's /dev/kvm, with a tiny
    /// guest that writes one byte to COM1 and powers off.
    FirstInsn {
        /// Measured runs per column.
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=10000))]
        iterations: u32,
        /// Unmeasured runs per column before the measured ones.
        #[arg(long, default_value_t = 1)]
        warmup: u32,
        /// Guest memory, MiB.
        #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(32..=4096))]
        memory: u32,
        /// Use this quantix-vmm binary instead of building target/release/quantix-vmm
        /// with `cargo build --release -p quantix-vmm`.
        #[arg(long, value_name = "PATH")]
        vmm_bin: Option<PathBuf>,
        /// The QEMU binary to compare with.
        #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
        qemu: String,
        /// Also compare with this Firecracker binary (e.g. ../shared/peers/firecracker).
        #[arg(long, value_name = "PATH")]
        firecracker: Option<PathBuf>,
        /// Also compare with this Cloud Hypervisor binary.
        #[arg(long, value_name = "PATH")]
        cloud_hypervisor: Option<PathBuf>,
        /// Also write all raw samples and the summary as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// Snapshots on this host's /dev/kvm (or, with --sandbox, in a nested host of the KVM
    /// sandbox): full and diff snapshot time, time paused and size, and restore-to-running,
    /// quantix-vmm beside Firecracker's snapshot API and QEMU's migration to a file, for
    /// each guest size (a few minutes; in the sandbox about half an hour).
    Snapshot {
        /// Iterations per VMM and size.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        iterations: u32,
        /// Guest sizes, MiB, comma-separated (at least 32: the guest loads at 16 MiB).
        #[arg(long, value_name = "MIB,...", value_delimiter = ',', default_values_t = [256u32, 1024], value_parser = clap::value_parser!(u32).range(32..=3072))]
        sizes: Vec<u32>,
        /// Use this quantix-vmm binary instead of building target/release/quantix-vmm
        /// (with --sandbox: a static binary, instead of building one).
        #[arg(long, value_name = "PATH")]
        vmm_bin: Option<PathBuf>,
        /// The QEMU binary to compare with (with --sandbox: the sandbox's QEMU, always).
        #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
        qemu: String,
        /// No QEMU column.
        #[arg(long)]
        no_qemu: bool,
        /// Also compare with this Firecracker binary (e.g. ../shared/peers/firecracker).
        #[arg(long, value_name = "PATH")]
        firecracker: Option<PathBuf>,
        /// Limit of each step (a snapshot, a restore's first byte), seconds.
        #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = clap::value_parser!(u64).range(5..=3600))]
        timeout: u64,
        /// Run in one nested host of the KVM sandbox (the real KVM, under TCG; needs the
        /// sandbox assets, see docs/testing.md) instead of on this host's /dev/kvm.
        #[arg(long)]
        sandbox: bool,
        /// The guest's tick period, µs (default 200 on /dev/kvm, 2000 in the sandbox).
        #[arg(long, value_name = "US", value_parser = clap::value_parser!(u64).range(50..=100_000))]
        tick_us: Option<u64>,
        /// Also write all raw samples and the summary as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
    /// The node agent on this host's /dev/kvm: Create-to-Running, List and Stop latency
    /// under concurrent clients, VMs started per second, the agent's memory and CPU per VM.
    Agent {
        /// VMs to create, list and stop.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=2000))]
        vms: u32,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
        clients: u32,
        /// List calls per client.
        #[arg(long, default_value_t = 200)]
        lists: u32,
        /// Directory with quantix-agent, quantix-jailer and quantix-vmm; default: build them
        /// (`cargo build --release -p quantix-vmm -p quantix-agent -p quantix-jailer`) and
        /// use target/release.
        #[arg(long, value_name = "DIR")]
        bin_dir: Option<PathBuf>,
        /// Also write the figures as JSON to PATH.
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The sandbox streams the nested host's job output at info level: live progress.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quantix-bench: error: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}

/// Prints a benchmark's report and, with `--json PATH`, writes `results` there (`what`
/// they are, in the line that says so).
fn show<R: serde::Serialize>(
    report: String,
    results: &R,
    json: Option<PathBuf>,
    what: &str,
) -> Result<(), BenchError> {
    println!("{report}");
    if let Some(path) = json {
        write_json(&path, results)?;
        println!("{what} written to {}", path.display());
    }
    Ok(())
}

fn run(cmd: Cmd) -> Result<(), BenchError> {
    match cmd {
        Cmd::Boot {
            iterations,
            cpus,
            memory,
            kernel,
            timeout,
            quiet,
            console,
            firecracker,
            cloud_hypervisor,
            json,
        } => {
            let results = boot::run(&BootOptions {
                iterations,
                cpus,
                memory_mib: memory,
                kernel,
                run_timeout_s: timeout,
                quiet,
                console,
                firecracker,
                cloud_hypervisor,
            })?;
            show(
                boot::format(&results),
                &results,
                json,
                "raw samples and summary",
            )?;
            boot::check_samples(&results)
        }
        Cmd::Smp {
            hosts,
            rounds,
            cpus,
            memory,
            kernel,
            only,
            host_cpus,
            host_args,
            trace,
            timeout,
            vmm_log_level,
            json,
        } => {
            use quantix_bench::boot::Vmm;
            let results = quantix_bench::smp::run(&quantix_bench::smp::SmpOptions {
                hosts,
                rounds,
                cpus,
                memory_mib: memory,
                kernel,
                vmms: only.map_or_else(|| vec![Vmm::Quantix, Vmm::Qemu], |v| vec![v]),
                host_cpus,
                host_args,
                trace,
                boot_timeout_s: timeout,
                vmm_log_level,
            })?;
            show(
                quantix_bench::smp::format(&results),
                &results,
                json,
                "every boot and the tallies",
            )?;
            quantix_bench::smp::check(&results)
        }
        Cmd::Jail {
            parts,
            boot_iterations,
            io_iterations,
            block_seconds,
            net_repeat,
            json,
        } => {
            // The other benchmarks' defaults, but for the iteration counts.
            let results = jail::run(&JailOptions {
                parts,
                boot: BootOptions {
                    iterations: boot_iterations,
                    cpus: 1,
                    memory_mib: 256,
                    kernel: Kernel::Vmlinuz,
                    run_timeout_s: 300,
                    quiet: false,
                    console: false,
                    firecracker: None,
                    cloud_hypervisor: None,
                },
                block: BlockOptions {
                    iterations: io_iterations,
                    seconds: block_seconds,
                    threads: 4,
                    cpus: 1,
                    memory_mib: 256,
                    disk_mib: 256,
                    host_cpus: 1,
                },
                net: NetOptions {
                    iterations: io_iterations,
                    repeat: net_repeat,
                    bytes: 8 << 20,
                    round_trips: 500,
                    cpus: 1,
                    memory_mib: 256,
                    host_cpus: 1,
                },
            })?;
            show(
                jail::format(&results),
                &results,
                json,
                "raw samples and comparison",
            )?;
            jail::check(&results)
        }
        Cmd::Block {
            iterations,
            seconds,
            threads,
            cpus,
            memory,
            disk,
            host_cpus,
            json,
        } => {
            let results = block::run(&BlockOptions {
                iterations,
                seconds,
                threads,
                cpus,
                memory_mib: memory,
                disk_mib: disk,
                host_cpus,
            })?;
            show(
                block::format(&results),
                &results,
                json,
                "raw samples and summary",
            )?;
            block::check(&results.runs, &results.samples)
        }
        Cmd::Net {
            iterations,
            repeat,
            mib,
            round_trips,
            cpus,
            memory,
            host_cpus,
            json,
        } => {
            let results = net::run(&NetOptions {
                iterations,
                repeat,
                bytes: mib << 20,
                round_trips,
                cpus,
                memory_mib: memory,
                host_cpus,
            })?;
            show(
                net::format(&results),
                &results,
                json,
                "raw samples and summary",
            )?;
            block::check(&results.runs, &results.samples)
        }
        Cmd::FirstInsn {
            iterations,
            warmup,
            memory,
            vmm_bin,
            qemu,
            firecracker,
            cloud_hypervisor,
            json,
        } => {
            let results = first_insn::run(&FirstInsnOptions {
                iterations,
                warmup,
                memory_mib: memory,
                vmm_bin,
                qemu,
                firecracker,
                cloud_hypervisor,
                timeout: Duration::from_secs(30),
            })?;
            show(
                first_insn::format(&results),
                &results,
                json,
                "raw samples and summary",
            )?;
            first_insn::check(&results)
        }
        Cmd::Snapshot {
            iterations,
            sizes,
            vmm_bin,
            qemu,
            no_qemu,
            firecracker,
            timeout,
            sandbox,
            tick_us,
            json,
        } => {
            let default_tick = if sandbox {
                snapshot::SANDBOX_TICK_US
            } else {
                snapshot::TICK_US
            };
            let options = SnapshotOptions {
                iterations,
                sizes,
                vmm_bin,
                qemu: (!no_qemu).then_some(qemu),
                firecracker,
                timeout: Duration::from_secs(timeout),
                tick_us: tick_us.unwrap_or(default_tick),
            };
            let results = if sandbox {
                snapshot::run_in_sandbox(&options)?
            } else {
                snapshot::run(&options)?
            };
            show(
                snapshot::format(&results),
                &results,
                json,
                "raw samples and summary",
            )?;
            snapshot::check(&results)
        }
        Cmd::Agent {
            vms,
            clients,
            lists,
            bin_dir,
            json,
        } => {
            let bin_dir = match bin_dir {
                Some(d) => d,
                None => {
                    let root = quantix_sandbox::build::workspace_root();
                    let out = std::process::Command::new(
                        std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
                    )
                    .current_dir(&root)
                    .args([
                        "build",
                        "--release",
                        "-p",
                        "quantix-vmm",
                        "-p",
                        "quantix-agent",
                        "-p",
                        "quantix-jailer",
                    ])
                    .output()
                    .map_err(|e| BenchError::io("running cargo build", e))?;
                    if !out.status.success() {
                        return Err(BenchError::Command {
                            command: "cargo build --release -p quantix-vmm -p quantix-agent -p quantix-jailer"
                                .into(),
                            reason: String::from_utf8_lossy(&out.stderr).into_owned(),
                        });
                    }
                    root.join("target/release")
                }
            };
            let report = quantix_bench::agent::run(&quantix_bench::agent::AgentOptions {
                vms: vms as usize,
                clients: clients as usize,
                lists: lists as usize,
                bin_dir,
            })?;
            show(
                quantix_bench::agent::format(&report),
                &report,
                json,
                "figures",
            )?;
            Ok(())
        }
    }
}
