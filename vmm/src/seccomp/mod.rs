//! Seccomp filters, one per kind of thread, built with `seccompiler` as allow-lists.
//!
//! | kind | threads | installed |
//! |---|---|---|
//! | [`Kind::Vmm`] | the main loop (control socket, signals, exit), the console and serial socket threads, the serial flusher | main: after the VM is built, before any vCPU runs; socket threads: as they start |
//! | [`Kind::Vcpu`] | `vcpuN` | by each vCPU thread before its first `KVM_RUN` |
//! | [`Kind::Launcher`] | `launcher`: starts device threads on behalf of vCPU threads (which may not create threads) | as it starts, before any device |
//! | [`Kind::Device`] | virtio device workers and block I/O threads | by the launcher's new thread before the device code runs |
//! | [`Kind::Pager`] | `pager` of a lazy restore: `pread64` of the snapshot, `UFFDIO_COPY` | as it starts, before it serves a page |
//!
//! A filter applies to the thread that installs it and to the threads it creates later,
//! on top of their own: the main thread's filter allows what vCPU threads need, and the
//! launcher's what device threads need.
//!
//! A syscall outside the list, with `--seccomp kill` (the default), raises SIGSYS
//! (`SECCOMP_RET_TRAP`); the handler ([`trap`]) writes the exit record (`seccomp`, with
//! the syscall number and the thread) and ends the process with [`EXIT_SECCOMP`]. `log`
//! lets the call through and has the kernel log it (the audit log: `dmesg`); `off`
//! installs nothing. See docs/security.md.

mod filters;
mod glibc;
pub mod launcher;
pub mod trap;

use std::cell::Cell;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction};
use thiserror::Error;

pub use filters::Kind;

/// The exit status (and record code) of a VMM that a filter stopped.
pub use quantix_vmm_api::exit::EXIT_SECCOMP;
/// What a call outside the list does (the configuration's type).
pub use quantix_vmm_api::SeccompMode as Mode;

/// A filter that cannot be built or installed.
#[derive(Debug, Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in the lists).
    #[error("seccomp filter {kind:?}: {reason}")]
    Build {
        /// Which filter.
        kind: Kind,
        /// Why.
        reason: String,
    },
    /// The kernel refused it.
    #[error("installing the {kind:?} seccomp filter: {reason}")]
    Install {
        /// Which filter.
        kind: Kind,
        /// Why.
        reason: String,
    },
}

static MODE: OnceLock<Mode> = OnceLock::new();
static PROBE: OnceLock<Option<Kind>> = OnceLock::new();
/// Every kind's programs, built once by [`init`]: a thread that installs its filter then
/// allocates nothing (a new thread's first allocation can make glibc read
/// /sys/devices/system/cpu, under a filter that forbids it).
static PROGRAMS: OnceLock<Vec<(Kind, Vec<BpfProgram>)>> = OnceLock::new();
/// The pager's programs, built by the first pager thread (a lazy restore's, a post-copy's:
/// each starts before any filter, so it may allocate) and only then: most VMs never page.
static PAGER: OnceLock<Result<Vec<BpfProgram>, String>> = OnceLock::new();
/// The mismatch action of this process's filters.
static MISMATCH: OnceLock<SeccompAction> = OnceLock::new();

/// Sets the process's mode (once, before any thread starts) and, for `kill`, the SIGSYS
/// handler; `probe` is the test hook of [`probe`].
pub fn init(mode: Mode, probe: Option<Kind>) -> Result<(), SeccompError> {
    let _ = MODE.set(mode);
    let _ = PROBE.set(probe);
    // glibc's malloc reads kernel files lazily from any thread: answered here, before any
    // filter could refuse the read.
    glibc::settle();
    if mode != Mode::Off {
        let mismatch = match mode {
            Mode::Kill => SeccompAction::Trap,
            _ => SeccompAction::Log,
        };
        let started = std::time::Instant::now();
        let _ = MISMATCH.set(mismatch.clone());
        let mut all = Vec::new();
        for kind in [Kind::Vmm, Kind::Vcpu, Kind::Launcher, Kind::Device] {
            all.push((kind, filters::build(kind, mismatch.clone())?));
        }
        let _ = PROGRAMS.set(all);
        tracing::debug!(
            us = started.elapsed().as_micros() as u64,
            "seccomp filters built"
        );
    }
    if mode == Mode::Kill {
        trap::install_handler().map_err(|e| SeccompError::Install {
            kind: Kind::Vmm,
            reason: format!("SIGSYS handler: {e}"),
        })?;
    }
    Ok(())
}

/// The process's mode; `off` until [`init`] (tests and fuzzers that never call it).
pub fn mode() -> Mode {
    MODE.get().copied().unwrap_or(Mode::Off)
}

thread_local! {
    /// The filter this thread installed last, for the SIGSYS handler (const-initialised:
    /// reading it in a signal handler allocates nothing).
    static KIND: Cell<Option<Kind>> = const { Cell::new(None) };
    /// The thread's name, NUL-padded, for the SIGSYS handler.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Installs `kind`'s filter on the calling thread (nothing when the mode is `off`).
pub fn install(kind: Kind) -> Result<(), SeccompError> {
    let mode = mode();
    if mode == Mode::Off {
        return Ok(());
    }
    // The thread's identity first, for a refusal from here on.
    let mut name = [0u8; 16];
    if let Some(n) = std::thread::current().name() {
        let n = n.as_bytes();
        let len = n.len().min(15);
        name[..len].copy_from_slice(&n[..len]);
    }
    NAME.with(|c| c.set(name));
    KIND.with(|c| c.set(Some(kind)));
    let not_built = || SeccompError::Install {
        kind,
        reason: "the filters were not built (seccomp::init was not called)".into(),
    };
    let progs = match kind {
        Kind::Pager => {
            let mismatch = MISMATCH.get().cloned().ok_or_else(not_built)?;
            PAGER
                .get_or_init(|| filters::build(Kind::Pager, mismatch).map_err(|e| e.to_string()))
                .as_ref()
                .map_err(|reason| SeccompError::Install {
                    kind,
                    reason: reason.clone(),
                })?
        }
        _ => PROGRAMS
            .get()
            .and_then(|all| all.iter().find(|(k, _)| *k == kind))
            .map(|(_, p)| p)
            .ok_or_else(not_built)?,
    };
    for p in progs {
        seccompiler::apply_filter(p).map_err(|e| SeccompError::Install {
            kind,
            reason: e.to_string(),
        })?;
    }
    tracing::debug!(?kind, ?mode, "seccomp filter installed");
    Ok(())
}

/// The test hook of `--seccomp-probe`: a thread of the chosen kind makes a call no filter
/// allows (getppid) right after installing its filter.
pub fn probe(kind: Kind) {
    if PROBE.get().copied().flatten() == Some(kind) {
        tracing::warn!(?kind, "seccomp probe: making a forbidden call on purpose");
        // SAFETY: getppid has no arguments and no effect.
        unsafe { libc::getppid() };
    }
}

/// The kind and name of the calling thread, as the SIGSYS handler reports them.
pub(crate) fn current() -> (Option<Kind>, [u8; 16]) {
    (KIND.with(|c| c.get()), NAME.with(|c| c.get()))
}
