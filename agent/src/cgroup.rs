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
        /// On a hybrid host, the cgroup v2 directory (no controllers) where each VMM also
        /// gets a group: membership only, so that killing the agent's own group (what
        /// systemd does) does not reach the VMMs.
        unified: Option<PathBuf>,
    },
    /// None; why.
    Unavailable(String),
}

const CFS_PERIOD_US: u64 = 100_000;
/// Memory the VMM needs beyond guest RAM (page tables, device buffers, its own heap).
pub const VMM_OVERHEAD_MIB: u64 = 64;

/// A memory limit as the kernel prints it: bytes, or `None` for no limit (`max` in v2, a
/// value near `i64::MAX` in v1).
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 62).then_some(v)
}

/// The cgroup v2 path of this process, from /proc/self/cgroup (`0::/PATH`).
fn own_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| PathBuf::from(p.trim_start_matches('/')))
}

/// The cgroup v2 directory (under `root`, the hierarchy's mount) whose subtree is the
/// agent's, with the agent itself in its `agent` leaf:
///
/// - run by systemd with `Delegate=yes` and `DelegateSubgroup=agent`: the agent is already
///   in `<unit>/agent`, and the base is `<unit>`;
/// - delegated without `DelegateSubgroup` (older systemd, another supervisor): the agent
///   moves itself into `<own>/agent` and the base is `<own>`;
/// - in the root group (run by hand, in a container): `<root>/<name>`, as before.
///
/// VM groups go to `<base>/vms/<id>`: never inside the agent's own group, so that killing
/// every process of that group (systemd's stop, `cgroup.kill`) leaves the VMs running.
pub fn delegated_base(root: &Path, name: &str) -> PathBuf {
    let Some(own) = own_cgroup() else {
        return root.join(name);
    };
    if own.as_os_str().is_empty() {
        return root.join(name);
    }
    if own.file_name().is_some_and(|n| n == "agent") {
        return root.join(own.parent().unwrap_or(Path::new("")));
    }
    let base = root.join(&own);
    let leaf = base.join("agent");
    let moved = std::fs::create_dir_all(&leaf).is_ok()
        && std::fs::write(leaf.join("cgroup.procs"), "0").is_ok();
    if moved {
        tracing::info!(base = %base.display(), "the agent moved itself into its own cgroup leaf; VM groups go beside it");
        base
    } else {
        warn!(
            cgroup = %base.display(),
            "the agent's cgroup is not delegated to it (systemd: Delegate=yes); VM groups go under the hierarchy's root"
        );
        root.join(name)
    }
}

impl Cgroups {
    /// Probes the host and prepares where VM groups go: under the cgroup v2 subtree the
    /// agent was given (see [`delegated_base`]), in `vms/`, beside the agent's own group.
    pub fn detect(name: &str) -> Self {
        let unified = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|p| p.join("cgroup.controllers").exists());
        let base = unified.map(|root| delegated_base(root, name));
        if let (Some(root), Some(base)) = (unified, &base) {
            let has_memory = std::fs::read_to_string(root.join("cgroup.controllers"))
                .map(|c| c.split_whitespace().any(|x| x == "memory"))
                .unwrap_or(false);
            if has_memory {
                let vms = base.join("vms");
                // Controllers are enabled top-down (only a group without processes may
                // pass them on; the agent lives in its own leaf): from the hierarchy's root
                // when the base is the agent's own top-level group, else from the
                // delegated base, whose parent systemd set up.
                let mut ok = std::fs::create_dir_all(&vms).is_ok();
                let mut chain = Vec::new();
                if base.parent() == Some(root) {
                    chain.push(root.to_path_buf());
                }
                chain.push(base.clone());
                chain.push(vms.clone());
                for dir in &chain {
                    ok = ok
                        && std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory")
                            .is_ok();
                    // pids where the kernel has it (a fork bomb in a VMM stops at pids.max).
                    let _ = std::fs::write(dir.join("cgroup.subtree_control"), "+pids");
                }
                if ok {
                    return Cgroups::V2(vms);
                }
                warn!(dir = %vms.display(), "cannot enable the cpu and memory controllers for VM groups");
            }
        }
        let unified_vms = base
            .map(|b| b.join("vms"))
            .filter(|d| std::fs::create_dir_all(d).is_ok());
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
                return Cgroups::V1 {
                    cpu,
                    memory,
                    pids,
                    unified: unified_vms,
                };
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
            Cgroups::V1 {
                cpu,
                memory,
                pids,
                unified,
            } => {
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
                if let Some(u) = unified {
                    let u = u.join(vm_id);
                    mkdir(&u)?;
                    dirs.push(u);
                }
                Ok(dirs)
            }
            Cgroups::Unavailable(why) => Err(why.clone()),
        }
    }

    /// Raises the memory limit of VM `vm_id`'s group by `bytes`, for memory its VMM is
    /// charged for beyond guest RAM: a snapshot written to a memory-backed file system,
    /// whose pages stay charged to the group that wrote them for as long as they exist.
    /// Returns the new limit, or `None` when the group has no limit (or no group).
    pub fn grant_memory(&self, vm_id: &str, bytes: u64) -> Result<Option<u64>, String> {
        let file = match self {
            Cgroups::V2(root) => root.join(vm_id).join("memory.max"),
            Cgroups::V1 { memory, .. } => memory.join(vm_id).join("memory.limit_in_bytes"),
            Cgroups::Unavailable(_) => return Ok(None),
        };
        if !file.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let Some(limit) = parse_limit(&text) else {
            return Ok(None);
        };
        let raised = limit.saturating_add(bytes);
        std::fs::write(&file, raised.to_string())
            .map_err(|e| format!("{} = {raised}: {e}", file.display()))?;
        Ok(Some(raised))
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
            Cgroups::V1 {
                cpu,
                memory,
                pids,
                unified,
            } => {
                let mut v = vec![cpu.join(vm_id), memory.join(vm_id)];
                v.extend(pids.iter().map(|p| p.join(vm_id)));
                v.extend(unified.iter().map(|u| u.join(vm_id)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_as_the_kernel_prints_them() {
        assert_eq!(parse_limit("343932928\n"), Some(343_932_928));
        assert_eq!(parse_limit("max\n"), None);
        // cgroup v1's "unlimited" (a page-aligned i64::MAX).
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit(""), None);
    }

    #[test]
    fn a_grant_raises_the_limit_and_leaves_no_limit_alone() {
        let root = std::env::temp_dir().join(format!("qx-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let groups = Cgroups::V2(root.clone());
        let vm = root.join("vm1");
        std::fs::create_dir_all(&vm).unwrap();
        std::fs::write(vm.join("memory.max"), "1048576\n").unwrap();
        assert_eq!(groups.grant_memory("vm1", 4096), Ok(Some(1_052_672)));
        assert_eq!(
            std::fs::read_to_string(vm.join("memory.max")).unwrap(),
            "1052672"
        );
        std::fs::write(vm.join("memory.max"), "max\n").unwrap();
        assert_eq!(groups.grant_memory("vm1", 4096), Ok(None));
        assert_eq!(
            std::fs::read_to_string(vm.join("memory.max")).unwrap(),
            "max\n"
        );
        // No group (cgroups off for this VM): nothing to raise.
        assert_eq!(groups.grant_memory("vm2", 4096), Ok(None));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
