//! TAP devices: opened (and created if needed) with a virtio-net header on every frame.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

use thiserror::Error;

use quantix_hostfs::tap::{ioctl_ptr, IfReq, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR, TUNGETIFF};

const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;

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
    /// Opening it by name (the name, /dev/net/tun, attaching, bringing it up).
    #[error(transparent)]
    Open(#[from] quantix_hostfs::tap::TapError),
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

/// An open TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens TAP `name`, creating it if it does not exist, with a virtio-net header.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        let (file, name) = quantix_hostfs::tap::open(name)?;
        let tap = Tap { file, name };
        tap.setup()?;
        Ok(tap)
    }

    /// Adopts a TAP fd opened by a supervisor (it must have IFF_VNET_HDR); takes ownership.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let bad = |reason: String| TapError::BadFd { fd, reason };
        let mut req = IfReq::new("");
        // SAFETY: TUNGETIFF fills a struct ifreq, which `req` is.
        unsafe { ioctl_ptr(fd, TUNGETIFF, &mut req) }.map_err(|e| bad(e.to_string()))?;
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
        // Bringing the link up is its creator's job; done here too when the interface is
        // in this network namespace (in a jail it is not: ENODEV).
        if let Err(e) = quantix_hostfs::tap::set_up(&tap.name) {
            tracing::debug!(tap = %tap.name, error = %e, "cannot bring the passed TAP up here; its creator does");
        }
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
        // SAFETY: TUNSETVNETHDRSZ takes an int, which `hdr_len` is.
        unsafe { ioctl_ptr(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &mut hdr_len) }
            .map_err(cfg("TUNSETVNETHDRSZ"))?;
        self.set_offload(0).map_err(cfg("TUNSETOFFLOAD"))
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
            assert!(
                matches!(
                    Tap::open(bad),
                    Err(TapError::Open(quantix_hostfs::tap::TapError::Name(_)))
                ),
                "{bad:?}"
            );
        }
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
