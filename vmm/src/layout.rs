//! The guest-physical address map of an x86_64 VM.
//!
//! ```text
//! 0x0000_0500  GDT                      0x0000_7000  zero page (boot_params)
//! 0x0000_0520  IDT                      0x0000_8ff0  boot stack top
//! 0x0000_6000  PVH start_info + memmap  0x0000_9000  PML4, 0xa000 PDPT, 0xb000.. PDs
//! 0x0002_0000  kernel command line      0x0009_fc00  EBDA (reserved to 1 MiB)
//! 0x000e_0000  ACPI tables (RSDP first) 0x000f_fff0  reset-vector stub
//! 0x0010_0000  kernel (HIMEM_START)
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio windows from 0xd000_0000 (4 KiB each),
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above the hole
//! ```

use vm_memory::GuestAddress;

/// Global descriptor table for the boot vCPU.
pub const GDT_START: GuestAddress = GuestAddress(0x500);
/// Interrupt descriptor table (empty) for the boot vCPU.
pub const IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH memory map, right after `hvm_start_info`.
pub const PVH_MEMMAP_START: GuestAddress = GuestAddress(0x6040);
/// Largest number of PVH memory map entries that fit before the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = (0x7000 - 0x6040) / 24;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
// The stack grows down from just below the PML4 and stays clear of the zero page.
const _: () =
    assert!(BOOT_STACK_POINTER < PML4_START.0 && BOOT_STACK_POINTER > ZERO_PAGE_START.0 + 0x1000);
/// Level-4 page map of the boot page tables.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Page-directory-pointer table of the boot page tables.
pub const PDPTE_START: GuestAddress = GuestAddress(0xa000);
/// First of four page directories (2 MiB pages) identity-mapping the low 4 GiB.
pub const PDE_START: GuestAddress = GuestAddress(0xb000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Largest command line we accept (Linux's COMMAND_LINE_SIZE on x86 is 2048).
pub use quantix_vmm_api::limits::CMDLINE_MAX_SIZE;
/// Start of the Extended BIOS Data Area; RAM below it is usable by the guest.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first); inside the BIOS area Linux scans for the RSDP.
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// End of the ACPI area (exclusive); the reset-vector stub follows.
pub const ACPI_END: u64 = 0xf_fff0;
/// The legacy BIOS reset vector (F000:FFF0), just below 1 MiB.
pub const BIOS_RESET_VECTOR: GuestAddress = GuestAddress(0xffff0);
/// First address of "high memory", where kernels are loaded.
pub const HIMEM_START: GuestAddress = GuestAddress(0x10_0000);

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// The I/O APIC's registers.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' registers.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// First virtio-mmio device window; each device takes `VIRTIO_MMIO_STRIDE` bytes.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_STRIDE: u64 = 0x1000;
/// First GSI (I/O APIC pin) for virtio devices; 0-4 are the legacy devices' (COM1 is 4).
pub const VIRTIO_GSI_START: u32 = 5;
/// Last GSI for virtio devices; the one above it is the power button's.
pub const VIRTIO_GSI_END: u32 = 22;
// The configuration's device limit is this range's size.
const _: () = assert!(
    (VIRTIO_GSI_END - VIRTIO_GSI_START + 1) as usize == quantix_vmm_api::limits::MAX_VIRTIO_DEVICES
);
/// The ACPI Generic Event Device's interrupt (the power button): the last pin of KVM's
/// 24-pin in-kernel I/O APIC.
pub const GED_GSI: u32 = 23;
/// The VM Generation ID's notification (a second Generic Event Device): legacy pin 3,
/// which no device of this platform uses (there is no COM2).
pub const VMGENID_GSI: u32 = 3;
/// The VM Generation ID's 16 bytes: the end of the ACPI area, reserved in the e820 map
/// and left out of the room for the tables.
pub const VMGENID_ADDR: GuestAddress = GuestAddress(ACPI_END - 16);

/// The I/O port of the ACPI sleep control/status and reset register.
pub const ACPI_POWER_PORT: u16 = 0x600;

/// Guest RAM regions for `mem_size` bytes of memory: below the MMIO hole, and the rest above 4 GiB.
pub fn ram_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(MMIO_HOLE_END), mem_size - MMIO_HOLE_START),
        ]
    }
}

/// An e820 memory map entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One entry of the guest's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// The guest's memory map for `mem_size` bytes of RAM (at least `HIMEM_START`).
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START.0 - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    let low_end = mem_size.min(MMIO_HOLE_START);
    if low_end > HIMEM_START.0 {
        map.push(E820Entry {
            addr: HIMEM_START.0,
            size: low_end - HIMEM_START.0,
            kind: E820Type::Ram,
        });
    }
    map.push(E820Entry {
        addr: MMIO_HOLE_START,
        size: MMIO_HOLE_END - MMIO_HOLE_START,
        kind: E820Type::Reserved,
    });
    if mem_size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: mem_size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn small_memory_is_one_region_below_the_hole() {
        assert_eq!(ram_regions(512 * MIB), vec![(GuestAddress(0), 512 * MIB)]);
        assert_eq!(ram_regions(3 * GIB), vec![(GuestAddress(0), 3 * GIB)]);
    }

    #[test]
    fn large_memory_is_split_around_the_hole() {
        assert_eq!(
            ram_regions(6 * GIB),
            vec![(GuestAddress(0), 3 * GIB), (GuestAddress(4 * GIB), 3 * GIB)]
        );
    }

    #[test]
    fn e820_covers_all_ram_and_reserves_bios_area_and_hole() {
        for mem in [16 * MIB, 512 * MIB, 3 * GIB, 8 * GIB] {
            let map = e820_map(mem);
            let ram: u64 = map
                .iter()
                .filter(|e| e.kind == E820Type::Ram)
                .map(|e| e.size)
                .sum();
            // The EBDA and BIOS area (EBDA_START..1 MiB) is backed but reserved.
            assert_eq!(ram, mem - (HIMEM_START.0 - EBDA_START), "mem {mem:#x}");
            // Sorted and non-overlapping.
            for w in map.windows(2) {
                assert!(w[0].addr + w[0].size <= w[1].addr, "{map:?}");
            }
            assert!(map
                .iter()
                .any(|e| e.addr == MMIO_HOLE_START && e.kind == E820Type::Reserved));
            assert!(!map.iter().any(|e| e.kind == E820Type::Ram
                && e.addr < MMIO_HOLE_END
                && e.addr + e.size > MMIO_HOLE_START));
        }
    }

    #[test]
    fn boot_structures_do_not_overlap() {
        let ranges = [
            (GDT_START.0, 0x20),
            (IDT_START.0, 0x8),
            (PVH_INFO_START.0, 0x40),
            (PVH_MEMMAP_START.0, (PVH_MEMMAP_MAX_ENTRIES * 24) as u64),
            (ZERO_PAGE_START.0, 0x1000),
            (PML4_START.0, 0x1000),
            (PDPTE_START.0, 0x1000),
            (PDE_START.0, 0x4000),
            (CMDLINE_START.0, CMDLINE_MAX_SIZE as u64),
            (ACPI_START.0, BIOS_RESET_VECTOR.0 - ACPI_START.0),
            (BIOS_RESET_VECTOR.0, 16),
        ];
        for (i, a) in ranges.iter().enumerate() {
            for b in &ranges[i + 1..] {
                assert!(
                    a.0 + a.1 <= b.0 || b.0 + b.1 <= a.0,
                    "{a:x?} overlaps {b:x?}"
                );
            }
        }
    }
}
