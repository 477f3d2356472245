//! `qx-jail`: runs a quantix-vmm command line jailed the way the agent jails a VMM, for the
//! `jail` benchmark (inside the nested host, built statically).
//!
//!     qx-jail --jailer PATH --root DIR --uid UID [--cgroup DIR --guest-mib N --vcpus N]
//!             [--pid-file FILE] -- /path/quantix-vmm ARGS...
//!
//! As the agent does, it opens every file the VMM names (`--kernel`, `--initramfs`,
//! `--firmware`, `--disk path=`), `/dev/kvm` and every TAP (`--net tap=`) itself, passes
//! them as descriptors 3.. and rewrites the arguments to `/dev/fd/N` and `fd=N`, prepares
//! the jail directory (root's, 0711, with `run/` the uid's, 0700), optionally a cgroup v2
//! directory with the agent's limits (memory: guest + 64 MiB; CPU: one CPU per vCPU), and
//! execs `quantix-jailer`, which waits for the VMM and exits with its status. The VMM's
//! stdio is this process's (the benchmarks read the serial console there).
//!
//! Exit status: the VMM's (through the jailer); 125 when the jail cannot be set up.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const EXIT_SETUP: u8 = 125;

struct Args {
    jailer: PathBuf,
    root: PathBuf,
    uid: u32,
    cgroup: Option<PathBuf>,
    guest_mib: u64,
    vcpus: u64,
    pid_file: Option<PathBuf>,
    vmm: Vec<String>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        jailer: PathBuf::new(),
        root: PathBuf::new(),
        uid: 0,
        cgroup: None,
        guest_mib: 0,
        vcpus: 1,
        pid_file: None,
        vmm: Vec::new(),
    };
    while let Some(k) = it.next() {
        if k == "--" {
            a.vmm = it.collect();
            break;
        }
        let v = it.next().ok_or_else(|| format!("{k} needs a value"))?;
        let num = |v: &str| {
            v.parse::<u64>()
                .map_err(|_| format!("{k} {v:?}: not a number"))
        };
        match k.as_str() {
            "--jailer" => a.jailer = v.into(),
            "--root" => a.root = v.into(),
            "--uid" => a.uid = num(&v)?.try_into().map_err(|_| "--uid: too large")?,
            "--cgroup" => a.cgroup = Some(v.into()),
            "--guest-mib" => a.guest_mib = num(&v)?,
            "--vcpus" => a.vcpus = num(&v)?.max(1),
            "--pid-file" => a.pid_file = Some(v.into()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if a.jailer.as_os_str().is_empty() || a.root.as_os_str().is_empty() || a.uid == 0 {
        return Err("--jailer, --root and a non-zero --uid are required".into());
    }
    if a.vmm.is_empty() {
        return Err("no VMM command line after --".into());
    }
    Ok(a)
}

/// The descriptors to pass, in order (the first becomes 3).
#[derive(Default)]
struct Passed {
    files: Vec<File>,
}

impl Passed {
    /// Adds `f`; returns the descriptor number the VMM will see.
    fn add(&mut self, f: File) -> i32 {
        self.files.push(f);
        2 + self.files.len() as i32
    }
    fn open(&mut self, path: &str, write: bool) -> Result<i32, String> {
        let f = OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        Ok(self.add(f))
    }
}

/// Rewrites the VMM's arguments to descriptors, opening each file.
fn rewrite(vmm: &[String], passed: &mut Passed) -> Result<Vec<String>, String> {
    let mut out = vec![vmm[0].clone()];
    let mut it = vmm[1..].iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kernel" | "--initramfs" | "--firmware" => {
                let p = it.next().ok_or_else(|| format!("{a} needs a value"))?;
                let fd = passed.open(p, false)?;
                out.extend([a.clone(), format!("/dev/fd/{fd}")]);
            }
            "--disk" => {
                let spec = it.next().ok_or("--disk needs a value")?;
                let readonly = spec.split(',').any(|p| p == "readonly=on");
                let mut parts = Vec::new();
                for p in spec.split(',') {
                    match p.strip_prefix("path=") {
                        Some(path) => {
                            let fd = passed.open(path, !readonly)?;
                            parts.push(format!("path=/dev/fd/{fd}"));
                        }
                        None => parts.push(p.to_string()),
                    }
                }
                out.extend([a.clone(), parts.join(",")]);
            }
            "--net" => {
                let spec = it.next().ok_or("--net needs a value")?;
                let mut parts = Vec::new();
                for p in spec.split(',') {
                    match p.strip_prefix("tap=") {
                        Some(name) => {
                            let (f, _) = quantix_hostfs::tap::open(name)
                                .map_err(|e| format!("TAP {name}: {e}"))?;
                            let fd = passed.add(f);
                            parts.push(format!("fd={fd}"));
                        }
                        None => parts.push(p.to_string()),
                    }
                }
                out.extend([a.clone(), parts.join(",")]);
            }
            "--kvm" => return Err("--kvm is qx-jail's to give".into()),
            _ => out.push(a.clone()),
        }
    }
    let kvm = passed.open("/dev/kvm", true)?;
    out.extend(["--kvm".into(), format!("/dev/fd/{kvm}")]);
    Ok(out)
}

/// The jail directory: root's, 0711, with `run/` the VMM's, 0700, emptied.
fn prepare_root(root: &Path, uid: u32) -> Result<(), String> {
    let e = |what: &str, p: &Path, err: std::io::Error| format!("{what} {}: {err}", p.display());
    std::fs::create_dir_all(root).map_err(|x| e("cannot create", root, x))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
        .map_err(|x| e("cannot chmod", root, x))?;
    let run = root.join("run");
    if run.exists() {
        std::fs::remove_dir_all(&run).map_err(|x| e("cannot clean", &run, x))?;
    }
    std::fs::create_dir(&run).map_err(|x| e("cannot create", &run, x))?;
    std::os::unix::fs::chown(&run, Some(uid), Some(uid)).map_err(|x| e("cannot chown", &run, x))?;
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o700))
        .map_err(|x| e("cannot chmod", &run, x))
}

/// A cgroup v2 directory with the agent's limits (docs/agent.md, cgroups).
fn prepare_cgroup(dir: &Path, guest_mib: u64, vcpus: u64) -> Result<(), String> {
    let e = |what: &str, p: &Path, err: std::io::Error| format!("{what} {}: {err}", p.display());
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|x| e("cannot create", parent, x))?;
        // Controllers for the children, from the top down (the root has them all).
        let mut chain: Vec<&Path> = parent.ancestors().collect();
        chain.reverse();
        for p in chain
            .iter()
            .skip_while(|p| !p.join("cgroup.subtree_control").exists())
        {
            let ctl = p.join("cgroup.subtree_control");
            std::fs::write(&ctl, "+cpu +memory").map_err(|x| e("cannot write", &ctl, x))?;
        }
    }
    if !dir.exists() {
        std::fs::create_dir(dir).map_err(|x| e("cannot create", dir, x))?;
    }
    let mem = dir.join("memory.max");
    std::fs::write(&mem, ((guest_mib + 64) << 20).to_string())
        .map_err(|x| e("cannot write", &mem, x))?;
    let cpu = dir.join("cpu.max");
    std::fs::write(&cpu, format!("{} 100000", vcpus * 100_000))
        .map_err(|x| e("cannot write", &cpu, x))
}

fn main() -> ExitCode {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("qx-jail: {e}");
            return ExitCode::from(2);
        }
    };
    let mut passed = Passed::default();
    let setup = (|| {
        let argv = rewrite(&a.vmm, &mut passed)?;
        prepare_root(&a.root, a.uid)?;
        if let Some(cg) = &a.cgroup {
            prepare_cgroup(cg, a.guest_mib, a.vcpus)?;
        }
        Ok::<_, String>(argv)
    })();
    let argv = match setup {
        Ok(v) => v,
        Err(e) => {
            eprintln!("qx-jail: {e}");
            return ExitCode::from(EXIT_SETUP);
        }
    };
    // Descriptors 3.. in order: first every file above the range, then each into place
    // (dup2 clears close-on-exec on the copy; the originals are close-on-exec).
    let mut high = Vec::new();
    for f in &passed.files {
        // SAFETY: F_DUPFD_CLOEXEC on a descriptor we own returns a new one or -1.
        let fd = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) };
        if fd < 0 {
            eprintln!("qx-jail: dup: {}", std::io::Error::last_os_error());
            return ExitCode::from(EXIT_SETUP);
        }
        high.push(fd);
    }
    drop(passed.files);
    for (i, fd) in high.iter().enumerate() {
        // SAFETY: dup2 of a descriptor we own onto 3+i, which is free or one of ours
        // (already duplicated above 100).
        if unsafe { libc::dup2(*fd, 3 + i as i32) } < 0 {
            eprintln!("qx-jail: dup2: {}", std::io::Error::last_os_error());
            return ExitCode::from(EXIT_SETUP);
        }
    }
    let mut cmd = Command::new(&a.jailer);
    cmd.args(["--id", "bench", "--exec"])
        .arg(&a.vmm[0])
        .arg("--root")
        .arg(&a.root)
        .args(["--uid", &a.uid.to_string(), "--gid", &a.uid.to_string()])
        .args(["--pass-fds", &high.len().to_string()]);
    if let Some(cg) = &a.cgroup {
        cmd.arg("--cgroup").arg(cg);
    }
    if let Some(p) = &a.pid_file {
        cmd.arg("--pid-file").arg(p);
    }
    cmd.arg("--");
    cmd.args(argv.iter().map(OsString::from));
    // exec returns only on failure (the process then ends, closing every descriptor).
    let e = cmd.exec();
    eprintln!("qx-jail: cannot run {}: {e}", a.jailer.display());
    ExitCode::from(EXIT_SETUP)
}
