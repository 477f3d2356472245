//! TAP devices, opened by name (creating them when needed) with a virtio-net header on
//! every frame, and brought up. The node agent opens a VM's TAPs this way and hands the
//! descriptors to a jailed VMM, whose network namespace has no interfaces to open.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

/// TUNSETIFF.
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// TUNGETIFF.
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// IFF_TAP.
pub const IFF_TAP: libc::c_short = 0x0002;
/// IFF_NO_PI.
pub const IFF_NO_PI: libc::c_short = 0x1000;
/// IFF_VNET_HDR.
pub const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Errors opening a TAP device.
#[derive(Debug, Error)]
pub enum TapError {
    /// The name is not a valid interface name.
    #[error("invalid TAP name {0:?}: 1 to 15 characters, no '/', whitespace or ':'")]
    Name(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun (is the tun module loaded, and may this user use it?): {0}")]
    OpenTun(#[source] io::Error),
    /// The kernel refused to create or attach the interface.
    #[error("cannot attach TAP {name}: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Bringing the interface up failed.
    #[error("cannot bring TAP {name} up: {source}")]
    Up {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `struct ifreq` with the name and flags members.
#[repr(C)]
pub struct IfReq {
    /// The interface name, NUL-padded.
    pub name: [u8; libc::IFNAMSIZ],
    /// The flags.
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request for interface `name` (at most IFNAMSIZ - 1 bytes; longer names are cut).
    pub fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        let n = name.len().min(libc::IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }

    /// The name the kernel filled in.
    pub fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// ioctl(fd, req, arg) for a request whose argument is a `T`.
///
/// # Safety
///
/// `req` must be a request whose argument is exactly a `T` (the kernel reads and writes
/// `size_of::<T>()` bytes at `arg`), and `arg` must point to a live `T`.
pub unsafe fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: guaranteed by the caller (above).
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Whether `name` can be an interface name.
pub fn valid_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() >= libc::IFNAMSIZ
        || name
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0))
}

/// Opens TAP `name` (creating it if it does not exist) with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR,
/// non-blocking, and brings it up. Returns the queue's file and the interface's name.
pub fn open(name: &str) -> Result<(File, String), TapError> {
    if !valid_name(name) {
        return Err(TapError::Name(name.to_string()));
    }
    // SAFETY: a NUL-terminated path literal; the returned fd is checked and owned below.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(TapError::OpenTun(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name);
    req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF takes a struct ifreq, which `req` is.
    unsafe { ioctl_ptr(owned.as_raw_fd(), TUNSETIFF, &mut req) }.map_err(|source| {
        TapError::Attach {
            name: name.to_string(),
            source,
        }
    })?;
    let name = req.name();
    set_up(&name).map_err(|source| TapError::Up {
        name: name.clone(),
        source,
    })?;
    Ok((File::from(owned), name))
}

/// Brings interface `name` (in this network namespace) up.
pub fn set_up(name: &str) -> io::Result<()> {
    // SAFETY: a datagram socket used only for the interface-flags ioctls, closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `sock` is ours.
    let sock = unsafe { OwnedFd::from_raw_fd(sock) };
    let mut req = IfReq::new(name);
    // SAFETY: SIOCGIFFLAGS and SIOCSIFFLAGS take a struct ifreq, which `req` is.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) }?;
    req.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: as above.
    unsafe { ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "sixteen-chars-xx", "has space", "a:b"] {
            assert!(matches!(open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        assert!(valid_name("qxtap0"));
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
