//! A vCPU thread: `KVM_RUN` in a loop, dispatching I/O exits to the device buses.
//!
//! Stopping: the VMM sets the shared stop flag and sends [`kick_signal`] to the thread.
//! The handler sets `immediate_exit` in the thread's `kvm_run`, so a vCPU that was about
//! to enter the guest returns at once with `EINTR`, and one inside the guest is forced out.
//!
//! Pausing: before a vCPU thread parks at the [`PauseGate`], it completes the port or
//! MMIO read the guest may be waiting for. After such an exit KVM has not finished the
//! instruction (the value read is not in the guest's register yet); it does on the next
//! `KVM_RUN`, which, with `immediate_exit` set, returns right after without entering the
//! guest. A paused vCPU's registers are then the guest's whole state, ready to be saved
//! by jobs the gate runs on this thread.

use std::cell::Cell;
use std::collections::HashSet;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_run, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use quantix_devices::Bus;
use tracing::{debug, error, warn};

use super::pause::PauseGate;
use super::recorder::{is_reset_state, ExitKind, ExitRecorder};
use super::state::{VcpuState, XsaveFits};
use crate::exit::{ExitReason, ExitSignal};

thread_local! {
    /// The running vCPU's `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let ptr = run.get();
        if !ptr.is_null() {
            // SAFETY: the pointer is this thread's mapped kvm_run page, set by the vCPU loop
            // before its first KVM_RUN and cleared before the VcpuFd (and its mapping) is
            // dropped. A volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*ptr).immediate_exit).write_volatile(1) };
        }
    });
}

/// Sends the kick signal to a vCPU thread. A thread that has already ended is not an
/// error; any other failure returns pthread_kill's error number.
///
/// # Safety
///
/// `thread` must be a thread that has not been joined (it may have finished).
pub unsafe fn kick_thread(thread: libc::pthread_t) -> Result<(), i32> {
    // SAFETY: the caller guarantees the thread id is still valid to signal.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    match rc {
        0 | libc::ESRCH => Ok(()),
        rc => Err(rc),
    }
}

/// Installs the process-wide handler of the kick signal (idempotent).
pub fn register_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
}

/// Exit counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    /// All exits to user space.
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub io: AtomicU64,
    /// MMIO exits.
    pub mmio: AtomicU64,
    /// Accesses to addresses no device claims.
    pub unclaimed: AtomicU64,
}

/// A configured vCPU, ready to run on its own thread.
pub struct Vcpu {
    /// Index and APIC ID.
    pub index: u8,
    fd: VcpuFd,
    io: IoDispatch,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    counters: Arc<VcpuCounters>,
    /// A saved state to load on the vCPU's thread before it first runs (a restore).
    restore: Option<(Box<VcpuState>, XsaveFits)>,
}

/// Where a vCPU's I/O exits go.
#[derive(Clone)]
pub struct IoBuses {
    /// The port I/O bus.
    pub pio: Arc<Bus>,
    /// The MMIO bus.
    pub mmio: Arc<Bus>,
}

/// The device buses a vCPU's I/O exits go to (kept apart from the vCPU fd, whose
/// `kvm_run` page holds the exit's data while it is dispatched).
struct IoDispatch {
    vcpu: u8,
    buses: IoBuses,
    counters: Arc<VcpuCounters>,
    seen_unclaimed: HashSet<(bool, u64)>,
    /// The last exits, for the report of a fatal one.
    recorder: ExitRecorder,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    /// Index and APIC ID.
    pub index: u8,
    thread: JoinHandle<()>,
    /// Its exit counters.
    pub counters: Arc<VcpuCounters>,
}

impl VcpuHandle {
    /// Sends the kick signal to the thread.
    pub fn kick(&self) {
        // SAFETY: the pthread_t comes from a JoinHandle that has not been joined, so the
        // thread (possibly finished but not reaped) is valid to signal.
        if let Err(rc) = unsafe { kick_thread(self.thread.as_pthread_t()) } {
            warn!(vcpu = self.index, rc, "failed to kick vCPU thread");
        }
    }

    /// Waits for the thread to end.
    pub fn join(self) {
        if self.thread.join().is_err() {
            error!(vcpu = self.index, "vCPU thread panicked");
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Continue,
    /// `KVM_RUN` returned without an exit (a kick, or `immediate_exit`).
    Interrupted,
    Stop(ExitReason),
    /// Stop with a register dump.
    Fatal(ExitReason),
}

impl Vcpu {
    /// A vCPU around a configured KVM vCPU fd.
    pub fn new(
        index: u8,
        fd: VcpuFd,
        buses: IoBuses,
        exit: Arc<ExitSignal>,
        stop: Arc<AtomicBool>,
        gate: Arc<PauseGate>,
    ) -> Self {
        let counters = Arc::<VcpuCounters>::default();
        Self {
            index,
            fd,
            io: IoDispatch {
                vcpu: index,
                buses,
                counters: counters.clone(),
                seen_unclaimed: HashSet::new(),
                recorder: ExitRecorder::default(),
            },
            exit,
            stop,
            gate,
            counters,
            restore: None,
        }
    }

    /// Loads `state` on the vCPU's own thread when it starts, before its seccomp filter
    /// and before the guest runs (a restore).
    pub fn restore_at_start(&mut self, state: VcpuState, fits: XsaveFits) {
        self.restore = Some((Box::new(state), fits));
    }

    /// The vCPU's KVM fd (while the VM is built; its thread owns it once it runs).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The vCPU's exit counters.
    pub fn counters(&self) -> Arc<VcpuCounters> {
        self.counters.clone()
    }

    /// Starts the vCPU thread. Fails when the thread cannot start or cannot load the
    /// state it was given to restore.
    pub fn spawn(self) -> std::io::Result<VcpuHandle> {
        let index = self.index;
        let counters = self.counters.clone();
        // The thread says when it has registered with the pause gate, so that a pause
        // right after the start waits for it (it ends without a word if it fails first).
        let (entered, registered) = std::sync::mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || self.run(entered))?;
        if let Ok(Err(e)) = registered.recv() {
            let _ = thread.join();
            return Err(std::io::Error::other(e));
        }
        Ok(VcpuHandle {
            index,
            thread,
            counters,
        })
    }

    fn run(mut self, entered: std::sync::mpsc::SyncSender<Result<(), String>>) {
        // A restored vCPU's state, loaded by its own thread before the filter (which does
        // not allow the loading ioctls) and before the guest runs.
        if let Some((state, fits)) = self.restore.take() {
            if let Err(e) = state.restore(&self.fd, fits) {
                let _ = entered.send(Err(format!("restoring vCPU {}: {e}", self.index)));
                return;
            }
            debug!(
                vcpu = self.index,
                rip = format_args!("{:#x}", state.regs.rip),
                "vCPU state restored"
            );
        }
        // The vCPU's filter before its first KVM_RUN: the guest reaches the VMM through
        // this thread first.
        if let Err(e) = crate::seccomp::install(crate::seccomp::Kind::Vcpu) {
            tracing::error!(vcpu = self.index, error = %e, "cannot install the vCPU's seccomp filter");
            self.exit
                .request(crate::exit::ExitReason::VmmError(e.to_string()));
            return;
        }
        crate::seccomp::probe(crate::seccomp::Kind::Vcpu);
        // Unblock the kick signal in this thread (the main thread blocks only SIGTERM/SIGINT).
        KVM_RUN.with(|run| run.set(self.fd.get_kvm_run() as *mut kvm_run));
        debug!(vcpu = self.index, "vCPU thread running");
        self.gate.enter(self.index);
        let _ = entered.send(Ok(()));
        drop(entered);
        while !self.stop.load(Ordering::Acquire) {
            if self.gate.pause_requested() {
                if let Some(fatal) = self.complete_pending_io() {
                    self.stop_with(fatal);
                    break;
                }
            }
            let (fd, index) = (&self.fd, self.index);
            self.gate.park_if_requested(index, fd, || {
                // Tells the guest's kvm-clock that the pause is the host's doing, so that
                // its watchdogs do not report a lockup after the resume.
                if let Err(e) = fd.kvmclock_ctrl() {
                    debug!(vcpu = index, error = %e, "KVM_KVMCLOCK_CTRL not available");
                }
            });
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let outcome = self.run_once();
            match outcome {
                Outcome::Continue | Outcome::Interrupted => {}
                stop => {
                    self.stop_with(stop);
                    break;
                }
            }
        }
        self.gate.leave();
        KVM_RUN.with(|run| run.set(std::ptr::null_mut()));
        if let Ok(r) = self.fd.get_regs() {
            debug!(
                vcpu = self.index,
                rip = format_args!("{:#x}", r.rip),
                rsp = format_args!("{:#x}", r.rsp),
                "vCPU thread stopped"
            );
        }
    }

    fn stop_with(&self, outcome: Outcome) {
        match outcome {
            Outcome::Stop(reason) => self.exit.request(reason),
            Outcome::Fatal(reason) => {
                self.dump_registers(&reason);
                self.exit.request(reason);
            }
            Outcome::Continue | Outcome::Interrupted => {}
        }
    }

    /// Finishes the instruction of the last I/O exit without entering the guest (see the
    /// module's documentation). A string instruction (`rep insb`) may need more exits,
    /// which are served as usual. Returns an outcome that stops the vCPU, if one came.
    fn complete_pending_io(&mut self) -> Option<Outcome> {
        // A `rep` string instruction exits once per page at most; a guest cannot make
        // this loop long, but it is bounded all the same.
        for _ in 0..1024 {
            self.fd.set_kvm_immediate_exit(1);
            match self.run_once() {
                Outcome::Interrupted => return None,
                Outcome::Continue => continue,
                stop => return Some(stop),
            }
        }
        warn!(
            vcpu = self.index,
            "a pending I/O instruction did not complete; pausing anyway"
        );
        self.fd.set_kvm_immediate_exit(0);
        None
    }

    fn run_once(&mut self) -> Outcome {
        let index = self.index;
        let result = self.fd.run();
        self.counters.exits.fetch_add(1, Ordering::Relaxed);
        let recorder = &mut self.io.recorder;
        match &result {
            Ok(VcpuExit::IoIn(port, data)) => {
                recorder.record(ExitKind::PioRead, u64::from(*port), data.len())
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                recorder.record(ExitKind::PioWrite, u64::from(*port), data.len())
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                recorder.record(ExitKind::MmioRead, *addr, data.len())
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                recorder.record(ExitKind::MmioWrite, *addr, data.len())
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                recorder.record(ExitKind::Interrupted, 0, 0)
            }
            Err(_) => recorder.record(ExitKind::Other, 0, 0),
            Ok(_) => recorder.record(ExitKind::Other, 0, 0),
        }
        match result {
            Ok(VcpuExit::IoIn(port, data)) => self.io.read(false, port.into(), data),
            Ok(VcpuExit::IoOut(port, data)) => self.io.write(false, port.into(), data),
            Ok(VcpuExit::MmioRead(addr, data)) => self.io.read(true, addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => self.io.write(true, addr, data),
            Ok(VcpuExit::InternalError) => {
                let internal = self.fd.get_kvm_run();
                // SAFETY: for KVM_EXIT_INTERNAL_ERROR the union holds `internal`.
                let (suberror, ndata) = unsafe {
                    (
                        internal.__bindgen_anon_1.internal.suberror,
                        internal.__bindgen_anon_1.internal.ndata,
                    )
                };
                Outcome::Fatal(ExitReason::KvmError {
                    vcpu: index,
                    detail: format!(
                        "KVM internal error, suberror {suberror} ({}), {ndata} data words",
                        suberror_name(suberror)
                    ),
                })
            }
            Ok(other) => classify(index, other),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Outcome::Interrupted
            }
            Err(e) => Outcome::Fatal(ExitReason::KvmError {
                vcpu: index,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    fn dump_registers(&self, reason: &ExitReason) {
        let recent = &self.io.recorder;
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s))
                if matches!(reason, ExitReason::TripleFault { .. }) && is_reset_state(&r, &s) =>
            {
                // AMD: KVM INITs a vCPU on a shutdown intercept before reporting it.
                error!(
                    vcpu = self.index,
                    reason = reason.name(),
                    "vCPU stopped: {reason:?}. Its registers are lost: KVM reset the vCPU \
                     before reporting the shutdown (as KVM on AMD SVM does), so they show the \
                     INIT state (cs=0xf000 base 0xffff0000 rip=0xfff0 rdx={:#x}), not where the \
                     guest faulted. {recent}",
                    r.rdx
                )
            }
            (Ok(r), Ok(s)) => error!(
                vcpu = self.index,
                reason = reason.name(),
                "vCPU stopped: {reason:?}\n  {recent}\n  rip={:#018x} rsp={:#018x} rflags={:#x}\n  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n  rsi={:#018x} rdi={:#018x} rbp={:#018x}\n  r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n  r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n  cs={:#06x} (base {:#x}, l={} db={}) ss={:#06x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp,
                r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
                s.cs.selector, s.cs.base, s.cs.l, s.cs.db, s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer
            ),
            (r, s) => error!(vcpu = self.index, ?reason, regs_error = ?r.err(), sregs_error = ?s.err(), "vCPU stopped; registers unavailable; {recent}"),
        }
    }
}

impl IoDispatch {
    /// A guest read on the port I/O (`mmio` false) or MMIO bus; unclaimed reads see all-ones.
    fn read(&mut self, mmio: bool, addr: u64, data: &mut [u8]) -> Outcome {
        let (bus, counter) = if mmio {
            (&self.buses.mmio, &self.counters.mmio)
        } else {
            (&self.buses.pio, &self.counters.io)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !bus.read(addr, data) {
            data.fill(0xff);
            note_unclaimed(
                &self.counters,
                &mut self.seen_unclaimed,
                self.vcpu,
                mmio,
                addr,
                "read",
            );
        }
        Outcome::Continue
    }

    /// A guest write on the port I/O (`mmio` false) or MMIO bus; unclaimed writes are dropped.
    fn write(&mut self, mmio: bool, addr: u64, data: &[u8]) -> Outcome {
        let (bus, counter) = if mmio {
            (&self.buses.mmio, &self.counters.mmio)
        } else {
            (&self.buses.pio, &self.counters.io)
        };
        counter.fetch_add(1, Ordering::Relaxed);
        if !bus.write(addr, data) {
            note_unclaimed(
                &self.counters,
                &mut self.seen_unclaimed,
                self.vcpu,
                mmio,
                addr,
                "write",
            );
        }
        Outcome::Continue
    }
}

/// The outcome of an exit that is not an I/O access or a KVM internal error.
fn classify(vcpu: u8, exit: VcpuExit) -> Outcome {
    match exit {
        VcpuExit::Intr => Outcome::Continue,
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => Outcome::Stop(ExitReason::PowerOff),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => Outcome::Stop(ExitReason::Reset),
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, _) => Outcome::Fatal(ExitReason::GuestCrash),
        VcpuExit::SystemEvent(kind, data) => Outcome::Fatal(ExitReason::Unhandled {
            vcpu,
            exit: format!("system event {kind} {data:x?}"),
        }),
        VcpuExit::Shutdown => Outcome::Fatal(ExitReason::TripleFault { vcpu }),
        VcpuExit::FailEntry(reason, cpu) => Outcome::Fatal(ExitReason::KvmError {
            vcpu,
            detail: format!("VM entry failed: hardware reason {reason:#x} on host CPU {cpu}"),
        }),
        other => Outcome::Fatal(ExitReason::Unhandled {
            vcpu,
            exit: format!("{other:?}"),
        }),
    }
}

fn note_unclaimed(
    counters: &VcpuCounters,
    seen: &mut HashSet<(bool, u64)>,
    vcpu: u8,
    mmio: bool,
    addr: u64,
    op: &str,
) {
    counters.unclaimed.fetch_add(1, Ordering::Relaxed);
    // Guests probe absent hardware; log each address once, and cap the memory this takes.
    if seen.len() < 4096 && seen.insert((mmio, addr)) {
        debug!(
            vcpu,
            addr = format_args!("{addr:#x}"),
            op,
            space = if mmio { "mmio" } else { "pio" },
            "access to unclaimed address"
        );
    }
}

fn suberror_name(code: u32) -> &'static str {
    match code {
        1 => "emulation failure",
        2 => "simultaneous exception",
        3 => "delivery event",
        4 => "unexpected exit reason",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{
        EXIT_GUEST_CRASH, EXIT_KVM_ERROR, EXIT_OK, EXIT_TRIPLE_FAULT, EXIT_UNHANDLED,
    };

    fn code(o: Outcome) -> Option<i32> {
        match o {
            Outcome::Continue | Outcome::Interrupted => None,
            Outcome::Stop(r) | Outcome::Fatal(r) => Some(r.exit_code()),
        }
    }

    #[test]
    fn exits_map_to_outcomes_and_statuses() {
        assert_eq!(classify(0, VcpuExit::Intr), Outcome::Continue);
        assert_eq!(
            classify(0, VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[])),
            Outcome::Stop(ExitReason::PowerOff)
        );
        assert_eq!(
            classify(0, VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])),
            Outcome::Stop(ExitReason::Reset)
        );
        assert_eq!(
            code(classify(
                0,
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[])
            )),
            Some(EXIT_OK)
        );
        assert_eq!(
            code(classify(
                0,
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_CRASH, &[])
            )),
            Some(EXIT_GUEST_CRASH)
        );
        assert_eq!(
            code(classify(1, VcpuExit::Shutdown)),
            Some(EXIT_TRIPLE_FAULT)
        );
        assert_eq!(
            code(classify(1, VcpuExit::FailEntry(0x7, 3))),
            Some(EXIT_KVM_ERROR)
        );
        // Exits the VMM never asks for are fatal, with the exit named.
        for exit in [
            VcpuExit::Hlt,
            VcpuExit::Exception,
            VcpuExit::Nmi,
            VcpuExit::Unknown,
            VcpuExit::SystemEvent(99, &[1]),
        ] {
            match classify(2, exit) {
                Outcome::Fatal(ExitReason::Unhandled { vcpu: 2, exit }) => {
                    assert!(!exit.is_empty())
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(code(classify(2, VcpuExit::Hlt)), Some(EXIT_UNHANDLED));
    }
}
