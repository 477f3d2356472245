//! Boot structures: the command line, the Linux zero page and the PVH start info.

use crate::memory::GuestMemory;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress};

use super::kernel::{KernelFormat, LoadedKernel};
use super::{BootError, EntryPoint};
use crate::layout::{
    e820_map, CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_MAX_ENTRIES, PVH_MEMMAP_START,
    ZERO_PAGE_START,
};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// `loadflags`: the kernel was loaded high (at 1 MiB).
const LOADED_HIGH: u8 = 0x01;

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a repr(C) struct of integers with no padding (56 bytes, checked by
// linux-loader), so every byte pattern is a valid value.
unsafe impl ByteValued for StartInfo {}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: hvm_memmap_table_entry is a repr(C) struct of integers (24 bytes, no padding).
unsafe impl ByteValued for MemmapEntry {}

fn mem_err(what: &'static str) -> impl Fn(vm_memory::GuestMemoryError) -> BootError {
    move |e| BootError::GuestMemory {
        what,
        reason: e.to_string(),
    }
}

/// Writes the NUL-terminated command line at `CMDLINE_START`.
pub(super) fn write_cmdline(
    mem: &GuestMemory,
    cmdline: &str,
    limit: usize,
) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::Cmdline("it contains a NUL byte".into()));
    }
    if cmdline.len() + 1 > limit {
        return Err(BootError::Cmdline(format!(
            "{} bytes with its terminator, the kernel accepts {limit}",
            cmdline.len() + 1
        )));
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, CMDLINE_START)
        .map_err(mem_err("command line"))
}

/// Writes the zero page or the PVH start info, and returns the entry point.
pub(super) fn write(
    mem: &GuestMemory,
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: Option<(GuestAddress, u64)>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<EntryPoint, BootError> {
    match kernel.format {
        KernelFormat::ElfPvh => {
            write_pvh(mem, mem_size, initrd, rsdp)?;
            Ok(EntryPoint::Pvh {
                entry: kernel.entry,
            })
        }
        KernelFormat::Elf | KernelFormat::BzImage => {
            let params = zero_page(mem_size, kernel, initrd, cmdline, rsdp)?;
            mem.write_obj(params, ZERO_PAGE_START)
                .map_err(mem_err("zero page"))?;
            Ok(EntryPoint::Linux64 {
                entry: kernel.entry,
            })
        }
    }
}

/// Builds `struct boot_params` for the 64-bit Linux boot protocol.
pub(super) fn zero_page(
    mem_size: u64,
    kernel: &LoadedKernel,
    initrd: Option<(GuestAddress, u64)>,
    cmdline: &str,
    rsdp: GuestAddress,
) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    match kernel.header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= LOADED_HIGH;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        // Both are below the MMIO hole (3 GiB), so they fit in 32 bits.
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = rsdp.0;
    let map = e820_map(mem_size);
    if map.len() > params.e820_table.len() {
        return Err(BootError::GuestMemory {
            what: "e820 map",
            reason: format!("{} entries exceed the zero page's table", map.len()),
        });
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    Ok(params)
}

fn write_pvh(
    mem: &GuestMemory,
    mem_size: u64,
    initrd: Option<(GuestAddress, u64)>,
    rsdp: GuestAddress,
) -> Result<(), BootError> {
    #[derive(Clone, Copy, Default)]
    #[repr(C)]
    struct ModEntry {
        paddr: u64,
        size: u64,
        cmdline_paddr: u64,
        reserved: u64,
    }
    // SAFETY: a repr(C) struct of four u64s has no padding; any bytes are a valid value.
    unsafe impl ByteValued for ModEntry {}

    let map = e820_map(mem_size);
    if map.len() > PVH_MEMMAP_MAX_ENTRIES {
        return Err(BootError::GuestMemory {
            what: "PVH memory map",
            reason: format!("{} entries exceed the space reserved", map.len()),
        });
    }
    for (i, e) in map.iter().enumerate() {
        let entry = MemmapEntry(hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        });
        mem.write_obj(entry, PVH_MEMMAP_START.unchecked_add(i as u64 * 24))
            .map_err(mem_err("PVH memory map"))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = initrd {
        // One module, the initramfs, described right after the memory map.
        let mod_addr = PVH_MEMMAP_START.unchecked_add((map.len() * 24) as u64);
        let mod_addr = GuestAddress(mod_addr.0.next_multiple_of(8));
        mem.write_obj(
            ModEntry {
                paddr: addr.0,
                size,
                ..Default::default()
            },
            mod_addr,
        )
        .map_err(mem_err("PVH module list"))?;
        info.nr_modules = 1;
        info.modlist_paddr = mod_addr.0;
    }
    mem.write_obj(StartInfo(info), PVH_INFO_START)
        .map_err(mem_err("PVH start info"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{E820Type, MMIO_HOLE_START};
    use linux_loader::bootparam::setup_header;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: GuestAddress(0x100_0000),
            end: 0x200_0000,
            header: None,
        }
    }

    #[test]
    fn zero_page_for_elf_has_magic_cmdline_initrd_and_e820() {
        let p = zero_page(
            512 << 20,
            &elf_kernel(),
            Some((GuestAddress(0x1000_0000), 0x1234)),
            "console=ttyS0",
            GuestAddress(0xe0000),
        )
        .unwrap();
        assert_eq!({ p.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ p.hdr.type_of_loader }, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START.0 as u32);
        assert_eq!({ p.hdr.cmdline_size }, 13);
        assert_eq!({ p.hdr.ramdisk_image }, 0x1000_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        let n = p.e820_entries as usize;
        assert_eq!(n, e820_map(512 << 20).len());
        let last_ram = p.e820_table[..n]
            .iter()
            .rfind(|e| e.r#type == E820Type::Ram as u32)
            .copied()
            .unwrap();
        assert_eq!({ last_ram.addr } + { last_ram.size }, 512 << 20);
    }

    #[test]
    fn zero_page_for_bzimage_keeps_the_kernels_header() {
        let header = setup_header {
            version: 0x20f,
            init_size: 0x100_0000,
            xloadflags: 1,
            cmdline_size: 2047,
            ..Default::default()
        };
        let k = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: GuestAddress(0x100200),
            end: 0x110_0000,
            header: Some(header),
        };
        let p = zero_page(4 << 30, &k, None, "", GuestAddress(0xe0000)).unwrap();
        assert_eq!({ p.hdr.version }, 0x20f);
        assert_eq!({ p.hdr.loadflags } & LOADED_HIGH, LOADED_HIGH);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        // RAM above 4 GiB is described.
        let n = p.e820_entries as usize;
        assert!(p.e820_table[..n]
            .iter()
            .any(|e| e.addr == 1 << 32 && e.size == (4 << 30) - MMIO_HOLE_START));
        assert_eq!(k.cmdline_limit(), 2048);
    }

    #[test]
    fn cmdline_checks() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, "a b", 2048).unwrap();
        let mut buf = [0u8; 4];
        mem.read_slice(&mut buf, CMDLINE_START).unwrap();
        assert_eq!(&buf, b"a b\0");
        assert!(matches!(
            write_cmdline(&mem, "a\0b", 2048),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            write_cmdline(&mem, "abcd", 4),
            Err(BootError::Cmdline(_))
        ));
    }

    #[test]
    fn pvh_start_info_and_module() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_pvh(
            &mem,
            256 << 20,
            Some((GuestAddress(0x80_0000), 4096)),
            GuestAddress(0xe0000),
        )
        .unwrap();
        let info: StartInfo = mem.read_obj(PVH_INFO_START).unwrap();
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.0.nr_modules, 1);
        assert_eq!(info.0.rsdp_paddr, 0xe0000);
        assert_eq!(info.0.memmap_entries as usize, e820_map(256 << 20).len());
        let first: MemmapEntry = mem.read_obj(PVH_MEMMAP_START).unwrap();
        assert_eq!((first.0.addr, first.0.type_), (0, 1));
        let module: [u64; 2] = mem.read_obj(GuestAddress(info.0.modlist_paddr)).unwrap();
        assert_eq!(module, [0x80_0000, 4096]);
    }
}
