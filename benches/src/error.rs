//! Errors of the benchmark harness (not of the VMMs under test: a VMM run that fails is a
//! result, reported as such).

use std::path::PathBuf;

use quantix_sandbox::SandboxError;

/// Everything that stops a benchmark from producing figures.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The sandbox failed: infrastructure (the nested host hung, crashed...) or setup
    /// (assets missing, a static build failed). The sandbox's own message follows.
    #[error("{0}")]
    Sandbox(#[from] SandboxError),

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A build or helper command failed.
    #[error("`{command}` failed: {reason}")]
    Command {
        /// The command line.
        command: String,
        /// Exit status and output.
        reason: String,
    },

    /// The results could not be encoded as JSON.
    #[error("writing {path}: {source}")]
    Json {
        /// The output file.
        path: PathBuf,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },

    /// Something the benchmark needs is missing on this machine.
    #[error("{0}")]
    Unavailable(String),

    /// The node agent under benchmark failed (a call returned an error, it did not start).
    #[error("node agent: {0}")]
    Agent(String),

    /// A benchmark does not know how to run this VMM (the I/O benchmarks drive
    /// quantix-vmm and QEMU only).
    #[error("{bench} cannot run {vmm}")]
    NotDriven {
        /// The benchmark.
        bench: &'static str,
        /// The VMM.
        vmm: String,
    },

    /// A peer VMM's binary, given by path, is not there.
    #[error("{vmm}: no such file {path} (give the path of a {vmm} binary, e.g. ../shared/peers/)")]
    MissingPeer {
        /// Which VMM.
        vmm: String,
        /// The path given.
        path: std::path::PathBuf,
    },

    /// A VMM produced no usable sample at all: there is nothing to compare.
    #[error("no successful run of {vmm}: {detail}")]
    NoSamples {
        /// Which VMM.
        vmm: String,
        /// The failures, summarised.
        detail: String,
    },
}

impl BenchError {
    /// Builds [`BenchError::Io`].
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        BenchError::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit status for this error: 3 for a sandbox infrastructure failure,
    /// 1 for everything else (2 is clap's usage error).
    pub fn exit_status(&self) -> u8 {
        match self {
            BenchError::Sandbox(e) if e.is_infrastructure() => 3,
            _ => 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantix_sandbox::InfraFailure;

    #[test]
    fn exit_statuses() {
        let infra = BenchError::Sandbox(SandboxError::Infrastructure {
            failure: InfraFailure::HostHung {
                during: "in job `qemu-1`".into(),
                waited: std::time::Duration::from_secs(60),
            },
            attempts: 2,
            log: PathBuf::from("/x/console-2.log"),
            console_tail: "last".into(),
        });
        assert_eq!(infra.exit_status(), 3);
        assert!(infra.to_string().contains("hung"), "{infra}");
        let missing = BenchError::Sandbox(SandboxError::AssetsMissing {
            reason: "no manifest".into(),
        });
        assert_eq!(missing.exit_status(), 1);
        assert!(missing.to_string().contains("scripts/sandbox-assets"));
    }
}
