//! Who calls the agent, and what they may do.
//!
//! Every connection is identified: on the Unix socket by the kernel's peer credentials
//! (`SO_PEERCRED`: uid, gid and pid; `SO_PEERGROUPS`: the supplementary groups, both as they
//! were when the client connected), on TCP by the subject of the client certificate that
//! mutual TLS verified. The identity maps to a [`Role`]; a call that needs a role the caller
//! lacks gets `PERMISSION_DENIED` naming it. See docs/security.md.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Get, List, Watch, GetNode and console output.
    Viewer,
    /// Everything.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Admin => "admin",
        })
    }
}

/// An identified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// How the audit log names it: `uid=1000 gid=1000 pid=42` or `cert "CN=ops,OU=admin"`.
    pub who: String,
    /// Its role; `None` when it is in no role (every call is refused).
    pub role: Option<Role>,
}

impl Caller {
    /// `Ok` when the caller holds `needed` (an admin holds every role).
    pub fn require(&self, needed: Role) -> Result<(), String> {
        match self.role {
            Some(r) if r >= needed => Ok(()),
            Some(r) => Err(format!(
                "this call needs the {needed} role; the caller ({}) is a {r}",
                self.who
            )),
            None => Err(format!(
                "this call needs the {needed} role; the caller ({}) has no role on this agent",
                self.who
            )),
        }
    }
}

/// The kernel's view of the process at the other end of a Unix socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixPeer {
    /// Process id when it connected.
    pub pid: i32,
    /// Effective uid.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

impl UnixPeer {
    /// Reads the credentials of the peer of the connected socket `fd`.
    pub fn of(fd: RawFd) -> io::Result<Self> {
        let mut cred = libc::ucred {
            pid: 0,
            uid: 0,
            gid: 0,
        };
        let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
        // SAFETY: `cred` is a valid, writable `ucred` of `len` bytes; the kernel writes at
        // most `len` bytes and updates `len`.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_PEERCRED,
                (&mut cred as *mut libc::ucred).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // NGROUPS_MAX is 65536 on Linux; start small and grow on ERANGE as the kernel asks.
        let mut groups = vec![0u32; 64];
        loop {
            let mut len = (groups.len() * 4) as libc::socklen_t;
            // SAFETY: `groups` is a valid, writable buffer of `len` bytes; the kernel writes at
            // most `len` bytes and updates `len` (to the size needed on ERANGE).
            let r = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERGROUPS,
                    groups.as_mut_ptr().cast(),
                    &mut len,
                )
            };
            if r == 0 {
                groups.truncate(len as usize / 4);
                break;
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ERANGE) && (len as usize) <= 65536 * 4 {
                groups = vec![0u32; (len as usize).div_ceil(4).max(groups.len() * 2)];
                continue;
            }
            return Err(e);
        }
        Ok(Self {
            pid: cred.pid,
            uid: cred.uid,
            gid: cred.gid,
            groups,
        })
    }

    fn in_any(&self, gids: &[u32]) -> bool {
        gids.contains(&self.gid) || self.groups.iter().any(|g| gids.contains(g))
    }
}

impl fmt::Display for UnixPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid={} gid={} pid={}", self.uid, self.gid, self.pid)
    }
}

/// A client certificate's subject, as far as roles and the audit log need it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSubject {
    /// The whole subject, RFC 4514 style (`CN=ops,OU=admin,O=example`).
    pub subject: String,
    /// Its organizational units.
    pub ous: Vec<String>,
}

impl CertSubject {
    /// Parses the subject of a DER certificate (already verified by TLS).
    pub fn of(der: &[u8]) -> Result<Self, String> {
        use x509_parser::prelude::*;
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| format!("the client certificate does not parse: {e}"))?;
        let subject = cert.subject();
        let ous = subject
            .iter_organizational_unit()
            .filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect();
        Ok(Self {
            subject: subject.to_string(),
            ous,
        })
    }
}

/// The mapping from identities to roles, from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Uids that are admins whatever their groups (root and the agent's own uid).
    pub admin_uids: Vec<u32>,
    /// Members of these groups are admins.
    pub admin_gids: Vec<u32>,
    /// Members of these groups are viewers.
    pub viewer_gids: Vec<u32>,
    /// Certificates with one of these OUs are admins.
    pub tls_admin_ous: Vec<String>,
    /// Certificates with one of these OUs are viewers.
    pub tls_viewer_ous: Vec<String>,
}

impl Policy {
    /// The caller at the other end of a Unix socket connection.
    pub fn unix_caller(&self, peer: &UnixPeer) -> Caller {
        let role = if self.admin_uids.contains(&peer.uid) || peer.in_any(&self.admin_gids) {
            Some(Role::Admin)
        } else if peer.in_any(&self.viewer_gids) {
            Some(Role::Viewer)
        } else {
            None
        };
        Caller {
            who: peer.to_string(),
            role,
        }
    }

    /// The caller that presented (the chain starting with) `leaf`.
    pub fn tls_caller(&self, leaf: &[u8]) -> Caller {
        match CertSubject::of(leaf) {
            Ok(s) => {
                let has = |list: &[String]| s.ous.iter().any(|ou| list.contains(ou));
                let role = if has(&self.tls_admin_ous) {
                    Some(Role::Admin)
                } else if has(&self.tls_viewer_ous) {
                    Some(Role::Viewer)
                } else {
                    None
                };
                Caller {
                    who: format!("cert {:?}", s.subject),
                    role,
                }
            }
            Err(e) => Caller {
                who: format!("cert ({e})"),
                role: None,
            },
        }
    }
}

/// Which listener a request came through, and so how its caller is identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    /// The Unix socket: peer credentials.
    Unix,
    /// TCP with mutual TLS: the client certificate.
    Tls,
    /// Plain TCP on loopback (`--insecure-tcp`): nobody is identified; every caller is an
    /// admin, which is why it is refused anywhere but on loopback and warned about.
    InsecureTcp,
}

/// The caller of a request that came through `door`.
pub fn caller_of<T>(policy: &Policy, door: Door, req: &tonic::Request<T>) -> Caller {
    match door {
        Door::Unix => match req.extensions().get::<Arc<UnixPeer>>() {
            Some(peer) => policy.unix_caller(peer),
            None => Caller {
                who: "unix peer (credentials unavailable)".into(),
                role: None,
            },
        },
        Door::Tls => match req.peer_certs() {
            Some(certs) if !certs.is_empty() => policy.tls_caller(&certs[0]),
            _ => Caller {
                who: "tls peer without a certificate".into(),
                role: None,
            },
        },
        Door::InsecureTcp => Caller {
            who: match req.remote_addr() {
                Some(a) => format!("insecure tcp {a}"),
                None => "insecure tcp".into(),
            },
            role: Some(Role::Admin),
        },
    }
}

/// An accepted Unix connection with its peer's credentials, for tonic's
/// `serve_with_incoming`: tonic puts [`Connected::connect_info`] into every request's
/// extensions.
///
/// [`Connected::connect_info`]: tonic::transport::server::Connected::connect_info
pub struct PeerStream {
    stream: UnixStream,
    peer: Arc<UnixPeer>,
}

impl PeerStream {
    /// Wraps an accepted connection, reading its peer's credentials.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let peer = Arc::new(UnixPeer::of(stream.as_raw_fd())?);
        Ok(Self { stream, peer })
    }

    /// The peer.
    pub fn peer(&self) -> &UnixPeer {
        &self.peer
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Arc<UnixPeer>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Resolves a group given by name or number. Names are looked up in `group_file`
/// (`/etc/group`) directly rather than through NSS: the agent is also shipped as a static
/// binary, where glibc's NSS modules cannot be loaded. A group from a directory service
/// (LDAP, SSSD) is given by its number.
pub fn resolve_group(name: &str, group_file: &Path) -> io::Result<Option<u32>> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(Some(gid));
    }
    let text = match std::fs::read_to_string(group_file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().find_map(|line| {
        let mut f = line.split(':');
        (f.next() == Some(name))
            .then(|| f.nth(1).and_then(|g| g.trim().parse().ok()))
            .flatten()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32, groups: &[u32]) -> UnixPeer {
        UnixPeer {
            pid: 7,
            uid,
            gid,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn unix_roles_come_from_uid_and_groups() {
        let p = Policy {
            admin_uids: vec![0],
            admin_gids: vec![500],
            viewer_gids: vec![600],
            ..Policy::default()
        };
        assert_eq!(p.unix_caller(&peer(0, 0, &[])).role, Some(Role::Admin));
        assert_eq!(p.unix_caller(&peer(1000, 500, &[])).role, Some(Role::Admin));
        assert_eq!(
            p.unix_caller(&peer(1000, 1000, &[600, 500])).role,
            Some(Role::Admin)
        );
        let v = p.unix_caller(&peer(1000, 1000, &[600]));
        assert_eq!(v.role, Some(Role::Viewer));
        assert_eq!(v.who, "uid=1000 gid=1000 pid=7");
        assert!(v.require(Role::Viewer).is_ok());
        let e = v.require(Role::Admin).unwrap_err();
        assert!(
            e.contains("needs the admin role") && e.contains("is a viewer"),
            "{e}"
        );
        let n = p.unix_caller(&peer(65534, 65534, &[]));
        assert_eq!(n.role, None);
        assert!(n.require(Role::Viewer).unwrap_err().contains("no role"));
    }

    #[test]
    fn peer_credentials_of_a_real_socket() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let p = UnixPeer::of(a.as_raw_fd()).unwrap();
        // SAFETY: getuid/getgid/getpid cannot fail.
        let (uid, gid, pid) = unsafe { (libc::geteuid(), libc::getegid(), libc::getpid()) };
        assert_eq!((p.uid, p.gid, p.pid), (uid, gid, pid));
    }

    #[test]
    fn certificate_roles_come_from_the_ou() {
        let mut params = rcgen::CertificateParams::new(vec!["client".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ops");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "admin");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let p = Policy {
            tls_admin_ous: vec!["admin".into()],
            tls_viewer_ous: vec!["viewer".into()],
            ..Policy::default()
        };
        let c = p.tls_caller(cert.der());
        assert_eq!(c.role, Some(Role::Admin));
        assert!(
            c.who.contains("CN=ops") && c.who.contains("OU=admin"),
            "{}",
            c.who
        );
        let c = p.tls_caller(b"not a certificate");
        assert_eq!(c.role, None);
        assert!(c.who.contains("does not parse"), "{}", c.who);
    }

    #[test]
    fn groups_by_name_or_number() {
        let dir = std::env::temp_dir().join(format!("qx-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("group");
        std::fs::write(&f, "root:x:0:\nquantix:x:998:alice,bob\nbad:x:\n").unwrap();
        assert_eq!(resolve_group("quantix", &f).unwrap(), Some(998));
        assert_eq!(resolve_group("root", &f).unwrap(), Some(0));
        assert_eq!(resolve_group("1234", &f).unwrap(), Some(1234));
        assert_eq!(resolve_group("bad", &f).unwrap(), None);
        assert_eq!(resolve_group("nope", &f).unwrap(), None);
        assert_eq!(resolve_group("x", &dir.join("missing")).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
