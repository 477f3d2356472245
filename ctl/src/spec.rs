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
    /// A YAML or JSON spec file: a VM as `get -o yaml` prints it, a VmSpec (canonical
    /// proto3 JSON), or the short form of docs/agent.md.
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
    /// A virtio console (the guest's hvc0) besides the serial port; `console --device
    /// virtio` attaches to it.
    #[arg(long)]
    virtio_console: bool,
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
    console_virtio: Option<bool>,
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

fn disk_flag(d: &str) -> Result<Disk, String> {
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
        } else if let Some((k @ ("bw" | "bw_burst" | "iops" | "iops_burst"), v)) = p.split_once('=')
        {
            let n =
                count(v).ok_or_else(|| format!("--disk {d:?}: {k} takes a count such as 100M"))?;
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
    Ok(disk)
}

fn nic_flag(n: &str) -> Result<Nic, String> {
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
        let value =
            count(v).ok_or_else(|| format!("--nic {n:?}: {k} takes a count such as 100M"))?;
        let rl = nic.rate_limit.get_or_insert_with(RateLimit::default);
        match k {
            "bw" => rl.bytes_per_sec = value,
            "bw_burst" => rl.bytes_burst = value,
            "pps" => rl.ops_per_sec = value,
            "pps_burst" => rl.ops_burst = value,
            _ => return Err(format!("--nic {n:?}: unknown option {p:?}")),
        }
    }
    Ok(nic)
}

/// The spec of a VM nobody described: one vCPU, 256 MiB.
fn default_spec() -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_mib: 256,
        boot: Some(BootSource::default()),
        restart_policy: RestartPolicy::Never as i32,
        ..Default::default()
    }
}

impl SpecFile {
    /// The short form as the API's spec (what the file leaves out takes the defaults).
    fn into_spec(self) -> Result<(Option<String>, VmSpec), String> {
        let base = default_spec();
        let disks = self
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
        let nics = self
            .nics
            .into_iter()
            .map(|n| Nic {
                tap: n.tap,
                mac: n.mac,
                rate_limit: n.rate_limit.map(RateLimitFile::into_proto),
            })
            .collect();
        let restart = match self.restart_policy {
            Some(p) => policy(&p)? as i32,
            None => base.restart_policy,
        };
        let spec = VmSpec {
            name: self.name.unwrap_or_default(),
            vcpus: self.vcpus.unwrap_or(base.vcpus),
            memory_mib: self.memory_mib.unwrap_or(base.memory_mib),
            boot: Some(BootSource {
                kernel: self.kernel.unwrap_or_default(),
                initramfs: self.initramfs.unwrap_or_default(),
                cmdline: self.cmdline.unwrap_or_default(),
                firmware: self.firmware.unwrap_or_default(),
            }),
            rng: self.rng,
            disks,
            nics,
            console: (self.console_ring_bytes.is_some() || self.console_virtio.is_some()).then(
                || Console {
                    ring_bytes: self.console_ring_bytes.unwrap_or(0),
                    virtio: self.console_virtio.unwrap_or(false),
                },
            ),
            labels: self.labels,
            restart_policy: restart,
            vsock: self.vsock.map(|v| Vsock {
                guest_cid: v.guest_cid,
            }),
        };
        Ok((self.id, spec))
    }
}

/// Reads a spec file: a VM as `get -o yaml|json` prints it (its `spec` is taken, and its
/// `id` unless `--id` is given), the API's `VmSpec` in the canonical proto3 JSON mapping,
/// or the short form of docs/agent.md. JSON is YAML too.
fn read_spec_file(path: &std::path::Path) -> Result<(Option<String>, VmSpec), String> {
    let at = |e: String| format!("{}: {e}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: serde_json::Value = serde_yaml_ng::from_str(&text).map_err(|e| at(e.to_string()))?;
    if value.get("spec").is_some() {
        let vm: quantix_proto::v1::Vm =
            serde_json::from_value(value).map_err(|e| at(format!("not a VM: {e}")))?;
        let id = (!vm.id.is_empty()).then_some(vm.id);
        return Ok((id, vm.spec.unwrap_or_else(default_spec)));
    }
    match serde_json::from_value::<SpecFile>(value.clone()) {
        Ok(short) => short.into_spec().map_err(at),
        Err(short_err) => match serde_json::from_value::<VmSpec>(value) {
            Ok(spec) => Ok((None, spec)),
            Err(canonical_err) => Err(at(format!(
                "neither the short form ({short_err}) nor a VmSpec ({canonical_err})"
            ))),
        },
    }
}

impl CreateArgs {
    pub fn build(self) -> Result<(String, VmSpec, bool), String> {
        let (file_id, mut spec) = match &self.file {
            Some(p) => read_spec_file(p)?,
            None => (None, default_spec()),
        };
        if let Some(name) = self.name {
            spec.name = name;
        }
        let id = self.id.or(file_id).unwrap_or_else(|| spec.name.clone());
        if let Some(c) = self.cpus {
            spec.vcpus = c;
        }
        if let Some(m) = self.memory {
            spec.memory_mib = m.0;
        }
        let boot = spec.boot.get_or_insert_with(BootSource::default);
        if let Some(v) = self.kernel {
            boot.kernel = v;
        }
        if let Some(v) = self.initramfs {
            boot.initramfs = v;
        }
        if let Some(v) = self.cmdline {
            boot.cmdline = v;
        }
        if let Some(v) = self.firmware {
            boot.firmware = v;
        }
        if let Some(r) = self.rng {
            spec.rng = Some(r == "on");
        }
        for d in self.disks {
            spec.disks.push(disk_flag(&d)?);
        }
        for n in self.nics {
            spec.nics.push(nic_flag(&n)?);
        }
        for l in self.labels {
            let (k, v) = l
                .split_once('=')
                .ok_or_else(|| format!("--label {l:?}: expected KEY=VALUE"))?;
            spec.labels.insert(k.to_string(), v.to_string());
        }
        if let Some(p) = self.restart {
            spec.restart_policy = policy(&p)? as i32;
        }
        if self.virtio_console {
            spec.console.get_or_insert_with(Console::default).virtio = true;
        }
        if let Some(guest_cid) = self.vsock_cid {
            spec.vsock = Some(Vsock { guest_cid });
        }
        Ok((id, spec, self.start))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("qx-ctl-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn a_vm_a_canonical_spec_and_the_short_form_give_the_same_spec() {
        let short = file(
            "short.yaml",
            "id: web\nname: web\nvcpus: 2\nmemory_mib: 512\nkernel: /k\nrestart_policy: on-failure\n\
             disks:\n  - path: /d.img\n    aio: threads\nlabels:\n  tier: front\n",
        );
        let (id, from_short) = read_spec_file(&short).unwrap();
        assert_eq!(id.as_deref(), Some("web"));
        assert_eq!(from_short.vcpus, 2);
        assert_eq!(from_short.restart_policy, RestartPolicy::OnFailure as i32);

        // What `get -o yaml` prints (a VM, its status included) reads back to the spec.
        let vm = quantix_proto::v1::Vm {
            id: "web".into(),
            spec: Some(from_short.clone()),
            status: Some(quantix_proto::v1::VmStatus {
                state: quantix_proto::v1::VmState::Running as i32,
                pid: 42,
                ..Default::default()
            }),
        };
        let yaml = serde_yaml_ng::to_string(&vm).unwrap();
        assert!(yaml.contains("RESTART_POLICY_ON_FAILURE"), "{yaml}");
        assert!(yaml.contains("memory_mib: '512'"), "{yaml}");
        let (id, from_vm) = read_spec_file(&file("vm.yaml", &yaml)).unwrap();
        assert_eq!((id.as_deref(), &from_vm), (Some("web"), &from_short));

        // A VmSpec on its own, as canonical JSON (camelCase names are accepted too).
        let json = serde_json::to_string(&from_short).unwrap();
        let (id, from_spec) = read_spec_file(&file("spec.json", &json)).unwrap();
        assert_eq!((id, &from_spec), (None, &from_short));
        let camel = r#"{"name":"c","memoryMib":"64","boot":{"kernel":"/k"},"restartPolicy":"RESTART_POLICY_ALWAYS"}"#;
        let (_, s) = read_spec_file(&file("camel.json", camel)).unwrap();
        assert_eq!(
            (s.memory_mib, s.restart_policy),
            (64, RestartPolicy::Always as i32)
        );

        // Neither form: both reasons are given.
        let err = read_spec_file(&file("bad.yaml", "vcpus: 1\nbogus: 2\n")).unwrap_err();
        assert!(
            err.contains("short form") && err.contains("VmSpec"),
            "{err}"
        );
        let err = read_spec_file(&file("bad2.yaml", "spec: 7\n")).unwrap_err();
        assert!(err.contains("not a VM"), "{err}");
    }
}
