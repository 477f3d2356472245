//! Snapshots through the agent (docs/snapshots.md, "Through the agent"): taken by the VM's
//! VMM into a staging directory inside its jail, moved into the agent's store
//! (`<state>/snapshots/<id>/`, sealed read-only), recorded with their chain; restored by
//! a new VM whose first start links the chain into its own jail and runs `quantix-vmm
//! --restore` with the new VM's configuration.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use quantix_proto::v1::{Snapshot, SnapshotAfter, SnapshotKind};
use quantix_vmm_api::control::{AfterSnapshot, ErrorCode, ReplyError, RunState};

use super::*;

/// The directory inside a VMM's root where it writes a snapshot, and from where a
/// restoring VMM reads its chain (`root/snapshots`).
const STAGE: &str = "snapshots";
/// The longest chain of diffs the agent restores (the VMM's own limit).
const MAX_CHAIN: usize = 64;
/// The copy of a snapshot's record in its directory, from which a lost store is rebuilt.
const RECORD_FILE: &str = "snapshot.pb";

/// Writes `record` into its directory (atomically, read-only).
fn write_record_copy(dir: &Path, record: &Snapshot) -> std::io::Result<()> {
    use prost::Message;
    let tmp = dir.join(".snapshot.pb.tmp");
    std::fs::write(&tmp, record.encode_to_vec())?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o444))?;
    std::fs::rename(&tmp, dir.join(RECORD_FILE))
}

/// Reads the copy back: `None` when missing, too large (over 1 MiB), undecodable or of
/// another snapshot than the directory's name says.
fn read_record_copy(dir: &Path, id: &str) -> Option<Snapshot> {
    use prost::Message;
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(dir.join(RECORD_FILE))
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .ok()?;
    Snapshot::decode(bytes.as_slice())
        .ok()
        .filter(|s| s.id == id)
}

/// How long a VMM may take to write a snapshot of `memory_mib` MiB: 30 s, and 50 ms per
/// MiB (20 MiB/s, a slow disk), at most 30 min.
fn snapshot_limit(memory_mib: u64) -> Duration {
    (Duration::from_secs(30) + Duration::from_millis(memory_mib.saturating_mul(50)))
        .min(Duration::from_secs(30 * 60))
}

/// The VMM's `after` for the API's.
fn after_of(after: i32) -> Result<AfterSnapshot, AgentError> {
    match SnapshotAfter::try_from(after) {
        Ok(SnapshotAfter::Unspecified | SnapshotAfter::Keep) => Ok(AfterSnapshot::Keep),
        Ok(SnapshotAfter::Resume) => Ok(AfterSnapshot::Resume),
        Ok(SnapshotAfter::Pause) => Ok(AfterSnapshot::Pause),
        Ok(SnapshotAfter::Stop) => Ok(AfterSnapshot::Stop),
        Err(_) => Err(AgentError::invalid(
            "after",
            format!("{after} is not a SnapshotAfter value"),
        )),
    }
}

/// Bytes the files of `dir` take on disk.
fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Removes `dir` and what it holds, if it exists.
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A fresh, empty directory `dir` owned by `owner` (uid, gid), mode 0700.
fn fresh_dir(dir: &Path, owner: (u32, u32)) -> Result<(), AgentError> {
    let io = |what: &str, e: std::io::Error| {
        AgentError::Internal(format!("cannot {what} {}: {e}", dir.display()))
    };
    remove_tree(dir).map_err(|e| io("clean", e))?;
    std::fs::create_dir(dir).map_err(|e| io("create", e))?;
    std::os::unix::fs::chown(dir, Some(owner.0), Some(owner.1)).map_err(|e| io("chown", e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| io("chmod", e))
}

/// The agent's own uid and gid.
fn agent_owner() -> (u32, u32) {
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    unsafe { (libc::geteuid(), libc::getegid()) }
}

/// Takes the directory a VMM (uid `vmm_uid`) wrote into `stage` as `name`: `stage` and
/// the directory become the agent's first (so that the VMM can add nothing more), the
/// directory must be a real one and hold only regular files of the VMM with one link
/// each, opened without following links; each is made the agent's and read-only through
/// its handle. Returns the (device, inode) of each file, for [`writers`]. Nothing is
/// followed, so a VMM cannot point the agent at a host file.
fn take_staged(stage: &Path, name: &str, vmm_uid: u32) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::unix::fs::OpenOptionsExt;
    let bad = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let (uid, gid) = agent_owner();
    // `stage`'s parent is the jail root, the agent's: the VMM cannot swap `stage` itself.
    std::os::unix::fs::lchown(stage, Some(uid), Some(gid))?;
    std::fs::set_permissions(stage, std::fs::Permissions::from_mode(0o700))?;
    let dir = stage.join(name);
    let m = std::fs::symlink_metadata(&dir)?;
    if !m.is_dir() || m.uid() != vmm_uid {
        return Err(bad(format!(
            "{} is not a directory the VMM made",
            dir.display()
        )));
    }
    std::os::unix::fs::lchown(&dir, Some(uid), Some(gid))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    let mut inodes = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)?;
        let m = file.metadata()?;
        if !m.is_file() || m.nlink() != 1 || m.uid() != vmm_uid {
            return Err(bad(format!(
                "{} is not a file the VMM wrote (a link, or not a regular file)",
                path.display()
            )));
        }
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o444))?;
        inodes.push((m.dev(), m.ino()));
    }
    Ok(inodes)
}

/// Whether process `pid` can still write to one of `inodes`: a descriptor open for
/// writing, or a shared writable mapping. A VMM that kept one could change a sealed
/// snapshot (and so every copy restored from it) after the agent took it.
fn writers(pid: u32, inodes: &[(u64, u64)]) -> Option<String> {
    use std::os::unix::fs::MetadataExt as _;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    for fd in fds.flatten() {
        let Ok(m) = std::fs::metadata(fd.path()) else {
            continue;
        };
        if !inodes.contains(&(m.dev(), m.ino())) {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            fd.file_name().to_string_lossy()
        ))
        .unwrap_or_default();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(u32::MAX);
        if flags & libc::O_ACCMODE as u32 != libc::O_RDONLY as u32 {
            return Some(format!(
                "descriptor {} is open for writing",
                fd.file_name().to_string_lossy()
            ));
        }
    }
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
    for line in maps.lines() {
        // address perms offset dev inode path
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(perms), Some(ino)) = (f.get(1), f.get(4).and_then(|i| i.parse::<u64>().ok()))
        else {
            continue;
        };
        if perms.contains('w') && perms.contains('s') && inodes.iter().any(|(_, i)| *i == ino) {
            return Some(format!("a shared writable mapping ({line})"));
        }
    }
    None
}

/// Makes `path` durable (a file's data, or a directory's entries).
fn sync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// The spec a snapshot records: the VM's, each card's effective MAC written in.
fn recorded_spec(vm: &Vm, spec: &VmSpec) -> VmSpec {
    let mut spec = spec.clone();
    let macs = vm
        .status
        .as_ref()
        .map(|s| s.nic_macs.clone())
        .unwrap_or_default();
    for (nic, mac) in spec.nics.iter_mut().zip(macs) {
        if nic.mac.is_empty() {
            nic.mac = mac;
        }
    }
    spec
}

/// The spec a restored VM runs with: `given` (or the snapshot's), each card without a MAC
/// given the snapshot's, checked to show the guest what it saw when it was saved.
fn restored_spec(saved: &VmSpec, given: Option<VmSpec>) -> Result<VmSpec, AgentError> {
    let mut spec = given.unwrap_or_else(|| saved.clone());
    let differ = |field: &str, what: String| {
        Err(AgentError::invalid(
            format!("spec.{field}"),
            format!("{what}; a restored guest goes on with the hardware it was saved with"),
        ))
    };
    if spec.vcpus != saved.vcpus {
        return differ(
            "vcpus",
            format!("is {}, the snapshot's VM had {}", spec.vcpus, saved.vcpus),
        );
    }
    if spec.memory_mib != saved.memory_mib {
        return differ(
            "memory_mib",
            format!(
                "is {}, the snapshot's VM had {} MiB",
                spec.memory_mib, saved.memory_mib
            ),
        );
    }
    let firmware = |s: &VmSpec| s.boot.as_ref().is_some_and(|b| !b.firmware.is_empty());
    let cmdline = |s: &VmSpec| {
        s.boot
            .as_ref()
            .map(|b| b.cmdline.clone())
            .unwrap_or_default()
    };
    if firmware(&spec) != firmware(saved) || cmdline(&spec) != cmdline(saved) {
        return differ(
            "boot",
            "boots another way (kernel or firmware, command line) than the snapshot's VM".into(),
        );
    }
    if spec.disks.len() != saved.disks.len() {
        return differ(
            "disks",
            format!(
                "has {} disks, the snapshot's VM had {}",
                spec.disks.len(),
                saved.disks.len()
            ),
        );
    }
    for (i, (d, s)) in spec.disks.iter().zip(&saved.disks).enumerate() {
        if d.id != s.id || d.readonly != s.readonly {
            return differ(
                &format!("disks[{i}]"),
                "differs in its id or read-only flag from the snapshot's".into(),
            );
        }
    }
    if spec.nics.len() != saved.nics.len() {
        return differ(
            "nics",
            format!(
                "has {} cards, the snapshot's VM had {}",
                spec.nics.len(),
                saved.nics.len()
            ),
        );
    }
    // A card without a MAC keeps the snapshot's; another one may be given (a copy beside
    // its original needs its own), which the guest takes when it probes the card again.
    for (n, s) in spec.nics.iter_mut().zip(&saved.nics) {
        if n.mac.is_empty() {
            n.mac = s.mac.clone();
        }
    }
    if has_virtio_console(&spec) != has_virtio_console(saved) {
        return differ("console.virtio", "differs from the snapshot's VM".into());
    }
    if spec.vsock.is_some() != saved.vsock.is_some() {
        return differ(
            "vsock",
            "differs from the snapshot's VM (present or not)".into(),
        );
    }
    if spec.rng.unwrap_or(true) != saved.rng.unwrap_or(true) {
        return differ("rng", "differs from the snapshot's VM".into());
    }
    Ok(spec)
}

/// A snapshot id being taken; released when dropped.
struct Reservation {
    manager: Arc<Manager>,
    id: String,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.manager
            .snapshots_in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// How often a snapshot being written is reported on the Watch stream.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Room for a snapshot's state file beyond its memory, on a memory-backed file system.
const SNAPSHOT_STATE_ROOM_MIB: u64 = 8;

/// Whether `path` is on a file system whose files are memory (tmpfs, ramfs).
fn memory_backed(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a NUL-terminated path and `st` a zeroed statfs the call fills; both
    // outlive the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = st.f_type as i64;
    kind == TMPFS_MAGIC || kind == RAMFS_MAGIC
}

impl Manager {
    /// The store's directory of snapshots.
    fn snapshots_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("snapshots")
    }

    /// One snapshot's directory.
    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(id)
    }

    pub(super) fn snapshot_lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.snapshot_records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// One snapshot's record.
    pub fn get_snapshot(&self, id: &str) -> Result<Snapshot, AgentError> {
        crate::validate::vm_id("snapshot_id", id)?;
        self.store
            .snapshot(id)?
            .ok_or_else(|| AgentError::SnapshotNotFound(id.to_string()))
    }

    /// Snapshots (of `vm_id`, or all), oldest first.
    pub fn list_snapshots(&self, vm_id: &str) -> Result<Vec<Snapshot>, AgentError> {
        if !vm_id.is_empty() {
            crate::validate::vm_id("vm_id", vm_id)?;
        }
        let mut all: Vec<Snapshot> = self
            .store
            .snapshots()?
            .into_iter()
            .filter(|s| vm_id.is_empty() || s.vm_id == vm_id)
            .collect();
        all.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(all)
    }

    /// `snapshot` and the snapshots under it, root (the full one) first; each must be in
    /// the store with its files.
    pub(super) fn chain(&self, snapshot: &Snapshot) -> Result<Vec<Snapshot>, AgentError> {
        let mut chain = vec![snapshot.clone()];
        let mut next = snapshot.parent_id.clone();
        while !next.is_empty() {
            if chain.len() > MAX_CHAIN {
                return Err(AgentError::FailedPrecondition(format!(
                    "snapshot {:?} stands on a chain of more than {MAX_CHAIN} diffs",
                    snapshot.id
                )));
            }
            let parent = self.store.snapshot(&next)?.ok_or_else(|| {
                AgentError::FailedPrecondition(format!(
                    "snapshot {:?} is a diff on {next:?}, which is gone",
                    snapshot.id
                ))
            })?;
            next = parent.parent_id.clone();
            chain.push(parent);
        }
        chain.reverse();
        for s in &chain {
            let dir = self.snapshot_dir(&s.id);
            let real = std::fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir())
                && std::fs::symlink_metadata(dir.join(ctl::SNAPSHOT_STATE_FILE))
                    .is_ok_and(|m| m.is_file());
            if !real {
                return Err(AgentError::FailedPrecondition(format!(
                    "snapshot {:?}: its files are missing from {}",
                    s.id,
                    dir.display()
                )));
            }
        }
        Ok(chain)
    }

    /// Saves a VM as snapshot `snapshot_id`.
    pub async fn snapshot(
        self: &Arc<Self>,
        vm_id: &str,
        snapshot_id: &str,
        diff: bool,
        after: i32,
    ) -> Result<Snapshot, AgentError> {
        crate::validate::vm_id("snapshot_id", snapshot_id)?;
        let after = after_of(after)?;
        let vm = self.load(vm_id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        let mut vm = self.load(vm_id)?;
        let state = state_of(&vm);
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(AgentError::FailedPrecondition(format!(
                "vm_id: VM {vm_id:?} is {}; only a running or paused VM can be snapshotted",
                state_name(state)
            )));
        }
        let Some((pid, mut exited)) = slot.running() else {
            return Err(AgentError::FailedPrecondition(format!(
                "vm_id: VM {vm_id:?} has no VMM process"
            )));
        };
        // The parent is the agent's own record of this VMM's last snapshot, never what the
        // VMM says.
        let base = slot
            .last_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|(p, _)| *p == pid)
            .map(|(_, id)| id);
        if diff && base.is_none() {
            return Err(AgentError::FailedPrecondition(format!(
                "diff: VM {vm_id:?}'s VMM has no snapshot to take a diff on since it started \
                 (or since the agent started): take a full snapshot first"
            )));
        }
        let _reserved = self.reserve_snapshot(snapshot_id)?;
        let spec = spec_of(&vm)?.clone();
        let paths = self.paths(vm_id);
        // The VMM writes where it can: a directory of its own inside its root, owned by
        // the uid it runs as (its run directory's).
        let owner = std::fs::metadata(paths.run())
            .map(|m| (m.uid(), m.gid()))
            .map_err(|e| {
                AgentError::Internal(format!("cannot inspect {}: {e}", paths.run().display()))
            })?;
        let stage = paths.root().join(STAGE);
        fresh_dir(&stage, owner)?;
        if memory_backed(&stage) {
            // tmpfs pages are charged to the group of the process that writes them and
            // cannot be reclaimed: without room for them the kernel kills the VMM halfway
            // through its snapshot. The room stays while the VMM runs (so do the charges).
            let room = (spec.memory_mib + SNAPSHOT_STATE_ROOM_MIB) << 20;
            match self.cgroups.grant_memory(vm_id, room) {
                Ok(Some(limit)) => info!(
                    vm = %vm_id,
                    snapshot = %snapshot_id,
                    limit_mib = limit >> 20,
                    "the snapshot goes to a memory-backed file system: the VM's memory \
                     limit is raised by its size"
                ),
                Ok(None) => {}
                Err(why) => {
                    return Err(AgentError::Internal(format!(
                        "snapshot_id: the state directory is memory-backed and the VM's \
                         memory limit cannot be raised for the snapshot's pages: {why}"
                    )))
                }
            }
        }
        let target = self.snapshot_dir(snapshot_id);
        if target.exists() {
            // No record has this id and nobody else is taking it: left by a crash.
            warn!(dir = %target.display(), "removing a snapshot directory without a record");
            remove_tree(&target).map_err(|e| {
                AgentError::Internal(format!("cannot remove {}: {e}", target.display()))
            })?;
        }
        *slot.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let request = ctl::Request::Snapshot {
            dir: paths.for_vmm(&stage.join(snapshot_id), self.cfg.jail),
            after,
            diff,
        };
        let progress = self.report_progress(
            vm_id,
            snapshot_id,
            state,
            stage.join(snapshot_id).join(ctl::SNAPSHOT_MEMORY_FILE),
            spec.memory_mib << 20,
        );
        let reply = control::call_request::<ctl::SnapshotReply>(
            &paths.api_socket(),
            &request,
            snapshot_limit(spec.memory_mib),
        )
        .await;
        progress.abort();
        let reply = match reply {
            Ok(r) => r,
            Err(e) => {
                let why = format!("snapshot_id: VM {vm_id:?}: snapshot {snapshot_id:?}: {e}");
                return Err(match e {
                    control::ControlError::Reply(ReplyError::Refused { reply, .. })
                        if reply.code == ErrorCode::Conflict =>
                    {
                        AgentError::FailedPrecondition(format!(
                            "{why}; a diff needs a full snapshot taken by this VMM first"
                        ))
                    }
                    // The VMM removed what it had written; the VM runs as before.
                    control::ControlError::Reply(_) => AgentError::Internal(why),
                    // It may still be writing: its directory stays until the next snapshot.
                    // A VMM told to stop may exit yet: that exit was asked for.
                    _ => {
                        if after == AfterSnapshot::Stop {
                            status_mut(&mut vm).state = VmState::Stopping as i32;
                            self.persist(&vm);
                        }
                        AgentError::Unavailable(why)
                    }
                });
            }
        };
        // What the VM does now is recorded first, whatever fails below.
        let now = match reply.state {
            RunState::Running => VmState::Running,
            RunState::Paused => VmState::Paused,
            RunState::Stopping => VmState::Stopping,
        };
        status_mut(&mut vm).state = now as i32;
        self.persist(&vm);
        let taken = self
            .take_snapshot(&vm, &spec, snapshot_id, pid, owner.0, diff, base, &reply)
            .await;
        if now == VmState::Stopping {
            // `after: stop`: the VMM exits once the reply is sent.
            if tokio::time::timeout(VMM_STOP_GRACE, exited.wait_for(|e| e.is_some()))
                .await
                .is_err()
            {
                warn!(vm = %vm_id, pid, "the VMM did not exit after its snapshot; killing it");
                let _ = process::signal(pid, libc::SIGKILL);
            }
            let info = wait_for_exit(&mut exited).await;
            self.record_exit(&slot, &mut vm, info, true)?;
        }
        let (record, flush) = taken?;
        *slot.last_snapshot.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((pid, snapshot_id.to_string()));
        let message = format!(
            "{} snapshot {snapshot_id:?} taken: {} MiB of memory, {} KiB written, paused {} ms, {} ms in all{}",
            if diff { "diff" } else { "full" },
            record.memory_bytes >> 20,
            record.data_bytes >> 10,
            record.paused_ms,
            record.total_ms,
            match &flush {
                Ok(()) => String::new(),
                Err(why) => format!("; {why}"),
            }
        );
        self.events.emit_snapshot(
            vm_id,
            EventKind::SnapshotTaken,
            state_of(&vm),
            snapshot_id,
            message,
        );
        Ok(record)
    }

    /// Until aborted, emits a SNAPSHOT_PROGRESS event every [`PROGRESS_EVERY`]: the
    /// blocks of the memory image the VMM is writing at `image` (looked at, never
    /// followed: the VMM owns that directory).
    fn report_progress(
        self: &Arc<Self>,
        vm_id: &str,
        snapshot_id: &str,
        state: VmState,
        image: PathBuf,
        memory_bytes: u64,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        let (vm_id, snapshot_id) = (vm_id.to_string(), snapshot_id.to_string());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let written = std::fs::symlink_metadata(&image)
                    .ok()
                    .filter(|m| m.is_file())
                    .map_or(0, |m| m.blocks().saturating_mul(512));
                let progress = quantix_proto::v1::SnapshotProgress {
                    written_bytes: written.min(memory_bytes),
                    memory_bytes,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                };
                me.events
                    .emit_progress(&vm_id, state, &snapshot_id, progress);
            }
        })
    }

    /// Reserves a snapshot id no record has and no other call is taking.
    fn reserve_snapshot(self: &Arc<Self>, id: &str) -> Result<Reservation, AgentError> {
        let _records = self.snapshot_lock();
        let mut taking = self
            .snapshots_in_progress
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if taking.contains(id) || self.store.snapshot(id)?.is_some() {
            return Err(AgentError::AlreadyExists(format!(
                "snapshot_id: a snapshot {id:?} already exists"
            )));
        }
        taking.insert(id.to_string());
        Ok(Reservation {
            manager: self.clone(),
            id: id.to_string(),
        })
    }

    /// After the VMM's reply: flushes the disks, takes the staged directory into the store
    /// (checked, sealed, made durable), records it. The staged files are removed on failure.
    #[allow(clippy::too_many_arguments)]
    async fn take_snapshot(
        self: &Arc<Self>,
        vm: &Vm,
        spec: &VmSpec,
        snapshot_id: &str,
        pid: u32,
        vmm_uid: u32,
        diff: bool,
        base: Option<String>,
        reply: &ctl::SnapshotReply,
    ) -> Result<(Snapshot, Result<(), String>), AgentError> {
        // The disks the guest writes to reach stable storage (the VMM drained their queues
        // while the VM was paused).
        let flush = self.flush_disks(spec).await;
        let parent_id = reply.parent.clone().unwrap_or_default();
        let sid = snapshot_id.to_string();
        let fail = move |why: String| AgentError::Internal(format!("snapshot_id: {sid:?}: {why}"));
        if parent_id != base.clone().filter(|_| diff).unwrap_or_default() {
            let _ = remove_tree(&self.paths(&vm.id).root().join(STAGE));
            return Err(fail(format!(
                "the VMM names {parent_id:?} as the parent, the agent expected {:?}",
                base.filter(|_| diff).unwrap_or_default()
            )));
        }
        let me = self.clone();
        let (vm, spec, id, reply) = (
            vm.clone(),
            spec.clone(),
            snapshot_id.to_string(),
            reply.clone(),
        );
        tokio::task::spawn_blocking(move || {
            let stage = me.paths(&vm.id).root().join(STAGE);
            let target = me.snapshot_dir(&id);
            let result = (|| {
                let inodes = take_staged(&stage, &id, vmm_uid)
                    .map_err(|e| fail(format!("taking the VMM's files: {e}")))?;
                if let Some(how) = writers(pid, &inodes) {
                    return Err(fail(format!(
                        "the VMM can still write to its snapshot's files ({how}); refused"
                    )));
                }
                let dir = me.snapshots_dir();
                std::fs::create_dir_all(&dir)
                    .and_then(|()| {
                        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                    })
                    .and_then(|()| std::fs::rename(stage.join(&id), &target))
                    .and_then(|()| sync_path(&dir))
                    .map_err(|e| fail(format!("cannot move it into {}: {e}", target.display())))?;
                let _records = me.snapshot_lock();
                if diff && me.store.snapshot(&parent_id)?.is_none() {
                    return Err(AgentError::FailedPrecondition(format!(
                        "diff: the snapshot the diff applies on ({parent_id:?}) has been \
                         deleted meanwhile; take a full snapshot"
                    )));
                }
                let record = Snapshot {
                    id: id.clone(),
                    vm_id: vm.id.clone(),
                    kind: if diff {
                        SnapshotKind::Diff
                    } else {
                        SnapshotKind::Full
                    } as i32,
                    parent_id: parent_id.clone(),
                    spec: Some(recorded_spec(&vm, &spec)),
                    created_unix_ms: now_ms(),
                    memory_bytes: reply.memory_bytes,
                    data_bytes: reply.data_bytes,
                    disk_bytes: disk_bytes(&target),
                    paused_ms: reply.paused_ms,
                    total_ms: reply.total_ms,
                    directory: target.display().to_string(),
                };
                // The copy first (durable): a crash before the store has it leaves a whole
                // snapshot that recovery takes back.
                write_record_copy(&target, &record)
                    .and_then(|()| sync_path(&target))
                    .map_err(|e| {
                        fail(format!(
                            "cannot write its record into {}: {e}",
                            target.display()
                        ))
                    })?;
                me.store.put_snapshot(&record)?;
                Ok(record)
            })();
            let _ = remove_tree(&stage);
            if result.is_err() {
                let _ = remove_tree(&target);
            }
            result.map(|r| (r, flush))
        })
        .await
        .unwrap_or_else(|e| Err(AgentError::Internal(format!("snapshot: {e}"))))
    }

    /// Flushes every read-write disk of `spec` to stable storage (`fdatasync` of the
    /// image: it covers what the VMM wrote through its own descriptor).
    async fn flush_disks(&self, spec: &VmSpec) -> Result<(), String> {
        let disks: Vec<String> = spec
            .disks
            .iter()
            .filter(|d| !d.readonly)
            .map(|d| d.path.clone())
            .collect();
        let result = tokio::task::spawn_blocking(move || {
            for path in disks {
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|f| f.sync_data())
                    .map_err(|e| format!("cannot flush the disk {path:?}: {e}"))?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("flushing the disks: {e}")));
        if let Err(why) = &result {
            warn!(error = %why, "a disk could not be flushed after a snapshot");
        }
        result
    }

    /// Deletes a snapshot that no diff stands on and no VM waits to restore.
    pub fn delete_snapshot(&self, id: &str) -> Result<(), AgentError> {
        let snapshot = self.get_snapshot(id)?;
        {
            let _records = self.snapshot_lock();
            let children: Vec<String> = self
                .store
                .snapshots()?
                .into_iter()
                .filter(|s| s.parent_id == id)
                .map(|s| s.id)
                .collect();
            if !children.is_empty() {
                return Err(AgentError::FailedPrecondition(format!(
                    "snapshot {id:?} has diffs that stand on it ({}); delete them first",
                    children.join(", ")
                )));
            }
            let waiting: Vec<String> = self
                .with_pending(self.store.all()?)
                .into_iter()
                .filter(|vm| vm.status.as_ref().is_some_and(|s| s.pending_restore == id))
                .map(|vm| vm.id)
                .collect();
            if !waiting.is_empty() {
                return Err(AgentError::FailedPrecondition(format!(
                    "snapshot {id:?} is to be restored by VM {} on its next start; delete the \
                     VM first",
                    waiting.join(", ")
                )));
            }
            // The record's copy, then the record: a crash before the files go leaves a
            // directory without either, which recovery removes.
            let dir = self.snapshot_dir(id);
            if let Err(e) = std::fs::remove_file(dir.join(RECORD_FILE)) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(AgentError::Internal(format!(
                        "snapshot {id:?}: cannot remove {}: {e}",
                        dir.join(RECORD_FILE).display()
                    )));
                }
            }
            self.store.remove_snapshot(id)?;
            // A VMM whose last snapshot this was takes no diff on it: the id may name
            // another snapshot later.
            for slot in self
                .slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
            {
                let mut last = slot.last_snapshot.lock().unwrap_or_else(|p| p.into_inner());
                if last.as_ref().is_some_and(|(_, s)| s == id) {
                    *last = None;
                }
            }
        }
        let dir = self.snapshot_dir(id);
        if let Err(e) = remove_tree(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot remove a deleted snapshot's files; the agent's next start does");
        }
        let state = self
            .load(&snapshot.vm_id)
            .map(|vm| state_of(&vm))
            .unwrap_or(VmState::Unspecified);
        self.events.emit_snapshot(
            &snapshot.vm_id,
            EventKind::SnapshotDeleted,
            state,
            id,
            format!("snapshot {id:?} deleted"),
        );
        Ok(())
    }

    /// Creates VM `vm_id` from a snapshot: its first start restores it.
    pub async fn restore(
        self: &Arc<Self>,
        snapshot_id: &str,
        vm_id: &str,
        spec: Option<VmSpec>,
        start: bool,
        lazy: bool,
    ) -> Result<Vm, AgentError> {
        let snapshot = self.get_snapshot(snapshot_id)?;
        crate::validate::vm_id("vm_id", vm_id)?;
        let saved = snapshot.spec.clone().ok_or_else(|| {
            AgentError::Internal(format!("snapshot {snapshot_id:?} has no spec in the store"))
        })?;
        let spec = restored_spec(&saved, spec)?;
        self.chain(&snapshot)?;
        self.create_from(vm_id, Some(spec), start, Some((snapshot_id, lazy)))
            .await
    }

    /// Links the chain of `snapshot_id` into the VM's root for its VMM to restore (a jailed
    /// VMM sees nothing else), or, unjailed, names it in the store; returns the snapshot's
    /// directory as the VMM sees it.
    pub(super) fn stage_restore(
        &self,
        paths: &VmPaths,
        snapshot_id: &str,
        jail_uid: Option<u32>,
    ) -> Result<String, AgentError> {
        let snapshot = self.get_snapshot(snapshot_id).map_err(|e| match e {
            AgentError::SnapshotNotFound(id) => AgentError::FailedPrecondition(format!(
                "the snapshot {id:?} this VM was to restore is gone; delete the VM"
            )),
            e => e,
        })?;
        let chain = {
            let _records = self.snapshot_lock();
            self.chain(&snapshot)?
        };
        let Some(uid) = jail_uid else {
            return Ok(self.snapshot_dir(snapshot_id).display().to_string());
        };
        let stage = paths.root().join(STAGE);
        fresh_dir(&stage, (uid, uid))?;
        for s in &chain {
            let from = self.snapshot_dir(&s.id);
            let to = stage.join(&s.id);
            let io = |what: &str, p: &Path, e: std::io::Error| {
                AgentError::Internal(format!(
                    "restoring snapshot {snapshot_id:?}: cannot {what} {}: {e}",
                    p.display()
                ))
            };
            fresh_dir(&to, (uid, uid))?;
            for entry in std::fs::read_dir(&from).map_err(|e| io("read", &from, e))? {
                let entry = entry.map_err(|e| io("read", &from, e))?;
                let src = entry.path();
                // Only the regular files the agent sealed: nothing that leads elsewhere.
                let m = std::fs::symlink_metadata(&src).map_err(|e| io("inspect", &src, e))?;
                if !m.is_file() {
                    return Err(AgentError::FailedPrecondition(format!(
                        "snapshot_id: {:?}: {} is not a regular file",
                        s.id,
                        src.display()
                    )));
                }
                let dst = to.join(entry.file_name());
                // A link costs nothing; across file systems (a root elsewhere), a copy.
                if let Err(e) = std::fs::hard_link(&src, &dst) {
                    if e.raw_os_error() != Some(libc::EXDEV) {
                        return Err(io("link", &src, e));
                    }
                    std::fs::copy(&src, &dst).map_err(|e| io("copy", &src, e))?;
                }
            }
        }
        Ok(paths.for_vmm(&stage.join(snapshot_id), true))
    }

    /// Records that a VM's pending restore is done (its VMM answers): the next start
    /// boots. The copy of the record in the VM's directory is rewritten too, so that a
    /// store rebuilt from it does not restore the old snapshot over disks that moved on.
    pub(super) fn finish_restore(&self, vm: &mut Vm, paths: &VmPaths) {
        let st = status_mut(vm);
        st.restored_from = std::mem::take(&mut st.pending_restore);
        st.pending_restore_lazy = false;
        self.unstage_restore(paths);
        if let Err(e) = paths.write_record(vm) {
            warn!(vm = %vm.id, error = %e, "cannot rewrite the VM's record in its directory");
        }
    }

    /// Removes the chain's links from a VM's root once its VMM has restored (it holds the
    /// memory image mapped): a deleted snapshot then frees its space.
    pub(super) fn unstage_restore(&self, paths: &VmPaths) {
        let stage = paths.root().join(STAGE);
        if let Err(e) = remove_tree(&stage) {
            warn!(dir = %stage.display(), error = %e, "cannot remove the restored snapshot's links");
        }
    }

    /// After a restart: a snapshot directory whose record the store lacks is taken back
    /// from the record's copy in it (a store lost or rebuilt), or removed when it has none
    /// (a crash before the snapshot was whole, or a delete cut short); records whose files
    /// are gone are logged (RestoreVm refuses them with the reason).
    pub(super) fn recover_snapshots(&self) -> Result<(), AgentError> {
        let mut records = self.store.snapshots()?;
        let dir = self.snapshots_dir();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if records.iter().any(|s| s.id == name) {
                continue;
            }
            match read_record_copy(&entry.path(), &name) {
                Some(record) => {
                    warn!(snapshot = %name, "took a snapshot's record back from its directory (the store had none)");
                    self.store.put_snapshot(&record)?;
                    records.push(record);
                }
                None => {
                    warn!(dir = %entry.path().display(), "removing a snapshot directory without a record");
                    if let Err(e) = remove_tree(&entry.path()) {
                        warn!(dir = %entry.path().display(), error = %e, "cannot remove it");
                    }
                }
            }
        }
        for s in &records {
            if !self
                .snapshot_dir(&s.id)
                .join(ctl::SNAPSHOT_STATE_FILE)
                .is_file()
            {
                warn!(snapshot = %s.id, "a snapshot's files are missing; it cannot be restored");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantix_proto::v1::{BootSource, Disk, Nic, Vsock};
    use std::os::unix::fs::MetadataExt;

    fn saved() -> VmSpec {
        VmSpec {
            name: "web".into(),
            vcpus: 2,
            memory_mib: 256,
            boot: Some(BootSource {
                kernel: "/images/vmlinux".into(),
                cmdline: "console=ttyS0".into(),
                ..Default::default()
            }),
            disks: vec![Disk {
                path: "/images/a.img".into(),
                id: "root".into(),
                ..Default::default()
            }],
            nics: vec![Nic {
                tap: "qx0".into(),
                mac: "52:54:00:00:00:01".into(),
                ..Default::default()
            }],
            vsock: Some(Vsock { guest_cid: 3 }),
            ..Default::default()
        }
    }

    #[test]
    fn a_restored_spec_keeps_the_guest_side_and_may_change_the_host_side() {
        let s = saved();
        assert_eq!(restored_spec(&s, None).unwrap(), s);
        let mut copy = s.clone();
        copy.name = "web-copy".into();
        copy.nics[0].tap = "qx1".into();
        copy.nics[0].mac.clear();
        copy.disks[0].path = "/images/b.img".into();
        copy.vsock = Some(Vsock { guest_cid: 4 });
        let out = restored_spec(&s, Some(copy)).unwrap();
        assert_eq!(
            out.nics[0].mac, "52:54:00:00:00:01",
            "the saved MAC filled in"
        );
        assert_eq!(out.nics[0].tap, "qx1");
        assert_eq!(out.vsock.unwrap().guest_cid, 4);
        let mut own_mac = s.clone();
        own_mac.nics[0].mac = "52:54:00:00:00:02".into();
        assert_eq!(
            restored_spec(&s, Some(own_mac)).unwrap().nics[0].mac,
            "52:54:00:00:00:02",
            "a copy may get its own MAC"
        );

        let refused = |f: &dyn Fn(&mut VmSpec)| {
            let mut g = s.clone();
            f(&mut g);
            restored_spec(&s, Some(g)).unwrap_err().to_string()
        };
        assert!(refused(&|g| g.vcpus = 1).starts_with("spec.vcpus:"));
        assert!(refused(&|g| g.memory_mib = 512).starts_with("spec.memory_mib:"));
        assert!(refused(&|g| g.nics.clear()).starts_with("spec.nics:"));
        assert!(refused(&|g| g.disks[0].readonly = true).starts_with("spec.disks[0]:"));
        assert!(refused(&|g| g.vsock = None).starts_with("spec.vsock:"));
        assert!(refused(&|g| g.rng = Some(false)).starts_with("spec.rng:"));
        assert!(
            refused(&|g| g.boot.as_mut().unwrap().cmdline = "quiet".into())
                .starts_with("spec.boot:")
        );
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qx-snap-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn staged_files_are_taken_only_as_plain_files_of_the_vmm() {
        let (uid, _) = agent_owner();
        // A good one: sealed read-only, its inodes returned.
        let stage = scratch("good");
        std::fs::create_dir(stage.join("s1")).unwrap();
        std::fs::write(stage.join("s1/vmstate"), b"x").unwrap();
        std::fs::write(stage.join("s1/memory"), b"y").unwrap();
        let inodes = take_staged(&stage, "s1", uid).unwrap();
        assert_eq!(inodes.len(), 2);
        let m = std::fs::metadata(stage.join("s1/memory")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o444);
        // A symlink in place of the directory, to a host directory: refused, untouched.
        let host = scratch("host");
        std::fs::write(host.join("secret"), b"z").unwrap();
        std::fs::set_permissions(host.join("secret"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let stage = scratch("link");
        std::os::unix::fs::symlink(&host, stage.join("s1")).unwrap();
        let e = take_staged(&stage, "s1", uid).unwrap_err();
        assert!(
            e.to_string().contains("not a directory the VMM made"),
            "{e}"
        );
        let m = std::fs::metadata(host.join("secret")).unwrap();
        assert_eq!(
            m.permissions().mode() & 0o777,
            0o600,
            "the host file is untouched"
        );
        // A symlink or a hard link among the files: refused.
        let stage = scratch("file-link");
        std::fs::create_dir(stage.join("s1")).unwrap();
        std::os::unix::fs::symlink(host.join("secret"), stage.join("s1/memory")).unwrap();
        assert!(take_staged(&stage, "s1", uid).is_err());
        let stage = scratch("hard-link");
        std::fs::create_dir(stage.join("s1")).unwrap();
        std::fs::hard_link(host.join("secret"), stage.join("s1/memory")).unwrap();
        let e = take_staged(&stage, "s1", uid).unwrap_err();
        assert!(e.to_string().contains("a link"), "{e}");
        let m = std::fs::metadata(host.join("secret")).unwrap();
        assert_eq!(
            m.permissions().mode() & 0o777,
            0o600,
            "the host file is untouched"
        );
        // Another owner than the VMM's uid: refused.
        let stage = scratch("owner");
        std::fs::create_dir(stage.join("s1")).unwrap();
        assert!(take_staged(&stage, "s1", uid.wrapping_add(1)).is_err());
    }

    #[test]
    fn a_process_that_can_still_write_a_file_is_found() {
        let dir = scratch("writers");
        let path = dir.join("memory");
        std::fs::write(&path, b"x").unwrap();
        let m = std::fs::metadata(&path).unwrap();
        let inode = [(m.dev(), m.ino())];
        let me = std::process::id();
        let reader = std::fs::File::open(&path).unwrap();
        assert_eq!(writers(me, &inode), None, "a reader is no writer");
        let writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        assert!(writers(me, &inode).unwrap().contains("open for writing"));
        drop((reader, writer));
        assert_eq!(writers(me, &inode), None);
    }

    #[test]
    fn after_values_map_and_unknown_ones_are_refused() {
        assert_eq!(after_of(0).unwrap(), AfterSnapshot::Keep);
        assert_eq!(
            after_of(SnapshotAfter::Stop as i32).unwrap(),
            AfterSnapshot::Stop
        );
        assert!(after_of(99).unwrap_err().to_string().starts_with("after:"));
        assert!(snapshot_limit(1 << 20) <= Duration::from_secs(1800));
        assert!(snapshot_limit(256) >= Duration::from_secs(30));
    }

    #[test]
    fn memory_backed_file_systems_are_told_from_others() {
        // Every tmpfs mount of this host is one; procfs and a missing path are not.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
        let tmpfs: Vec<&str> = mounts
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[2] == "tmpfs").then(|| f[1])
            })
            .filter(|m| !m.contains('\\'))
            .collect();
        assert!(!tmpfs.is_empty(), "no tmpfs on this host: {mounts}");
        for m in tmpfs {
            assert!(memory_backed(Path::new(m)), "{m} is a tmpfs");
        }
        assert!(!memory_backed(Path::new("/proc")));
        assert!(!memory_backed(Path::new("/no/such/dir")));
    }
}
