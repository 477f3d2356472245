//! `first-insn`: process start to the guest's first instruction, on this host's
//! /dev/kvm, measured as spawn → first byte on the VMM's stdout pipe from a guest whose
//! first instructions write that byte to COM1.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::BenchError;
use crate::guest;
use crate::report::{self, ratio, Target};
use crate::stats::{self, Summary};

/// Target: process start to first guest instruction, ms.
pub const FIRST_INSN_TARGET_MS: f64 = 10.0;
/// Target: quantix-vmm's spawn → exit at most this share of Firecracker's, same guest.
pub const EXIT_VS_FIRECRACKER_TARGET: f64 = 0.75;

/// The columns' names (the ratios look columns up by them).
pub const QUANTIX_ELF: &str = "quantix-elf";
/// quantix-vmm with the PVH guest.
pub const QUANTIX_PVH: &str = "quantix-pvh";
/// quantix-vmm with the firmware guest.
pub const QUANTIX_FIRMWARE: &str = "quantix-firmware";
/// QEMU microvm with the PVH guest.
pub const QEMU_PVH: &str = "qemu-pvh";
/// QEMU microvm with the firmware guest.
pub const QEMU_FIRMWARE: &str = "qemu-firmware";
/// Target: restore-to-running of a tiny guest on this host, ms (the snapshot issue).
pub const RESTORE_TARGET_MS: f64 = 10.0;
/// quantix-vmm restoring a snapshot of the spinning guest (`guest::elf64_restore`).
pub const QUANTIX_RESTORE: &str = "quantix-restore";
/// Firecracker with the ELF guest.
pub const FIRECRACKER_ELF: &str = "firecracker-elf";
/// Cloud Hypervisor with the PVH guest.
pub const CLOUD_HYPERVISOR_PVH: &str = "cloud-hypervisor-pvh";

/// Settings of one `first-insn` benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FirstInsnOptions {
    /// Measured runs per column.
    pub iterations: u32,
    /// Unmeasured runs per column first (page cache, lazy binding...).
    pub warmup: u32,
    /// Guest memory, MiB.
    pub memory_mib: u32,
    /// The quantix-vmm binary; `None`: build `target/release/quantix-vmm` with cargo.
    pub vmm_bin: Option<PathBuf>,
    /// The QEMU binary.
    pub qemu: String,
    /// A Firecracker binary to compare with (`../shared/peers/firecracker`); none: no column.
    pub firecracker: Option<PathBuf>,
    /// A Cloud Hypervisor binary to compare with; none: no column.
    pub cloud_hypervisor: Option<PathBuf>,
    /// Limit per run.
    pub timeout: Duration,
}

/// One way of running a tiny guest.
#[derive(Debug, Clone, Serialize)]
pub struct Column {
    /// Short name.
    pub name: String,
    /// Which VMM (`quantix`, `qemu`, `firecracker` or `cloud-hypervisor`).
    pub vmm: String,
    /// The guest, in words.
    pub guest: String,
    /// The command.
    pub argv: Vec<String>,
    /// The VMM is expected to exit by itself (status 0) after the guest's poweroff; if
    /// not (QEMU microvm has no ACPI port at 0x600), it is killed after the first byte.
    pub expect_exit: bool,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct Measurement {
    /// Column name.
    pub column: String,
    /// 1-based; warm-up runs have `warmup: true`.
    pub iteration: u32,
    /// A warm-up run, not counted.
    pub warmup: bool,
    /// Spawn to the first byte read from the VMM's stdout, ms.
    pub first_byte_ms: Option<f64>,
    /// The first byte read.
    pub first_byte: Option<u8>,
    /// Spawn to exit (or to the kill, for a VMM that does not exit), ms.
    pub total_ms: Option<f64>,
    /// Exit code.
    pub exit_code: Option<i32>,
    /// Signal that ended it (9 when we killed it).
    pub exit_signal: Option<i32>,
    /// Why this run does not count, if it does not.
    pub failure: Option<String>,
    /// The end of the VMM's stderr, for failed runs.
    pub stderr_tail: Option<String>,
}

/// The statistics of one column.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnSummary {
    /// The column.
    pub column: Column,
    /// Measured runs.
    pub runs: usize,
    /// Runs that count.
    pub ok: usize,
    /// Spawn → first byte, ms.
    pub first_byte_ms: Option<Summary>,
    /// Spawn → exit, ms (only for VMMs that exit by themselves).
    pub total_ms: Option<Summary>,
    /// Why runs failed.
    pub failed: Vec<String>,
}

/// A column that could not be measured, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Column name.
    pub name: String,
    /// The command that was tried.
    pub argv: Vec<String>,
    /// Why.
    pub reason: String,
}

/// The fastest quantix-vmm column against the fastest peer column (by median).
#[derive(Debug, Clone, Serialize)]
pub struct BestRatio {
    /// The quantix-vmm column and its median, ms.
    pub quantix: (String, f64),
    /// The peer column and its median, ms.
    pub peer: (String, f64),
    /// quantix / peer.
    pub ratio: f64,
}

/// The best quantix-vmm and peer medians of `metric`, and their ratio.
pub fn best_ratio(
    columns: &[ColumnSummary],
    metric: impl Fn(&ColumnSummary) -> Option<f64>,
) -> Option<BestRatio> {
    let best = |quantix: bool| {
        columns
            .iter()
            // A restore is another scenario than a boot: not compared with the peers' boots.
            .filter(|c| c.column.name != QUANTIX_RESTORE)
            .filter(|c| (c.column.vmm == "quantix") == quantix)
            .filter_map(|c| metric(c).map(|m| (c.column.name.clone(), m)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
    };
    let (q, p) = (best(true)?, best(false)?);
    (p.1 > 0.0).then(|| BestRatio {
        ratio: q.1 / p.1,
        quantix: q,
        peer: p,
    })
}

/// Everything `first-insn` measured.
#[derive(Debug, Clone, Serialize)]
pub struct FirstInsnResults {
    /// Always `first-insn`.
    pub benchmark: &'static str,
    /// When (UTC).
    pub date: String,
    /// Settings.
    pub options: FirstInsnOptions,
    /// This machine.
    pub host: report::HostFacts,
    /// The quantix-vmm binary used.
    pub vmm_bin: PathBuf,
    /// Every run, warm-ups included.
    pub measurements: Vec<Measurement>,
    /// Per column.
    pub columns: Vec<ColumnSummary>,
    /// Columns that could not run here.
    pub skipped: Vec<Skipped>,
    /// quantix-vmm firmware / QEMU firmware, medians of spawn → first byte.
    pub ratio_firmware: Option<f64>,
    /// quantix-vmm / Firecracker, same ELF guest, medians of spawn → first byte.
    pub ratio_first_byte_firecracker: Option<f64>,
    /// quantix-vmm / Firecracker, same ELF guest, medians of spawn → exit.
    pub ratio_exit_firecracker: Option<f64>,
    /// quantix-vmm / Cloud Hypervisor, same PVH guest, medians of spawn → first byte.
    pub ratio_first_byte_cloud_hypervisor: Option<f64>,
    /// quantix-vmm / Cloud Hypervisor, same PVH guest, medians of spawn → exit.
    pub ratio_exit_cloud_hypervisor: Option<f64>,
    /// The fastest quantix-vmm column against the fastest peer column, spawn → first byte.
    pub best_first_byte: Option<BestRatio>,
    /// The same for spawn → exit (columns whose VMM exits by itself).
    pub best_exit: Option<BestRatio>,
    /// The target, per quantix column.
    pub targets: Vec<Target>,
}

/// Builds `target/release/quantix-vmm` with `cargo build --release -p quantix-vmm` in
/// the workspace (the default target directory, so cargo's lock serialises it with other
/// builds) and returns its path.
pub fn build_vmm() -> Result<PathBuf, BenchError> {
    let root = quantix_sandbox::build::workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let command = format!("{cargo} build --release -p quantix-vmm");
    eprintln!("quantix-bench: {command}");
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--release", "-p", "quantix-vmm"])
        .status()
        .map_err(|e| BenchError::io(format!("running {command}"), e))?;
    if !status.success() {
        return Err(BenchError::Command {
            command,
            reason: status.to_string(),
        });
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root.join(d))
        .unwrap_or_else(|| root.join("target"));
    let bin = target_dir.join("release").join("quantix-vmm");
    if !bin.is_file() {
        return Err(BenchError::Command {
            command,
            reason: format!("{} was not produced", bin.display()),
        });
    }
    Ok(bin)
}

/// Firecracker's configuration for the ELF guest (`--no-api --config-file`).
pub fn firecracker_config(elf: &Path, memory_mib: u32) -> String {
    serde_json::json!({
        "boot-source": {"kernel_image_path": elf, "boot_args": "console=ttyS0"},
        "drives": [],
        "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib, "smt": false},
    })
    .to_string()
}

/// The guest files of one run.
pub struct Guests<'a> {
    /// The 64-bit ELF (Linux 64-bit boot protocol).
    pub elf: &'a Path,
    /// The same code in an ELF with a PVH note.
    pub pvh: &'a Path,
    /// The real-mode firmware.
    pub firmware: &'a Path,
    /// Firecracker's configuration file.
    pub fc_config: &'a Path,
    /// Firecracker's log file (without `--log-path` it logs on stdout, which the guest's
    /// serial port shares).
    pub fc_log: &'a Path,
    /// A snapshot of the spinning restore guest with its go flag set, and the
    /// configuration that puts its serial port on stdout (`prepare_restore`); `None`
    /// when it could not be made (the column is then skipped with the reason).
    pub restore: Option<(&'a Path, &'a Path)>,
}

/// The columns: quantix-vmm with the ELF guest (long mode, kernel boot path) and with
/// the firmware image (real mode, reset vector); QEMU microvm with the same two guests;
/// Firecracker and Cloud Hypervisor with the ELF guest when their binaries are given
/// (Cloud Hypervisor and QEMU boot ELF kernels only by PVH: they get the PVH ELF, next to
/// a quantix-vmm column with it).
pub fn columns(o: &FirstInsnOptions, vmm: &Path, g: &Guests<'_>) -> Vec<Column> {
    let (elf, pvh, firmware, fc_config) = (g.elf, g.pvh, g.firmware, g.fc_config);
    let fc_log = g.fc_log;
    let mem = o.memory_mib.to_string();
    let s = |p: &Path| p.display().to_string();
    let quantix = |boot: &str, file: &Path| {
        vec![
            s(vmm),
            boot.to_string(),
            s(file),
            "--memory".into(),
            mem.clone(),
            "--log-level".into(),
            "warn".into(),
        ]
    };
    let qemu = |boot: &str, file: &Path| {
        [
            o.qemu.as_str(),
            "-M",
            "microvm",
            "-enable-kvm",
            "-m",
            &mem,
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            boot,
            &s(file),
        ]
        .map(String::from)
        .to_vec()
    };
    let elf_desc = "ELF64, 64-bit entry (long mode)";
    let pvh_desc = "ELF64 with a PVH note, 32-bit entry (protected mode)";
    let fw_desc = "64 KiB firmware, reset vector (real mode)";
    let mut peers = Vec::new();
    if let Some(fc) = &o.firecracker {
        peers.push(Column {
            name: FIRECRACKER_ELF.into(),
            vmm: "firecracker".into(),
            guest: format!("{elf_desc}; ends by the i8042 reset"),
            argv: vec![
                s(fc),
                "--no-api".into(),
                "--config-file".into(),
                s(fc_config),
                "--log-path".into(),
                s(fc_log),
            ],
            expect_exit: true,
        });
    }
    if let Some(ch) = &o.cloud_hypervisor {
        peers.push(Column {
            name: CLOUD_HYPERVISOR_PVH.into(),
            vmm: "cloud-hypervisor".into(),
            guest: format!("{pvh_desc}; ends by the ACPI poweroff"),
            argv: vec![
                s(ch),
                "--kernel".into(),
                s(pvh),
                "--memory".into(),
                format!("size={mem}M"),
                "--cpus".into(),
                "boot=1".into(),
                "--serial".into(),
                "tty".into(),
                "--console".into(),
                "off".into(),
            ],
            expect_exit: true,
        });
    }
    let mut columns = vec![
        Column {
            name: QUANTIX_ELF.into(),
            vmm: "quantix".into(),
            guest: elf_desc.into(),
            argv: quantix("--kernel", elf),
            expect_exit: true,
        },
        Column {
            name: QUANTIX_PVH.into(),
            vmm: "quantix".into(),
            guest: pvh_desc.into(),
            argv: quantix("--kernel", pvh),
            expect_exit: true,
        },
        Column {
            name: QUANTIX_FIRMWARE.into(),
            vmm: "quantix".into(),
            guest: fw_desc.into(),
            argv: quantix("--firmware", firmware),
            expect_exit: true,
        },
        Column {
            name: QEMU_PVH.into(),
            vmm: "qemu".into(),
            guest: pvh_desc.into(),
            argv: qemu("-kernel", pvh),
            expect_exit: false,
        },
        Column {
            name: QEMU_FIRMWARE.into(),
            vmm: "qemu".into(),
            guest: fw_desc.into(),
            argv: qemu("-bios", firmware),
            expect_exit: false,
        },
    ];
    if let Some((snap, config)) = g.restore {
        columns.push(Column {
            name: QUANTIX_RESTORE.into(),
            vmm: "quantix".into(),
            guest: "a snapshot of the ELF guest spinning on a flag the image sets; byte, then ACPI poweroff".into(),
            argv: vec![
                s(vmm),
                "--restore".into(),
                s(snap),
                "--config".into(),
                s(config),
                "--resume".into(),
                "--log-level".into(),
                "warn".into(),
            ],
            expect_exit: true,
        });
    }
    columns.extend(peers);
    columns
}

/// Boots the restore guest (serial off, a control socket), snapshots it while it spins
/// (`after: stop`), sets its go flag in the snapshot's memory image, and writes the
/// configuration a restore rebinds to (serial on stdout, no control socket). Returns the
/// snapshot directory and that configuration.
pub fn prepare_restore(
    vmm: &Path,
    dir: &Path,
    memory_mib: u32,
) -> Result<(PathBuf, PathBuf), String> {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::fs::FileExt;
    let elf = dir.join("restore.elf");
    fs::write(&elf, guest::elf64_restore())
        .map_err(|e| format!("writing {}: {e}", elf.display()))?;
    let sock = dir.join("restore.sock");
    let snap = dir.join("restore-snapshot");
    let _ = fs::remove_dir_all(&snap);
    let mut child = Command::new(vmm)
        .args([
            "--kernel",
            &elf.display().to_string(),
            "--memory",
            &memory_mib.to_string(),
        ])
        .args([
            "--serial",
            "off",
            "--log-level",
            "warn",
            "--api-socket",
            &sock.display().to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", vmm.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                let _ = child.kill();
                return Err(format!("the control socket did not come up: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    // Let the guest reach its loop.
    std::thread::sleep(Duration::from_millis(50));
    let request = serde_json::json!({"op": "snapshot", "dir": snap, "after": "stop"});
    let mut w = stream.try_clone().map_err(|e| e.to_string())?;
    writeln!(w, "{request}").map_err(|e| format!("sending the snapshot request: {e}"))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reading the snapshot reply: {e}"))?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !reply.contains("\"ok\":true") || !out.status.success() {
        return Err(format!(
            "the snapshot failed: {} ({}); {}",
            reply.trim(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    // The go flag, in the image (RAM's first region starts the file).
    let memory = OpenOptions::new()
        .write(true)
        .open(snap.join("memory"))
        .map_err(|e| format!("opening the memory image: {e}"))?;
    memory
        .write_all_at(&[1], guest::RESTORE_FLAG)
        .map_err(|e| format!("setting the go flag: {e}"))?;
    let text = fs::read_to_string(snap.join("vmstate")).map_err(|e| e.to_string())?;
    let body = text.split_once('\n').map(|(_, b)| b).unwrap_or_default();
    let state: serde_json::Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let mut config = state["config"].clone();
    config["serial"] = "stdout".into();
    config["api_socket"] = serde_json::Value::Null;
    let path = dir.join("restore.json");
    fs::write(&path, config.to_string()).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok((snap, path))
}

/// Runs the benchmark.
pub fn run(o: &FirstInsnOptions) -> Result<FirstInsnResults, BenchError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| BenchError::Unavailable(format!("cannot open /dev/kvm: {e}")))?;
    let vmm_bin = match &o.vmm_bin {
        Some(p) => p.clone(),
        None => build_vmm()?,
    };
    if !vmm_bin.is_file() {
        return Err(BenchError::Unavailable(format!(
            "{} does not exist (build it with `cargo build --release -p quantix-vmm`)",
            vmm_bin.display()
        )));
    }
    let dir = std::env::temp_dir().join(format!("qx-bench-first-insn-{}", std::process::id()));
    fs::create_dir_all(&dir)
        .map_err(|e| BenchError::io(format!("creating {}", dir.display()), e))?;
    let result = run_in(o, &vmm_bin, &dir);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn run_in(
    o: &FirstInsnOptions,
    vmm_bin: &Path,
    dir: &Path,
) -> Result<FirstInsnResults, BenchError> {
    let write = |name: &str, bytes: &[u8]| -> Result<PathBuf, BenchError> {
        let p = dir.join(name);
        fs::write(&p, bytes).map_err(|e| BenchError::io(format!("writing {}", p.display()), e))?;
        Ok(p)
    };
    let elf = write("first-insn.elf", &guest::elf64())?;
    let fw = write("first-insn.fw", &guest::firmware16())?;
    let pvh = write("first-insn-pvh.elf", &guest::elf64_pvh())?;
    let fc_log = write("firecracker.log", b"")?;
    let fc_config = write(
        "firecracker.json",
        firecracker_config(&elf, o.memory_mib).as_bytes(),
    )?;
    let prepared = prepare_restore(vmm_bin, dir, o.memory_mib);
    let guests = Guests {
        elf: &elf,
        pvh: &pvh,
        firmware: &fw,
        fc_config: &fc_config,
        fc_log: &fc_log,
        restore: prepared
            .as_ref()
            .ok()
            .map(|(a, b)| (a.as_path(), b.as_path())),
    };
    let stderr_path = dir.join("stderr");

    let mut active = Vec::new();
    let mut skipped = Vec::new();
    if let Err(reason) = &prepared {
        skipped.push(Skipped {
            name: QUANTIX_RESTORE.into(),
            argv: Vec::new(),
            reason: reason.clone(),
        });
    }
    for col in columns(o, vmm_bin, &guests) {
        if col.vmm != "quantix" {
            // Can this peer run this guest here at all? One try decides.
            let m = measure(&col, 0, true, o.timeout, &stderr_path);
            if let Some(why) = &m.failure {
                let reason = match &m.stderr_tail {
                    Some(t) if !t.trim().is_empty() => {
                        format!("{why}; {} said: {}", col.vmm, t.trim())
                    }
                    _ => why.clone(),
                };
                skipped.push(Skipped {
                    name: col.name.clone(),
                    argv: col.argv.clone(),
                    reason,
                });
                continue;
            }
        }
        active.push(col);
    }

    let mut measurements = Vec::new();
    let total = o.warmup + o.iterations;
    for i in 0..total {
        let warm = i < o.warmup;
        let iteration = if warm { i + 1 } else { i - o.warmup + 1 };
        for col in &active {
            measurements.push(measure(col, iteration, warm, o.timeout, &stderr_path));
        }
        if !warm && (iteration % 10 == 0 || iteration == o.iterations) {
            eprintln!(
                "quantix-bench: first-insn {iteration}/{} iterations",
                o.iterations
            );
        }
    }

    let columns: Vec<ColumnSummary> = active.iter().map(|c| summarize(c, &measurements)).collect();
    // One column's median of one metric.
    let median = |name: &str, metric: fn(&ColumnSummary) -> Option<Summary>| {
        columns
            .iter()
            .find(|c| c.column.name == name)
            .and_then(|c| metric(c).map(|s| s.median))
    };
    let first = |c: &ColumnSummary| c.first_byte_ms;
    let exit = |c: &ColumnSummary| c.total_ms;
    let ratio_firmware = ratio(
        median(QUANTIX_FIRMWARE, first),
        median(QEMU_FIRMWARE, first),
    );
    let ratio_first_byte_firecracker =
        ratio(median(QUANTIX_ELF, first), median(FIRECRACKER_ELF, first));
    let ratio_exit_firecracker = ratio(median(QUANTIX_ELF, exit), median(FIRECRACKER_ELF, exit));
    // Cloud Hypervisor boots the PVH guest: compared with quantix-vmm on the same one.
    let ratio_first_byte_cloud_hypervisor = ratio(
        median(QUANTIX_PVH, first),
        median(CLOUD_HYPERVISOR_PVH, first),
    );
    let ratio_exit_cloud_hypervisor = ratio(
        median(QUANTIX_PVH, exit),
        median(CLOUD_HYPERVISOR_PVH, exit),
    );
    let mut targets: Vec<Target> = columns
        .iter()
        .filter(|c| c.column.vmm == "quantix" && c.column.name != QUANTIX_RESTORE)
        .map(|c| Target {
            target: format!(
                "process start → first guest instruction < {FIRST_INSN_TARGET_MS} ms ({})",
                c.column.name
            ),
            measured: c.first_byte_ms.map_or("not measured".into(), |s| {
                format!("median {:.2} ms (p90 {:.2})", s.median, s.p90)
            }),
            met: c.first_byte_ms.map(|s| s.median < FIRST_INSN_TARGET_MS),
        })
        .collect();
    if let Some(c) = columns.iter().find(|c| c.column.name == QUANTIX_RESTORE) {
        targets.push(Target {
            target: format!("restore-to-running ≤ {RESTORE_TARGET_MS} ms (spawn → the restored guest's first byte)"),
            measured: c.first_byte_ms.map_or("not measured".into(), |s| {
                format!("median {:.2} ms (p90 {:.2})", s.median, s.p90)
            }),
            met: c.first_byte_ms.map(|s| s.median <= RESTORE_TARGET_MS),
        });
    }
    if o.firecracker.is_some() {
        targets.push(Target {
            target: format!(
                "spawn → exit ≤ {EXIT_VS_FIRECRACKER_TARGET}× Firecracker's (ELF guest)"
            ),
            measured: match (median(QUANTIX_ELF, exit), median(FIRECRACKER_ELF, exit)) {
                (Some(q), Some(f)) => format!("{q:.2} ms vs {f:.2} ms: {:.2}×", q / f),
                _ => "not measured".into(),
            },
            met: ratio_exit_firecracker.map(|r| r <= EXIT_VS_FIRECRACKER_TARGET),
        });
    }
    let best_first_byte = best_ratio(&columns, |c| first(c).map(|s| s.median));
    let best_exit = best_ratio(&columns, |c| exit(c).map(|s| s.median));
    Ok(FirstInsnResults {
        benchmark: "first-insn",
        date: report::now_utc(),
        options: o.clone(),
        host: report::HostFacts::read(),
        vmm_bin: vmm_bin.to_path_buf(),
        measurements,
        columns,
        skipped,
        ratio_firmware,
        ratio_first_byte_firecracker,
        ratio_exit_firecracker,
        ratio_first_byte_cloud_hypervisor,
        ratio_exit_cloud_hypervisor,
        best_first_byte,
        best_exit,
        targets,
    })
}

/// Summarises the measured (non-warm-up) runs of `col`.
pub fn summarize(col: &Column, all: &[Measurement]) -> ColumnSummary {
    let mine: Vec<&Measurement> = all
        .iter()
        .filter(|m| m.column == col.name && !m.warmup)
        .collect();
    let ok: Vec<&Measurement> = mine
        .iter()
        .copied()
        .filter(|m| m.failure.is_none())
        .collect();
    let first: Vec<f64> = ok.iter().filter_map(|m| m.first_byte_ms).collect();
    let total: Vec<f64> = if col.expect_exit {
        ok.iter().filter_map(|m| m.total_ms).collect()
    } else {
        Vec::new()
    };
    ColumnSummary {
        column: col.clone(),
        runs: mine.len(),
        ok: ok.len(),
        first_byte_ms: stats::summarize(&first),
        total_ms: stats::summarize(&total),
        failed: mine
            .iter()
            .filter_map(|m| {
                m.failure
                    .as_ref()
                    .map(|f| format!("run {}: {f}", m.iteration))
            })
            .collect(),
    }
}

/// One run of `col`.
fn measure(
    col: &Column,
    iteration: u32,
    warmup: bool,
    timeout: Duration,
    stderr_path: &Path,
) -> Measurement {
    let mut m = Measurement {
        column: col.name.clone(),
        iteration,
        warmup,
        first_byte_ms: None,
        first_byte: None,
        total_ms: None,
        exit_code: None,
        exit_signal: None,
        failure: None,
        stderr_tail: None,
    };
    let stderr = match File::create(stderr_path) {
        Ok(f) => Stdio::from(f),
        Err(_) => Stdio::null(),
    };
    let argv: Vec<OsString> = col.argv.iter().map(OsString::from).collect();
    let start = Instant::now();
    let deadline = start + timeout;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            m.failure = Some(format!("could not start {}: {e}", col.argv[0]));
            return m;
        }
    };
    let (first, rest_eof) = read_first_byte(&mut child, start, deadline, col.expect_exit);
    match first {
        Ok(Some((at, byte))) => {
            m.first_byte_ms = Some(at);
            m.first_byte = Some(byte);
        }
        Ok(None) => {}
        Err(e) => m.failure = Some(format!("reading the VMM's stdout: {e}")),
    }
    if !col.expect_exit || !rest_eof {
        let _ = child.kill();
    }
    match wait_until(&mut child, deadline) {
        Some(status) => {
            m.exit_code = status.code();
            m.exit_signal = status.signal();
            m.total_ms = Some(start.elapsed().as_secs_f64() * 1000.0);
        }
        None => {
            let _ = child.kill();
            let _ = child.wait();
            m.failure
                .get_or_insert_with(|| format!("did not exit within {timeout:?}"));
        }
    }
    if m.failure.is_none() {
        m.failure = judge(&m, col.expect_exit);
    }
    if m.failure.is_some() {
        m.stderr_tail = fs::read_to_string(stderr_path).ok().map(|t| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(10)..].join("\n")
        });
    }
    m
}

/// Whether a finished run counts.
fn judge(m: &Measurement, expect_exit: bool) -> Option<String> {
    let status = match (m.exit_code, m.exit_signal) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "no status".into(),
    };
    match m.first_byte {
        None => Some(format!("no output from the guest ({status})")),
        Some(b) if b != guest::MARKER_BYTE => Some(format!(
            "first byte was {b:#04x}, not {:#04x} ({status})",
            guest::MARKER_BYTE
        )),
        Some(_) if expect_exit && m.exit_code != Some(0) => Some(status),
        Some(_) => None,
    }
}

/// Waits for the first byte on the child's stdout (ms since `start`, the byte). With
/// `drain`, then reads on to EOF; the flag says whether EOF was reached.
fn read_first_byte(
    child: &mut Child,
    start: Instant,
    deadline: Instant,
    drain: bool,
) -> (io::Result<Option<(f64, u8)>>, bool) {
    let Some(mut out) = child.stdout.take() else {
        return (Ok(None), false);
    };
    let fd = out.as_raw_fd();
    let mut buf = [0u8; 4096];
    let mut first = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            return (Ok(first), false);
        }
        let wait_ms = (deadline - now).as_millis().min(i32::MAX as u128) as i32;
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid, initialised pollfd living across the call; nfds is 1;
        // `fd` is the open read end of the child's stdout pipe, owned by `out`.
        let ready = unsafe { libc::poll(&mut pfd, 1, wait_ms.max(1)) };
        if ready < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (Err(e), false);
        }
        if ready == 0 {
            continue;
        }
        match out.read(&mut buf) {
            Ok(0) => return (Ok(first), true),
            Ok(_) => {
                if first.is_none() {
                    first = Some((start.elapsed().as_secs_f64() * 1000.0, buf[0]));
                    if !drain {
                        return (Ok(first), false);
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (Err(e), false),
        }
    }
}

fn wait_until(child: &mut Child, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// The readable report.
pub fn format(r: &FirstInsnResults) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "quantix-bench first-insn — {}\nthis machine: Linux {}, {} CPUs ({}), /dev/kvm from {}{}; workspace at {}",
        r.date,
        r.host.kernel,
        r.host.cpus,
        r.host.cpu_model,
        r.host.kvm_module,
        if r.host.kvm_module == "kvm_pvm" {
            " (PVM: guest CPL0 and real-mode code is emulated)"
        } else {
            ""
        },
        r.host.revision
    );
    let _ = writeln!(
        s,
        "{} measured runs per column after {} warm-up run(s), columns interleaved; guest memory {} MiB",
        r.options.iterations, r.options.warmup, r.options.memory_mib
    );
    let _ = writeln!(
        s,
        "measured: spawn → first byte read from the VMM's stdout pipe; the guest's first \
         instructions write that byte to COM1, so this bounds process start → first guest \
         instruction from above"
    );
    s.push('\n');
    let _ = writeln!(
        s,
        "{:<18} {:>8} {:>8} {:>8} {:>8} {:>8}   {:>12}",
        "spawn→first byte", "median", "min", "max", "p90", "ok", "spawn→exit"
    );
    for c in &r.columns {
        let f = c.first_byte_ms;
        let cell = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "{:<18} {:>8} {:>8} {:>8} {:>8} {:>8}   {:>12}",
            c.column.name,
            cell(f.map(|f| f.median)),
            cell(f.map(|f| f.min)),
            cell(f.map(|f| f.max)),
            cell(f.map(|f| f.p90)),
            format!("{}/{}", c.ok, c.runs),
            c.total_ms
                .map_or("(killed)".to_string(), |t| format!("{:.2}", t.median)),
        );
    }
    let _ = writeln!(
        s,
        "(ms; spawn→exit is the median of the whole VMM process lifetime)"
    );
    if let Some(x) = r.ratio_firmware {
        let _ = writeln!(
            s,
            "\nratio quantix-vmm/QEMU, same firmware guest, medians of spawn → first byte: {x:.2}"
        );
    }
    for (peer, first, exit) in [
        (
            "Firecracker",
            r.ratio_first_byte_firecracker,
            r.ratio_exit_firecracker,
        ),
        (
            "Cloud Hypervisor",
            r.ratio_first_byte_cloud_hypervisor,
            r.ratio_exit_cloud_hypervisor,
        ),
    ] {
        let cell = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.2}"));
        if first.is_some() || exit.is_some() {
            let _ = writeln!(
                s,
                "ratio quantix-vmm/{peer}, same guest, medians: spawn → first byte {}, spawn → exit {}",
                cell(first),
                cell(exit)
            );
        }
    }
    for (what, best) in [
        ("spawn → first byte", &r.best_first_byte),
        ("spawn → exit", &r.best_exit),
    ] {
        if let Some(b) = best {
            let _ = writeln!(
                s,
                "best against best, {what}: {} {:.2} ms / {} {:.2} ms = {:.2}",
                b.quantix.0, b.quantix.1, b.peer.0, b.peer.1, b.ratio
            );
        }
    }
    for sk in &r.skipped {
        let _ = writeln!(s, "\nskipped {}: {}", sk.name, sk.reason);
    }
    s.push('\n');
    for c in &r.columns {
        let _ = writeln!(
            s,
            "{}: {} — {}",
            c.column.name,
            c.column.guest,
            c.column.argv.join(" ")
        );
        for f in &c.failed {
            let _ = writeln!(s, "  failed {f}");
        }
    }
    s.push('\n');
    s.push_str(&report::format_targets(&r.targets));
    s
}

/// The failures per column (for the exit status decision): columns of quantix-vmm that
/// have no successful run.
pub fn check(r: &FirstInsnResults) -> Result<(), BenchError> {
    let mut empty: BTreeMap<String, String> = BTreeMap::new();
    for c in &r.columns {
        if c.column.vmm == "quantix" && c.ok == 0 {
            empty.insert(c.column.name.clone(), c.failed.join("; "));
        }
    }
    match empty.into_iter().next() {
        Some((vmm, detail)) => Err(BenchError::NoSamples { vmm, detail }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(col: &str, warmup: bool, first: Option<f64>, failure: Option<&str>) -> Measurement {
        Measurement {
            column: col.into(),
            iteration: 1,
            warmup,
            first_byte_ms: first,
            first_byte: Some(b'Q'),
            total_ms: first.map(|f| f + 1.0),
            exit_code: Some(0),
            exit_signal: None,
            failure: failure.map(String::from),
            stderr_tail: None,
        }
    }

    #[test]
    fn summaries_skip_warmups_and_failures() {
        let o = FirstInsnOptions {
            iterations: 3,
            warmup: 1,
            memory_mib: 64,
            vmm_bin: None,
            qemu: "qemu-system-x86_64".into(),
            firecracker: None,
            cloud_hypervisor: None,
            timeout: Duration::from_secs(10),
        };
        let g = Guests {
            elf: Path::new("/e"),
            pvh: Path::new("/p"),
            firmware: Path::new("/f"),
            fc_config: Path::new("/c"),
            fc_log: Path::new("/l"),
            restore: None,
        };
        let cols = columns(&o, Path::new("/v"), &g);
        assert_eq!(cols.len(), 5, "no peer columns without their binaries");
        let with_peers = FirstInsnOptions {
            firecracker: Some("/fc".into()),
            cloud_hypervisor: Some("/ch".into()),
            ..o.clone()
        };
        let peers = columns(&with_peers, Path::new("/v"), &g);
        assert_eq!(
            peers[5].argv,
            ["/fc", "--no-api", "--config-file", "/c", "--log-path", "/l"]
        );
        assert!(peers[5].expect_exit);
        assert_eq!(peers[6].argv[..3], ["/ch", "--kernel", "/p"]);
        let cfg: serde_json::Value =
            serde_json::from_str(&firecracker_config(Path::new("/e"), 64)).unwrap();
        assert_eq!(cfg["machine-config"]["mem_size_mib"], 64);
        assert_eq!(cfg["boot-source"]["kernel_image_path"], "/e");
        assert_eq!(
            cols[0].argv,
            [
                "/v",
                "--kernel",
                "/e",
                "--memory",
                "64",
                "--log-level",
                "warn"
            ]
        );
        assert_eq!(cols[4].argv.last().map(String::as_str), Some("/f"));
        let with_restore = Guests {
            restore: Some((Path::new("/s"), Path::new("/r.json"))),
            ..g
        };
        let r = columns(&o, Path::new("/v"), &with_restore);
        assert_eq!(
            r.len(),
            6,
            "the restore column comes after quantix's and QEMU's boots"
        );
        assert_eq!(r[5].name, QUANTIX_RESTORE);
        assert_eq!(
            r[5].argv[..6],
            ["/v", "--restore", "/s", "--config", "/r.json", "--resume"]
        );
        assert!(cols[4].argv.contains(&"-bios".to_string()));
        let all = [
            m("quantix-elf", true, Some(100.0), None),
            m("quantix-elf", false, Some(5.0), None),
            m("quantix-elf", false, Some(7.0), None),
            m(
                "quantix-elf",
                false,
                None,
                Some("no output from the guest (exit status 4)"),
            ),
            m("qemu-firmware", false, Some(50.0), None),
        ];
        let s = summarize(&cols[0], &all);
        assert_eq!((s.runs, s.ok), (3, 2));
        assert_eq!(s.first_byte_ms.unwrap().median, 6.0);
        assert_eq!(s.total_ms.unwrap().median, 7.0);
        assert_eq!(s.failed.len(), 1);
        let q = summarize(&cols[4], &all);
        assert_eq!(q.first_byte_ms.unwrap().median, 50.0);
        assert!(q.total_ms.is_none());
    }

    #[test]
    fn judging_runs() {
        let mut x = m("c", false, Some(1.0), None);
        assert_eq!(judge(&x, true), None);
        x.exit_code = Some(4);
        assert_eq!(judge(&x, true).as_deref(), Some("exit status 4"));
        assert_eq!(judge(&x, false), None);
        x.first_byte = Some(b'x');
        assert!(judge(&x, false).unwrap().starts_with("first byte was 0x78"));
        x.first_byte = None;
        assert!(judge(&x, false).unwrap().starts_with("no output"));
    }

    #[test]
    fn the_best_quantix_column_is_compared_with_the_best_peer() {
        let col = |name: &str, vmm: &str, exits: bool| Column {
            name: name.into(),
            vmm: vmm.into(),
            guest: String::new(),
            argv: vec![],
            expect_exit: exits,
        };
        let cols = [
            col("quantix-elf", "quantix", true),
            col("quantix-pvh", "quantix", true),
            col("qemu-firmware", "qemu", false),
            col("cloud-hypervisor-pvh", "cloud-hypervisor", true),
        ];
        let all = [
            m("quantix-elf", false, Some(5.0), None),
            m("quantix-pvh", false, Some(4.0), None),
            m("qemu-firmware", false, Some(2.0), None),
            m("cloud-hypervisor-pvh", false, Some(8.0), None),
        ];
        let sums: Vec<ColumnSummary> = cols.iter().map(|c| summarize(c, &all)).collect();
        let first = best_ratio(&sums, |c| c.first_byte_ms.map(|s| s.median)).unwrap();
        assert_eq!(first.quantix, ("quantix-pvh".to_string(), 4.0));
        assert_eq!(first.peer, ("qemu-firmware".to_string(), 2.0));
        assert!((first.ratio - 2.0).abs() < 1e-9);
        // QEMU is killed, so it has no exit time: the best exiting peer is Cloud Hypervisor.
        let exit = best_ratio(&sums, |c| c.total_ms.map(|s| s.median)).unwrap();
        assert_eq!(exit.peer.0, "cloud-hypervisor-pvh");
        assert!((exit.ratio - 5.0 / 9.0).abs() < 1e-9);
        assert!(best_ratio(&sums[..2], |c| c.first_byte_ms.map(|s| s.median)).is_none());
    }
}
