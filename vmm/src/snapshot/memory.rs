//! The memory image: guest RAM copied out of the VM's memfd into a sparse file, each
//! region at the offset it has in the memfd, zero pages left as holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::{MemoryImage, MemoryRegion, MEMORY_FILE, PAGE_SIZE};
use crate::memory::GuestRam;

/// Bytes copied per read.
const CHUNK: usize = 1 << 20;

/// Why the memory image could not be written or used.
#[derive(Debug, Error)]
pub enum MemoryImageError {
    /// Reading guest memory or writing the image failed (a full disk among others).
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The image does not hold what the state says.
    #[error("memory image {path}: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The regions of `ram` as a snapshot records them.
pub fn regions_of(ram: &GuestRam) -> Vec<MemoryRegion> {
    ram.regions
        .iter()
        .map(|(addr, size, offset)| MemoryRegion {
            guest_addr: addr.0,
            size: *size as u64,
            file_offset: *offset,
        })
        .collect()
}

/// Writes every non-zero page of `ram` to `path` (created new, sized to the whole
/// image), then syncs it. The vCPUs and devices are paused. `progress` gets the bytes
/// looked at so far and the total.
pub fn write_full(
    ram: &GuestRam,
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<MemoryImage, MemoryImageError> {
    let io = |what, p: &Path| {
        let p = p.to_path_buf();
        move |source| MemoryImageError::Io {
            what,
            path: p,
            source,
        }
    };
    let regions = regions_of(ram);
    let image_len = regions
        .iter()
        .map(|r| r.file_offset + r.size)
        .max()
        .unwrap_or(0);
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io("creating", path))?;
    out.set_len(image_len).map_err(io("sizing", path))?;
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let mut done = 0u64;
    let mut data_bytes = 0u64;
    let mut buf = vec![0u8; CHUNK];
    let guest = Path::new("guest memory");
    for r in &regions {
        let mut at = 0u64;
        while at < r.size {
            let len = (r.size - at).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..len];
            // Through the mapping, not the file: a restored VM's memory is a private
            // copy-on-write mapping of its image, whose file lacks what the guest wrote.
            ram.mem
                .read_slice(chunk, GuestAddress(r.guest_addr + at))
                .map_err(|e| MemoryImageError::Io {
                    what: "reading",
                    path: guest.to_path_buf(),
                    source: io::Error::other(e.to_string()),
                })?;
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    let offset = r.file_offset + at + i as u64 * PAGE_SIZE;
                    out.write_all_at(page, offset)
                        .map_err(io("writing", path))?;
                    data_bytes += page.len() as u64;
                }
            }
            at += len as u64;
            done += len as u64;
            progress(done, total);
        }
    }
    out.sync_all().map_err(io("syncing", path))?;
    Ok(MemoryImage {
        file: MEMORY_FILE.to_string(),
        regions,
        data_bytes,
    })
}

/// Opens the memory image at `path` for a restore and checks that it is as large as the
/// state's regions need.
pub fn open_image(path: &Path, image: &MemoryImage) -> Result<File, MemoryImageError> {
    let file = File::open(path).map_err(|source| MemoryImageError::Io {
        what: "opening",
        path: path.to_path_buf(),
        source,
    })?;
    let len = file
        .metadata()
        .map_err(|source| MemoryImageError::Io {
            what: "reading the size of",
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let need = image
        .regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    if len != need {
        return Err(MemoryImageError::Mismatch {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, the state's regions need {need} (truncated or replaced)"),
        });
    }
    Ok(file)
}
