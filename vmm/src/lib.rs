//! quantix-vmm: the Quantix KVM hypervisor, one process per VM, on raw KVM ioctls.
//!
//! The layout follows the machine: [`layout`] is the guest address map, [`boot`] loads
//! what the VM boots, [`acpi`] describes the machine to the guest, [`cpu`] sets up and
//! runs the vCPUs, [`vm`] assembles a VM, [`runner`] is the process's main loop and
//! [`api`] its control socket. See `docs/architecture.md`.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod chardev;
pub mod coalesced;
pub mod config;
pub mod cpu;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod layout;
pub mod metrics;
pub mod mptable;
pub mod pause;
pub mod power_button;
pub mod runner;
pub mod seccomp;
pub mod virtio;
pub mod vm;
