//! TAP devices: opened (and created if needed) with a virtio-net header on every frame.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use thiserror::Error;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// TAP offload: the guest accepts partial checksums.
pub const TUN_F_CSUM: u32 = 0x01;
/// TAP offload: the guest accepts TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TAP offload: the guest accepts TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;

/// Size of the virtio-net header on each frame (`virtio_net_hdr_v1`).
pub const VNET_HDR_LEN: usize = 12;

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
    /// An fd passed by a supervisor is not a usable TAP.
    #[error("fd {fd} is not a TAP opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR: {reason}")]
    BadFd {
        /// The fd.
        fd: RawFd,
        /// Why.
        reason: String,
    },
    /// Configuring the interface failed.
    #[error("cannot configure TAP {name}: {op}: {source}")]
    Configure {
        /// The interface.
        name: String,
        /// The operation.
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    fn new(name: &str) -> Self {
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
    fn name(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn ioctl_ptr<T>(fd: RawFd, req: libc::c_ulong, arg: *mut T) -> io::Result<()> {
    // SAFETY: the callers pass a request number whose argument is exactly `T`, and `arg`
    // points to a live, properly sized `T`.
    let rc = unsafe { libc::ioctl(fd, req, arg) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist, with a virtio-net header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b == 0)
        {
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
        ioctl_ptr(owned.as_raw_fd(), TUNSETIFF, &mut req).map_err(|source| TapError::Attach {
            name: name.to_string(),
            source,
        })?;
        let tap = Tap {
            file: File::from(owned),
            name: req.name(),
        };
        tap.setup()?;
        Ok(tap)
    }

    /// Adopts a TAP fd opened by a supervisor (it must have IFF_VNET_HDR); takes ownership.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        let mut req = IfReq::new("");
        ioctl_ptr(fd, TUNGETIFF, &mut req).map_err(|e| bad(e.to_string()))?;
        if req.flags & IFF_TAP == 0 || req.flags & IFF_VNET_HDR == 0 || req.flags & IFF_NO_PI == 0 {
            return Err(bad(format!("its flags are {:#x}", req.flags)));
        }
        // SAFETY: F_GETFL/F_SETFL on an fd the kernel just confirmed is a TAP.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(bad(io::Error::last_os_error().to_string()));
            }
        }
        // SAFETY: the caller hands the fd over; it is a valid open TAP fd (checked above).
        let file = unsafe { File::from_raw_fd(fd) };
        let tap = Tap {
            file,
            name: req.name(),
        };
        tap.setup()?;
        Ok(tap)
    }

    fn setup(&self) -> Result<(), TapError> {
        let cfg = |op| {
            move |source| TapError::Configure {
                name: self.name.clone(),
                op,
                source,
            }
        };
        let mut hdr_len = VNET_HDR_LEN as libc::c_int;
        ioctl_ptr(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr_len)
            .map_err(cfg("TUNSETVNETHDRSZ"))?;
        self.set_offload(0).map_err(cfg("TUNSETOFFLOAD"))?;
        self.set_up().map_err(cfg("SIOCSIFFLAGS (up)"))
    }

    /// Tells the TAP which offloads the guest accepts on received frames.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes an unsigned int by value.
        let rc =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Brings the interface up (the host's network configuration is not our business).
    fn set_up(&self) -> io::Result<()> {
        // SAFETY: a datagram socket used only for the interface-flags ioctls, closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` is ours.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq::new(&self.name);
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req)?;
        req.flags |= libc::IFF_UP as libc::c_short;
        ioctl_ptr(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req)
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (with its virtio-net header); `WouldBlock` when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: reading into `buf` of the given length from our fd.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (with its virtio-net header).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        // SAFETY: writing `frame` to our fd.
        let n = unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

/// Where a card's frames come from and go to: a TAP, or (tests, fuzzing) memory.
pub trait FrameIo: Send + Sync {
    /// Reads one frame (with its virtio-net header); `WouldBlock` when none is queued.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (with its virtio-net header).
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
}

impl FrameIo for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "a/b", "sixteen-chars-xx", "has space", "a:b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::Name(_))), "{bad:?}");
        }
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let f = File::open("/dev/null").unwrap();
        use std::os::unix::io::IntoRawFd;
        let fd = f.into_raw_fd();
        assert!(matches!(Tap::from_fd(fd), Err(TapError::BadFd { .. })));
        // SAFETY: the fd is still ours after the refusal.
        unsafe { libc::close(fd) };
    }
}
