//! quantix-vmm: the Quantix KVM hypervisor, one process per VM, on raw KVM ioctls.
//!
//! The layout follows the machine: [`layout`] is the guest address map, [`memory`] the
//! guest's RAM, [`boot`] loads what the VM boots, [`acpi`] describes the machine to the
//! guest, [`device_manager`] owns every device, [`cpu`] sets up and runs the vCPUs,
//! [`vm`] assembles a VM in named steps, [`pause`] pauses it, [`runner`] is the process's
//! main loop and [`api`] its control socket. See `docs/architecture.md`.

pub mod acpi;
pub mod api;
pub mod boot;
pub mod chardev;
pub mod config;
pub mod control;
pub mod cpu;
pub mod device_manager;
pub mod error;
pub mod exit;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod hex;
pub mod kvm;
pub mod layout;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod mptable;
pub mod pause;
pub mod plain;
pub mod runner;
pub mod seccomp;
pub mod snapshot;
pub mod uffd;
pub mod vm;
