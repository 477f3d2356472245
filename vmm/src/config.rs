//! The VM's configuration, and the parsing and validation of its values.

use std::path::PathBuf;
use std::str::FromStr;

use thiserror::Error;

/// Fewest vCPUs a VM can have.
pub const MIN_VCPUS: u8 = 1;
/// Most vCPUs a VM can have: xAPIC IDs are 8 bits and 0xff is the broadcast ID;
/// the I/O APIC takes the ID after the last vCPU.
pub const MAX_VCPUS: u8 = 254;
/// Least guest memory: room for the boot structures and a small kernel.
pub const MIN_MEMORY_MIB: u64 = 16;
/// Default guest memory.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// The command line used when none is given: console on the first serial port,
/// the rest (reboot through the ACPI reset register, then the i8042) is Linux's default.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0";

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
    /// A command line that is too long.
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong {
        /// Its length, with the terminating NUL.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A guest memory size in MiB, parsed from `512`, `512M`, `2G`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemorySize(pub u64);

impl MemorySize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0 << 20
    }
}

impl FromStr for MemorySize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::MemorySyntax(s.to_string());
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, 'M' | 'm')) => (&t[..i], 0),
            Some((i, 'G' | 'g')) => (&t[..i], 10),
            Some(_) => (t, 0),
            None => return Err(err()),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(1 << shift)
            .filter(|mib| *mib <= (1 << 40)) // bytes stay representable
            .map(MemorySize)
            .ok_or_else(err)
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// Longest disk id: the virtio-blk serial number is 20 bytes.
pub const DISK_ID_MAX: usize = 20;

/// One `--disk`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file (or block device).
    pub path: PathBuf,
    /// The guest may not write.
    pub readonly: bool,
    /// Name in logs and the serial number the guest reads (`/sys/block/vdX/serial`).
    pub id: Option<String>,
    /// The I/O engine: io_uring (the default; threads when the host lacks it) or threads.
    pub aio: quantix_virtio::block::engine::EngineKind,
    /// Limits of the guest's I/O on the disk.
    pub rate_limit: quantix_virtio::ratelimit::RateLimit,
}

/// Sets the rate-limit key `key` (`bw`, `bw_burst`, `<ops>`, `<ops>_burst`) from `value`.
fn set_rate(
    rl: &mut quantix_virtio::ratelimit::RateLimit,
    key: &str,
    value: &str,
    ops: &str,
) -> Result<(), String> {
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

/// A count with an optional K, M or G suffix (powers of 1024): `10M` is 10485760.
fn parse_count(v: &str) -> Option<u64> {
    let (num, mul) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mul)
}

impl FromStr for DiskConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: &str| ConfigError::Disk {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        use quantix_virtio::block::engine::EngineKind;
        let (mut path, mut readonly, mut id) = (None, false, None);
        let mut aio = EngineKind::IoUring;
        let mut rate_limit = quantix_virtio::ratelimit::RateLimit::default();
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
                    if value.is_empty()
                        || value.len() > DISK_ID_MAX
                        || !value
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                    {
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
        if (rate_limit.bytes_burst > 0 && rate_limit.bytes_per_sec == 0)
            || (rate_limit.ops_burst > 0 && rate_limit.ops_per_sec == 0)
        {
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

/// Where a network card's frames go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetBackend {
    /// A TAP interface, created if it does not exist.
    Tap(String),
    /// An open TAP fd inherited from a supervisor.
    Fd(i32),
}

/// One `--net`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The host side.
    pub backend: NetBackend,
    /// The guest's MAC address; random (52:54:00:xx:xx:xx) when not given.
    pub mac: Option<[u8; 6]>,
    /// Limits of each direction of the card's traffic.
    pub rate_limit: quantix_virtio::ratelimit::RateLimit,
}

impl FromStr for NetConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = |reason: &str| ConfigError::Net {
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (mut backend, mut mac) = (None, None);
        let mut rate_limit = quantix_virtio::ratelimit::RateLimit::default();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| err("each part must be key=value"))?;
            let new = match key {
                "bw" | "bw_burst" | "pps" | "pps_burst" => {
                    set_rate(&mut rate_limit, key, value, "pps").map_err(|e| err(&e))?;
                    None
                }
                "tap" if !value.is_empty() && value.len() < 16 => {
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
                    mac = Some(quantix_virtio::net::parse_mac(value).ok_or_else(|| {
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
        if (rate_limit.bytes_burst > 0 && rate_limit.bytes_per_sec == 0)
            || (rate_limit.ops_burst > 0 && rate_limit.ops_per_sec == 0)
        {
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
                    if !(quantix_virtio::vsock::MIN_GUEST_CID
                        ..=quantix_virtio::vsock::MAX_GUEST_CID)
                        .contains(&n)
                    {
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

/// Checks the vsock socket path on the host: it fits, its directory exists, and no
/// live listener owns it (a stale socket is replaced when the device is created).
pub fn validate_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    quantix_virtio::vsock::check_config(v.cid, &v.socket).map_err(|e| ConfigError::Vsock {
        value: format!("cid={},socket={}", v.cid, v.socket.display()),
        reason: e.to_string(),
    })
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

/// Checks that disk ids are unique and that no image is attached twice.
pub fn validate_disks(disks: &[DiskConfig]) -> Result<(), ConfigError> {
    for (i, a) in disks.iter().enumerate() {
        for b in &disks[i + 1..] {
            if a.id.is_some() && a.id == b.id {
                return Err(ConfigError::Conflict(format!(
                    "two disks have the id {:?}",
                    a.id.as_deref().unwrap_or_default()
                )));
            }
            let same = match (
                std::fs::canonicalize(&a.path),
                std::fs::canonicalize(&b.path),
            ) {
                (Ok(x), Ok(y)) => x == y,
                _ => a.path == b.path,
            };
            if same {
                return Err(ConfigError::Conflict(format!(
                    "disk image {} is given twice; two devices on one image would corrupt it",
                    a.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// What the VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSource {
    /// A Linux kernel (ELF vmlinux or bzImage), optional initramfs and command line.
    Kernel {
        /// The kernel image.
        kernel: PathBuf,
        /// The initial RAM filesystem.
        initramfs: Option<PathBuf>,
        /// The kernel command line.
        cmdline: String,
    },
    /// A raw firmware image, mapped to end at 4 GiB and started at the reset vector.
    Firmware(PathBuf),
}

/// Everything needed to build and run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// What to boot.
    pub boot: BootSource,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest memory.
    pub memory: MemorySize,
    /// The serial console.
    pub serial: SerialMode,
    /// The control socket, if any.
    pub api_socket: Option<PathBuf>,
    /// A virtio entropy device.
    pub rng: bool,
    /// virtio-blk disks, in the order the guest sees them (vda, vdb, ...).
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards, in the order the guest sees them (eth0, eth1, ...).
    pub nets: Vec<NetConfig>,
    /// Where the virtio console (`hvc0`) goes; `Off` means no console device.
    pub console: SerialMode,
    /// A virtio-vsock device.
    pub vsock: Option<VsockConfig>,
    /// The KVM device: `/dev/kvm`, or an inherited `/dev/fd/N` (in a jail).
    pub kvm: PathBuf,
    /// What the seccomp filters do with a call outside their lists.
    pub seccomp: crate::seccomp::Mode,
    /// A test hook: this kind of thread makes a forbidden call right after installing its
    /// filter (proves that a refusal stops the VMM with the `seccomp` reason).
    pub seccomp_probe: Option<crate::seccomp::Kind>,
}

impl VmConfig {
    /// Checks the values that do not need the host or the files.
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
        validate_disks(&self.disks)?;
        validate_nets(&self.nets)?;
        self.validate_sockets()?;
        if let Some(v) = &self.vsock {
            validate_vsock(v)?;
        }
        if let BootSource::Kernel { cmdline, .. } = &self.boot {
            if cmdline.len() + 1 > crate::layout::CMDLINE_MAX_SIZE {
                return Err(ConfigError::CmdlineTooLong {
                    len: cmdline.len() + 1,
                    max: crate::layout::CMDLINE_MAX_SIZE,
                });
            }
        }
        Ok(())
    }
}

impl VmConfig {
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

/// The host's total RAM in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!("512".parse(), Ok(MemorySize(512)));
        assert_eq!("512M".parse(), Ok(MemorySize(512)));
        assert_eq!("2G".parse(), Ok(MemorySize(2048)));
        assert_eq!("2g".parse(), Ok(MemorySize(2048)));
        assert_eq!(MemorySize(3).bytes(), 3 << 20);
        for bad in [
            "",
            "M",
            "G",
            "-1",
            "1.5G",
            "12K",
            "1T",
            "0x10",
            " ",
            "99999999999999999999",
        ] {
            assert!(
                bad.parse::<MemorySize>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

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
        VmConfig {
            kvm: "/dev/kvm".into(),
            seccomp: crate::seccomp::Mode::Kill,
            seccomp_probe: None,
            boot: BootSource::Kernel {
                kernel: "/k".into(),
                initramfs: None,
                cmdline: DEFAULT_CMDLINE.into(),
            },
            vcpus: 1,
            memory: MemorySize(DEFAULT_MEMORY_MIB),
            serial: SerialMode::Stdout,
            api_socket: None,
            rng: true,
            disks: Vec::new(),
            nets: Vec::new(),
            console: SerialMode::Off,
            vsock: None,
        }
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
            cid: 3,
            socket: "/nonexistent-dir/v.sock".into(),
        });
        let e = c.validate(None).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
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
                aio: quantix_virtio::block::engine::EngineKind::IoUring,
                rate_limit: Default::default(),
            }
        );
        let d: DiskConfig = "path=/img/b.raw,aio=threads".parse().unwrap();
        assert!(!d.readonly && d.id.is_none());
        assert_eq!(d.aio, quantix_virtio::block::engine::EngineKind::Threads);
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
}
