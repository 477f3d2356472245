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

/// Whether VMs need their cgroups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupMode {
    /// A VM whose cgroups cannot be made does not start.
    Required,
    /// VMs run without cgroups (no CPU, memory or task limits).
    Off,
}

/// The agent's settings. Every field has an embedded default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, VM directories and the Unix socket live.
    pub state_dir: PathBuf,
    /// gRPC on TCP, "host:port"; empty (the default) for none. Needs the `tls_*` keys, or
    /// `insecure_tcp` on a loopback address.
    pub listen: String,
    /// gRPC on a Unix socket; empty for `<state_dir>/agent.sock`.
    pub socket: String,
    /// The Unix socket's group (mode 0660), by name or number. Unset: `quantix` when that
    /// group exists, else root's group (root only).
    pub socket_group: Option<String>,
    /// Unix groups (names or numbers) whose members are admins. Unset: `quantix-admin`
    /// when that group exists. Root and the agent's own uid are always admins.
    pub admin_groups: Option<Vec<String>>,
    /// Unix groups whose members are viewers. Unset: the socket's group.
    pub viewer_groups: Option<Vec<String>>,
    /// The agent's TLS certificate chain (PEM) for `listen`.
    pub tls_cert: String,
    /// Its private key (PEM).
    pub tls_key: String,
    /// The CA (PEM) that signs client certificates; clients without one are refused.
    pub tls_client_ca: String,
    /// Client certificates with one of these organizational units (OU) are admins.
    pub tls_admin_ous: Vec<String>,
    /// Client certificates with one of these OUs are viewers.
    pub tls_viewer_ous: Vec<String>,
    /// Plain TCP without TLS on `listen`: only on a loopback address, and every caller is an
    /// admin. For debugging.
    pub insecure_tcp: bool,
    /// Directories that kernels, initramfs and disk images may come from (regular files and
    /// block devices beneath them). Empty: `<state_dir>/images`.
    pub image_dirs: Vec<PathBuf>,
    /// The prefixes a VM's TAP names must start with (the agent opens the TAP, creating it
    /// if needed, and hands it to the VMM); other interfaces are refused.
    pub tap_prefixes: Vec<String>,
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
    /// `required` (a VM whose cgroups cannot be made does not start) or `off`.
    pub cgroups: CgroupMode,
    /// Run every VMM in a jail (quantix-jailer: own uid, no capabilities, namespaces,
    /// pivot_root, seccomp). `false` only for debugging.
    pub jail: bool,
    /// The quantix-jailer binary; empty for the one next to the agent's binary, else PATH.
    pub jailer_binary: String,
    /// The first uid (and gid) of the range jailed VMMs run as.
    pub jail_uid_base: u32,
    /// How many uids the range has (one per running VM).
    pub jail_uid_count: u32,
    /// How consoles are read.
    pub console: ConsoleMode,
    /// Seconds a reboot gives the guest to power off after its power button is pressed,
    /// before its VMM is stopped (StopVm takes its own `timeout_ms`).
    pub stop_timeout_secs: u64,
    /// Longest pause between two policy restarts of a VM, in seconds.
    pub restart_backoff_max_secs: u64,
    /// A VM's vmm.log and serial.log are rotated past this size (one old copy, `.1`, kept).
    pub log_max_bytes: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            state_dir: PathBuf::from("/var/lib/quantix-agent"),
            listen: String::new(),
            socket: String::new(),
            socket_group: None,
            admin_groups: None,
            viewer_groups: None,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_client_ca: String::new(),
            tls_admin_ous: vec!["admin".into()],
            tls_viewer_ous: vec!["viewer".into()],
            insecure_tcp: false,
            image_dirs: Vec::new(),
            tap_prefixes: vec!["qx".into()],
            metrics_listen: "127.0.0.1:9700".into(),
            vmm_binary: String::new(),
            max_vcpus: 0,
            max_memory_mib: 0,
            cgroup_name: "quantix-agent".into(),
            cgroups: CgroupMode::Required,
            jail: true,
            jailer_binary: String::new(),
            jail_uid_base: 2_100_000_000,
            jail_uid_count: 65_536,
            console: ConsoleMode::Auto,
            stop_timeout_secs: 10,
            restart_backoff_max_secs: 30,
            log_max_bytes: 8 << 20,
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

    /// The image directories: the configured ones, else `<state_dir>/images`.
    pub fn image_dirs(&self) -> Vec<PathBuf> {
        if self.image_dirs.is_empty() {
            vec![self.state_dir.join("images")]
        } else {
            self.image_dirs.clone()
        }
    }

    /// The VMM binary to run.
    pub fn vmm_path(&self) -> PathBuf {
        binary(&self.vmm_binary, "quantix-vmm")
    }

    /// The jailer binary to run.
    pub fn jailer_path(&self) -> PathBuf {
        binary(&self.jailer_binary, "quantix-jailer")
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
        if self.jail_uid_base == 0
            || self.jail_uid_count == 0
            || u64::from(self.jail_uid_base) + u64::from(self.jail_uid_count) > u64::from(u32::MAX)
        {
            return Err(ConfigError::Invalid(format!(
                "jail_uid_base {} and jail_uid_count {}: a non-empty range of uids above 0 \
                 and below 2^32-1",
                self.jail_uid_base, self.jail_uid_count
            )));
        }
        for d in &self.image_dirs {
            if !d.is_absolute() {
                return Err(ConfigError::Invalid(format!(
                    "image_dirs: {d:?} must be an absolute path"
                )));
            }
            // The store and every VM's sockets and logs must never be a VM's disk.
            if self.state_dir.starts_with(d) {
                return Err(ConfigError::Invalid(format!(
                    "image_dirs: {d:?} holds the state directory {:?}; a VM could be given \
                     the agent's own store as a disk",
                    self.state_dir
                )));
            }
            if d.starts_with(&self.state_dir) && !d.starts_with(self.state_dir.join("images")) {
                return Err(ConfigError::Invalid(format!(
                    "image_dirs: {d:?} is inside the state directory; only {:?} may be",
                    self.state_dir.join("images")
                )));
            }
        }
        if !self.listen.is_empty() {
            let tls = [&self.tls_cert, &self.tls_key, &self.tls_client_ca];
            let set = tls.iter().filter(|v| !v.is_empty()).count();
            if self.insecure_tcp {
                if set > 0 {
                    return Err(ConfigError::Invalid(
                        "insecure_tcp and the tls_* keys exclude each other".into(),
                    ));
                }
                let addrs = std::net::ToSocketAddrs::to_socket_addrs(self.listen.as_str())
                    .map_err(|e| ConfigError::Invalid(format!("listen {:?}: {e}", self.listen)))?
                    .collect::<Vec<_>>();
                if addrs.is_empty() || addrs.iter().any(|a| !a.ip().is_loopback()) {
                    return Err(ConfigError::Invalid(format!(
                        "listen {:?}: insecure_tcp is only allowed on a loopback address \
                         (plain TCP lets every local user and every host that reaches the \
                         address act as an admin); use tls_cert, tls_key and tls_client_ca",
                        self.listen
                    )));
                }
            } else if set != 3 {
                return Err(ConfigError::Invalid(format!(
                    "listen {:?} needs mutual TLS: tls_cert, tls_key and tls_client_ca \
                     (--tls-cert, --tls-key, --tls-client-ca); plain TCP only with \
                     insecure_tcp on a loopback address",
                    self.listen
                )));
            }
        }
        Ok(())
    }

    /// The caller-to-role mapping, with group names resolved through `group_file`.
    pub fn policy(&self, group_file: &Path) -> Result<crate::access::Policy, ConfigError> {
        let resolve = |names: &Option<Vec<String>>, default: &[&str], key: &str| {
            let mut gids = Vec::new();
            match names {
                Some(list) => {
                    for n in list {
                        gids.push(resolve(n, group_file)?.ok_or_else(|| {
                            ConfigError::Invalid(format!(
                                "{key}: no group {n:?} in {}",
                                group_file.display()
                            ))
                        })?);
                    }
                }
                None => {
                    for n in default {
                        gids.extend(resolve(n, group_file)?);
                    }
                }
            }
            Ok::<_, ConfigError>(gids)
        };
        let socket_gid = self.socket_gid(group_file)?;
        let socket_name = socket_gid.map(|g| g.to_string());
        let viewer_default: Vec<&str> = socket_name.iter().map(String::as_str).collect();
        // SAFETY: geteuid cannot fail.
        let me = unsafe { libc::geteuid() };
        let mut admin_uids = vec![0];
        if me != 0 {
            admin_uids.push(me);
        }
        Ok(crate::access::Policy {
            admin_uids,
            admin_gids: resolve(&self.admin_groups, &["quantix-admin"], "admin_groups")?,
            viewer_gids: resolve(&self.viewer_groups, &viewer_default, "viewer_groups")?,
            tls_admin_ous: self.tls_admin_ous.clone(),
            tls_viewer_ous: self.tls_viewer_ous.clone(),
        })
    }

    /// The Unix socket's group: the configured one, else `quantix` if it exists, else none
    /// (the socket stays root's).
    pub fn socket_gid(&self, group_file: &Path) -> Result<Option<u32>, ConfigError> {
        match &self.socket_group {
            Some(n) => resolve(n, group_file)?.map(Some).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "socket_group: no group {n:?} in {}",
                    group_file.display()
                ))
            }),
            None => resolve("quantix", group_file),
        }
    }
}

/// `configured`, else `name` next to the agent's binary, else `name` (from PATH).
fn binary(configured: &str, name: &str) -> PathBuf {
    if !configured.is_empty() {
        return PathBuf::from(configured);
    }
    if let Some(sibling) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
    {
        return sibling;
    }
    PathBuf::from(name)
}

fn resolve(name: &str, group_file: &Path) -> Result<Option<u32>, ConfigError> {
    crate::access::resolve_group(name, group_file).map_err(|source| ConfigError::Read {
        path: group_file.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_overrides_defaults_and_rejects_unknown_keys() {
        let c: Config = toml::from_str("state_dir = \"/tmp/x\"\nmax_vcpus = 3\n").unwrap();
        assert_eq!(c.state_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_vcpus, 3);
        assert_eq!(c.listen, "");
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

    #[test]
    fn tcp_needs_tls_or_loopback_with_insecure_tcp() {
        let with = |f: &dyn Fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate()
        };
        assert!(with(&|_| ()).is_ok());
        let e = with(&|c| c.listen = "0.0.0.0:7700".into()).unwrap_err();
        assert!(e.to_string().contains("needs mutual TLS"), "{e}");
        let e = with(&|c| {
            c.listen = "0.0.0.0:7700".into();
            c.insecure_tcp = true;
        })
        .unwrap_err();
        assert!(e.to_string().contains("only allowed on a loopback"), "{e}");
        assert!(with(&|c| {
            c.listen = "127.0.0.1:0".into();
            c.insecure_tcp = true;
        })
        .is_ok());
        assert!(with(&|c| {
            c.listen = "[::1]:0".into();
            c.insecure_tcp = true;
        })
        .is_ok());
        assert!(with(&|c| {
            c.listen = "0.0.0.0:7700".into();
            c.tls_cert = "c".into();
            c.tls_key = "k".into();
            c.tls_client_ca = "ca".into();
        })
        .is_ok());
        let e = with(&|c| {
            c.listen = "0.0.0.0:7700".into();
            c.tls_cert = "c".into();
        })
        .unwrap_err();
        assert!(e.to_string().contains("tls_client_ca"), "{e}");
    }

    #[test]
    fn image_dirs_never_hold_the_state() {
        let c = Config::default();
        assert_eq!(c.image_dirs(), vec![c.state_dir.join("images")]);
        for (dirs, ok) in [
            (vec!["/srv/images"], true),
            (vec!["/var/lib/quantix-agent/images/os"], true),
            (vec!["/"], false),
            (vec!["/var/lib"], false),
            (vec!["/var/lib/quantix-agent"], false),
            (vec!["/var/lib/quantix-agent/vms"], false),
            (vec!["relative"], false),
        ] {
            let c = Config {
                image_dirs: dirs.iter().map(PathBuf::from).collect(),
                ..Config::default()
            };
            assert_eq!(c.validate().is_ok(), ok, "{dirs:?}: {:?}", c.validate());
        }
    }

    #[test]
    fn roles_from_groups() {
        let dir = std::env::temp_dir().join(format!("qx-cfg-groups-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("group");
        std::fs::write(&f, "quantix:x:990:\nquantix-admin:x:991:\nops:x:992:\n").unwrap();
        let p = Config::default().policy(&f).unwrap();
        assert_eq!(p.admin_gids, vec![991]);
        assert_eq!(p.viewer_gids, vec![990]);
        assert!(p.admin_uids.contains(&0));
        assert_eq!(Config::default().socket_gid(&f).unwrap(), Some(990));
        let c: Config =
            toml::from_str("socket_group = \"ops\"\nadmin_groups = [\"ops\", \"77\"]\n").unwrap();
        let p = c.policy(&f).unwrap();
        assert_eq!(p.admin_gids, vec![992, 77]);
        assert_eq!(p.viewer_gids, vec![992]);
        // Neither default group exists: root only.
        let empty = dir.join("empty");
        std::fs::write(&empty, "").unwrap();
        let p = Config::default().policy(&empty).unwrap();
        assert!(p.admin_gids.is_empty() && p.viewer_gids.is_empty());
        assert_eq!(Config::default().socket_gid(&empty).unwrap(), None);
        // A group named explicitly must exist.
        let c: Config = toml::from_str("socket_group = \"nope\"").unwrap();
        assert!(c
            .socket_gid(&empty)
            .unwrap_err()
            .to_string()
            .contains("no group \"nope\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
