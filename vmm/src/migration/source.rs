//! The source side of a live migration: pre-copy rounds while the guest runs, then the
//! switch (pause, the last dirty pages, the state, `go`), on a `migration` thread so that
//! the control socket stays free to report progress and to cancel.
//!
//! Until `go` is sent every failure leaves the VM running here as before; after it, a
//! broken connection leaves the outcome unknown here (the destination may run the VM), so
//! the VM stays paused for its supervisor, which can ask the destination (phase
//! `unknown`).

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use quantix_vmm_api::control::{MigrationPhase, MigrationPolicy, MigrationStatus, OnLimit};
use tracing::{info, warn};
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, BatchWriter, Hello, Kind, MemoryTransfer, Message, ProtocolError};
use super::throttle::Throttle;
use crate::control::{MigrationControl, MigrationRefusal, PauseControl};
use crate::exit::{ExitReason, ExitSignal};
use crate::snapshot::memory::{dirty_ranges, is_zero, regions_of};
use crate::snapshot::take::{Captured, Snapshotter};
use crate::snapshot::{
    MemoryImage, MemoryRegion, PageRange, SnapshotState, MEMORY_FILE, PAGE_SIZE,
};

/// How long the source waits for each reply of the destination (it builds the VM after
/// `hello`, loads the state after `state`).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);
/// Pages read from guest memory at a time.
const CHUNK_PAGES: u64 = 256;

/// Why a migration failed, and whether the destination may run the VM.
#[derive(Debug)]
struct Failure {
    phase: &'static str,
    error: String,
    /// `go` was sent: the destination may be running the VM.
    after_go: bool,
}

impl Failure {
    fn new(phase: &'static str, error: impl std::fmt::Display) -> Self {
        Failure {
            phase,
            error: error.to_string(),
            after_go: false,
        }
    }
}

/// The source VMM's migrations (one at a time).
pub struct Migrator {
    snap: Arc<Snapshotter>,
    exit: Arc<ExitSignal>,
    status: Mutex<MigrationStatus>,
    cancel: AtomicBool,
    active: AtomicBool,
    /// `go` is about to be sent: a cancel comes too late.
    switching: AtomicBool,
    /// When the last migration started.
    started: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Migrator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migrator")
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Migrator {
    /// A migrator of the VM the snapshotter reads; a completed migration requests
    /// [`ExitReason::Migrated`] on `exit`.
    pub fn new(snap: Arc<Snapshotter>, exit: Arc<ExitSignal>) -> Arc<Self> {
        Arc::new(Migrator {
            snap,
            exit,
            status: Mutex::new(MigrationStatus::none()),
            cancel: AtomicBool::new(false),
            active: AtomicBool::new(false),
            switching: AtomicBool::new(false),
            started: Mutex::new(None),
        })
    }

    fn update(&self, f: impl FnOnce(&mut MigrationStatus)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn cancelled(&self) -> Result<(), Failure> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(Failure::new("pre-copy", "cancelled"));
        }
        Ok(())
    }

    /// Starts a migration to `to` on its own thread.
    pub fn start_thread(
        self: &Arc<Self>,
        to: &Path,
        policy: MigrationPolicy,
    ) -> Result<MigrationStatus, MigrationRefusal> {
        if self.active.swap(true, Ordering::AcqRel) {
            return Err(MigrationRefusal::Conflict(
                "a migration is under way".into(),
            ));
        }
        if self.snap.pauser().is_paused() {
            // Pre-copy of a paused VM is a plain transfer; allowed, the VM stays paused
            // until the switch.
            info!("migrating a paused VM");
        }
        self.cancel.store(false, Ordering::Release);
        self.switching.store(false, Ordering::Release);
        let started = Instant::now();
        *self.started.lock().unwrap_or_else(|p| p.into_inner()) = Some(started);
        let memory_bytes: u64 = self.snap.ram().regions.iter().map(|r| r.1 as u64).sum();
        self.update(|s| {
            *s = MigrationStatus::none();
            s.phase = MigrationPhase::Connecting;
            s.memory_bytes = memory_bytes;
        });
        let me = self.clone();
        let to = to.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || me.run(&to, policy, started));
        if let Err(e) = spawned {
            self.active.store(false, Ordering::Release);
            self.update(|s| s.phase = MigrationPhase::Failed);
            return Err(MigrationRefusal::Failed(format!(
                "cannot start the migration thread: {e}"
            )));
        }
        Ok(self.status_now())
    }

    /// The status, with the time so far of a migration under way.
    fn status_now(&self) -> MigrationStatus {
        let mut s = self
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let started = *self.started.lock().unwrap_or_else(|p| p.into_inner());
        if let (true, Some(t)) = (self.active.load(Ordering::Acquire), started) {
            s.total_ms = t.elapsed().as_millis() as u64;
        }
        s
    }

    fn run(self: Arc<Self>, to: &Path, policy: MigrationPolicy, started: Instant) {
        info!(to = %to.display(), ?policy, "migration started");
        let mut dirty_log_on = false;
        let was_paused = self.snap.pauser().is_paused();
        let result = self.migrate(to, &policy, started, &mut dirty_log_on);
        let total_ms = started.elapsed().as_millis() as u64;
        match result {
            Ok(downtime) => {
                let downtime_ms = downtime.as_millis() as u64;
                self.update(|s| {
                    s.phase = MigrationPhase::Completed;
                    s.downtime_ms = Some(downtime_ms);
                    s.total_ms = total_ms;
                    s.remaining_bytes = 0;
                });
                info!(
                    downtime_ms,
                    total_ms, "migration completed; the VM runs at the destination"
                );
                self.exit.request(ExitReason::Migrated {
                    downtime_ms,
                    total_ms,
                });
            }
            Err(f) if f.after_go => {
                warn!(phase = f.phase, error = %f.error,
                    "migration: the connection failed after the destination was told to run; \
                     the VM stays paused here");
                self.update(|s| {
                    s.phase = MigrationPhase::Unknown;
                    s.error = Some(format!("{}: {}", f.phase, f.error));
                    s.total_ms = total_ms;
                });
            }
            Err(f) => {
                warn!(phase = f.phase, error = %f.error, "migration failed; the VM runs on here");
                if dirty_log_on {
                    if let Err(e) = self.snap.ram().register(self.snap.vm_fd(), false) {
                        warn!(error = %e, "cannot turn dirty logging off again");
                    }
                }
                if !was_paused {
                    self.snap.pauser().resume();
                }
                self.update(|s| {
                    s.phase = MigrationPhase::Failed;
                    s.error = Some(format!("{}: {}", f.phase, f.error));
                    s.total_ms = total_ms;
                    s.throttle_percent = 0;
                });
            }
        }
        self.active.store(false, Ordering::Release);
    }

    fn migrate(
        &self,
        to: &Path,
        policy: &MigrationPolicy,
        started: Instant,
        dirty_log_on: &mut bool,
    ) -> Result<Duration, Failure> {
        let regions = regions_of(self.snap.ram());
        let mut conn = UnixStream::connect(to)
            .map_err(|e| Failure::new("connecting", format!("{}: {e}", to.display())))?;
        conn.set_read_timeout(Some(REPLY_TIMEOUT))
            .and_then(|()| conn.set_write_timeout(Some(REPLY_TIMEOUT)))
            .map_err(|e| Failure::new("connecting", e))?;
        let hello = Hello {
            version: protocol::VERSION,
            written_by: format!("quantix-vmm {}", env!("CARGO_PKG_VERSION")),
            config: self.snap.config().clone(),
            regions,
            memory: if policy.share_memory {
                MemoryTransfer::Fd
            } else {
                MemoryTransfer::Copy
            },
        };
        let result = self.transfer(&mut conn, &hello, policy, started, dirty_log_on);
        if let Err(f) = &result {
            if !f.after_go {
                // Best effort: the destination may be what failed.
                let _ = protocol::send(&mut conn, Kind::Abandon, f.error.as_bytes());
            }
        }
        result
    }

    fn transfer(
        &self,
        conn: &mut UnixStream,
        hello: &Hello,
        policy: &MigrationPolicy,
        started: Instant,
        dirty_log_on: &mut bool,
    ) -> Result<Duration, Failure> {
        let ram = self.snap.ram();
        let regions = &hello.regions;
        if hello.memory == MemoryTransfer::Fd && !ram.shareable {
            return Err(Failure::new(
                "connecting",
                "this VM's memory cannot be handed over (a VM restored from a snapshot maps \
                 it privately): migrate without share_memory",
            ));
        }
        protocol::send_json(conn, Kind::Hello, hello).map_err(|e| Failure::new("connecting", e))?;
        if hello.memory == MemoryTransfer::Fd {
            protocol::send_memory_fd(conn, ram.raw_fd())
                .map_err(|e| Failure::new("connecting", e))?;
        }
        expect(conn, regions, "connecting", "ready")?;
        self.cancelled()?;
        if hello.memory == MemoryTransfer::Fd {
            // Nothing to copy: pause, send the state, switch.
            let paused_at = Instant::now();
            self.update(|s| s.phase = MigrationPhase::Switching);
            self.snap
                .pauser()
                .pause()
                .map_err(|e| Failure::new("switching", format!("pausing the VM: {e}")))?;
            return self.switch(conn, hello, paused_at, 0);
        }

        // Dirty tracking from here: KVM's log of every slot, and the devices' record.
        self.snap.forget_base();
        ram.register(self.snap.vm_fd(), true)
            .map_err(|e| Failure::new("pre-copy", format!("turning dirty logging on: {e}")))?;
        *dirty_log_on = true;
        ram.take_dirty_bitmaps(self.snap.vm_fd())
            .map_err(|e| Failure::new("pre-copy", e))?;
        self.update(|s| s.phase = MigrationPhase::PreCopy);

        let mut sender = Sender::new(policy.bandwidth_bytes_per_s);
        // Round 0: every page with data (the destination's memory starts zeroed).
        let all: Vec<PageRange> = regions
            .iter()
            .map(|r| PageRange {
                guest_addr: r.guest_addr,
                pages: r.size / PAGE_SIZE,
            })
            .collect();
        let mut round_start = Instant::now();
        sender.send(self, conn, &all, false).map_err(|f| Failure {
            phase: "pre-copy",
            ..f
        })?;
        let mut throttle = Throttle::new(self.snap.pauser().clone());
        let mut round = 0u32;
        let mut post_copy = false;
        let pending = loop {
            let took = round_start.elapsed();
            let bitmaps = ram
                .take_dirty_bitmaps(self.snap.vm_fd())
                .map_err(|e| Failure::new("pre-copy", e))?;
            let ranges = dirty_ranges(regions, &bitmaps);
            let dirty: u64 = ranges.iter().map(|r| r.pages * PAGE_SIZE).sum();
            let bandwidth = sender.round_bandwidth(took);
            let dirty_rate = (dirty as f64 / took.as_secs_f64().max(1e-6)) as u64;
            let expected_ms = (dirty as f64 / bandwidth.max(1) as f64 * 1000.0) as u64;
            self.update(|s| {
                s.round = round;
                s.sent_bytes = sender.total;
                s.remaining_bytes = dirty;
                s.bandwidth_bytes_per_s = bandwidth;
                s.dirty_bytes_per_s = dirty_rate;
                s.expected_downtime_ms = expected_ms;
            });
            info!(
                round,
                dirty,
                bandwidth,
                dirty_rate,
                expected_ms,
                throttle = throttle.percent(),
                "migration: pre-copy round done"
            );
            if expected_ms <= policy.downtime_ms {
                break bitmaps;
            }
            let out_of_rounds = round >= policy.max_rounds;
            let out_of_time = started.elapsed() >= Duration::from_millis(policy.max_precopy_ms);
            if out_of_rounds || out_of_time {
                let why = if out_of_rounds {
                    format!("{} rounds", policy.max_rounds)
                } else {
                    format!("{} ms of pre-copy", policy.max_precopy_ms)
                };
                if policy.post_copy {
                    info!(
                        expected_ms,
                        "migration: {why} reached; switching to post-copy"
                    );
                    post_copy = true;
                    break bitmaps;
                }
                match policy.on_limit {
                    OnLimit::Switch => {
                        warn!(
                            expected_ms,
                            target_ms = policy.downtime_ms,
                            "migration: {why} reached; switching with a longer downtime"
                        );
                        break bitmaps;
                    }
                    OnLimit::Cancel => {
                        return Err(Failure::new(
                            "pre-copy",
                            format!(
                                "did not converge within {why}: {dirty} dirty bytes, about \
                                 {expected_ms} ms to send, target {} ms",
                                policy.downtime_ms
                            ),
                        ))
                    }
                }
            }
            // The guest dirties faster than the link carries: hold its vCPUs for a growing
            // share of each slice.
            if policy.auto_converge && round >= 1 && dirty_rate > bandwidth / 2 {
                throttle.increase();
                self.update(|s| s.throttle_percent = throttle.percent());
            }
            round += 1;
            round_start = Instant::now();
            sender
                .send(self, conn, &ranges, true)
                .map_err(|f| Failure {
                    phase: "pre-copy",
                    ..f
                })?;
        };
        throttle.stop();

        // The switch.
        self.update(|s| {
            s.phase = MigrationPhase::Switching;
            s.throttle_percent = 0;
        });
        let paused_at = Instant::now();
        self.snap
            .pauser()
            .pause()
            .map_err(|e| Failure::new("switching", format!("pausing the VM: {e}")))?;
        // The pages dirty at the last check and since, each once.
        let mut last = ram
            .take_dirty_bitmaps(self.snap.vm_fd())
            .map_err(|e| Failure::new("switching", e))?;
        for (words, before) in last.iter_mut().zip(&pending) {
            for (w, b) in words.iter_mut().zip(before) {
                *w |= b;
            }
        }
        if post_copy {
            return self.switch_post_copy(conn, hello, paused_at, sender, &last);
        }
        sender
            .send(self, conn, &dirty_ranges(regions, &last), true)
            .map_err(|f| Failure {
                phase: "switching",
                ..f
            })?;
        self.switch(conn, hello, paused_at, sender.total)
    }

    /// The post-copy switch of the paused VM: the destination learns which pages it lacks
    /// (`missing`), gets the state and `go`; then this side serves the pages it asks for
    /// first and streams all the others, and says `complete`.
    fn switch_post_copy(
        &self,
        conn: &mut UnixStream,
        hello: &Hello,
        paused_at: Instant,
        mut sender: Sender,
        missing: &[Vec<u64>],
    ) -> Result<Duration, Failure> {
        let regions = &hello.regions;
        let set = super::postcopy::PageSet::new(regions, missing);
        info!(pages = set.remaining(), "migration: post-copy switch");
        protocol::send(conn, Kind::PostCopy, &protocol::encode_bitmaps(missing))
            .map_err(|e| Failure::new("switching", e))?;
        let state = self.state_body(hello)?;
        protocol::send(conn, Kind::State, &state).map_err(|e| Failure::new("switching", e))?;
        expect(conn, regions, "switching", "loaded")?;
        if self.cancel.load(Ordering::Acquire) {
            return Err(Failure::new("switching", "cancelled"));
        }
        self.switching.store(true, Ordering::Release);
        let after_go = |e: String| Failure {
            after_go: true,
            ..Failure::new("post-copy", e)
        };
        protocol::send(conn, Kind::Go, &[]).map_err(|e| after_go(e.to_string()))?;
        self.update(|s| s.phase = MigrationPhase::PostCopy);
        // The destination's requests and its `running`, read on a thread of their own.
        let (tx, rx) = std::sync::mpsc::channel::<Result<Message, String>>();
        let mut reader = conn.try_clone().map_err(|e| after_go(e.to_string()))?;
        let reader_regions = regions.clone();
        std::thread::Builder::new()
            .name("postcopy-requests".into())
            .spawn(move || loop {
                let m = protocol::receive(&mut reader, &reader_regions).map_err(|e| e.to_string());
                let end = m.is_err();
                if tx.send(m).is_err() || end {
                    break;
                }
            })
            .map_err(|e| after_go(e.to_string()))?;
        let mut downtime = None;
        let mut requested = 0u64;
        let mut handle = |m: Result<Message, String>,
                          sender: &mut Sender,
                          conn: &mut UnixStream,
                          downtime: &mut Option<Duration>|
         -> Result<(), Failure> {
            match m.map_err(after_go)? {
                Message::PageRequest(gpa) => {
                    if set.remove(gpa) {
                        requested += 1;
                        let page = [PageRange {
                            guest_addr: gpa,
                            pages: 1,
                        }];
                        sender.send(self, conn, &page, true)?;
                    }
                    Ok(())
                }
                Message::Running(_) => {
                    *downtime = Some(paused_at.elapsed());
                    Ok(())
                }
                other => Err(after_go(format!(
                    "expected page requests, got {}",
                    other.name()
                ))),
            }
        };
        for r in set.ranges() {
            let mut page = 0;
            while page < r.pages {
                while let Ok(m) = rx.try_recv() {
                    handle(m, &mut sender, conn, &mut downtime)?;
                }
                let n = (r.pages - page).min(CHUNK_PAGES);
                // The pages of this chunk the destination has not asked for yet.
                let mut chunk = Vec::new();
                for i in page..page + n {
                    let gpa = r.guest_addr + i * PAGE_SIZE;
                    if set.remove(gpa) {
                        chunk.push(PageRange {
                            guest_addr: gpa,
                            pages: 1,
                        });
                    }
                }
                let merged = merge(&chunk);
                sender.send(self, conn, &merged, true)?;
                page += n;
            }
        }
        protocol::send(conn, Kind::Complete, &[]).map_err(|e| after_go(e.to_string()))?;
        // The destination's `running` may still be on its way.
        while downtime.is_none() {
            let m = rx
                .recv_timeout(REPLY_TIMEOUT)
                .map_err(|_| after_go("no `running` from the destination".into()))?;
            handle(m, &mut sender, conn, &mut downtime)?;
        }
        let downtime = downtime.unwrap_or_default();
        info!(
            downtime_ms = downtime.as_millis() as u64,
            requested,
            sent_bytes = sender.total,
            "migration: the destination runs the VM (post-copy complete)"
        );
        self.update(|s| s.sent_bytes = sender.total);
        Ok(downtime)
    }

    /// The saved state of the paused VM, as a state body.
    fn state_body(&self, hello: &Hello) -> Result<Vec<u8>, Failure> {
        let Captured { vcpus, vm, devices } = self
            .snap
            .capture()
            .map_err(|e| Failure::new("switching", format!("saving the state: {e}")))?;
        let state = SnapshotState {
            written_by: hello.written_by.clone(),
            taken_at_unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            config: hello.config.clone(),
            memory: MemoryImage {
                file: MEMORY_FILE.into(),
                regions: hello.regions.clone(),
                // The pages travel in the stream, not in an image file.
                data_bytes: 0,
                parent: None,
                parent_checksum: None,
                pages: None,
            },
            vcpus,
            vm,
            devices,
        };
        state
            .validate()
            .and_then(|()| state.to_body())
            .map_err(|e| Failure::new("switching", format!("the saved state: {e}")))
    }

    /// The switch of a paused VM whose memory is at the destination: the state, then
    /// `go`; returns the downtime since `paused_at`. `sent` is the page bytes sent.
    fn switch(
        &self,
        conn: &mut UnixStream,
        hello: &Hello,
        paused_at: Instant,
        sent: u64,
    ) -> Result<Duration, Failure> {
        let regions = &hello.regions;
        let body = self.state_body(hello)?;
        protocol::send(conn, Kind::State, &body).map_err(|e| Failure::new("switching", e))?;
        expect(conn, regions, "switching", "loaded")?;
        // The point of no return.
        if self.cancel.load(Ordering::Acquire) {
            return Err(Failure::new("switching", "cancelled"));
        }
        self.switching.store(true, Ordering::Release);
        protocol::send(conn, Kind::Go, &[]).map_err(|e| Failure {
            after_go: true,
            ..Failure::new("switching", e)
        })?;
        match protocol::receive(conn, regions) {
            Ok(Message::Running(r)) => {
                let downtime = paused_at.elapsed();
                info!(
                    downtime_ms = downtime.as_millis() as u64,
                    destination_load_us = r.load_us,
                    sent_bytes = sent,
                    "migration: the destination runs the VM"
                );
                self.update(|s| s.sent_bytes = sent);
                Ok(downtime)
            }
            Ok(other) => Err(Failure {
                after_go: true,
                ..Failure::new(
                    "switching",
                    format!("expected running, got {}", other.name()),
                )
            }),
            Err(e) => Err(Failure {
                after_go: true,
                ..Failure::new("switching", e)
            }),
        }
    }
}

/// Single pages merged into runs.
fn merge(pages: &[PageRange]) -> Vec<PageRange> {
    let mut out: Vec<PageRange> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some(last) if last.guest_addr + last.pages * PAGE_SIZE == p.guest_addr => {
                last.pages += p.pages;
            }
            _ => out.push(*p),
        }
    }
    out
}

/// Reads the reply `want`; an `abandon` or anything else fails `phase`.
fn expect(
    conn: &mut UnixStream,
    regions: &[MemoryRegion],
    phase: &'static str,
    want: &'static str,
) -> Result<(), Failure> {
    match protocol::receive(conn, regions) {
        Ok(m) if m.name() == want => Ok(()),
        Ok(Message::Abandon(why)) => Err(Failure::new(
            phase,
            format!("the destination gave up: {why}"),
        )),
        Ok(m) => Err(Failure::new(
            phase,
            format!("expected {want}, got {}", m.name()),
        )),
        Err(e) => Err(Failure::new(phase, destination_gone(e))),
    }
}

fn destination_gone(e: ProtocolError) -> String {
    match e {
        ProtocolError::Io { source, .. } if source.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the destination closed the connection".into()
        }
        e => e.to_string(),
    }
}

/// Sends page ranges in batches, measuring what it sends and keeping to a bandwidth limit.
struct Sender {
    batch: BatchWriter,
    buf: Vec<u8>,
    /// Page bytes sent in all.
    total: u64,
    /// Wire bytes of the current round.
    round_wire: u64,
    limit: u64,
    limit_start: Instant,
    limit_sent: u64,
}

impl Sender {
    fn new(limit: u64) -> Self {
        Sender {
            batch: BatchWriter::default(),
            buf: vec![0u8; (CHUNK_PAGES * PAGE_SIZE) as usize],
            total: 0,
            round_wire: 0,
            limit,
            limit_start: Instant::now(),
            limit_sent: 0,
        }
    }

    /// Bytes per second of the round that took `took`, and starts the next round.
    fn round_bandwidth(&mut self, took: Duration) -> u64 {
        let b = (self.round_wire as f64 / took.as_secs_f64().max(1e-6)) as u64;
        self.round_wire = 0;
        b
    }

    /// Sends the pages of `ranges`: their data, or for zero pages (only when `zeros`: in
    /// round 0 the destination's pages are zero already) a zero range.
    fn send(
        &mut self,
        m: &Migrator,
        conn: &mut UnixStream,
        ranges: &[PageRange],
        zeros: bool,
    ) -> Result<(), Failure> {
        let mut buf = std::mem::take(&mut self.buf);
        let sent = self.send_with(m, conn, ranges, zeros, &mut buf);
        self.buf = buf;
        sent
    }

    fn send_with(
        &mut self,
        m: &Migrator,
        conn: &mut UnixStream,
        ranges: &[PageRange],
        zeros: bool,
        chunk: &mut [u8],
    ) -> Result<(), Failure> {
        let mem = &m.snap.ram().mem;
        for r in ranges {
            let mut page = 0;
            while page < r.pages {
                m.cancelled()?;
                let n = (r.pages - page).min(CHUNK_PAGES);
                let addr = r.guest_addr + page * PAGE_SIZE;
                let len = (n * PAGE_SIZE) as usize;
                let buf = &mut chunk[..len];
                mem.read_slice(buf, GuestAddress(addr)).map_err(|e| {
                    Failure::new("", format!("reading guest memory at {addr:#x}: {e}"))
                })?;
                // Runs of data pages and of zero pages.
                let mut i = 0u64;
                while i < n {
                    let at = (i * PAGE_SIZE) as usize;
                    let zero = is_zero(&buf[at..at + PAGE_SIZE as usize]);
                    let mut j = i + 1;
                    while j < n {
                        let at = (j * PAGE_SIZE) as usize;
                        if is_zero(&buf[at..at + PAGE_SIZE as usize]) != zero {
                            break;
                        }
                        j += 1;
                    }
                    let run = (j - i) as u32;
                    let run_addr = addr + i * PAGE_SIZE;
                    if !zero || zeros {
                        if self.batch.full_for(run, zero) {
                            self.flush(conn)?;
                        }
                        let data = (!zero)
                            .then(|| &buf[(i * PAGE_SIZE) as usize..(j * PAGE_SIZE) as usize]);
                        self.batch.push(run_addr, run, data);
                        if !zero {
                            self.total += u64::from(run) * PAGE_SIZE;
                        }
                    }
                    i = j;
                }
                page += n;
            }
        }
        self.flush(conn)
    }

    fn flush(&mut self, conn: &mut UnixStream) -> Result<(), Failure> {
        let sent = self
            .batch
            .flush(conn)
            .map_err(|e| Failure::new("", destination_gone(e)))?;
        self.round_wire += sent;
        if self.limit > 0 && sent > 0 {
            self.limit_sent += sent;
            let due = Duration::from_secs_f64(self.limit_sent as f64 / self.limit as f64);
            let elapsed = self.limit_start.elapsed();
            if due > elapsed {
                std::thread::sleep(due - elapsed);
            }
        }
        Ok(())
    }
}

impl MigrationControl for Arc<Migrator> {
    fn start(
        &self,
        to: &Path,
        policy: MigrationPolicy,
    ) -> Result<MigrationStatus, MigrationRefusal> {
        self.start_thread(to, policy)
    }

    fn status(&self) -> MigrationStatus {
        self.status_now()
    }

    fn cancel(&self) -> Result<MigrationStatus, MigrationRefusal> {
        if !self.active.load(Ordering::Acquire) {
            return Err(MigrationRefusal::Conflict(
                "no migration is under way".into(),
            ));
        }
        if self.switching.load(Ordering::Acquire) {
            return Err(MigrationRefusal::Conflict(
                "too late: the destination has been told to run the VM".into(),
            ));
        }
        self.cancel.store(true, Ordering::Release);
        info!("migration cancel requested");
        Ok(self.status())
    }

    fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }
}
