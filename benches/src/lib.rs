//! Benchmarks of `quantix-vmm` side by side with QEMU (see `benches/README.md`).
//!
//! - [`boot`]: boot-to-init time and VMM memory, quantix-vmm and QEMU microvm booting
//!   Debian's cloud kernel in the same nested KVM host (`quantix-sandbox`), measured from
//!   inside that host by the static `qx-probe` binary ([`probe`], [`smaps`]).
//! - [`first_insn`]: process start to the first guest instruction on this host's
//!   /dev/kvm, with tiny hand-made guests ([`guest`]).
//! - [`agent`]: the node agent's API latency (create-to-running, list, stop) under
//!   concurrent clients, VMs started per second, and the agent's memory and CPU per VM.
//!
//! - [`block`], [`net`]: virtio-blk and virtio-net throughput, IOPS, latency and the
//!   VMM's host CPU, quantix-vmm and QEMU microvm in the same nested host, driven by the
//!   static `qx-io` tool ([`blockio`], [`pattern`], [`netio`], [`procstat`],
//!   [`iorecord`]); [`iobench`] holds their shared statistics and report.
//!   [`pattern`] and [`blockio`] are also the data-integrity writer/verifier of
//!   `vmm/tests/nested_integrity.rs`.
//!
//! - `jail` ([`jail`]): what the agent's jail and the seccomp filters cost: boot, block and
//!   network, quantix-vmm jailed (the static `qx-jail` in front of `quantix-jailer`) and
//!   unconfined, alternating.
//!
//! - [`snapshot`]: full and diff snapshots (time, time paused, size) and
//!   restore-to-running on this host's /dev/kvm, quantix-vmm beside Firecracker's
//!   snapshot API and QEMU's migration to a file, with [`guest::fill_and_tick`].
//!
//! [`probe`], [`smaps`] and [`stats`] are pure logic with unit tests; [`probe`] and
//! [`smaps`] use the standard library only, as `qx-probe` does; so do the modules
//! `qx-io` uses (libc aside).

pub mod agent;
pub mod block;
pub mod blockio;
pub mod boot;
pub mod error;
pub mod first_insn;
pub mod guest;
pub mod iobench;
pub mod iorecord;
pub mod jail;
pub mod net;
pub mod netio;
pub mod pattern;
pub mod probe;
pub mod procstat;
pub mod report;
pub mod smaps;
pub mod smp;
pub mod snapshot;
pub mod stats;

pub use error::BenchError;
