//! How `quantix-vmm` ends: its exit statuses, and the record `--exit-file` leaves behind
//! for a supervisor that is not its parent (one that re-adopted it after a restart cannot
//! wait for its status).

use serde::{Deserialize, Serialize};

/// Exit status: the guest powered off or rebooted, or a stop was requested through the API.
pub const EXIT_OK: i32 = 0;
/// Exit status: the VM could not be set up (bad input, KVM unavailable, ...).
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Exit status: the command line could not be parsed.
pub const EXIT_USAGE: i32 = 2;
/// Exit status: a vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
pub const EXIT_TRIPLE_FAULT: i32 = 3;
/// Exit status: KVM reported an internal error or a failed VM entry.
pub const EXIT_KVM_ERROR: i32 = 4;
/// Exit status: a vCPU exited for a reason the VMM does not handle.
pub const EXIT_UNHANDLED: i32 = 5;
/// Exit status: the guest reported a crash (KVM system event).
pub const EXIT_GUEST_CRASH: i32 = 6;
/// Exit status: the VMM failed while the VM ran.
pub const EXIT_VMM_ERROR: i32 = 7;
/// Exit status: a seccomp filter refused a system call.
pub const EXIT_SECCOMP: i32 = 8;

/// The record's reason when the VM could not be set up.
pub const REASON_SETUP_ERROR: &str = "setup-error";
/// The record's reason when a seccomp filter stopped the VMM.
pub const REASON_SECCOMP: &str = "seccomp";

/// Why the VMM exited, as `--exit-file` records it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// The process exit status.
    pub code: i32,
    /// A machine-readable reason: `poweroff`, `reboot`, `api-shutdown`, `signal`,
    /// `triple-fault`, `kvm-error`, `unhandled-exit`, `guest-crash`, `vmm-error`, `migrated`,
    /// [`REASON_SECCOMP`] or [`REASON_SETUP_ERROR`].
    pub reason: String,
    /// Human-readable detail.
    #[serde(default)]
    pub detail: String,
}

impl ExitRecord {
    /// The record of a VM that could not be set up.
    pub fn setup_error(detail: impl Into<String>) -> Self {
        Self {
            code: EXIT_SETUP_ERROR,
            reason: REASON_SETUP_ERROR.into(),
            detail: detail.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_reads_what_the_seccomp_handler_writes() {
        // The SIGSYS handler formats this by hand (it may not allocate): the shared type
        // must read it.
        let r: ExitRecord = serde_json::from_str(
            r#"{"code":8,"reason":"seccomp","detail":"syscall 41 on thread vcpu0 (filter vcpu)"}"#,
        )
        .unwrap();
        assert_eq!(r.code, EXIT_SECCOMP);
        assert_eq!(r.reason, REASON_SECCOMP);
        let s = ExitRecord::setup_error("no kernel");
        let back: ExitRecord = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
