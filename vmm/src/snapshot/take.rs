//! Taking a snapshot of a running VM: pause, save every vCPU on its own thread, the
//! VM-wide KVM state and every device, write the memory image, write the state file
//! last (a directory without `vmstate` is not a snapshot), then resume, stay paused, or
//! stop, as asked.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kvm_ioctls::VmFd;
use quantix_vmm_api::VmConfig;
use tracing::{info, warn};

use super::{file, memory, SnapshotError, SnapshotState, VmState, MEMORY_FILE, STATE_FILE};
use crate::cpu::state::{check_xsave_size, VcpuState};
use crate::cpu::PauseGate;
use crate::device_manager::DeviceManager;
use crate::memory::GuestRam;
use crate::pause::{Pauser, VCPU_JOB_LIMIT};

/// What a snapshot saves of the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// All of it. Turns dirty tracking on: the next snapshot may be a diff.
    Full,
    /// Only the pages written since the previous snapshot of this process (full or diff),
    /// which becomes its parent.
    Diff,
}

/// What a snapshot measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Taken {
    /// vCPUs saved.
    pub vcpus: u8,
    /// Size of the memory image (its apparent size), bytes.
    pub memory_bytes: u64,
    /// Non-zero pages written, bytes.
    pub data_bytes: u64,
    /// How long the guest was paused for the snapshot, ms (0 when it was paused before).
    pub paused_ms: u64,
    /// How long writing took, ms.
    pub total_ms: u64,
    /// For a diff: the name of the snapshot it applies on.
    pub parent: Option<String>,
}

/// The state of a paused VM besides its memory.
pub struct Captured {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// Every device, in attach order.
    pub devices: Vec<crate::device_manager::SavedDevice>,
}

/// Everything a snapshot reads from a VM.
pub struct Snapshotter {
    gate: Arc<PauseGate>,
    pauser: Arc<Pauser>,
    devices: Arc<DeviceManager>,
    vm: Arc<VmFd>,
    ram: GuestRam,
    config: VmConfig,
    pit: bool,
    msrs: Vec<u32>,
    xsave2_size: usize,
    /// The last snapshot's directory, since which KVM's dirty log and the device record
    /// hold every written page; `None` until a full snapshot (or after a failed diff,
    /// which consumed the record).
    base: std::sync::Mutex<Option<(std::path::PathBuf, u64)>>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").finish_non_exhaustive()
    }
}

/// The parts of a VM a [`Snapshotter`] needs.
pub struct Parts {
    /// The vCPUs' pause gate.
    pub gate: Arc<PauseGate>,
    /// Pause and resume.
    pub pauser: Arc<Pauser>,
    /// The devices.
    pub devices: Arc<DeviceManager>,
    /// The KVM VM.
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub ram: GuestRam,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Whether the VM has a PIT.
    pub pit: bool,
    /// The MSRs to save (the host's `KVM_GET_MSR_INDEX_LIST`).
    pub msrs: Vec<u32>,
    /// `KVM_CAP_XSAVE2`'s size, 0 without the capability.
    pub xsave2_size: usize,
}

impl Snapshotter {
    /// A snapshotter over a VM's parts.
    pub fn new(p: Parts) -> Self {
        Self {
            gate: p.gate,
            pauser: p.pauser,
            devices: p.devices,
            vm: p.vm,
            ram: p.ram,
            config: p.config,
            pit: p.pit,
            msrs: p.msrs,
            xsave2_size: p.xsave2_size,
            base: std::sync::Mutex::new(None),
        }
    }

    /// The base of the next diff: its directory and its state body's checksum.
    fn base(&self) -> std::sync::MutexGuard<'_, Option<(std::path::PathBuf, u64)>> {
        self.base.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Saves the VM into `dir`, a directory that does not exist yet (its parent does).
    /// The VM is paused for the snapshot and left paused; the caller resumes or stops it.
    /// On failure the directory is removed and the VM's state is unchanged (a VM that was
    /// running before is resumed).
    pub fn take(
        &self,
        dir: &Path,
        kind: Kind,
        progress: impl FnMut(u64, u64),
    ) -> Result<Taken, SnapshotError> {
        check_xsave_size(self.xsave2_size)?;
        // Absolute, so that a diff's record of its parent means the same later (and
        // because the filtered main thread may not ask for its working directory).
        if !dir.is_absolute() {
            return Err(SnapshotError::Other(format!(
                "the snapshot directory {} is not an absolute path",
                dir.display()
            )));
        }
        let parent = match kind {
            Kind::Full => None,
            Kind::Diff => Some(self.base().clone().ok_or(SnapshotError::NoBase)?),
        };
        fs::create_dir(dir).map_err(|e| {
            SnapshotError::Other(format!(
                "cannot create the snapshot directory {}: {e}",
                dir.display()
            ))
        })?;
        let was_paused = self.pauser.is_paused();
        let start = Instant::now();
        let result = self.take_into(dir, parent.as_ref(), progress, was_paused);
        match result {
            Ok((mut taken, checksum)) => {
                // The next diff applies on this one.
                *self.base() = Some((dir.to_path_buf(), checksum));
                taken.total_ms = start.elapsed().as_millis() as u64;
                info!(
                    dir = %dir.display(),
                    vcpus = taken.vcpus,
                    memory_bytes = taken.memory_bytes,
                    data_bytes = taken.data_bytes,
                    total_ms = taken.total_ms,
                    "snapshot taken"
                );
                Ok(taken)
            }
            Err(e) => {
                // The dirty record may have been read and reset (by a diff, or by a full
                // snapshot that turned tracking on again): only a full snapshot is sound
                // now.
                *self.base() = None;
                if let Err(rm) = fs::remove_dir_all(dir) {
                    warn!(dir = %dir.display(), error = %rm, "cannot remove a failed snapshot");
                }
                if !was_paused {
                    crate::control::PauseControl::resume(&*self.pauser);
                }
                Err(e)
            }
        }
    }

    /// Reads the state of every vCPU (each on its own thread), of the VM and of every
    /// device. The VM is paused.
    pub fn capture(&self) -> Result<Captured, SnapshotError> {
        let mut vcpus = Vec::with_capacity(usize::from(self.config.vcpus));
        for index in 0..self.config.vcpus {
            let msrs = self.msrs.clone();
            let state = self
                .gate
                .run_on(index, VCPU_JOB_LIMIT, move |fd| {
                    VcpuState::save(fd, index, &msrs)
                })
                .map_err(|e| SnapshotError::Other(format!("vCPU {index}: {e}")))??;
            vcpus.push(state);
        }
        let clock = self.pauser.paused_clock().ok_or_else(|| {
            SnapshotError::Other("the guest clock was not read at the pause".into())
        })?;
        let vm = VmState::save(&self.vm, self.pit, clock)?;
        let devices = self
            .devices
            .save()
            .map_err(|e| SnapshotError::Other(e.to_string()))?;
        Ok(Captured { vcpus, vm, devices })
    }

    /// Forgets the base of the next diff: something else (a migration) consumes the dirty
    /// record, so only a full snapshot is sound next.
    pub fn forget_base(&self) {
        *self.base() = None;
    }

    /// The VM's memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm
    }

    /// Pause and resume.
    pub fn pauser(&self) -> &Arc<Pauser> {
        &self.pauser
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn take_into(
        &self,
        dir: &Path,
        parent: Option<&(std::path::PathBuf, u64)>,
        progress: impl FnMut(u64, u64),
        was_paused: bool,
    ) -> Result<(Taken, u64), SnapshotError> {
        let paused_at = Instant::now();
        crate::control::PauseControl::pause(&*self.pauser).map_err(SnapshotError::Other)?;
        let Captured { vcpus, vm, devices } = self.capture()?;
        let path = dir.join(MEMORY_FILE);
        let image = match parent {
            None => {
                // Dirty tracking from this point on: KVM's log for the slots (turning it on
                // re-registers them) and the devices' record, both emptied now.
                self.ram
                    .register(&self.vm, true)
                    .map_err(|e| SnapshotError::Other(format!("turning dirty tracking on: {e}")))?;
                self.ram
                    .take_dirty_bitmaps(&self.vm)
                    .map_err(|e| SnapshotError::Other(e.to_string()))?;
                memory::write_full(&self.ram, &path, progress)?
            }
            Some((parent, parent_checksum)) => {
                let bitmaps = self
                    .ram
                    .take_dirty_bitmaps(&self.vm)
                    .map_err(|e| SnapshotError::Other(e.to_string()))?;
                let ranges = memory::dirty_ranges(&memory::regions_of(&self.ram), &bitmaps);
                let mut image = memory::write_diff(&self.ram, &path, &ranges)?;
                // By name: a chain is restored from one directory of snapshots side by
                // side, wherever it has been moved since.
                image.parent = parent
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string);
                image.parent_checksum = Some(format!("{parent_checksum:016x}"));
                image
            }
        };
        let state = SnapshotState {
            written_by: format!("quantix-vmm {}", env!("CARGO_PKG_VERSION")),
            taken_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config: self.config.clone(),
            memory: image,
            vcpus,
            vm,
            devices,
        };
        state.validate()?;
        let body = state.to_body()?;
        file::write(&dir.join(STATE_FILE), &body)?;
        let memory_bytes = state
            .memory
            .regions
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0);
        let taken = Taken {
            vcpus: self.config.vcpus,
            memory_bytes,
            data_bytes: state.memory.data_bytes,
            paused_ms: if was_paused {
                0
            } else {
                paused_at.elapsed().as_millis() as u64
            },
            total_ms: 0,
            parent: state.memory.parent.clone(),
        };
        Ok((taken, file::checksum(&body)))
    }
}

impl crate::control::SnapshotControl for Snapshotter {
    fn snapshot(
        &self,
        dir: &Path,
        diff: bool,
    ) -> Result<quantix_vmm_api::control::SnapshotReply, crate::control::SnapshotFailure> {
        let mut last_tenth = 0;
        let kind = if diff { Kind::Diff } else { Kind::Full };
        let taken = self
            .take(dir, kind, |done, total| {
                // Progress in the log, every tenth of the memory.
                let tenth = (done * 10).checked_div(total).unwrap_or(10);
                if tenth > last_tenth {
                    last_tenth = tenth;
                    tracing::debug!(done, total, "snapshot: memory written");
                }
            })
            .map_err(|e| match e {
                SnapshotError::NoBase => crate::control::SnapshotFailure::NoBase(e.to_string()),
                e => crate::control::SnapshotFailure::Failed(e.to_string()),
            })?;
        Ok(quantix_vmm_api::control::SnapshotReply {
            state: quantix_vmm_api::control::RunState::Paused,
            vcpus: taken.vcpus,
            memory_bytes: taken.memory_bytes,
            data_bytes: taken.data_bytes,
            paused_ms: taken.paused_ms,
            total_ms: taken.total_ms,
            parent: taken.parent,
        })
    }
}
