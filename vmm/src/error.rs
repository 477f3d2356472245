//! What can go wrong building or starting a VM: one error type for every step.

use std::io;

use quantix_devices::BusError;
use thiserror::Error;

use crate::acpi::AcpiError;
use crate::boot::BootError;
use crate::chardev;
use crate::device_manager::DeviceError;

/// Errors while building or starting a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm is absent.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or enable nested virtualization)")]
    KvmMissing,
    /// /dev/kvm cannot be opened by this user.
    #[error("permission denied opening /dev/kvm: run as a member of the group that owns it (usually kvm)")]
    KvmPermission,
    /// Another failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    /// A KVM capability the VMM needs is missing.
    #[error("this KVM lacks the capability {0}, which quantix-vmm requires")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated or registered.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// Loading the boot payload failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] crate::mptable::MpTableError),
    /// Two devices claim one range.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A serial or console endpoint (file, pty, socket) cannot be opened.
    #[error(transparent)]
    Chardev(#[from] chardev::ChardevError),
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] quantix_virtio::block::BlockError),
    /// A TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] quantix_virtio::net::TapError),
    /// The vsock device cannot be set up.
    #[error(transparent)]
    Vsock(#[from] quantix_virtio::vsock::VsockError),
    /// A device could not be attached, or its state paused, saved or restored.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Writing the initial vCPU state into guest memory failed.
    #[error("cannot write boot tables into guest memory: {0}")]
    BootTables(#[from] vm_memory::GuestMemoryError),
    /// A snapshot could not be restored.
    #[error("restoring the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
}

pub(crate) fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}
