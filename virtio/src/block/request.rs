//! Parsing and executing one virtio-blk request.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use super::engine::{IoVecs, Job, Op};

use super::{BlockCounters, ID_BYTES, MAX_DISCARD_SEG};
use crate::GuestMemory;

/// Bytes per sector, whatever the image's own block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest piece of a request moved through memory at once.
pub const CHUNK: usize = 1 << 20;

/// Request types (virtio 1.2, 5.2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush the write cache.
    Flush,
    /// Device serial.
    GetId,
    /// Discard sectors.
    Discard,
    /// Write zeroes.
    WriteZeroes,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            11 => RequestType::Discard,
            13 => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Completion status written in the request's last byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    /// Success.
    Ok = 0,
    /// Failure (host I/O error, or a malformed request).
    IoErr = 1,
    /// Request type or flags not supported.
    Unsupp = 2,
}

#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct Header {
    request_type: u32,
    reserved: u32,
    sector: u64,
}
// SAFETY: repr(C) struct of integers without padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for Header {}

#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct DiscardSegment {
    sector: u64,
    num_sectors: u32,
    flags: u32,
}
// SAFETY: repr(C) struct of integers without padding (8 + 4 + 4 bytes).
unsafe impl ByteValued for DiscardSegment {}

const WRITE_ZEROES_UNMAP: u32 = 1;

/// Where a request went.
pub(crate) enum Prepared {
    /// Executed at once; the used length.
    Done(u32),
    /// To run on the I/O engine.
    Io(IoRequest),
}

/// A read, write, flush, discard or write-zeroes on its way through the I/O engine.
pub(crate) struct IoRequest {
    /// What the guest asked for.
    pub request: RequestType,
    /// The current operation; the iovecs of a read or write point into guest memory.
    pub job: Job,
    /// Data bytes the request moves.
    pub len: usize,
    /// Data bytes moved so far (a short transfer is resubmitted for the rest).
    pub moved: usize,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Discard and write-zeroes: the ranges still to do, the current one first.
    fills: VecDeque<Fill>,
    /// A read's guest buffers: the engine writes them through raw pointers, which
    /// vm-memory's dirty bitmap does not see, so they are marked when the read ends.
    reads_into: Vec<(GuestAddress, usize)>,
}

/// What a discard or write-zeroes range needs next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FillStep {
    /// Punch a hole for a discard; advisory: where the file system cannot, it is done.
    Discard,
    /// Punch a hole that must read as zeros (write-zeroes with unmap: the guest lets the
    /// space go); where the file system cannot, zero the range instead.
    Punch,
    /// `FALLOC_FL_ZERO_RANGE`; where the file system cannot, write zeros.
    ZeroRange,
    /// Write zeros (from a static buffer).
    WriteZeros,
}

/// One range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy)]
struct Fill {
    step: FillStep,
    offset: u64,
    len: u64,
}

/// Zeros that write-zeroes writes where the file system cannot zero a range itself.
static ZEROS: [u8; CHUNK] = [0; CHUNK];
/// Zero bytes one write job moves at most (iovecs of [`ZEROS`]).
const ZEROS_PER_JOB: u64 = 16 * CHUNK as u64;

/// What to do after the engine finished the current job.
pub(crate) enum Next {
    /// Submit [`IoRequest::job`] again: it now holds the next operation.
    Submit,
    /// The request is over, with this outcome.
    Done(Result<(), std::io::Error>),
}

impl Fill {
    /// The engine job for this range's current step.
    fn job(&self) -> Job {
        let keep = libc::FALLOC_FL_KEEP_SIZE;
        let (op, iovecs) = match self.step {
            FillStep::Discard | FillStep::Punch => (
                Op::Fallocate {
                    mode: libc::FALLOC_FL_PUNCH_HOLE | keep,
                    len: self.len,
                },
                Vec::new(),
            ),
            FillStep::ZeroRange => (
                Op::Fallocate {
                    mode: libc::FALLOC_FL_ZERO_RANGE | keep,
                    len: self.len,
                },
                Vec::new(),
            ),
            FillStep::WriteZeros => {
                let mut left = self.len.min(ZEROS_PER_JOB);
                let mut iov = Vec::new();
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    // The kernel only reads from it: a write's iovec is never written to.
                    iov.push(libc::iovec {
                        iov_base: ZEROS.as_ptr().cast_mut().cast(),
                        iov_len: n,
                    });
                    left -= n as u64;
                }
                (Op::Write, iov)
            }
        };
        Job {
            op,
            offset: self.offset,
            iovecs: IoVecs(iovecs),
        }
    }
}

impl IoRequest {
    /// Takes the engine's result for the current job (bytes moved, or a negative errno)
    /// and says what comes next.
    pub fn next(&mut self, result: i32) -> Next {
        let Some(fill) = self.fills.front_mut() else {
            return if result < 0 {
                Next::Done(Err(std::io::Error::from_raw_os_error(-result)))
            } else if result == 0 && self.job.op.moves_data() && self.len > self.moved {
                Next::Done(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image ended (was it truncated?)",
                )))
            } else if self.advance(result as usize).is_some() {
                Next::Submit
            } else {
                Next::Done(Ok(()))
            };
        };
        let unsupported = result == -libc::EOPNOTSUPP;
        match fill.step {
            FillStep::WriteZeros if result > 0 => {
                let n = (result as u64).min(fill.len);
                fill.offset += n;
                fill.len -= n;
                if fill.len == 0 {
                    self.fills.pop_front();
                }
            }
            FillStep::WriteZeros if result == 0 => {
                return Next::Done(Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the image ended (was it truncated?)",
                )))
            }
            FillStep::Discard if result >= 0 || unsupported => {
                self.fills.pop_front();
            }
            FillStep::Punch if unsupported => fill.step = FillStep::ZeroRange,
            FillStep::ZeroRange if unsupported => fill.step = FillStep::WriteZeros,
            _ if result >= 0 => {
                self.fills.pop_front();
            }
            _ => return Next::Done(Err(std::io::Error::from_raw_os_error(-result))),
        }
        match self.fills.front() {
            Some(f) => {
                self.job = f.job();
                Next::Submit
            }
            None => Next::Done(Ok(())),
        }
    }

    /// Accounts `n` more bytes moved; returns the job for the rest, or `None` when all
    /// is done.
    fn advance(&mut self, n: usize) -> Option<&Job> {
        self.moved += n;
        if !self.job.op.moves_data() || self.moved >= self.len {
            return None;
        }
        self.job.offset += n as u64;
        let mut skip = n;
        let iov = &mut self.job.iovecs.0;
        while let Some(first) = iov.first_mut() {
            if skip < first.iov_len {
                // SAFETY: stays within the same guest memory slice (skip < its length).
                first.iov_base = unsafe { first.iov_base.cast::<u8>().add(skip) }.cast();
                first.iov_len -= skip;
                break;
            }
            skip -= first.iov_len;
            iov.remove(0);
        }
        Some(&self.job)
    }
}

/// The guest memory pieces of `descs` without the first `front` and last `back` bytes.
fn segments(
    descs: &[(GuestAddress, usize, bool)],
    mut front: usize,
    back: usize,
) -> Option<Vec<(GuestAddress, usize)>> {
    let total: usize = descs.iter().map(|d| d.1).sum();
    let mut keep = total.saturating_sub(front).saturating_sub(back);
    let mut out = Vec::new();
    for &(addr, len, _) in descs {
        if keep == 0 {
            break;
        }
        let skip = front.min(len);
        front -= skip;
        let n = (len - skip).min(keep);
        if n > 0 {
            out.push((addr.checked_add(skip as u64)?, n));
            keep -= n;
        }
    }
    Some(out)
}

/// The image and what requests may do to it.
pub(crate) struct Disk {
    pub file: Arc<File>,
    pub capacity_sectors: u64,
    pub readonly: bool,
    pub id: [u8; ID_BYTES],
    pub counters: Arc<BlockCounters>,
    /// A write or flush failed since the driver activated the device. The kernel may have
    /// dropped the dirty data with the error ("fsyncgate"): a later flush that succeeds
    /// would tell the guest its data is safe when it is not. Every flush fails until the
    /// device is reset (a new activation makes a new `Disk`).
    pub write_failed: std::sync::atomic::AtomicBool,
}

/// Why a request failed, for counting.
enum Failure {
    /// The guest asked for something invalid.
    Invalid,
    /// The host failed.
    Io(std::io::Error),
    /// Not supported.
    Unsupported,
}

impl Disk {
    /// Executes the request in `chain`; returns the bytes written into guest memory
    /// (the used length).
    pub fn execute(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> u32 {
        let (mut reader, mut writer) =
            match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                (Ok(r), Ok(w)) => (r, w),
                _ => {
                    // A buffer outside guest memory: not even the status can be written.
                    self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                    return 0;
                }
            };
        let writable = writer.available_bytes();
        if writable == 0 {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            return 0;
        };
        let status = match reader.read_obj::<Header>() {
            Ok(header) => self.dispatch(header, &mut reader, &mut writer),
            Err(_) => Err(Failure::Invalid),
        };
        let status = match status {
            Ok(()) => Status::Ok,
            Err(Failure::Invalid) => {
                self.counters.invalid.fetch_add(1, Ordering::Relaxed);
                Status::IoErr
            }
            Err(Failure::Io(e)) => {
                quantix_devices::guest_warn!("disk-io-error", error = %e, "disk I/O error");
                // Discard and write-zeroes change the image: a failure counts as a failed
                // write for the flushes after it.
                self.write_failed.store(true, Ordering::Relaxed);
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                Status::IoErr
            }
            Err(Failure::Unsupported) => Status::Unsupp,
        };
        let _ = status_writer.write_all(&[status as u8]);
        (writer.bytes_written() + status_writer.bytes_written()) as u32
    }

    /// Prepares a well-formed read, write or flush for asynchronous execution; executes
    /// anything else (other types, and every malformed request, whose error handling lives
    /// in [`Disk::execute`]) at once.
    pub fn prepare(&self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Prepared {
        // The device advertises SEG_MAX data segments: a longer chain (an indirect table
        // holds up to 65535) is refused before anything is collected from it, so that a
        // guest cannot make the VMM allocate per descriptor.
        let mut count = 0usize;
        let mut last = None;
        for d in chain.clone() {
            count += 1;
            last = Some(d);
        }
        if count > super::SEG_MAX as usize + 2 {
            self.counters.invalid.fetch_add(1, Ordering::Relaxed);
            if let Some(d) = last.filter(|d| d.is_write_only() && d.len() > 0) {
                if let Some(at) = d.addr().checked_add(u64::from(d.len()) - 1) {
                    if mem.write_obj(Status::IoErr as u8, at).is_ok() {
                        return Prepared::Done(1);
                    }
                }
            }
            return Prepared::Done(0);
        }
        match self.prepare_io(mem, chain.clone()) {
            Some(io) => Prepared::Io(io),
            None => Prepared::Done(self.execute(mem, chain)),
        }
    }

    fn prepare_io(
        &self,
        mem: &GuestMemory,
        chain: DescriptorChain<&GuestMemory>,
    ) -> Option<IoRequest> {
        let mut reader = Reader::new(mem, chain.clone()).ok()?;
        let header: Header = reader.read_obj().ok()?;
        let request = RequestType::from(header.request_type);
        let op = match request {
            RequestType::In => Op::Read,
            RequestType::Out if !self.readonly => Op::Write,
            RequestType::Flush if !self.readonly => Op::Flush,
            RequestType::Discard | RequestType::WriteZeroes if !self.readonly => Op::Flush,
            _ => return None,
        };
        // Device-readable descriptors first, then device-writable ones (virtio 2.7.4.2).
        let descs: Vec<(GuestAddress, usize, bool)> = chain
            .map(|d| (d.addr(), d.len() as usize, d.is_write_only()))
            .collect();
        let split = descs.iter().position(|d| d.2).unwrap_or(descs.len());
        let (readable, writable) = descs.split_at(split);
        if writable.iter().any(|d| !d.2) {
            return None;
        }
        let (last_addr, last_len, _) = *writable.iter().rev().find(|d| d.1 > 0)?;
        let status = last_addr.checked_add(last_len as u64 - 1)?;
        mem.get_slice(status, 1).ok()?;
        if matches!(request, RequestType::Discard | RequestType::WriteZeroes) {
            let fills = self.fills(request, &mut reader)?;
            let job = match fills.front() {
                Some(f) => f.job(),
                // Nothing to do (every range empty): a flush-less no-op completes at once.
                None => return None,
            };
            return Some(IoRequest {
                request,
                job,
                len: 0,
                moved: 0,
                status,
                fills,
                reads_into: Vec::new(),
            });
        }
        let segments = match op {
            Op::Read => segments(writable, 0, 1)?,
            Op::Write => segments(readable, std::mem::size_of::<Header>(), 0)?,
            _ => Vec::new(),
        };
        let mut iovecs = Vec::with_capacity(segments.len());
        let mut len = 0usize;
        let reads_into = match op {
            Op::Read => segments.clone(),
            _ => Vec::new(),
        };
        for (addr, n) in segments {
            let slice = mem.get_slice(addr, n).ok()?;
            iovecs.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: n,
            });
            len = len.checked_add(n)?;
        }
        let offset = match op {
            Op::Read | Op::Write => self.range(header.sector, len as u64).ok()?,
            _ => 0,
        };
        Some(IoRequest {
            request,
            job: Job {
                op,
                offset,
                iovecs: IoVecs(iovecs),
            },
            len,
            moved: 0,
            status,
            fills: VecDeque::new(),
            reads_into,
        })
    }

    /// The ranges of a well-formed discard or write-zeroes request (its segments follow
    /// the header in `reader`), or `None` for a malformed one, which [`Disk::execute`]
    /// answers with the right status. Empty ranges are left out.
    fn fills(
        &self,
        request: RequestType,
        reader: &mut crate::ChainReader<'_>,
    ) -> Option<VecDeque<Fill>> {
        let segments = self.discard_segments(request, reader).ok()?;
        Some(
            segments
                .into_iter()
                .filter(|f| f.len > 0)
                .collect::<VecDeque<Fill>>(),
        )
    }

    /// Reads and checks every segment of a discard or write-zeroes request.
    fn discard_segments(
        &self,
        request: RequestType,
        reader: &mut crate::ChainReader<'_>,
    ) -> Result<Vec<Fill>, Failure> {
        let size = std::mem::size_of::<DiscardSegment>();
        let count = reader.available_bytes() / size;
        if count == 0
            || count > MAX_DISCARD_SEG as usize
            || !reader.available_bytes().is_multiple_of(size)
        {
            return Err(Failure::Invalid);
        }
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            let seg: DiscardSegment = reader.read_obj().map_err(|_| Failure::Invalid)?;
            let len = u64::from(seg.num_sectors) * SECTOR_SIZE;
            let offset = self.range(seg.sector, len)?;
            let step = if request == RequestType::Discard {
                if seg.flags != 0 {
                    return Err(Failure::Unsupported);
                }
                FillStep::Discard
            } else if seg.flags & !WRITE_ZEROES_UNMAP != 0 {
                return Err(Failure::Unsupported);
            } else if seg.flags & WRITE_ZEROES_UNMAP != 0 {
                // The guest lets the space go: a hole reads as zeros and frees the host's
                // blocks, where allocating them would fill it.
                FillStep::Punch
            } else {
                FillStep::ZeroRange
            };
            out.push(Fill { step, offset, len });
        }
        Ok(out)
    }

    /// Records a finished asynchronous request and writes its status; returns the used
    /// length. `result` is what the engine returned for the whole request.
    pub fn complete(
        &self,
        mem: &GuestMemory,
        req: &IoRequest,
        result: Result<(), std::io::Error>,
    ) -> u32 {
        // Discard and write-zeroes change the image: a failure counts as a failed write
        // for the flushes after it.
        let changes_image = matches!(
            req.request,
            RequestType::Out | RequestType::Flush | RequestType::Discard | RequestType::WriteZeroes
        );
        if result.is_err() && changes_image && !self.write_failed.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "a disk write or flush failed: every flush fails from now on, until the \
                 guest resets the device"
            );
        }
        let result = match result {
            Ok(())
                if req.request == RequestType::Flush
                    && self.write_failed.load(Ordering::Relaxed) =>
            {
                Err(std::io::Error::other(
                    "an earlier write or flush failed since the last reset",
                ))
            }
            other => other,
        };
        let status = match result {
            Ok(()) => {
                let len = req.len as u64;
                match req.request {
                    RequestType::In => {
                        self.counters.reads.fetch_add(1, Ordering::Relaxed);
                        self.counters.read_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    RequestType::Out => {
                        self.counters.writes.fetch_add(1, Ordering::Relaxed);
                        self.counters.write_bytes.fetch_add(len, Ordering::Relaxed);
                    }
                    RequestType::Flush => {
                        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
                Status::Ok
            }
            Err(e) => {
                quantix_devices::guest_warn!("disk-io-error", error = %e, op = ?req.job.op, offset = req.job.offset, "disk I/O error");
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                Status::IoErr
            }
        };
        // Even a failed read may have filled part of its buffers.
        for (addr, n) in &req.reads_into {
            if let Ok(slice) = mem.get_slice(*addr, *n) {
                vm_memory::bitmap::Bitmap::mark_dirty(slice.bitmap(), 0, *n);
            }
        }
        let _ = mem.write_obj(status as u8, req.status);
        match req.request {
            RequestType::In => req.len as u32 + 1,
            _ => 1,
        }
    }

    /// The byte offset of `sector`, if `[sector, sector + len)` lies within the disk.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Failure> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(Failure::Invalid);
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Failure::Invalid)?;
        let end = offset.checked_add(len).ok_or(Failure::Invalid)?;
        if end > self.capacity_sectors * SECTOR_SIZE {
            return Err(Failure::Invalid);
        }
        Ok(offset)
    }

    fn dispatch(
        &self,
        header: Header,
        reader: &mut crate::ChainReader<'_>,
        writer: &mut crate::ChainWriter<'_>,
    ) -> Result<(), Failure> {
        match RequestType::from(header.request_type) {
            RequestType::In => {
                let len = writer.available_bytes();
                let mut offset = self.range(header.sector, len as u64)?;
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    self.file
                        .read_exact_at(&mut buf[..n], offset)
                        .map_err(Failure::Io)?;
                    writer.write_all(&buf[..n]).map_err(|_| Failure::Invalid)?;
                    offset += n as u64;
                    left -= n;
                }
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .read_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            RequestType::Out => {
                if self.readonly {
                    return Err(Failure::Invalid);
                }
                let len = reader.available_bytes();
                let mut offset = self.range(header.sector, len as u64)?;
                let mut buf = vec![0u8; len.min(CHUNK)];
                let mut left = len;
                while left > 0 {
                    let n = left.min(CHUNK);
                    reader
                        .read_exact(&mut buf[..n])
                        .map_err(|_| Failure::Invalid)?;
                    self.file
                        .write_all_at(&buf[..n], offset)
                        .map_err(Failure::Io)?;
                    offset += n as u64;
                    left -= n;
                }
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .write_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                Ok(())
            }
            RequestType::Flush => {
                if !self.readonly {
                    self.file.sync_data().map_err(Failure::Io)?;
                }
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            RequestType::GetId => {
                let n = writer.available_bytes().min(ID_BYTES);
                writer
                    .write_all(&self.id[..n])
                    .map_err(|_| Failure::Invalid)
            }
            kind @ (RequestType::Discard | RequestType::WriteZeroes) => {
                // Well-formed requests go through the I/O engine (`prepare`); this is the
                // answer to a malformed one (every segment is checked before any is done)
                // and the synchronous reference the tests compare the engine's path with.
                if self.readonly {
                    return Err(Failure::Invalid);
                }
                for fill in self.discard_segments(kind, reader)? {
                    if fill.len == 0 {
                        continue;
                    }
                    match fill.step {
                        FillStep::Discard => self.discard(fill.offset, fill.len)?,
                        FillStep::Punch => self.punch_or_zero(fill.offset, fill.len)?,
                        _ => self.write_zeroes(fill.offset, fill.len)?,
                    }
                }
                Ok(())
            }
            RequestType::Unsupported(_) => Err(Failure::Unsupported),
        }
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on our own open file descriptor with checked offsets.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Discard is advisory: where the file system cannot punch holes, nothing happens.
    fn discard(&self, offset: u64, len: u64) -> Result<(), Failure> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            Err(e) => Err(Failure::Io(e)),
        }
    }

    /// Zeroes a range by punching a hole where the file system can (it reads as zeros),
    /// else as [`Disk::write_zeroes`] does. A block device has no holes: zeroed in place.
    fn punch_or_zero(&self, offset: u64, len: u64) -> Result<(), Failure> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self.write_zeroes(offset, len),
            Err(e) => Err(Failure::Io(e)),
        }
    }

    /// Zeroes a range: in place where the file system can, by writing zeros otherwise.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), Failure> {
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => return Ok(()),
            Err(e) if e.raw_os_error() != Some(libc::EOPNOTSUPP) => return Err(Failure::Io(e)),
            Err(_) => {}
        }
        let zeros = vec![0u8; (len as usize).min(CHUNK)];
        let mut done = 0;
        while done < len {
            let n = ((len - done) as usize).min(CHUNK);
            self.file
                .write_all_at(&zeros[..n], offset + done)
                .map_err(Failure::Io)?;
            done += n as u64;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    fn disk(readonly: bool, sectors: u64) -> (Disk, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("qx-blk-{}-{}", std::process::id(), rand_suffix()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        f.set_len(sectors * SECTOR_SIZE).unwrap();
        let mut id = [0u8; ID_BYTES];
        id[..5].copy_from_slice(b"disk0");
        (
            Disk {
                file: Arc::new(f),
                capacity_sectors: sectors,
                readonly,
                id,
                counters: Arc::default(),
                write_failed: Default::default(),
            },
            path,
        )
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::AtomicU64;
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn header(mem: &GuestMemory, t: u32, sector: u64) {
        mem.write_obj(
            Header {
                request_type: t,
                reserved: 0,
                sector,
            },
            GuestAddress(HDR),
        )
        .unwrap();
    }

    /// Runs a request whose data buffer is `data_len` bytes at DATA (guest-writable when
    /// `data_writable`); returns (used length, status byte).
    fn run(
        disk: &Disk,
        mem: &GuestMemory,
        data_len: u32,
        data_writable: bool,
        data_addr: u64,
    ) -> (u32, u8) {
        let vq = MockSplitQueue::new(mem, 16);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0))];
        if data_len > 0 {
            let flags = if data_writable { WRITE } else { 0 };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                data_addr, data_len, flags, 0,
            )));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            STATUS, 1, WRITE, 0,
        )));
        let chain = vq.build_desc_chain(&descs).unwrap();
        // Both paths must agree: the synchronous one (also the reference for every error)
        // and the asynchronous one that reads and writes go through.
        let shadow = Disk {
            file: disk.file.clone(),
            capacity_sectors: disk.capacity_sectors,
            readonly: disk.readonly,
            id: disk.id,
            counters: Arc::default(), // the test counts the asynchronous pass only
            write_failed: Default::default(),
        };
        let sync = shadow.execute(mem, chain.clone());
        let sync_status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let used = super::super::fuzz_execute(disk, mem, chain);
        let status = mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(
            (sync, sync_status),
            (used, status),
            "sync and async paths agree"
        );
        (used, status)
    }

    #[test]
    fn write_flush_and_read_back() {
        let (d, path) = disk(false, 64);
        let m = mem();
        let pattern: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
        m.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&m, 1, 3);
        assert_eq!(run(&d, &m, 1024, false, DATA), (1, Status::Ok as u8));
        header(&m, 4, 0);
        assert_eq!(run(&d, &m, 0, false, DATA), (1, Status::Ok as u8));
        m.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        header(&m, 0, 3);
        assert_eq!(run(&d, &m, 1024, true, DATA), (1025, Status::Ok as u8));
        let mut back = vec![0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        // And on the host, at sector 3.
        let on_disk = std::fs::read(&path).unwrap();
        assert_eq!(&on_disk[3 * 512..3 * 512 + 1024], &pattern[..]);
        assert_eq!(d.counters.writes.load(Ordering::Relaxed), 1);
        assert_eq!(d.counters.flushes.load(Ordering::Relaxed), 1);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_read_marks_the_guest_pages_it_filled_as_dirty() {
        use vm_memory::GuestMemoryBackend;
        let (d, path) = disk(false, 64);
        let m = mem();
        header(&m, 0, 0);
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 8192, WRITE, 0)),
                RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
            ])
            .unwrap();
        let region = m.iter().next().unwrap();
        let bitmap = std::ops::Deref::deref(region).bitmap();
        bitmap.reset();
        let used = super::super::fuzz_execute(&d, &m, chain);
        assert_eq!(used, 8193);
        for page in [DATA, DATA + 4096, DATA + 8191] {
            assert!(bitmap.is_addr_set(page as usize), "{page:#x} not marked");
        }
        assert!(!bitmap.is_addr_set((DATA + 3 * 4096) as usize));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn out_of_range_misaligned_readonly_and_unknown_requests_fail_cleanly() {
        let (d, path) = disk(false, 8);
        let m = mem();
        // Past the end, straddling the end, sector overflow.
        for sector in [8, 7, u64::MAX / 256] {
            header(&m, 0, sector);
            assert_eq!(
                run(&d, &m, 1024, true, DATA).1,
                Status::IoErr as u8,
                "sector {sector}"
            );
        }
        // Not a multiple of 512.
        header(&m, 1, 0);
        assert_eq!(run(&d, &m, 100, false, DATA).1, Status::IoErr as u8);
        // Unknown type.
        header(&m, 99, 0);
        assert_eq!(run(&d, &m, 0, false, DATA).1, Status::Unsupp as u8);
        assert_eq!(d.counters.invalid.load(Ordering::Relaxed), 4);
        // Read-only disk refuses writes and discards.
        let (ro, ro_path) = disk(true, 8);
        header(&m, 1, 0);
        assert_eq!(run(&ro, &m, 512, false, DATA).1, Status::IoErr as u8);
        assert_eq!(
            std::fs::read(&ro_path).unwrap(),
            vec![0u8; 8 * 512],
            "untouched"
        );
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(ro_path).unwrap();
    }

    #[test]
    fn buffers_outside_guest_memory_or_without_status_are_dropped() {
        let (d, path) = disk(false, 8);
        let m = mem();
        header(&m, 0, 0);
        // Data buffer in unbacked memory (e.g. the MMIO hole).
        let (used, _) = run(&d, &m, 512, true, 0xd000_0000);
        assert_eq!(used, 0);
        // No writable byte at all for the status.
        let vq = MockSplitQueue::new(&m, 16);
        let chain = vq
            .build_desc_chain(&[RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0))])
            .unwrap();
        assert_eq!(d.execute(&m, chain), 0);
        assert_eq!(d.counters.invalid.load(Ordering::Relaxed), 2);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_chain_longer_than_seg_max_is_refused_without_being_collected() {
        let (d, path) = disk(false, 1024);
        let m = mem();
        header(&m, 0, 0); // a read
        let vq = MockSplitQueue::new(&m, 512);
        let data = super::super::SEG_MAX as usize + 1;
        let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0))];
        for i in 0..data {
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                DATA + (i as u64) * 512,
                512,
                WRITE,
                0,
            )));
        }
        descs.push(RawDescriptor::from(SplitDescriptor::new(
            STATUS, 1, WRITE, 0,
        )));
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let chain = vq.build_desc_chain(&descs).unwrap();
        match d.prepare(&m, chain) {
            Prepared::Done(used) => assert_eq!(used, 1),
            Prepared::Io(_) => panic!("a chain of {data} data segments was accepted"),
        }
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            Status::IoErr as u8
        );
        assert_eq!(d.counters.invalid.load(Ordering::Relaxed), 1);
        // SEG_MAX itself is fine.
        let vq = MockSplitQueue::new(&m, 512);
        descs.remove(1);
        let chain = vq.build_desc_chain(&descs).unwrap();
        assert!(matches!(d.prepare(&m, chain), Prepared::Io(_)));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn after_a_failed_write_every_flush_fails_until_reset() {
        let (d, path) = disk(false, 8);
        let m = mem();
        let req = |op| IoRequest {
            request: match op {
                Op::Read => RequestType::In,
                Op::Write => RequestType::Out,
                _ => RequestType::Flush,
            },
            job: Job {
                op,
                offset: 0,
                iovecs: IoVecs(Vec::new()),
            },
            len: 0,
            moved: 0,
            status: GuestAddress(DATA),
            fills: VecDeque::new(),
            reads_into: Vec::new(),
        };
        let status = |m: &GuestMemory| m.read_obj::<u8>(GuestAddress(DATA)).unwrap();
        d.complete(&m, &req(Op::Flush), Ok(()));
        assert_eq!(status(&m), Status::Ok as u8);
        d.complete(
            &m,
            &req(Op::Write),
            Err(std::io::Error::from_raw_os_error(libc::EIO)),
        );
        assert_eq!(status(&m), Status::IoErr as u8);
        // The retried flush succeeds on the host, and is still reported failed.
        for _ in 0..3 {
            d.complete(&m, &req(Op::Flush), Ok(()));
            assert_eq!(status(&m), Status::IoErr as u8);
        }
        // Reads are not affected.
        d.complete(&m, &req(Op::Read), Ok(()));
        assert_eq!(status(&m), Status::Ok as u8);
        // A reset makes a new Disk: flushes work again.
        let (fresh, path2) = disk(false, 8);
        fresh.complete(&m, &req(Op::Flush), Ok(()));
        assert_eq!(status(&m), Status::Ok as u8);
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(path2).unwrap();
    }

    /// A write-zeroes request of one range, as `prepare` makes it.
    fn fill_request(step: FillStep, len: u64) -> IoRequest {
        let fill = Fill {
            step,
            offset: 4096,
            len,
        };
        IoRequest {
            request: RequestType::WriteZeroes,
            job: fill.job(),
            len: 0,
            moved: 0,
            status: GuestAddress(STATUS),
            fills: VecDeque::from([fill]),
            reads_into: Vec::new(),
        }
    }

    #[test]
    fn write_zeroes_falls_back_step_by_step_where_the_file_system_cannot() {
        let unsupported = -libc::EOPNOTSUPP;
        // Punch a hole; not supported: zero the range; not supported: write zeros.
        let mut r = fill_request(FillStep::Punch, 40 << 20);
        assert!(matches!(r.job.op, Op::Fallocate { mode, len: 41943040 }
            if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE));
        assert!(matches!(r.next(unsupported), Next::Submit));
        assert!(matches!(r.job.op, Op::Fallocate { mode, .. }
            if mode == libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE));
        assert!(matches!(r.next(unsupported), Next::Submit));
        assert_eq!(r.job.op, Op::Write);
        let bytes: usize = r.job.iovecs.0.iter().map(|v| v.iov_len).sum();
        assert_eq!(bytes as u64, ZEROS_PER_JOB, "at most 16 MiB per write job");
        assert_eq!(r.job.offset, 4096);
        // A short write continues where it stopped, then the rest, then it is done.
        assert!(matches!(r.next(1 << 20), Next::Submit));
        assert_eq!(r.job.offset, 4096 + (1 << 20));
        assert!(matches!(r.next(ZEROS_PER_JOB as i32), Next::Submit));
        assert!(matches!(r.next(ZEROS_PER_JOB as i32), Next::Submit));
        let rest: usize = r.job.iovecs.0.iter().map(|v| v.iov_len).sum();
        assert_eq!(rest as u64, (40 << 20) - (1 << 20) - 2 * ZEROS_PER_JOB);
        assert!(matches!(r.next(rest as i32), Next::Done(Ok(()))));

        // A discard the file system cannot do is done (it is advisory).
        let mut d = fill_request(FillStep::Discard, 4096);
        assert!(matches!(d.next(unsupported), Next::Done(Ok(()))));
        // Any other error ends the request with it; an image that ends is an error.
        let mut e = fill_request(FillStep::ZeroRange, 4096);
        assert!(
            matches!(e.next(-libc::EIO), Next::Done(Err(err)) if err.raw_os_error() == Some(libc::EIO))
        );
        let mut w = fill_request(FillStep::WriteZeros, 4096);
        assert!(matches!(w.next(0), Next::Done(Err(_))));
        // Success of a fallocate step ends the range.
        let mut ok = fill_request(FillStep::Punch, 4096);
        assert!(matches!(ok.next(0), Next::Done(Ok(()))));
    }

    #[test]
    fn discard_and_write_zeroes_go_through_the_engine() {
        let (d, path) = disk(false, 64);
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        // Two segments: write-zeroes over sectors 2-3, and (with unmap) sectors 8-15.
        d.file.write_all_at(&[9u8; 32 * 512], 0).unwrap();
        let segs = [
            DiscardSegment {
                sector: 2,
                num_sectors: 2,
                flags: 0,
            },
            DiscardSegment {
                sector: 8,
                num_sectors: 8,
                flags: WRITE_ZEROES_UNMAP,
            },
        ];
        m.write_obj(segs[0], GuestAddress(DATA)).unwrap();
        m.write_obj(segs[1], GuestAddress(DATA + 16)).unwrap();
        header(&m, 13, 0);
        let chain = vq
            .build_desc_chain(&[
                RawDescriptor::from(SplitDescriptor::new(HDR, 16, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(DATA, 32, 0, 0)),
                RawDescriptor::from(SplitDescriptor::new(STATUS, 1, WRITE, 0)),
            ])
            .unwrap();
        let Prepared::Io(req) = d.prepare(&m, chain.clone()) else {
            panic!("a well-formed write-zeroes is not run inline");
        };
        assert_eq!(req.fills.len(), 2);
        assert!(matches!(req.job.op, Op::Fallocate { len: 1024, .. }));
        assert_eq!(req.job.offset, 1024);
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        assert_eq!(super::super::fuzz_execute(&d, &m, chain), 1);
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
            Status::Ok as u8
        );
        let mut back = [0xffu8; 32 * 512];
        d.file.read_exact_at(&mut back, 0).unwrap();
        for (i, b) in back.iter().enumerate() {
            let sector = i / 512;
            let zeroed = (2..4).contains(&sector) || (8..16).contains(&sector);
            assert_eq!(*b, if zeroed { 0 } else { 9 }, "byte {i}");
        }
        // A malformed one (bad flags on the second segment) is answered at once, and its
        // first segment is not done.
        d.file.write_all_at(&[9u8; 32 * 512], 0).unwrap();
        let bad = [
            segs[0],
            DiscardSegment {
                flags: 4,
                ..segs[1]
            },
        ];
        m.write_obj(bad[0], GuestAddress(DATA)).unwrap();
        m.write_obj(bad[1], GuestAddress(DATA + 16)).unwrap();
        assert_eq!(run(&d, &m, 32, false, DATA), (1, Status::Unsupp as u8));
        d.file.read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 9), "nothing was zeroed");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn get_id_and_write_zeroes() {
        let (d, path) = disk(false, 8);
        let m = mem();
        header(&m, 8, 0);
        assert_eq!(run(&d, &m, 20, true, DATA), (21, Status::Ok as u8));
        let mut id = [0u8; 5];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk0");
        // Fill sector 1 with ones, then zero it with WRITE_ZEROES.
        d.file.write_all_at(&[1u8; 512], 512).unwrap();
        m.write_obj(
            DiscardSegment {
                sector: 1,
                num_sectors: 1,
                flags: 0,
            },
            GuestAddress(DATA),
        )
        .unwrap();
        header(&m, 13, 0);
        assert_eq!(run(&d, &m, 16, false, DATA).1, Status::Ok as u8);
        let mut s = [0xffu8; 512];
        d.file.read_exact_at(&mut s, 512).unwrap();
        assert_eq!(s, [0u8; 512]);
        // A segment past the end fails.
        m.write_obj(
            DiscardSegment {
                sector: 8,
                num_sectors: 1,
                flags: 0,
            },
            GuestAddress(DATA),
        )
        .unwrap();
        header(&m, 11, 0);
        assert_eq!(run(&d, &m, 16, false, DATA).1, Status::IoErr as u8);
        // WRITE_ZEROES with UNMAP on a written range frees it: the blocks go away and the
        // range reads as zeros.
        use std::os::unix::fs::MetadataExt;
        d.file.write_all_at(&[7u8; 4096], 0).unwrap();
        d.file.sync_all().unwrap();
        let before = d.file.metadata().unwrap().blocks();
        m.write_obj(
            DiscardSegment {
                sector: 0,
                num_sectors: 8,
                flags: WRITE_ZEROES_UNMAP,
            },
            GuestAddress(DATA),
        )
        .unwrap();
        header(&m, 13, 0);
        assert_eq!(run(&d, &m, 16, false, DATA).1, Status::Ok as u8);
        let mut back = [0xffu8; 4096];
        d.file.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, [0u8; 4096]);
        let after = d.file.metadata().unwrap().blocks();
        assert!(
            after < before,
            "a hole was punched: {before} blocks, then {after}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
