//! Why a VM stopped, and the process exit status that says so.

use std::sync::Mutex;

use quantix_devices::{PowerAction, PowerControl};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use quantix_vmm_api::exit::*;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; the process ends and its supervisor decides on a restart.
    Reset,
    /// A stop was requested on the control socket.
    ApiShutdown,
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// vCPU `vcpu` triple-faulted.
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// KVM failed to run vCPU `vcpu`.
    KvmError {
        /// The vCPU.
        vcpu: u8,
        /// What KVM said.
        detail: String,
    },
    /// vCPU `vcpu` exited for an unhandled reason.
    Unhandled {
        /// The vCPU.
        vcpu: u8,
        /// The exit.
        exit: String,
    },
    /// The guest reported a crash.
    GuestCrash,
    /// The VMM itself failed.
    VmmError(String),
    /// The VM was migrated: it runs in another VMM now.
    Migrated {
        /// From the pause here to the destination's report that the guest runs, ms.
        downtime_ms: u64,
        /// The whole migration, ms.
        total_ms: u64,
    },
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::PowerOff
            | ExitReason::Reset
            | ExitReason::ApiShutdown
            | ExitReason::Migrated { .. } => EXIT_OK,
            ExitReason::Signal(sig) => 128 + sig,
            ExitReason::TripleFault { .. } => EXIT_TRIPLE_FAULT,
            ExitReason::KvmError { .. } => EXIT_KVM_ERROR,
            ExitReason::Unhandled { .. } => EXIT_UNHANDLED,
            ExitReason::GuestCrash => EXIT_GUEST_CRASH,
            ExitReason::VmmError(_) => EXIT_VMM_ERROR,
        }
    }

    /// A short machine-readable name (used in logs and on the control socket).
    pub fn name(&self) -> &'static str {
        match self {
            ExitReason::PowerOff => "poweroff",
            ExitReason::Reset => "reboot",
            ExitReason::ApiShutdown => "api-shutdown",
            ExitReason::Signal(_) => "signal",
            ExitReason::TripleFault { .. } => "triple-fault",
            ExitReason::KvmError { .. } => "kvm-error",
            ExitReason::Unhandled { .. } => "unhandled-exit",
            ExitReason::GuestCrash => "guest-crash",
            ExitReason::VmmError(_) => "vmm-error",
            ExitReason::Migrated { .. } => "migrated",
        }
    }
}

/// The record for a VM that ran and stopped for `reason`.
pub fn record_of(reason: &ExitReason) -> ExitRecord {
    let detail = match reason {
        ExitReason::Signal(sig) => format!("signal {sig}"),
        ExitReason::TripleFault { vcpu } => format!("vCPU {vcpu} triple-faulted"),
        ExitReason::KvmError { vcpu, detail } => format!("vCPU {vcpu}: {detail}"),
        ExitReason::Unhandled { vcpu, exit } => format!("vCPU {vcpu}: {exit}"),
        ExitReason::VmmError(e) => e.clone(),
        ExitReason::Migrated {
            downtime_ms,
            total_ms,
        } => format!("downtime {downtime_ms} ms, total {total_ms} ms"),
        _ => String::new(),
    };
    ExitRecord {
        code: reason.exit_code(),
        reason: reason.name().to_string(),
        detail,
    }
}

/// Writes `record` to `path` atomically (a temporary file renamed over it), so that a
/// reader sees either nothing or the whole record.
pub fn write_record(record: &ExitRecord, path: &std::path::Path) -> std::io::Result<()> {
    let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    // O_NOFOLLOW: a symlink planted at the temporary name is not written through.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(&json)?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// The one place where every part of the VMM asks the VM to stop. The first reason wins;
/// the eventfd wakes the main loop.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl ExitSignal {
    /// A signal with no reason yet.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Asks the VM to stop for `reason` (ignored if a reason was already given).
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            tracing::info!(reason = reason.name(), detail = ?reason, "VM stop requested");
            *slot = Some(reason);
        }
        drop(slot);
        // A full eventfd counter already wakes the loop; nothing more to do on error.
        let _ = self.evt.write(1);
    }

    /// The reason given, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd that becomes readable on a request.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl PowerControl for ExitSignal {
    fn request(&self, action: PowerAction) {
        ExitSignal::request(
            self,
            match action {
                PowerAction::PowerOff => ExitReason::PowerOff,
                PowerAction::Reset => ExitReason::Reset,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_codes_are_distinct() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        PowerControl::request(&s, PowerAction::PowerOff);
        s.request(ExitReason::TripleFault { vcpu: 0 });
        assert_eq!(s.reason(), Some(ExitReason::PowerOff));
        assert!(s.eventfd().read().unwrap() >= 1);

        let codes = [
            ExitReason::TripleFault { vcpu: 0 }.exit_code(),
            ExitReason::KvmError {
                vcpu: 0,
                detail: String::new(),
            }
            .exit_code(),
            ExitReason::Unhandled {
                vcpu: 0,
                exit: String::new(),
            }
            .exit_code(),
            ExitReason::GuestCrash.exit_code(),
            ExitReason::VmmError(String::new()).exit_code(),
            EXIT_SETUP_ERROR,
            EXIT_USAGE,
            EXIT_OK,
        ];
        let mut sorted = codes.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), codes.len());
        assert_eq!(ExitReason::Signal(15).exit_code(), 143);
        assert_eq!(ExitReason::Reset.exit_code(), 0);
    }

    #[test]
    fn exit_record_round_trips_through_a_file() {
        let dir = std::env::temp_dir().join(format!("qx-exit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("exit.json");
        let rec = record_of(&ExitReason::TripleFault { vcpu: 1 });
        write_record(&rec, &path).unwrap();
        let back: ExitRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back, rec);
        assert_eq!(back.code, EXIT_TRIPLE_FAULT);
        assert_eq!(back.reason, "triple-fault");
        assert!(!dir.join("exit.json.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
