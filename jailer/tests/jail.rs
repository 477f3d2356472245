//! The jail as the kernel reports it: a real `quantix-jailer` running a real program, checked
//! through /proc from outside.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn jailer() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_quantix-jailer"))
}

fn root_only() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        eprintln!("SKIPPED: the jailer needs root");
    }
    root
}

fn jail_root(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qx-jail-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn status_field(pid: i32, key: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_string()
}

/// A v1 `pids` or v2 cgroup directory of our own, if this host lets us make one.
fn scratch_cgroup(name: &str) -> Option<PathBuf> {
    for base in [
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ] {
        let b = Path::new(base);
        if b.join("cgroup.procs").exists() {
            let d = b.join(format!("qx-jail-test-{}-{name}", std::process::id()));
            if std::fs::create_dir_all(&d).is_ok() {
                return Some(d);
            }
        }
    }
    None
}

#[test]
fn a_detached_program_runs_unprivileged_in_its_own_namespaces_root_and_cgroup() {
    if !root_only() {
        return;
    }
    let root = jail_root("detach");
    let cg = scratch_cgroup("detach");
    let mut cmd = Command::new(jailer());
    cmd.args(["--id", "jt-1", "--exec", "/bin/sleep", "--root"])
        .arg(&root)
        .args(["--uid", "900101", "--gid", "900102", "--detach"])
        .args(["--rlimit-nofile", "64", "--rlimit-nproc", "5"]);
    if let Some(cg) = &cg {
        cmd.arg("--cgroup").arg(cg);
    }
    // The program inherits the jailer's stdout: a file, not a pipe that would stay open.
    let pid_file = root.with_extension("pid");
    let status = cmd
        .args(["--", "sleep", "30"])
        .stdout(std::fs::File::create(&pid_file).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Alive (running or asleep), not a zombie.
    let st = status_field(pid, "State");
    assert!(matches!(st.chars().next(), Some('R' | 'S')), "{st}");

    assert_eq!(status_field(pid, "Uid"), "900101\t900101\t900101\t900101");
    assert_eq!(status_field(pid, "Gid"), "900102\t900102\t900102\t900102");
    assert_eq!(status_field(pid, "Groups"), "");
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace");
    }
    // Its root is the jail directory.
    let theirs = std::fs::metadata(format!("/proc/{pid}/root/")).unwrap();
    let jail = std::fs::metadata(&root).unwrap();
    assert_eq!((theirs.dev(), theirs.ino()), (jail.dev(), jail.ino()));
    // PID 1 of its namespace.
    let nspid = status_field(pid, "NSpid");
    assert!(nspid.ends_with("\t1"), "{nspid}");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = |k: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(k))
            .unwrap()
            .to_string()
    };
    assert!(
        line("Max open files").split_whitespace().any(|w| w == "64"),
        "{limits}"
    );
    assert!(
        line("Max processes").split_whitespace().any(|w| w == "5"),
        "{limits}"
    );
    // Only 0, 1, 2: nothing of the jailer's leaked.
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    assert_eq!(fds, 3);
    if let Some(cg) = &cg {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap();
        assert!(procs.lines().any(|l| l == pid.to_string()), "{procs}");
    } else {
        eprintln!("no cgroup could be made here: the cgroup check is skipped");
    }
    // SAFETY: killing the test's own jailed process.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(100));
    if let Some(cg) = cg {
        let _ = std::fs::remove_dir(cg);
    }
}

#[test]
fn the_jailer_waits_and_passes_on_the_status_and_only_the_passed_descriptors() {
    if !root_only() {
        return;
    }
    let root = jail_root("wait");
    // sh is dynamically linked: the jailer binds the library directories read-only.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec {} --id jt-2 --exec /bin/sh --root {} --uid 900103 --gid 900103 --pass-fds 1 -- \
             sh -c 'read x <&3; echo \"$x\"; echo $$; echo > /f 2>/dev/null || echo ro; exit 7' \
             3< /etc/hostname 4< /etc/hostname",
            jailer().display(),
            root.display()
        ))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let host = std::fs::read_to_string("/etc/hostname").unwrap();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), host.lines().next(), "descriptor 3 was passed");
    assert_eq!(lines.next(), Some("1"), "PID 1 of its namespace");
    assert_eq!(
        lines.next(),
        Some("ro"),
        "the jail's root is not writable by the program"
    );
}

#[test]
fn refusals() {
    if !root_only() {
        return;
    }
    let root = jail_root("refuse");
    let run = |args: &[&str]| Command::new(jailer()).args(args).output().unwrap();
    let r = root.to_str().unwrap();
    let o = run(&[
        "--id",
        "x",
        "--exec",
        "/bin/true",
        "--root",
        r,
        "--uid",
        "0",
        "--gid",
        "1",
        "--",
        "true",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&o.stderr).contains("must not be 0"));
    let o = run(&[
        "--id",
        "x",
        "--exec",
        "/nonexistent",
        "--root",
        r,
        "--uid",
        "5",
        "--gid",
        "5",
        "--",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(125));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("opening /nonexistent"),
        "{o:?}"
    );
    let o = run(&[
        "--id",
        "x",
        "--exec",
        "/bin/true",
        "--root",
        "/nonexistent",
        "--uid",
        "5",
        "--gid",
        "5",
        "--",
        "x",
    ]);
    assert_eq!(o.status.code(), Some(125));
    let o = run(&[
        "--id",
        "x",
        "--exec",
        "/bin/true",
        "--root",
        r,
        "--uid",
        "5",
        "--gid",
        "5",
    ]);
    assert_eq!(o.status.code(), Some(2), "the program is required");
}
