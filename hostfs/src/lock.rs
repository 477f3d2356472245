//! Image locks: open file description (OFD) locks over the whole file, exclusive for a
//! read-write user and shared for read-only ones, as QEMU locks its images (QEMU locks
//! single bytes per permission; one whole-file lock expresses the same rule here: one
//! writer, or any number of readers).
//!
//! An OFD lock belongs to the open file description, not the process: it is shared by
//! every duplicate of the descriptor (so the agent can take it and hand the file to the
//! VMM), it survives `fork`/`exec`, and it goes away when the last descriptor closes — when
//! the VMM exits, however it exits.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

use thiserror::Error;

use crate::Access;

/// A lock that cannot be taken.
#[derive(Debug, Error)]
pub enum LockError {
    /// Someone else holds a conflicting lock.
    #[error("locked by {}", describe(.0))]
    Held(Vec<Holder>),
    /// The lock call failed.
    #[error("cannot lock: {0}")]
    Io(#[from] io::Error),
}

/// A process that holds a lock on the same file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its pid.
    pub pid: i32,
    /// Its command name.
    pub comm: String,
}

fn describe(h: &[Holder]) -> String {
    if h.is_empty() {
        return "another process (not visible from here)".into();
    }
    h.iter()
        .map(|h| format!("pid {} ({})", h.pid, h.comm))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Locks `file` for `access`: exclusive for read-write, shared for read-only. Does not
/// wait: a conflict is an error naming the holders that `/proc` shows.
pub fn lock(file: &File, access: Access) -> Result<(), LockError> {
    let ty = match access {
        Access::ReadOnly => libc::F_RDLCK,
        Access::ReadWrite => libc::F_WRLCK,
    };
    // SAFETY: a zeroed flock is a valid value; the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end, however the file grows
    fl.l_pid = 0; // must be 0 for OFD locks
                  // SAFETY: F_OFD_SETLK reads the flock we own; the descriptor is open.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Err(LockError::Held(holders(file))),
        _ => Err(LockError::Io(e)),
    }
}

/// The processes other than this one that have `file` open with a lock on it, found as
/// `lsof` does: every `/proc/PID/fd/N` that is the same file and whose `fdinfo` lists a
/// lock. Only run after a conflict; processes this one cannot inspect are missed.
pub fn holders(file: &File) -> Vec<Holder> {
    let Ok(meta) = file.metadata() else {
        return Vec::new();
    };
    let (dev, ino) = (meta.dev(), meta.ino());
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(m) = std::fs::metadata(fd.path()) else {
                continue;
            };
            if m.dev() != dev || m.ino() != ino {
                continue;
            }
            let info = std::fs::read_to_string(p.path().join("fdinfo").join(fd.file_name()))
                .unwrap_or_default();
            if info.lines().any(|l| l.starts_with("lock:")) {
                let comm = std::fs::read_to_string(p.path().join("comm"))
                    .map(|c| c.trim().to_string())
                    .unwrap_or_default();
                out.push(Holder { pid, comm });
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::process::Command;

    #[test]
    fn one_writer_or_many_readers_and_the_holder_is_named() {
        let dir = std::env::temp_dir().join(format!("qx-lock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("disk.img");
        std::fs::write(&p, b"x").unwrap();
        let rw = || OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let ro = || File::open(&p).unwrap();

        // Two readers share; a writer is refused while they hold it.
        let (r1, r2) = (ro(), ro());
        lock(&r1, Access::ReadOnly).unwrap();
        lock(&r2, Access::ReadOnly).unwrap();
        let w = rw();
        assert!(matches!(
            lock(&w, Access::ReadWrite),
            Err(LockError::Held(_))
        ));
        drop((r1, r2));
        // Closing the last descriptor drops the lock.
        lock(&w, Access::ReadWrite).unwrap();
        assert!(matches!(
            lock(&ro(), Access::ReadOnly),
            Err(LockError::Held(_))
        ));
        assert!(matches!(
            lock(&rw(), Access::ReadWrite),
            Err(LockError::Held(_))
        ));
        // A duplicate shares the description, and so the lock.
        lock(&w.try_clone().unwrap(), Access::ReadWrite).unwrap();
        drop(w);

        // Another process holds it: the error names it.
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(
                "import fcntl,struct,sys,time\n\
                 f=open(sys.argv[1],'r+')\n\
                 fcntl.fcntl(f,37,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,0,0))\n\
                 print('locked',flush=True)\n\
                 time.sleep(30)\n",
            )
            .arg(&p)
            .stdout(std::process::Stdio::piped())
            .spawn();
        if let Ok(c) = child.as_mut() {
            use std::io::BufRead;
            let mut line = String::new();
            std::io::BufReader::new(c.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            assert_eq!(line.trim(), "locked");
            let e = lock(&ro(), Access::ReadOnly).unwrap_err();
            let pid = c.id() as i32;
            match &e {
                LockError::Held(h) => assert!(h.iter().any(|h| h.pid == pid), "{e}"),
                other => panic!("{other}"),
            }
            assert!(
                e.to_string().contains(&format!("pid {pid} (python3)")),
                "{e}"
            );
            let _ = c.kill();
            let _ = c.wait();
        } else {
            eprintln!("python3 missing: the cross-process holder check is skipped");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
