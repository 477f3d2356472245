//! ACPI tables that describe the VM to the guest: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! The platform is "hardware-reduced" ACPI (ACPI 6, as on Cloud Hypervisor and
//! Firecracker): no PM1 blocks, no SCI; poweroff goes through the sleep control
//! register and reboot through the reset register, both one I/O port served by
//! [`quantix_devices::power::AcpiPowerDevice`]. The MADT lists one local APIC per
//! vCPU so that an unmodified kernel brings every vCPU online.

mod aml;
mod tables;

use crate::memory::GuestMemory;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{ACPI_START, VMGENID_ADDR};
pub use tables::{build, AcpiConfig, VirtioMmioDesc};

/// Errors while writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The tables do not fit in the ACPI area.
    #[error("ACPI tables are {size} bytes; only {room} fit in the ACPI area")]
    TooLarge {
        /// Their size.
        size: usize,
        /// The room available.
        room: u64,
    },
    /// Guest memory refused the write.
    #[error("cannot write ACPI tables into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Writes the tables at [`ACPI_START`] and returns the RSDP's address.
pub fn write(mem: &GuestMemory, config: &AcpiConfig) -> Result<GuestAddress, AcpiError> {
    let blob = build(config, ACPI_START.0);
    // The generation ID lies at the end of the area.
    let room = VMGENID_ADDR.0 - ACPI_START.0;
    if blob.len() as u64 > room {
        return Err(AcpiError::TooLarge {
            size: blob.len(),
            room,
        });
    }
    mem.write_slice(&blob, ACPI_START)?;
    Ok(ACPI_START)
}
