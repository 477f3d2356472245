//! Device models for the Quantix KVM hypervisor.
//!
//! Devices are plugged into an I/O [`bus::Bus`] (port I/O or MMIO) by the VMM and
//! are driven from the vCPU threads when the guest touches their registers. They
//! never panic on guest input: every value a guest writes is treated as untrusted.

pub mod bus;
pub mod legacy;
pub mod power;
pub mod ratelimit;

pub use bus::{Bus, BusDevice, BusError};
pub use power::{PowerAction, PowerControl};
