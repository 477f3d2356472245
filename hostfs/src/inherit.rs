//! Files handed to a process as open descriptors, named `/dev/fd/N`.
//!
//! The agent opens a VM's files itself (beneath its image directories) and starts the VMM
//! with them as descriptors 3, 4, ...; the VMM's arguments name them `/dev/fd/3`, the
//! conventional name that also works for a person (`quantix-vmm --kernel /dev/fd/3
//! 3<vmlinux`). Nothing is opened again by path: [`open`] duplicates the inherited
//! descriptor instead of opening `/dev/fd/N` (which would reopen the file through `/proc`,
//! absent in a jail, and with a new open file description that locks do not share).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;

use crate::Access;

/// The descriptor number of `/dev/fd/N` (or `/proc/self/fd/N`), if `path` is one.
pub fn fd_of(path: &Path) -> Option<RawFd> {
    let s = path.to_str()?;
    let n = s
        .strip_prefix("/dev/fd/")
        .or_else(|| s.strip_prefix("/proc/self/fd/"))?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Opens `path` for `access`: an inherited `/dev/fd/N` is duplicated (and must be open in a
/// mode that allows `access`), anything else is opened by path.
pub fn open(path: &Path, access: Access) -> io::Result<File> {
    let Some(fd) = fd_of(path) else {
        return OpenOptions::new()
            .read(true)
            .write(access == Access::ReadWrite)
            .open(path);
    };
    // SAFETY: F_GETFL on a descriptor number; no memory is passed. An unused number gives
    // EBADF.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("descriptor {fd} was not inherited: {e}"),
        ));
    }
    let mode = fl & libc::O_ACCMODE;
    if access == Access::ReadWrite && mode != libc::O_RDWR {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("descriptor {fd} is not open for reading and writing"),
        ));
    }
    if mode == libc::O_WRONLY {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("descriptor {fd} is open for writing only"),
        ));
    }
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor (above 2) or -1; no memory is passed.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `dup` is a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(dup) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;

    #[test]
    fn names() {
        assert_eq!(fd_of(Path::new("/dev/fd/3")), Some(3));
        assert_eq!(fd_of(Path::new("/proc/self/fd/12")), Some(12));
        for p in [
            "/dev/fd/",
            "/dev/fd/3x",
            "/dev/fd/-1",
            "/tmp/dev/fd/3",
            "dev/fd/3",
        ] {
            assert_eq!(fd_of(Path::new(p)), None, "{p}");
        }
    }

    #[test]
    fn inherited_descriptors_are_duplicated_and_their_mode_checked() {
        let dir = std::env::temp_dir().join(format!("qx-inherit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"abc").unwrap();
        let ro = File::open(&p).unwrap().into_raw_fd();
        let name = format!("/dev/fd/{ro}");
        let mut s = String::new();
        open(Path::new(&name), Access::ReadOnly)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "abc");
        let e = open(Path::new(&name), Access::ReadWrite).unwrap_err();
        assert!(
            e.to_string().contains("not open for reading and writing"),
            "{e}"
        );
        let rw = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap()
            .into_raw_fd();
        open(Path::new(&format!("/dev/fd/{rw}")), Access::ReadWrite)
            .unwrap()
            .write_all(b"x")
            .unwrap();
        // SAFETY: closing the descriptors this test made.
        unsafe {
            libc::close(ro);
            libc::close(rw);
        }
        let e = open(Path::new(&format!("/dev/fd/{ro}")), Access::ReadOnly).unwrap_err();
        assert!(e.to_string().contains("was not inherited"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
