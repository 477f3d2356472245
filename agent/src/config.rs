//! The agent's configuration: embedded defaults, then a TOML file, then command-line flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// A configuration problem.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// A value is wrong.
    #[error("{0}")]
    Invalid(String),
}

/// How the agent reads VM consoles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleMode {
    /// `socket` when the VMM supports `--serial socket=PATH`, else `file`.
    Auto,
    /// The VMM's serial socket (input and output).
    Socket,
    /// The VMM's serial file (output only).
    File,
}

/// The agent's settings. Every field has an embedded default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, VM directories and the Unix socket live.
    pub state_dir: PathBuf,
    /// gRPC on TCP, "host:port"; empty to disable.
    pub listen: String,
    /// gRPC on a Unix socket; empty for `<state_dir>/agent.sock`.
    pub socket: String,
    /// Prometheus metrics over HTTP, "host:port"; empty to disable.
    pub metrics_listen: String,
    /// The `quantix-vmm` binary; empty for the one next to the agent's binary, else PATH.
    pub vmm_binary: String,
    /// Total vCPUs running VMs may commit; 0 for 4 per host CPU.
    pub max_vcpus: u32,
    /// Total guest memory (MiB) running VMs may commit; 0 for the host's memory less 512 MiB.
    pub max_memory_mib: u64,
    /// Name of the agent's parent cgroup.
    pub cgroup_name: String,
    /// How consoles are read.
    pub console: ConsoleMode,
    /// Seconds a reboot gives the guest to power off after its power button is pressed,
    /// before its VMM is stopped (StopVm takes its own `timeout_ms`).
    pub stop_timeout_secs: u64,
    /// Longest pause between two policy restarts of a VM, in seconds.
    pub restart_backoff_max_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/quantix-agent"),
            listen: "127.0.0.1:7700".into(),
            socket: String::new(),
            metrics_listen: "127.0.0.1:9700".into(),
            vmm_binary: String::new(),
            max_vcpus: 0,
            max_memory_mib: 0,
            cgroup_name: "quantix-agent".into(),
            console: ConsoleMode::Auto,
            stop_timeout_secs: 10,
            restart_backoff_max_secs: 30,
        }
    }
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_path_buf(),
            source,
        })
    }

    /// The Unix socket path.
    pub fn socket_path(&self) -> PathBuf {
        if self.socket.is_empty() {
            self.state_dir.join("agent.sock")
        } else {
            PathBuf::from(&self.socket)
        }
    }

    /// The VMM binary to run.
    pub fn vmm_path(&self) -> PathBuf {
        if !self.vmm_binary.is_empty() {
            return PathBuf::from(&self.vmm_binary);
        }
        if let Some(sibling) = std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("quantix-vmm")))
            .filter(|p| p.exists())
        {
            return sibling;
        }
        PathBuf::from("quantix-vmm")
    }

    /// Checks values that have no valid meaning.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.state_dir.is_absolute() {
            return Err(ConfigError::Invalid(format!(
                "state_dir {:?} must be an absolute path",
                self.state_dir
            )));
        }
        if self.cgroup_name.is_empty() || self.cgroup_name.contains('/') {
            return Err(ConfigError::Invalid(format!(
                "cgroup_name {:?} must be a non-empty name without '/'",
                self.cgroup_name
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("state_dir = \"/tmp/x\"\nmax_vcpus = 3\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_vcpus, 3);
        assert_eq!(c.listen, "127.0.0.1:7700");
        assert!(toml::from_str::<Config>("nope = 1").is_err());
        let c: Config = toml::from_str("console = \"file\"").unwrap();
        assert_eq!(c.console, ConsoleMode::File);
        assert!(Config {
            state_dir: "rel".into(),
            ..Config::default()
        }
        .validate()
        .is_err());
    }
}
