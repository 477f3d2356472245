//! One sandbox at a time per work directory: a nested host is two busy TCG
//! vCPUs, and two of them on a 2-core machine would make each other's
//! deadlines meaningless. Serialised with flock(2), so it works across the
//! test binaries cargo runs one after the other or in parallel.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use tracing::info;

use crate::error::SandboxError;

/// Held while a sandbox runs; released on drop (closing the file).
#[derive(Debug)]
pub(crate) struct RunLock {
    _file: File,
}

impl RunLock {
    /// Takes the exclusive lock on `path`, waiting for other holders.
    pub fn acquire(path: &Path) -> Result<Self, SandboxError> {
        let ctx = || format!("locking {}", path.display());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| SandboxError::io(ctx(), e))?;
        if flock(&file, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            info!("another sandbox is running; waiting for {}", path.display());
            loop {
                match flock(&file, libc::LOCK_EX) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(SandboxError::io(ctx(), e)),
                }
            }
        }
        Ok(RunLock { _file: file })
    }
}

fn flock(file: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: flock(2) on a file descriptor owned by `file`, which is open
    // for the whole call; no memory is passed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), op) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_released_on_drop() {
        let path = std::env::temp_dir().join(format!("qx-lock-{}", std::process::id()));
        let held = RunLock::acquire(&path).unwrap();
        let other = File::open(&path).unwrap();
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_err());
        drop(held);
        assert!(flock(&other, libc::LOCK_EX | libc::LOCK_NB).is_ok());
        let _ = std::fs::remove_file(&path);
    }
}
