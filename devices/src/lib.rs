//! Device models for the Quantix KVM hypervisor.
//!
//! Devices are plugged into an I/O [`bus::Bus`] (port I/O or MMIO) by the VMM and
//! are driven from the vCPU threads when the guest touches their registers. They
//! never panic on guest input: every value a guest writes is treated as untrusted.

pub mod bus;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod legacy;
pub mod power;
pub mod ratelimit;

pub use bus::{Bus, BusDevice, BusError};
pub use power::{PowerAction, PowerControl};

#[cfg(test)]
mod fuzz_smoke {
    #[test]
    fn the_legacy_fuzz_entry_takes_any_input() {
        crate::fuzzing::legacy(&[]);
        crate::fuzzing::legacy(&[
            0, 0, 0x80, b'x', 1, 4, 0x80, 0xfe, 2, 0, 0x81, 0x34, 0, 5, 2, 0,
        ]);
        let all: Vec<u8> = (0..=255u8)
            .flat_map(|b| [b % 3, b, b, b.wrapping_mul(7)])
            .collect();
        crate::fuzzing::legacy(&all);
    }
}
