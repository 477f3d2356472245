//! Nested KVM sandbox for end-to-end tests.
//!
//! This machine's `/dev/kvm` cannot boot an unmodified Linux kernel, so
//! end-to-end tests run inside a *nested host*: QEMU with TCG emulating an
//! AMD CPU with SVM, booting Debian's cloud kernel with a busybox initramfs
//! that loads `kvm-amd` and so has a real `/dev/kvm`. Inside it, the VMM
//! under test (or Debian's QEMU, for comparison) boots the same kernel as a
//! nested guest.
//!
//! A run takes a [`Payload`] (files and binaries put into the nested host)
//! and a list of [`Job`]s (commands run in order, each with a wall-clock
//! limit), and returns a [`Report`] with one [`JobResult`] per job (exit
//! status, time-out, output, elapsed time) and the raw console log.
//! Infrastructure failures ([`SandboxError::Infrastructure`]) are kept apart
//! from product results. See `docs/testing.md`.
//!
//! ```no_run
//! # fn main() -> Result<(), quantix_sandbox::SandboxError> {
//! use std::time::Duration;
//! use quantix_sandbox::{paths, Job, Payload, Sandbox};
//!
//! let sandbox = Sandbox::from_env()?; // assets from scripts/sandbox-assets
//! let mut payload = Payload::new();
//! payload.add_file("target/release/quantix-vmm", "/payload/quantix-vmm")?;
//! let jobs = [Job::new(
//!     "boot",
//!     ["quantix-vmm", "--kernel", paths::GUEST_VMLINUX, "--initrd", paths::GUEST_INITRAMFS],
//! )
//! .timeout(Duration::from_secs(60))];
//! let report = sandbox.run(&payload, &jobs)?;
//! assert!(report.jobs[0].output.contains("QX-GUEST-INIT"));
//! # Ok(()) }
//! ```

mod assets;
pub mod build;
mod cpio;
pub mod death;
mod error;
pub mod frames;
mod guest;
mod initramfs;
mod job;
pub mod kvm_trace;
mod lock;
mod monitor;
pub mod paths;
mod payload;
mod qemu;
mod sandbox;
mod script;

pub use assets::{default_assets_dir, Assets, ASSETS_ENV};
pub use cpio::CpioWriter;
pub use error::{HostDeath, InfraFailure, SandboxError};
pub use guest::{console_field, GuestInit, GuestInitramfs, GUEST_SCRIPT};
pub use job::{Job, JobResult, JobRole, DEFAULT_JOB_TIMEOUT};
pub use payload::Payload;
pub use sandbox::{
    default_work_dir, Report, Sandbox, SandboxConfig, KEEP_ENV, RETRY_LEDGER, WORK_DIR_ENV,
};
