//! The VM's configuration. The types, their flag syntax and the checks that need nothing
//! of the host are the contract crate's (`quantix-vmm-api`, shared with every client);
//! here are the checks that need the host: its RAM, the disk images' real paths, the vsock
//! socket.

pub use quantix_vmm_api::config::*;
pub use quantix_vmm_api::limits::*;

/// Checks `config` against the host: everything [`VmConfig::validate`] checks with the
/// host's RAM, no image attached twice under two paths, and a usable vsock socket path.
pub fn validate_on_host(config: &VmConfig) -> Result<(), ConfigError> {
    config.validate(host_memory_mib())?;
    // Each image's real path once (one that cannot be resolved is opened later, and fails
    // there with its own error).
    let real: Vec<_> = config
        .disks
        .iter()
        .map(|d| std::fs::canonicalize(&d.path).ok())
        .collect();
    for (i, a) in real.iter().enumerate() {
        for (j, b) in real.iter().enumerate().skip(i + 1) {
            if a.is_some() && a == b {
                return Err(ConfigError::Conflict(format!(
                    "disk image {} is given twice (as {}); two devices on one image would corrupt it",
                    config.disks[i].path.display(),
                    config.disks[j].path.display()
                )));
            }
        }
    }
    if let Some(v) = &config.vsock {
        validate_vsock(v)?;
    }
    Ok(())
}

/// Checks the vsock socket path on the host: it fits, its directory exists, and no
/// live listener owns it (a stale socket is replaced when the device is created).
pub fn validate_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    quantix_virtio::vsock::check_config(v.cid, &v.socket).map_err(|e| ConfigError::Vsock {
        value: format!("cid={},socket={}", v.cid, v.socket.display()),
        reason: e.to_string(),
    })
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
    fn the_host_checks() {
        let mut c = VmConfig::with_kernel("/k");
        assert_eq!(validate_on_host(&c), Ok(()));
        c.memory = MemorySize(1 << 30);
        assert!(matches!(
            validate_on_host(&c),
            Err(ConfigError::MemoryTooLarge { .. })
        ));
        let mut c = VmConfig::with_kernel("/k");
        c.vsock = Some(VsockConfig {
            cid: 3,
            socket: "/nonexistent-dir/v.sock".into(),
        });
        let e = validate_on_host(&c).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        // One image under two names.
        let dir = std::env::temp_dir().join(format!("qx-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let img = dir.join("a.raw");
        std::fs::write(&img, b"").unwrap();
        let mut c = VmConfig::with_kernel("/k");
        for p in [img.clone(), dir.join(".").join("a.raw")] {
            c.disks
                .push(format!("path={}", p.display()).parse().unwrap());
        }
        let e = validate_on_host(&c).unwrap_err();
        assert!(e.to_string().contains("given twice"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(validate_vcpus(1000), Err(ConfigError::Vcpus(1000)));
        assert_eq!(validate_vcpus(16), Ok(16));
    }
}
