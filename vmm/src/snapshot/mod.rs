//! Snapshots: a VM's complete state and its memory, written to a directory and read back.
//!
//! A snapshot directory holds two files (docs/snapshots.md):
//!
//! - `vmstate`: the [`SnapshotState`] (the VM's configuration, every vCPU, the VM-wide KVM
//!   state, every device by its stable id, and where the memory image's pages lie), in the
//!   checked format of [`file`];
//! - `memory`: the guest's RAM, each region at the file offset the state names; a sparse
//!   file, whose holes are pages that were zero.

pub mod file;
pub mod lazy;
pub mod memory;
pub mod take;
pub mod vm_state;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cpu::state::{StateError, VcpuState};
use crate::device_manager::SavedDevice;
use quantix_vmm_api::VmConfig;
pub use vm_state::{VmState, VmStateError};

/// The memory image's name in a snapshot directory.
pub use quantix_vmm_api::control::SNAPSHOT_MEMORY_FILE as MEMORY_FILE;
/// The state file's name in a snapshot directory.
pub use quantix_vmm_api::control::SNAPSHOT_STATE_FILE as STATE_FILE;
/// The page size of memory images and dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// Why a snapshot could not be taken or loaded.
#[derive(Debug, Error)]
pub enum SnapshotError {
    /// The state file.
    #[error(transparent)]
    File(#[from] file::StateFileError),
    /// The state file's JSON does not describe a VM.
    #[error("the state file's contents are not a quantix-vmm VM state: {0}")]
    Parse(String),
    /// The state is well-formed but inconsistent.
    #[error("the saved state is inconsistent: {0}")]
    Inconsistent(String),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] StateError),
    /// The VM-wide KVM state.
    #[error(transparent)]
    Vm(#[from] VmStateError),
    /// The memory image.
    #[error(transparent)]
    Memory(#[from] memory::MemoryImageError),
    /// A diff snapshot asked for with no snapshot before it in this VMM.
    #[error("a diff snapshot needs a full snapshot of this VM first (no base since the VMM started, or the last diff failed)")]
    NoBase,
    /// Something else the VMM needed (pausing, a device).
    #[error("{0}")]
    Other(String),
}

/// One guest RAM region in the memory image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegion {
    /// Its guest-physical address.
    pub guest_addr: u64,
    /// Its size, bytes.
    pub size: u64,
    /// Where it starts in the memory image.
    pub file_offset: u64,
}

/// A run of pages a diff snapshot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageRange {
    /// The first page's guest-physical address.
    pub guest_addr: u64,
    /// How many 4 KiB pages.
    pub pages: u64,
}

/// The memory image of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryImage {
    /// The image's file name in the snapshot directory.
    pub file: String,
    /// The regions, in guest-address order.
    pub regions: Vec<MemoryRegion>,
    /// Bytes of non-zero pages written.
    pub data_bytes: u64,
    /// For a diff snapshot: the name of the snapshot directory it applies on (a full one
    /// or another diff), which sits beside this one: a chain is kept, moved and restored
    /// as one directory of snapshots side by side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a diff snapshot: the checksum of the parent's state body, 16 hex digits (the
    /// chain is refused if the parent directory holds another snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_checksum: Option<String>,
    /// For a diff snapshot: the pages written since the parent, in address order; every
    /// other page is the parent's. The image holds these pages at their offsets (zero
    /// pages as holes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<Vec<PageRange>>,
}

/// The longest chain of diff snapshots a restore follows.
pub const MAX_CHAIN: usize = 64;

/// Everything a snapshot saves besides the memory's bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotState {
    /// The VMM that wrote it (`quantix-vmm 0.1.0`).
    pub written_by: String,
    /// When, milliseconds since the Unix epoch.
    pub taken_at_unix_ms: u64,
    /// The VM's configuration.
    pub config: VmConfig,
    /// Its memory image.
    pub memory: MemoryImage,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// The VM-wide KVM state.
    pub vm: VmState,
    /// Every device, in attach order.
    pub devices: Vec<SavedDevice>,
}

impl SnapshotState {
    /// Parses and checks a state body (from [`file::read`]): untrusted input.
    pub fn parse(body: &[u8]) -> Result<Self, SnapshotError> {
        let state: Self =
            serde_json::from_slice(body).map_err(|e| SnapshotError::Parse(e.to_string()))?;
        state.validate()?;
        Ok(state)
    }

    /// The body to write with [`file::write`].
    pub fn to_body(&self) -> Result<Vec<u8>, SnapshotError> {
        serde_json::to_vec(self)
            .map_err(|e| SnapshotError::Other(format!("encoding the state: {e}")))
    }

    /// Checks what parsing cannot: one state per vCPU in order, each well-sized, and
    /// memory regions that match the configuration's size, do not overlap and stay within
    /// a sane image.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let bad = |m: String| Err(SnapshotError::Inconsistent(m));
        // The saved configuration obeys the same limits as one given on the command line
        // (the host's memory is checked at restore).
        if let Err(e) = self.config.validate(None) {
            return bad(format!("the saved configuration: {e}"));
        }
        if self.vcpus.len() != usize::from(self.config.vcpus) {
            return bad(format!(
                "{} vCPU states for a VM of {} vCPUs",
                self.vcpus.len(),
                self.config.vcpus
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if usize::from(v.index) != i {
                return bad(format!("vCPU state {i} is for vCPU {}", v.index));
            }
            v.validate()?;
        }
        if self.memory.file != MEMORY_FILE {
            return bad(format!(
                "the memory image is named {:?}, not {MEMORY_FILE:?}",
                self.memory.file
            ));
        }
        let ram = self.config.memory.bytes();
        // The regions are the configuration's RAM layout, in order and back to back in the
        // image, and for firmware one window of at most 16 MiB ending at 4 GiB.
        let layout = crate::layout::ram_regions(ram);
        let firmware = matches!(self.config.boot, quantix_vmm_api::BootSource::Firmware(_));
        let want = layout.len() + usize::from(firmware);
        if self.memory.regions.len() != want {
            return bad(format!(
                "{} memory regions for a layout of {want}",
                self.memory.regions.len()
            ));
        }
        let mut offset = 0u64;
        for (i, r) in self.memory.regions.iter().enumerate() {
            let ok = match layout.get(i) {
                Some((addr, size)) => r.guest_addr == addr.0 && r.size == *size,
                None => r.size <= 16 << 20 && r.guest_addr.checked_add(r.size) == Some(1 << 32),
            };
            if !ok || r.file_offset != offset {
                return bad(format!(
                    "memory region {r:?} is not this configuration's layout"
                ));
            }
            offset = offset.saturating_add(r.size);
        }
        let mut total = 0u64;
        let mut end_addr = 0u64;
        let mut end_offset = 0u64;
        for r in &self.memory.regions {
            if r.size == 0 || r.size % PAGE_SIZE != 0 || r.guest_addr % PAGE_SIZE != 0 {
                return bad(format!("memory region {r:?} is not whole pages"));
            }
            if r.guest_addr < end_addr || r.file_offset < end_offset {
                return bad(format!("memory region {r:?} overlaps the one before"));
            }
            end_addr = r.guest_addr.checked_add(r.size).ok_or_else(|| {
                SnapshotError::Inconsistent(format!("memory region {r:?} overflows"))
            })?;
            end_offset = r.file_offset.checked_add(r.size).ok_or_else(|| {
                SnapshotError::Inconsistent(format!("memory region {r:?} overflows"))
            })?;
            total = total.saturating_add(r.size);
        }
        // RAM, plus at most a firmware window (16 MiB at most).
        if total < ram || total > ram + (16 << 20) {
            return bad(format!(
                "memory regions of {total} bytes for a VM of {ram} bytes of RAM"
            ));
        }
        match (&self.memory.parent, &self.memory.pages) {
            (None, None) if self.memory.parent_checksum.is_none() => {}
            (Some(parent), Some(pages)) => {
                let sum_ok = self
                    .memory
                    .parent_checksum
                    .as_deref()
                    .is_some_and(|c| c.len() == 16 && u64::from_str_radix(c, 16).is_ok());
                if !sum_ok {
                    return bad(
                        "a diff snapshot needs its parent's checksum (16 hex digits)".into(),
                    );
                }
                if !is_sibling_name(parent) {
                    return bad(format!(
                        "the parent {parent:?} is not the name of a directory beside this one"
                    ));
                }
                let mut next = 0u64;
                let mut count = 0u64;
                for p in pages {
                    let end = p
                        .pages
                        .checked_mul(PAGE_SIZE)
                        .and_then(|b| p.guest_addr.checked_add(b));
                    let inside = end.is_some_and(|end| {
                        self.memory
                            .regions
                            .iter()
                            .any(|r| p.guest_addr >= r.guest_addr && end <= r.guest_addr + r.size)
                    });
                    if p.pages == 0
                        || p.guest_addr % PAGE_SIZE != 0
                        || p.guest_addr < next
                        || !inside
                    {
                        return bad(format!(
                            "page range {p:?} is empty, unordered or outside guest RAM"
                        ));
                    }
                    next = end.unwrap_or(u64::MAX);
                    count = count.saturating_add(p.pages);
                }
                if count.saturating_mul(PAGE_SIZE) > total {
                    return bad(format!("{count} dirty pages in {total} bytes of RAM"));
                }
            }
            _ => return bad("a diff snapshot needs both its parent and its pages".into()),
        }
        if self.memory.data_bytes > end_offset {
            return bad(format!(
                "{} bytes of data in a {end_offset}-byte image",
                self.memory.data_bytes
            ));
        }
        Ok(())
    }
}

/// Whether `name` can name a parent snapshot: one plain path component (no `/`, not `.`
/// or `..`, not empty, at most 255 bytes).
pub fn is_sibling_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 255 && !name.contains('/') && name != "." && name != ".."
}

/// The snapshots a diff in `dir` stands on, oldest first: the full snapshot at the root,
/// then each diff up to `state`'s parent, every one read from beside `dir`, checked, and
/// with `state`'s memory layout. Empty for a full snapshot.
pub fn load_chain(
    state: &SnapshotState,
    dir: &std::path::Path,
) -> Result<Vec<(SnapshotState, std::path::PathBuf)>, SnapshotError> {
    let beside = dir.parent().unwrap_or(std::path::Path::new("/"));
    let mut chain = Vec::new();
    let mut next = state.memory.parent.clone();
    while let Some(parent) = next {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::Inconsistent(format!(
                "the chain of diff snapshots is longer than {MAX_CHAIN}"
            )));
        }
        if !is_sibling_name(&parent) {
            return Err(SnapshotError::Inconsistent(format!(
                "the parent {parent:?} is not the name of a directory beside this one"
            )));
        }
        let dir = beside.join(&parent);
        let body = file::read(&dir.join(STATE_FILE))?;
        let want = chain
            .last()
            .map_or(&state.memory, |(s, _): &(SnapshotState, _)| &s.memory)
            .parent_checksum
            .clone()
            .unwrap_or_default();
        let got = format!("{:016x}", file::checksum(&body));
        if got != want {
            return Err(SnapshotError::Inconsistent(format!(
                "the parent snapshot {} is not the one this diff was taken on (checksum {got}, expected {want})",
                dir.display()
            )));
        }
        let base = SnapshotState::parse(&body).map_err(|e| {
            SnapshotError::Inconsistent(format!("the parent snapshot {}: {e}", dir.display()))
        })?;
        if base.memory.regions != state.memory.regions || base.config.vcpus != state.config.vcpus {
            return Err(SnapshotError::Inconsistent(format!(
                "the parent snapshot {} is of another VM (its memory or vCPUs differ)",
                dir.display()
            )));
        }
        next = base.memory.parent.clone();
        chain.push((base, dir));
    }
    chain.reverse();
    Ok(chain)
}

/// The configuration a snapshot is restored with when the caller gives one (`--restore
/// DIR --config FILE`): the host side from `given` (files, descriptors, sockets, TAPs, the
/// KVM device, seccomp), the guest side as it was saved, which `given` must match: vCPUs,
/// memory, boot kind and the PIT it implies, the entropy device, each disk (id, read-only),
/// each NIC (its MAC is the saved one when `given` has none), the console's presence, the
/// vsock device. A NIC's MAC may change: the card shows the new one, which the guest's
/// driver takes when it probes the card again (it read the saved one at boot). The vsock
/// CID may change: the device's transport reset after a restore makes the guest's driver
/// read it again.
pub fn rebind(saved: &VmConfig, given: &VmConfig) -> Result<VmConfig, SnapshotError> {
    use quantix_vmm_api::SerialMode;
    let differ = |what: &str, a: String, b: String| {
        Err(SnapshotError::Inconsistent(format!(
            "the given configuration's {what} ({b}) differs from the snapshot's ({a})"
        )))
    };
    if saved.vcpus != given.vcpus {
        return differ(
            "vCPU count",
            saved.vcpus.to_string(),
            given.vcpus.to_string(),
        );
    }
    if saved.memory != given.memory {
        return differ(
            "memory",
            format!("{} MiB", saved.memory.0),
            format!("{} MiB", given.memory.0),
        );
    }
    let kind = |c: &VmConfig| match &c.boot {
        quantix_vmm_api::BootSource::Kernel { .. } => "kernel",
        quantix_vmm_api::BootSource::Firmware(_) => "firmware",
    };
    if kind(saved) != kind(given)
        || crate::boot::needs_pit(&saved.boot) != crate::boot::needs_pit(&given.boot)
    {
        return differ(
            "boot (kernel or firmware, PIT)",
            kind(saved).into(),
            kind(given).into(),
        );
    }
    if saved.rng != given.rng {
        return differ(
            "entropy device",
            saved.rng.to_string(),
            given.rng.to_string(),
        );
    }
    let disks = |c: &VmConfig| -> Vec<(Option<String>, bool)> {
        c.disks.iter().map(|d| (d.id.clone(), d.readonly)).collect()
    };
    if disks(saved) != disks(given) {
        return differ(
            "disks (ids, read-only)",
            format!("{:?}", disks(saved)),
            format!("{:?}", disks(given)),
        );
    }
    if saved.nets.len() != given.nets.len() {
        return differ(
            "NIC count",
            saved.nets.len().to_string(),
            given.nets.len().to_string(),
        );
    }
    let mut out = given.clone();
    // A MAC not given is the saved one; another one may be given (a copy beside its
    // original needs its own): the card shows it, and the guest's driver takes it when it
    // probes the card again (it read the saved one at boot).
    for (s, g) in saved.nets.iter().zip(out.nets.iter_mut()) {
        if g.mac.is_none() {
            g.mac = s.mac;
        }
    }
    let console_on = |c: &VmConfig| c.console != SerialMode::Off;
    if console_on(saved) != console_on(given) {
        return differ(
            "console",
            console_on(saved).to_string(),
            console_on(given).to_string(),
        );
    }
    // The CID may change (a copy beside the original needs its own): the transport
    // reset sent after a restore makes the guest read it again.
    if saved.vsock.is_some() != given.vsock.is_some() {
        return differ(
            "vsock device",
            saved.vsock.is_some().to_string(),
            given.vsock.is_some().to_string(),
        );
    }
    // The boot payload is not read on a restore; keep the saved one for the record.
    out.boot = saved.boot.clone();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_configuration_rebinds_the_host_side_only() {
        let mut saved = VmConfig::with_kernel("/k");
        saved.nets = vec!["tap=qx0,mac=52:54:00:00:00:01".parse().unwrap()];
        saved.disks = vec!["path=/a.img,id=data".parse().unwrap()];
        saved.vsock = Some("cid=3,socket=/a.sock".parse().unwrap());
        let mut given = saved.clone();
        given.nets = vec!["tap=qx9".parse().unwrap()];
        given.disks = vec!["path=/dev/fd/7,id=data".parse().unwrap()];
        given.vsock = Some("cid=3,socket=/b.sock".parse().unwrap());
        given.boot = quantix_vmm_api::BootSource::Kernel {
            kernel: "/other".into(),
            initramfs: None,
            cmdline: "console=ttyS0".into(),
        };
        let out = rebind(&saved, &given).unwrap();
        assert_eq!(
            out.nets[0].mac, saved.nets[0].mac,
            "the saved MAC when none is given"
        );
        assert_eq!(out.disks[0].path, std::path::PathBuf::from("/dev/fd/7"));
        assert_eq!(
            out.vsock.as_ref().unwrap().socket,
            std::path::PathBuf::from("/b.sock")
        );
        assert_eq!(out.boot, saved.boot);

        let refused = |f: &dyn Fn(&mut VmConfig)| {
            let mut g = given.clone();
            f(&mut g);
            rebind(&saved, &g).unwrap_err().to_string()
        };
        assert!(refused(&|g| g.vcpus = 2).contains("vCPU count"));
        assert!(refused(&|g| g.memory = "1G".parse().unwrap()).contains("memory"));
        assert!(refused(&|g| g.disks.clear()).contains("disks"));
        assert!(refused(&|g| g.vsock = None).contains("vsock device"));
        let mut new_cid = given.clone();
        new_cid.vsock = Some("cid=9,socket=/b.sock".parse().unwrap());
        assert_eq!(rebind(&saved, &new_cid).unwrap().vsock.unwrap().cid, 9);
        let mut new_mac = given.clone();
        new_mac.nets[0].mac = Some([2, 0, 0, 0, 0, 9]);
        assert_eq!(
            rebind(&saved, &new_mac).unwrap().nets[0].mac,
            Some([2, 0, 0, 0, 0, 9]),
            "a copy may get its own MAC"
        );
        assert!(refused(&|g| g.rng = !g.rng).contains("entropy"));
        assert!(
            refused(&|g| g.boot = quantix_vmm_api::BootSource::Firmware("/fw".into()))
                .contains("boot")
        );
    }

    /// A real 1-vCPU state (the fuzz target's seed), parsed.
    fn real() -> SnapshotState {
        let bytes = include_bytes!("../../../fuzz/seeds/snapshot_state/vmstate-1vcpu");
        SnapshotState::parse(file::decode(bytes).unwrap()).unwrap()
    }

    #[test]
    fn validate_refuses_what_parsing_lets_through() {
        let good = real();
        assert!(good.validate().is_ok());
        let refused = |f: &dyn Fn(&mut SnapshotState)| {
            let mut s = good.clone();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        let diff = |s: &mut SnapshotState| {
            s.memory.parent = Some("base".into());
            s.memory.parent_checksum = Some("0123456789abcdef".into());
            s.memory.pages = Some(vec![PageRange {
                guest_addr: 0x20_0000,
                pages: 1,
            }]);
        };
        let mut d = good.clone();
        diff(&mut d);
        assert!(d.validate().is_ok(), "a well-formed diff");
        assert!(refused(&|s| s.vcpus.clear()).contains("0 vCPU states"));
        assert!(refused(&|s| s.vcpus[0].index = 1).contains("is for vCPU 1"));
        assert!(refused(&|s| s.vcpus[0].lapic.pop().map_or((), drop)).contains("local APIC"));
        assert!(refused(&|s| s.memory.file = "../../etc/passwd".into()).contains("not \"memory\""));
        assert!(refused(&|s| s.memory.regions[0].size += 4096).contains("layout"));
        assert!(refused(&|s| s.memory.regions[0].file_offset = 4096).contains("layout"));
        assert!(refused(&|s| s.memory.regions.push(s.memory.regions[0]))
            .contains("regions for a layout"));
        assert!(refused(&|s| s.config.vcpus = 0).contains("configuration"));
        assert!(refused(&|s| {
            diff(s);
            s.memory.parent = Some("../base".into());
        })
        .contains("not the name of a directory beside"));
        assert!(refused(&|s| {
            diff(s);
            s.memory.parent_checksum = None;
        })
        .contains("checksum"));
        assert!(refused(&|s| {
            diff(s);
            s.memory.pages = Some(vec![PageRange {
                guest_addr: 64 << 20,
                pages: 1,
            }]);
        })
        .contains("outside guest RAM"));
        assert!(refused(&|s| {
            diff(s);
            s.memory.pages = Some(vec![
                PageRange {
                    guest_addr: 0x3000,
                    pages: 1,
                },
                PageRange {
                    guest_addr: 0x1000,
                    pages: 1,
                },
            ]);
        })
        .contains("unordered"));
        assert!(refused(&|s| {
            diff(s);
            s.memory.pages = Some(vec![PageRange {
                guest_addr: 0x1000,
                pages: u64::MAX,
            }]);
        })
        .contains("outside guest RAM"));
        assert!(refused(&|s| s.memory.pages = Some(Vec::new())).contains("needs both"));
    }

    #[test]
    fn dirty_runs_stop_at_region_boundaries() {
        let regions = [
            MemoryRegion {
                guest_addr: 0,
                size: 2 * PAGE_SIZE,
                file_offset: 0,
            },
            MemoryRegion {
                guest_addr: 2 * PAGE_SIZE,
                size: 2 * PAGE_SIZE,
                file_offset: 2 * PAGE_SIZE,
            },
        ];
        let r = memory::dirty_ranges(&regions, &[vec![0b10], vec![0b01]]);
        assert_eq!(
            r,
            [
                PageRange {
                    guest_addr: PAGE_SIZE,
                    pages: 1
                },
                PageRange {
                    guest_addr: 2 * PAGE_SIZE,
                    pages: 1
                }
            ]
        );
    }
}
