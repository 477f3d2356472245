//! The Intel MultiProcessor table (MP specification 1.4), for guests without ACPI.
//!
//! A kernel booted with `acpi=off`, or built without ACPI, cannot read the MADT; without
//! another description it runs on one vCPU with the legacy PIC only. The MP table gives
//! it the same machine the MADT does: one local APIC per vCPU, the I/O APIC at its
//! default address with its 24 pins, and LINT0/LINT1 as ExtINT/NMI. Linux ignores the
//! table when the MADT describes the APICs, so both are always written (as Firecracker and
//! Cloud Hypervisor do).
//!
//! Layout at [`EBDA_START`] (inside the e820-reserved area below 1 MiB, where Linux scans
//! for the floating pointer): the 16-byte floating pointer, then the configuration table.

use crate::memory::GuestMemory;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_START, EBDA_START, IOAPIC_ADDR, LAPIC_ADDR};

/// I/O APIC pins, each routed from the ISA IRQ of the same number (KVM's default routing).
const IOAPIC_PINS: u8 = 24;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 in the CPU signature; FPU and on-chip APIC in the feature flags.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

// Entry types and their sizes.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;

/// Why the table could not be written.
#[derive(Debug, Error)]
pub enum MpTableError {
    /// Too many vCPUs for the room below the ACPI tables.
    #[error(
        "the MP table for {vcpus} vCPUs is {size} bytes; only {room} fit below the ACPI tables"
    )]
    TooLarge {
        /// vCPUs asked for.
        vcpus: u8,
        /// The table's size.
        size: usize,
        /// The room.
        room: u64,
    },
    /// Guest memory refused the write.
    #[error("cannot write the MP table into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Builds the floating pointer and configuration table for `vcpus` vCPUs (at most
/// [`crate::config::MAX_VCPUS`]), to be placed at guest address `base`.
pub fn build(vcpus: u8, base: u64) -> Vec<u8> {
    // APIC IDs 0..vcpus are the vCPUs'; the I/O APIC takes the next one.
    let ioapic_id = vcpus.saturating_add(1);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS {
        // Type, interrupt type, flags (conform to the bus), source bus and IRQ, I/O APIC, pin.
        entries.extend_from_slice(&[IO_INTERRUPT, INT, 0, 0, 0, pin, ioapic_id, pin]);
        count += 1;
    }
    for (lint, kind) in [(0, EXTINT), (1, NMI)] {
        // Every local APIC (0xff): LINT0 takes the PIC's ExtINT, LINT1 is the NMI input.
        entries.extend_from_slice(&[LOCAL_INTERRUPT, kind, 0, 0, 0, 0, 0xff, lint]);
        count += 1;
    }

    let table_len = HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"QUANTIX ");
    table.extend_from_slice(b"QUANTIX-VMM ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    table.push(0);
    table.push(0);
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let table_addr = base + FLOATING_LEN as u64;
    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend_from_slice(b"_MP_");
    floating.extend_from_slice(&(table_addr as u32).to_le_bytes());
    floating.push(1); // length in 16-byte units
    floating.push(SPEC_REV);
    floating.push(0); // checksum, below
    floating.extend_from_slice(&[0; 5]); // feature bytes: a configuration table follows
    floating[10] = checksum(&floating);

    floating.extend_from_slice(&table);
    floating
}

/// Writes the table at [`EBDA_START`].
pub fn write(mem: &GuestMemory, vcpus: u8) -> Result<(), MpTableError> {
    let blob = build(vcpus, EBDA_START);
    let room = ACPI_START.0 - EBDA_START;
    if blob.len() as u64 > room {
        return Err(MpTableError::TooLarge {
            vcpus,
            size: blob.len(),
            room,
        });
    }
    mem.write_slice(&blob, GuestAddress(EBDA_START))?;
    Ok(())
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    /// Walks the entries as Linux's MP parser does, returning (type, bytes) pairs.
    fn entries(table: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut at = HEADER_LEN;
        while at < table.len() {
            let len = if table[at] == PROCESSOR { 20 } else { 8 };
            out.push((table[at], &table[at..at + len]));
            at += len;
        }
        assert_eq!(at, table.len(), "entries end exactly at the table's length");
        out
    }

    #[test]
    fn floating_pointer_and_table_check_out() {
        for vcpus in [1u8, 4, 16, crate::config::MAX_VCPUS] {
            let blob = build(vcpus, EBDA_START);
            let (floating, table) = blob.split_at(FLOATING_LEN);
            assert_eq!(&floating[..4], b"_MP_");
            assert_eq!(sum(floating), 0, "floating pointer checksum");
            assert_eq!(floating[8], 1);
            assert_eq!(floating[9], 4, "MP spec 1.4");
            assert_eq!(
                floating[11], 0,
                "no default configuration: the table follows"
            );
            assert_eq!(u32_at(floating, 4) as u64, EBDA_START + FLOATING_LEN as u64);
            assert_eq!(&table[..4], b"PCMP");
            assert_eq!(u16_at(table, 4) as usize, table.len());
            assert_eq!(sum(table), 0, "configuration table checksum");
            assert_eq!(u32_at(table, 36) as u64, LAPIC_ADDR);
            let list = entries(table);
            assert_eq!(u16_at(table, 34) as usize, list.len(), "entry count");

            let cpus: Vec<&[u8]> = list
                .iter()
                .filter(|(t, _)| *t == PROCESSOR)
                .map(|e| e.1)
                .collect();
            assert_eq!(cpus.len(), vcpus as usize);
            for (id, cpu) in cpus.iter().enumerate() {
                assert_eq!(cpu[1] as usize, id, "APIC ID");
                assert_eq!(cpu[3] & CPU_ENABLED, CPU_ENABLED);
                assert_eq!(
                    cpu[3] & CPU_BOOTSTRAP != 0,
                    id == 0,
                    "only vCPU 0 is the BSP"
                );
            }
            let ioapics: Vec<&[u8]> = list
                .iter()
                .filter(|(t, _)| *t == IOAPIC)
                .map(|e| e.1)
                .collect();
            assert_eq!(ioapics.len(), 1);
            let ioapic_id = ioapics[0][1];
            assert!(ioapic_id >= vcpus, "the I/O APIC's ID is no vCPU's");
            assert_eq!(u32_at(ioapics[0], 4) as u64, IOAPIC_ADDR);
            let pins: Vec<(u8, u8)> = list
                .iter()
                .filter(|(t, _)| *t == IO_INTERRUPT)
                .map(|(_, e)| {
                    assert_eq!(e[6], ioapic_id, "routed to the I/O APIC listed");
                    (e[5], e[7])
                })
                .collect();
            assert_eq!(pins, (0..24).map(|i| (i, i)).collect::<Vec<_>>());
            let lints: Vec<(u8, u8)> = list
                .iter()
                .filter(|(t, _)| *t == LOCAL_INTERRUPT)
                .map(|(_, e)| (e[1], e[7]))
                .collect();
            assert_eq!(lints, [(EXTINT, 0), (NMI, 1)]);
            assert!(list.iter().any(|(t, e)| *t == BUS && &e[2..8] == b"ISA   "));
        }
    }

    #[test]
    fn fits_below_the_acpi_tables_for_every_vcpu_count() {
        let room = (ACPI_START.0 - EBDA_START) as usize;
        assert!(build(crate::config::MAX_VCPUS, EBDA_START).len() <= room);
    }
}
