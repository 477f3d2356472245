//! The assets made by `scripts/sandbox-assets`, found through `manifest.env`.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::SandboxError;

/// Environment variable naming the assets directory (holding `manifest.env`).
pub const ASSETS_ENV: &str = "QX_SANDBOX_ASSETS";

/// The manifest format this crate understands.
const MANIFEST_FORMAT: &str = "1";

/// Kernel modules the nested host needs for `/dev/kvm`, in load order
/// (paths relative to the module tree).
pub(crate) const KVM_MODULES: [&str; 3] = [
    "kernel/virt/lib/irqbypass.ko",
    "kernel/arch/x86/kvm/kvm.ko",
    "kernel/arch/x86/kvm/kvm-amd.ko",
];

/// Modules for networking tests (TAP devices and a bridge), in load order.
pub(crate) const NET_MODULES: [&str; 4] = [
    "kernel/drivers/net/tun.ko",
    "kernel/net/llc/llc.ko",
    "kernel/net/802/stp.ko",
    "kernel/net/bridge/bridge.ko",
];

/// Validated sandbox assets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assets {
    /// The manifest these were read from.
    pub manifest: PathBuf,
    /// Kernel release of the guest kernel, e.g. `6.1.0-56-cloud-amd64`.
    pub kernel_version: String,
    /// The guest's cloud kernel, its bzImage (`/guest/vmlinuz` in the nested host).
    pub vmlinuz: PathBuf,
    /// The ELF extracted from the bzImage (PVH-bootable guest kernel).
    pub vmlinux: PathBuf,
    /// `lib/modules/<version>` of the guest kernel.
    pub modules_dir: PathBuf,
    /// Kernel release of the nested host's kernel (the guest's unless the manifest
    /// names another: `QX_HOST_KERNEL_VERSION`).
    pub host_kernel_version: String,
    /// The nested host's bzImage (`QX_HOST_VMLINUZ`, else the guest's).
    pub host_vmlinuz: PathBuf,
    /// `lib/modules/<version>` of the nested host's kernel (`QX_HOST_MODULES_DIR`, else
    /// the guest's): kvm, kvm-amd and the network modules come from here.
    pub host_modules_dir: PathBuf,
    /// A static busybox.
    pub busybox: PathBuf,
    /// The nested guest's initramfs (newc cpio; `/init` is `sandbox/guest/init`).
    pub guest_initramfs: PathBuf,
    /// The host's `qemu-system-x86_64`, Debian stable's: the reference VMM put inside
    /// the nested host (`Payload::add_qemu`).
    pub qemu: PathBuf,
    /// The QEMU that emulates the nested host (`QX_HOST_QEMU`, else [`Assets::qemu`]).
    pub host_qemu: PathBuf,
    /// Its own firmware and option ROMs, searched first (`-L`), when it is not the
    /// system's QEMU (`QX_HOST_QEMU_DATA_DIR`).
    pub host_qemu_data_dir: Option<PathBuf>,
    /// The host's QEMU firmware directory.
    pub qemu_firmware_dir: PathBuf,
}

impl Assets {
    /// Finds the assets: `$QX_SANDBOX_ASSETS/manifest.env` if the variable is
    /// set, else `<repo>/.cache/sandbox/manifest.env`.
    ///
    /// Fails with [`SandboxError::AssetsMissing`] (telling the user to run
    /// `scripts/sandbox-assets`) when there is no manifest.
    pub fn from_env() -> Result<Self, SandboxError> {
        let dir = match std::env::var_os(ASSETS_ENV) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => default_assets_dir(),
        };
        Self::from_dir(&dir)
    }

    /// Reads `<dir>/manifest.env`.
    pub fn from_dir(dir: &Path) -> Result<Self, SandboxError> {
        let manifest = dir.join("manifest.env");
        let text = match fs::read_to_string(&manifest) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(SandboxError::AssetsMissing {
                    reason: format!(
                        "no {} (set {ASSETS_ENV} to use another directory)",
                        manifest.display()
                    ),
                })
            }
            Err(e) => {
                return Err(SandboxError::io(
                    format!("reading {}", manifest.display()),
                    e,
                ))
            }
        };
        Self::from_manifest_text(&manifest, &text)
    }

    /// Parses and validates manifest text (`KEY=VALUE` lines, `#` comments).
    pub fn from_manifest_text(manifest: &Path, text: &str) -> Result<Self, SandboxError> {
        let vars = parse_env(text);
        let invalid = |reason: String| SandboxError::AssetsInvalid {
            manifest: manifest.to_path_buf(),
            reason,
        };
        let get = |key: &str| {
            vars.get(key)
                .filter(|v| !v.is_empty())
                .cloned()
                .ok_or_else(|| invalid(format!("{key} is not set")))
        };
        let format = get("QX_MANIFEST_FORMAT")?;
        if format != MANIFEST_FORMAT {
            return Err(invalid(format!(
                "manifest format {format}, this crate reads format {MANIFEST_FORMAT}"
            )));
        }
        let kernel_version = get("QX_KERNEL_VERSION")?;
        let vmlinuz: PathBuf = get("QX_VMLINUZ")?.into();
        let modules_dir: PathBuf = get("QX_MODULES_DIR")?.into();
        let optional = |key: &str| vars.get(key).filter(|v| !v.is_empty()).cloned();
        let assets = Assets {
            manifest: manifest.to_path_buf(),
            host_kernel_version: optional("QX_HOST_KERNEL_VERSION")
                .unwrap_or_else(|| kernel_version.clone()),
            host_vmlinuz: optional("QX_HOST_VMLINUZ")
                .map(PathBuf::from)
                .unwrap_or_else(|| vmlinuz.clone()),
            host_modules_dir: optional("QX_HOST_MODULES_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| modules_dir.clone()),
            kernel_version,
            vmlinuz,
            vmlinux: get("QX_VMLINUX")?.into(),
            modules_dir,
            busybox: get("QX_BUSYBOX")?.into(),
            guest_initramfs: get("QX_GUEST_INITRAMFS")?.into(),
            qemu: get("QX_QEMU")?.into(),
            host_qemu: optional("QX_HOST_QEMU")
                .or_else(|| optional("QX_QEMU"))
                .map(PathBuf::from)
                .unwrap_or_default(),
            host_qemu_data_dir: optional("QX_HOST_QEMU_DATA_DIR").map(PathBuf::from),
            qemu_firmware_dir: get("QX_QEMU_FIRMWARE_DIR")?.into(),
        };
        assets.validate().map_err(invalid)?;
        Ok(assets)
    }

    /// Checks that every file is there (and that vmlinux is an ELF).
    fn validate(&self) -> Result<(), String> {
        let files = [
            ("QX_VMLINUZ", &self.vmlinuz),
            ("QX_VMLINUX", &self.vmlinux),
            ("QX_HOST_VMLINUZ", &self.host_vmlinuz),
            ("QX_BUSYBOX", &self.busybox),
            ("QX_GUEST_INITRAMFS", &self.guest_initramfs),
            ("QX_QEMU", &self.qemu),
            ("QX_HOST_QEMU", &self.host_qemu),
        ];
        for (key, path) in files {
            if !path.is_file() {
                return Err(format!("{key}={} is not a file", path.display()));
            }
        }
        if let Some(dir) = self.host_qemu_data_dir.as_ref().filter(|d| !d.is_dir()) {
            return Err(format!(
                "QX_HOST_QEMU_DATA_DIR={} is not a directory",
                dir.display()
            ));
        }
        if !self.qemu_firmware_dir.is_dir() {
            return Err(format!(
                "QX_QEMU_FIRMWARE_DIR={} is not a directory",
                self.qemu_firmware_dir.display()
            ));
        }
        for module in KVM_MODULES.iter().chain(NET_MODULES.iter()) {
            let path = self.host_modules_dir.join(module);
            if !path.is_file() {
                return Err(format!("module {} is missing", path.display()));
            }
        }
        let mut magic = [0u8; 4];
        fs::File::open(&self.vmlinux)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| format!("reading {}: {e}", self.vmlinux.display()))?;
        if magic != *b"\x7fELF" {
            return Err(format!("{} is not an ELF file", self.vmlinux.display()));
        }
        Ok(())
    }

    /// Absolute path of one module of the guest kernel (relative to the module tree).
    pub fn module(&self, relative: &str) -> PathBuf {
        self.modules_dir.join(relative)
    }

    /// Absolute path of one module of the nested host's kernel.
    pub fn host_module(&self, relative: &str) -> PathBuf {
        self.host_modules_dir.join(relative)
    }
}

/// `<repo>/.cache/sandbox`, the default assets directory.
pub fn default_assets_dir() -> PathBuf {
    repo_root().join(".cache").join("sandbox")
}

/// The repository root (the workspace this crate was built in).
pub(crate) fn repo_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Parses `KEY=VALUE` lines; blank lines and `#` comments are skipped.
fn parse_env(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_manifest_tells_to_run_the_script() {
        let dir = std::env::temp_dir().join(format!("qx-no-assets-{}", std::process::id()));
        let err = Assets::from_dir(&dir).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, SandboxError::AssetsMissing { .. }), "{msg}");
        assert!(msg.contains("scripts/sandbox-assets"), "{msg}");
    }

    #[test]
    fn manifest_missing_keys_is_invalid() {
        let err =
            Assets::from_manifest_text(Path::new("/x/manifest.env"), "QX_MANIFEST_FORMAT=1\n")
                .unwrap_err();
        assert!(err.to_string().contains("QX_KERNEL_VERSION"), "{err}");
    }

    #[test]
    fn manifest_wrong_format_is_invalid() {
        let err =
            Assets::from_manifest_text(Path::new("/x/manifest.env"), "QX_MANIFEST_FORMAT=9\n")
                .unwrap_err();
        assert!(err.to_string().contains("format 9"), "{err}");
    }

    #[test]
    fn parse_env_skips_comments() {
        let vars = parse_env("# c\n\nA=1\n B = two \nnoequals\n");
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("two"));
        assert_eq!(vars.len(), 2);
    }
}
