//! virtio-blk on a raw image file.
//!
//! Requests are served on the device's worker thread with positional reads and writes
//! (`pread`/`pwrite`), in chunks of at most [`CHUNK`] bytes, so a slow disk holds up only
//! its own queue, never a vCPU or another device. An acknowledged flush is an `fdatasync`
//! of the image. Every guest-supplied sector, length and address is checked; a bad
//! request completes with `VIRTIO_BLK_S_IOERR` (or `UNSUPP`) and is counted.

pub mod engine;
mod request;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tracing::{debug, warn};
use virtio_queue::{Queue, QueueT};

use crate::state::{self, DeviceState, QueueSnapshot, StateError};
use crate::worker::{stop_worker, QueueHandler, Worker};
use crate::{
    device_type, features, serve_queue_deferred, ActivateContext, ActivateError, GuestMemory,
    Interrupt, QueueError, Served, VirtioDevice,
};
use engine::{Engine, EngineKind};
use request::{IoRequest, Prepared};

pub use request::{RequestType, Status, CHUNK, SECTOR_SIZE};

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// Most data segments per request the driver may use.
pub const SEG_MAX: u32 = (QUEUE_SIZE as u32) - 2;
/// Most bytes of guest data a disk has in flight: past it, the disk takes no new request
/// until some complete (with SEG_MAX, this bounds what a guest pins of host memory for
/// iovecs and of its own for I/O in flight).
pub const MAX_IN_FLIGHT_BYTES: usize = 64 << 20;
/// Most discard / write-zeroes segments per request.
pub const MAX_DISCARD_SEG: u32 = 32;
/// Length of the serial number returned by GET_ID.
pub const ID_BYTES: usize = 20;

/// Block device feature bits.
pub mod feature {
    /// Maximum number of segments in `seg_max`.
    pub const SEG_MAX: u64 = 1 << 2;
    /// The device is read-only.
    pub const RO: u64 = 1 << 5;
    /// Block size in `blk_size`.
    pub const BLK_SIZE: u64 = 1 << 6;
    /// Cache flush command.
    pub const FLUSH: u64 = 1 << 9;
    /// Discard command.
    pub const DISCARD: u64 = 1 << 13;
    /// Write-zeroes command.
    pub const WRITE_ZEROES: u64 = 1 << 14;
}

/// Errors opening a disk image.
#[derive(Debug, Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process (another VM) uses the image in a way that excludes this use.
    #[error(
        "disk image {path} is in use: {source}; a read-write disk needs the image to \
         itself, a read-only one shares it only with other readers"
    )]
    Locked {
        /// The image.
        path: PathBuf,
        /// Who holds it.
        #[source]
        source: quantix_hostfs::lock::LockError,
    },
    /// The path is not a regular file or block device.
    #[error("disk image {0} is not a regular file or block device")]
    NotAFile(PathBuf),
    /// The image is smaller than one sector.
    #[error("disk image {path} is {size} bytes; a disk needs at least one 512-byte sector")]
    TooSmall {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
}

/// Counters of one disk.
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Read requests completed.
    pub reads: AtomicU64,
    /// Write requests completed.
    pub writes: AtomicU64,
    /// Requests that waited for the disk's rate limit.
    pub throttled: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Bytes read from the image.
    pub read_bytes: AtomicU64,
    /// Bytes written to the image.
    pub write_bytes: AtomicU64,
    /// Requests that failed with an I/O error on the host.
    pub io_errors: AtomicU64,
    /// Malformed requests from the guest (bad sector, length, address or layout).
    pub invalid: AtomicU64,
}

/// A disk: an image file and what the guest is told about it.
pub struct Block {
    name: String,
    file: Arc<File>,
    capacity_sectors: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    counters: Arc<BlockCounters>,
    engine: EngineKind,
    rate_limit: crate::ratelimit::RateLimit,
    worker: Option<Worker<BlockHandler>>,
}

impl Block {
    /// Opens `path` (read-only if `readonly`; `/dev/fd/N` is an inherited descriptor) as
    /// disk `name`, and locks the image for that use (exclusive when read-write, shared when
    /// read-only) for as long as the VMM runs; `id` is its serial (GET_ID).
    pub fn open(name: &str, path: &Path, readonly: bool, id: &str) -> Result<Self, BlockError> {
        use quantix_hostfs::Access;
        let open_err = |source| BlockError::Open {
            path: path.to_path_buf(),
            source,
        };
        let access = if readonly {
            Access::ReadOnly
        } else {
            Access::ReadWrite
        };
        let file = quantix_hostfs::inherit::open(path, access).map_err(open_err)?;
        quantix_hostfs::lock::lock(&file, access).map_err(|source| BlockError::Locked {
            path: path.to_path_buf(),
            source,
        })?;
        let meta = file.metadata().map_err(open_err)?;
        use std::os::unix::fs::FileTypeExt;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            return Err(BlockError::NotAFile(path.to_path_buf()));
        }
        let size = if ft.is_block_device() {
            use std::io::Seek;
            (&file).seek(std::io::SeekFrom::End(0)).map_err(open_err)?
        } else {
            meta.len()
        };
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall {
                path: path.to_path_buf(),
                size,
            });
        }
        if !size.is_multiple_of(SECTOR_SIZE) {
            warn!(
                disk = name,
                size, "image size is not a multiple of 512; the tail is not visible to the guest"
            );
        }
        let capacity_sectors = size / SECTOR_SIZE;
        let mut serial = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Self {
            name: name.to_string(),
            file: Arc::new(file),
            capacity_sectors,
            readonly,
            id: serial,
            config: config_space(capacity_sectors),
            counters: Arc::default(),
            engine: EngineKind::IoUring,
            rate_limit: Default::default(),
            worker: None,
        })
    }

    /// Limits the guest's I/O on this disk (bytes and requests per second, with bursts).
    pub fn with_rate_limit(mut self, limit: crate::ratelimit::RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// Chooses the I/O engine (io_uring by default, falling back to threads when the host
    /// has no io_uring).
    pub fn with_engine(mut self, engine: EngineKind) -> Self {
        self.engine = engine;
        self
    }

    /// Its counters.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.capacity_sectors
    }
}

/// One request through the asynchronous path, run to its end on this thread (the fuzz
/// targets and tests): prepare, move the data with the engine's blocking call, complete.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_execute(
    disk: &request::Disk,
    mem: &GuestMemory,
    chain: virtio_queue::DescriptorChain<&GuestMemory>,
) -> u32 {
    match disk.prepare(mem, chain) {
        Prepared::Done(used) => used,
        Prepared::Io(mut req) => {
            let outcome = loop {
                let n = engine::run_blocking(&disk.file, &req.job);
                match req.next(n) {
                    request::Next::Submit => continue,
                    request::Next::Done(outcome) => break outcome,
                }
            };
            disk.complete(mem, &req, outcome)
        }
    }
}

/// A disk for the fuzz targets: `file` of `sectors` sectors, with a fixed serial.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn fuzz_disk(file: File, sectors: u64, readonly: bool) -> request::Disk {
    request::Disk {
        file: Arc::new(file),
        capacity_sectors: sectors,
        readonly,
        id: *b"fuzz-disk\0\0\0\0\0\0\0\0\0\0\0",
        counters: Arc::default(),
        write_failed: Default::default(),
    }
}

/// `struct virtio_blk_config` (virtio 1.2, 5.2.4), 60 bytes.
fn config_space(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c[34..36].copy_from_slice(&1u16.to_le_bytes()); // num_queues
    let max_sectors = u32::MAX / SECTOR_SIZE as u32;
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl crate::CounterSet for BlockCounters {
    fn sample(&self) -> Vec<(&'static str, u64)> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("reads", load(&self.reads)),
            ("writes", load(&self.writes)),
            ("flushes", load(&self.flushes)),
            ("read_bytes", load(&self.read_bytes)),
            ("write_bytes", load(&self.write_bytes)),
            ("io_errors", load(&self.io_errors)),
            ("invalid", load(&self.invalid)),
            ("throttled", load(&self.throttled)),
        ]
    }
}

impl VirtioDevice for Block {
    fn metrics(&self) -> Arc<dyn crate::CounterSet> {
        self.counters.clone()
    }
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }
    fn name(&self) -> &str {
        &self.name
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let common = features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | feature::SEG_MAX
            | feature::BLK_SIZE
            | feature::FLUSH;
        if self.readonly {
            common | feature::RO
        } else {
            common | feature::DISCARD | feature::WRITE_ZEROES
        }
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queue = ctx.take_ready_queue(0)?;
        let engine = Engine::new(self.file.clone(), u32::from(queue.size()), self.engine)?;
        tracing::info!(disk = %self.name, engine = engine.kind().name(), "disk I/O engine");
        let completion_fd = engine.completion_fd();
        let handler = BlockHandler {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            disk: request::Disk {
                file: self.file.clone(),
                capacity_sectors: self.capacity_sectors,
                readonly: self.readonly,
                id: self.id,
                counters: self.counters.clone(),
                write_failed: Default::default(),
            },
            in_flight: Slots::default(),
            engine,
            completions: Vec::new(),
            name: self.name.clone(),
            limiter: if self.rate_limit.is_limited() {
                Some(crate::ratelimit::RateLimiter::new(self.rate_limit)?)
            } else {
                None
            },
            counters: self.counters.clone(),
        };
        // Host events: 0 the engine's completions, 1 the rate limiter's timer.
        let mut fds = vec![completion_fd];
        fds.extend(handler.limiter.as_ref().map(|l| l.fd()));
        self.worker = Some(Worker::spawn_with_fds(
            format!("virtio-{}", self.name),
            ctx.queue_evts,
            &fds,
            handler,
        )?);
        Ok(())
    }
    fn reset(&mut self) {
        let _ = stop_worker(&mut self.worker, &self.name);
    }
    fn pause(&mut self) -> Result<DeviceState, StateError> {
        let mut queues = Vec::new();
        if let Some(mut h) = stop_worker(&mut self.worker, &self.name)? {
            // Complete what is in flight, so that the snapshot holds no half-done request.
            h.drain();
            queues.push((0, QueueSnapshot::of(&h.queue)));
        }
        Ok(DeviceState {
            queues,
            device: state::to_value(&BlockState {
                capacity_sectors: self.capacity_sectors,
                readonly: self.readonly,
            }),
        })
    }
    fn restore(&mut self, saved: &serde_json::Value) -> Result<(), StateError> {
        let saved: BlockState = state::from_value(&self.name, saved)?;
        if saved.capacity_sectors != self.capacity_sectors || saved.readonly != self.readonly {
            return Err(StateError::Mismatch(format!(
                "{}: saved with {} sectors{}, the image now has {} sectors{}",
                self.name,
                saved.capacity_sectors,
                if saved.readonly { " read-only" } else { "" },
                self.capacity_sectors,
                if self.readonly { " read-only" } else { "" },
            )));
        }
        Ok(())
    }
}

/// A disk's own saved state: what the guest was told, which the image must still match.
#[derive(serde::Serialize, serde::Deserialize)]
struct BlockState {
    capacity_sectors: u64,
    readonly: bool,
}

/// Requests in flight on the engine, indexed by token.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<(u16, IoRequest)>>,
    free: Vec<usize>,
    used: usize,
    /// Data bytes of the requests in the slots.
    bytes: usize,
}

impl Slots {
    fn insert(&mut self, head: u16, req: IoRequest) -> usize {
        self.used += 1;
        self.bytes += req.len;
        match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some((head, req));
                i
            }
            None => {
                self.slots.push(Some((head, req)));
                self.slots.len() - 1
            }
        }
    }
    fn get_mut(&mut self, token: u64) -> Option<&mut (u16, IoRequest)> {
        self.slots.get_mut(usize::try_from(token).ok()?)?.as_mut()
    }
    fn remove(&mut self, token: u64) -> Option<(u16, IoRequest)> {
        let i = usize::try_from(token).ok()?;
        let entry = self.slots.get_mut(i)?.take()?;
        self.free.push(i);
        self.used -= 1;
        self.bytes = self.bytes.saturating_sub(entry.1.len);
        Some(entry)
    }
}

struct BlockHandler {
    // First, so dropped first: the engine's drop waits for every operation in flight, so
    // no I/O outlives the requests' iovecs or touches guest memory after a reset.
    engine: Engine,
    mem: Arc<GuestMemory>,
    queue: Queue,
    interrupt: Arc<Interrupt>,
    disk: request::Disk,
    in_flight: Slots,
    completions: Vec<(u64, i32)>,
    name: String,
    /// The disk's rate limit, if it has one.
    limiter: Option<crate::ratelimit::RateLimiter>,
    counters: Arc<BlockCounters>,
}

impl BlockHandler {
    /// Starts every request the driver made available (up to the in-flight limit).
    fn process_queue(&mut self) -> Result<(), QueueError> {
        let limit = 2 * usize::from(self.queue.size());
        let (mem, disk, slots, engine, limiter, counters) = (
            self.mem.as_ref(),
            &self.disk,
            &mut self.in_flight,
            &mut self.engine,
            &mut self.limiter,
            &self.counters,
        );
        serve_queue_deferred(&mut self.queue, mem, &self.interrupt, |chain| {
            if slots.used >= limit || slots.bytes >= MAX_IN_FLIGHT_BYTES {
                return Served::Busy;
            }
            if let Some(l) = limiter.as_mut() {
                // The request's size from its descriptors (data plus a few header bytes:
                // close enough for a budget of bytes per second).
                let bytes: u64 = chain
                    .clone()
                    .take(SEG_MAX as usize + 2)
                    .map(|d| u64::from(d.len()))
                    .sum();
                if !l.consume(bytes) {
                    counters.throttled.fetch_add(1, Ordering::Relaxed);
                    return Served::Busy;
                }
            }
            let head = chain.head_index();
            match disk.prepare(mem, chain) {
                Prepared::Done(used) => Served::Done(used),
                Prepared::Io(req) => {
                    let token = slots.insert(head, req);
                    let Some((_, req)) = slots.get_mut(token as u64) else {
                        return Served::Started;
                    };
                    match engine.submit(token as u64, &req.job) {
                        Ok(()) => Served::Started,
                        Err(e) => {
                            let used = disk.complete(mem, req, Err(e));
                            slots.remove(token as u64);
                            Served::Done(used)
                        }
                    }
                }
            }
        })?;
        if let Err(e) = self.engine.flush_submissions() {
            warn!(disk = %self.name, error = %e, "submitting disk I/O failed");
        }
        Ok(())
    }

    /// Completes what the engine finished; resubmits the rest of a short transfer.
    fn reap(&mut self) -> Result<(), QueueError> {
        self.engine.reap(&mut self.completions);
        let mut completed = false;
        for (token, result) in std::mem::take(&mut self.completions) {
            let Some((_, req)) = self.in_flight.get_mut(token) else {
                warn!(disk = %self.name, token, "completion for no request");
                continue;
            };
            let outcome = match req.next(result) {
                request::Next::Submit => match self.engine.submit(token, &req.job) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                request::Next::Done(outcome) => outcome,
            };
            if let Some((head, req)) = self.in_flight.remove(token) {
                let used = self.disk.complete(&self.mem, &req, outcome);
                self.queue.add_used(self.mem.as_ref(), head, used)?;
                completed = true;
            }
        }
        if let Err(e) = self.engine.flush_submissions() {
            warn!(disk = %self.name, error = %e, "submitting disk I/O failed");
        }
        if completed && self.queue.needs_notification(self.mem.as_ref())? {
            self.interrupt.signal_used();
        }
        Ok(())
    }

    /// Waits for every request in flight and completes it (a pause for a snapshot).
    fn drain(&mut self) {
        while self.in_flight.used > 0 {
            let mut poll = libc::pollfd {
                fd: self.engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own; a bounded wait, the loop checks again.
            unsafe { libc::poll(&mut poll, 1, 100) };
            if let Err(e) = self.reap() {
                warn!(disk = %self.name, error = %e, "completing requests for a pause failed");
                return;
            }
        }
    }
}

impl QueueHandler for BlockHandler {
    fn process(&mut self, _index: usize) -> Result<(), QueueError> {
        self.process_queue()
    }

    fn host_event(&mut self, index: usize) -> Result<(), QueueError> {
        if index == 1 {
            // The rate limiter's timer: the buckets refilled.
            if let Some(l) = self.limiter.as_mut() {
                l.on_timer();
            }
        }
        self.reap()?;
        // Requests refused at the in-flight limit can start now.
        self.process_queue()
    }

    fn host_event_while_broken(&mut self, _index: usize) {
        // Completions are still taken, so that no I/O is left behind.
        if let Err(e) = self.reap() {
            debug!(disk = %self.name, error = %e, "completions of a broken disk not returned to the guest");
        }
    }

    fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    fn count_broken(&mut self) {
        self.disk.counters.invalid.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2; // VRING_DESC_F_WRITE
    const REQUESTS: u64 = 24;

    fn header(mem: &GuestMemory, at: u64, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(at)).unwrap();
        mem.write_obj(0u32, GuestAddress(at + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// `REQUESTS` requests of `kind` (0 read, 1 write), request i on sector 8*i with a 4 KiB
    /// buffer at 0x10_0000 + i * 0x1000 and its status at 0x8_0000 + i.
    fn chains(mem: &GuestMemory, vq: &MockSplitQueue<GuestMemory>, kind: u32) {
        let mut descs = Vec::new();
        for i in 0..REQUESTS {
            let hdr = 0x4_0000 + i * 16;
            header(mem, hdr, kind, 8 * i);
            let data_flags = if kind == 0 { WRITE } else { 0 };
            const NEXT: u16 = 1; // VRING_DESC_F_NEXT
            let first = (3 * i) as u16;
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                hdr,
                16,
                NEXT,
                first + 1,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                0x10_0000 + i * 0x1000,
                0x1000,
                data_flags | NEXT,
                first + 2,
            )));
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                0x8_0000 + i,
                1,
                WRITE,
                0,
            )));
        }
        vq.build_multiple_desc_chains(&descs).unwrap();
    }

    fn handler(
        kind: EngineKind,
        mem: &Arc<GuestMemory>,
        queue: Queue,
        file: Arc<File>,
    ) -> BlockHandler {
        BlockHandler {
            engine: Engine::new(file.clone(), 256, kind).unwrap(),
            mem: mem.clone(),
            queue,
            interrupt: Arc::new(Interrupt::new(
                vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            )),
            disk: request::Disk {
                file,
                capacity_sectors: 8 * REQUESTS,
                readonly: false,
                id: [0; ID_BYTES],
                counters: Arc::default(),
                write_failed: Default::default(),
            },
            in_flight: Slots::default(),
            completions: Vec::new(),
            name: "test".into(),
            limiter: None,
            counters: Arc::default(),
        }
    }

    /// An unlinked image of `8 * REQUESTS` sectors.
    fn scratch_image(name: &str) -> File {
        let path = std::env::temp_dir().join(format!("qx-blk-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8 * REQUESTS * 512).unwrap();
        let _ = std::fs::remove_file(&path);
        file
    }

    #[test]
    fn a_rate_limit_holds_requests_in_the_ring_until_its_bucket_refills() {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
        let file = scratch_image("rl");
        let vq = MockSplitQueue::new(mem.as_ref(), 256);
        chains(&mem, &vq, 0);
        let mut h = handler(
            EngineKind::Threads,
            &mem,
            vq.create_queue().unwrap(),
            Arc::new(file),
        );
        // 20 requests a second, 2 at once.
        h.limiter = Some(
            crate::ratelimit::RateLimiter::new(crate::ratelimit::RateLimit {
                ops_per_sec: 20,
                ops_burst: 2,
                ..Default::default()
            })
            .unwrap(),
        );
        let start = std::time::Instant::now();
        h.process(0).unwrap();
        assert_eq!(h.in_flight.used, 2, "the burst, and no more");
        assert!(h.counters.throttled.load(Ordering::Relaxed) >= 1);
        // The rest come through as the timer fires, at about 20 a second.
        let mut done = 0;
        while done < 8 {
            let mut fds = [
                libc::pollfd {
                    fd: h.engine.completion_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: h.limiter.as_ref().unwrap().fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds we own.
            unsafe { libc::poll(fds.as_mut_ptr(), 2, 100) };
            if fds[1].revents != 0 {
                h.host_event(1).unwrap();
            }
            h.host_event(0).unwrap();
            done = vq.used().idx().load();
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "stuck at {done}"
            );
        }
        // 8 requests at 20/s after a burst of 2: at least 0.25 s.
        assert!(
            start.elapsed() >= std::time::Duration::from_millis(250),
            "{:?}",
            start.elapsed()
        );
    }

    /// Serves the queue and the engine's completions until `n` requests are used.
    fn drive(h: &mut BlockHandler, vq: &MockSplitQueue<GuestMemory>, n: u16) {
        h.process(0).unwrap();
        let start = std::time::Instant::now();
        while vq.used().idx().load() < n {
            assert!(start.elapsed().as_secs() < 10, "requests did not complete");
            let mut poll = libc::pollfd {
                fd: h.engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut poll, 1, 100) };
            h.host_event(0).unwrap();
        }
    }

    fn many_requests_in_flight(kind: EngineKind) {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
        let path =
            std::env::temp_dir().join(format!("qx-blk-{}-{}", kind.name(), std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8 * REQUESTS * 512).unwrap();
        let _ = std::fs::remove_file(&path);
        let file = Arc::new(file);

        for i in 0..REQUESTS {
            let fill = vec![i as u8 + 1; 0x1000];
            mem.write_slice(&fill, GuestAddress(0x10_0000 + i * 0x1000))
                .unwrap();
        }
        let vq = MockSplitQueue::new(mem.as_ref(), 256);
        chains(&mem, &vq, 1);
        let mut h = handler(kind, &mem, vq.create_queue().unwrap(), file.clone());
        drive(&mut h, &vq, REQUESTS as u16);
        assert_eq!(h.disk.counters.writes.load(Ordering::Relaxed), REQUESTS);
        assert_eq!(h.in_flight.used, 0);
        for i in 0..REQUESTS {
            assert_eq!(
                mem.read_obj::<u8>(GuestAddress(0x8_0000 + i)).unwrap(),
                0,
                "status {i}"
            );
            let mut sector = [0u8; 4096];
            std::os::unix::fs::FileExt::read_exact_at(&*file, &mut sector, i * 4096).unwrap();
            assert!(sector.iter().all(|&b| b == i as u8 + 1), "image block {i}");
        }

        // Read everything back into zeroed buffers, through a fresh queue.
        mem.write_slice(
            &vec![0u8; 0x1000 * REQUESTS as usize],
            GuestAddress(0x10_0000),
        )
        .unwrap();
        let vq = MockSplitQueue::new(mem.as_ref(), 256);
        chains(&mem, &vq, 0);
        let mut h = handler(kind, &mem, vq.create_queue().unwrap(), file);
        drive(&mut h, &vq, REQUESTS as u16);
        assert_eq!(h.disk.counters.reads.load(Ordering::Relaxed), REQUESTS);
        for i in 0..REQUESTS {
            let mut buf = [0u8; 4096];
            mem.read_slice(&mut buf, GuestAddress(0x10_0000 + i * 0x1000))
                .unwrap();
            assert!(buf.iter().all(|&b| b == i as u8 + 1), "guest buffer {i}");
        }
        // Every used entry carries a read's length: data plus the status byte.
        for i in 0..REQUESTS as u16 {
            assert_eq!(
                vq.used().ring().ref_at(i.into()).unwrap().load().len(),
                0x1001
            );
        }
    }

    #[test]
    fn io_uring_serves_many_requests_in_flight() {
        many_requests_in_flight(EngineKind::IoUring);
    }

    #[test]
    fn thread_pool_serves_many_requests_in_flight() {
        many_requests_in_flight(EngineKind::Threads);
    }

    /// A pause completes every request in flight before the queue's state is taken.
    #[test]
    fn drain_completes_everything_in_flight() {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap());
        let file = scratch_image("drain");
        let vq = MockSplitQueue::new(mem.as_ref(), 256);
        chains(&mem, &vq, 1);
        let mut h = handler(
            EngineKind::IoUring,
            &mem,
            vq.create_queue().unwrap(),
            Arc::new(file),
        );
        h.process(0).unwrap(); // submits, does not wait
        h.drain();
        assert_eq!(h.in_flight.used, 0);
        assert_eq!(vq.used().idx().load(), REQUESTS as u16);
        let snap = QueueSnapshot::of(&h.queue);
        assert_eq!(
            (snap.next_avail, snap.next_used),
            (REQUESTS as u16, REQUESTS as u16)
        );
    }
}
