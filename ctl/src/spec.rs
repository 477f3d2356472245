//! `quantixctl create`: a VM spec from flags and/or a YAML or JSON file.

use std::collections::HashMap;
use std::path::PathBuf;

use clap::Args;
use quantix_proto::v1::{BootSource, Console, Disk, Nic, RateLimit, RestartPolicy, VmSpec, Vsock};
use serde::Deserialize;

/// Flags of `create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM id (idempotency key); default: the name.
    #[arg(long)]
    id: Option<String>,
    /// A YAML or JSON spec file (fields as in docs/agent.md).
    #[arg(long, short = 'f', value_name = "FILE")]
    file: Option<PathBuf>,
    /// VM name.
    #[arg(long)]
    name: Option<String>,
    /// vCPUs.
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory: a number of MiB, or with a unit: 512M, 2G (the VMM's syntax).
    #[arg(long, value_name = "SIZE")]
    memory: Option<quantix_vmm_api::MemorySize>,
    /// Kernel path on the node.
    #[arg(long)]
    kernel: Option<String>,
    /// Initramfs path on the node.
    #[arg(long)]
    initramfs: Option<String>,
    /// Kernel command line.
    #[arg(long)]
    cmdline: Option<String>,
    /// Firmware image path on the node, booted from the reset vector instead of a kernel.
    #[arg(long, conflicts_with_all = ["kernel", "initramfs", "cmdline"])]
    firmware: Option<String>,
    /// The virtio entropy device: on (the default) or off.
    #[arg(long, value_name = "on|off", value_parser = ["on", "off"])]
    rng: Option<String>,
    /// Disk: PATH[,readonly][,id=ID][,aio=io_uring|threads][,bw=BYTES/S][,bw_burst=BYTES]
    /// [,iops=N][,iops_burst=N] (repeatable; counts take K, M, G).
    #[arg(long = "disk", value_name = "SPEC")]
    disks: Vec<String>,
    /// NIC: TAP[,mac=MAC][,bw=BYTES/S][,bw_burst=BYTES][,pps=N][,pps_burst=N] (repeatable;
    /// the limits apply to each direction).
    #[arg(long = "nic", value_name = "SPEC")]
    nics: Vec<String>,
    /// A virtio-vsock device with this guest CID (3 or more); its host socket is shown by
    /// `get` (status.vsock_socket).
    #[arg(long, value_name = "CID")]
    vsock_cid: Option<u32>,
    /// Label KEY=VALUE (repeatable).
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// Restart policy: never, on-failure, always.
    #[arg(long, value_parser = ["never", "on-failure", "always"])]
    restart: Option<String>,
    /// Start it once created.
    #[arg(long)]
    start: bool,
}

/// The spec file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SpecFile {
    id: Option<String>,
    name: Option<String>,
    vcpus: Option<u32>,
    memory_mib: Option<u64>,
    kernel: Option<String>,
    initramfs: Option<String>,
    cmdline: Option<String>,
    firmware: Option<String>,
    rng: Option<bool>,
    #[serde(default)]
    disks: Vec<DiskFile>,
    #[serde(default)]
    nics: Vec<NicFile>,
    #[serde(default)]
    labels: HashMap<String, String>,
    restart_policy: Option<String>,
    console_ring_bytes: Option<u32>,
    vsock: Option<VsockFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VsockFile {
    guest_cid: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiskFile {
    path: String,
    #[serde(default)]
    readonly: bool,
    #[serde(default)]
    id: String,
    #[serde(default)]
    rate_limit: Option<RateLimitFile>,
    /// `io_uring` or `threads`.
    #[serde(default)]
    aio: Option<String>,
}

/// The spec's engine for the VMM's `aio=` names.
fn engine(v: &str) -> Result<i32, String> {
    use quantix_proto::v1::DiskEngine;
    match v {
        "io_uring" => Ok(DiskEngine::IoUring as i32),
        "threads" => Ok(DiskEngine::Threads as i32),
        other => Err(format!("aio {other:?}: expected io_uring or threads")),
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    #[serde(default)]
    bytes_per_sec: u64,
    #[serde(default)]
    bytes_burst: u64,
    #[serde(default)]
    ops_per_sec: u64,
    #[serde(default)]
    ops_burst: u64,
}

impl RateLimitFile {
    fn into_proto(self) -> RateLimit {
        RateLimit {
            bytes_per_sec: self.bytes_per_sec,
            bytes_burst: self.bytes_burst,
            ops_per_sec: self.ops_per_sec,
            ops_burst: self.ops_burst,
        }
    }
}

/// A count with an optional K, M or G suffix (powers of 1024), as the VMM reads them.
use quantix_vmm_api::size::parse_count as count;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NicFile {
    tap: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    rate_limit: Option<RateLimitFile>,
}

fn policy(s: &str) -> Result<RestartPolicy, String> {
    match s {
        "never" => Ok(RestartPolicy::Never),
        "on-failure" => Ok(RestartPolicy::OnFailure),
        "always" => Ok(RestartPolicy::Always),
        other => Err(format!(
            "restart policy {other:?}: expected never, on-failure or always"
        )),
    }
}

impl CreateArgs {
    /// (id, spec, start).
    pub fn build(self) -> Result<(String, VmSpec, bool), String> {
        let file: SpecFile = match &self.file {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
                // JSON is YAML too.
                serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => SpecFile::default(),
        };
        let name = self.name.or(file.name).unwrap_or_default();
        let id = self.id.or(file.id).unwrap_or_else(|| name.clone());
        let mut disks: Vec<Disk> = file
            .disks
            .into_iter()
            .map(|d| {
                Ok(Disk {
                    engine: d.aio.as_deref().map(engine).transpose()?.unwrap_or(0),
                    path: d.path,
                    readonly: d.readonly,
                    id: d.id,
                    rate_limit: d.rate_limit.map(RateLimitFile::into_proto),
                })
            })
            .collect::<Result<_, String>>()?;
        for d in self.disks {
            let mut parts = d.split(',');
            let mut disk = Disk {
                path: parts.next().unwrap_or_default().to_string(),
                ..Default::default()
            };
            for p in parts {
                if p == "readonly" {
                    disk.readonly = true;
                } else if let Some(v) = p.strip_prefix("id=") {
                    disk.id = v.to_string();
                } else if let Some(v) = p.strip_prefix("aio=") {
                    disk.engine = engine(v).map_err(|e| format!("--disk {d:?}: {e}"))?;
                } else if let Some((k @ ("bw" | "bw_burst" | "iops" | "iops_burst"), v)) =
                    p.split_once('=')
                {
                    let n = count(v)
                        .ok_or_else(|| format!("--disk {d:?}: {k} takes a count such as 100M"))?;
                    let rl = disk.rate_limit.get_or_insert_with(RateLimit::default);
                    match k {
                        "bw" => rl.bytes_per_sec = n,
                        "bw_burst" => rl.bytes_burst = n,
                        "iops" => rl.ops_per_sec = n,
                        _ => rl.ops_burst = n,
                    }
                } else {
                    return Err(format!("--disk {d:?}: unknown option {p:?}"));
                }
            }
            disks.push(disk);
        }
        let mut nics: Vec<Nic> = file
            .nics
            .into_iter()
            .map(|n| Nic {
                tap: n.tap,
                mac: n.mac,
                rate_limit: n.rate_limit.map(RateLimitFile::into_proto),
            })
            .collect();
        for n in self.nics {
            let mut parts = n.split(',');
            let mut nic = Nic {
                tap: parts.next().unwrap_or_default().to_string(),
                ..Default::default()
            };
            for p in parts {
                let Some((k, v)) = p.split_once('=') else {
                    return Err(format!("--nic {n:?}: unknown option {p:?}"));
                };
                if k == "mac" {
                    nic.mac = v.to_string();
                    continue;
                }
                let n_ = count(v)
                    .ok_or_else(|| format!("--nic {n:?}: {k} takes a count such as 100M"))?;
                let rl = nic.rate_limit.get_or_insert_with(RateLimit::default);
                match k {
                    "bw" => rl.bytes_per_sec = n_,
                    "bw_burst" => rl.bytes_burst = n_,
                    "pps" => rl.ops_per_sec = n_,
                    "pps_burst" => rl.ops_burst = n_,
                    _ => return Err(format!("--nic {n:?}: unknown option {p:?}")),
                }
            }
            nics.push(nic);
        }
        let mut labels = file.labels;
        for l in self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let restart = match self.restart.or(file.restart_policy) {
            Some(p) => policy(&p)?,
            None => RestartPolicy::Never,
        };
        let spec = VmSpec {
            name,
            vcpus: self.cpus.or(file.vcpus).unwrap_or(1),
            memory_mib: self.memory.map(|m| m.0).or(file.memory_mib).unwrap_or(256),
            boot: Some(BootSource {
                kernel: self.kernel.or(file.kernel).unwrap_or_default(),
                initramfs: self.initramfs.or(file.initramfs).unwrap_or_default(),
                cmdline: self.cmdline.or(file.cmdline).unwrap_or_default(),
                firmware: self.firmware.or(file.firmware).unwrap_or_default(),
            }),
            rng: self.rng.map(|r| r == "on").or(file.rng),
            disks,
            nics,
            console: file
                .console_ring_bytes
                .map(|ring_bytes| Console { ring_bytes }),
            labels,
            restart_policy: restart as i32,
            vsock: self
                .vsock_cid
                .or(file.vsock.map(|v| v.guest_cid))
                .map(|guest_cid| Vsock { guest_cid }),
        };
        Ok((id, spec, self.start))
    }
}
