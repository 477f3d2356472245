//! The few `userfaultfd(2)` operations a lazy restore needs, on raw ioctls.
//!
//! Hand-written rather than the `userfaultfd` crate: that crate creates the descriptor
//! itself (the syscall, or `/dev/userfaultfd` by path), and a jailed VMM has neither the
//! privilege the syscall wants for kernel-mode faults (KVM's) nor a `/dev`. Here the
//! supervisor opens `/dev/userfaultfd` and the VMM inherits it (`--userfaultfd
//! /dev/fd/N`); `USERFAULTFD_IOC_NEW` then makes a descriptor for this process. Five
//! ioctls and two structures from `<linux/userfaultfd.h>` follow.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

const UFFD_API: u64 = 0xAA;
/// Missing-page faults on shared memory (the memfd behind guest RAM).
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
/// Bit of `UFFDIO_COPY` in the ioctls a registration offers.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;
/// `UFFD_EVENT_PAGEFAULT`.
pub const EVENT_PAGEFAULT: u8 = 0x12;

const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_UNREGISTER`, `UFFDIO_COPY`.
pub const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<Api>());
pub const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<Register>());
pub const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<Range>());
pub const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<Copy>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: u64 = 0xAA00;

/// One message read from the descriptor (`struct uffd_msg`, 32 bytes).
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct Msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    _reserved: [u8; 7],
    /// For a page fault: its flags.
    pub flags: u64,
    /// For a page fault: the faulting address.
    pub address: u64,
    _feat: u64,
}

/// A userfaultfd of this process.
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: RawFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the structure `request` is defined with, valid and writable for the
    // call; the kernel reads and writes only within its size.
    let rc = unsafe { libc::ioctl(fd, request as libc::c_ulong, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// A non-blocking userfaultfd for missing-page faults on shared memory, made through
    /// `device` (an inherited `/dev/fd/N` of `/dev/userfaultfd`, or that path), or by the
    /// syscall when no device is given and `/dev/userfaultfd` does not exist.
    pub fn open(device: Option<&Path>) -> io::Result<Self> {
        let dev = match device {
            Some(p) => Some(quantix_hostfs::inherit::open(
                p,
                quantix_hostfs::Access::ReadWrite,
            )?),
            None => match quantix_hostfs::inherit::open(
                Path::new("/dev/userfaultfd"),
                quantix_hostfs::Access::ReadWrite,
            ) {
                Ok(f) => Some(f),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => return Err(e),
            },
        };
        let flags = (libc::O_CLOEXEC | libc::O_NONBLOCK) as libc::c_ulong;
        let raw = match &dev {
            // SAFETY: an ioctl with an integer argument on the device's descriptor.
            Some(f) => unsafe { libc::ioctl(f.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) },
            // SAFETY: the syscall takes flags only.
            None => unsafe { libc::syscall(libc::SYS_userfaultfd, flags) as libc::c_int },
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = Api {
            api: UFFD_API,
            features: UFFD_FEATURE_MISSING_SHMEM,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("UFFDIO_API (missing faults on shared memory): {e}"),
            )
        })?;
        drop(dev);
        Ok(Self { fd })
    }

    /// Registers `len` bytes at `start` for missing-page faults.
    pub fn register(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Register {
            range: Range { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut r)?;
        if r.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(io::Error::other("the kernel offers no UFFDIO_COPY here"));
        }
        Ok(())
    }

    /// Ends the registration of a range.
    pub fn unregister(&self, start: u64, len: u64) -> io::Result<()> {
        let mut r = Range { start, len };
        ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut r)
    }

    /// Fills `src.len()` bytes at `dst` (page aligned, registered, missing) with `src` and
    /// wakes the threads waiting there. Returns the bytes copied: fewer than asked when a
    /// page of the range was there already (`EEXIST`), 0 if the first one was.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<u64> {
        let mut c = Copy {
            dst,
            src: src.as_ptr() as u64,
            len: src.len() as u64,
            mode: 0,
            copy: 0,
        };
        match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
            Ok(()) => Ok(c.len),
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(c.copy.max(0) as u64),
            Err(e) => Err(e),
        }
    }

    /// Messages waiting, into `buf`; 0 when none.
    pub fn read(&self, buf: &mut [Msg]) -> io::Result<usize> {
        let bytes = std::mem::size_of_val(buf);
        // SAFETY: `buf` is writable for `bytes` bytes, and every bit pattern is a `Msg`.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), bytes) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(n as usize / std::mem::size_of::<Msg>())
    }

    /// The descriptor (to poll).
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_abi_matches_linux() {
        assert_eq!(std::mem::size_of::<Msg>(), 32);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
    }
}
