//! The memory image: guest RAM copied out of the VM's memfd into a sparse file, each
//! region at the offset it has in the memfd, zero pages left as holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::{MemoryImage, MemoryRegion, PageRange, MEMORY_FILE, PAGE_SIZE};
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

/// A new memory image being written: a file of the whole image's size, holes where
/// nothing is written (they read as zeros).
struct ImageWriter<'a> {
    out: File,
    path: &'a Path,
    /// Bytes of pages written.
    data_bytes: u64,
}

impl<'a> ImageWriter<'a> {
    fn create(path: &'a Path, regions: &[MemoryRegion]) -> Result<Self, MemoryImageError> {
        let image_len = regions
            .iter()
            .map(|r| r.file_offset + r.size)
            .max()
            .unwrap_or(0);
        let out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_error("creating", path))?;
        out.set_len(image_len).map_err(io_error("sizing", path))?;
        Ok(ImageWriter {
            out,
            path,
            data_bytes: 0,
        })
    }

    /// Copies the guest's `len` bytes at `guest_addr` (pages, in one region) to the
    /// image at `file_offset`, each run of non-zero pages in one write. The VM is paused.
    fn copy(
        &mut self,
        ram: &GuestRam,
        guest_addr: u64,
        len: u64,
        file_offset: u64,
    ) -> Result<(), MemoryImageError> {
        let page = PAGE_SIZE as usize;
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(CHUNK as u64) as usize;
            // Through the mapping, not the file: a restored VM's memory is a private
            // copy-on-write mapping of its image, whose file lacks what the guest wrote.
            let slice = ram
                .mem
                .get_slice(GuestAddress(guest_addr + at), n)
                .map_err(|e| MemoryImageError::Io {
                    what: "reading",
                    path: PathBuf::from("guest memory"),
                    source: io::Error::other(e.to_string()),
                })?;
            let guard = slice.ptr_guard();
            // SAFETY: the slice is `n` mapped bytes of guest RAM, which `ram` keeps mapped
            // for this call; the VM is paused (every vCPU parked, every device stopped), so
            // nothing writes these bytes while they are read here. Reading them in place
            // spares a copy into a buffer: the zero test and the kernel's copy are the only
            // passes over guest memory.
            let chunk: &[u8] = unsafe { std::slice::from_raw_parts(guard.as_ptr(), n) };
            let mut run: Option<usize> = None;
            for i in 0..=n.div_ceil(page) {
                let start = i * page;
                let data = start < n && !is_zero(&chunk[start..(start + page).min(n)]);
                match (run, data) {
                    (None, true) => run = Some(start),
                    (Some(from), false) => {
                        let end = start.min(n);
                        self.out
                            .write_all_at(&chunk[from..end], file_offset + at + from as u64)
                            .map_err(io_error("writing", self.path))?;
                        self.data_bytes += (end - from) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the image durable; returns the bytes of pages written.
    fn finish(self) -> Result<u64, MemoryImageError> {
        self.out
            .sync_all()
            .map_err(io_error("syncing", self.path))?;
        Ok(self.data_bytes)
    }
}

/// An I/O error on `path` while `what`.
fn io_error(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> MemoryImageError {
    let path = path.to_path_buf();
    move |source| MemoryImageError::Io { what, path, source }
}

/// Writes every non-zero page of `ram` to `path` (created new, sized to the whole
/// image), then syncs it. The vCPUs and devices are paused. `progress` gets the bytes
/// looked at so far and the total.
pub fn write_full(
    ram: &GuestRam,
    path: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<MemoryImage, MemoryImageError> {
    let regions = regions_of(ram);
    let mut image = ImageWriter::create(path, &regions)?;
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let mut done = 0u64;
    for r in &regions {
        let mut at = 0u64;
        while at < r.size {
            let len = (r.size - at).min(CHUNK as u64);
            image.copy(ram, r.guest_addr + at, len, r.file_offset + at)?;
            at += len;
            done += len;
            progress(done, total);
        }
    }
    let data_bytes = image.finish()?;
    Ok(MemoryImage {
        file: MEMORY_FILE.to_string(),
        regions,
        data_bytes,
        parent: None,
        parent_checksum: None,
        pages: None,
    })
}

/// Whether `bytes` are all zero: eight at a time, which the compiler vectorises (a byte
/// loop that stops at the first non-zero one is several times slower on a full page).
pub(crate) fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder().iter().fold(0u8, |a, b| a | b);
    let ored = words.fold(0u64, |a, w| {
        let mut b = [0u8; 8];
        b.copy_from_slice(w);
        a | u64::from_ne_bytes(b)
    });
    ored == 0 && tail == 0
}

/// The runs of set bits of each region's dirty bitmap, as page ranges.
pub fn dirty_ranges(regions: &[MemoryRegion], bitmaps: &[Vec<u64>]) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for (r, words) in regions.iter().zip(bitmaps) {
        // Runs never cross from one region into the next, even where they touch.
        let first = out.len();
        let pages = r.size / PAGE_SIZE;
        for page in 0..pages {
            let (w, bit) = ((page / 64) as usize, page % 64);
            if words.get(w).is_some_and(|word| word & (1 << bit) != 0) {
                let addr = r.guest_addr + page * PAGE_SIZE;
                let extends = out.len() > first
                    && out
                        .last()
                        .is_some_and(|last| last.guest_addr + last.pages * PAGE_SIZE == addr);
                match out.last_mut() {
                    Some(last) if extends => last.pages += 1,
                    _ => out.push(PageRange {
                        guest_addr: addr,
                        pages: 1,
                    }),
                }
            }
        }
    }
    out
}

/// The file offset of the `len` bytes at guest address `addr` in an image of `regions`,
/// when they lie in one region.
fn offset_of(regions: &[MemoryRegion], addr: u64, len: u64) -> Option<u64> {
    regions
        .iter()
        .find(|r| {
            addr >= r.guest_addr
                && addr
                    .checked_add(len)
                    .is_some_and(|end| end <= r.guest_addr + r.size)
        })
        .map(|r| r.file_offset + (addr - r.guest_addr))
}

/// Writes the pages of `ranges` (a diff) to `path`, a new image of the full size with
/// everything else a hole, then syncs it. The vCPUs and devices are paused.
pub fn write_diff(
    ram: &GuestRam,
    path: &Path,
    ranges: &[PageRange],
) -> Result<MemoryImage, MemoryImageError> {
    let regions = regions_of(ram);
    let mut image = ImageWriter::create(path, &regions)?;
    for range in ranges {
        let len = range.pages.saturating_mul(PAGE_SIZE);
        let offset = offset_of(&regions, range.guest_addr, len).ok_or_else(|| {
            MemoryImageError::Mismatch {
                path: path.to_path_buf(),
                reason: format!(
                    "dirty pages {:#x} (+{} pages) outside guest RAM",
                    range.guest_addr, range.pages
                ),
            }
        })?;
        image.copy(ram, range.guest_addr, len, offset)?;
    }
    let data_bytes = image.finish()?;
    Ok(MemoryImage {
        file: MEMORY_FILE.to_string(),
        regions,
        data_bytes,
        parent: None,
        parent_checksum: None,
        pages: Some(ranges.to_vec()),
    })
}

/// Copies the pages of a diff's `ranges` from its image `file` (at `path`) into the
/// restored VM's memory, over what its parents put there.
pub fn apply_diff(
    ram: &GuestRam,
    file: &File,
    path: &Path,
    image: &MemoryImage,
    ranges: &[PageRange],
) -> Result<(), MemoryImageError> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for range in ranges {
        for i in 0..range.pages {
            let addr = range.guest_addr + i * PAGE_SIZE;
            let offset = offset_of(&image.regions, addr, PAGE_SIZE).ok_or_else(|| {
                MemoryImageError::Mismatch {
                    path: path.to_path_buf(),
                    reason: format!("page {addr:#x} outside the image's regions"),
                }
            })?;
            file.read_exact_at(&mut page, offset)
                .map_err(|source| MemoryImageError::Io {
                    what: "reading",
                    path: path.to_path_buf(),
                    source,
                })?;
            ram.mem
                .write_slice(&page, GuestAddress(addr))
                .map_err(|e| MemoryImageError::Mismatch {
                    path: path.to_path_buf(),
                    reason: format!("page {addr:#x}: {e}"),
                })?;
        }
    }
    Ok(())
}

/// Opens the memory image at `path` for a restore and checks that it is as large as the
/// state's regions need.
pub fn open_image(path: &Path, image: &MemoryImage) -> Result<File, MemoryImageError> {
    let file = super::file::open_regular(path).map_err(|source| MemoryImageError::Io {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_page_is_zero_only_when_every_byte_is() {
        let mut page = vec![0u8; PAGE_SIZE as usize + 3];
        assert!(is_zero(&page));
        for at in [0, 7, 8, 4095, 4096, 4098] {
            page[at] = 1;
            assert!(!is_zero(&page), "byte {at}");
            page[at] = 0;
        }
        assert!(is_zero(&[]));
    }

    #[test]
    fn dirty_bitmaps_become_ranges() {
        let regions = [
            MemoryRegion {
                guest_addr: 0,
                size: 128 * PAGE_SIZE,
                file_offset: 0,
            },
            MemoryRegion {
                guest_addr: 1 << 32,
                size: 64 * PAGE_SIZE,
                file_offset: 128 * PAGE_SIZE,
            },
        ];
        // Pages 1-3 and 63-64 (across a word) of the first region, page 0 of the second.
        let bitmaps = vec![vec![0b1110 | (1 << 63), 1], vec![1]];
        let r = dirty_ranges(&regions, &bitmaps);
        assert_eq!(
            r,
            [
                PageRange {
                    guest_addr: PAGE_SIZE,
                    pages: 3
                },
                PageRange {
                    guest_addr: 63 * PAGE_SIZE,
                    pages: 2
                },
                PageRange {
                    guest_addr: 1 << 32,
                    pages: 1
                },
            ]
        );
        assert_eq!(
            offset_of(&regions, (1 << 32) + 5, 1),
            Some(128 * PAGE_SIZE + 5)
        );
        assert_eq!(offset_of(&regions, 200 * PAGE_SIZE, PAGE_SIZE), None);
        // A range must lie in one region.
        assert_eq!(
            offset_of(&regions, 127 * PAGE_SIZE, PAGE_SIZE),
            Some(127 * PAGE_SIZE)
        );
        assert_eq!(offset_of(&regions, 127 * PAGE_SIZE, 2 * PAGE_SIZE), None);
        assert_eq!(offset_of(&regions, u64::MAX - 1, PAGE_SIZE), None);
        assert!(dirty_ranges(&regions, &[vec![], vec![]]).is_empty());
    }
}
