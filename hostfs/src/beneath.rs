//! Opening files only beneath allowed directories.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};

use thiserror::Error;

use crate::Access;

/// Why a file may not be used.
#[derive(Debug, Error)]
pub enum BeneathError {
    /// Not a path the directories could hold.
    #[error("{0:?} is not an absolute path")]
    NotAbsolute(PathBuf),
    /// Outside every allowed directory.
    #[error("{path:?} is outside the image directories ({dirs})")]
    Outside {
        /// The path.
        path: PathBuf,
        /// The allowed directories, for the message.
        dirs: String,
    },
    /// Leads out of its directory through `..` or a symlink (or through a magic link).
    #[error("{0:?} leads out of its image directory (through a symlink or \"..\")")]
    Escapes(PathBuf),
    /// Does not exist.
    #[error("{0:?} does not exist")]
    NotFound(PathBuf),
    /// Neither a regular file nor a block device.
    #[error("{path:?} is a {kind}, not a regular file or block device")]
    WrongType {
        /// The path.
        path: PathBuf,
        /// What it is.
        kind: &'static str,
    },
    /// Any other failure.
    #[error("{path:?}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl BeneathError {
    /// Whether the caller was refused (as opposed to naming something that is not there or
    /// cannot be used).
    pub fn is_denied(&self) -> bool {
        matches!(
            self,
            BeneathError::Outside { .. } | BeneathError::Escapes(_)
        )
    }
}

/// A configured directory that images may come from.
#[derive(Debug)]
struct Dir {
    /// As configured (absolute), the form API clients are told to use.
    configured: PathBuf,
    /// As configured, made absolute and free of symlinks once at start (the directory itself
    /// is the operator's choice; what is beneath it is the API client's).
    path: PathBuf,
    /// An `O_PATH` descriptor: lookups start here, whatever happens to the path later.
    fd: OwnedFd,
}

/// The directories a VM's files may come from.
#[derive(Debug, Default)]
pub struct ImageDirs {
    dirs: Vec<Dir>,
}

impl ImageDirs {
    /// Opens each directory (it must exist).
    pub fn new(dirs: &[PathBuf]) -> Result<Self, BeneathError> {
        let mut out = Vec::new();
        for d in dirs {
            let path = d.canonicalize().map_err(|source| BeneathError::Io {
                path: d.clone(),
                source,
            })?;
            let c = cstr(&path)?;
            // SAFETY: `c` is a NUL-terminated path; open returns a new descriptor or -1.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                return Err(BeneathError::Io {
                    path,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: `fd` is a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let configured = if d.is_absolute() {
                d.clone()
            } else {
                path.clone()
            };
            out.push(Dir {
                configured,
                path,
                fd,
            });
        }
        Ok(Self { dirs: out })
    }

    /// The directories, resolved.
    pub fn paths(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|d| d.path.as_path())
    }

    /// Whether any directory is configured.
    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }

    /// Opens `path` for `access` if it lies beneath one of the directories and is a regular
    /// file or a block device. Symlinks are followed only while they stay beneath the
    /// directory; `..` may not climb out of it; `/proc` magic links are refused.
    pub fn open(&self, path: &Path, access: Access) -> Result<File, BeneathError> {
        if !path.is_absolute() {
            return Err(BeneathError::NotAbsolute(path.to_path_buf()));
        }
        let Some((dir, rel)) = self.dirs.iter().find_map(|d| {
            path.strip_prefix(&d.configured)
                .or_else(|_| path.strip_prefix(&d.path))
                .ok()
                .map(|r| (d, r))
        }) else {
            return Err(BeneathError::Outside {
                path: path.to_path_buf(),
                dirs: self.describe(),
            });
        };
        if rel.as_os_str().is_empty() || rel.components().all(|c| c == Component::CurDir) {
            return Err(BeneathError::WrongType {
                path: path.to_path_buf(),
                kind: "directory",
            });
        }
        let flags = match access {
            Access::ReadOnly => libc::O_RDONLY,
            Access::ReadWrite => libc::O_RDWR,
        } | libc::O_CLOEXEC
            | libc::O_NOCTTY
            // A FIFO would block the open; the type check below refuses it anyway.
            | libc::O_NONBLOCK;
        let file = openat2(
            &dir.fd,
            rel,
            flags,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => BeneathError::Escapes(path.to_path_buf()),
            Some(libc::ENOENT) => BeneathError::NotFound(path.to_path_buf()),
            _ => BeneathError::Io {
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        let meta = file.metadata().map_err(|source| BeneathError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            let kind = if ft.is_dir() {
                "directory"
            } else if ft.is_char_device() {
                "character device"
            } else if ft.is_fifo() {
                "FIFO"
            } else if ft.is_socket() {
                "socket"
            } else {
                "special file"
            };
            return Err(BeneathError::WrongType {
                path: path.to_path_buf(),
                kind,
            });
        }
        clear_nonblock(&file).map_err(|source| BeneathError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(file)
    }

    fn describe(&self) -> String {
        if self.dirs.is_empty() {
            return "none are configured: --image-dir".into();
        }
        self.dirs
            .iter()
            .map(|d| d.configured.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn cstr(p: &Path) -> Result<CString, BeneathError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| BeneathError::Io {
        path: p.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"),
    })
}

/// `openat2(dirfd, rel, flags, resolve)`.
fn openat2(dir: &OwnedFd, rel: &Path, flags: i32, resolve: u64) -> io::Result<File> {
    let c = CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    // SAFETY: open_how is plain data; all zeroes is a valid value (no mode, no resolve).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = resolve;
    // SAFETY: `dir` is an open descriptor, `c` a NUL-terminated path and `how` a valid
    // open_how of the size passed; the kernel only reads them and returns a new descriptor
    // or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

fn clear_nonblock(f: &File) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl & !libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("qx-hostfs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_beneath_and_never_out_through_links() {
        let d = scratch("beneath");
        let images = d.join("images");
        std::fs::create_dir_all(images.join("sub")).unwrap();
        std::fs::write(images.join("disk.img"), b"disk").unwrap();
        std::fs::write(d.join("secret"), b"secret").unwrap();
        std::os::unix::fs::symlink("disk.img", images.join("inside")).unwrap();
        std::os::unix::fs::symlink(d.join("secret"), images.join("absolute")).unwrap();
        std::os::unix::fs::symlink("../secret", images.join("relative")).unwrap();
        std::os::unix::fs::symlink("/proc/self/root/etc/passwd", images.join("magic")).unwrap();
        let dirs = ImageDirs::new(std::slice::from_ref(&images)).unwrap();
        let images = images.canonicalize().unwrap();

        let mut f = dirs
            .open(&images.join("disk.img"), Access::ReadWrite)
            .unwrap();
        f.write_all(b"DISK").unwrap();
        let mut s = String::new();
        dirs.open(&images.join("inside"), Access::ReadOnly)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "DISK");
        dirs.open(&images.join("sub/../disk.img"), Access::ReadOnly)
            .unwrap();

        for (p, denied) in [
            (d.join("secret"), true),
            (PathBuf::from("/etc/passwd"), true),
            (images.join("../secret"), true),
            (images.join("absolute"), true),
            (images.join("relative"), true),
            (images.join("magic"), true),
            (images.join("missing"), false),
            (images.join("sub"), false),
            (images.clone(), false),
        ] {
            let e = dirs.open(&p, Access::ReadOnly).unwrap_err();
            assert_eq!(e.is_denied(), denied, "{p:?}: {e}");
        }
        assert!(matches!(
            dirs.open(&images.join("missing"), Access::ReadOnly),
            Err(BeneathError::NotFound(_))
        ));
        let e = dirs.open(Path::new("rel"), Access::ReadOnly).unwrap_err();
        assert!(matches!(e, BeneathError::NotAbsolute(_)), "{e}");
        let e = dirs
            .open(&images.join("relative"), Access::ReadOnly)
            .unwrap_err();
        assert!(
            e.to_string().contains("leads out of its image directory"),
            "{e}"
        );
        let e = dirs
            .open(Path::new("/etc/passwd"), Access::ReadOnly)
            .unwrap_err();
        assert!(
            e.to_string().contains("outside the image directories"),
            "{e}"
        );
        let none = ImageDirs::default();
        let e = none
            .open(Path::new("/etc/passwd"), Access::ReadOnly)
            .unwrap_err();
        assert!(e.to_string().contains("--image-dir"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn special_files_are_refused() {
        let d = scratch("special");
        let c = CString::new(d.join("fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        std::os::unix::fs::symlink("/dev/null", d.join("null")).unwrap();
        let dirs = ImageDirs::new(std::slice::from_ref(&d)).unwrap();
        let d = d.canonicalize().unwrap();
        let e = dirs.open(&d.join("fifo"), Access::ReadOnly).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        // /dev/null is outside: the symlink leads out.
        let e = dirs.open(&d.join("null"), Access::ReadOnly).unwrap_err();
        assert!(e.is_denied(), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
