//! Opening KVM and checking that it offers what the VMM needs.

use std::io;

use kvm_ioctls::{Cap, Kvm};

use crate::error::VmError;

/// Opens the KVM device (`/dev/kvm`, or an inherited `/dev/fd/N` in a jail), with errors
/// that say what to do.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    if quantix_hostfs::inherit::fd_of(path).is_some() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let file = quantix_hostfs::inherit::open(path, quantix_hostfs::Access::ReadWrite)
            .map_err(VmError::KvmOpen)?;
        // SAFETY: `file` is an open descriptor we own; Kvm takes it over. A descriptor that
        // is not KVM fails its first ioctl (the API version check below).
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        if kvm.get_api_version() != 12 {
            return Err(VmError::KvmOpen(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not the KVM device", path.display()),
            )));
        }
        return Ok(kvm);
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::KvmOpen(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the path",
        ))
    })?;
    match Kvm::new_with_path(&c) {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(VmError::KvmMissing),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(VmError::KvmPermission)
        }
        Err(e) => Err(VmError::KvmOpen(io::Error::from_raw_os_error(e.errno()))),
    }
}

/// Fails with the first capability the VMM needs that this KVM lacks.
pub fn check_caps(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(())
}
