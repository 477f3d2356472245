//! Block I/O of `qx-io`: throughput/IOPS workloads and the integrity writer/verifier, on a
//! raw block device (in the guest) or an image file (on the host).
//!
//! Queue depth comes from threads: each of `threads` threads keeps one synchronous
//! `pread`/`pwrite` (`O_DIRECT` on a device) in flight, so the device sees up to
//! `threads` requests at once. No io_uring: the guest kernel's io_uring would add nothing
//! the virtio queue does not already see with several threads, and threads keep this
//! std + libc only.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use crate::pattern::{self, Mismatch, SplitMix, BLOCK};

/// Alignment of `O_DIRECT` buffers (covers 512- and 4096-byte logical blocks).
const ALIGN: usize = 4096;
/// Mismatches listed in a verify report (all are counted).
const LISTED: usize = 10;

/// An I/O failure with what was being done.
#[derive(Debug)]
pub struct IoFailure {
    /// What was being done.
    pub context: String,
    /// The error.
    pub source: std::io::Error,
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.context, self.source)
    }
}

impl std::error::Error for IoFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

fn fail(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoFailure {
    let context = context.into();
    move |source| IoFailure { context, source }
}

/// A zeroed, [`ALIGN`]-aligned heap buffer (for `O_DIRECT`).
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: the buffer is exclusively owned heap memory, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `len` bytes (rounded up to at least 1 for the allocator).
    pub fn new(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (at least ALIGN bytes).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let Some(ptr) = std::ptr::NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> std::alloc::Layout {
        let size = len.max(1).div_ceil(ALIGN) * ALIGN;
        std::alloc::Layout::from_size_align(size, ALIGN)
            .unwrap_or_else(|_| std::alloc::handle_alloc_error(std::alloc::Layout::new::<u8>()))
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to at least `len` initialised (zeroed) bytes we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The bytes, mutable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this same layout, freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

/// How a device is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// `O_DIRECT`, failing if the file system refuses it.
    On,
    /// Through the page cache.
    Off,
    /// `O_DIRECT` where possible (a block device), the page cache where not (tmpfs).
    Auto,
}

/// Opens `path` read-write (or read-only) with `direct`; returns the file, whether
/// `O_DIRECT` is in use, and its size in bytes.
pub fn open_device(
    path: &Path,
    write: bool,
    direct: Direct,
) -> Result<(File, bool, u64), IoFailure> {
    let open = |o_direct: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        if o_direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    let what = || format!("opening {}", path.display());
    let (mut file, used) = match direct {
        Direct::On => (open(true).map_err(fail(what()))?, true),
        Direct::Off => (open(false).map_err(fail(what()))?, false),
        Direct::Auto => match open(true) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                (open(false).map_err(fail(what()))?, false)
            }
            Err(e) => return Err(fail(what())(e)),
        },
    };
    // SEEK_END gives the size of block devices and of regular files alike.
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(fail(format!("finding the size of {}", path.display())))?;
    Ok((file, used, size))
}

/// Access pattern of a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Sequential reads (threads share one cursor over the device).
    SeqRead,
    /// Sequential writes.
    SeqWrite,
    /// Uniformly random aligned reads.
    RandRead,
    /// Uniformly random aligned writes.
    RandWrite,
}

impl Access {
    /// `read`, `write`, `randread`, `randwrite` (fio's names).
    pub fn name(self) -> &'static str {
        match self {
            Access::SeqRead => "read",
            Access::SeqWrite => "write",
            Access::RandRead => "randread",
            Access::RandWrite => "randwrite",
        }
    }

    /// Parses [`Access::name`].
    pub fn parse(s: &str) -> Option<Access> {
        [
            Access::SeqRead,
            Access::SeqWrite,
            Access::RandRead,
            Access::RandWrite,
        ]
        .into_iter()
        .find(|a| a.name() == s)
    }

    fn writes(self) -> bool {
        matches!(self, Access::SeqWrite | Access::RandWrite)
    }

    fn random(self) -> bool {
        matches!(self, Access::RandRead | Access::RandWrite)
    }
}

/// One throughput/IOPS workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Access pattern.
    pub access: Access,
    /// Bytes per request (a multiple of 512).
    pub block_size: usize,
    /// Threads, each with one request in flight (the queue depth).
    pub threads: usize,
    /// How long to run.
    pub duration: Duration,
    /// Stop earlier after this many bytes in all (0: no limit).
    pub max_bytes: u64,
    /// Seed of the random offsets.
    pub seed: u64,
}

/// What a workload did.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadResult {
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// From the common start to the last thread's end, s.
    pub secs: f64,
    /// Whether `O_DIRECT` was in use.
    pub direct: bool,
    /// Device size, bytes.
    pub device_bytes: u64,
}

impl WorkloadResult {
    /// Throughput, MB/s (10^6 bytes).
    pub fn mbps(&self) -> f64 {
        if self.secs > 0.0 {
            self.bytes as f64 / 1e6 / self.secs
        } else {
            0.0
        }
    }

    /// Requests per second.
    pub fn iops(&self) -> f64 {
        if self.secs > 0.0 {
            self.ops as f64 / self.secs
        } else {
            0.0
        }
    }
}

/// Runs `w` on `path`.
pub fn run_workload(
    path: &Path,
    w: &Workload,
    direct: Direct,
) -> Result<WorkloadResult, IoFailure> {
    if w.block_size == 0 || !w.block_size.is_multiple_of(512) || w.threads == 0 {
        return Err(IoFailure {
            context: format!(
                "block size {} (a multiple of 512) and threads {} (at least 1)",
                w.block_size, w.threads
            ),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    let (file, used_direct, size) = open_device(path, w.access.writes(), direct)?;
    let slots = size / w.block_size as u64;
    if slots == 0 {
        return Err(IoFailure {
            context: format!("{} is smaller than one block", path.display()),
            source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
        });
    }
    let file = Arc::new(file);
    let cursor = Arc::new(AtomicU64::new(0));
    let moved = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let barrier = Arc::new(Barrier::new(w.threads + 1));
    let first_error: Arc<Mutex<Option<IoFailure>>> = Arc::new(Mutex::new(None));
    let mut handles = Vec::new();
    for t in 0..w.threads {
        let (file, cursor, moved, stop, barrier, first_error) = (
            file.clone(),
            cursor.clone(),
            moved.clone(),
            stop.clone(),
            barrier.clone(),
            first_error.clone(),
        );
        let w = w.clone();
        handles.push(std::thread::spawn(move || -> (u64, Instant) {
            let mut buf = AlignedBuf::new(w.block_size);
            let mut rng = SplitMix::new(w.seed ^ (t as u64).wrapping_mul(0x9e37_79b9));
            if w.access.writes() {
                for chunk in buf.as_mut_slice().chunks_mut(8) {
                    let v = rng.next_u64().to_le_bytes();
                    chunk.copy_from_slice(&v[..chunk.len()]);
                }
            }
            barrier.wait();
            let deadline = Instant::now() + w.duration;
            let mut ops = 0u64;
            loop {
                if stop.load(Ordering::Relaxed) || Instant::now() >= deadline {
                    break;
                }
                if w.max_bytes > 0
                    && moved.fetch_add(w.block_size as u64, Ordering::Relaxed) >= w.max_bytes
                {
                    break;
                }
                let slot = if w.access.random() {
                    rng.below(slots)
                } else {
                    cursor.fetch_add(1, Ordering::Relaxed) % slots
                };
                let offset = slot * w.block_size as u64;
                let r = if w.access.writes() {
                    file.write_all_at(buf.as_slice(), offset)
                } else {
                    file.read_exact_at(buf.as_mut_slice(), offset)
                };
                if let Err(e) = r {
                    stop.store(true, Ordering::Relaxed);
                    let mut slot = first_error.lock().unwrap_or_else(|p| p.into_inner());
                    slot.get_or_insert(IoFailure {
                        context: format!("{} at offset {offset}", w.access.name()),
                        source: e,
                    });
                    break;
                }
                ops += 1;
            }
            (ops, Instant::now())
        }));
    }
    barrier.wait();
    let start = Instant::now();
    let mut ops = 0;
    let mut end = start;
    for h in handles {
        let (n, t) = h.join().map_err(|_| IoFailure {
            context: "a workload thread panicked".into(),
            source: std::io::Error::other("panic"),
        })?;
        ops += n;
        end = end.max(t);
    }
    if let Some(e) = first_error.lock().unwrap_or_else(|p| p.into_inner()).take() {
        return Err(e);
    }
    Ok(WorkloadResult {
        ops,
        bytes: ops * w.block_size as u64,
        secs: (end - start).as_secs_f64(),
        direct: used_direct,
        device_bytes: size,
    })
}

/// Settings of the integrity writer and verifier.
#[derive(Debug, Clone)]
pub struct VerifySpec {
    /// Seed of the pattern and of the order.
    pub seed: u64,
    /// Pass number (a second pass over the same device must replace every block).
    pub pass: u64,
    /// Writer / reader threads.
    pub threads: usize,
    /// Blocks of [`BLOCK`] bytes per request (the order is random at this granularity).
    pub io_blocks: usize,
}

/// What the writer did.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteReport {
    /// Blocks written.
    pub blocks: u64,
    /// Requests made.
    pub requests: u64,
    /// Seconds, including the final `fsync`.
    pub secs: f64,
    /// Whether `O_DIRECT` was in use.
    pub direct: bool,
}

/// What the verifier found.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// Blocks of the device.
    pub blocks: u64,
    /// Blocks that matched the pattern.
    pub verified: u64,
    /// Blocks that did not.
    pub mismatches: u64,
    /// The first few mismatches (block number, what is wrong), in block order.
    pub listed: Vec<(u64, Mismatch)>,
    /// Seconds.
    pub secs: f64,
    /// Whether `O_DIRECT` was in use.
    pub direct: bool,
}

impl VerifyReport {
    /// There were blocks, and every one matched.
    pub fn clean(&self) -> bool {
        self.blocks > 0 && self.mismatches == 0 && self.verified == self.blocks
    }
}

/// The requests of a verify run: (first block, blocks), in the random order of `seed`.
fn chunks(blocks: u64, spec: &VerifySpec) -> Vec<(u64, u64)> {
    let per = spec.io_blocks.max(1) as u64;
    let n = blocks.div_ceil(per);
    pattern::permutation(n, spec.seed ^ spec.pass.rotate_left(17))
        .into_iter()
        .map(|c| (c * per, per.min(blocks - c * per)))
        .collect()
}

/// Runs `work(thread, chunk list)` on `threads` threads, each taking every `threads`-th
/// chunk; returns the first error.
fn on_threads<T: Send + 'static>(
    threads: usize,
    list: Vec<(u64, u64)>,
    work: impl Fn(&[(u64, u64)]) -> Result<T, IoFailure> + Send + Sync + 'static,
) -> Result<Vec<T>, IoFailure> {
    let threads = threads.max(1);
    let work = Arc::new(work);
    let mut handles = Vec::new();
    for t in 0..threads {
        let mine: Vec<(u64, u64)> = list.iter().skip(t).step_by(threads).copied().collect();
        let work = work.clone();
        handles.push(std::thread::spawn(move || work(&mine)));
    }
    let mut out = Vec::new();
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert(IoFailure {
                    context: "a verify thread panicked".into(),
                    source: std::io::Error::other("panic"),
                });
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Writes every block of `path` with the pattern of `spec`, in random order, from
/// `spec.threads` writers, then `fsync`s.
pub fn verify_write(
    path: &Path,
    spec: &VerifySpec,
    direct: Direct,
) -> Result<WriteReport, IoFailure> {
    let start = Instant::now();
    let (file, used_direct, size) = open_device(path, true, direct)?;
    let blocks = size / BLOCK as u64;
    let list = chunks(blocks, spec);
    let requests = list.len() as u64;
    let file = Arc::new(file);
    let f = file.clone();
    let (seed, pass, per) = (spec.seed, spec.pass, spec.io_blocks.max(1));
    on_threads(spec.threads, list, move |mine| {
        let mut buf = AlignedBuf::new(per * BLOCK);
        for &(first, n) in mine {
            let len = n as usize * BLOCK;
            let data = &mut buf.as_mut_slice()[..len];
            for (i, b) in data.chunks_mut(BLOCK).enumerate() {
                pattern::fill_block(b, seed, first + i as u64, pass);
            }
            f.write_all_at(data, first * BLOCK as u64)
                .map_err(fail(format!("writing blocks {first}..{}", first + n)))?;
        }
        Ok(())
    })?;
    file.sync_all()
        .map_err(fail(format!("fsync of {}", path.display())))?;
    Ok(WriteReport {
        blocks,
        requests,
        secs: start.elapsed().as_secs_f64(),
        direct: used_direct,
    })
}

/// Reads every block of `path` back (random order, `spec.threads` readers) and checks
/// it against the pattern of `spec`.
pub fn verify_read(
    path: &Path,
    spec: &VerifySpec,
    direct: Direct,
) -> Result<VerifyReport, IoFailure> {
    let start = Instant::now();
    let (file, used_direct, size) = open_device(path, false, direct)?;
    let blocks = size / BLOCK as u64;
    let list = chunks(blocks, spec);
    let file = Arc::new(file);
    let (seed, pass, per) = (spec.seed, spec.pass, spec.io_blocks.max(1));
    let parts = on_threads(spec.threads, list, move |mine| {
        let mut buf = AlignedBuf::new(per * BLOCK);
        let mut scratch = vec![0u8; BLOCK];
        let (mut ok, mut bad) = (0u64, Vec::new());
        let mut bad_count = 0u64;
        for &(first, n) in mine {
            let len = n as usize * BLOCK;
            let data = &mut buf.as_mut_slice()[..len];
            file.read_exact_at(data, first * BLOCK as u64)
                .map_err(fail(format!("reading blocks {first}..{}", first + n)))?;
            for (i, b) in data.chunks(BLOCK).enumerate() {
                let block = first + i as u64;
                match pattern::check_block(b, &mut scratch, seed, block, pass) {
                    Ok(()) => ok += 1,
                    Err(m) => {
                        bad_count += 1;
                        if bad.len() < LISTED {
                            bad.push((block, m));
                        }
                    }
                }
            }
        }
        Ok((ok, bad_count, bad))
    })?;
    let mut report = VerifyReport {
        blocks,
        verified: 0,
        mismatches: 0,
        listed: Vec::new(),
        secs: 0.0,
        direct: used_direct,
    };
    for (ok, n, bad) in parts {
        report.verified += ok;
        report.mismatches += n;
        report.listed.extend(bad);
    }
    report.listed.sort_by_key(|(b, _)| *b);
    report.listed.truncate(LISTED);
    report.secs = start.elapsed().as_secs_f64();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct TempFile(std::path::PathBuf);
    impl TempFile {
        fn new(name: &str, len: u64) -> Self {
            let p = std::env::temp_dir().join(format!("qx-io-{}-{name}", std::process::id()));
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            TempFile(p)
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn spec(pass: u64) -> VerifySpec {
        VerifySpec {
            seed: 99,
            pass,
            threads: 3,
            io_blocks: 4,
        }
    }

    #[test]
    fn verify_round_trip_then_corruption_is_found() {
        // 37 blocks and a half: the partial block at the end is not part of the device.
        let f = TempFile::new("verify", 37 * BLOCK as u64 + 2048);
        let w = verify_write(&f.0, &spec(1), Direct::Auto).unwrap();
        assert_eq!((w.blocks, w.requests), (37, 10));
        let r = verify_read(&f.0, &spec(1), Direct::Auto).unwrap();
        assert!(r.clean(), "{r:?}");
        assert_eq!((r.blocks, r.verified, r.mismatches), (37, 37, 0));

        // A device smaller than one block verifies nothing, which is not clean.
        let tiny = TempFile::new("tiny", 1000);
        let r = verify_read(&tiny.0, &spec(1), Direct::Auto).unwrap();
        assert_eq!((r.blocks, r.clean()), (0, false));

        // Reading for another pass: every block is stale.
        let r = verify_read(&f.0, &spec(2), Direct::Auto).unwrap();
        assert_eq!((r.verified, r.mismatches), (0, 37));
        assert_eq!(r.listed.len(), LISTED);
        assert_eq!(r.listed[0], (0, Mismatch::OtherPass(1)));

        // One flipped bit in block 20, one block (5) overwritten by block 6's data.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&f.0)
            .unwrap();
        let at = 20 * BLOCK as u64 + 777;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 4], at).unwrap();
        let mut six = vec![0u8; BLOCK];
        file.read_exact_at(&mut six, 6 * BLOCK as u64).unwrap();
        file.write_all_at(&six, 5 * BLOCK as u64).unwrap();
        drop(file);
        let r = verify_read(&f.0, &spec(1), Direct::Auto).unwrap();
        assert!(!r.clean());
        assert_eq!((r.verified, r.mismatches), (35, 2));
        assert_eq!(
            r.listed,
            vec![
                (5, Mismatch::OtherBlock(6)),
                (
                    20,
                    Mismatch::Content {
                        offset: 777,
                        bytes: 1,
                        checksum_ok: false
                    }
                )
            ]
        );

        // A second pass replaces every block.
        verify_write(&f.0, &spec(2), Direct::Auto).unwrap();
        assert!(verify_read(&f.0, &spec(2), Direct::Auto).unwrap().clean());
    }

    #[test]
    fn workloads_count_what_they_move() {
        let f = TempFile::new("workload", 64 * 4096);
        for access in [
            Access::SeqWrite,
            Access::SeqRead,
            Access::RandWrite,
            Access::RandRead,
        ] {
            let w = Workload {
                access,
                block_size: 4096,
                threads: 2,
                duration: Duration::from_secs(5),
                max_bytes: 100 * 4096,
                seed: 1,
            };
            let r = run_workload(&f.0, &w, Direct::Auto).unwrap();
            assert_eq!(r.ops, 100, "{access:?}");
            assert_eq!(r.bytes, 100 * 4096);
            assert_eq!(r.device_bytes, 64 * 4096);
            assert!(r.mbps() > 0.0 && r.iops() > 0.0);
            assert_eq!(Access::parse(access.name()), Some(access));
        }
        let bad = Workload {
            access: Access::SeqRead,
            block_size: 1000,
            threads: 1,
            duration: Duration::from_secs(1),
            max_bytes: 0,
            seed: 1,
        };
        assert!(run_workload(&f.0, &bad, Direct::Auto).is_err());
    }
}
