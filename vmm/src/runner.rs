//! The VMM process's main loop: builds the VM, starts its vCPUs, then serves the
//! exit signal, SIGTERM/SIGINT, console input and the control socket until the VM stops.

use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use quantix_devices::legacy::serial::SerialDevice;
use thiserror::Error;
use tracing::{debug, info, warn};

use crate::api::{ApiError, ApiServer, VmInfo};
use crate::boot::KernelFormat;
use crate::config::{BootSource, SerialMode, VmConfig};
use crate::error::VmError;
use crate::exit::{ExitReason, ExitSignal};
use crate::vm::Vm;

/// Errors that end the VMM before or while the VM runs.
#[derive(Debug, Error)]
pub enum RunError {
    /// The VM could not be built or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The control socket could not be created.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A host facility (signals, epoll) failed.
    #[error("{what}: {source}")]
    Host {
        /// What failed.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the loop when the VM is asked to stop.
struct ExitWatcher(Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        let _ = self.0.eventfd().read();
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.eventfd(), EventSet::IN)) {
            warn!(error = ?e, "cannot watch the exit eventfd");
        }
    }
}

/// SIGTERM and SIGINT, received through a signalfd, stop the VM in order.
struct SignalWatcher {
    fd: OwnedFd,
    exit: Arc<ExitSignal>,
}

fn stop_signals() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        set
    }
}

impl SignalWatcher {
    /// Blocks SIGTERM and SIGINT in this thread (and the threads it spawns later) and
    /// opens a signalfd for them.
    fn new(exit: Arc<ExitSignal>) -> Result<Self, RunError> {
        let set = stop_signals();
        // SAFETY: `set` is a valid, initialised signal set; the old mask is not needed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(RunError::Host {
                what: "blocking SIGTERM/SIGINT",
                source: io::Error::from_raw_os_error(rc),
            });
        }
        // A handler that does nothing, though the signals stay blocked and are read from the
        // signalfd: as the init of a PID namespace (in a jail), the kernel drops every
        // signal whose disposition is the default, so without a handler SIGTERM would be lost.
        extern "C" fn noop(_: libc::c_int) {}
        for sig in [libc::SIGTERM, libc::SIGINT] {
            // SAFETY: `noop` is async-signal-safe (it does nothing).
            unsafe { libc::signal(sig, noop as *const () as libc::sighandler_t) };
        }
        // SAFETY: `set` is valid; -1 asks for a new fd, which we own on success.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(RunError::Host {
                what: "creating a signalfd",
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            exit,
        })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn process(&mut self, _: Events, _: &mut EventOps) {
        // SAFETY: signalfd_siginfo is plain data; all-zero is a valid value.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reading at most `size` bytes into `info`, which is `size` bytes long.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n as usize == size {
            let sig = info.ssi_signo as i32;
            info!(signal = sig, "stop signal received; stopping the VM");
            self.exit.request(ExitReason::Signal(sig));
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            warn!(error = ?e, "cannot watch the signalfd");
        }
    }
}

/// Host input (standard input, a pty, a socket client) to the guest's serial port.
struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    fd: OwnedFd,
    pending: Vec<u8>,
    watching: bool,
    closed: bool,
}

const STDIN: RawFd = 0;

impl SerialInput {
    /// Moves pending input into the UART's FIFO as space allows.
    fn drain(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        let n = serial.enqueue_input(&self.pending);
        self.pending.drain(..n);
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 256];
        // SAFETY: reading into a local buffer of the given length from an fd we own.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::WouldBlock {
            return; // a non-blocking pty: woken for nothing
        }
        if n > 0 {
            self.pending.extend_from_slice(&buf[..n as usize]);
            self.drain();
        }
        let eof = n == 0
            || events
                .event_set()
                .intersects(EventSet::HANG_UP | EventSet::ERROR)
                && n <= 0;
        // Stop reading while the guest has not taken what we have, and at end of input.
        if eof || !self.pending.is_empty() {
            let _ = ops.remove(Events::new_raw(self.fd.as_raw_fd(), EventSet::IN));
            self.watching = false;
            if eof {
                debug!("console input closed");
                self.closed = true;
            }
        }
    }
    fn init(&mut self, ops: &mut EventOps) {
        match ops.add(Events::new_raw(self.fd.as_raw_fd(), EventSet::IN)) {
            Ok(()) => self.watching = true,
            Err(e) => warn!(error = ?e, "serial input cannot be watched; no serial input"),
        }
    }
}

/// Puts a terminal on standard input into non-canonical, no-echo mode for the guest's
/// console, and restores it when dropped. Ctrl-C still sends SIGINT, which stops the VM.
struct RawTerminal(Option<libc::termios>);

impl RawTerminal {
    fn new() -> Self {
        // SAFETY: isatty only inspects fd 0.
        if unsafe { libc::isatty(STDIN) } != 1 {
            return Self(None);
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(STDIN, &mut saved) } != 0 {
            return Self(None);
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ECHONL | libc::IEXTEN);
        raw.c_iflag &= !(libc::ICRNL | libc::IXON);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: `raw` is a valid termios derived from the current one.
        if unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, &raw) } != 0 {
            return Self(None);
        }
        Self(Some(saved))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.0 {
            // SAFETY: restoring the attributes read from the same fd.
            unsafe { libc::tcsetattr(STDIN, libc::TCSANOW, saved) };
        }
    }
}

fn boot_name(config: &VmConfig, boot: Option<&crate::boot::BootInfo>) -> &'static str {
    let Some(boot) = boot else {
        return "restored";
    };
    match (&config.boot, boot.format) {
        (BootSource::Firmware(_), _) => "firmware",
        (_, Some(KernelFormat::ElfPvh)) => "elf-pvh",
        (_, Some(KernelFormat::Elf)) => "elf",
        (_, Some(KernelFormat::BzImage)) => "bzimage",
        (_, None) => "unknown",
    }
}

/// How the VM comes to be.
#[derive(Debug)]
pub enum Start {
    /// Booted from its configuration.
    Boot(Box<VmConfig>),
    /// Restored from a snapshot directory (`quantix-vmm --restore DIR`).
    Restore {
        /// The snapshot directory.
        dir: std::path::PathBuf,
        /// A configuration whose host side replaces the saved one (`snapshot::rebind`).
        config: Option<Box<VmConfig>>,
        /// A control socket instead of the saved one (a restored copy beside the
        /// original needs its own).
        api_socket: Option<std::path::PathBuf>,
        /// The KVM device (`--kvm`), without `config`.
        kvm: std::path::PathBuf,
        /// The seccomp mode (`--seccomp`), without `config`: a snapshot's own choice is
        /// never taken.
        seccomp: crate::seccomp::Mode,
        /// Run the guest at once; otherwise it waits paused for a `resume`.
        resume: bool,
        /// How the memory comes back.
        memory: crate::vm::RestoreMemory,
    },
    /// Received by live migration (`quantix-vmm --incoming SOCKET`).
    Incoming {
        /// The Unix socket to listen on for the source.
        socket: std::path::PathBuf,
        /// The userfaultfd device for a post-copy (`--userfaultfd`).
        userfaultfd: Option<std::path::PathBuf>,
        /// A configuration whose host side replaces the source's (`snapshot::rebind`).
        config: Option<Box<VmConfig>>,
        /// A control socket instead of the source's.
        api_socket: Option<std::path::PathBuf>,
        /// The KVM device (`--kvm`), without `config`.
        kvm: std::path::PathBuf,
        /// The seccomp mode (`--seccomp`), without `config`.
        seccomp: crate::seccomp::Mode,
    },
}

/// What an incoming migration has received before the VM is built.
struct Incoming {
    conn: std::os::unix::net::UnixStream,
    regions: Vec<crate::snapshot::MemoryRegion>,
    /// The source's memfd, when it hands its memory over.
    memory: Option<std::fs::File>,
    /// The userfaultfd device for a post-copy.
    userfaultfd: Option<std::path::PathBuf>,
    /// Post-copy, once switched.
    post_copy: Option<PostCopyRun>,
}

/// A post-copy under way at the destination: the writer its page-request thread shares
/// with this side's replies, and its threads (they end with the post-copy, or with the
/// process).
struct PostCopyRun {
    writer: Arc<Mutex<std::os::unix::net::UnixStream>>,
    _threads: Vec<std::thread::JoinHandle<()>>,
}

/// The source's configuration with this host's side: `given`'s host side, or this
/// VMM's `--kvm` and `--seccomp`; checked against this host.
fn host_config(
    mut saved: VmConfig,
    given: Option<Box<VmConfig>>,
    api_socket: Option<std::path::PathBuf>,
    kvm: std::path::PathBuf,
    seccomp: crate::seccomp::Mode,
) -> Result<VmConfig, VmError> {
    match given {
        None => {
            saved.kvm = kvm;
            saved.seccomp = seccomp;
        }
        Some(given) => saved = crate::snapshot::rebind(&saved, &given).map_err(VmError::from)?,
    }
    crate::config::validate_on_host(&saved).map_err(|e| {
        VmError::from(crate::snapshot::SnapshotError::Inconsistent(format!(
            "the saved configuration: {e}"
        )))
    })?;
    if api_socket.is_some() {
        saved.api_socket = api_socket;
    }
    Ok(saved)
}

fn incoming_err(e: crate::migration::destination::IncomingError) -> RunError {
    RunError::Vm(VmError::from(crate::snapshot::SnapshotError::Other(
        e.to_string(),
    )))
}

/// Builds and runs the VM until it stops; returns why it stopped. `seccomp_probe` is the
/// test hook of [`crate::seccomp::probe`] (a thread of that kind makes a forbidden call).
pub fn run(
    config: &VmConfig,
    seccomp_probe: Option<crate::seccomp::Kind>,
) -> Result<ExitReason, RunError> {
    run_start(Start::Boot(Box::new(config.clone())), seccomp_probe)
}

/// Reads and checks a snapshot's state file.
pub fn read_snapshot(dir: &std::path::Path) -> Result<crate::snapshot::SnapshotState, VmError> {
    use crate::snapshot::{file, SnapshotError, SnapshotState, STATE_FILE};
    let started = std::time::Instant::now();
    let body = file::read(&dir.join(STATE_FILE)).map_err(SnapshotError::from)?;
    let state = SnapshotState::parse(&body)?;
    tracing::debug!(
        bytes = body.len(),
        us = started.elapsed().as_micros() as u64,
        "snapshot state read"
    );
    Ok(state)
}

/// Builds the incoming VM, receives its memory and state, and waits for `go`; any
/// failure is told to the source, and the VM never runs.
fn receive_incoming(
    inc: &mut Incoming,
    config: &VmConfig,
    exit: &Arc<ExitSignal>,
) -> Result<(Vm, std::time::Instant), RunError> {
    use crate::migration::destination;
    let shared = inc.memory.is_some();
    let mut vm = match Vm::incoming(config, exit.clone(), inc.memory.take()) {
        Ok(vm) => vm,
        Err(e) => {
            destination::abandon(&mut inc.conn, &e.to_string());
            return Err(e.into());
        }
    };
    let received = destination::ready(&mut inc.conn).and_then(|()| {
        destination::receive_memory(&mut inc.conn, vm.memory(), &inc.regions, shared)
    });
    let received = match received {
        Ok(r) => r,
        Err(e) => {
            destination::abandon(&mut inc.conn, &e.to_string());
            return Err(incoming_err(e));
        }
    };
    let at = received.at;
    if let Err(e) = vm.load_incoming(received.state) {
        destination::abandon(&mut inc.conn, &e.to_string());
        return Err(e.into());
    }
    // Post-copy: the pages still to come are missing from here on; nothing touches guest
    // memory until the threads that serve it run.
    let post_copy = match &received.missing {
        None => None,
        Some(missing) => {
            match crate::migration::postcopy::Incoming::prepare(
                vm.memory(),
                &inc.regions,
                missing,
                inc.userfaultfd.as_deref(),
            ) {
                Ok(p) => Some(p),
                Err(e) => {
                    destination::abandon(&mut inc.conn, &e);
                    return Err(incoming_err(destination::IncomingError::Vm(e)));
                }
            }
        }
    };
    destination::loaded_then_go(&mut inc.conn, &inc.regions).map_err(incoming_err)?;
    if let Some(p) = post_copy {
        let io = |e: io::Error| RunError::Host {
            what: "starting post-copy",
            source: e,
        };
        let writer = crate::migration::postcopy::shared_writer(&inc.conn).map_err(io)?;
        let reader = inc.conn.try_clone().map_err(io)?;
        let threads = p
            .spawn(reader, writer.clone(), inc.regions.clone(), exit.clone())
            .map_err(io)?;
        inc.post_copy = Some(PostCopyRun {
            writer,
            _threads: threads,
        });
    }
    Ok((vm, at))
}

/// Builds (or restores) and runs the VM until it stops; returns why it stopped.
pub fn run_start(
    start: Start,
    seccomp_probe: Option<crate::seccomp::Kind>,
) -> Result<ExitReason, RunError> {
    let mut incoming = None;
    let (config, restore) = match start {
        Start::Boot(config) => (*config, None),
        Start::Restore {
            dir,
            config,
            api_socket,
            kvm,
            seccomp,
            resume,
            memory,
        } => {
            let mut state = read_snapshot(&dir)?;
            state.config = host_config(state.config, config, api_socket, kvm, seccomp)?;
            (state.config.clone(), Some((state, dir, resume, memory)))
        }
        Start::Incoming {
            socket,
            userfaultfd,
            config,
            api_socket,
            kvm,
            seccomp,
        } => {
            use crate::migration::destination;
            let mut conn = destination::accept(&socket).map_err(incoming_err)?;
            let (hello, memory) = match destination::hello(&mut conn) {
                Ok(h) => h,
                Err(e) => {
                    destination::abandon(&mut conn, &e.to_string());
                    return Err(incoming_err(e));
                }
            };
            let config = match host_config(hello.config, config, api_socket, kvm, seccomp) {
                Ok(c) => c,
                Err(e) => {
                    destination::abandon(&mut conn, &e.to_string());
                    return Err(e.into());
                }
            };
            incoming = Some(Incoming {
                conn,
                regions: hello.regions,
                memory,
                userfaultfd,
                post_copy: None,
            });
            (config, None)
        }
    };
    let config = &config;
    let host_err = |what| move |source| RunError::Host { what, source };
    let exit = Arc::new(ExitSignal::new().map_err(host_err("creating the exit eventfd"))?);
    // Before any thread exists, so that every thread inherits the blocked mask.
    let signals = SignalWatcher::new(exit.clone())?;
    crate::seccomp::init(config.seccomp, seccomp_probe).map_err(|e| RunError::Host {
        what: "seccomp",
        source: io::Error::other(e),
    })?;
    crate::seccomp::launcher::start().map_err(host_err("starting the device thread launcher"))?;
    let mut state_at = None;
    let (vm, resume) = match (restore, incoming.as_mut()) {
        (None, None) => (Vm::build(config, exit.clone())?, false),
        (Some((state, dir, resume, memory)), _) => {
            (Vm::restore_with(state, &dir, exit.clone(), memory)?, resume)
        }
        (None, Some(inc)) => {
            let (vm, at) = receive_incoming(inc, config, &exit)?;
            state_at = Some(at);
            (vm, true)
        }
    };
    let info = VmInfo {
        vcpus: config.vcpus,
        memory_mib: config.memory.0,
        boot: boot_name(config, vm.boot.as_ref()),
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION"),
        metrics: vm.metrics(),
        power_button: Some(vm.power_button()),
        pause: Some(vm.pauser()),
        snapshot: Some(vm.snapshotter()),
        migration: Some(Arc::new(crate::migration::source::Migrator::new(
            vm.snapshotter(),
            exit.clone(),
        ))),
    };
    let api = match &config.api_socket {
        Some(path) => Some(ApiServer::bind(path, info, exit.clone())?),
        None => None,
    };

    let mut em = EventManager::<Subscriber>::new().map_err(|e| RunError::Host {
        what: "creating the event loop",
        source: io::Error::other(format!("{e:?}")),
    })?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher(exit.clone()))));
    em.add_subscriber(Arc::new(Mutex::new(signals)));
    if let Some(api) = api {
        em.add_subscriber(Arc::new(Mutex::new(api)));
    }

    // The main thread's filter, before any vCPU runs (vCPU threads start under it and add
    // their own).
    crate::seccomp::install(crate::seccomp::Kind::Vmm).map_err(|e| RunError::Host {
        what: "seccomp",
        source: io::Error::other(e),
    })?;
    crate::seccomp::probe(crate::seccomp::Kind::Vmm);
    let pauser = vm.pauser();
    let mut running = vm.start()?;
    if resume {
        crate::control::PauseControl::resume(&*pauser);
    }
    if let (Some(inc), Some(at)) = (incoming.as_mut(), state_at) {
        match &inc.post_copy {
            Some(run) => {
                let mut w = run.writer.lock().unwrap_or_else(|p| p.into_inner());
                crate::migration::destination::running(&mut w, at);
            }
            None => crate::migration::destination::running(&mut inc.conn, at),
        }
        info!("incoming migration complete: the VM runs here");
    }
    // Standard input goes to the serial port or the console; either way, raw for the guest.
    let stdin_used = config.serial == SerialMode::Stdout || config.console == SerialMode::Stdout;
    let _terminal = stdin_used.then(RawTerminal::new);
    let input = running.serial_input.take().map(|fd| {
        Arc::new(Mutex::new(SerialInput {
            serial: running.serial.clone(),
            fd,
            pending: Vec::new(),
            watching: false,
            closed: false,
        }))
    });
    let input_id = input
        .as_ref()
        .map(|i| em.add_subscriber(i.clone() as Subscriber));
    info!("VM running");

    let reason = loop {
        if let Some(reason) = exit.reason() {
            break reason;
        }
        let pending = input
            .as_ref()
            .is_some_and(|i| !i.lock().map(|i| i.pending.is_empty()).unwrap_or(true));
        if let Err(e) = em.run_with_timeout(if pending { 10 } else { -1 }) {
            warn!(error = ?e, "event loop failed");
            exit.request(ExitReason::VmmError(format!("event loop: {e:?}")));
            continue;
        }
        // Feed the guest input it could not take before; resume reading when all is in.
        if let (Some(input), Some(id)) = (&input, input_id) {
            let mut i = input.lock().unwrap_or_else(|p| p.into_inner());
            i.drain();
            if i.pending.is_empty() && !i.watching && !i.closed {
                if let Ok(mut ops) = em.event_ops(id) {
                    let fd = i.fd.as_raw_fd();
                    i.watching = ops.add(Events::new_raw(fd, EventSet::IN)).is_ok();
                }
            }
        }
    };
    info!(
        reason = reason.name(),
        exits = running.exit_count(),
        "stopping the VM"
    );
    running.stop();
    Ok(reason)
}
