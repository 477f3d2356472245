//! The VM's configuration: the serde types of `quantix-vmm --config`, the flag syntax of
//! each device (`path=...,readonly=on`), and the checks that need nothing of the host.

use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::limits::*;
use crate::size::parse_count;
pub use crate::size::MemorySize;

/// Invalid configuration values.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A memory size that does not parse.
    #[error("invalid memory size {0:?}: expected a number of MiB, or a number followed by M or G (e.g. 512M, 2G)")]
    MemorySyntax(String),
    /// Memory below the minimum.
    #[error("memory size {mib} MiB is too small: a VM needs at least {MIN_MEMORY_MIB} MiB")]
    MemoryTooSmall {
        /// What was asked for.
        mib: u64,
    },
    /// Memory above what the host has.
    #[error("memory size {mib} MiB is larger than the host's {host_mib} MiB of RAM")]
    MemoryTooLarge {
        /// What was asked for.
        mib: u64,
        /// What the host has.
        host_mib: u64,
    },
    /// A vCPU count out of range.
    #[error("invalid vCPU count {0}: must be between {MIN_VCPUS} and {MAX_VCPUS}")]
    Vcpus(u64),
    /// A serial specification that does not parse.
    #[error("invalid output setting {0:?}: expected stdout, file=PATH, pty, socket=PATH or off")]
    Serial(String),
    /// A `--disk` value that does not parse.
    #[error("invalid --disk {value:?}: {reason} (expected path=PATH[,readonly=on|off][,id=NAME][,aio=io_uring|threads])")]
    Disk {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A `--net` value that does not parse.
    #[error("invalid --net {value:?}: {reason} (expected tap=NAME[,mac=MAC] or fd=N[,mac=MAC])")]
    Net {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// A `--vsock` value that does not parse or cannot be used.
    #[error("invalid --vsock {value:?}: {reason} (expected cid=N,socket=PATH)")]
    Vsock {
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// Two devices that would share one resource (disk id or image, TAP, MAC address).
    #[error("{0}")]
    Conflict(String),
    /// More devices than the VM has room for.
    #[error("{what}: {count} given, at most {max}")]
    TooMany {
        /// Which devices.
        what: &'static str,
        /// How many were given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A configuration file that is not a valid configuration.
    #[error("invalid VM configuration: {0}")]
    Json(String),
    /// A command line that is too long.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length, with the terminating NUL.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// Where the serial console goes. In a configuration file: `"stdout"`, `"off"`, `"pty"`,
/// `{"file": PATH}` or `{"socket": PATH}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SerialMode {
    /// The VMM's standard output (and input from standard input).
    Stdout,
    /// Appended to a file.
    File(PathBuf),
    /// Not connected: output is discarded.
    Off,
    /// A new pseudo-terminal (its path is logged and reported on the control socket).
    Pty,
    /// A Unix socket the VMM listens on; one client at a time, the newest wins.
    Socket(PathBuf),
}

impl FromStr for SerialMode {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "stdout" => Ok(SerialMode::Stdout),
            "off" => Ok(SerialMode::Off),
            "pty" => Ok(SerialMode::Pty),
            _ => {
                if let Some(p) = s.strip_prefix("file=").filter(|p| !p.is_empty()) {
                    Ok(SerialMode::File(PathBuf::from(p)))
                } else if let Some(p) = s.strip_prefix("socket=").filter(|p| !p.is_empty()) {
                    Ok(SerialMode::Socket(PathBuf::from(p)))
                } else {
                    Err(ConfigError::Serial(s.to_string()))
                }
            }
        }
    }
}

/// A device's rate limits; 0 means no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimit {
    /// Bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes that may go at once after a quiet spell (default: one second's worth).
    pub bytes_burst: u64,
    /// Operations (requests, frames) per second.
    pub ops_per_sec: u64,
    /// Operations that may go at once (default: one second's worth).
    pub ops_burst: u64,
}

impl RateLimit {
    /// Whether any limit is set.
    pub fn is_limited(&self) -> bool {
        self.bytes_per_sec > 0 || self.ops_per_sec > 0
    }

    /// Whether a burst is given without its rate (refused: a burst refills at its rate).
    pub fn burst_without_rate(&self) -> bool {
        (self.bytes_burst > 0 && self.bytes_per_sec == 0)
            || (self.ops_burst > 0 && self.ops_per_sec == 0)
    }
}

/// Which I/O engine serves a disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum EngineKind {
    /// io_uring (the default; threads when the host lacks it).
    #[default]
    #[serde(rename = "io_uring")]
    IoUring,
    /// A pool of threads doing `preadv`/`pwritev`.
    #[serde(rename = "threads")]
    Threads,
}

impl EngineKind {
    /// Its name in flags, logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Threads => "threads",
        }
    }
}

/// What the seccomp filters do with a call outside their lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeccompMode {
    /// SIGSYS: the VMM records the syscall and exits (status 8, reason `seccomp`).
    #[default]
    Kill,
    /// Allowed, and logged by the kernel.
    Log,
    /// No filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kill" => Ok(SeccompMode::Kill),
            "log" => Ok(SeccompMode::Log),
            "off" => Ok(SeccompMode::Off),
            other => Err(format!("{other:?}: expected kill, log or off")),
        }
    }
}

/// One disk (`--disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The raw image file (or block device).
    pub path: PathBuf,
    /// The guest may not write.
    #[serde(default)]
    pub readonly: bool,
    /// Name in logs and the serial number the guest reads (`/sys/block/vdX/serial`).
    #[serde(default)]
    pub id: Option<String>,
    /// The I/O engine: io_uring (the default; threads when the host lacks it) or threads.
    #[serde(default)]
    pub aio: EngineKind,
    /// Limits of the guest's I/O on the disk.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// Whether `id` is a valid disk id: 1 to [`DISK_ID_MAX`] of A-Z, a-z, 0-9, - and _.
pub fn valid_disk_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= DISK_ID_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sets the rate-limit key `key` (`bw`, `bw_burst`, `<ops>`, `<ops>_burst`) from `value`.
fn set_rate(rl: &mut RateLimit, key: &str, value: &str, ops: &str) -> Result<(), String> {
    let n = parse_count(value)
        .ok_or_else(|| format!("{key} takes a count such as 100M, 5000 or 1G"))?;
    match key.strip_prefix(ops) {
        Some("") => rl.ops_per_sec = n,
        Some("_burst") => rl.ops_burst = n,
        _ if key == "bw" => rl.bytes_per_sec = n,
        _ => rl.bytes_burst = n,
    }
    Ok(())
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: &str| ConfigError::Disk {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (mut path, mut readonly, mut id) = (None, false, None);
        let mut aio = EngineKind::IoUring;
        let mut rate_limit = RateLimit::default();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err("each part must be key=value"))?;
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "path" => return Err(err("empty path")),
                "readonly" => {
                    readonly = match value {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(err("readonly takes on or off")),
                    }
                }
                "id" => {
                    if !valid_disk_id(value) {
                        return Err(err("id must be 1-20 characters of A-Z, a-z, 0-9, - and _"));
                    }
                    id = Some(value.to_string());
                }
                "aio" => {
                    aio = match value {
                        "io_uring" => EngineKind::IoUring,
                        "threads" => EngineKind::Threads,
                        _ => return Err(err("aio takes io_uring or threads")),
                    }
                }
                "bw" | "bw_burst" | "iops" | "iops_burst" => {
                    set_rate(&mut rate_limit, key, value, "iops").map_err(|e| err(&e))?
                }
                other => return Err(err(&format!("unknown key {other:?}"))),
            }
        }
        if rate_limit.burst_without_rate() {
            return Err(err(
                "a burst needs its rate (bw_burst with bw, iops_burst with iops)",
            ));
        }
        Ok(DiskConfig {
            path: path.ok_or_else(|| err("path= is required"))?,
            readonly,
            id,
            aio,
            rate_limit,
        })
    }
}

/// Where a network card's frames go: `{"tap": NAME}` or `{"fd": N}` in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetBackend {
    /// A TAP interface, created if it does not exist.
    Tap(String),
    /// An open TAP fd inherited from a supervisor.
    Fd(i32),
}

/// One network card (`--net`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// The host side.
    pub backend: NetBackend,
    /// The guest's MAC address (`"52:54:00:12:34:56"`); random (52:54:00:xx:xx:xx) when
    /// not given.
    #[serde(default, with = "crate::mac::serde_opt")]
    pub mac: Option<[u8; 6]>,
    /// Limits of each direction of the card's traffic.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: &str| ConfigError::Net {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (mut backend, mut mac) = (None, None);
        let mut rate_limit = RateLimit::default();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err("each part must be key=value"))?;
            let new = match key {
                "bw" | "bw_burst" | "pps" | "pps_burst" => {
                    set_rate(&mut rate_limit, key, value, "pps").map_err(|e| err(&e))?;
                    None
                }
                "tap" if !value.is_empty() && value.len() <= TAP_NAME_MAX => {
                    Some(NetBackend::Tap(value.to_string()))
                }
                "tap" => return Err(err("a TAP name has 1 to 15 characters")),
                "fd" => Some(NetBackend::Fd(
                    value
                        .parse()
                        .ok()
                        .filter(|fd| *fd >= 3)
                        .ok_or_else(|| err("fd must be a number of 3 or more"))?,
                )),
                "mac" => {
                    mac = Some(crate::mac::parse(value).ok_or_else(|| {
                        err("mac must be a unicast address like 52:54:00:12:34:56")
                    })?);
                    None
                }
                other => return Err(err(&format!("unknown key {other:?}"))),
            };
            if let Some(b) = new {
                if backend.replace(b).is_some() {
                    return Err(err("give one of tap= or fd="));
                }
            }
        }
        if rate_limit.burst_without_rate() {
            return Err(err(
                "a burst needs its rate (bw_burst with bw, pps_burst with pps)",
            ));
        }
        Ok(NetConfig {
            backend: backend.ok_or_else(|| err("tap= or fd= is required"))?,
            mac,
            rate_limit,
        })
    }
}

/// The `--vsock` device: guest CID and the host socket path (see docs/devices.md).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 to u32::MAX - 1).
    pub cid: u64,
    /// Host-initiated connections arrive here (`CONNECT <port>`); guest-initiated ones
    /// go to `<socket>_<port>`.
    pub socket: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: &str| ConfigError::Vsock {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (mut cid, mut socket) = (None, None);
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err("each part must be key=value"))?;
            match key {
                "cid" => {
                    let n: u64 = value
                        .parse()
                        .map_err(|_| err("cid must be a decimal number"))?;
                    if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&n) {
                        return Err(err(
                            "cid must be between 3 and 4294967294 (0-2 and u32::MAX are reserved)",
                        ));
                    }
                    cid = Some(n);
                }
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                "socket" => return Err(err("empty socket path")),
                other => return Err(err(&format!("unknown key {other:?}"))),
            }
        }
        Ok(VsockConfig {
            cid: cid.ok_or_else(|| err("cid= is required"))?,
            socket: socket.ok_or_else(|| err("socket= is required"))?,
        })
    }
}

/// Checks that no TAP, fd or MAC address is used by two cards.
pub fn validate_nets(nets: &[NetConfig]) -> Result<(), ConfigError> {
    for (i, a) in nets.iter().enumerate() {
        for b in &nets[i + 1..] {
            if a.backend == b.backend {
                return Err(ConfigError::Conflict(format!(
                    "two network cards use {:?}",
                    a.backend
                )));
            }
            if a.mac.is_some() && a.mac == b.mac {
                return Err(ConfigError::Conflict(
                    "two network cards have the same MAC address".into(),
                ));
            }
        }
    }
    Ok(())
}

/// Checks that disk ids are unique and that no image path is given twice.
pub fn validate_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, a) in disks.iter().enumerate() {
        for b in &disks[i + 1..] {
            if a.id.is_some() && a.id == b.id {
                return Err(ConfigError::Conflict(format!(
                    "two disks have the id {:?}",
                    a.id.as_deref().unwrap_or_default()
                )));
            }
            // The same path (the VMM also compares what the paths resolve to).
            if a.path == b.path {
                return Err(ConfigError::Conflict(format!(
                    "disk image {} is given twice; two devices on one image would corrupt it",
                    a.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// What the VM boots: `{"kernel": {"path": ..., "initramfs": ..., "cmdline": ...}}` or
/// `{"firmware": PATH}` in a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux or bzImage), optional initramfs and command line.
    Kernel {
        /// The kernel image.
        #[serde(rename = "path")]
        kernel: PathBuf,
        /// The initial RAM filesystem.
        #[serde(default)]
        initramfs: Option<PathBuf>,
        /// The kernel command line.
        #[serde(default = "default_cmdline")]
        cmdline: String,
    },
    /// A raw firmware image, mapped to end at 4 GiB and started at the reset vector.
    Firmware(PathBuf),
}

fn default_cmdline() -> String {
    DEFAULT_CMDLINE.to_string()
}
fn default_vcpus() -> u8 {
    1
}
fn default_memory() -> MemorySize {
    MemorySize(DEFAULT_MEMORY_MIB)
}
fn default_true() -> bool {
    true
}
fn default_serial() -> SerialMode {
    SerialMode::Stdout
}
fn default_console() -> SerialMode {
    SerialMode::Off
}
fn default_kvm() -> PathBuf {
    PathBuf::from("/dev/kvm")
}

/// Everything needed to build and run one VM: what `quantix-vmm --config FILE` reads
/// (JSON), and what its flags build. Fields left out of a file take the flags' defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSource,
    /// vCPU count.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest memory (MiB in a file).
    #[serde(default = "default_memory", rename = "memory_mib")]
    pub memory: MemorySize,
    /// The serial console.
    #[serde(default = "default_serial")]
    pub serial: SerialMode,
    /// The control socket, if any.
    #[serde(default)]
    pub api_socket: Option<PathBuf>,
    /// A virtio entropy device.
    #[serde(default = "default_true")]
    pub rng: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards, in the order the guest sees them (eth0, eth1, ...).
    #[serde(default)]
    pub nets: Vec<NetConfig>,
    /// Where the virtio console (`hvc0`) goes; `off` means no console device.
    #[serde(default = "default_console")]
    pub console: SerialMode,
    /// A virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// The KVM device: `/dev/kvm`, or an inherited `/dev/fd/N` (in a jail).
    #[serde(default = "default_kvm")]
    pub kvm: PathBuf,
    /// What the seccomp filters do with a call outside their lists.
    #[serde(default)]
    pub seccomp: SeccompMode,
}

/// The largest configuration file read (a VM with every device is a few KiB).
pub const CONFIG_FILE_MAX: usize = 1 << 20;

impl VmConfig {
    /// A VM booting `kernel` with every other setting at its default.
    pub fn with_kernel(kernel: impl Into<PathBuf>) -> Self {
        Self {
            boot: BootSource::Kernel {
                kernel: kernel.into(),
                initramfs: None,
                cmdline: default_cmdline(),
            },
            vcpus: default_vcpus(),
            memory: default_memory(),
            serial: default_serial(),
            api_socket: None,
            rng: true,
            disks: Vec::new(),
            nets: Vec::new(),
            console: default_console(),
            vsock: None,
            kvm: default_kvm(),
            seccomp: SeccompMode::Kill,
        }
    }

    /// Reads a configuration from JSON (at most [`CONFIG_FILE_MAX`] bytes) and checks its
    /// values ([`VmConfig::validate`], without the host's memory).
    pub fn from_json(json: &[u8]) -> Result<Self, ConfigError> {
        if json.len() > CONFIG_FILE_MAX {
            return Err(ConfigError::Json(format!(
                "{} bytes; the limit is {CONFIG_FILE_MAX}",
                json.len()
            )));
        }
        let c: VmConfig =
            serde_json::from_slice(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        c.validate(None)?;
        Ok(c)
    }

    /// The configuration as JSON (what [`VmConfig::from_json`] reads).
    pub fn to_json(&self) -> String {
        // Every field is a plain value, string or list: serialisation cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks the values that do not need the host or the files (the host's RAM, when
    /// given, bounds the memory).
    pub fn validate(&self, host_memory_mib: Option<u64>) -> Result<(), ConfigError> {
        validate_vcpus(u64::from(self.vcpus))?;
        if self.memory.0 < MIN_MEMORY_MIB {
            return Err(ConfigError::MemoryTooSmall { mib: self.memory.0 });
        }
        if let Some(host_mib) = host_memory_mib {
            if self.memory.0 > host_mib {
                return Err(ConfigError::MemoryTooLarge {
                    mib: self.memory.0,
                    host_mib,
                });
            }
        }
        if self.memory.0 > MAX_MEMORY_MIB {
            return Err(ConfigError::MemorySyntax(format!("{} MiB", self.memory.0)));
        }
        let count = self.virtio_devices();
        if count > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooMany {
                what: "virtio devices (disks, cards, rng, console, vsock)",
                count,
                max: MAX_VIRTIO_DEVICES,
            });
        }
        self.validate_devices()?;
        validate_disks(&self.disks)?;
        validate_nets(&self.nets)?;
        self.validate_sockets()?;
        if let BootSource::Kernel { cmdline, .. } = &self.boot {
            if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
                return Err(ConfigError::CmdlineTooLong {
                    len: cmdline.len() + 1,
                    max: CMDLINE_MAX_SIZE,
                });
            }
        }
        Ok(())
    }
}

impl VmConfig {
    /// How many virtio devices the VM has (each takes a virtio-mmio window and a GSI).
    pub fn virtio_devices(&self) -> usize {
        self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.console != SerialMode::Off)
            + usize::from(self.vsock.is_some())
    }

    /// Checks each device's values as its flag parser does (a file is held to the same
    /// rules as the flags).
    fn validate_devices(&self) -> Result<(), ConfigError> {
        for d in &self.disks {
            let err = |reason: &str| ConfigError::Disk {
                value: d.path.display().to_string(),
                reason: reason.to_string(),
            };
            if d.path.as_os_str().is_empty() {
                return Err(err("empty path"));
            }
            if d.id.as_deref().is_some_and(|id| !valid_disk_id(id)) {
                return Err(err("id must be 1-20 characters of A-Z, a-z, 0-9, - and _"));
            }
            if d.rate_limit.burst_without_rate() {
                return Err(err("a burst needs its rate"));
            }
        }
        for n in &self.nets {
            let err = |reason: &str| ConfigError::Net {
                value: format!("{:?}", n.backend),
                reason: reason.to_string(),
            };
            match &n.backend {
                NetBackend::Tap(t) if t.is_empty() || t.len() > TAP_NAME_MAX => {
                    return Err(err("a TAP name has 1 to 15 characters"))
                }
                NetBackend::Fd(fd) if *fd < 3 => return Err(err("fd must be 3 or more")),
                _ => {}
            }
            if n.rate_limit.burst_without_rate() {
                return Err(err("a burst needs its rate"));
            }
        }
        if let Some(v) = &self.vsock {
            if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&v.cid) {
                return Err(ConfigError::Vsock {
                    value: format!("cid={}", v.cid),
                    reason: "cid must be between 3 and 4294967294".into(),
                });
            }
            if v.socket.as_os_str().is_empty() {
                return Err(ConfigError::Vsock {
                    value: format!("cid={}", v.cid),
                    reason: "empty socket path".into(),
                });
            }
        }
        Ok(())
    }

    /// Checks that the serial, console and control sockets are distinct paths.
    fn validate_sockets(&self) -> Result<(), ConfigError> {
        let mut paths: Vec<(&str, &PathBuf)> = Vec::new();
        for (what, mode) in [("--serial", &self.serial), ("--console", &self.console)] {
            if let SerialMode::Socket(p) | SerialMode::File(p) = mode {
                paths.push((what, p));
            }
        }
        if let Some(p) = &self.api_socket {
            paths.push(("--api-socket", p));
        }
        for (i, (a, pa)) in paths.iter().enumerate() {
            for (b, pb) in &paths[i + 1..] {
                if pa == pb {
                    return Err(ConfigError::Conflict(format!(
                        "{a} and {b} both use {}",
                        pa.display()
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks a vCPU count and narrows it.
pub fn validate_vcpus(n: u64) -> Result<u8, ConfigError> {
    u8::try_from(n)
        .ok()
        .filter(|n| (MIN_VCPUS..=MAX_VCPUS).contains(n))
        .ok_or(ConfigError::Vcpus(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_modes() {
        assert_eq!("stdout".parse(), Ok(SerialMode::Stdout));
        assert_eq!("off".parse(), Ok(SerialMode::Off));
        assert_eq!("file=/tmp/x".parse(), Ok(SerialMode::File("/tmp/x".into())));
        assert!("file=".parse::<SerialMode>().is_err());
        assert_eq!("pty".parse(), Ok(SerialMode::Pty));
        assert_eq!(
            "socket=/run/c.sock".parse(),
            Ok(SerialMode::Socket("/run/c.sock".into()))
        );
        assert!("socket=".parse::<SerialMode>().is_err());
        assert!("tty".parse::<SerialMode>().is_err());
    }

    fn config() -> VmConfig {
        VmConfig::with_kernel("/k")
    }

    #[test]
    fn vsock_specs() {
        let v: VsockConfig = "cid=3,socket=/run/v.sock".parse().unwrap();
        assert_eq!(
            v,
            VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into()
            }
        );
        let v: VsockConfig = "socket=/a,cid=4294967294".parse().unwrap();
        assert_eq!(v.cid, 4_294_967_294);
        for bad in [
            "",
            "cid=3",
            "socket=/a",
            "cid=2,socket=/a",
            "cid=0,socket=/a",
            "cid=4294967295,socket=/a",
            "cid=99999999999999999999,socket=/a",
            "cid=-3,socket=/a",
            "cid=x,socket=/a",
            "cid=3,socket=",
            "cid=3,socket=/a,port=5",
            "cid=3;socket=/a",
        ] {
            assert!(
                bad.parse::<VsockConfig>().is_err(),
                "{bad:?} should not parse"
            );
        }
        let mut c = config();
        c.vsock = Some(VsockConfig {
            cid: 2,
            socket: "/run/v.sock".into(),
        });
        assert!(matches!(c.validate(None), Err(ConfigError::Vsock { .. })));
    }

    #[test]
    fn disk_specs() {
        let d: DiskConfig = "path=/img/a.raw,readonly=on,id=root-1".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/img/a.raw".into(),
                readonly: true,
                id: Some("root-1".into()),
                aio: EngineKind::IoUring,
                rate_limit: Default::default(),
            }
        );
        let d: DiskConfig = "path=/img/b.raw,aio=threads".parse().unwrap();
        assert!(!d.readonly && d.id.is_none());
        assert_eq!(d.aio, EngineKind::Threads);
        for bad in [
            "",
            "/img/a.raw",
            "readonly=on",
            "path=",
            "path=/a,readonly=yes",
            "path=/a,aio=posix",
            "path=/a,size=1G",
            "path=/a,id=",
            "path=/a,id=has space",
            "path=/a,id=aaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(
                matches!(bad.parse::<DiskConfig>(), Err(ConfigError::Disk { .. })),
                "{bad:?}"
            );
        }
        let a: DiskConfig = "path=/img/a.raw,id=x".parse().unwrap();
        let b: DiskConfig = "path=/img/b.raw,id=x".parse().unwrap();
        assert!(matches!(
            validate_disks(&[a.clone(), b]),
            Err(ConfigError::Conflict(_))
        ));
        let a2: DiskConfig = "path=/img/a.raw".parse().unwrap();
        assert!(matches!(
            validate_disks(&[a, a2]),
            Err(ConfigError::Conflict(_))
        ));
    }

    #[test]
    fn net_specs() {
        let n: NetConfig = "tap=qx0,bw=10M,pps=1000".parse().unwrap();
        assert_eq!(n.rate_limit.bytes_per_sec, 10 << 20);
        assert_eq!(n.rate_limit.ops_per_sec, 1000);
        assert!("tap=qx0,pps_burst=5".parse::<NetConfig>().is_err());
        let n: NetConfig = "tap=qx0,mac=52:54:00:00:00:01".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                backend: NetBackend::Tap("qx0".into()),
                mac: Some([0x52, 0x54, 0, 0, 0, 1]),
                rate_limit: Default::default(),
            }
        );
        let n: NetConfig = "fd=7".parse().unwrap();
        assert_eq!(n.backend, NetBackend::Fd(7));
        for bad in [
            "",
            "qx0",
            "tap=",
            "tap=sixteen-chars-xx",
            "fd=1",
            "fd=x",
            "tap=a,fd=5",
            "tap=a,mac=01:00:5e:00:00:01",
            "tap=a,speed=10",
        ] {
            assert!(
                matches!(bad.parse::<NetConfig>(), Err(ConfigError::Net { .. })),
                "{bad:?}"
            );
        }
        let a: NetConfig = "tap=a".parse().unwrap();
        assert!(validate_nets(&[a.clone(), a]).is_err());
    }

    #[test]
    fn validation() {
        assert_eq!(config().validate(Some(4096)), Ok(()));
        let mut c = config();
        c.memory = MemorySize(8);
        assert_eq!(
            c.validate(None),
            Err(ConfigError::MemoryTooSmall { mib: 8 })
        );
        c.memory = MemorySize(8192);
        assert_eq!(
            c.validate(Some(4096)),
            Err(ConfigError::MemoryTooLarge {
                mib: 8192,
                host_mib: 4096
            })
        );
        let mut c = config();
        c.vcpus = 0;
        assert_eq!(c.validate(None), Err(ConfigError::Vcpus(0)));
        c.vcpus = 255;
        assert_eq!(c.validate(None), Err(ConfigError::Vcpus(255)));
        let mut c = config();
        c.boot = BootSource::Kernel {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: "x".repeat(2048),
        };
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
        assert_eq!(validate_vcpus(1000), Err(ConfigError::Vcpus(1000)));
        assert_eq!(validate_vcpus(16), Ok(16));
    }

    #[test]
    fn disk_rate_limits_parse_with_suffixes() {
        let d: DiskConfig = "path=/d,bw=100M,bw_burst=1G,iops=5000,iops_burst=10K"
            .parse()
            .unwrap();
        assert_eq!(d.rate_limit.bytes_per_sec, 100 << 20);
        assert_eq!(d.rate_limit.bytes_burst, 1 << 30);
        assert_eq!(d.rate_limit.ops_per_sec, 5000);
        assert_eq!(d.rate_limit.ops_burst, 10 << 10);
        for bad in [
            "path=/d,bw=fast",
            "path=/d,iops=-1",
            "path=/d,bw_burst=1M",
            "path=/d,bw=99999999999G",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
        let d: DiskConfig = "path=/d".parse().unwrap();
        assert!(!d.rate_limit.is_limited());
    }

    #[test]
    fn a_file_and_the_flags_say_the_same() {
        let mut c = config();
        c.vcpus = 2;
        c.memory = "1G".parse().unwrap();
        c.disks.push(
            "path=/img/a.raw,readonly=on,id=root,aio=threads,bw=10M"
                .parse()
                .unwrap(),
        );
        c.nets
            .push("fd=5,mac=52:54:00:00:00:07,pps=100".parse().unwrap());
        c.vsock = Some("cid=9,socket=/v/vsock.sock".parse().unwrap());
        c.serial = "socket=/run/serial.sock".parse().unwrap();
        c.api_socket = Some("/run/api.sock".into());
        let json = c.to_json();
        assert_eq!(VmConfig::from_json(json.as_bytes()).unwrap(), c);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["memory_mib"], 1024);
        assert_eq!(v["nets"][0]["mac"], "52:54:00:00:00:07");
        assert_eq!(v["nets"][0]["backend"]["fd"], 5);
        assert_eq!(v["disks"][0]["aio"], "threads");
        assert_eq!(v["serial"]["socket"], "/run/serial.sock");
        assert_eq!(v["boot"]["kernel"]["path"], "/k");
        assert_eq!(v["seccomp"], "kill");
    }

    #[test]
    fn a_minimal_file_takes_the_flags_defaults() {
        let c = VmConfig::from_json(br#"{"boot": {"kernel": {"path": "/k"}}}"#).unwrap();
        assert_eq!(c, config());
        let c = VmConfig::from_json(br#"{"boot": {"firmware": "/fw.bin"}, "rng": false}"#).unwrap();
        assert_eq!(c.boot, BootSource::Firmware("/fw.bin".into()));
        assert!(!c.rng);
    }

    #[test]
    fn a_bad_file_is_refused_with_the_reason() {
        let bad: &[(&[u8], &str)] = &[
            (b"", "EOF"),
            (b"{", "EOF"),
            (b"[]", "expected struct"),
            (br#"{}"#, "missing field `boot`"),
            (br#"{"boot": {"kernel": {"path": "/k"}}, "cpus": 2}"#, "unknown field `cpus`"),
            (br#"{"boot": {"kernel": {"path": "/k"}}, "vcpus": 0}"#, "vCPU count 0"),
            (br#"{"boot": {"kernel": {"path": "/k"}}, "vcpus": 300}"#, "u8"),
            (br#"{"boot": {"kernel": {"path": "/k"}}, "memory_mib": 8}"#, "too small"),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "memory_mib": 2000000000000}"#,
                "invalid memory size",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "nets": [{"backend": {"fd": 1}}]}"#,
                "fd must be 3",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "nets": [{"backend": {"tap": "t"}, "mac": "01:00:5e:00:00:01"}]}"#,
                "unicast",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "disks": [{"path": "/a", "id": "has space"}]}"#,
                "id must be",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "disks": [{"path": "/a"}, {"path": "/a"}]}"#,
                "given twice",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "disks": [{"path": "/a", "aio": "posix"}]}"#,
                "unknown variant",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "vsock": {"cid": 1, "socket": "/s"}}"#,
                "cid must be",
            ),
            (
                br#"{"boot": {"kernel": {"path": "/k"}}, "seccomp": "maybe"}"#,
                "unknown variant",
            ),
        ];
        for (json, want) in bad {
            let e = VmConfig::from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(json));
        }
        let big = vec![b' '; CONFIG_FILE_MAX + 1];
        assert!(VmConfig::from_json(&big)
            .unwrap_err()
            .to_string()
            .contains("limit"));
        // 17 disks fit with rng off, not beside the default rng.
        let mut c = config();
        c.rng = false;
        for i in 0..MAX_VIRTIO_DEVICES - 1 {
            c.disks.push(DiskConfig {
                path: format!("/d{i}").into(),
                readonly: false,
                id: None,
                aio: EngineKind::IoUring,
                rate_limit: RateLimit::default(),
            });
        }
        assert_eq!(c.validate(None), Ok(()));
        c.rng = true;
        assert_eq!(c.validate(None), Ok(()));
        c.vsock = Some("cid=3,socket=/v".parse().unwrap());
        assert!(matches!(
            c.validate(None),
            Err(ConfigError::TooMany {
                count: 19,
                max: 18,
                ..
            })
        ));
    }
}
