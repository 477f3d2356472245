//! The nested host's initramfs: busybox, the generated `/init` and job
//! script, the kernel modules, the guest assets and the payload.

use std::fs::{self, File};
use std::io::{BufWriter, Read};
use std::path::Path;

use crate::assets::{Assets, KVM_MODULES, NET_MODULES};
use crate::cpio::CpioWriter;
use crate::error::SandboxError;
use crate::paths;
use crate::payload::{Payload, Source};

/// Everything generated for one run.
pub(crate) struct HostContents<'a> {
    pub assets: &'a Assets,
    pub payload: &'a Payload,
    pub init: &'a str,
    pub jobs_script: &'a str,
}

/// File name of a module given by its path in the module tree.
pub(crate) fn module_file_name(relative: &str) -> &str {
    relative.rsplit('/').next().unwrap_or(relative)
}

/// Writes the initramfs to `out` and returns its size in bytes.
pub(crate) fn write_host_initramfs(out: &Path, c: &HostContents<'_>) -> Result<u64, SandboxError> {
    let file = File::create(out)
        .map_err(|e| SandboxError::io(format!("creating {}", out.display()), e))?;
    let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
    let ctx = |what: &str| format!("writing {what} into {}", out.display());

    for dir in [
        "/proc",
        "/sys",
        "/dev",
        "/tmp",
        "/run",
        "/bin",
        "/sbin",
        "/usr/bin",
        "/usr/sbin",
        "/etc",
    ] {
        w.dir(dir, 0o755)
            .map_err(|e| SandboxError::io(ctx(dir), e))?;
    }
    w.char_device("/dev/console", 0o600, 5, 1)
        .map_err(|e| SandboxError::io(ctx("/dev/console"), e))?;
    w.char_device("/dev/null", 0o666, 1, 3)
        .map_err(|e| SandboxError::io(ctx("/dev/null"), e))?;
    add_host_file(&mut w, &c.assets.busybox, "/bin/busybox", 0o755, out)?;
    w.symlink("/bin/sh", "busybox")
        .map_err(|e| SandboxError::io(ctx("/bin/sh"), e))?;
    w.file("/init", 0o755, c.init.as_bytes())
        .map_err(|e| SandboxError::io(ctx("/init"), e))?;
    w.file(paths::JOBS_SCRIPT, 0o644, c.jobs_script.as_bytes())
        .map_err(|e| SandboxError::io(ctx(paths::JOBS_SCRIPT), e))?;
    for module in KVM_MODULES.iter().chain(NET_MODULES.iter()) {
        let dest = format!("{}/{}", paths::MODULES_DIR, module_file_name(module));
        add_host_file(&mut w, &c.assets.host_module(module), &dest, 0o644, out)?;
    }
    add_host_file(&mut w, &c.assets.vmlinuz, paths::GUEST_VMLINUZ, 0o644, out)?;
    add_host_file(&mut w, &c.assets.vmlinux, paths::GUEST_VMLINUX, 0o644, out)?;
    add_host_file(
        &mut w,
        &c.assets.guest_initramfs,
        paths::GUEST_INITRAMFS,
        0o644,
        out,
    )?;

    for (dest, entry) in c.payload.entries() {
        match &entry.source {
            Source::File(src) => add_host_file(&mut w, src, dest, entry.mode, out)?,
            Source::Bytes(data) => w
                .file(dest, entry.mode, data)
                .map_err(|e| SandboxError::io(ctx(dest), e))?,
            Source::Symlink(target) => w
                .symlink(dest, target)
                .map_err(|e| SandboxError::io(ctx(dest), e))?,
        }
    }
    w.finish()
        .and_then(|buf| buf.into_inner().map_err(|e| e.into_error()))
        .map(drop)
        .map_err(|e| SandboxError::io(format!("finishing {}", out.display()), e))?;
    fs::metadata(out)
        .map(|m| m.len())
        .map_err(|e| SandboxError::io(format!("stat {}", out.display()), e))
}

fn add_host_file(
    w: &mut CpioWriter<BufWriter<File>>,
    src: &Path,
    dest: &str,
    mode: u32,
    out: &Path,
) -> Result<(), SandboxError> {
    let mut file =
        File::open(src).map_err(|e| SandboxError::io(format!("opening {}", src.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| SandboxError::io(format!("stat {}", src.display()), e))?
        .len();
    let reader: &mut dyn Read = &mut file;
    w.file_from(dest, mode, len, reader).map_err(|e| {
        SandboxError::io(
            format!("copying {} to {dest} in {}", src.display(), out.display()),
            e,
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_file_name("kernel/arch/x86/kvm/kvm-amd.ko"),
            "kvm-amd.ko"
        );
        assert_eq!(module_file_name("x.ko"), "x.ko");
    }
}
