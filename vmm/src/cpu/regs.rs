//! Initial register state of the boot vCPU, and the GDT and page tables it starts with.

use crate::memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::boot::EntryPoint;
use crate::layout::{
    BOOT_STACK_POINTER, GDT_START, IDT_START, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;
/// Page-table entry flags: present, writable; `PS` makes a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PTE_PS: u64 = 0x80;

/// Builds a GDT entry from its flags (access byte and flags nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment a GDT entry describes, with selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = (((entry >> 32) & 0x000f_0000) | (entry & 0xffff)) as u32;
    let present = bit(47);
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// GDT for the 64-bit Linux entry: null, 64-bit code, data, TSS.
const GDT_LONG_MODE: [u64; 4] = [
    0,
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
/// GDT for the PVH entry: null, flat 32-bit code, data, TSS.
const GDT_PROTECTED_MODE: [u64; 4] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

fn write_gdt(mem: &GuestMemory, gdt: &[u64; 4]) -> Result<(), GuestMemoryError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START.0 + 8 * i as u64))?;
    }
    mem.write_obj(0u64, IDT_START)
}

/// Identity-maps the low 4 GiB with 2 MiB pages: PML4 -> PDPT -> four page directories.
fn write_page_tables(mem: &GuestMemory) -> Result<(), GuestMemoryError> {
    mem.write_obj(PDPTE_START.0 | PTE_PRESENT_RW, PML4_START)?;
    for dir in 0..4u64 {
        let pd = PDE_START.0 + dir * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START.0 + dir * 8))?;
        for i in 0..512u64 {
            let addr = ((dir * 512 + i) << 21) | PTE_PRESENT_RW | PTE_PS;
            mem.write_obj(addr, GuestAddress(pd + i * 8))?;
        }
    }
    Ok(())
}

fn set_segments(sregs: &mut kvm_sregs, gdt: &[u64; 4]) {
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = GDT_START.0;
    sregs.gdt.limit = (std::mem::size_of_val(gdt) - 1) as u16;
    sregs.idt.base = IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
}

/// Writes the tables the entry needs and sets the boot vCPU's registers for it.
/// Returns `None` for the reset vector, where the vCPU keeps KVM's reset state.
pub fn boot_state(
    mem: &GuestMemory,
    entry: EntryPoint,
    mut sregs: kvm_sregs,
) -> Result<Option<(kvm_regs, kvm_sregs)>, GuestMemoryError> {
    match entry {
        EntryPoint::ResetVector => Ok(None),
        EntryPoint::Linux64 { entry } => {
            write_gdt(mem, &GDT_LONG_MODE)?;
            write_page_tables(mem)?;
            set_segments(&mut sregs, &GDT_LONG_MODE);
            sregs.cr3 = PML4_START.0;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            let regs = kvm_regs {
                rflags: 0x2,
                rip: entry.0,
                rsp: BOOT_STACK_POINTER,
                rbp: BOOT_STACK_POINTER,
                rsi: ZERO_PAGE_START.0,
                ..Default::default()
            };
            Ok(Some((regs, sregs)))
        }
        EntryPoint::Pvh { entry } => {
            write_gdt(mem, &GDT_PROTECTED_MODE)?;
            set_segments(&mut sregs, &GDT_PROTECTED_MODE);
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            let regs = kvm_regs {
                rflags: 0x2,
                rip: entry.0,
                rbx: PVH_INFO_START.0,
                ..Default::default()
            };
            Ok(Some((regs, sregs)))
        }
    }
}

/// The x87/SSE state at boot: default control word and MXCSR.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &state.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *b as _;
    }
}

/// Wires LINT0 as ExtINT (the legacy PIC) and LINT1 as NMI, as firmware does.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lvt0 = lapic_reg(state, APIC_LVT0);
    set_lapic_reg(state, APIC_LVT0, (lvt0 & !0x700) | (APIC_MODE_EXTINT << 8));
    let lvt1 = lapic_reg(state, APIC_LVT1);
    set_lapic_reg(state, APIC_LVT1, (lvt1 & !0x700) | (APIC_MODE_NMI << 8));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_the_expected_segments() {
        let code = segment_from_gdt(GDT_LONG_MODE[1], 1);
        assert_eq!(
            (
                code.selector,
                code.l,
                code.db,
                code.g,
                code.present,
                code.type_
            ),
            (8, 1, 0, 1, 1, 0xb)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = segment_from_gdt(GDT_LONG_MODE[2], 2);
        assert_eq!((data.selector, data.db, data.type_, data.s), (16, 1, 3, 1));
        let code32 = segment_from_gdt(GDT_PROTECTED_MODE[1], 1);
        assert_eq!((code32.l, code32.db, code32.base), (0, 1, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_state_and_identity_map() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (regs, sregs) = boot_state(
            &mem,
            EntryPoint::Linux64 {
                entry: GuestAddress(0x100200),
            },
            kvm_sregs::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (regs.rip, regs.rsi, regs.rsp),
            (0x100200, ZERO_PAGE_START.0, BOOT_STACK_POINTER)
        );
        assert_eq!(sregs.cr3, PML4_START.0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        // The last 2 MiB page below 4 GiB maps to itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START.0 + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
        let pdpte3: u64 = mem.read_obj(GuestAddress(PDPTE_START.0 + 24)).unwrap();
        assert_eq!(pdpte3 & !0xfff, PDE_START.0 + 0x3000);
    }

    #[test]
    fn pvh_state_is_flat_protected_mode() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let (regs, sregs) = boot_state(
            &mem,
            EntryPoint::Pvh {
                entry: GuestAddress(0x1000000),
            },
            kvm_sregs::default(),
        )
        .unwrap()
        .unwrap();
        assert_eq!((regs.rip, regs.rbx), (0x1000000, PVH_INFO_START.0));
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.cs.db, 1);
        assert!(
            boot_state(&mem, EntryPoint::ResetVector, kvm_sregs::default())
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn lint_wiring() {
        let mut s = kvm_lapic_state::default();
        set_lint(&mut s);
        assert_eq!((lapic_reg(&s, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&s, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }
}
