//! The agent's doors: its Unix socket (mode 0660, a configured group) and, when configured,
//! TCP with mutual TLS.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use thiserror::Error;
use tokio::net::UnixListener;

/// A listener that cannot be set up.
#[derive(Debug, Error)]
pub enum ListenError {
    /// A directory that anyone may write to could have the socket replaced under the agent.
    #[error(
        "{0}: the directory of the agent's socket must not be writable by everyone \
         (mode {1:o}); choose another socket path or chmod o-w it"
    )]
    WorldWritable(PathBuf, u32),
    /// A file system call failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The TLS files are unusable.
    #[error("{key} {path}: {why}")]
    Tls {
        /// The configuration key.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ListenError + 'a {
    move |source| ListenError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the state directory (mode 0711: others may reach the socket inside by name, and
/// nothing else) or checks an existing one is not writable by everyone.
pub fn prepare_state_dir(dir: &Path) -> Result<(), ListenError> {
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .map_err(io_err("cannot create", dir))?;
        // The umask may have taken bits away; set exactly what is meant.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
            .map_err(io_err("cannot chmod", dir))?;
    }
    check_not_world_writable(dir)
}

fn check_not_world_writable(dir: &Path) -> Result<(), ListenError> {
    let meta = std::fs::metadata(dir).map_err(io_err("cannot stat", dir))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o002 != 0 {
        return Err(ListenError::WorldWritable(dir.to_path_buf(), mode));
    }
    Ok(())
}

/// Binds the agent's Unix socket at `path`: its directory must not be world-writable, a
/// stale socket is replaced, and the socket gets mode 0660 and group `gid` (root's when
/// `None`) before it appears at `path`. It is bound under a temporary name beside `path`,
/// given its owner and mode there, and renamed into place, so that no client (nor a
/// starter waiting for the path to exist) ever sees it with the wrong permissions; the
/// process's umask (0077, set at start) keeps it private until then.
pub fn bind_unix(path: &Path, gid: Option<u32>) -> Result<UnixListener, ListenError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    check_not_world_writable(parent)?;
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_dir() {
            return Err(ListenError::Io {
                what: "cannot bind",
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::IsADirectory, "a directory is in the way"),
            });
        }
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staged = parent.join(format!(".{name}.{}.new", std::process::id()));
    // A leftover of this pid's earlier life (pids are reused) is ours to remove.
    let _ = std::fs::remove_file(&staged);
    let listener = UnixListener::bind(&staged).map_err(io_err("cannot bind", &staged))?;
    let placed = give_mode(&staged, gid).and_then(|()| {
        std::fs::rename(&staged, path).map_err(io_err("cannot move the socket to", path))
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

/// Group `gid` (root's when `None`) and mode 0660 for the socket at `path`.
fn give_mode(path: &Path, gid: Option<u32>) -> Result<(), ListenError> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        ListenError::Io {
            what: "cannot bind",
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"),
        }
    })?;
    // SAFETY: `c` is a NUL-terminated path; -1 leaves the owner as it is. lchown does not
    // follow a symlink, should one have replaced the socket.
    let r = unsafe { libc::lchown(c.as_ptr(), u32::MAX, gid.unwrap_or(0)) };
    if r != 0 {
        return Err(io_err("cannot chown", path)(io::Error::last_os_error()));
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(io_err("cannot chmod", path))
}

/// The server side of mutual TLS from PEM files.
pub fn server_tls(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<tonic::transport::ServerTlsConfig, ListenError> {
    let read = |k: &'static str, p: &Path| {
        let data = std::fs::read(p).map_err(|e| ListenError::Tls {
            key: k,
            path: p.to_path_buf(),
            why: e.to_string(),
        })?;
        if !String::from_utf8_lossy(&data).contains("-----BEGIN ") {
            return Err(ListenError::Tls {
                key: k,
                path: p.to_path_buf(),
                why: "not a PEM file (no -----BEGIN line)".into(),
            });
        }
        Ok(data)
    };
    let identity =
        tonic::transport::Identity::from_pem(read("tls_cert", cert)?, read("tls_key", key)?);
    let ca = tonic::transport::Certificate::from_pem(read("tls_client_ca", client_ca)?);
    Ok(tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(ca)
        .client_auth_optional(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn socket_mode_group_and_directory_checks() {
        let dir = std::env::temp_dir().join(format!("qx-listen-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        prepare_state_dir(&dir.join("state")).unwrap();
        let meta = std::fs::metadata(dir.join("state")).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o711);
        let sock = dir.join("state/agent.sock");
        std::fs::write(&sock, b"stale").unwrap();
        // SAFETY: getegid cannot fail.
        let gid = unsafe { libc::getegid() };
        let _l = bind_unix(&sock, Some(gid)).unwrap();
        let meta = std::fs::symlink_metadata(&sock).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o660);
        assert_eq!(meta.gid(), gid);
        let names: Vec<_> = std::fs::read_dir(dir.join("state"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["agent.sock"], "the staged name is gone");

        let open = dir.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = bind_unix(&open.join("agent.sock"), None).unwrap_err();
        assert!(matches!(e, ListenError::WorldWritable(..)), "{e}");
        assert!(e.to_string().contains("writable by everyone"), "{e}");
        let e = prepare_state_dir(&open).unwrap_err();
        assert!(matches!(e, ListenError::WorldWritable(..)), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tls_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("qx-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("junk"), b"junk").unwrap();
        let e = server_tls(&dir.join("missing"), &dir.join("junk"), &dir.join("junk"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls_cert ") && e.contains("missing"), "{e}");
        std::fs::write(dir.join("pem"), b"-----BEGIN CERTIFICATE-----\n").unwrap();
        let e = server_tls(&dir.join("pem"), &dir.join("junk"), &dir.join("pem"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("tls_key ") && e.contains("not a PEM"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
