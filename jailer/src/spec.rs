//! The jailer's command line, one type shared by the jailer and the programs that start it
//! (the node agent builds a [`JailSpec`] and renders it with [`JailSpec::to_args`]).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Args;

use crate::JailError;

/// The network namespace of the jailed process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNs {
    /// A new, empty one (only loopback, down): every NIC is a passed TAP descriptor.
    New,
    /// The host's (for debugging).
    Host,
    /// An existing one, e.g. `/run/netns/NAME`.
    Path(PathBuf),
}

impl std::str::FromStr for NetNs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "new" => Ok(NetNs::New),
            "host" => Ok(NetNs::Host),
            p if p.starts_with('/') => Ok(NetNs::Path(p.into())),
            other => Err(format!("{other:?}: expected new, host or an absolute path")),
        }
    }
}

impl std::fmt::Display for NetNs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetNs::New => f.write_str("new"),
            NetNs::Host => f.write_str("host"),
            NetNs::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

/// How to jail one process.
#[derive(Debug, Clone, Args, PartialEq, Eq)]
pub struct JailSpec {
    /// A name for the jail (the hostname in its UTS namespace): letters, digits, '-', '_', '.'.
    #[arg(long, value_name = "ID")]
    pub id: String,
    /// The program to run (opened before the jail is entered; it need not be inside it).
    #[arg(long, value_name = "FILE")]
    pub exec: PathBuf,
    /// The jail's root directory (existing, owned by root); the program sees it as `/`.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// The uid the program runs as (not 0).
    #[arg(long, value_name = "UID")]
    pub uid: u32,
    /// The gid the program runs as (not 0); it has no supplementary groups.
    #[arg(long, value_name = "GID")]
    pub gid: u32,
    /// A cgroup directory to run in (repeatable: one per cgroup v1 hierarchy, or one v2).
    #[arg(long = "cgroup", value_name = "DIR")]
    pub cgroups: Vec<PathBuf>,
    /// Network namespace: new (default, empty), host, or a path such as /run/netns/NAME.
    #[arg(long, value_name = "NS", default_value = "new")]
    pub netns: NetNs,
    /// Descriptors 3 .. 3+N-1 are passed to the program; every other one is not.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub pass_fds: i32,
    /// RLIMIT_NOFILE of the program.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    pub rlimit_nofile: u64,
    /// RLIMIT_NPROC of the program (threads of its uid).
    #[arg(long, value_name = "N")]
    pub rlimit_nproc: Option<u64>,
    /// RLIMIT_FSIZE of the program, in bytes (the largest file it may write).
    #[arg(long, value_name = "BYTES")]
    pub rlimit_fsize: Option<u64>,
    /// An environment variable for the program (repeatable; nothing else is passed but
    /// PATH=/ and, if set, RUST_BACKTRACE and RUST_LOG).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Return once the program runs, printing its pid; it becomes a child of the
    /// jailer's parent. Without it, the jailer waits and exits with its status.
    #[arg(long)]
    pub detach: bool,
    /// Also write the program's pid (as the host sees it) to this file.
    #[arg(long, value_name = "FILE")]
    pub pid_file: Option<PathBuf>,
}

fn push_pair(a: &mut Vec<OsString>, k: &str, v: OsString) {
    a.push(k.into());
    a.push(v);
}

impl JailSpec {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), JailError> {
        if self.id.is_empty()
            || self.id.len() > 64
            || !self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(JailError::Invalid(format!(
                "--id {:?}: 1-64 letters, digits, '-', '_' or '.'",
                self.id
            )));
        }
        if self.uid == 0 || self.gid == 0 {
            return Err(JailError::Invalid(
                "--uid and --gid must not be 0: the point of the jail is an unprivileged program"
                    .into(),
            ));
        }
        if !self.root.is_absolute() || !self.exec.is_absolute() {
            return Err(JailError::Invalid(
                "--root and --exec must be absolute paths".into(),
            ));
        }
        if !(0..=1000).contains(&self.pass_fds) {
            return Err(JailError::Invalid(format!(
                "--pass-fds {}: 0 to 1000",
                self.pass_fds
            )));
        }
        for e in &self.env {
            if !e.contains('=') || e.starts_with('=') {
                return Err(JailError::Invalid(format!(
                    "--env {e:?}: expected KEY=VALUE"
                )));
            }
        }
        Ok(())
    }

    /// The program's environment.
    pub fn environment(&self) -> Vec<OsString> {
        let mut env: Vec<OsString> = vec!["PATH=/".into()];
        for k in ["RUST_BACKTRACE", "RUST_LOG"] {
            if let Some(v) = std::env::var_os(k) {
                let mut kv = OsString::from(format!("{k}="));
                kv.push(v);
                env.push(kv);
            }
        }
        env.extend(self.env.iter().map(OsString::from));
        env
    }

    /// The command line that parses back into this spec (without the program's arguments).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |k: &str, v: OsString| {
            a.push(k.into());
            a.push(v);
        };
        push("--id", self.id.clone().into());
        push("--exec", self.exec.clone().into());
        push("--root", self.root.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        for c in &self.cgroups {
            push("--cgroup", c.clone().into());
        }
        push("--netns", self.netns.to_string().into());
        push("--pass-fds", self.pass_fds.to_string().into());
        push("--rlimit-nofile", self.rlimit_nofile.to_string().into());
        if let Some(n) = self.rlimit_nproc {
            push("--rlimit-nproc", n.to_string().into());
        }
        if let Some(n) = self.rlimit_fsize {
            push("--rlimit-fsize", n.to_string().into());
        }
        for e in &self.env {
            push("--env", e.into());
        }
        if self.detach {
            a.push("--detach".into());
        }
        if let Some(p) = &self.pid_file {
            push_pair(&mut a, "--pid-file", p.clone().into());
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        spec: JailSpec,
    }

    fn sample() -> JailSpec {
        JailSpec {
            id: "vm-1".into(),
            exec: "/usr/bin/quantix-vmm".into(),
            root: "/var/lib/q/vms/vm-1/jail".into(),
            uid: 900_001,
            gid: 900_001,
            cgroups: vec!["/sys/fs/cgroup/q/vms/vm-1".into()],
            netns: NetNs::New,
            pass_fds: 4,
            rlimit_nofile: 2048,
            rlimit_nproc: Some(40),
            rlimit_fsize: None,
            env: vec!["A=b".into()],
            detach: true,
            pid_file: Some("/var/lib/q/vms/vm-1/vmm.pid".into()),
        }
    }

    #[test]
    fn renders_and_parses_back() {
        let s = sample();
        let mut argv: Vec<OsString> = vec!["quantix-jailer".into()];
        argv.extend(s.to_args());
        let back = Cli::try_parse_from(argv).unwrap().spec;
        assert_eq!(back, s);
        let mut h = s.clone();
        h.netns = NetNs::Path("/run/netns/x".into());
        h.detach = false;
        h.pid_file = None;
        let mut argv: Vec<OsString> = vec!["quantix-jailer".into()];
        argv.extend(h.to_args());
        assert_eq!(Cli::try_parse_from(argv).unwrap().spec, h);
    }

    #[test]
    fn refuses_what_defeats_the_jail() {
        let ok = sample();
        ok.validate().unwrap();
        for (f, want) in [
            (
                (|s: &mut JailSpec| s.uid = 0) as fn(&mut JailSpec),
                "must not be 0",
            ),
            (|s| s.gid = 0, "must not be 0"),
            (|s| s.id = "a/b".into(), "--id"),
            (|s| s.root = "rel".into(), "absolute"),
            (|s| s.pass_fds = -1, "--pass-fds"),
            (|s| s.env = vec!["nokey".into()], "KEY=VALUE"),
        ] {
            let mut s = sample();
            f(&mut s);
            let e = s.validate().unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        assert!("relative".parse::<NetNs>().is_err());
    }
}
