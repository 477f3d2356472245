//! `quantix-jailer`: puts one process (a `quantix-vmm`) in a jail and executes it there.
//!
//! Like Firecracker's jailer, in this order, as root:
//!
//! 1. opens the program to run (`--exec`), so that it need not exist inside the jail;
//! 2. joins the given cgroups (writes its pid to each `cgroup.procs`), so that the program
//!    is inside them from its first instruction;
//! 3. enters new mount, IPC, UTS and (by default) network namespaces;
//! 4. makes every mount private, bind-mounts the jail directory (`--root`) onto itself,
//!    `nosuid,nodev`, and (for a dynamically linked program only) the host's library
//!    directories read-only inside it;
//! 5. starts the program's process in a new PID namespace (`clone`; with `--detach`, as a
//!    child of the jailer's parent, so that a supervisor waits for it directly);
//! 6. in it: `pivot_root` into the jail directory and detaches the old root, sets the
//!    rlimits, marks every descriptor above the passed ones close-on-exec, empties the
//!    capability bounding and ambient sets, drops to `--uid`/`--gid` with no supplementary
//!    groups (which clears the remaining capabilities), sets `PR_SET_NO_NEW_PRIVS`, and
//!    executes the program with a minimal environment.
//!
//! Files the program needs (disk images, `/dev/kvm`, TAPs) are passed as open descriptors
//! 3, 4, ... (`--pass-fds N`); nothing in the jail is a device. See docs/security.md.

pub mod spec;
mod sys;

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

pub use spec::{JailSpec, NetNs};
use thiserror::Error;

/// Why a jail cannot be set up. Every message names the step and the file.
#[derive(Debug, Error)]
pub enum JailError {
    /// A value of the spec is unusable.
    #[error("{0}")]
    Invalid(String),
    /// A step failed.
    #[error("{step}: {source}")]
    Step {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The jailed process failed before it could execute the program.
    #[error("in the jail: {0}")]
    Child(String),
}

fn step(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let step = what.into();
    move |source| JailError::Step { step, source }
}

/// Library directories a dynamically linked program needs, bound read-only into the jail.
const LIB_DIRS: &[&str] = &["/lib", "/lib64", "/usr/lib", "/usr/lib64"];

/// What became of the jailed process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `--detach`: it runs, as a child of the jailer's parent, with this host pid.
    Detached(i32),
    /// It ended with this exit status (128 + N for signal N, as shells report it).
    Exited(i32),
}

/// Sets up the jail and runs `argv` (argv[0] is the name it sees) in it.
pub fn run(spec: &JailSpec, argv: &[OsString]) -> Result<Outcome, JailError> {
    spec.validate()?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::Invalid(
            "quantix-jailer must run as root (it creates namespaces, mounts and drops to --uid)"
                .into(),
        ));
    }
    let exec = open_path(&spec.exec)?;
    let dynamic = is_dynamic(&spec.exec)?;
    let root = spec.root.clone();
    let meta = std::fs::metadata(&root).map_err(step(format!("--root {}", root.display())))?;
    if !meta.is_dir() {
        return Err(JailError::Invalid(format!(
            "--root {}: not a directory",
            root.display()
        )));
    }
    let argv_c = cstrings(argv)?;
    let envp_c = cstrings(&spec.environment())?;

    for cg in &spec.cgroups {
        std::fs::write(cg.join("cgroup.procs"), "0")
            .map_err(step(format!("joining cgroup {}", cg.display())))?;
    }

    let mut ns = libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    let mut netns_fd = None;
    match &spec.netns {
        NetNs::New => ns |= libc::CLONE_NEWNET,
        NetNs::Host => {}
        NetNs::Path(p) => netns_fd = Some(open_path(p)?),
    }
    sys::unshare(ns).map_err(step("unshare (mount, IPC, UTS, network namespaces)"))?;
    if let Some(fd) = &netns_fd {
        sys::setns(fd.as_raw_fd(), libc::CLONE_NEWNET)
            .map_err(step("joining the network namespace"))?;
    }
    sys::sethostname(spec.id.as_bytes()).map_err(step("sethostname"))?;
    sys::mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )
    .map_err(step("making every mount private"))?;
    sys::mount(Some(&root), &root, None, libc::MS_BIND | libc::MS_REC, None).map_err(step(
        format!("bind-mounting {} onto itself", root.display()),
    ))?;
    sys::mount(
        None,
        &root,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV,
        None,
    )
    .map_err(step(format!("remounting {} nosuid,nodev", root.display())))?;
    if dynamic {
        bind_libraries(&root)?;
    }

    // The child reports a failure before exec on this pipe; exec closes it (close-on-exec).
    let (report_r, report_w) = sys::pipe().map_err(step("pipe"))?;
    // A mount namespace of its own for the child too (a copy of the one prepared above):
    // pivot_root moves every process of a namespace whose root is the old one, and the
    // jailer must keep the host's view (it writes the pid file after the clone).
    let mut flags = (libc::CLONE_NEWPID | libc::CLONE_NEWNS) as libc::c_ulong;
    if spec.detach {
        flags |= libc::CLONE_PARENT as libc::c_ulong;
    }
    let pid = sys::clone(flags).map_err(step("clone (new PID namespace)"))?;
    if pid == 0 {
        drop(report_r);
        let err = child(spec, &root, &exec, &argv_c, &envp_c);
        let mut w = std::fs::File::from(report_w);
        let _ = w.write_all(err.to_string().as_bytes());
        // SAFETY: leaving the failed child without running the parent's destructors.
        unsafe { libc::_exit(127) };
    }
    drop(report_w);
    let mut report = String::new();
    let _ = std::fs::File::from(report_r).read_to_string(&mut report);
    if !report.is_empty() {
        if !spec.detach {
            let _ = sys::wait(pid);
        }
        return Err(JailError::Child(report));
    }
    if let Some(p) = &spec.pid_file {
        std::fs::write(p, format!("{pid}\n"))
            .map_err(step(format!("--pid-file {}", p.display())))?;
    }
    if spec.detach {
        return Ok(Outcome::Detached(pid));
    }
    sys::forward_signals(pid);
    let status = sys::wait(pid).map_err(step("waitpid"))?;
    Ok(Outcome::Exited(status))
}

/// The jailed process: everything from `pivot_root` to `execveat`. Returns only on failure.
fn child(
    spec: &JailSpec,
    root: &Path,
    exec: &OwnedFd,
    argv: &[CString],
    envp: &[CString],
) -> JailError {
    let r = (|| -> Result<(), JailError> {
        std::env::set_current_dir(root).map_err(step(format!("chdir {}", root.display())))?;
        // pivot_root(".", "."): the old root ends up on top of the new one, and is then
        // detached; no directory for it is needed in the jail.
        match sys::pivot_root(Path::new("."), Path::new(".")) {
            Ok(()) => {
                sys::umount2(Path::new("."), libc::MNT_DETACH)
                    .map_err(step("detaching the old root"))?;
            }
            // A host whose root is the initramfs (rootfs) cannot pivot away from it. As
            // container runtimes do there, the jail is moved over / and chrooted into;
            // with no capabilities and NO_NEW_PRIVS, the program cannot chroot back out.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                sys::mount(
                    Some(Path::new(".")),
                    Path::new("/"),
                    None,
                    libc::MS_MOVE,
                    None,
                )
                .map_err(step("moving the jail over / (rootfs host)"))?;
                sys::chroot(Path::new(".")).map_err(step("chroot (rootfs host)"))?;
            }
            Err(e) => return Err(step("pivot_root")(e)),
        }
        std::env::set_current_dir("/").map_err(step("chdir /"))?;
        sys::setrlimit(libc::RLIMIT_NOFILE, spec.rlimit_nofile).map_err(step("RLIMIT_NOFILE"))?;
        if let Some(n) = spec.rlimit_nproc {
            sys::setrlimit(libc::RLIMIT_NPROC, n).map_err(step("RLIMIT_NPROC"))?;
        }
        if let Some(n) = spec.rlimit_fsize {
            sys::setrlimit(libc::RLIMIT_FSIZE, n).map_err(step("RLIMIT_FSIZE"))?;
        }
        sys::cloexec_from(3 + spec.pass_fds)
            .map_err(step("marking inherited descriptors close-on-exec"))?;
        sys::drop_bounding_and_ambient_caps().map_err(step("dropping capabilities"))?;
        sys::set_ids(spec.uid, spec.gid).map_err(step(format!(
            "dropping to uid {} gid {}",
            spec.uid, spec.gid
        )))?;
        sys::no_new_privs().map_err(step("PR_SET_NO_NEW_PRIVS"))?;
        sys::check_no_caps().map_err(step("capabilities left after the uid change"))?;
        // execveat returns only when it failed.
        match sys::execveat(exec.as_raw_fd(), argv, envp) {
            Err(e) => Err(step(format!("executing {}", spec.exec.display()))(e)),
            Ok(()) => Err(JailError::Invalid("exec returned".into())),
        }
    })();
    match r {
        Err(e) => e,
        Ok(()) => JailError::Invalid("exec returned".into()),
    }
}

fn bind_libraries(root: &Path) -> Result<(), JailError> {
    for dir in LIB_DIRS {
        let src = Path::new(dir);
        // /lib may be a symlink to /usr/lib (merged /usr): bind what it resolves to once.
        let Ok(meta) = std::fs::symlink_metadata(src) else {
            continue;
        };
        let target = root.join(dir.trim_start_matches('/'));
        if meta.file_type().is_symlink() {
            let link = std::fs::read_link(src).map_err(step(format!("readlink {dir}")))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(step(format!("mkdir {}", parent.display())))?;
            }
            if std::fs::symlink_metadata(&target).is_err() {
                std::os::unix::fs::symlink(&link, &target)
                    .map_err(step(format!("symlink {}", target.display())))?;
            }
            continue;
        }
        if !meta.is_dir() {
            continue;
        }
        mkdirs_0755(root, &target)?;
        sys::mount(Some(src), &target, None, libc::MS_BIND | libc::MS_REC, None)
            .map_err(step(format!("bind-mounting {dir}")))?;
        sys::mount(
            None,
            &target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )
        .map_err(step(format!("remounting {dir} read-only")))?;
    }
    Ok(())
}

/// Creates `dir` and its missing parents below `root` with mode 0755, whatever the umask:
/// the jailed program must be able to pass through them.
fn mkdirs_0755(root: &Path, dir: &Path) -> Result<(), JailError> {
    use std::os::unix::fs::PermissionsExt;
    let mut cur = root.to_path_buf();
    for c in dir.strip_prefix(root).unwrap_or(dir).components() {
        cur.push(c);
        if !cur.exists() {
            std::fs::create_dir(&cur).map_err(step(format!("mkdir {}", cur.display())))?;
            std::fs::set_permissions(&cur, std::fs::Permissions::from_mode(0o755))
                .map_err(step(format!("chmod {}", cur.display())))?;
        }
    }
    Ok(())
}

fn open_path(p: &Path) -> Result<OwnedFd, JailError> {
    let c = CString::new(p.as_os_str().as_bytes())
        .map_err(|_| JailError::Invalid(format!("{}: a NUL byte in the path", p.display())))?;
    // SAFETY: a NUL-terminated path; open returns a new descriptor or -1.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(step(format!("opening {}", p.display()))(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `path` is an ELF with an interpreter (a dynamically linked program).
fn is_dynamic(path: &Path) -> Result<bool, JailError> {
    let mut head = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head))
        .map_err(step(format!("reading {}", path.display())))?;
    Ok(elf_has_interp(&head))
}

/// Whether the 64-bit little-endian ELF image `b` has a PT_INTERP program header.
fn elf_has_interp(b: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 || b[5] != 1 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap_or([0; 8])) as usize;
    let (phentsize, phnum) = (u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let o = phoff.saturating_add(i.saturating_mul(phentsize));
        o.checked_add(4)
            .and_then(|end| b.get(o..end))
            .is_some_and(|t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]) == PT_INTERP)
    })
}

fn cstrings(v: &[OsString]) -> Result<Vec<CString>, JailError> {
    v.iter()
        .map(|s| {
            CString::new(s.as_bytes())
                .map_err(|_| JailError::Invalid(format!("{s:?}: a NUL byte in an argument")))
        })
        .collect()
}

/// The directory a jail for `id` lives in under `base`: `base/id/root`.
pub fn root_dir(base: &Path, id: &str) -> PathBuf {
    base.join(id).join("root")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 header with one program header of type `p_type`.
    fn elf_with(p_type: u32) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..6].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1]);
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&56u16.to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&p_type.to_le_bytes());
        b
    }

    #[test]
    fn static_and_dynamic_programs() {
        assert!(elf_has_interp(&elf_with(3)), "PT_INTERP");
        assert!(!elf_has_interp(&elf_with(1)), "PT_LOAD only");
        assert!(!elf_has_interp(b"#!/bin/sh\n"));
        assert!(!elf_has_interp(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]));
        // Program headers past the end are not read.
        let mut fake = elf_with(3);
        fake[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        fake[56..58].copy_from_slice(&100u16.to_le_bytes());
        assert!(!elf_has_interp(&fake));
        // /bin/sh on a distribution is dynamically linked.
        if let Ok(d) = is_dynamic(Path::new("/bin/sh")) {
            assert!(d, "/bin/sh");
        }
    }
}
