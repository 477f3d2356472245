//! Host files a VM may touch, opened so that nobody can swap them under us.
//!
//! - [`beneath`]: the agent opens a VM's kernel, initramfs, firmware and disk images only
//!   beneath configured directories, with `openat2(RESOLVE_BENEATH)`, so that neither `..`
//!   nor a symlink leads out of them, and hands the open file to the VMM.
//! - [`inherit`]: the VMM takes such a file as `/dev/fd/N` without reopening anything.
//! - [`lock`]: images are locked while a VM uses them (open file description locks:
//!   exclusive for read-write, shared for read-only), and a conflict names who holds it.
//!
//! See docs/security.md.

pub mod beneath;
pub mod inherit;
pub mod lock;
pub mod tap;

/// How a file is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only (a kernel, a read-only disk).
    ReadOnly,
    /// Read and write (a disk).
    ReadWrite,
}
