//! The allow-lists. Each entry says why a thread of that kind makes the call.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

use super::SeccompError;

/// A kind of VMM thread, with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The main loop and the host-facing socket threads.
    Vmm,
    /// A vCPU.
    Vcpu,
    /// The thread that starts device threads.
    Launcher,
    /// A virtio device worker or a block I/O thread.
    Device,
    /// A lazy restore's pager (`snapshot::lazy`): reads the snapshot, fills guest memory.
    Pager,
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vmm" => Ok(Kind::Vmm),
            "vcpu" => Ok(Kind::Vcpu),
            "launcher" => Ok(Kind::Launcher),
            "device" => Ok(Kind::Device),
            "pager" => Ok(Kind::Pager),
            other => Err(format!(
                "{other:?}: expected vmm, vcpu, launcher, device or pager"
            )),
        }
    }
}

impl Kind {
    /// Its name in exit records and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Vmm => "vmm",
            Kind::Vcpu => "vcpu",
            Kind::Launcher => "launcher",
            Kind::Device => "device",
            Kind::Pager => "pager",
        }
    }
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(r: &mut Rules, calls: &[i64]) {
    for c in calls {
        r.insert(*c, Vec::new());
    }
}

fn cond(arg: u8, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, Op::Eq, value).map_err(|e| e.to_string())
}

fn masked(arg: u8, mask: u64, value: u64) -> Result<SeccompCondition, String> {
    SeccompCondition::new(arg, Len::Qword, Op::MaskedEq(mask), value).map_err(|e| e.to_string())
}

/// `syscall` only when argument `arg` is one of `values`.
fn allow_arg(r: &mut Rules, syscall: i64, arg: u8, values: &[u64]) -> Result<(), String> {
    let rules = values
        .iter()
        .map(|v| SeccompRule::new(vec![cond(arg, *v)?]).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, String>>()?;
    r.entry(syscall).or_default().extend(rules);
    Ok(())
}

// ioctl numbers: _IOC(dir, type, nr, size).
const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
const NONE: u64 = 0;
const W: u64 = 1;
const R: u64 = 2;
const KVM_TYPE: u64 = 0xAE;

/// The vCPU's own ioctls after its setup: run, the kvm-clock pause notice, the reads of a
/// register dump and of a snapshot, and the VM's interrupt lines that devices emulated on
/// the vCPU raise.
fn vcpu_ioctls() -> Vec<u64> {
    use kvm_bindings::*;
    use std::mem::size_of;
    vec![
        ioc(NONE, KVM_TYPE, 0x80, 0),                         // KVM_RUN
        ioc(NONE, KVM_TYPE, 0xad, 0),                         // KVM_KVMCLOCK_CTRL
        ioc(R, KVM_TYPE, 0x81, size_of::<kvm_regs>()),        // KVM_GET_REGS
        ioc(R, KVM_TYPE, 0x83, size_of::<kvm_sregs>()),       // KVM_GET_SREGS
        ioc(R, KVM_TYPE, 0x8c, size_of::<kvm_fpu>()),         // KVM_GET_FPU
        ioc(R, KVM_TYPE, 0x8e, size_of::<kvm_lapic_state>()), // KVM_GET_LAPIC
        ioc(R | W, KVM_TYPE, 0x88, size_of::<kvm_msrs>()),    // KVM_GET_MSRS
        ioc(R, KVM_TYPE, 0x9f, size_of::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
        ioc(R, KVM_TYPE, 0x98, size_of::<kvm_mp_state>()),    // KVM_GET_MP_STATE
        // The rest of a snapshot's vCPU state, read on the paused vCPU's thread (loading
        // it happens there too, before this filter is installed).
        ioc(R | W, KVM_TYPE, 0x91, size_of::<kvm_cpuid2>()), // KVM_GET_CPUID2
        ioc(R, KVM_TYPE, 0xa4, size_of::<kvm_xsave>()),      // KVM_GET_XSAVE
        ioc(R, KVM_TYPE, 0xa6, size_of::<kvm_xcrs>()),       // KVM_GET_XCRS
        ioc(R, KVM_TYPE, 0xa1, size_of::<kvm_debugregs>()),  // KVM_GET_DEBUGREGS
        ioc(NONE, KVM_TYPE, 0xa3, 0),                        // KVM_GET_TSC_KHZ
        ioc(W, KVM_TYPE, 0x61, size_of::<kvm_irq_level>()),  // KVM_IRQ_LINE
        ioc(R | W, KVM_TYPE, 0x67, size_of::<kvm_irq_level>()), // KVM_IRQ_LINE_STATUS
        // The UART's transmit port is coalesced while the guest polls it and not while its
        // interrupt is on: the vCPU that writes IER switches it.
        ioc(W, KVM_TYPE, 0x67, size_of::<kvm_coalesced_mmio_zone>()), // KVM_REGISTER_COALESCED_MMIO
        ioc(W, KVM_TYPE, 0x68, size_of::<kvm_coalesced_mmio_zone>()), // KVM_UNREGISTER_COALESCED_MMIO
        // A virtio-net activation (on the vCPU that writes DRIVER_OK) sets the TAP's
        // offloads and header size.
        ioc(W, b'T' as u64, 208, size_of::<libc::c_uint>()), // TUNSETOFFLOAD
        ioc(W, b'T' as u64, 216, size_of::<libc::c_int>()),  // TUNSETVNETHDRSZ
        libc::FIONBIO,
        libc::FIONREAD,
    ]
}

/// What every thread does: memory, locks, time, signals, logging, its own exit, and what
/// the SIGSYS handler needs to record a refusal.
fn common(r: &mut Rules) -> Result<(), String> {
    use libc::*;
    allow(
        r,
        &[
            SYS_read,
            SYS_write,
            SYS_readv,
            SYS_writev,
            SYS_pread64,
            SYS_pwrite64,  // the SIGSYS handler writes the exit record with it
            SYS_ftruncate, // and truncates it first
            SYS_close,
            SYS_futex,
            SYS_madvise,
            SYS_mmap,
            SYS_munmap,
            SYS_mremap,
            SYS_mprotect,
            SYS_brk,
            SYS_rt_sigprocmask,
            SYS_rt_sigreturn,
            SYS_sigaltstack,
            SYS_clock_gettime,
            SYS_clock_nanosleep,
            SYS_nanosleep,
            SYS_sched_yield,
            SYS_getrandom,
            SYS_exit,
            SYS_exit_group,
            SYS_gettid,
            SYS_getpid,
            SYS_restart_syscall,
            SYS_epoll_wait,
            SYS_epoll_pwait,
            SYS_epoll_ctl,
            SYS_fcntl,
            SYS_lseek,
            SYS_fstat,
            SYS_newfstatat,
            SYS_statx,
            SYS_poll,
            SYS_ppoll,
        ],
    );
    // Signals only to threads of this process (kicking a vCPU out of KVM_RUN).
    // SAFETY: getpid cannot fail.
    let pid = unsafe { libc::getpid() } as u64;
    allow_arg(r, SYS_tgkill, 0, &[pid])?;
    Ok(())
}

/// Threads of the process are threads (CLONE_THREAD), never processes; clone3 is answered
/// ENOSYS (its flags sit in memory, out of a filter's reach) so that glibc falls back to
/// clone, whose flags the filter checks.
fn threads(r: &mut Rules) -> Result<(), String> {
    use libc::*;
    let thread = CLONE_THREAD as u64;
    r.entry(SYS_clone)
        .or_default()
        .push(SeccompRule::new(vec![masked(0, thread, thread)?]).map_err(|e| e.to_string())?);
    allow(
        r,
        &[
            // Allowed here so that the separate clone3 filter's ENOSYS is the answer (a
            // refusal here would take precedence over it).
            SYS_clone3,
            SYS_set_robust_list,
            SYS_rseq,
            SYS_sched_getaffinity,
            // A new thread installs its own filter on top of the inherited one (filters only
            // ever add restrictions).
            SYS_seccomp,
        ],
    );
    // The new thread's name, and the NO_NEW_PRIVS that installing a filter sets.
    allow_arg(
        r,
        SYS_prctl,
        0,
        &[PR_SET_NAME as u64, PR_SET_NO_NEW_PRIVS as u64],
    )?;
    Ok(())
}

/// What device threads and their activation do: guest I/O on disks, TAPs and sockets.
fn device(r: &mut Rules) -> Result<(), String> {
    use libc::*;
    allow(
        r,
        &[
            SYS_preadv,
            SYS_pwritev,
            SYS_preadv2,
            SYS_pwritev2,
            SYS_fsync,
            SYS_fdatasync,
            SYS_fallocate, // discard and write-zeroes punch holes
            SYS_io_uring_enter,
            SYS_eventfd2,
            SYS_epoll_create1,
            SYS_sendmsg,
            SYS_recvmsg,
            SYS_sendto,
            SYS_recvfrom,
            SYS_connect, // vsock: a guest connection to a host port reaches PATH_port
            SYS_accept4,
            SYS_shutdown,
            SYS_getsockopt,
            SYS_dup,
            // vsock's deadlines (connection setup, credit updates).
            SYS_timerfd_create,
            SYS_timerfd_settime,
            SYS_timerfd_gettime,
        ],
    );
    // vsock connects to host Unix sockets, nothing else.
    allow_arg(r, SYS_socket, 0, &[AF_UNIX as u64])?;
    allow_arg(r, SYS_ioctl, 1, &[FIONBIO, FIONREAD])?;
    Ok(())
}

/// The rules of `kind`.
fn rules(kind: Kind) -> Result<Rules, String> {
    let mut r = Rules::new();
    common(&mut r)?;
    match kind {
        Kind::Vcpu => {
            // Activations run on the vCPU that writes DRIVER_OK: they create the device's
            // eventfds, epoll and io_uring (the launcher starts its threads).
            allow(
                &mut r,
                &[
                    libc::SYS_eventfd2,
                    libc::SYS_epoll_create1,
                    libc::SYS_io_uring_setup,
                    libc::SYS_io_uring_register,
                    libc::SYS_io_uring_enter,
                    libc::SYS_dup,
                    // vsock's muxer (made at activation) keeps a timer for its deadlines.
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                    libc::SYS_timerfd_gettime,
                    // The UART's output goes to its socket client from the vCPU that writes
                    // the transmit register.
                    libc::SYS_sendto,
                    libc::SYS_sendmsg,
                ],
            );
            allow_arg(&mut r, libc::SYS_ioctl, 1, &vcpu_ioctls())?;
        }
        Kind::Device => device(&mut r)?,
        // Reads of the snapshot's images (pread64, in `common`) and the userfaultfd's
        // own ioctls; a post-copy migration's pager threads also talk to the source over
        // the migration socket (std's socket reads and writes are recvfrom and sendto).
        Kind::Pager => {
            allow_arg(
                &mut r,
                libc::SYS_ioctl,
                1,
                &[crate::uffd::UFFDIO_COPY, crate::uffd::UFFDIO_UNREGISTER],
            )?;
            allow(&mut r, &[libc::SYS_recvfrom, libc::SYS_sendto]);
        }
        Kind::Launcher => {
            device(&mut r)?;
            threads(&mut r)?;
        }
        Kind::Vmm => {
            device(&mut r)?;
            threads(&mut r)?;
            allow(
                &mut r,
                &[
                    libc::SYS_ioctl, // KVM VM and vCPU ioctls of pause/resume, terminal
                    libc::SYS_io_uring_setup,
                    libc::SYS_io_uring_register,
                    libc::SYS_openat, // the exit record, written as the VMM stops
                    libc::SYS_rename, // which is renamed into place
                    libc::SYS_unlink, // sockets removed at exit
                    libc::SYS_unlinkat,
                    libc::SYS_bind,
                    libc::SYS_listen,
                    libc::SYS_getsockname,
                    libc::SYS_getpeername,
                    libc::SYS_setsockopt,
                    libc::SYS_socketpair,
                    libc::SYS_pipe2,
                    libc::SYS_dup3,
                    libc::SYS_signalfd4,
                    libc::SYS_timerfd_create,
                    libc::SYS_timerfd_settime,
                    libc::SYS_rt_sigaction,
                    libc::SYS_sched_getaffinity,
                    libc::SYS_fchmod,
                    libc::SYS_getuid,
                    libc::SYS_geteuid,
                    libc::SYS_getgid,
                    libc::SYS_getegid,
                    // A snapshot, written by the main thread into a directory it creates
                    // (and removes again when the snapshot fails).
                    libc::SYS_mkdir,
                    libc::SYS_mkdirat,
                    libc::SYS_ftruncate,
                    libc::SYS_pwrite64,
                    libc::SYS_pread64,
                    libc::SYS_getdents64,
                    libc::SYS_rmdir,
                    libc::SYS_renameat,
                    libc::SYS_renameat2,
                ],
            );
        }
    }
    Ok(r)
}

/// The BPF programs of `kind` (more than one is installed in order), `mismatch` for every
/// call outside the list.
pub fn build(kind: Kind, mismatch: SeccompAction) -> Result<Vec<BpfProgram>, SeccompError> {
    let err = |reason: String| SeccompError::Build { kind, reason };
    let arch = TargetArch::x86_64;
    let mut progs = Vec::new();
    if matches!(kind, Kind::Vmm | Kind::Launcher) {
        // clone3 answers ENOSYS (glibc then uses clone, which the main filter checks).
        // Installed first: once the main filter is in, the thread installs nothing more.
        let mut r = Rules::new();
        allow(&mut r, &[libc::SYS_clone3]);
        let f = SeccompFilter::new(
            r,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            arch,
        )
        .map_err(|e| err(e.to_string()))?;
        progs.push(BpfProgram::try_from(f).map_err(|e| err(e.to_string()))?);
    }
    let main = SeccompFilter::new(
        rules(kind).map_err(err)?,
        mismatch,
        SeccompAction::Allow,
        arch,
    )
    .map_err(|e| err(e.to_string()))?;
    progs.push(BpfProgram::try_from(main).map_err(|e| err(e.to_string()))?);
    Ok(progs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_builds_and_vcpus_cannot_create_threads_or_open_files() {
        for kind in [
            Kind::Vmm,
            Kind::Vcpu,
            Kind::Launcher,
            Kind::Device,
            Kind::Pager,
        ] {
            let progs = build(kind, SeccompAction::Trap).unwrap();
            assert!(!progs.is_empty() && progs.iter().all(|p| !p.is_empty()));
        }
        let vcpu = rules(Kind::Vcpu).unwrap();
        for forbidden in [
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_seccomp,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_mount,
        ] {
            assert!(!vcpu.contains_key(&forbidden), "vcpu allows {forbidden}");
        }
        for kind in [Kind::Vmm, Kind::Vcpu, Kind::Launcher, Kind::Device] {
            assert!(
                !rules(kind).unwrap().contains_key(&libc::SYS_getppid),
                "the probe's call must be refused everywhere"
            );
        }
        let device = rules(Kind::Device).unwrap();
        for forbidden in [
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_bind,
        ] {
            assert!(
                !device.contains_key(&forbidden),
                "device allows {forbidden}"
            );
        }
        // The vCPU's ioctls are a short list, KVM_RUN first.
        assert_eq!(vcpu_ioctls()[0], 0xAE80);
        assert_eq!(
            vcpu_ioctls()[2],
            0x8090_AE81,
            "KVM_GET_REGS as linux/kvm.h defines it"
        );
    }

    #[test]
    fn what_the_main_thread_allows_covers_its_children() {
        // vCPU threads and socket threads start under the main thread's filter.
        let vmm = rules(Kind::Vmm).unwrap();
        for kind in [Kind::Vcpu, Kind::Device] {
            for call in rules(kind).unwrap().keys() {
                assert!(
                    vmm.contains_key(call),
                    "{kind:?} needs {call}, which vmm refuses"
                );
            }
        }
        let launcher = rules(Kind::Launcher).unwrap();
        for call in rules(Kind::Device).unwrap().keys() {
            assert!(launcher.contains_key(call), "device needs {call}");
        }
    }
}
