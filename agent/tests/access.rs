//! Who may call the agent: real agent processes, real `quantixctl` processes run as other
//! users, real certificates for mutual TLS.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const NOBODY: u32 = 65534;
/// Groups that need no entry in /etc/group: the agent takes numbers as they are.
const DOOR_GID: u32 = 54321;
const ADMIN_GID: u32 = 54322;

/// `quantixctl ARGS` as `uid`, primary group `gid`, supplementary `groups`.
fn ctl_as(uid: u32, gid: u32, groups: &[u32], agent: &str, args: &[&str]) -> Output {
    let groups = groups.to_vec();
    let mut cmd = Command::new(bin("quantixctl"));
    cmd.arg("--agent").arg(agent).args(args);
    // SAFETY: only async-signal-safe calls (setgroups, setgid, setuid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A kernel file that the unprivileged test clients can name.
fn kernel(dir: &Path) -> String {
    let g = guests(dir);
    g.idle.display().to_string()
}

fn root_only() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: these tests switch users and need root");
    }
    root
}

#[test]
fn the_unix_socket_admits_its_group_and_roles_decide_the_rest() {
    if !root_only() {
        return;
    }
    let dir = scratch("access-unix");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = kernel(&dir);
    let door = DOOR_GID.to_string();
    let admin = ADMIN_GID.to_string();
    let agent = Agent::start_with(
        &dir.join("state"),
        "access-unix",
        &["--socket-group", &door, "--admin-group", &admin],
    );
    let addr = format!("unix:{}", agent.socket().display());

    let meta = std::fs::symlink_metadata(agent.socket()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "socket mode");
    assert_eq!(meta.gid(), DOOR_GID, "socket group");
    let state = std::fs::metadata(dir.join("state")).unwrap();
    assert_eq!(state.mode() & 0o777, 0o711, "state directory mode");

    // Not in the socket's group: the kernel refuses the connection.
    let o = ctl_as(NOBODY, NOBODY, &[], &addr, &["list"]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("permission denied"),
        "{}",
        text(&o)
    );

    // In the socket's group only: a viewer. It reads, and cannot change anything.
    let o = ctl_as(NOBODY, DOOR_GID, &[], &addr, &["list"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl_as(
        NOBODY,
        DOOR_GID,
        &[],
        &addr,
        &["create", "--name", "v1", "--kernel", &k, "--memory", "64"],
    );
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("PermissionDenied") && err.contains("needs the admin role"),
        "{}",
        text(&o)
    );
    assert!(err.contains("is a viewer"), "{}", text(&o));

    // Also in the admin group (a supplementary group, as SO_PEERGROUPS reports it): admin.
    let o = ctl_as(
        NOBODY,
        DOOR_GID,
        &[ADMIN_GID],
        &addr,
        &["create", "--name", "v1", "--kernel", &k, "--memory", "64"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl_as(NOBODY, DOOR_GID, &[], &addr, &["get", "v1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl_as(NOBODY, DOOR_GID, &[], &addr, &["delete", "v1"]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));

    // Every mutating call and every refusal names its caller in the audit log.
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("audit")).collect();
    let line = |method: &str, code: &str| {
        audit
            .iter()
            .find(|l| l.contains(&format!("method=\"{method}\"")) && l.contains(code))
            .copied()
            .unwrap_or_else(|| panic!("no audit line for {method} {code}:\n{}", audit.join("\n")))
    };
    let created = line("CreateVm", "code=Ok");
    assert!(
        created.contains(&format!("caller=uid={NOBODY} gid={DOOR_GID} pid="))
            && created.contains("role=\"admin\""),
        "{created}"
    );
    let refused = line("CreateVm", "code=PermissionDenied");
    assert!(refused.contains("role=\"viewer\""), "{refused}");
    line("DeleteVm", "code=PermissionDenied");
}

#[test]
fn the_console_of_a_viewer_is_read_only() {
    if !root_only() || !have_kvm() {
        return;
    }
    let dir = scratch("access-console");
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let k = kernel(&dir);
    let door = DOOR_GID.to_string();
    let agent = Agent::start_with(
        &dir.join("state"),
        "access-console",
        &["--socket-group", &door],
    );
    let addr = format!("unix:{}", agent.socket().display());
    let o = Command::new(bin("quantixctl"))
        .args([
            "--agent", &addr, "create", "--name", "c1", "--kernel", &k, "--memory", "64", "--start",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // A viewer reads the console...
    let o = ctl_as(
        NOBODY,
        DOOR_GID,
        &[],
        &addr,
        &[
            "console",
            "c1",
            "--until",
            "hello from guest",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    // ...and typing into it ends the session with the reason.
    let mut child = {
        let mut cmd = Command::new(bin("quantixctl"));
        cmd.args(["--agent", &addr, "console", "c1", "--timeout", "20"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: async-signal-safe calls only.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(DOOR_GID) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().unwrap()
    };
    use std::io::Write;
    child.stdin.as_mut().unwrap().write_all(b"x\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("console input"),
        "{}",
        text(&o)
    );
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.lines().any(|l| l.contains("audit")
            && l.contains("method=\"AttachConsole\"")
            && l.contains(&format!("caller=uid={NOBODY}"))),
        "console attaches are audited:\n{log}"
    );
}

/// A CA, and certificates it signs.
struct Pki {
    dir: PathBuf,
    ca: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path, name: &str) -> Self {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = p.self_signed(&ca_key).unwrap();
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { dir, ca: p, ca_key }
    }

    fn ca_path(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// A certificate for `sans` (server) or with `ou` (client): (cert, key) paths.
    fn issue(
        &self,
        name: &str,
        sans: &[&str],
        ou: Option<&str>,
        client: bool,
    ) -> (PathBuf, PathBuf) {
        let mut p =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        if let Some(ou) = ou {
            p.distinguished_name
                .push(rcgen::DnType::OrganizationalUnitName, ou);
        }
        p.extended_key_usages = vec![if client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca, &self.ca_key);
        let cert = p.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

fn tcp_addr(state: &Path) -> String {
    let f = state.join("tcp.addr");
    let start = Instant::now();
    loop {
        if let Ok(a) = std::fs::read_to_string(&f) {
            if !a.is_empty() {
                return a;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no {}",
            f.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tcp_needs_a_client_certificate_and_its_ou_gives_the_role() {
    if !root_only() {
        return;
    }
    let dir = scratch("access-tls");
    let k = kernel(&dir);
    let pki = Pki::new(&dir, "good");
    let (server_cert, server_key) = pki.issue("agent", &["localhost", "127.0.0.1"], None, false);
    let (admin_cert, admin_key) = pki.issue("ops", &[], Some("admin"), true);
    let (viewer_cert, viewer_key) = pki.issue("watcher", &[], Some("viewer"), true);
    let rogue = Pki::new(&dir, "rogue");
    let (rogue_cert, rogue_key) = rogue.issue("intruder", &[], Some("admin"), true);

    let state = dir.join("state");
    let (sc, sk, ca) = (
        server_cert.display().to_string(),
        server_key.display().to_string(),
        pki.ca_path().display().to_string(),
    );
    let mut agent = Agent::start_with(&state, "access-tls", &[]);
    agent.kill();
    agent.extra = [
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        &sc,
        "--tls-key",
        &sk,
        "--tls-client-ca",
        &ca,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _ = std::fs::remove_file(state.join("tcp.addr"));
    agent.spawn();
    let url = format!("https://{}", tcp_addr(&state));
    let ctl = |cert: &Path, key: &Path, args: &[&str]| {
        Command::new(bin("quantixctl"))
            .args(["--agent", &url, "--tls-ca"])
            .arg(pki.ca_path())
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .args(args)
            .output()
            .unwrap()
    };

    let o = ctl(
        &admin_cert,
        &admin_key,
        &["create", "--name", "t1", "--kernel", &k, "--memory", "64"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl(&viewer_cert, &viewer_key, &["get", "t1"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let o = ctl(&viewer_cert, &viewer_key, &["delete", "t1"]);
    assert_eq!(o.status.code(), Some(10), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs the admin role"),
        "{}",
        text(&o)
    );

    // A certificate from another CA is refused in the handshake.
    let o = ctl(&rogue_cert, &rogue_key, &["list"]);
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));
    // No certificate: quantixctl says what is missing before it dials.
    let o = Command::new(bin("quantixctl"))
        .args(["--agent", &url, "--tls-ca"])
        .arg(pki.ca_path())
        .arg("list")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--tls-cert"),
        "{}",
        text(&o)
    );
    // A client that dials without a certificate anyway (tonic, no identity) is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let refused = rt.block_on(async {
        let tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(pki.ca_path()).unwrap(),
            ))
            .domain_name("localhost");
        let ch = tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await;
        match ch {
            Err(e) => format!("connect: {e:?}"),
            Ok(ch) => {
                let mut c = quantix_proto::v1::vm_service_client::VmServiceClient::new(ch);
                match c
                    .list_vms(quantix_proto::v1::ListVmsRequest::default())
                    .await
                {
                    Ok(r) => panic!("a client without a certificate listed VMs: {r:?}"),
                    Err(s) => format!("call: {s:?}"),
                }
            }
        }
    });
    eprintln!("without a certificate: {refused}");
    // Plain HTTP to the TLS port does not get through either.
    let o = Command::new(bin("quantixctl"))
        .args(["--agent", &url.replace("https://", "http://"), "list"])
        .output()
        .unwrap();
    assert_ne!(o.status.code(), Some(0), "{}", text(&o));

    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.lines().any(|l| l.contains("audit")
            && l.contains("method=\"CreateVm\"")
            && l.contains("CN=ops")
            && l.contains("role=\"admin\"")),
        "the audit line names the certificate:\n{log}"
    );
}

#[test]
fn plain_tcp_is_refused_except_on_loopback_with_insecure_tcp() {
    let dir = scratch("access-plain");
    let run = |args: &[&str]| {
        Command::new(bin("quantix-agent"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--metrics-listen", ""])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&["--listen", "0.0.0.0:0"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("needs mutual TLS"),
        "{}",
        text(&o)
    );
    let o = run(&["--listen", "0.0.0.0:0", "--insecure-tcp"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("only allowed on a loopback"),
        "{}",
        text(&o)
    );
    // A world-writable socket directory is refused.
    let open = dir.join("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let sock = open.join("agent.sock").display().to_string();
    let o = run(&["--socket", &sock]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("writable by everyone"),
        "{}",
        text(&o)
    );

    // On loopback with --insecure-tcp it serves, and says in its log what that means.
    let state = dir.join("state2");
    let mut agent = Agent::start_with(&state, "access-plain", &[]);
    agent.kill();
    agent.extra = vec![
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--insecure-tcp".into(),
    ];
    agent.spawn();
    let url = format!("http://{}", tcp_addr(&state));
    let o = Command::new(bin("quantixctl"))
        .args(["--agent", &url, "list"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(
        log.contains("every local user can act as an admin"),
        "{log}"
    );
}
