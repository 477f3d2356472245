//! Guest memory: one memfd that backs every RAM region (and the firmware's), mapped
//! shared into the VMM and registered with KVM as one memory slot per region.
//!
//! A memfd rather than anonymous memory, so that the guest's RAM can be handed to
//! another process by file descriptor (a local live migration, a snapshot writer) and
//! mapped again from it. Each region carries vm-memory's [`AtomicBitmap`]: every write
//! the VMM's devices make through vm-memory (virtio rings, network and console input,
//! entropy) marks its pages dirty, and the disk's direct reads into guest buffers mark
//! theirs when they complete. KVM's dirty log sees only what the guest's vCPUs write; the
//! union of both is what changed. See `docs/vmm.md`.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory could not be allocated or mapped.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Allocate {
        /// Size asked for.
        mib: u64,
        /// Why.
        reason: String,
    },
    /// KVM refused a memory slot.
    #[error("KVM SET_USER_MEMORY_REGION failed for slot {slot}: {source}")]
    Register {
        /// The slot.
        slot: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not give a slot's dirty log.
    #[error("KVM GET_DIRTY_LOG failed for slot {slot}: {source}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Guest memory as the VMM and its devices see it.
pub type GuestMemory = quantix_virtio::GuestMemory;

/// A VM's memory and the file behind it.
#[derive(Clone)]
pub struct GuestRam {
    /// The mapping every device uses.
    pub mem: Arc<GuestMemory>,
    /// The file holding the bytes; regions lie at their [`GuestRam::regions`] offsets. A
    /// booted VM's memfd (shared with the mapping); for a restored VM, the snapshot's
    /// memory image, mapped privately: read the guest's memory through `mem`, not here.
    pub file: Arc<File>,
    /// Each region: guest address, size, offset in `file`.
    pub regions: Vec<(GuestAddress, usize, u64)>,
    /// `file` holds the guest's bytes and nothing else serves them (no private mapping of
    /// an image, no userfaultfd): another process that maps it sees this guest's memory.
    pub shareable: bool,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .finish_non_exhaustive()
    }
}

fn memory_err(mib: u64) -> impl Fn(String) -> MemoryError {
    move |reason| MemoryError::Allocate { mib, reason }
}

/// Creates a memfd of the regions' total size and maps each region from it, in order.
/// `mib` is the size the configuration asked for (for the error message).
pub fn create(ranges: &[(GuestAddress, usize)], mib: u64) -> Result<GuestRam, MemoryError> {
    let err = memory_err(mib);
    let total = ranges
        .iter()
        .try_fold(0u64, |sum, (_, len)| sum.checked_add(*len as u64))
        .ok_or_else(|| err("the regions' total size overflows".into()))?;
    // SAFETY: a NUL-terminated name and flags; the result is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"quantix-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(err(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    // A sparse file: pages take memory when first touched, as anonymous memory does.
    file.set_len(total)
        .map_err(|e| err(format!("sizing the memory file: {e}")))?;
    map_shared(file, ranges, mib)
}

/// Maps `file` (a memfd of exactly the regions' total size, e.g. one handed over by a
/// migration source on this host) shared as the VM's RAM: each region in order, back to
/// back in the file.
pub fn map_shared(
    file: File,
    ranges: &[(GuestAddress, usize)],
    mib: u64,
) -> Result<GuestRam, MemoryError> {
    let err = memory_err(mib);
    let total = ranges
        .iter()
        .try_fold(0u64, |sum, (_, len)| sum.checked_add(*len as u64))
        .ok_or_else(|| err("the regions' total size overflows".into()))?;
    let size = file
        .metadata()
        .map_err(|e| err(format!("the memory file: {e}")))?
        .len();
    if size != total {
        return Err(err(format!(
            "the memory file holds {size} bytes, the regions {total}"
        )));
    }
    let file = Arc::new(file);
    let mut offset = 0u64;
    let mut regions = Vec::with_capacity(ranges.len());
    for (addr, len) in ranges {
        regions.push((*addr, *len, offset));
        offset += *len as u64;
    }
    let mem = GuestMemory::from_ranges_with_files(
        regions
            .iter()
            .map(|(addr, len, off)| (*addr, *len, Some(FileOffset::from_arc(file.clone(), *off)))),
    )
    .map_err(|e| err(e.to_string()))?;
    for region in mem.iter() {
        // Transparent huge pages for guest RAM where the host's shmem policy allows them
        // (`/sys/kernel/mm/transparent_hugepage/shmem_enabled` set to `advise` or more).
        // SAFETY: advice on a mapping the region owns; it changes no memory contents.
        let rc = unsafe {
            libc::madvise(
                region.as_ptr().cast(),
                region.len() as usize,
                libc::MADV_HUGEPAGE,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no huge pages for guest memory");
        }
    }
    Ok(GuestRam {
        mem: Arc::new(mem),
        file,
        regions,
        shareable: true,
    })
}

/// Maps a snapshot's memory image privately (copy-on-write) as the VM's RAM: each
/// region at its offset in `image`. The guest's writes go to private pages and never to
/// the image, which several VMs may restore from at once. `mib` is the configuration's
/// size (for the error message).
pub fn map_image(
    image: File,
    regions: &[(GuestAddress, usize, u64)],
    mib: u64,
) -> Result<GuestRam, MemoryError> {
    use vm_memory::bitmap::NewBitmap as _;
    use vm_memory::mmap::MmapRegionBuilder;
    let err = memory_err(mib);
    let file = Arc::new(image);
    let mut mapped = Vec::with_capacity(regions.len());
    for (addr, len, offset) in regions {
        let region = MmapRegionBuilder::new_with_bitmap(*len, AtomicBitmap::with_len(*len))
            .with_file_offset(FileOffset::from_arc(file.clone(), *offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| err(format!("mapping the memory image at {offset:#x}: {e}")))?;
        let region = vm_memory::GuestRegionMmap::new(region, *addr)
            .ok_or_else(|| err(format!("region at {:#x} wraps around", addr.0)))?;
        mapped.push(region);
    }
    let mem = GuestMemory::from_regions(mapped).map_err(|e| err(e.to_string()))?;
    Ok(GuestRam {
        mem: Arc::new(mem),
        file,
        regions: regions.to_vec(),
        shareable: false,
    })
}

impl GuestRam {
    /// Registers every region with KVM, slot `i` for region `i`. `log_dirty` asks KVM to
    /// keep a dirty log of the slots (for snapshots and migration).
    pub fn register(&self, vm: &VmFd, log_dirty: bool) -> Result<(), MemoryError> {
        for (slot, region) in self.mem.iter().enumerate() {
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: if log_dirty {
                    kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping owned by `self.mem`, which the VM keeps
            // (through an Arc) for as long as the VM fd exists.
            unsafe { vm.set_user_memory_region(desc) }.map_err(|source| MemoryError::Register {
                slot: slot as u32,
                source,
            })?;
        }
        Ok(())
    }

    /// The guest pages that the VMM's devices wrote since the last call, as guest
    /// addresses of 4 KiB pages, and clears the record.
    pub fn take_device_dirty_pages(&self) -> Vec<GuestAddress> {
        let mut pages = Vec::new();
        for region in self.mem.iter() {
            // The region's own bitmap (the GuestMemoryRegion method gives a slice of it).
            let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
            let page = PAGE_SIZE;
            for (word_index, word) in bitmap.get_and_reset().into_iter().enumerate() {
                let mut bits = word;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let index = word_index as u64 * 64 + bit;
                    if let Some(addr) = region.start_addr().checked_add(index * page) {
                        pages.push(addr);
                    }
                }
            }
        }
        pages
    }

    /// The pages written since the last call (or since the dirty log was turned on), one
    /// bitmap per region (bit `i` of word `w`: the page at `64 w + i`), and resets the
    /// record: KVM's dirty log of each slot (what the vCPUs wrote; the slots must be
    /// registered with `log_dirty`) OR the devices' record (what the VMM wrote, which KVM
    /// does not see). The vCPUs are paused.
    pub fn take_dirty_bitmaps(&self, vm: &VmFd) -> Result<Vec<Vec<u64>>, MemoryError> {
        let mut out = Vec::with_capacity(self.regions.len());
        for (slot, region) in self.mem.iter().enumerate() {
            let mut words = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|source| MemoryError::DirtyLog {
                    slot: slot as u32,
                    source,
                })?;
            let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
            let device = bitmap.get_and_reset();
            let pages = (region.len() / PAGE_SIZE) as usize;
            words.resize(pages.div_ceil(64), 0);
            for (w, d) in words.iter_mut().zip(device) {
                *w |= d;
            }
            out.push(words);
        }
        Ok(out)
    }

    /// Drops `len` bytes of guest memory at `gpa` (whole pages, in one region) from the
    /// memfd: the range reads as zeros and takes no memory (for a userfaultfd, it is
    /// missing again). Only for RAM whose file holds its bytes ([`GuestRam::shareable`]).
    pub fn punch_hole(&self, gpa: u64, len: u64) -> std::io::Result<()> {
        let offset = self
            .regions
            .iter()
            .find(|(a, size, _)| gpa >= a.0 && gpa.saturating_add(len) <= a.0 + *size as u64)
            .map(|(a, _, off)| off + (gpa - a.0))
            .ok_or_else(|| {
                std::io::Error::other(format!("{len} bytes at {gpa:#x} are not in one region"))
            })?;
        // SAFETY: fallocate on the memfd this RAM owns, within one region's part of it; it
        // only changes the file's contents (the range reads as zeros), which is the intent.
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The memfd's descriptor (for handing it to another process).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Granularity of the device dirty record.
pub const PAGE_SIZE: u64 = 4096;

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn memory_lives_in_one_memfd_and_device_writes_are_recorded() {
        let ram = create(
            &[(GuestAddress(0), 1 << 20), (GuestAddress(1 << 32), 1 << 20)],
            2,
        )
        .unwrap();
        assert_eq!(ram.file.metadata().unwrap().len(), 2 << 20);
        assert_eq!(ram.regions[1], (GuestAddress(1 << 32), 1 << 20, 1 << 20));
        assert!(ram.take_device_dirty_pages().is_empty());

        ram.mem
            .write_slice(&[1, 2, 3], GuestAddress(0x2ffe))
            .unwrap();
        ram.mem
            .write_obj(7u32, GuestAddress((1 << 32) + 0x1000))
            .unwrap();
        let mut dirty = ram.take_device_dirty_pages();
        dirty.sort();
        assert_eq!(
            dirty,
            vec![
                GuestAddress(0x2000),
                GuestAddress(0x3000),
                GuestAddress((1 << 32) + 0x1000)
            ]
        );
        assert!(ram.take_device_dirty_pages().is_empty(), "reading clears");

        // The bytes are in the file, at the region's offset: another mapping sees them.
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        ram.file.read_exact_at(&mut b, (1 << 20) + 0x1000).unwrap();
        assert_eq!(u32::from_le_bytes(b), 7);
        // Reads do not dirty.
        let _: u32 = ram.mem.read_obj(GuestAddress(0x2ffe)).unwrap();
        assert!(ram.take_device_dirty_pages().is_empty());
    }
}
