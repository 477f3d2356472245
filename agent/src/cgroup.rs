//! Per-VM cgroups with CPU and memory limits, where the host allows.
//!
//! cgroup v2 is used when its `cpu` and `memory` controllers can be enabled under the agent's
//! root; otherwise the v1 `cpu` and `memory` hierarchies. Neither is required: a VM whose
//! cgroup cannot be set up runs without one (logged), and the node reports why.

use std::path::{Path, PathBuf};

use tracing::warn;

/// Which hierarchy the agent uses.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// cgroup v2 under this directory.
    V2(PathBuf),
    /// cgroup v1: the `cpu` and `memory` directories for the agent.
    V1 {
        /// Under the cpu controller.
        cpu: PathBuf,
        /// Under the memory controller.
        memory: PathBuf,
    },
    /// None; why.
    Unavailable(String),
}

const CFS_PERIOD_US: u64 = 100_000;
/// Memory the VMM needs beyond guest RAM (page tables, device buffers, its own heap).
pub const VMM_OVERHEAD_MIB: u64 = 64;

impl Cgroups {
    /// Probes the host and prepares the agent's parent group named `name`.
    pub fn detect(name: &str) -> Self {
        let v2 = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|p| {
                std::fs::read_to_string(p.join("cgroup.controllers"))
                    .map(|c| c.split_whitespace().any(|x| x == "memory"))
                    .unwrap_or(false)
            });
        if let Some(root) = v2 {
            let dir = root.join(name);
            let ok = std::fs::create_dir_all(&dir).is_ok()
                && std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory").is_ok()
                && std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory").is_ok();
            if ok {
                return Cgroups::V2(dir);
            }
        }
        let cpu = Path::new("/sys/fs/cgroup/cpu");
        let memory = Path::new("/sys/fs/cgroup/memory");
        if cpu.join("cgroup.procs").exists() && memory.join("cgroup.procs").exists() {
            let cpu = cpu.join(name);
            let memory = memory.join(name);
            if std::fs::create_dir_all(&cpu).is_ok() && std::fs::create_dir_all(&memory).is_ok() {
                return Cgroups::V1 { cpu, memory };
            }
        }
        Cgroups::Unavailable(
            "no writable cgroup v2 with cpu+memory controllers nor cgroup v1 cpu and memory hierarchies".into(),
        )
    }

    /// ("v1" | "v2" | "", detail) for the node's capabilities.
    pub fn describe(&self) -> (bool, &'static str, String) {
        match self {
            Cgroups::V2(d) => (true, "v2", format!("per-VM groups under {}", d.display())),
            Cgroups::V1 { cpu, memory } => (
                true,
                "v1",
                format!(
                    "per-VM groups under {} and {}",
                    cpu.display(),
                    memory.display()
                ),
            ),
            Cgroups::Unavailable(why) => (false, "", why.clone()),
        }
    }

    /// Creates the VM's group with limits and moves `pid` into it; returns its path, or
    /// an empty string (with a warning) when that cannot be done.
    pub fn place(&self, vm_id: &str, pid: u32, vcpus: u32, memory_mib: u64) -> String {
        let quota = CFS_PERIOD_US * u64::from(vcpus);
        let mem_bytes = (memory_mib + VMM_OVERHEAD_MIB) << 20;
        let result = match self {
            Cgroups::V2(root) => {
                let dir = root.join(vm_id);
                (|| -> std::io::Result<String> {
                    std::fs::create_dir_all(&dir)?;
                    std::fs::write(dir.join("cpu.max"), format!("{quota} {CFS_PERIOD_US}"))?;
                    std::fs::write(dir.join("memory.max"), mem_bytes.to_string())?;
                    std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
                    Ok(dir.display().to_string())
                })()
            }
            Cgroups::V1 { cpu, memory } => {
                let c = cpu.join(vm_id);
                let m = memory.join(vm_id);
                (|| -> std::io::Result<String> {
                    std::fs::create_dir_all(&c)?;
                    std::fs::create_dir_all(&m)?;
                    std::fs::write(c.join("cpu.cfs_period_us"), CFS_PERIOD_US.to_string())?;
                    std::fs::write(c.join("cpu.cfs_quota_us"), quota.to_string())?;
                    std::fs::write(m.join("memory.limit_in_bytes"), mem_bytes.to_string())?;
                    std::fs::write(c.join("cgroup.procs"), pid.to_string())?;
                    std::fs::write(m.join("cgroup.procs"), pid.to_string())?;
                    Ok(format!("{},{}", c.display(), m.display()))
                })()
            }
            Cgroups::Unavailable(_) => return String::new(),
        };
        result.unwrap_or_else(|e| {
            warn!(vm = vm_id, error = %e, "cannot place the VMM in its own cgroup; it runs without limits");
            String::new()
        })
    }

    /// Removes the VM's group (once its VMM has exited).
    pub fn remove(&self, vm_id: &str) {
        let dirs = match self {
            Cgroups::V2(root) => vec![root.join(vm_id)],
            Cgroups::V1 { cpu, memory } => vec![cpu.join(vm_id), memory.join(vm_id)],
            Cgroups::Unavailable(_) => vec![],
        };
        for d in dirs {
            if d.exists() {
                if let Err(e) = std::fs::remove_dir(&d) {
                    warn!(dir = %d.display(), error = %e, "cannot remove a VM's cgroup");
                }
            }
        }
    }
}
