//! Every VMM in its own jail: a uid of its own from a configured range, its directory as its
//! root, its cgroups from its first instruction, its files as descriptors
//! (`quantix-jailer`, see docs/security.md).

use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use quantix_jailer::{JailSpec, NetNs};

use crate::error::AgentError;
use crate::process;

/// The uids (and gids: each VMM's gid is its uid) VMMs run as.
#[derive(Debug)]
pub struct UidPool {
    base: u32,
    count: u32,
    /// Handed out and not yet released (a VMM that is starting is not in /proc yet).
    taken: Mutex<HashSet<u32>>,
}

impl UidPool {
    /// `count` uids from `base`.
    pub fn new(base: u32, count: u32) -> Self {
        Self {
            base,
            count,
            taken: Mutex::new(HashSet::new()),
        }
    }

    fn in_range(&self, uid: u32) -> bool {
        uid >= self.base && uid - self.base < self.count
    }

    /// A uid of the range that no process on the host runs as and nobody holds.
    pub fn take(&self) -> Result<u32, AgentError> {
        let mut taken = self.taken.lock().unwrap_or_else(|p| p.into_inner());
        let busy: HashSet<u32> = process_uids().filter(|u| self.in_range(*u)).collect();
        let uid = (0..self.count)
            .map(|i| self.base + i)
            .find(|u| !taken.contains(u) && !busy.contains(u))
            .ok_or_else(|| {
                AgentError::ResourceExhausted(format!(
                    "every uid of the VMM range {}..{} is in use (jail_uid_base, jail_uid_count)",
                    self.base,
                    self.base as u64 + self.count as u64
                ))
            })?;
        taken.insert(uid);
        Ok(uid)
    }

    /// Marks `uid` as held (a re-adopted VMM's).
    pub fn hold(&self, uid: u32) {
        if self.in_range(uid) {
            self.taken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(uid);
        }
    }

    /// Gives `uid` back once its VMM has exited.
    pub fn release(&self, uid: u32) {
        self.taken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&uid);
    }
}

/// The real uids of every process on the host.
fn process_uids() -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            name.to_str()?.parse::<u32>().ok()?;
            uid_of_path(&e.path())
        })
}

fn uid_of_path(proc_dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The real uid of process `pid`.
pub fn uid_of(pid: u32) -> Option<u32> {
    uid_of_path(Path::new(&format!("/proc/{pid}")))
}

/// Prepares the jail's directories: `root` (root's, 0711: the VMM may pass through it) and
/// `root/run` (the VMM's, 0700: its sockets, exit record and serial log), emptied of what a
/// previous run left; `root/vsock` as [`prepare_vsock_dir`] makes it. `uid` and `gid` are
/// the VMM's.
pub fn prepare_root(root: &Path, uid: u32, gid: u32) -> Result<PathBuf, AgentError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        AgentError::Internal(format!("jail: cannot {what} {}: {e}", p.display()))
    };
    std::fs::create_dir_all(root).map_err(|e| io("create", root, e))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(|e| io("chmod", root, e))?;
    let run = root.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run).map_err(|e| io("clean", &run, e))?;
    }
    std::fs::create_dir(&run).map_err(|e| io("create", &run, e))?;
    let m = std::fs::symlink_metadata(&run).map_err(|e| io("inspect", &run, e))?;
    if (m.uid(), m.gid()) != (uid, gid) {
        std::os::unix::fs::chown(&run, Some(uid), Some(gid)).map_err(|e| io("chown", &run, e))?;
    }
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("chmod", &run, e))?;
    prepare_vsock_dir(root, gid)?;
    Ok(run)
}

/// Makes `root/vsock` (and `root`, 0711) if missing and gives it to the VMM's group `gid`,
/// mode 0770. The directory outlives a run: host services keep their `vsock.sock_PORT`
/// listeners there, bound as soon as the VM exists. Its group is this run's VMM (uids change
/// between runs), which may create its socket and connect to theirs; nobody else may enter.
pub fn prepare_vsock_dir(root: &Path, gid: u32) -> Result<PathBuf, AgentError> {
    let io = |what: &str, p: &Path, e: std::io::Error| {
        AgentError::Internal(format!("jail: cannot {what} {}: {e}", p.display()))
    };
    if !root.exists() {
        std::fs::create_dir_all(root).map_err(|e| io("create", root, e))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| io("chmod", root, e))?;
    }
    let vsock = root.join("vsock");
    match std::fs::symlink_metadata(&vsock) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::Internal(format!(
                "jail: {} is not a directory",
                vsock.display()
            )))
        }
        Err(_) => std::fs::create_dir(&vsock).map_err(|e| io("create", &vsock, e))?,
    }
    let m = std::fs::symlink_metadata(&vsock).map_err(|e| io("inspect", &vsock, e))?;
    if m.gid() != gid {
        std::os::unix::fs::chown(&vsock, None, Some(gid)).map_err(|e| io("chown", &vsock, e))?;
    }
    std::fs::set_permissions(&vsock, std::fs::Permissions::from_mode(0o770))
        .map_err(|e| io("chmod", &vsock, e))?;
    Ok(vsock)
}

/// What to jail a VMM with.
pub struct JailRequest<'a> {
    /// The VM's id.
    pub id: &'a str,
    /// The jailer binary.
    pub jailer: &'a Path,
    /// The VMM binary.
    pub vmm: &'a Path,
    /// The jail's root directory.
    pub root: &'a Path,
    /// The VMM's uid (and gid).
    pub uid: u32,
    /// Its cgroup directories, prepared with their limits.
    pub cgroups: Vec<PathBuf>,
    /// vCPUs (for the thread limit).
    pub vcpus: u32,
    /// Where the jailer writes the VMM's pid.
    pub pid_file: &'a Path,
}

/// Starts the VMM in its jail with `args` and `files` (descriptors 3...); returns its pid
/// once it runs. The VMM is the agent's child (the jailer clones it with CLONE_PARENT and
/// exits), so the agent waits for it as for an unjailed one.
pub async fn spawn(
    req: JailRequest<'_>,
    args: &[String],
    log: &Path,
    files: Vec<std::fs::File>,
) -> Result<u32, AgentError> {
    let spec = JailSpec {
        id: req.id.to_string(),
        exec: req.vmm.to_path_buf(),
        root: req.root.to_path_buf(),
        uid: req.uid,
        gid: req.uid,
        cgroups: req.cgroups,
        netns: NetNs::New,
        pass_fds: files.len() as i32,
        rlimit_nofile: 4096,
        // Main, control, launcher, serial threads, device workers and block I/O threads,
        // one per vCPU, and room: a VMM that forks or floods threads hits it.
        rlimit_nproc: Some(64 + 2 * u64::from(req.vcpus)),
        rlimit_fsize: None,
        env: Vec::new(),
        detach: true,
        pid_file: Some(req.pid_file.to_path_buf()),
    };
    let _ = std::fs::remove_file(req.pid_file);
    let mut argv: Vec<String> = spec
        .to_args()
        .into_iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    argv.push("--".into());
    argv.push("quantix-vmm".into());
    argv.extend(args.iter().cloned());
    let mut child = process::spawn_child(req.jailer, &argv, log, &files)
        .map_err(|e| AgentError::Internal(format!("cannot run {}: {e}", req.jailer.display())))?;
    drop(files);
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .map_err(|e| AgentError::Internal(format!("jailer: {e}")))?
        .map_err(|e| AgentError::Internal(format!("jailer: {e}")))?;
    if !status.success() {
        let log_tail = process::tail(log, 400);
        return Err(AgentError::Internal(format!(
            "the jail could not be set up ({status}): {log_tail}"
        )));
    }
    let pid = std::fs::read_to_string(req.pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .ok_or_else(|| {
            AgentError::Internal(format!(
                "the jailer did not write the VMM's pid to {}",
                req.pid_file.display()
            ))
        })?;
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_unique_and_skip_busy_ones() {
        // Our own uid (0 when root) is busy: a pool starting there skips it.
        // SAFETY: getuid cannot fail.
        let me = unsafe { libc::getuid() };
        let pool = UidPool::new(me, 3);
        let a = pool.take().unwrap();
        let b = pool.take().unwrap();
        assert_ne!(a, me);
        assert_ne!(a, b);
        assert!(pool.take().is_err(), "the range is spent");
        pool.release(a);
        assert_eq!(pool.take().unwrap(), a);
        pool.hold(b);
        // Far from the agent's default range, which jailed VMMs of other tests use.
        let free = UidPool::new(3_900_000_000, 2);
        free.hold(3_900_000_000);
        assert_eq!(free.take().unwrap(), 3_900_000_001);
    }
}
