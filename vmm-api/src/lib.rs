//! The contract between `quantix-vmm` and every program that drives it (the node agent,
//! `quantixctl`, the benches, people's own supervisors): one set of serde types, and every
//! limit on their values, defined once.
//!
//! - [`config`]: the whole VM configuration ([`config::VmConfig`]), which
//!   `quantix-vmm --config vm.json` reads and the command-line flags build; the flag
//!   syntax of disks, cards, vsock and consoles, parsed here for every client.
//! - [`control`]: the control socket's requests and replies, and its protocol version.
//! - [`metrics`]: the counters sample the `metrics` op returns.
//! - [`exit`]: the exit statuses and the record `--exit-file` leaves behind.
//! - [`limits`]: vCPUs, memory, ids, command line, CIDs.
//! - [`size`]: sizes and counts with K/M/G suffixes.
//!
//! This crate does no I/O: checks that need the host (files, sockets, RAM) are the VMM's.
//! Compatibility: fields are only ever added, with a default, so that an older client's
//! configuration stays valid; an unknown field is refused (a newer client's field that this
//! VMM does not know would otherwise be silently ignored). See docs/vmm.md.

pub mod config;
pub mod control;
pub mod exit;
pub mod limits;
pub mod mac;
pub mod metrics;
pub mod size;

pub use config::{
    BootSource, ConfigError, DiskConfig, EngineKind, NetBackend, NetConfig, RateLimit, SeccompMode,
    SerialMode, VmConfig, VsockConfig,
};
pub use exit::ExitRecord;
pub use size::MemorySize;
