//! The VM manager: the lifecycle of every VM, kept in the store, carried out on VMM
//! processes, and recovered after an agent restart.
//!
//! Each VM has a slot with an async lock that serializes every operation on it (API calls,
//! exit handling, policy restarts). Whoever holds the lock when a VMM exits records it; the
//! exit watcher only records exits nobody else is waiting for.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use quantix_proto::v1::{
    ConsoleDevice, EventKind, ExitInfo, Resources, RestartPolicy, Vm, VmSpec, VmState, VmStatus,
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::console::{Console, Source, DEFAULT_RING_BYTES};
use crate::control;
use crate::error::AgentError;
use crate::events::Events;
use crate::now_ms;
use crate::process::{self, VmPaths, WaitStatus};
use crate::store::Store;
use quantix_hostfs::beneath::ImageDirs;
use quantix_hostfs::lock::LockError;
use quantix_hostfs::Access;
use quantix_vmm_api::control as ctl;

mod snapshot;

/// One file a VM's VMM inherits: which spec field names it, and how it is used.
struct PlannedFile<'a> {
    field: String,
    path: &'a str,
    access: Access,
    /// A kernel or initramfs: a regular file, never a block device.
    regular: bool,
}

/// The files a VM's VMM inherits, in the order it gets them (descriptors 3, 4, ...; its
/// arguments name them `/dev/fd/N`): kernel, initramfs, disks.
fn file_plan(spec: &VmSpec) -> Vec<PlannedFile<'_>> {
    let mut plan = Vec::new();
    if let Some(boot) = spec.boot.as_ref().filter(|b| !b.firmware.is_empty()) {
        plan.push(PlannedFile {
            field: "spec.boot.firmware".into(),
            path: &boot.firmware,
            access: Access::ReadOnly,
            regular: true,
        });
    } else if let Some(boot) = &spec.boot {
        plan.push(PlannedFile {
            field: "spec.boot.kernel".into(),
            path: &boot.kernel,
            access: Access::ReadOnly,
            regular: true,
        });
        if !boot.initramfs.is_empty() {
            plan.push(PlannedFile {
                field: "spec.boot.initramfs".into(),
                path: &boot.initramfs,
                access: Access::ReadOnly,
                regular: true,
            });
        }
    }
    for (i, d) in spec.disks.iter().enumerate() {
        plan.push(PlannedFile {
            field: format!("spec.disks[{i}].path"),
            path: &d.path,
            access: if d.readonly {
                Access::ReadOnly
            } else {
                Access::ReadWrite
            },
            regular: false,
        });
    }
    plan
}

/// The contract's rate limit for a spec's.
pub(crate) fn rate_limit(rl: Option<&quantix_proto::v1::RateLimit>) -> quantix_vmm_api::RateLimit {
    rl.map(|rl| quantix_vmm_api::RateLimit {
        bytes_per_sec: rl.bytes_per_sec,
        bytes_burst: rl.bytes_burst,
        ops_per_sec: rl.ops_per_sec,
        ops_burst: rl.ops_burst,
    })
    .unwrap_or_default()
}

/// A sealed, read-only memfd holding `bytes`, positioned at its start: how the VMM gets its
/// configuration (no file to race on or to rewrite, inside or outside the jail).
fn sealed_memfd(name: &std::ffi::CStr, bytes: &[u8]) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create takes a NUL-terminated name and flags; it returns a new fd or -1.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor that nothing else owns.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    f.seek(std::io::SeekFrom::Start(0))?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: F_ADD_SEALS on a memfd we own, with seal flags.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(f)
}

/// Each card's MAC address: the spec's, or one derived from the VM id and the card's index
/// (the same on every start, so that DHCP leases and firewall rules survive a restart).
fn nic_macs(id: &str, spec: &VmSpec) -> Vec<[u8; 6]> {
    spec.nics
        .iter()
        .enumerate()
        .map(|(i, n)| quantix_vmm_api::mac::parse(&n.mac).unwrap_or_else(|| derived_mac(id, i)))
        .collect()
}

#[cfg(test)]
mod mac_tests {
    use super::*;

    #[test]
    fn derived_macs_are_stable_unicast_and_distinct() {
        let a = derived_mac("vm-1", 0);
        assert_eq!(a, derived_mac("vm-1", 0), "the same on every call");
        // The function is fixed: this value must never change (leases and rules hang on it).
        assert_eq!(quantix_vmm_api::mac::format(&a), "ea:63:ed:4e:3e:a8");
        let mut seen = std::collections::HashSet::new();
        for id in ["vm-1", "vm-2", "vm-10", "a", "b"] {
            for i in 0..4 {
                let m = derived_mac(id, i);
                assert_eq!(m[0] & 0x03, 0x02, "locally administered unicast: {m:02x?}");
                assert!(quantix_vmm_api::mac::parse(&quantix_vmm_api::mac::format(&m)).is_some());
                assert!(seen.insert(m), "{id}/{i} collides");
            }
        }
        let spec = VmSpec {
            nics: vec![
                quantix_proto::v1::Nic {
                    tap: "qx0".into(),
                    mac: "52:54:00:00:00:07".into(),
                    ..Default::default()
                },
                quantix_proto::v1::Nic {
                    tap: "qx1".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let macs = nic_macs("vm-1", &spec);
        assert_eq!(macs[0], [0x52, 0x54, 0, 0, 0, 7], "the spec's wins");
        assert_eq!(macs[1], derived_mac("vm-1", 1));
    }
}

/// A locally administered unicast MAC from the VM id and card index: 46 bits of a hash
/// (FNV-1a 64; a fixed, documented function, so the address never changes with a build).
fn derived_mac(id: &str, index: usize) -> [u8; 6] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "quantix-nic\0"
        .bytes()
        .chain(id.bytes())
        .chain([0])
        .chain((index as u32).to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let b = h.to_be_bytes();
    // Locally administered (bit 1), unicast (bit 0 clear).
    [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]]
}

/// The name the VMM knows the `i`th inherited file by.
fn passed_name(i: usize) -> String {
    format!("/dev/fd/{}", process::FIRST_PASSED_FD as usize + i)
}

/// `text` (a VMM's message) with every `/dev/fd/N` replaced by the path the spec gave, so
/// that errors name the files the client knows.
fn name_passed_files(spec: &VmSpec, text: &str) -> String {
    let plan = file_plan(spec);
    let mut out = text.to_string();
    // Longest names first: /dev/fd/31 before /dev/fd/3.
    for (i, f) in plan.iter().enumerate().rev() {
        out = out.replace(&passed_name(i), f.path);
    }
    out
}

/// A VM's descriptors for its VMM: the files of `file_plan` (opened beneath the image
/// directories and locked), then the KVM device, then the TAPs, in that order.
struct VmFiles {
    files: Vec<std::fs::File>,
    /// The VMM's name of the KVM device.
    kvm: String,
    /// The VMM's names of the TAPs, in `spec.nics` order.
    taps: Vec<String>,
}

/// How long a started VMM may take to answer on its control socket.
const START_PROBE_LIMIT: Duration = Duration::from_secs(10);
/// How long a VMM may take to answer a control request.
const CONTROL_LIMIT: Duration = Duration::from_secs(2);
/// How long a VMM may take to pause or resume (it waits for every vCPU, up to 5 s).
const PAUSE_LIMIT: Duration = Duration::from_secs(10);
/// How long a VMM has to stop in order after its `shutdown` request before it is killed.
const VMM_STOP_GRACE: Duration = Duration::from_secs(5);

/// A VMM process the agent watches.
struct Running {
    pid: u32,
    /// Becomes `Some` when the process has exited.
    exited: watch::Receiver<Option<ExitInfo>>,
    /// Stops the console pump of this process.
    stop_console: watch::Sender<bool>,
}

/// One VM's in-memory companion.
pub struct Slot {
    op: tokio::sync::Mutex<()>,
    console: Arc<Console>,
    /// The virtio console's hub, when the spec has one.
    virtio_console: Option<Arc<Console>>,
    run: Mutex<Option<Running>>,
    /// A policy restart is waiting for its back-off; an API call cancels it.
    pending_restart: AtomicBool,
    /// The last snapshot the running VMM took (its pid and the snapshot's id): the parent
    /// its next diff must name. Unknown after an agent restart (a diff is then refused).
    last_snapshot: Mutex<Option<(u32, String)>>,
}

/// Whether the VM of `spec` has a virtio console besides its serial port.
fn has_virtio_console(spec: &VmSpec) -> bool {
    spec.console.as_ref().is_some_and(|c| c.virtio)
}

impl Slot {
    fn new(spec: &VmSpec) -> Arc<Self> {
        let ring = spec
            .console
            .as_ref()
            .map(|c| c.ring_bytes as usize)
            .filter(|n| *n > 0)
            .unwrap_or(DEFAULT_RING_BYTES);
        let virtio = has_virtio_console(spec);
        Arc::new(Self {
            op: tokio::sync::Mutex::new(()),
            console: Console::new(ring),
            virtio_console: virtio.then(|| Console::new(ring)),
            run: Mutex::new(None),
            pending_restart: AtomicBool::new(false),
            last_snapshot: Mutex::new(None),
        })
    }

    fn running(&self) -> Option<(u32, watch::Receiver<Option<ExitInfo>>)> {
        self.run
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|r| (r.pid, r.exited.clone()))
    }

    fn take_running(&self) -> Option<Running> {
        self.run.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

/// States in which a VM holds a VMM process and commits resources.
pub fn is_active(state: VmState) -> bool {
    matches!(
        state,
        VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
    )
}

fn state_of(vm: &Vm) -> VmState {
    vm.status
        .as_ref()
        .and_then(|s| VmState::try_from(s.state).ok())
        .unwrap_or(VmState::Unspecified)
}

fn status_mut(vm: &mut Vm) -> &mut VmStatus {
    vm.status.get_or_insert_with(VmStatus::default)
}

fn spec_of(vm: &Vm) -> Result<&VmSpec, AgentError> {
    vm.spec
        .as_ref()
        .ok_or_else(|| AgentError::Internal(format!("VM {} has no spec in the store", vm.id)))
}

/// The manager.
pub struct Manager {
    cfg: Config,
    vmm: PathBuf,
    store: Store,
    /// The event bus.
    pub events: Events,
    /// The cgroup setup.
    pub cgroups: Cgroups,
    console_socket: bool,
    /// Where a VM's kernel, initramfs and disks may come from.
    images: ImageDirs,
    /// The jailer.
    jailer: PathBuf,
    /// Uids for jailed VMMs.
    uids: crate::jail::UidPool,
    /// The uid each jailed VMM runs as.
    vm_uids: Mutex<HashMap<String, u32>>,
    /// Records that changed after a side effect (a VMM started or exited) but could not be
    /// written (a full disk): they are the truth until a retry writes them.
    pending: Mutex<HashMap<String, Vm>>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    create_lock: tokio::sync::Mutex<()>,
    /// Held while snapshot records change together with what stands on them (a diff's
    /// parent, a VM to restore).
    snapshot_records: Mutex<()>,
    /// Snapshot ids being taken now (reserved under `snapshot_records`).
    snapshots_in_progress: Mutex<std::collections::HashSet<String>>,
    allocatable: Resources,
}

impl Manager {
    /// Opens the store and prepares the directories; call [`Manager::recover`] next.
    pub fn open(cfg: Config, host: Resources) -> Result<Arc<Self>, AgentError> {
        let vms_dir = cfg.state_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|e| {
            AgentError::Internal(format!("cannot create {}: {e}", vms_dir.display()))
        })?;
        let store_path = cfg.state_dir.join("state.redb");
        let store = Store::open(&store_path).map_err(|e| {
            AgentError::Internal(format!(
                "the state store {} cannot be opened: {e}. If the file is damaged: stop the \
                 agent, move the file aside (mv {0} {0}.broken) and start the agent again; it \
                 rebuilds the records of the VMs from their directories (vms/<id>/vm.pb) and \
                 re-adopts the VMMs that run",
                store_path.display()
            ))
        })?;
        if let Ok(q) = store.quarantined() {
            if !q.is_empty() {
                warn!(records = ?q, "the state store holds quarantined records (table quarantine); their VMs are restored from their directories where they can be");
            }
        }
        if cfg.image_dirs.is_empty() {
            let d = cfg.state_dir.join("images");
            std::fs::create_dir_all(&d)
                .map_err(|e| AgentError::Internal(format!("cannot create {}: {e}", d.display())))?;
        }
        let images = ImageDirs::new(&cfg.image_dirs())
            .map_err(|e| AgentError::Internal(format!("image_dirs: {e}")))?;
        let vmm = cfg.vmm_path();
        let jailer = cfg.jailer_path();
        let uids = crate::jail::UidPool::new(cfg.jail_uid_base, cfg.jail_uid_count);
        let console_socket = match cfg.console {
            crate::config::ConsoleMode::Socket => true,
            crate::config::ConsoleMode::File => false,
            crate::config::ConsoleMode::Auto => process::vmm_has_serial_socket(&vmm),
        };
        let allocatable = Resources {
            vcpus: if cfg.max_vcpus > 0 {
                cfg.max_vcpus
            } else {
                host.vcpus * 4
            },
            memory_mib: if cfg.max_memory_mib > 0 {
                cfg.max_memory_mib
            } else {
                host.memory_mib.saturating_sub(512).max(256)
            },
        };
        let cgroups = Cgroups::detect(&cfg.cgroup_name);
        info!(
            vmm = %vmm.display(),
            console = if console_socket { "socket" } else { "file" },
            cgroups = cgroups.describe().1,
            max_vcpus = allocatable.vcpus,
            max_memory_mib = allocatable.memory_mib,
            "VM manager ready"
        );
        if let Cgroups::Unavailable(why) = &cgroups {
            warn!("VMMs run without cgroup limits: {why}");
        }
        Ok(Arc::new(Self {
            cfg,
            vmm,
            store,
            events: Events::new(),
            cgroups,
            console_socket,
            images,
            jailer,
            uids,
            vm_uids: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            slots: Mutex::new(HashMap::new()),
            create_lock: tokio::sync::Mutex::new(()),
            snapshot_records: Mutex::new(()),
            snapshots_in_progress: Mutex::new(Default::default()),
            allocatable,
        }))
    }

    /// The VMM binary.
    pub fn vmm_binary(&self) -> &std::path::Path {
        &self.vmm
    }

    /// What VMs may commit in total.
    pub fn allocatable(&self) -> Resources {
        self.allocatable
    }

    fn paths(&self, id: &str) -> VmPaths {
        VmPaths {
            dir: self.cfg.state_dir.join("vms").join(id),
        }
    }

    fn slot(&self, id: &str) -> Option<Arc<Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn slot_for(&self, vm: &Vm) -> Result<Arc<Slot>, AgentError> {
        if let Some(s) = self.slot(&vm.id) {
            return Ok(s);
        }
        let slot = Slot::new(spec_of(vm)?);
        Ok(self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(vm.id.clone())
            .or_insert(slot)
            .clone())
    }

    fn load(&self, id: &str) -> Result<Vm, AgentError> {
        crate::validate::vm_id("vm_id", id)?;
        if let Some(vm) = self.pending_record(id) {
            return Ok(vm);
        }
        self.store
            .get(id)?
            .ok_or_else(|| AgentError::NotFound(id.to_string()))
    }

    fn pending_record(&self, id: &str) -> Option<Vm> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// `vms` with the records still waiting to be written in place of the stored ones.
    fn with_pending(&self, mut vms: Vec<Vm>) -> Vec<Vm> {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if !pending.is_empty() {
            for vm in &mut vms {
                if let Some(p) = pending.get(&vm.id) {
                    *vm = p.clone();
                }
            }
        }
        vms
    }

    /// Writes a record whose change already happened (a VMM that started or exited): if the
    /// store cannot take it now (a full disk), the record is kept in memory, served as the
    /// truth, and written by [`Manager::retry_pending_forever`] as soon as the store can.
    fn persist(&self, vm: &Vm) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match self.store.put(vm) {
            Ok(()) => {
                pending.remove(&vm.id);
            }
            Err(e) => {
                if !pending.contains_key(&vm.id) {
                    tracing::error!(vm = %vm.id, error = %e, "cannot write the VM's record (a full disk?); it is kept in memory and written again every 2 s");
                }
                pending.insert(vm.id.clone(), vm.clone());
            }
        }
    }

    /// Every 2 s, writes the records [`Manager::persist`] could not.
    pub async fn retry_pending_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            self.retry_pending();
        }
    }

    /// Writes what it can of the pending records.
    fn retry_pending(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let ids: Vec<String> = pending.keys().cloned().collect();
        for id in ids {
            let Some(vm) = pending.get(&id).cloned() else {
                continue;
            };
            if self.store.put(&vm).is_ok() {
                info!(vm = %id, "the VM's record is written again");
                pending.remove(&id);
            }
        }
    }

    /// How many records wait to be written.
    pub fn pending_records(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Writes the VM's new state and emits an event.
    fn commit(
        &self,
        vm: &mut Vm,
        state: VmState,
        kind: EventKind,
        exit: Option<ExitInfo>,
        message: impl Into<String>,
    ) -> Result<(), AgentError> {
        status_mut(vm).state = state as i32;
        self.persist(vm);
        self.events.emit(&vm.id, kind, state, exit, message);
        Ok(())
    }

    /// The current record of a VM.
    pub fn get(&self, id: &str) -> Result<Vm, AgentError> {
        self.load(id)
    }

    /// A page of VMs.
    pub fn list(
        &self,
        selector: &HashMap<String, String>,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<Vm>, String), AgentError> {
        for (k, v) in selector {
            crate::validate::label(&format!("label_selector[{k:?}]"), k, v)?;
        }
        if page_size > 1000 {
            return Err(AgentError::invalid(
                "page_size",
                format!("must be at most 1000, got {page_size}"),
            ));
        }
        let limit = if page_size == 0 { 100 } else { page_size } as usize;
        let after = if page_token.is_empty() {
            None
        } else {
            crate::validate::vm_id("page_token", page_token)?;
            Some(page_token)
        };
        let (vms, more) = self.store.scan(after, limit, |vm| {
            let labels = vm.spec.as_ref().map(|s| &s.labels);
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })?;
        let next = if more {
            vms.last().map(|v| v.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok((self.with_pending(vms), next))
    }

    /// Every VM (for metrics and the node's totals).
    pub fn all(&self) -> Result<Vec<Vm>, AgentError> {
        Ok(self.with_pending(self.store.all()?))
    }

    /// What active VMs commit now.
    pub fn committed(&self) -> Result<(Resources, u32, u32), AgentError> {
        let all = self.with_pending(self.store.all()?);
        let mut r = Resources::default();
        let mut active = 0;
        for vm in &all {
            if is_active(state_of(vm)) {
                let spec = spec_of(vm)?;
                r.vcpus += spec.vcpus;
                r.memory_mib += spec.memory_mib;
                active += 1;
            }
        }
        Ok((r, all.len() as u32, active))
    }

    /// One of a VM's consoles.
    pub fn console(&self, id: &str, device: ConsoleDevice) -> Result<Arc<Console>, AgentError> {
        let vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        match device {
            ConsoleDevice::Unspecified | ConsoleDevice::Serial => Ok(slot.console.clone()),
            ConsoleDevice::Virtio => slot.virtio_console.clone().ok_or_else(|| {
                AgentError::FailedPrecondition(format!(
                    "VM {id:?} has no virtio console (its spec has no console.virtio)"
                ))
            }),
        }
    }

    /// Whether consoles take input.
    pub fn console_takes_input(&self) -> bool {
        self.console_socket
    }

    // -----------------------------------------------------------------------------------
    // Create and delete

    /// Creates a VM (idempotent on its id); starts it when asked.
    pub async fn create(
        self: &Arc<Self>,
        id: &str,
        spec: Option<VmSpec>,
        start: bool,
    ) -> Result<Vm, AgentError> {
        self.create_from(id, spec, start, None).await
    }

    /// Creates a VM that boots, or (with `restore`, a snapshot id) whose first start
    /// restores that snapshot.
    async fn create_from(
        self: &Arc<Self>,
        id: &str,
        spec: Option<VmSpec>,
        start: bool,
        restore: Option<(&str, bool)>,
    ) -> Result<Vm, AgentError> {
        crate::validate::vm_id("vm_id", id)?;
        let allowed = crate::validate::Allowed {
            images: &self.images,
            tap_prefixes: &self.cfg.tap_prefixes,
        };
        let spec = crate::validate::spec(spec.as_ref(), &allowed)?.clone();
        let guard = self.create_lock.lock().await;
        if let Some(existing) = self.store.get(id)? {
            drop(guard);
            let same_origin = existing.status.as_ref().is_some_and(|s| {
                let from = if s.pending_restore.is_empty() {
                    &s.restored_from
                } else {
                    &s.pending_restore
                };
                from.as_str() == restore.map_or("", |r| r.0)
            });
            if existing.spec.as_ref() == Some(&spec) && same_origin {
                // A retried create-and-start whose start failed (or never happened) starts now.
                if start && state_of(&existing) == VmState::Created {
                    return self.start(id).await;
                }
                return Ok(existing);
            }
            return Err(AgentError::AlreadyExists(format!(
                "vm_id: VM {id:?} already exists with a different spec{}",
                if restore.is_some() { " or origin" } else { "" }
            )));
        }
        let (taken, _) = self.store.scan(None, 1, |vm| {
            vm.spec.as_ref().map(|s| &s.name) == Some(&spec.name)
        })?;
        if let Some(other) = taken.first() {
            return Err(AgentError::AlreadyExists(format!(
                "spec.name: {:?} is already the name of VM {:?}",
                spec.name, other.id
            )));
        }
        // The directory first, then the record: a crash in between leaves a directory without
        // a record, which recovery removes; a retried create reuses it.
        let paths = self.paths(id);
        std::fs::create_dir_all(&paths.dir).map_err(|e| {
            AgentError::Internal(format!("cannot create {}: {e}", paths.dir.display()))
        })?;
        // Host services may bind their listeners for the guest's vsock connections as soon
        // as the VM exists.
        let vsock_socket = match spec.vsock {
            Some(_) => {
                // SAFETY: getegid cannot fail.
                crate::jail::prepare_vsock_dir(&paths.root(), unsafe { libc::getegid() })?;
                paths.vsock_socket().display().to_string()
            }
            None => String::new(),
        };
        let macs = nic_macs(id, &spec)
            .iter()
            .map(quantix_vmm_api::mac::format)
            .collect();
        let vm = Vm {
            id: id.to_string(),
            spec: Some(spec),
            status: Some(VmStatus {
                state: VmState::Created as i32,
                created_unix_ms: now_ms(),
                directory: paths.dir.display().to_string(),
                vsock_socket,
                nic_macs: macs,
                pending_restore: restore.map_or("", |r| r.0).to_string(),
                pending_restore_lazy: restore.is_some_and(|r| r.1),
                ..Default::default()
            }),
        };
        let inserted = match restore {
            // Checked again with the record written under the snapshots' lock: a delete
            // of the snapshot (or of its chain) cannot slip in between.
            Some((snapshot, _)) => {
                let _records = self.snapshot_lock();
                let snap = self
                    .store
                    .snapshot(snapshot)?
                    .ok_or_else(|| AgentError::SnapshotNotFound(snapshot.to_string()))?;
                self.chain(&snap)?;
                self.store.insert_new(&vm)?
            }
            None => self.store.insert_new(&vm)?,
        };
        if let Some(existing) = inserted {
            return Ok(existing);
        }
        // A copy of the record in the VM's directory: a store lost or damaged can be
        // rebuilt from the directories (recovery does).
        if let Err(e) = paths.write_record(&vm) {
            warn!(vm = %id, error = %e, "cannot write the VM's record into its directory");
        }
        drop(guard);
        match restore.map(|r| r.0) {
            Some(snapshot) => self.events.emit_snapshot(
                id,
                EventKind::Created,
                VmState::Created,
                snapshot,
                format!("VM created from snapshot {snapshot:?}; its first start restores it"),
            ),
            None => self
                .events
                .emit(id, EventKind::Created, VmState::Created, None, "VM created"),
        }
        if start {
            return self.start(id).await;
        }
        Ok(vm)
    }

    /// Deletes a VM.
    pub async fn delete(self: &Arc<Self>, id: &str, force: bool) -> Result<(), AgentError> {
        let mut vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        vm = self.load(id)?;
        slot.pending_restart.store(false, Ordering::SeqCst);
        let state = state_of(&vm);
        if is_active(state) && !force {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {id:?} is {}; stop it first or delete with force",
                state_name(state)
            )));
        }
        // The intent first: a crash from here on is finished by recovery.
        status_mut(&mut vm).state = VmState::Deleting as i32;
        self.store.put(&vm)?;
        if slot.running().is_some() {
            self.stop_locked(&slot, &mut vm, Duration::ZERO, true)
                .await?;
        }
        self.finish_delete(id)?;
        Ok(())
    }

    fn finish_delete(&self, id: &str) -> Result<(), AgentError> {
        let paths = self.paths(id);
        if let Some(pid) = process::find_vmm(&paths.api_socket()) {
            let _ = process::signal(pid, libc::SIGKILL);
        }
        self.cgroups.remove(id);
        if paths.dir.exists() {
            std::fs::remove_dir_all(&paths.dir).map_err(|e| {
                AgentError::Internal(format!("cannot remove {}: {e}", paths.dir.display()))
            })?;
        }
        self.store.remove(id)?;
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.events.emit(
            id,
            EventKind::Deleted,
            VmState::Deleting,
            None,
            "VM deleted",
        );
        Ok(())
    }

    // -----------------------------------------------------------------------------------
    // Start

    /// Starts a created or stopped VM.
    pub async fn start(self: &Arc<Self>, id: &str) -> Result<Vm, AgentError> {
        let vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        slot.pending_restart.store(false, Ordering::SeqCst);
        let mut vm = self.load(id)?;
        status_mut(&mut vm).restart_count = 0;
        self.start_locked(&slot, &mut vm).await?;
        Ok(vm)
    }

    /// Opens the VM's kernel, initramfs and disks beneath the image directories and locks
    /// the disks (exclusive when read-write, shared when read-only). The path is checked
    /// again here, not only at create: the files beneath may have changed since.
    fn open_files(&self, spec: &VmSpec) -> Result<VmFiles, AgentError> {
        let mut files = Vec::new();
        for p in file_plan(spec) {
            let f = crate::validate::image(&self.images, &p.field, p.path, p.access, p.regular)?;
            if !p.regular {
                if let Err(e) = quantix_hostfs::lock::lock(&f, p.access) {
                    return Err(match e {
                        LockError::Held(holders) => AgentError::FailedPrecondition(format!(
                            "{}: {:?} is in use by {}; a read-write disk needs the image to \
                             itself, a read-only one shares it only with readers",
                            p.field,
                            p.path,
                            self.describe_holders(&holders)
                        )),
                        LockError::Io(e) => AgentError::Internal(format!(
                            "{}: cannot lock {:?}: {e}",
                            p.field, p.path
                        )),
                    });
                }
            }
            files.push(f);
        }
        let kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .map_err(|e| AgentError::FailedPrecondition(format!("cannot open /dev/kvm: {e}")))?;
        files.push(kvm);
        let kvm = passed_name(files.len() - 1);
        let mut taps = Vec::new();
        for (i, n) in spec.nics.iter().enumerate() {
            let (tap, _) = quantix_hostfs::tap::open(&n.tap)
                .map_err(|e| AgentError::FailedPrecondition(format!("spec.nics[{i}].tap: {e}")))?;
            files.push(tap);
            taps.push(passed_name(files.len() - 1));
        }
        Ok(VmFiles { files, kvm, taps })
    }

    /// Gives a stopped VM's uid back to the pool.
    fn release_uid(&self, id: &str) {
        let uid = self
            .vm_uids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        if let Some(u) = uid {
            self.uids.release(u);
        }
    }

    /// Names lock holders: the VM whose VMM it is, else the process.
    fn describe_holders(&self, holders: &[quantix_hostfs::lock::Holder]) -> String {
        if holders.is_empty() {
            return "another process (not visible to the agent)".into();
        }
        let vms = self.store.all().unwrap_or_default();
        holders
            .iter()
            .map(|h| {
                match vms.iter().find(|v| {
                    v.status
                        .as_ref()
                        .is_some_and(|s| s.pid == h.pid as u32 && s.pid != 0)
                        && crate::manager::is_active(state_of(v))
                }) {
                    Some(vm) => format!("VM {:?} (pid {})", vm.id, h.pid),
                    None => format!("pid {} ({})", h.pid, h.comm),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The VMM's configuration for `spec`: every file, the KVM device and the TAPs by the
    /// descriptors the VMM inherits, its sockets in its run directory.
    fn vmm_config(
        &self,
        id: &str,
        spec: &VmSpec,
        paths: &VmPaths,
        files: &VmFiles,
    ) -> quantix_vmm_api::VmConfig {
        use quantix_vmm_api::{
            BootSource, DiskConfig, EngineKind, NetBackend, NetConfig, SerialMode,
        };
        let jailed = self.cfg.jail;
        let for_vmm = |p: &std::path::Path| std::path::PathBuf::from(paths.for_vmm(p, jailed));
        // Names in file_plan order.
        let mut next = 0;
        let mut name = || {
            next += 1;
            std::path::PathBuf::from(passed_name(next - 1))
        };
        let mut c = quantix_vmm_api::VmConfig::with_kernel("");
        if spec.boot.as_ref().is_some_and(|b| !b.firmware.is_empty()) {
            c.boot = BootSource::Firmware(name());
        } else if let Some(boot) = &spec.boot {
            let kernel = name();
            let initramfs = (!boot.initramfs.is_empty()).then(&mut name);
            c.boot = BootSource::Kernel {
                kernel,
                initramfs,
                cmdline: if boot.cmdline.is_empty() {
                    quantix_vmm_api::limits::DEFAULT_CMDLINE.to_string()
                } else {
                    boot.cmdline.clone()
                },
            };
        }
        c.vcpus = u8::try_from(spec.vcpus).unwrap_or(u8::MAX);
        c.memory = quantix_vmm_api::MemorySize(spec.memory_mib);
        c.serial = if self.console_socket {
            SerialMode::Socket(for_vmm(&paths.serial_socket()))
        } else {
            SerialMode::File(for_vmm(&paths.serial_file()))
        };
        c.console = match has_virtio_console(spec) {
            false => SerialMode::Off,
            true if self.console_socket => SerialMode::Socket(for_vmm(&paths.console_socket())),
            true => SerialMode::File(for_vmm(&paths.console_file())),
        };
        c.disks = spec
            .disks
            .iter()
            .map(|d| DiskConfig {
                path: name(),
                readonly: d.readonly,
                id: (!d.id.is_empty()).then(|| d.id.clone()),
                aio: match quantix_proto::v1::DiskEngine::try_from(d.engine) {
                    Ok(quantix_proto::v1::DiskEngine::Threads) => EngineKind::Threads,
                    _ => EngineKind::IoUring,
                },
                rate_limit: rate_limit(d.rate_limit.as_ref()),
            })
            .collect();
        let macs = nic_macs(id, spec);
        c.nets = spec
            .nics
            .iter()
            .zip(&files.taps)
            .zip(macs)
            .map(|((n, fd), mac)| NetConfig {
                // The agent opened the TAP; the VMM (in its own network namespace when
                // jailed) gets the descriptor.
                backend: NetBackend::Fd(quantix_hostfs::inherit::fd_of(fd.as_ref()).unwrap_or(-1)),
                mac: Some(mac),
                rate_limit: rate_limit(n.rate_limit.as_ref()),
            })
            .collect();
        c.vsock = spec.vsock.as_ref().map(|v| quantix_vmm_api::VsockConfig {
            cid: u64::from(v.guest_cid),
            socket: for_vmm(&paths.vsock_socket()),
        });
        c.rng = spec.rng.unwrap_or(true);
        c.kvm = files.kvm.clone().into();
        c.api_socket = Some(for_vmm(&paths.api_socket()));
        c
    }

    /// The VMM's arguments: its configuration is the descriptor `config_fd` names; with
    /// `restore` (the snapshot directory as the VMM sees it) it restores that snapshot with
    /// the configuration's host side, and runs it.
    /// With `userfaultfd` (the VMM's name of an open /dev/userfaultfd), the restore is
    /// lazy.
    fn vmm_args(
        &self,
        paths: &VmPaths,
        config_fd: &str,
        restore: Option<&str>,
        userfaultfd: Option<&str>,
    ) -> Vec<String> {
        let mut restore = restore
            .map(|dir| vec!["--restore".to_string(), dir.to_string(), "--resume".into()])
            .unwrap_or_default();
        if let (false, Some(fd)) = (restore.is_empty(), userfaultfd) {
            restore.extend(["--lazy".to_string(), "--userfaultfd".into(), fd.into()]);
        }
        restore
            .into_iter()
            .chain([
                "--config".into(),
                config_fd.into(),
                "--exit-file".into(),
                paths.for_vmm(&paths.exit_file(), self.cfg.jail),
                "--log-format".into(),
                "json".into(),
            ])
            .collect()
    }

    async fn start_locked(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        vm: &mut Vm,
    ) -> Result<(), AgentError> {
        let state = state_of(vm);
        if !matches!(state, VmState::Created | VmState::Stopped | VmState::Failed) {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {:?} is {}; only a created, stopped or failed VM can start",
                vm.id,
                state_name(state)
            )));
        }
        let spec = spec_of(vm)?.clone();
        let (committed, _, _) = self.committed()?;
        if committed.vcpus + spec.vcpus > self.allocatable.vcpus {
            return Err(AgentError::ResourceExhausted(format!(
                "spec.vcpus: starting {} vCPUs would commit {} of the node's {} (now {} in use)",
                spec.vcpus,
                committed.vcpus + spec.vcpus,
                self.allocatable.vcpus,
                committed.vcpus
            )));
        }
        if committed.memory_mib + spec.memory_mib > self.allocatable.memory_mib {
            return Err(AgentError::ResourceExhausted(format!(
                "spec.memory_mib: starting {} MiB would commit {} MiB of the node's {} MiB (now {} MiB in use)",
                spec.memory_mib,
                committed.memory_mib + spec.memory_mib,
                self.allocatable.memory_mib,
                committed.memory_mib
            )));
        }
        // Opened and locked before anything changes: a refusal leaves the VM as it was.
        let files = self.open_files(&spec)?;
        let paths = self.paths(&vm.id);
        std::fs::create_dir_all(&paths.dir).map_err(|e| {
            AgentError::Internal(format!("cannot create {}: {e}", paths.dir.display()))
        })?;
        let config = self.vmm_config(&vm.id, &spec, &paths, &files);
        let json = config.to_json();
        // A copy for people; the VMM reads the sealed one.
        if let Err(e) = std::fs::write(paths.vmm_config_file(), &json) {
            warn!(vm = %vm.id, error = %e, "cannot write the VMM configuration's copy");
        }
        let sealed = match sealed_memfd(c"quantix-vmm-config", json.as_bytes()) {
            Ok(f) => f,
            Err(e) => {
                return Err(AgentError::Internal(format!(
                    "cannot hand the VMM its configuration: {e}"
                )))
            }
        };
        let mut files = files;
        files.files.push(sealed);
        let config_fd = passed_name(files.files.len() - 1);
        // A lazy restore's VMM makes its userfaultfd from /dev/userfaultfd, which its jail
        // does not show: the agent opens it (its permission is checked at open).
        let lazy = vm
            .status
            .as_ref()
            .is_some_and(|s| !s.pending_restore.is_empty() && s.pending_restore_lazy);
        let uffd_fd = if lazy {
            let dev = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/userfaultfd")
                .map_err(|e| {
                    AgentError::FailedPrecondition(format!(
                        "a lazy restore needs /dev/userfaultfd (Linux 6.1 or later): {e}"
                    ))
                })?;
            files.files.push(dev);
            Some(passed_name(files.files.len() - 1))
        } else {
            None
        };
        let max_pids = 64 + 2 * u64::from(spec.vcpus);
        let cgroup_dirs = match self.cfg.cgroups {
            crate::config::CgroupMode::Required => self
                .cgroups
                .prepare(&vm.id, spec.vcpus, spec.memory_mib, max_pids)
                .map_err(|why| {
                    AgentError::FailedPrecondition(format!(
                        "cannot give the VM its cgroups ({why}); set cgroups = \"off\" to \
                         run VMs without CPU, memory and task limits"
                    ))
                })?,
            crate::config::CgroupMode::Off => Vec::new(),
        };
        let uid = if self.cfg.jail {
            Some(self.uids.take()?)
        } else {
            None
        };
        if let Err(e) = crate::jail::prepare_root(
            &paths.root(),
            // SAFETY: geteuid cannot fail and touches no memory.
            uid.unwrap_or_else(|| unsafe { libc::geteuid() }),
            // SAFETY: getegid cannot fail and touches no memory.
            uid.unwrap_or_else(|| unsafe { libc::getegid() }),
        ) {
            if let Some(u) = uid {
                self.uids.release(u);
            }
            return Err(e);
        }
        // A VM made by RestoreVm restores its snapshot on its first start.
        let restore = vm
            .status
            .as_ref()
            .map(|s| s.pending_restore.clone())
            .filter(|s| !s.is_empty());
        let restore_dir = match &restore {
            Some(snapshot) => {
                // Links, or copies across file systems (GiBs): off the async threads.
                let (me, staged_paths, snapshot) = (self.clone(), paths.clone(), snapshot.clone());
                let staged = tokio::task::spawn_blocking(move || {
                    me.stage_restore(&staged_paths, &snapshot, uid)
                })
                .await
                .unwrap_or_else(|e| Err(AgentError::Internal(format!("staging: {e}"))));
                match staged {
                    Ok(dir) => Some(dir),
                    Err(e) => {
                        if let Some(u) = uid {
                            self.uids.release(u);
                        }
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        status_mut(vm).state = VmState::Starting as i32;
        status_mut(vm).last_exit = None;
        self.store.put(vm)?;

        let started = Instant::now();
        let args = self.vmm_args(
            &paths,
            &config_fd,
            restore_dir.as_deref(),
            uffd_fd.as_deref(),
        );
        let spawned = match uid {
            Some(uid) => {
                let req = crate::jail::JailRequest {
                    id: &vm.id,
                    jailer: &self.jailer,
                    vmm: &self.vmm,
                    root: &paths.root(),
                    uid,
                    cgroups: cgroup_dirs.clone(),
                    vcpus: spec.vcpus,
                    pid_file: &paths.pid_file(),
                };
                crate::jail::spawn(req, &args, &paths.vmm_log(), files.files).await
            }
            None => {
                let r = process::spawn_detached(&self.vmm, &args, &paths.vmm_log(), &files.files)
                    .map_err(|e| {
                        AgentError::Internal(format!("cannot run {}: {e}", self.vmm.display()))
                    });
                drop(files);
                if let Ok(pid) = &r {
                    if let Err(why) = crate::cgroup::Cgroups::join(&cgroup_dirs, *pid) {
                        let _ = process::signal(*pid, libc::SIGKILL);
                        warn!(vm = %vm.id, error = %why, "cannot place the VMM in its cgroups");
                    }
                }
                r
            }
        };
        // The VMM holds its own descriptors (and with them the locks) from here on.
        let pid = match spawned {
            Ok(pid) => pid,
            Err(e) => {
                if let Some(u) = uid {
                    self.uids.release(u);
                }
                self.cgroups.remove(&vm.id);
                let msg = e.to_string();
                let exit = ExitInfo {
                    reason: "setup-error".into(),
                    exit_code: -1,
                    detail: msg.clone(),
                    at_unix_ms: now_ms(),
                    failure: true,
                    ..Default::default()
                };
                status_mut(vm).last_exit = Some(exit.clone());
                self.commit(vm, VmState::Failed, EventKind::Exited, Some(exit), &msg)?;
                return Err(AgentError::Internal(msg));
            }
        };
        if let Some(u) = uid {
            self.vm_uids
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(vm.id.clone(), u);
        }
        {
            let st = status_mut(vm);
            st.pid = pid;
            st.started_unix_ms = now_ms();
            st.cgroup = cgroup_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(",");
        }
        // The VMM runs: whatever the store says now, it is watched.
        self.persist(vm);
        let mut exited = self.watch(slot, &vm.id, pid, paths.clone())?;

        // Ready once the control socket answers (the VMM binds it before the guest runs).
        let probe = async {
            loop {
                if control::call::<ctl::GetState>(&paths.api_socket(), Duration::from_millis(500))
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
                if exited.borrow().is_some() {
                    return Err(());
                }
                tokio::select! {
                    _ = exited.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
            }
        };
        let ready = tokio::time::timeout(START_PROBE_LIMIT, probe).await;
        if matches!(ready, Ok(Ok(()))) || ran(exited.borrow().as_ref()) {
            if restore.is_some() {
                // Restored: the next start boots (a reboot, a policy restart).
                self.finish_restore(vm, &paths);
            } else {
                status_mut(vm).restored_from.clear();
            }
        }
        match ready {
            Ok(Ok(())) => {
                let message = format!(
                    "VMM pid {pid} running after {} ms{}",
                    started.elapsed().as_millis(),
                    restore
                        .as_ref()
                        .map(|s| format!(", restored from snapshot {s:?}"))
                        .unwrap_or_default()
                );
                status_mut(vm).state = VmState::Running as i32;
                self.persist(vm);
                self.events.emit_snapshot(
                    &vm.id,
                    EventKind::Started,
                    VmState::Running,
                    restore.as_deref().unwrap_or(""),
                    message,
                );
                Ok(())
            }
            Ok(Err(())) if ran(exited.borrow().as_ref()) => {
                // The guest ran and ended before the probe saw it (a guest that powers
                // off at once): the start succeeded; the exit is recorded like any other.
                let info = wait_for_exit(&mut exited).await;
                self.commit(
                    vm,
                    VmState::Running,
                    EventKind::Started,
                    None,
                    format!("VMM pid {pid} ran (and already exited)"),
                )?;
                self.record_exit(slot, vm, info.clone(), false)?;
                self.apply_restart_policy(slot.clone(), vm.clone(), info);
                Ok(())
            }
            other => {
                if other.is_err() {
                    let _ = process::signal(pid, libc::SIGKILL);
                }
                let info = wait_for_exit(&mut exited).await;
                self.record_exit(slot, vm, info, false)?;
                let log = name_passed_files(&spec, &process::tail(&paths.vmm_log(), 600));
                let setup_error = vm
                    .status
                    .as_ref()
                    .and_then(|s| s.last_exit.as_ref())
                    .is_some_and(|e| e.reason == "setup-error");
                // The VMM refused the spec on this node (a kernel it cannot load, a TAP it
                // cannot open): the VM cannot start as it is. Anything else is the agent's.
                let make = if setup_error {
                    AgentError::FailedPrecondition
                } else {
                    AgentError::Internal
                };
                Err(make(format!(
                    "VM {:?}: the VMM did not come up (it exited: {}); its log ends with: {log}",
                    vm.id,
                    vm.status
                        .as_ref()
                        .and_then(|s| s.last_exit.as_ref())
                        .map(|e| format!("{} {}", e.reason, e.detail))
                        .unwrap_or_default()
                )))
            }
        }
    }

    /// Watches a VMM process (started or re-adopted): its exit, and its console.
    fn watch(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        id: &str,
        pid: u32,
        paths: VmPaths,
    ) -> Result<watch::Receiver<Option<ExitInfo>>, AgentError> {
        let (exit_tx, exit_rx) = watch::channel(None);
        let (stop_console, stop_rx) = watch::channel(false);
        let source = |socket: PathBuf, file: PathBuf, endpoint| {
            if self.console_socket {
                Source::Socket {
                    socket,
                    control: Some(paths.api_socket()),
                    endpoint,
                }
            } else {
                Source::File(file)
            }
        };
        slot.console.pump(
            source(paths.serial_socket(), paths.serial_file(), "serial"),
            stop_rx.clone(),
        );
        if let Some(virtio) = &slot.virtio_console {
            virtio.pump(
                source(paths.console_socket(), paths.console_file(), "console"),
                stop_rx,
            );
        }
        *slot.run.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running {
            pid,
            exited: exit_rx.clone(),
            stop_console,
        });
        let pidfd = process::pidfd_open(pid);
        let me = Arc::clone(self);
        let id = id.to_string();
        tokio::spawn(async move {
            let status = match pidfd {
                Ok(fd) => process::wait_exit(pid, fd).await.unwrap_or_else(|e| {
                    warn!(vm = %id, pid, error = %e, "cannot wait for the VMM");
                    WaitStatus::Unknown
                }),
                // Already gone (ESRCH).
                Err(_) => WaitStatus::Unknown,
            };
            let info = process::exit_info(status, &paths.exit_file(), now_ms());
            let _ = exit_tx.send(Some(info.clone()));
            me.on_exit(&id, pid, info).await;
        });
        Ok(exit_rx)
    }

    /// Records how a VMM ended and clears the slot's process.
    fn record_exit(
        &self,
        slot: &Slot,
        vm: &mut Vm,
        info: ExitInfo,
        requested: bool,
    ) -> Result<(), AgentError> {
        let mut info = info;
        if let Some(spec) = &vm.spec {
            info.detail = name_passed_files(spec, &info.detail);
        }
        if let Some(run) = slot.take_running() {
            let _ = run.stop_console.send(true);
        }
        self.cgroups.remove(&vm.id);
        self.release_uid(&vm.id);
        let state = if requested || !info.failure {
            VmState::Stopped
        } else {
            VmState::Failed
        };
        let msg = if requested && info.reason == "poweroff" {
            "guest powered off on request (ACPI power button)".to_string()
        } else if requested {
            format!("VMM stopped on request ({})", info.reason)
        } else {
            format!("VMM exited: {} {}", info.reason, info.detail)
        };
        let st = status_mut(vm);
        st.pid = 0;
        st.last_exit = Some(info.clone());
        self.commit(vm, state, EventKind::Exited, Some(info), msg)
    }

    /// A VMM exited on its own (no API call was waiting for it).
    async fn on_exit(self: &Arc<Self>, id: &str, pid: u32, info: ExitInfo) {
        let Some(slot) = self.slot(id) else { return };
        let op = slot.op.lock().await;
        if slot.running().map(|(p, _)| p) != Some(pid) {
            return; // An API call already recorded it.
        }
        let mut vm = match self.load(id) {
            Ok(vm) => vm,
            Err(e) => {
                warn!(vm = id, error = %e, "VMM exited but its VM cannot be loaded");
                return;
            }
        };
        let stopping = state_of(&vm) == VmState::Stopping;
        if let Err(e) = self.record_exit(&slot, &mut vm, info.clone(), stopping) {
            warn!(vm = id, error = %e, "cannot record a VMM exit");
            return;
        }
        drop(op);
        if !stopping {
            self.apply_restart_policy(slot, vm, info);
        }
    }

    /// Restarts the VM after a back-off if its policy (or a guest reboot) says so.
    fn apply_restart_policy(self: &Arc<Self>, slot: Arc<Slot>, vm: Vm, info: ExitInfo) {
        let policy = vm
            .spec
            .as_ref()
            .and_then(|s| RestartPolicy::try_from(s.restart_policy).ok())
            .unwrap_or(RestartPolicy::Never);
        let restart = info.reason == "reboot"
            || match policy {
                RestartPolicy::Always => true,
                RestartPolicy::OnFailure => info.failure,
                RestartPolicy::Never | RestartPolicy::Unspecified => false,
            };
        if !restart {
            return;
        }
        let started = vm.status.as_ref().map(|s| s.started_unix_ms).unwrap_or(0);
        let ran_ms = info.at_unix_ms.saturating_sub(started);
        // A run this long counts as healthy: the back-off starts over.
        const HEALTHY_RUN_MS: i64 = 30_000;
        let count = if ran_ms >= HEALTHY_RUN_MS {
            0
        } else {
            vm.status.as_ref().map(|s| s.restart_count).unwrap_or(0)
        };
        // A guest's reboot restarts it at once, unless it reboots in a loop: a run shorter
        // than HEALTHY_RUN_MS backs off like a crash, so that a guest cannot make the node
        // spawn VMMs as fast as it can reboot.
        let backoff = if info.reason == "reboot" && (ran_ms >= HEALTHY_RUN_MS || count == 0) {
            Duration::ZERO
        } else {
            let ms = 200u64.saturating_mul(1 << count.min(10));
            Duration::from_millis(ms).min(Duration::from_secs(self.cfg.restart_backoff_max_secs))
        };
        slot.pending_restart.store(true, Ordering::SeqCst);
        self.events.emit(
            &vm.id,
            EventKind::Restarting,
            state_of(&vm),
            Some(info),
            format!(
                "restarting in {} ms (restart {})",
                backoff.as_millis(),
                count + 1
            ),
        );
        let me = Arc::clone(self);
        let id = vm.id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(backoff).await;
            let _op = slot.op.lock().await;
            if !slot.pending_restart.swap(false, Ordering::SeqCst) {
                return; // Cancelled by an API call.
            }
            let mut vm = match me.load(&id) {
                Ok(vm) => vm,
                Err(_) => return,
            };
            status_mut(&mut vm).restart_count = count + 1;
            if let Err(e) = me.start_locked(&slot, &mut vm).await {
                warn!(vm = %id, error = %e, "policy restart failed");
            }
        });
    }

    // -----------------------------------------------------------------------------------
    // Stop, reboot, pause, resume

    /// Stops a VM.
    pub async fn stop(
        self: &Arc<Self>,
        id: &str,
        timeout: Duration,
        force: bool,
    ) -> Result<Vm, AgentError> {
        let vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        let mut vm = self.load(id)?;
        if slot.pending_restart.swap(false, Ordering::SeqCst) {
            self.events.emit(
                id,
                EventKind::Stopping,
                state_of(&vm),
                None,
                "pending policy restart cancelled",
            );
            return Ok(vm);
        }
        self.stop_locked(&slot, &mut vm, timeout, force).await?;
        Ok(vm)
    }

    async fn stop_locked(
        &self,
        slot: &Slot,
        vm: &mut Vm,
        timeout: Duration,
        force: bool,
    ) -> Result<(), AgentError> {
        let state = state_of(vm);
        let Some((pid, mut exited)) = slot.running() else {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {:?} is {}; it is not running",
                vm.id,
                state_name(state)
            )));
        };
        let was_paused = state == VmState::Paused;
        if state != VmState::Deleting {
            self.commit(
                vm,
                VmState::Stopping,
                EventKind::Stopping,
                None,
                if force { "killing the VMM" } else { "stopping" },
            )?;
        }
        let paths = self.paths(&vm.id);
        if was_paused && !force {
            // The guest must run to hear the power button.
            if let Err(e) = control::call::<ctl::Resume>(&paths.api_socket(), CONTROL_LIMIT).await {
                warn!(vm = %vm.id, error = %e, "cannot resume the paused VM before stopping it");
            }
        }
        if !force {
            // First ask the guest: press its ACPI power button and give it `timeout` to
            // power itself off. A guest that never enabled the button (no ACPI) is not
            // waited for.
            let asked =
                match control::call::<ctl::PressPowerButton>(&paths.api_socket(), CONTROL_LIMIT)
                    .await
                {
                    Ok(reply) => reply.guest_enabled,
                    Err(e) => {
                        warn!(vm = %vm.id, error = %e, "cannot press the guest's power button");
                        false
                    }
                };
            let guest_stopped = asked
                && tokio::time::timeout(timeout, exited.wait_for(|e| e.is_some()))
                    .await
                    .is_ok();
            if asked && !guest_stopped {
                warn!(vm = %vm.id, ?timeout, "the guest did not power off in time; stopping its VMM");
            }
            // Then stop the VMM in order (its vCPUs stop, its devices flush), and kill it
            // if even that does not end it.
            if !guest_stopped {
                if let Err(e) =
                    control::call::<ctl::Shutdown>(&paths.api_socket(), CONTROL_LIMIT).await
                {
                    warn!(vm = %vm.id, error = %e, "no orderly stop through the control socket; sending SIGTERM");
                    let _ = process::signal(pid, libc::SIGTERM);
                }
                if tokio::time::timeout(VMM_STOP_GRACE, exited.wait_for(|e| e.is_some()))
                    .await
                    .is_err()
                {
                    warn!(vm = %vm.id, pid, grace = ?VMM_STOP_GRACE, "the VMM did not stop in time; killing it");
                }
            }
        }
        if exited.borrow().is_none() {
            let _ = process::signal(pid, libc::SIGKILL);
        }
        let info = wait_for_exit(&mut exited).await;
        let deleting = state == VmState::Deleting;
        if deleting {
            if let Some(run) = slot.take_running() {
                let _ = run.stop_console.send(true);
            }
            return Ok(());
        }
        self.record_exit(slot, vm, info, true)
    }

    /// Reboots a VM: a new VMM process with the same spec.
    pub async fn reboot(self: &Arc<Self>, id: &str) -> Result<Vm, AgentError> {
        let vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        let mut vm = self.load(id)?;
        let state = state_of(&vm);
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {id:?} is {}; only a running or paused VM can reboot",
                state_name(state)
            )));
        }
        self.stop_locked(
            &slot,
            &mut vm,
            Duration::from_secs(self.cfg.stop_timeout_secs),
            false,
        )
        .await?;
        self.start_locked(&slot, &mut vm).await?;
        Ok(vm)
    }

    /// Pauses (true) or resumes (false) a VM through its VMM's control socket: the VMM
    /// parks its vCPUs and devices and keeps the guest's clock still while paused.
    pub async fn pause(self: &Arc<Self>, id: &str, pause: bool) -> Result<Vm, AgentError> {
        let vm = self.load(id)?;
        let slot = self.slot_for(&vm)?;
        let _op = slot.op.lock().await;
        let mut vm = self.load(id)?;
        let state = state_of(&vm);
        let (from, to, op, kind) = if pause {
            (
                VmState::Running,
                VmState::Paused,
                "pause",
                EventKind::Paused,
            )
        } else {
            (
                VmState::Paused,
                VmState::Running,
                "resume",
                EventKind::Resumed,
            )
        };
        if state != from {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {id:?} is {}; {op} needs a {} VM",
                state_name(state),
                state_name(from)
            )));
        }
        if slot.running().is_none() {
            return Err(AgentError::FailedPrecondition(format!(
                "VM {id:?} has no VMM process"
            )));
        }
        // The VMM answers once every vCPU has stopped (or started again).
        let socket = self.paths(id).api_socket();
        let reply = if pause {
            control::call::<ctl::Pause>(&socket, PAUSE_LIMIT).await
        } else {
            control::call::<ctl::Resume>(&socket, PAUSE_LIMIT).await
        };
        reply.map_err(|e| {
            let why = format!("cannot {op} VM {id:?}: {e}");
            match e {
                // Not reached or no answer in time: the VMM may be busy; a retry may pass.
                control::ControlError::Connect { .. }
                | control::ControlError::Timeout { .. }
                | control::ControlError::NoReply { .. } => AgentError::Unavailable(why),
                // The VMM refused or failed it: its reason is in the message.
                _ => AgentError::Internal(why),
            }
        })?;
        self.commit(
            &mut vm,
            to,
            kind,
            None,
            if pause { "VM paused" } else { "VM resumed" },
        )?;
        Ok(vm)
    }

    // -----------------------------------------------------------------------------------
    // Recovery

    /// Every 10 s, rotates the logs of active VMs that grew past `log_max_bytes` (a guest
    /// that fills its serial log, or a VMM that logs too much, fills no disk).
    pub async fn rotate_logs_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tick.tick().await;
            let Ok(vms) = self.store.all() else {
                continue;
            };
            for vm in vms.iter().filter(|v| is_active(state_of(v))) {
                let paths = self.paths(&vm.id);
                for log in [paths.vmm_log(), paths.serial_file(), paths.console_file()] {
                    match process::rotate_if_larger(&log, self.cfg.log_max_bytes) {
                        Ok(true) => info!(vm = %vm.id, log = %log.display(), "log rotated"),
                        Ok(false) => {}
                        Err(e) => {
                            warn!(vm = %vm.id, log = %log.display(), error = %e, "cannot rotate a log")
                        }
                    }
                }
            }
        }
    }

    /// Brings the agent back in line with the world after a (re)start: finishes interrupted
    /// deletes, removes directories without a record, re-adopts running VMMs and reports the
    /// ones that died meanwhile.
    pub async fn recover(self: &Arc<Self>) -> Result<(), AgentError> {
        self.recover_snapshots()?;
        let known: std::collections::HashSet<String> =
            self.store.all()?.iter().map(|v| v.id.clone()).collect();
        if let Ok(entries) = std::fs::read_dir(self.cfg.state_dir.join("vms")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if !known.contains(&name) {
                    // A record lost with the store (or quarantined): rebuilt from the copy in
                    // the directory, and its VMM re-adopted below.
                    if let Some(mut vm) = self.paths(&name).read_record().filter(|v| v.id == name) {
                        let st = status_mut(&mut vm);
                        st.state = VmState::Stopped as i32;
                        st.pid = 0;
                        self.store.put(&vm)?;
                        warn!(vm = %name, "restored a VM's record from its directory (the store had none)");
                        continue;
                    }
                    warn!(dir = %e.path().display(), "removing a VM directory without a record (interrupted create)");
                    if let Some(pid) = process::find_vmm(&self.paths(&name).api_socket()) {
                        let _ = process::signal(pid, libc::SIGKILL);
                    }
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        for mut vm in self.store.all()? {
            let id = vm.id.clone();
            let state = state_of(&vm);
            if state == VmState::Deleting {
                info!(vm = %id, "finishing an interrupted delete");
                self.finish_delete(&id)?;
                continue;
            }
            let slot = self.slot_for(&vm)?;
            let _op = slot.op.lock().await;
            let paths = self.paths(&id);
            match process::find_vmm(&paths.api_socket()) {
                Some(pid) => {
                    if let Some(uid) = crate::jail::uid_of(pid).filter(|u| *u != 0) {
                        self.uids.hold(uid);
                        self.vm_uids
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.clone(), uid);
                    }
                    let api_socket = paths.api_socket();
                    self.watch(&slot, &id, pid, paths)?;
                    let paused = matches!(
                        control::call::<ctl::GetState>(&api_socket, CONTROL_LIMIT).await,
                        Ok(v) if v.state == ctl::RunState::Paused
                    );
                    let new_state = match (state, paused) {
                        (VmState::Stopping, _) => {
                            // A stop was under way: finish it.
                            let _ = process::signal(pid, libc::SIGKILL);
                            VmState::Stopping
                        }
                        (_, true) => VmState::Paused,
                        _ => VmState::Running,
                    };
                    status_mut(&mut vm).pid = pid;
                    // A VMM that answers restored its snapshot (it binds its socket only
                    // after): the restore is done, the next start boots.
                    if !vm
                        .status
                        .as_ref()
                        .is_none_or(|s| s.pending_restore.is_empty())
                    {
                        self.finish_restore(&mut vm, &self.paths(&id));
                    }
                    self.commit(
                        &mut vm,
                        new_state,
                        EventKind::Adopted,
                        None,
                        format!("re-adopted VMM pid {pid}"),
                    )?;
                }
                None if is_active(state) => {
                    let mut info =
                        process::exit_info(WaitStatus::Unknown, &paths.exit_file(), now_ms());
                    if info.reason == "killed" {
                        info.reason = "lost".into();
                        info.detail = "the VMM died while the agent was down and left no exit record (killed)".into();
                    }
                    let requested = state == VmState::Stopping;
                    let new_state = if requested || !info.failure {
                        VmState::Stopped
                    } else {
                        VmState::Failed
                    };
                    let st = status_mut(&mut vm);
                    st.pid = 0;
                    st.last_exit = Some(info.clone());
                    self.cgroups.remove(&id);
                    self.commit(
                        &mut vm,
                        new_state,
                        EventKind::Lost,
                        Some(info.clone()),
                        format!("the VMM is gone: {} {}", info.reason, info.detail),
                    )?;
                    if !requested {
                        self.apply_restart_policy(slot.clone(), vm, info);
                    }
                }
                None => {}
            }
        }
        Ok(())
    }
}

/// Whether an exit says the VM ran (as opposed to failing to set up).
fn ran(info: Option<&ExitInfo>) -> bool {
    info.is_some_and(|i| i.reason != "setup-error" && i.exit_code >= 0 && i.signal == 0)
}

async fn wait_for_exit(exited: &mut watch::Receiver<Option<ExitInfo>>) -> ExitInfo {
    match exited.wait_for(|e| e.is_some()).await {
        Ok(v) => v.clone().unwrap_or_default(),
        Err(_) => ExitInfo {
            reason: "lost".into(),
            detail: "the exit watcher ended".into(),
            exit_code: -1,
            failure: true,
            at_unix_ms: now_ms(),
            ..Default::default()
        },
    }
}

/// A state's name for messages ("running").
pub fn state_name(s: VmState) -> String {
    s.as_str_name()
        .trim_start_matches("VM_STATE_")
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_the_store_cannot_take_stay_the_truth_until_written() {
        let dir = std::env::temp_dir().join(format!("qx-pending-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Config {
            state_dir: dir.clone(),
            cgroups: crate::config::CgroupMode::Off,
            vmm_binary: "/bin/true".into(),
            ..Config::default()
        };
        let m = Manager::open(
            cfg,
            Resources {
                vcpus: 4,
                memory_mib: 1024,
            },
        )
        .unwrap();
        let mut vm = Vm {
            id: "p1".into(),
            spec: Some(VmSpec {
                name: "p1".into(),
                ..Default::default()
            }),
            status: Some(VmStatus {
                state: VmState::Running as i32,
                ..Default::default()
            }),
        };
        m.store.put(&vm).unwrap();
        // The VMM exits while the disk is full.
        m.store.fail_writes.store(true, Ordering::Relaxed);
        status_mut(&mut vm).state = VmState::Stopped as i32;
        m.persist(&vm);
        assert_eq!(m.pending_records(), 1);
        assert_eq!(
            state_of(&m.load("p1").unwrap()),
            VmState::Stopped,
            "memory is the truth"
        );
        assert_eq!(state_of(&m.all().unwrap()[0]), VmState::Stopped);
        assert_eq!(
            state_of(&m.store.get("p1").unwrap().unwrap()),
            VmState::Running,
            "the store is behind"
        );
        m.retry_pending();
        assert_eq!(m.pending_records(), 1, "still full");
        m.store.fail_writes.store(false, Ordering::Relaxed);
        m.retry_pending();
        assert_eq!(m.pending_records(), 0);
        assert_eq!(
            state_of(&m.store.get("p1").unwrap().unwrap()),
            VmState::Stopped
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
