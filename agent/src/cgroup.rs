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
    /// cgroup v1: the `cpu` and `memory` (and `pids`, when mounted) directories for the
    /// agent.
    V1 {
        /// Under the cpu controller.
        cpu: PathBuf,
        /// Under the memory controller.
        memory: PathBuf,
        /// Under the pids controller.
        pids: Option<PathBuf>,
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
                // pids where the kernel has it (a fork bomb in a VMM stops at pids.max).
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+pids");
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+pids");
                return Cgroups::V2(dir);
            }
        }
        let cpu = Path::new("/sys/fs/cgroup/cpu");
        let memory = Path::new("/sys/fs/cgroup/memory");
        if cpu.join("cgroup.procs").exists() && memory.join("cgroup.procs").exists() {
            let cpu = cpu.join(name);
            let memory = memory.join(name);
            let pids = Path::new("/sys/fs/cgroup/pids")
                .join("cgroup.procs")
                .exists()
                .then(|| Path::new("/sys/fs/cgroup/pids").join(name))
                .filter(|p| std::fs::create_dir_all(p).is_ok());
            if std::fs::create_dir_all(&cpu).is_ok() && std::fs::create_dir_all(&memory).is_ok() {
                return Cgroups::V1 { cpu, memory, pids };
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
            Cgroups::V1 { cpu, memory, .. } => (
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

    /// Creates the VM's groups with their limits (CPU time of `vcpus` CPUs, guest memory
    /// plus the VMM's overhead, `max_pids` tasks) and returns their directories: one for
    /// cgroup v2, one per controller for v1. A VMM runs in them from its first instruction
    /// (the jailer joins them before it executes the VMM).
    pub fn prepare(
        &self,
        vm_id: &str,
        vcpus: u32,
        memory_mib: u64,
        max_pids: u64,
    ) -> Result<Vec<PathBuf>, String> {
        let quota = CFS_PERIOD_US * u64::from(vcpus);
        let mem_bytes = (memory_mib + VMM_OVERHEAD_MIB) << 20;
        let write = |dir: &Path, file: &str, value: String| {
            std::fs::write(dir.join(file), &value)
                .map_err(|e| format!("{}/{file} = {value}: {e}", dir.display()))
        };
        let mkdir = |dir: &Path| {
            std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))
        };
        match self {
            Cgroups::V2(root) => {
                let dir = root.join(vm_id);
                mkdir(&dir)?;
                write(&dir, "cpu.max", format!("{quota} {CFS_PERIOD_US}"))?;
                write(&dir, "memory.max", mem_bytes.to_string())?;
                if dir.join("pids.max").exists() {
                    write(&dir, "pids.max", max_pids.to_string())?;
                }
                Ok(vec![dir])
            }
            Cgroups::V1 { cpu, memory, pids } => {
                let (c, m) = (cpu.join(vm_id), memory.join(vm_id));
                mkdir(&c)?;
                mkdir(&m)?;
                write(&c, "cpu.cfs_period_us", CFS_PERIOD_US.to_string())?;
                write(&c, "cpu.cfs_quota_us", quota.to_string())?;
                write(&m, "memory.limit_in_bytes", mem_bytes.to_string())?;
                let mut dirs = vec![c, m];
                if let Some(p) = pids {
                    let p = p.join(vm_id);
                    mkdir(&p)?;
                    write(&p, "pids.max", max_pids.to_string())?;
                    dirs.push(p);
                }
                Ok(dirs)
            }
            Cgroups::Unavailable(why) => Err(why.clone()),
        }
    }

    /// Moves `pid` into `dirs` (an unjailed VMM, placed right after its start).
    pub fn join(dirs: &[PathBuf], pid: u32) -> Result<(), String> {
        for d in dirs {
            std::fs::write(d.join("cgroup.procs"), pid.to_string())
                .map_err(|e| format!("{}/cgroup.procs: {e}", d.display()))?;
        }
        Ok(())
    }

    /// Removes the VM's group (once its VMM has exited).
    pub fn remove(&self, vm_id: &str) {
        let dirs = match self {
            Cgroups::V2(root) => vec![root.join(vm_id)],
            Cgroups::V1 { cpu, memory, pids } => {
                let mut v = vec![cpu.join(vm_id), memory.join(vm_id)];
                v.extend(pids.iter().map(|p| p.join(vm_id)));
                v
            }
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
