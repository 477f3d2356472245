//! Errors of the sandbox.
//!
//! [`SandboxError`] separates *infrastructure* failures (the nested host did
//! not come up, hung, lost a frame: nothing to do with the product under
//! test) from every other error (bad input, missing assets, I/O). Product
//! results (a job's exit status, a job's time-out) are never errors: they are
//! reported in [`crate::JobResult`].

use std::path::PathBuf;
use std::time::Duration;

use crate::job::JobResult;

/// Everything that can go wrong while preparing or running a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The assets made by `scripts/sandbox-assets` are not there.
    #[error(
        "sandbox assets not found: {reason}. Run `scripts/sandbox-assets` to create them \
         (see docs/testing.md)"
    )]
    AssetsMissing {
        /// What was looked for and where.
        reason: String,
    },

    /// The manifest exists but does not describe usable assets.
    #[error("sandbox assets described by {manifest} are unusable: {reason}. Re-run `scripts/sandbox-assets`")]
    AssetsInvalid {
        /// The manifest file.
        manifest: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A payload entry cannot be added.
    #[error("invalid payload entry {dest}: {reason}")]
    InvalidPayload {
        /// Destination path inside the nested host.
        dest: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A job is malformed (bad name, empty argv, duplicate name...).
    #[error("invalid job {name:?}: {reason}")]
    InvalidJob {
        /// The job's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },

    /// An I/O operation on the host failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done (names the path or command).
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A helper command on the host (e.g. `ldd`) failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Why it failed (exit status, stderr).
        reason: String,
    },

    /// The sandbox itself failed, not the product under test.
    #[error(
        "sandbox infrastructure failure after {attempts} attempt(s): {failure}\n\
         console log: {}\n--- last console lines ---\n{console_tail}",
        log.display()
    )]
    Infrastructure {
        /// The failure of the last attempt.
        failure: InfraFailure,
        /// How many attempts were made.
        attempts: u32,
        /// The raw console log of the last attempt.
        log: PathBuf,
        /// The last lines of that log, for a quick look.
        console_tail: String,
    },

    /// The nested host died or hung after a job under test had begun. This is a product
    /// failure until shown otherwise (the product may have crashed or wedged the nested
    /// host's kernel), so it is never retried.
    #[error("{0}")]
    HostDied(Box<HostDeath>),
}

/// What is known of a nested host that died once a job under test had begun.
#[derive(Debug, Clone)]
pub struct HostDeath {
    /// How the nested host failed (hung, QEMU exited).
    pub failure: InfraFailure,
    /// The job running when it failed (`in_job`), else the last job under test that ran.
    pub job: String,
    /// Whether `job` was running when the host failed (false: between jobs).
    pub in_job: bool,
    /// The jobs that ended before.
    pub completed: Vec<JobResult>,
    /// The last lines of the running job's output.
    pub job_output_tail: String,
    /// The nested host kernel's panic, oops and lockup lines from the whole console
    /// ([`crate::death::death_lines`]).
    pub death: String,
    /// Where the nested host's CPU was when it hung (QEMU's monitor); empty otherwise.
    pub cpu: String,
    /// Attempts made (earlier ones failed as infrastructure, before any job under test).
    pub attempts: u32,
    /// The raw console log of the attempt.
    pub log: PathBuf,
    /// The last lines of that log.
    pub console_tail: String,
}

impl std::fmt::Display for HostDeath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the nested host died {} `{}` (a job under test had begun): {}\n\
             {} job(s) had ended before it. console log: {}\n\
             --- the nested host's kernel said ---\n{}\n\
             {}\
             --- output of `{}` so far (last lines) ---\n{}\n\
             --- last console lines ---\n{}",
            if self.in_job {
                "while running job"
            } else {
                "after job"
            },
            self.job,
            self.failure,
            self.completed.len(),
            self.log.display(),
            self.death,
            if self.cpu.is_empty() {
                String::new()
            } else {
                format!("--- where its CPU was (QEMU's monitor) ---\n{}\n", self.cpu)
            },
            self.job,
            self.job_output_tail,
            self.console_tail
        )
    }
}

impl SandboxError {
    /// Builds an [`SandboxError::Io`] with its context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SandboxError::Io {
            context: context.into(),
            source,
        }
    }

    /// True for infrastructure failures (as opposed to bad input or product results).
    pub fn is_infrastructure(&self) -> bool {
        matches!(self, SandboxError::Infrastructure { .. })
    }
}

/// Why the nested host failed as infrastructure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfraFailure {
    /// QEMU could not be started.
    #[error("could not start QEMU ({command}): {reason}")]
    QemuSpawn {
        /// The command line.
        command: String,
        /// The OS error.
        reason: String,
    },

    /// The nested host did not print its readiness frame in time.
    #[error("the nested host was not ready after {waited:?}")]
    HostNotReady {
        /// How long we waited.
        waited: Duration,
    },

    /// The nested host came up but could not set itself up (e.g. kvm-amd
    /// did not load, no /dev/kvm). Deterministic: not retried.
    #[error("the nested host failed to set up: {reason} ({detail})")]
    HostSetup {
        /// Short reason word from the `QX-HOST-FAIL` frame.
        reason: String,
        /// The rest of the frame.
        detail: String,
    },

    /// Nothing progressed within a deadline: a hung nested host.
    #[error("the nested host hung: no progress {during} within {waited:?}")]
    HostHung {
        /// What it was doing (e.g. "in job `boot`").
        during: String,
        /// The deadline that passed.
        waited: Duration,
    },

    /// QEMU exited before all jobs had reported (kernel panic, reboot...).
    #[error("QEMU exited ({status}) {during}")]
    QemuExited {
        /// QEMU's exit status.
        status: String,
        /// What the nested host was doing.
        during: String,
    },

    /// The frames on the console do not follow the protocol.
    #[error("console framing broken: {detail}")]
    Framing {
        /// What was expected and what was seen.
        detail: String,
    },
}

impl InfraFailure {
    /// Whether trying again may help (hangs and crashes may; a host that
    /// cannot load its modules will not).
    pub fn is_retriable(&self) -> bool {
        !matches!(
            self,
            InfraFailure::HostSetup { .. } | InfraFailure::QemuSpawn { .. }
        )
    }
}
