//! What the control socket drives in a VM, as traits: the API server ([`crate::api`])
//! depends on these, not on the VM's parts, and the parts ([`crate::pause`], the power
//! button of [`crate::device_manager`]) implement them without knowing the API.

use std::io;

/// Pausing and resuming the VM, as the control socket does it.
pub trait PauseControl: Send + Sync + std::fmt::Debug {
    /// Stops every vCPU and device; an error leaves the VM running.
    fn pause(&self) -> Result<(), String>;
    /// Runs the VM again.
    fn resume(&self);
    /// Whether the VM is paused.
    fn paused(&self) -> bool;
}

/// Why a snapshot was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotFailure {
    /// A diff with no snapshot to apply on.
    NoBase(String),
    /// Anything else.
    Failed(String),
}

/// Snapshots, as the control socket takes them.
pub trait SnapshotControl: Send + Sync + std::fmt::Debug {
    /// Saves the VM (all its memory, or with `diff` the pages written since the last
    /// snapshot) into the new directory `dir` and leaves it paused; on failure the
    /// directory is gone and the VM is as it was. The reply's `state` is `paused`.
    fn snapshot(
        &self,
        dir: &std::path::Path,
        diff: bool,
    ) -> Result<quantix_vmm_api::control::SnapshotReply, SnapshotFailure>;
}

/// Why a migration was not started or cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationRefusal {
    /// Not now: one is under way, the switch has begun, none is under way (to cancel).
    Conflict(String),
    /// It could not start.
    Failed(String),
}

/// Live migration, as the control socket drives it.
pub trait MigrationControl: Send + Sync + std::fmt::Debug {
    /// Starts migrating to the destination VMM listening on `to`; the work goes on in the
    /// background.
    fn start(
        &self,
        to: &std::path::Path,
        policy: quantix_vmm_api::control::MigrationPolicy,
    ) -> Result<quantix_vmm_api::control::MigrationStatus, MigrationRefusal>;
    /// The current or last migration's progress.
    fn status(&self) -> quantix_vmm_api::control::MigrationStatus;
    /// Cancels the migration under way (before the switch).
    fn cancel(&self) -> Result<quantix_vmm_api::control::MigrationStatus, MigrationRefusal>;
    /// Whether a migration is under way (pause, resume and snapshots wait for its end).
    fn active(&self) -> bool;
}

/// The guest's power button, as the control socket presses it.
pub trait PowerButtonControl: Send + Sync + std::fmt::Debug {
    /// Presses the button; returns whether the guest has enabled the interrupt that
    /// carries the press (an ACPI guest has; one without ACPI will never react).
    fn press(&self) -> io::Result<bool>;
}
