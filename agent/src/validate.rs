//! Checks on client-supplied ids and specs; each failure names the field and says why.

use std::path::Path;

use quantix_hostfs::beneath::ImageDirs;
use quantix_hostfs::Access;

use quantix_proto::v1::{RestartPolicy, VmSpec};

use crate::error::AgentError;

use quantix_vmm_api::limits::{
    CMDLINE_MAX_SIZE, MAX_GUEST_CID, MAX_VIRTIO_DEVICES, MIN_GUEST_CID, TAP_NAME_MAX,
};

/// Most vCPUs a VM may have (the VMM's limit).
pub const MAX_VCPUS: u32 = quantix_vmm_api::limits::MAX_VCPUS as u32;
/// Least guest memory accepted (the VMM's limit).
pub const MIN_MEMORY_MIB: u64 = quantix_vmm_api::limits::MIN_MEMORY_MIB;
/// Largest console ring buffer.
pub const MAX_RING_BYTES: u32 = 16 << 20;

/// Checks a VM id: 1-64 characters of [A-Za-z0-9._-], not "." or "..".
pub fn vm_id(field: &str, id: &str) -> Result<(), AgentError> {
    if id.is_empty() {
        return Err(AgentError::invalid(field, "is required"));
    }
    if id.len() > 64 {
        return Err(AgentError::invalid(
            field,
            format!("is {} characters long; at most 64", id.len()),
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(AgentError::invalid(
            field,
            format!("{id:?} contains {c:?}; only letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    if id == "." || id == ".." {
        return Err(AgentError::invalid(
            field,
            format!("{id:?} is not a valid id"),
        ));
    }
    Ok(())
}

/// Opens `path` beneath the image directories for `access`: `PERMISSION_DENIED` for a path
/// outside them (or one that leads out), `INVALID_ARGUMENT` for one that is missing or of
/// the wrong kind. `regular` refuses block devices (a kernel or initramfs).
pub fn image(
    dirs: &ImageDirs,
    field: &str,
    path: &str,
    access: Access,
    regular: bool,
) -> Result<std::fs::File, AgentError> {
    let f = dirs.open(Path::new(path), access).map_err(|e| {
        if e.is_denied() {
            AgentError::PermissionDenied(format!("{field}: {e}"))
        } else {
            AgentError::invalid(field, e.to_string())
        }
    })?;
    if regular {
        let is_file = f.metadata().map(|m| m.is_file()).unwrap_or(false);
        if !is_file {
            return Err(AgentError::invalid(
                field,
                format!("{path:?} is not a regular file"),
            ));
        }
    }
    Ok(f)
}

fn image_file(
    dirs: &ImageDirs,
    field: &str,
    path: &str,
    required: bool,
    regular: bool,
) -> Result<(), AgentError> {
    if path.is_empty() {
        return if required {
            Err(AgentError::invalid(field, "is required"))
        } else {
            Ok(())
        };
    }
    image(dirs, field, path, Access::ReadOnly, regular).map(drop)
}

/// What a VM may be given on this node.
pub struct Allowed<'a> {
    /// Where its kernel, initramfs and disks may come from.
    pub images: &'a ImageDirs,
    /// The prefixes its TAP names must start with.
    pub tap_prefixes: &'a [String],
}

/// Checks a whole spec against the node's rules.
pub fn spec<'a>(spec: Option<&'a VmSpec>, allowed: &Allowed) -> Result<&'a VmSpec, AgentError> {
    let dirs = allowed.images;
    let spec = spec.ok_or_else(|| AgentError::invalid("spec", "is required"))?;
    let name = &spec.name;
    if name.is_empty() {
        return Err(AgentError::invalid("spec.name", "is required"));
    }
    if name.len() > 63
        || !name.starts_with(|c: char| c.is_ascii_lowercase())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        return Err(AgentError::invalid(
            "spec.name",
            format!("{name:?} must be 1-63 characters of a-z, 0-9 and '-', starting with a letter"),
        ));
    }
    if spec.vcpus == 0 || spec.vcpus > MAX_VCPUS {
        return Err(AgentError::invalid(
            "spec.vcpus",
            format!("must be 1-{MAX_VCPUS}, got {}", spec.vcpus),
        ));
    }
    if spec.memory_mib < MIN_MEMORY_MIB {
        return Err(AgentError::invalid(
            "spec.memory_mib",
            format!("must be at least {MIN_MEMORY_MIB}, got {}", spec.memory_mib),
        ));
    }
    if spec.memory_mib > (1 << 30) {
        return Err(AgentError::invalid(
            "spec.memory_mib",
            format!("{} MiB is beyond any host", spec.memory_mib),
        ));
    }
    let boot = spec
        .boot
        .as_ref()
        .ok_or_else(|| AgentError::invalid("spec.boot", "is required"))?;
    if boot.firmware.is_empty() {
        image_file(dirs, "spec.boot.kernel", &boot.kernel, true, true)?;
        image_file(dirs, "spec.boot.initramfs", &boot.initramfs, false, true)?;
    } else {
        // Firmware boots from the reset vector: there is no kernel to hand anything to.
        for (field, value) in [
            ("spec.boot.kernel", &boot.kernel),
            ("spec.boot.initramfs", &boot.initramfs),
            ("spec.boot.cmdline", &boot.cmdline),
        ] {
            if !value.is_empty() {
                return Err(AgentError::invalid(
                    field,
                    "cannot be given with spec.boot.firmware (a firmware boot has no kernel)",
                ));
            }
        }
        image_file(dirs, "spec.boot.firmware", &boot.firmware, true, true)?;
    }
    // The guest's room holds the command line and its NUL.
    if boot.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(AgentError::invalid(
            "spec.boot.cmdline",
            format!(
                "is {} bytes long; at most {}",
                boot.cmdline.len(),
                CMDLINE_MAX_SIZE - 1
            ),
        ));
    }
    if boot.cmdline.contains(['\0', '\n']) {
        return Err(AgentError::invalid(
            "spec.boot.cmdline",
            "contains a NUL or newline character",
        ));
    }
    // The VMM's devices for this spec: disks, cards, rng (on unless turned off), vsock.
    let devices = spec.disks.len()
        + spec.nics.len()
        + usize::from(spec.rng.unwrap_or(true))
        + usize::from(spec.vsock.is_some());
    if devices > MAX_VIRTIO_DEVICES {
        return Err(AgentError::invalid(
            "spec.disks",
            format!(
                "{} disks, {} cards and the rng and vsock devices make {devices} virtio \
                 devices; a VM has at most {MAX_VIRTIO_DEVICES}",
                spec.disks.len(),
                spec.nics.len()
            ),
        ));
    }
    for (i, d) in spec.disks.iter().enumerate() {
        image_file(dirs, &format!("spec.disks[{i}].path"), &d.path, true, false)?;
        rate_limit(
            &format!("spec.disks[{i}].rate_limit"),
            d.rate_limit.as_ref(),
        )?;
        if quantix_proto::v1::DiskEngine::try_from(d.engine).is_err() {
            return Err(AgentError::invalid(
                format!("spec.disks[{i}].engine"),
                format!("{} is not a known engine", d.engine),
            ));
        }
        if !d.id.is_empty() && !quantix_vmm_api::config::valid_disk_id(&d.id) {
            return Err(AgentError::invalid(
                format!("spec.disks[{i}].id"),
                format!(
                    "{:?} must be 1-{} characters of A-Z, a-z, 0-9, - and _",
                    d.id,
                    quantix_vmm_api::limits::DISK_ID_MAX
                ),
            ));
        }
    }
    for (i, n) in spec.nics.iter().enumerate() {
        rate_limit(&format!("spec.nics[{i}].rate_limit"), n.rate_limit.as_ref())?;
        if n.tap.is_empty()
            || n.tap.len() > TAP_NAME_MAX
            || !quantix_hostfs::tap::valid_name(&n.tap)
        {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].tap"),
                format!(
                    "{:?} must be an interface name of 1-{TAP_NAME_MAX} characters without \
                     '/', ':' or white space",
                    n.tap
                ),
            ));
        }
        if !allowed
            .tap_prefixes
            .iter()
            .any(|p| n.tap.starts_with(p.as_str()))
        {
            return Err(AgentError::PermissionDenied(format!(
                "spec.nics[{i}].tap: {:?} does not start with a TAP prefix this agent allows \
                 ({}); an interface of another program is never handed to a VM (tap_prefixes)",
                n.tap,
                allowed.tap_prefixes.join(", ")
            )));
        }
        if !n.mac.is_empty() && quantix_vmm_api::mac::parse(&n.mac).is_none() {
            return Err(AgentError::invalid(
                format!("spec.nics[{i}].mac"),
                format!(
                    "{:?} is not a unicast MAC address like 52:54:00:12:34:56",
                    n.mac
                ),
            ));
        }
    }
    if let Some(v) = &spec.vsock {
        // 0-2 are the hypervisor's, the local and the host's CIDs; u32::MAX is "any".
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&u64::from(v.guest_cid)) {
            return Err(AgentError::invalid(
                "spec.vsock.guest_cid",
                format!(
                    "must be {MIN_GUEST_CID} to {MAX_GUEST_CID}, got {}",
                    v.guest_cid
                ),
            ));
        }
    }
    if let Some(c) = &spec.console {
        if c.ring_bytes > MAX_RING_BYTES {
            return Err(AgentError::invalid(
                "spec.console.ring_bytes",
                format!("must be at most {MAX_RING_BYTES}, got {}", c.ring_bytes),
            ));
        }
    }
    for (k, v) in &spec.labels {
        label(&format!("spec.labels[{k:?}]"), k, v)?;
    }
    if RestartPolicy::try_from(spec.restart_policy).is_err() {
        return Err(AgentError::invalid(
            "spec.restart_policy",
            format!("{} is not a known policy", spec.restart_policy),
        ));
    }
    Ok(spec)
}

/// Checks one label (also used for list selectors).
pub fn label(field: &str, key: &str, value: &str) -> Result<(), AgentError> {
    if key.is_empty()
        || key.len() > 63
        || !key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return Err(AgentError::invalid(
            field,
            format!("key {key:?} must be 1-63 characters of A-Z, a-z, 0-9, '.', '_', '-', '/'"),
        ));
    }
    if value.len() > 255 {
        return Err(AgentError::invalid(
            field,
            format!("value is {} bytes long; at most 255", value.len()),
        ));
    }
    Ok(())
}

/// A disk's or card's rate limit, by the VMM's own rule.
fn rate_limit(field: &str, rl: Option<&quantix_proto::v1::RateLimit>) -> Result<(), AgentError> {
    if crate::manager::rate_limit(rl).burst_without_rate() {
        return Err(AgentError::invalid(
            field,
            "a burst needs its rate (bytes_burst with bytes_per_sec, ops_burst with ops_per_sec)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use quantix_proto::v1::{BootSource, Nic};

    fn good() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            vcpus: 2,
            memory_mib: 128,
            boot: Some(BootSource {
                kernel: std::env::current_exe().unwrap().display().to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn dirs() -> ImageDirs {
        let exe = std::env::current_exe().unwrap();
        ImageDirs::new(&[exe.parent().unwrap().to_path_buf()]).unwrap()
    }

    fn check(s: Option<&VmSpec>) -> Result<&VmSpec, AgentError> {
        let d = dirs();
        let prefixes = ["qx".to_string()];
        // The reference only lives as long as `s`.
        let r = spec(
            s,
            &Allowed {
                images: &d,
                tap_prefixes: &prefixes,
            },
        );
        r
    }

    fn missing() -> String {
        let exe = std::env::current_exe().unwrap();
        exe.parent()
            .unwrap()
            .join("nonexistent")
            .display()
            .to_string()
    }

    fn field_of(e: AgentError) -> String {
        match e {
            AgentError::InvalidArgument { field, .. } => field,
            other => panic!("not INVALID_ARGUMENT: {other}"),
        }
    }

    #[test]
    fn accepts_a_good_spec() {
        check(Some(&good())).unwrap();
    }

    #[test]
    fn the_virtio_devices_must_fit_the_vmm() {
        // 17 disks and the default rng fill the VMM's 18 slots; vsock is one too many.
        let mut s = good();
        let exe = std::env::current_exe().unwrap().display().to_string();
        s.disks = (0..MAX_VIRTIO_DEVICES - 1)
            .map(|_| quantix_proto::v1::Disk {
                path: exe.clone(),
                readonly: true,
                ..Default::default()
            })
            .collect();
        check(Some(&s)).unwrap();
        s.vsock = Some(quantix_proto::v1::Vsock { guest_cid: 3 });
        assert_eq!(field_of(check(Some(&s)).unwrap_err()), "spec.disks");
        s.rng = Some(false);
        check(Some(&s)).unwrap();
    }

    #[test]
    fn a_burst_needs_its_rate_on_disks_and_cards() {
        use quantix_proto::v1::RateLimit;
        let burst_only = RateLimit {
            bytes_burst: 1 << 20,
            ..Default::default()
        };
        let mut s = good();
        s.disks = vec![quantix_proto::v1::Disk {
            path: std::env::current_exe().unwrap().display().to_string(),
            readonly: true,
            rate_limit: Some(burst_only),
            ..Default::default()
        }];
        assert_eq!(
            field_of(check(Some(&s)).unwrap_err()),
            "spec.disks[0].rate_limit"
        );
        s.disks[0].rate_limit = Some(RateLimit {
            bytes_per_sec: 1 << 20,
            ..burst_only
        });
        check(Some(&s)).unwrap();
        s.nics = vec![Nic {
            tap: "qx0".into(),
            rate_limit: Some(RateLimit {
                ops_burst: 100,
                ..Default::default()
            }),
            ..Default::default()
        }];
        assert_eq!(
            field_of(check(Some(&s)).unwrap_err()),
            "spec.nics[0].rate_limit"
        );
    }

    #[test]
    fn a_vsock_cid_must_be_a_guest_cid() {
        let mut s = good();
        for bad in [0, 1, 2, u32::MAX] {
            s.vsock = Some(quantix_proto::v1::Vsock { guest_cid: bad });
            assert_eq!(
                field_of(check(Some(&s)).unwrap_err()),
                "spec.vsock.guest_cid"
            );
        }
        for ok in [3, u32::MAX - 1] {
            s.vsock = Some(quantix_proto::v1::Vsock { guest_cid: ok });
            check(Some(&s)).unwrap();
        }
    }

    #[test]
    fn taps_need_an_allowed_prefix() {
        let mut s = good();
        s.nics.push(Nic {
            tap: "eth0".into(),
            ..Default::default()
        });
        match check(Some(&s)).unwrap_err() {
            AgentError::PermissionDenied(m) => {
                assert!(
                    m.starts_with("spec.nics[0].tap: ") && m.contains("(qx)"),
                    "{m}"
                )
            }
            other => panic!("{other}"),
        }
        s.nics[0].tap = "qx-web-0".into();
        check(Some(&s)).unwrap();
    }

    #[test]
    fn files_outside_the_image_directories_are_denied() {
        let mut s = good();
        s.boot.as_mut().unwrap().kernel = "/etc/shadow".into();
        match check(Some(&s)).unwrap_err() {
            AgentError::PermissionDenied(m) => {
                assert!(
                    m.starts_with("spec.boot.kernel: ") && m.contains("outside"),
                    "{m}"
                )
            }
            other => panic!("{other}"),
        }
        let mut s = good();
        s.disks.push(quantix_proto::v1::Disk {
            path: "/etc/passwd".into(),
            ..Default::default()
        });
        match check(Some(&s)).unwrap_err() {
            AgentError::PermissionDenied(m) => {
                assert!(m.starts_with("spec.disks[0].path: "), "{m}")
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn names_the_wrong_field() {
        type Mutation = fn(&mut VmSpec);
        let cases: Vec<(Mutation, &str)> = vec![
            (|s| s.name = "Web".into(), "spec.name"),
            (|s| s.name.clear(), "spec.name"),
            (|s| s.vcpus = 0, "spec.vcpus"),
            (|s| s.vcpus = 255, "spec.vcpus"),
            (|s| s.memory_mib = 1, "spec.memory_mib"),
            (|s| s.boot = None, "spec.boot"),
            (
                |s| s.boot.as_mut().unwrap().kernel = "relative".into(),
                "spec.boot.kernel",
            ),
            (
                |s| s.boot.as_mut().unwrap().kernel = missing(),
                "spec.boot.kernel",
            ),
            (
                |s| {
                    s.nics.push(Nic {
                        tap: "qxtap0".into(),
                        mac: "zz".into(),
                        ..Default::default()
                    })
                },
                "spec.nics[0].mac",
            ),
            (
                |s| {
                    s.labels.insert("bad key".into(), "v".into());
                },
                "spec.labels[\"bad key\"]",
            ),
            (|s| s.restart_policy = 42, "spec.restart_policy"),
        ];
        for (mutate, field) in cases {
            let mut s = good();
            mutate(&mut s);
            assert_eq!(field_of(check(Some(&s)).unwrap_err()), field);
        }
        assert_eq!(field_of(check(None).unwrap_err()), "spec");
    }

    #[test]
    fn ids() {
        vm_id("vm_id", "vm-1.a_b").unwrap();
        for bad in ["", "..", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(field_of(vm_id("vm_id", bad).unwrap_err()), "vm_id");
        }
    }
}
