//! Kernel and initramfs loading.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::memory::GuestMemory;
use linux_loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::BootError;
use crate::layout::{CMDLINE_MAX_SIZE, HIMEM_START, MMIO_HOLE_START};

/// The kind of kernel image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux with a PVH entry note.
    ElfPvh,
    /// An ELF vmlinux booted through its 64-bit entry.
    Elf,
    /// A compressed bzImage.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug, Clone)]
pub(super) struct LoadedKernel {
    pub format: KernelFormat,
    /// 64-bit entry (Linux boot protocol) or PVH entry.
    pub entry: GuestAddress,
    /// First byte after the kernel (including its BSS).
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub header: Option<setup_header>,
}

impl LoadedKernel {
    /// The longest command line (with its NUL) the kernel accepts.
    pub fn cmdline_limit(&self) -> usize {
        match &self.header {
            // cmdline_size excludes the terminating NUL (boot protocol 2.06+).
            Some(h) if h.cmdline_size > 0 => (h.cmdline_size as usize + 1).min(CMDLINE_MAX_SIZE),
            _ => CMDLINE_MAX_SIZE,
        }
    }

    /// The highest address + 1 the initramfs may reach.
    pub fn initrd_limit(&self, mem_size: u64) -> u64 {
        let ram_top = mem_size.min(MMIO_HOLE_START);
        match &self.header {
            Some(h) if h.initrd_addr_max != 0 => ram_top.min(u64::from(h.initrd_addr_max) + 1),
            // ELF kernels: the 64-bit boot protocol default.
            _ => ram_top.min(0x8000_0000),
        }
    }
}

fn open(path: &Path, what: &'static str) -> Result<File, BootError> {
    let read_err = |source| BootError::Read {
        what,
        path: path.to_path_buf(),
        source,
    };
    // `/dev/fd/N`: a file the agent opened beneath its image directories.
    let file =
        quantix_hostfs::inherit::open(path, quantix_hostfs::Access::ReadOnly).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(read_err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    Ok(file)
}

/// Identifies the image by its magic numbers.
pub(super) fn detect(file: &mut File, path: &Path) -> Result<KernelFormat, BootError> {
    let read_err = |source| BootError::Read {
        what: "kernel",
        path: path.to_path_buf(),
        source,
    };
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(read_err)?;
    let mut n = 0;
    while n < head.len() {
        match file.read(&mut head[n..]).map_err(read_err)? {
            0 => break,
            k => n += k,
        }
    }
    // ELF, 64-bit, little-endian, x86_64.
    if n >= 20 && head[..4] == *b"\x7fELF" && head[4] == 2 && head[5] == 1 && head[18] == 62 {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(path.to_path_buf()))
}

pub(super) fn load(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let mut file = open(path, "kernel")?;
    let format = detect(&mut file, path)?;
    let load_err = |source| BootError::Load {
        path: path.to_path_buf(),
        source,
    };
    let loaded = match format {
        KernelFormat::Elf | KernelFormat::ElfPvh => {
            let r = Elf::load(mem, None, &mut file, Some(HIMEM_START)).map_err(load_err)?;
            match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => LoadedKernel {
                    format: KernelFormat::ElfPvh,
                    entry,
                    end: r.kernel_end,
                    header: None,
                },
                _ => LoadedKernel {
                    format: KernelFormat::Elf,
                    entry: r.kernel_load,
                    end: r.kernel_end,
                    header: None,
                },
            }
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(HIMEM_START)).map_err(load_err)?;
            let header = r
                .setup_header
                .ok_or_else(|| BootError::NotAKernel(path.to_path_buf()))?;
            // The 64-bit entry (startup_64) is 0x200 past the protected-mode code, from 2.06 on
            // with XLF_KERNEL_64 set.
            let version = header.version;
            if version < 0x206 || header.xloadflags & 1 == 0 {
                return Err(BootError::OldBootProtocol {
                    path: path.to_path_buf(),
                    version,
                });
            }
            // The decompressor needs init_size bytes from the load address.
            let end = r
                .kernel_load
                .0
                .saturating_add(u64::from(header.init_size))
                .max(r.kernel_end);
            LoadedKernel {
                format,
                entry: GuestAddress(r.kernel_load.0 + 0x200),
                end,
                header: Some(header),
            }
        }
    };
    // The loader checked each segment against memory; the BSS (or the bzImage's
    // decompression space) must fit as well.
    if mem.last_addr().0 < loaded.end.saturating_sub(1)
        || loaded.end > mem_size.min(MMIO_HOLE_START)
    {
        return Err(BootError::KernelTooLarge {
            path: path.to_path_buf(),
            end: loaded.end,
            mem_mib: mem_size >> 20,
        });
    }
    Ok(loaded)
}

/// Places the initramfs at the highest page-aligned address it fits below the limit.
pub(super) fn load_initramfs(
    mem: &GuestMemory,
    mem_size: u64,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(GuestAddress, u64), BootError> {
    let mut file = open(path, "initramfs")?;
    let read_err = |source| BootError::Read {
        what: "initramfs",
        path: path.to_path_buf(),
        source,
    };
    let size = file.metadata().map_err(read_err)?.len();
    let limit = kernel.initrd_limit(mem_size);
    let kernel_end = kernel.end;
    let too_large = || BootError::InitramfsTooLarge {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end.next_multiple_of(0x1000) || size == 0 && start == 0 {
        return Err(too_large());
    }
    let mut slice = mem
        .get_slice(GuestAddress(start), size as usize)
        .map_err(|_| too_large())?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BootError::Read {
            what: "initramfs",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok((GuestAddress(start), size))
}
