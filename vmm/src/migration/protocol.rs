//! The migration stream between two quantix-vmm processes (docs/migration.md): framed
//! messages, each a 16-byte header (magic, kind, body length) and a body whose size is
//! capped per kind before anything is read. The peer is untrusted: every length, count
//! and address is checked here or by the receiver before it is used.

use std::io::{self, Read, Write};
use std::os::fd::RawFd;
use std::os::unix::net::UnixStream;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use vm_memory::GuestAddress;

use crate::snapshot::{MemoryRegion, PAGE_SIZE};

/// `QXMG`, little-endian, at the start of every header.
pub const MAGIC: u32 = u32::from_le_bytes(*b"QXMG");
/// The protocol version this build speaks (in [`Hello`]); a destination refuses another.
pub const VERSION: u32 = 1;
/// Largest body of a JSON message (hello, replies).
pub const MAX_JSON_BYTES: u64 = 1 << 20;
/// Largest state body (the snapshot state file's own cap).
pub const MAX_STATE_BYTES: u64 = crate::snapshot::file::MAX_STATE_BYTES;
/// Most page data in one memory batch.
pub const MAX_BATCH_DATA: u64 = 4 << 20;
/// Most ranges in one memory batch.
pub const MAX_BATCH_RANGES: u32 = 1024;
/// A range's header in a batch: address, pages, flags.
const RANGE_BYTES: u64 = 16;
/// A batch's header: range count, reserved.
const BATCH_HEADER: u64 = 8;
/// Range flag: the pages are zero; no data follows for them.
const FLAG_ZERO: u32 = 1;

/// Why the stream failed.
#[derive(Debug, Error)]
pub enum ProtocolError {
    /// The connection failed or closed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The peer sent something this protocol does not allow.
    #[error("bad migration stream: {0}")]
    Bad(String),
}

fn bad(why: impl Into<String>) -> ProtocolError {
    ProtocolError::Bad(why.into())
}

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// Source → destination: the VM to build ([`Hello`]).
    Hello = 1,
    /// Destination → source: built, paused, waiting for memory.
    Ready = 2,
    /// Source → destination: pages ([`Batch`]).
    Memory = 3,
    /// Source → destination: the saved state of every vCPU and device (a snapshot state
    /// body); the source is paused.
    State = 4,
    /// Destination → source: the state is loaded; it runs on [`Kind::Go`].
    Loaded = 5,
    /// Source → destination: run. The source never runs the VM again after sending it.
    Go = 6,
    /// Destination → source: the guest runs here.
    Running = 7,
    /// Either way: give up, with the reason (UTF-8 text).
    Abandon = 8,
    /// Source → destination, right after a hello with [`MemoryTransfer::Fd`]: no body;
    /// the guest memory's memfd rides along (`SCM_RIGHTS`).
    MemoryFd = 9,
    /// Source → destination, paused, before the state: the switch is post-copy; the body
    /// is one bitmap per region (little-endian u64 words, bit `i` of word `w`: page
    /// `64 w + i`) of the pages the destination does not have yet.
    PostCopy = 10,
    /// Destination → source, during post-copy: the guest touched this page (u64 guest
    /// address); send it first.
    PageRequest = 11,
    /// Source → destination, during post-copy: every page is sent.
    Complete = 12,
}

impl Kind {
    fn from_u32(v: u32) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Ready,
            3 => Kind::Memory,
            4 => Kind::State,
            5 => Kind::Loaded,
            6 => Kind::Go,
            7 => Kind::Running,
            8 => Kind::Abandon,
            9 => Kind::MemoryFd,
            10 => Kind::PostCopy,
            11 => Kind::PageRequest,
            12 => Kind::Complete,
            _ => return None,
        })
    }

    /// The largest body a message of this kind may have.
    fn cap(self) -> u64 {
        match self {
            Kind::Memory => {
                BATCH_HEADER + u64::from(MAX_BATCH_RANGES) * RANGE_BYTES + MAX_BATCH_DATA
            }
            Kind::State | Kind::PostCopy => MAX_STATE_BYTES,
            _ => MAX_JSON_BYTES,
        }
    }
}

/// How the guest's memory reaches the destination.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryTransfer {
    /// Copied: pre-copy rounds, then the last dirty pages.
    #[default]
    Copy,
    /// Handed over: the source's memfd, mapped shared by the destination (both on one
    /// host); nothing is copied.
    Fd,
}

/// The first message: what the destination builds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`VERSION`] of the source.
    pub version: u32,
    /// The source VMM (`quantix-vmm 0.1.0`).
    pub written_by: String,
    /// The VM's configuration, as the source runs it.
    pub config: quantix_vmm_api::VmConfig,
    /// Guest RAM, in guest-address order (`file_offset`: the offset in the memfd).
    pub regions: Vec<MemoryRegion>,
    /// How the memory comes.
    #[serde(default)]
    pub memory: MemoryTransfer,
}

/// The destination's report that the guest runs.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Running {
    /// From receiving the state to resuming the vCPUs, on the destination's clock, µs.
    pub load_us: u64,
}

/// One run of pages in a memory batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchRange {
    /// Guest-physical address of the first page.
    pub addr: u64,
    /// 4 KiB pages.
    pub pages: u32,
    /// The pages are zero (no data on the wire).
    pub zero: bool,
}

/// A received memory batch: ranges, and the data of the non-zero ones back to back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Batch {
    /// In stream order.
    pub ranges: Vec<BatchRange>,
    /// The non-zero ranges' pages, in order.
    pub data: Vec<u8>,
}

impl Batch {
    /// Each range with its data (`None` for a zero range).
    pub fn pieces(&self) -> impl Iterator<Item = (BatchRange, Option<&[u8]>)> {
        let mut at = 0usize;
        self.ranges.iter().map(move |r| {
            if r.zero {
                (*r, None)
            } else {
                let len = r.pages as usize * PAGE_SIZE as usize;
                let piece = &self.data[at..at + len];
                at += len;
                (*r, Some(piece))
            }
        })
    }
}

/// A received message.
#[derive(Debug)]
pub enum Message {
    /// See [`Kind::Hello`].
    Hello(Box<Hello>),
    /// See [`Kind::Ready`].
    Ready,
    /// See [`Kind::Memory`].
    Memory(Batch),
    /// See [`Kind::State`]: the state body, parsed and checked by the receiver.
    State(Vec<u8>),
    /// See [`Kind::Loaded`].
    Loaded,
    /// See [`Kind::Go`].
    Go,
    /// See [`Kind::Running`].
    Running(Running),
    /// See [`Kind::Abandon`].
    Abandon(String),
    /// See [`Kind::MemoryFd`] (read by [`receive`] only to refuse it out of place: its
    /// descriptor comes with [`receive_memory_fd`]).
    MemoryFd,
    /// See [`Kind::PostCopy`]: one bitmap per region, each of the region's page count.
    PostCopy(Vec<Vec<u64>>),
    /// See [`Kind::PageRequest`]: a page's guest address, inside guest RAM.
    PageRequest(u64),
    /// See [`Kind::Complete`].
    Complete,
}

impl Message {
    /// The message's kind, for "expected X, got Y" errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Ready => "ready",
            Message::Memory(_) => "memory",
            Message::State(_) => "state",
            Message::Loaded => "loaded",
            Message::Go => "go",
            Message::Running(_) => "running",
            Message::Abandon(_) => "abandon",
            Message::MemoryFd => "memory-fd",
            Message::PostCopy(_) => "post-copy",
            Message::PageRequest(_) => "page-request",
            Message::Complete => "complete",
        }
    }
}

fn header(kind: Kind, len: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[4..8].copy_from_slice(&(kind as u32).to_le_bytes());
    h[8..16].copy_from_slice(&len.to_le_bytes());
    h
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> ProtocolError {
    move |source| ProtocolError::Io { what, source }
}

/// Writes a message with `body`.
pub fn send(w: &mut impl Write, kind: Kind, body: &[u8]) -> Result<(), ProtocolError> {
    if body.len() as u64 > kind.cap() {
        return Err(bad(format!(
            "a {kind:?} message of {} bytes is over its cap of {}",
            body.len(),
            kind.cap()
        )));
    }
    w.write_all(&header(kind, body.len() as u64))
        .and_then(|()| w.write_all(body))
        .and_then(|()| w.flush())
        .map_err(io_err("sending to the peer"))
}

/// Writes a message whose body is `value` as JSON.
pub fn send_json<T: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    value: &T,
) -> Result<(), ProtocolError> {
    let body = serde_json::to_vec(value).map_err(|e| bad(format!("encoding {kind:?}: {e}")))?;
    send(w, kind, &body)
}

/// Builds memory batches for the wire: ranges are added with their pages' bytes (or as
/// zero), and [`BatchWriter::flush`] sends what was gathered.
#[derive(Debug, Default)]
pub struct BatchWriter {
    ranges: Vec<BatchRange>,
    data: Vec<u8>,
}

impl BatchWriter {
    /// Whether adding `pages` of data would overflow the batch.
    pub fn full_for(&self, pages: u32, zero: bool) -> bool {
        let data = if zero {
            0
        } else {
            u64::from(pages) * PAGE_SIZE
        };
        self.ranges.len() as u32 >= MAX_BATCH_RANGES
            || self.data.len() as u64 + data > MAX_BATCH_DATA
    }

    /// Adds a range; `data` is its pages (empty for a zero range). The caller checks
    /// [`BatchWriter::full_for`] first and keeps a range within [`MAX_BATCH_DATA`].
    pub fn push(&mut self, addr: u64, pages: u32, data: Option<&[u8]>) {
        // A zero run that follows a zero run extends it.
        if let (None, Some(last)) = (data, self.ranges.last_mut()) {
            if last.zero && last.addr + u64::from(last.pages) * PAGE_SIZE == addr {
                last.pages += pages;
                return;
            }
        }
        self.ranges.push(BatchRange {
            addr,
            pages,
            zero: data.is_none(),
        });
        if let Some(d) = data {
            self.data.extend_from_slice(d);
        }
    }

    /// Whether nothing was added since the last flush.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Sends the batch (if any) and starts a new one; returns the bytes put on the wire.
    pub fn flush(&mut self, w: &mut impl Write) -> Result<u64, ProtocolError> {
        if self.ranges.is_empty() {
            return Ok(0);
        }
        let len = BATCH_HEADER + self.ranges.len() as u64 * RANGE_BYTES + self.data.len() as u64;
        let mut head = Vec::with_capacity(16 + len as usize - self.data.len());
        head.extend_from_slice(&header(Kind::Memory, len));
        head.extend_from_slice(&(self.ranges.len() as u32).to_le_bytes());
        head.extend_from_slice(&0u32.to_le_bytes());
        for r in &self.ranges {
            head.extend_from_slice(&r.addr.to_le_bytes());
            head.extend_from_slice(&r.pages.to_le_bytes());
            head.extend_from_slice(&(if r.zero { FLAG_ZERO } else { 0 }).to_le_bytes());
        }
        w.write_all(&head)
            .and_then(|()| w.write_all(&self.data))
            .map_err(io_err("sending memory"))?;
        self.ranges.clear();
        self.data.clear();
        Ok(16 + len)
    }
}

/// Reads one message. `regions` bounds the addresses of a memory batch: every range must
/// lie in one region.
pub fn receive(r: &mut impl Read, regions: &[MemoryRegion]) -> Result<Message, ProtocolError> {
    let mut h = [0u8; 16];
    r.read_exact(&mut h)
        .map_err(io_err("reading from the peer"))?;
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if word(0) != MAGIC {
        return Err(bad(
            "no message header (wrong magic): not a quantix-vmm migration stream",
        ));
    }
    let kind =
        Kind::from_u32(word(4)).ok_or_else(|| bad(format!("unknown message kind {}", word(4))))?;
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&h[8..16]);
    let len = u64::from_le_bytes(len8);
    if len > kind.cap() {
        return Err(bad(format!(
            "a {kind:?} message of {len} bytes is over its cap of {}",
            kind.cap()
        )));
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .map_err(io_err("reading a message body"))?;
    fn json<T: serde::de::DeserializeOwned>(kind: Kind, body: &[u8]) -> Result<T, ProtocolError> {
        serde_json::from_slice(body).map_err(|e| bad(format!("{kind:?}: {e}")))
    }
    Ok(match kind {
        Kind::Hello => Message::Hello(Box::new(json(kind, &body)?)),
        Kind::Ready => Message::Ready,
        Kind::Memory => Message::Memory(parse_batch(&body, regions)?),
        Kind::State => Message::State(body),
        Kind::Loaded => Message::Loaded,
        Kind::Go => Message::Go,
        Kind::Running => Message::Running(json(kind, &body)?),
        Kind::Abandon => Message::Abandon(String::from_utf8_lossy(&body).into_owned()),
        Kind::MemoryFd => Message::MemoryFd,
        Kind::PostCopy => Message::PostCopy(parse_bitmaps(&body, regions)?),
        Kind::PageRequest => {
            let addr = <[u8; 8]>::try_from(&body[..])
                .map(u64::from_le_bytes)
                .map_err(|_| bad("a page request is not one u64"))?;
            if addr % PAGE_SIZE != 0 || !inside(regions, addr, 1) {
                return Err(bad(format!(
                    "a page request for {addr:#x}, not a page of guest RAM"
                )));
            }
            Message::PageRequest(addr)
        }
        Kind::Complete => Message::Complete,
    })
}

/// The words of a region's page bitmap.
fn words_of(r: &MemoryRegion) -> usize {
    (r.size / PAGE_SIZE).div_ceil(64) as usize
}

/// Encodes one bitmap per region for a [`Kind::PostCopy`] message.
pub fn encode_bitmaps(bitmaps: &[Vec<u64>]) -> Vec<u8> {
    bitmaps
        .iter()
        .flatten()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Parses a [`Kind::PostCopy`] body: exactly one bitmap per region, of its page count,
/// no bit past the region's last page.
pub fn parse_bitmaps(
    body: &[u8],
    regions: &[MemoryRegion],
) -> Result<Vec<Vec<u64>>, ProtocolError> {
    let want: usize = regions.iter().map(words_of).sum();
    if body.len() != want * 8 {
        return Err(bad(format!(
            "a post-copy bitmap of {} bytes for {want} words of guest RAM",
            body.len()
        )));
    }
    let mut words = body
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]));
    let mut out = Vec::with_capacity(regions.len());
    for r in regions {
        let v: Vec<u64> = words.by_ref().take(words_of(r)).collect();
        let pages = r.size / PAGE_SIZE;
        let tail = pages % 64;
        if tail != 0 && v.last().is_some_and(|w| w >> tail != 0) {
            return Err(bad("a post-copy bitmap marks pages past its region"));
        }
        out.push(v);
    }
    Ok(out)
}

/// Sends the guest memory's memfd (a [`Kind::MemoryFd`] message with the descriptor).
pub fn send_memory_fd(conn: &UnixStream, fd: RawFd) -> Result<(), ProtocolError> {
    let h = header(Kind::MemoryFd, 0);
    let sent = conn.send_with_fd(&h[..], fd).map_err(|e| {
        io_err("sending the memory's descriptor")(io::Error::from_raw_os_error(e.errno()))
    })?;
    if sent != h.len() {
        return Err(bad("the memory's descriptor went out with a short header"));
    }
    Ok(())
}

/// Receives the [`Kind::MemoryFd`] message and its descriptor (nothing else is allowed
/// where it is expected).
pub fn receive_memory_fd(conn: &UnixStream) -> Result<std::fs::File, ProtocolError> {
    let mut h = [0u8; 16];
    let (n, file) = conn.recv_with_fd(&mut h).map_err(|e| {
        io_err("receiving the memory's descriptor")(io::Error::from_raw_os_error(e.errno()))
    })?;
    if n != h.len() || h != header(Kind::MemoryFd, 0) {
        return Err(bad("expected the memory's descriptor message"));
    }
    file.ok_or_else(|| bad("the memory's descriptor message carries no descriptor"))
}

/// Whether `pages` at `addr` lie in one region of `regions`.
fn inside(regions: &[MemoryRegion], addr: u64, pages: u32) -> bool {
    let Some(end) = u64::from(pages)
        .checked_mul(PAGE_SIZE)
        .and_then(|len| addr.checked_add(len))
    else {
        return false;
    };
    regions
        .iter()
        .any(|r| addr >= r.guest_addr && end <= r.guest_addr + r.size)
}

/// Parses and checks a memory batch's body.
pub fn parse_batch(body: &[u8], regions: &[MemoryRegion]) -> Result<Batch, ProtocolError> {
    if (body.len() as u64) < BATCH_HEADER {
        return Err(bad("a memory batch shorter than its header"));
    }
    let word = |i: usize| u32::from_le_bytes([body[i], body[i + 1], body[i + 2], body[i + 3]]);
    let count = word(0);
    if count == 0 || count > MAX_BATCH_RANGES {
        return Err(bad(format!(
            "a memory batch of {count} ranges (1 to {MAX_BATCH_RANGES})"
        )));
    }
    let table_end = BATCH_HEADER + u64::from(count) * RANGE_BYTES;
    if (body.len() as u64) < table_end {
        return Err(bad("a memory batch shorter than its range table"));
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut data_pages = 0u64;
    for i in 0..count as usize {
        let at = BATCH_HEADER as usize + i * RANGE_BYTES as usize;
        let mut a = [0u8; 8];
        a.copy_from_slice(&body[at..at + 8]);
        let addr = u64::from_le_bytes(a);
        let pages = word(at + 8);
        let flags = word(at + 12);
        if flags & !FLAG_ZERO != 0 {
            return Err(bad(format!("range {i}: unknown flags {flags:#x}")));
        }
        if pages == 0 || addr % PAGE_SIZE != 0 || !inside(regions, addr, pages) {
            return Err(bad(format!(
                "range {i}: {pages} pages at {addr:#x} are not whole pages inside guest RAM"
            )));
        }
        let zero = flags & FLAG_ZERO != 0;
        if !zero {
            data_pages += u64::from(pages);
        }
        ranges.push(BatchRange { addr, pages, zero });
    }
    let data_len = body.len() as u64 - table_end;
    if data_pages.checked_mul(PAGE_SIZE) != Some(data_len) {
        return Err(bad(format!(
            "a memory batch announces {data_pages} pages of data and carries {data_len} bytes"
        )));
    }
    Ok(Batch {
        ranges,
        data: body[table_end as usize..].to_vec(),
    })
}

/// The guest address of a range, for writing it.
pub fn addr(r: &BatchRange) -> GuestAddress {
    GuestAddress(r.addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Vec<MemoryRegion> {
        vec![
            MemoryRegion {
                guest_addr: 0,
                size: 1 << 20,
                file_offset: 0,
            },
            MemoryRegion {
                guest_addr: 1 << 32,
                size: 1 << 20,
                file_offset: 1 << 20,
            },
        ]
    }

    #[test]
    fn batches_go_round_trip_and_zero_runs_merge() {
        let mut w = BatchWriter::default();
        let page = vec![7u8; PAGE_SIZE as usize];
        w.push(0x1000, 1, Some(&page));
        w.push(0x2000, 2, None);
        w.push(0x4000, 1, None);
        w.push(1 << 32, 1, Some(&page));
        let mut wire = Vec::new();
        let sent = w.flush(&mut wire).unwrap();
        assert_eq!(sent, wire.len() as u64);
        assert!(w.is_empty());
        let Message::Memory(b) = receive(&mut wire.as_slice(), &regions()).unwrap() else {
            panic!("not a batch")
        };
        assert_eq!(b.ranges.len(), 3, "the two zero runs are one");
        assert_eq!(
            b.ranges[1],
            BatchRange {
                addr: 0x2000,
                pages: 3,
                zero: true
            }
        );
        let pieces: Vec<_> = b.pieces().collect();
        assert_eq!(pieces[0].1, Some(page.as_slice()));
        assert_eq!(pieces[1].1, None);
        assert_eq!(pieces[2].1.map(<[u8]>::len), Some(4096));
    }

    fn batch(ranges: &[(u64, u32, u32)], data: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(ranges.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (a, p, f) in ranges {
            b.extend_from_slice(&a.to_le_bytes());
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&f.to_le_bytes());
        }
        b.extend(std::iter::repeat_n(1u8, data));
        b
    }

    #[test]
    fn a_hostile_batch_is_refused() {
        let r = regions();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![1, 0, 0], "shorter than its header"),
            (batch(&[], 0), "0 ranges"),
            (batch(&[(0x1000, 1, 0)], 100), "carries 100 bytes"),
            (batch(&[(0x1001, 1, 0)], 4096), "whole pages"),
            (batch(&[(0xff000, 2, 0)], 8192), "inside guest RAM"),
            (batch(&[(0x10_0000, 1, 0)], 4096), "inside guest RAM"),
            (batch(&[(u64::MAX - 4095, 1, 0)], 4096), "inside guest RAM"),
            (batch(&[(0x1000, 1, 6)], 0), "unknown flags"),
            (batch(&[(0x1000, u32::MAX, 1)], 0), "inside guest RAM"),
        ];
        for (body, why) in cases {
            let e = parse_batch(&body, &r).unwrap_err().to_string();
            assert!(e.contains(why), "{e} (expected {why})");
        }
        let mut count = batch(&[], 0);
        count[0..4].copy_from_slice(&(MAX_BATCH_RANGES + 1).to_le_bytes());
        assert!(parse_batch(&count, &r)
            .unwrap_err()
            .to_string()
            .contains("ranges"));
    }

    #[test]
    fn post_copy_bitmaps_and_page_requests_are_checked() {
        let r = regions();
        // 256 pages per region: four words each.
        let mut maps = vec![vec![0u64; 4], vec![0u64; 4]];
        maps[0][0] = 0b1010;
        maps[1][3] = 1 << 63;
        let body = encode_bitmaps(&maps);
        assert_eq!(parse_bitmaps(&body, &r).unwrap(), maps);
        assert!(
            parse_bitmaps(&body[..body.len() - 8], &r).is_err(),
            "too short"
        );
        let one = [MemoryRegion {
            guest_addr: 0,
            size: 100 * 4096,
            file_offset: 0,
        }];
        let mut past = vec![vec![0u64; 2]];
        past[0][1] = 1 << 40; // page 104 of a 100-page region
        let e = parse_bitmaps(&encode_bitmaps(&past), &one)
            .unwrap_err()
            .to_string();
        assert!(e.contains("past its region"), "{e}");
        let mut wire = Vec::new();
        send(&mut wire, Kind::PageRequest, &0x2000u64.to_le_bytes()).unwrap();
        assert!(matches!(
            receive(&mut wire.as_slice(), &r).unwrap(),
            Message::PageRequest(0x2000)
        ));
        for bad_addr in [0x2001u64, 0x10_0000, !4095] {
            let mut wire = Vec::new();
            send(&mut wire, Kind::PageRequest, &bad_addr.to_le_bytes()).unwrap();
            let e = receive(&mut wire.as_slice(), &r).unwrap_err().to_string();
            assert!(e.contains("not a page of guest RAM"), "{e}");
        }
        let mut wire = Vec::new();
        send(&mut wire, Kind::PageRequest, &[1, 2, 3]).unwrap();
        assert!(receive(&mut wire.as_slice(), &r).is_err());
    }

    #[test]
    fn headers_are_checked_before_any_body_is_read() {
        let r = regions();
        let mut wire = header(Kind::State, MAX_STATE_BYTES + 1).to_vec();
        let e = receive(&mut wire.as_slice(), &r).unwrap_err().to_string();
        assert!(e.contains("over its cap"), "{e}");
        wire = header(Kind::Hello, 10).to_vec();
        wire[0] = b'X';
        let e = receive(&mut wire.as_slice(), &r).unwrap_err().to_string();
        assert!(e.contains("magic"), "{e}");
        wire = header(Kind::Go, 0).to_vec();
        wire[4] = 99;
        let e = receive(&mut wire.as_slice(), &r).unwrap_err().to_string();
        assert!(e.contains("unknown message kind 99"), "{e}");
        // A body cut short is an I/O error, not a hang.
        wire = header(Kind::Abandon, 10).to_vec();
        wire.extend_from_slice(b"abc");
        assert!(matches!(
            receive(&mut wire.as_slice(), &r),
            Err(ProtocolError::Io { .. })
        ));
        let mut ok = Vec::new();
        send(&mut ok, Kind::Abandon, b"disk missing").unwrap();
        let Message::Abandon(why) = receive(&mut ok.as_slice(), &r).unwrap() else {
            panic!()
        };
        assert_eq!(why, "disk missing");
    }
}
