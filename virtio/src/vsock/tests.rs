//! The device driven by a fake guest through queues in guest memory, against real
//! Unix sockets on the host.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::CONN_BUF_SIZE;
use super::muxer::{Muxer, FIRST_LOCAL_PORT};
use super::packet::{op, shutdown, Header, HDR_LEN, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};
use super::*;
use crate::worker::{dispatch, Event};

const CID: u64 = 3;
const QSIZE: u16 = 256;
const TX_RING: u64 = 0;
const RX_RING: u64 = 0x1_0000;
const TX_BUFS: u64 = 0x10_0000;
const TX_SLOT: u64 = 0x1_1000;
const RX_BUFS: u64 = 0x100_0000;
const RX_SLOT: u64 = 0x2000;
const RX_DATA: u32 = 4096;
const MEM_SIZE: usize = 0x140_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// A driver's view of one split queue: adds chains, reads used entries.
struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    used_seen: u16,
}

impl Ring {
    fn new(mem: &GuestMemory, base: u64) -> (Ring, Queue) {
        use virtio_queue::QueueT;
        let q16 = u64::from(QSIZE);
        let ring = Ring {
            desc: base,
            avail: base + 16 * q16,
            used: (base + 16 * q16 + 6 + 2 * q16 + 3) & !3,
            next_desc: 0,
            used_seen: 0,
        };
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(ring.desc as u32), Some(0));
        q.set_avail_ring_address(Some(ring.avail as u32), Some(0));
        q.set_used_ring_address(Some(ring.used as u32), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        (ring, q)
    }

    fn avail_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    fn set_avail_idx(&self, mem: &GuestMemory, v: u16) {
        mem.write_obj(v, GuestAddress(self.avail + 2)).unwrap();
    }

    fn push(&mut self, mem: &GuestMemory, descs: &[(u64, u32, u16)]) {
        let head = self.next_desc;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = self.next_desc;
            self.next_desc = (self.next_desc + 1) % QSIZE;
            let (flags, next) = if i + 1 < descs.len() {
                (flags | F_NEXT, self.next_desc)
            } else {
                (flags, 0)
            };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
            mem.write_obj(d, GuestAddress(self.desc + 16 * u64::from(idx)))
                .unwrap();
        }
        let avail = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(avail % QSIZE);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(mem, avail.wrapping_add(1));
    }

    /// Used entries not seen yet: (descriptor head, length).
    fn used(&mut self, mem: &GuestMemory) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = self.used + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A fake guest driver with its device handler.
struct Guest {
    mem: Arc<GuestMemory>,
    tx: Ring,
    rx: Ring,
    h: VsockHandler,
    tx_slot: u64,
    rx_slot: u64,
    /// Rx buffers posted and not used yet, by head descriptor: (header, data) addresses.
    rx_heads: std::collections::HashMap<u32, (u64, u64)>,
}

fn temp_dir() -> PathBuf {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    let d = std::env::temp_dir().join(format!(
        "qx-vsock-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Guest {
    fn new(path: &std::path::Path, listener: Option<UnixListener>) -> Guest {
        let mem = Arc::new(GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let (tx, txq) = Ring::new(&mem, TX_RING);
        let (rx, rxq) = Ring::new(&mem, RX_RING);
        let counters: Arc<VsockCounters> = Arc::default();
        let muxer = Muxer::new(CID, path, listener.map(Arc::new), counters.clone()).unwrap();
        let h = VsockHandler {
            mem: mem.clone(),
            rx: rxq,
            tx: txq,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            muxer,
            counters,
            buf: vec![0u8; MAX_PKT_DATA],
            guest_cid: CID,
            evt: None,
        };
        Guest {
            mem,
            tx,
            rx,
            h,
            tx_slot: 0,
            rx_slot: 0,
            rx_heads: Default::default(),
        }
    }

    fn counters(&self) -> &VsockCounters {
        &self.h.counters
    }

    /// Posts rx buffers (header and data in two descriptors, like Linux) up to `n`.
    fn post_rx(&mut self, n: usize) {
        while self.rx_heads.len() < n {
            let base = RX_BUFS + (self.rx_slot % u64::from(QSIZE / 2)) * RX_SLOT;
            self.rx_slot += 1;
            self.rx_heads
                .insert(u32::from(self.rx.next_desc), (base, base + 0x100));
            self.rx.push(
                &self.mem,
                &[
                    (base, HDR_LEN as u32, F_WRITE),
                    (base + 0x100, RX_DATA, F_WRITE),
                ],
            );
        }
        dispatch(&mut self.h, "vsock", Event::Queue(RX));
    }

    /// Sends a raw chain of (bytes, as one readable descriptor each).
    fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        self.tx.push(&self.mem, descs);
        dispatch(&mut self.h, "vsock", Event::Queue(TX));
        let used = self.tx.used(&self.mem);
        assert!(!self.h.interrupt.needs_reset(), "queue broken");
        assert_eq!(used.len(), 1, "the tx chain is completed");
    }

    fn send(&mut self, hdr: Header, data: &[u8]) {
        let addr = TX_BUFS + (self.tx_slot % 64) * TX_SLOT;
        self.tx_slot += 1;
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(data, GuestAddress(addr + HDR_LEN as u64))
            .unwrap();
        self.send_raw(&[(addr, (HDR_LEN + data.len()) as u32, 0)]);
    }

    /// Packets delivered to the guest since the last call.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        for (head, len) in self.rx.used(&self.mem) {
            let Some((base, data_addr)) = self.rx_heads.remove(&head) else {
                panic!("used head {head} was not posted");
            };
            if len == 0 {
                continue;
            }
            let mut hb = [0u8; HDR_LEN];
            self.mem.read_slice(&mut hb, GuestAddress(base)).unwrap();
            let hdr = Header::parse(&hb);
            assert_eq!(len as usize, HDR_LEN + hdr.len as usize);
            let mut data = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut data, GuestAddress(data_addr))
                .unwrap();
            out.push((hdr, data));
        }
        out
    }

    /// Serves host events and rx buffers until `done` says so (or 10 s pass).
    fn pump<F: FnMut(&mut Guest, Vec<(Header, Vec<u8>)>) -> bool>(&mut self, mut done: F) {
        let start = Instant::now();
        loop {
            self.post_rx(64);
            dispatch(&mut self.h, "vsock", Event::Host(0));
            let pkts = self.received();
            if done(self, pkts) {
                return;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "timed out");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn expect_one(&mut self) -> (Header, Vec<u8>) {
        let mut got = None;
        self.pump(|_, mut pkts| {
            if pkts.is_empty() {
                return false;
            }
            assert_eq!(pkts.len(), 1, "{pkts:?}");
            got = pkts.pop();
            true
        });
        got.unwrap()
    }
}

fn hdr(op_: u16, src_port: u32, dst_port: u32, len: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len,
        type_: TYPE_STREAM,
        op: op_,
        flags: 0,
        buf_alloc: 64 * 1024,
        fwd_cnt: 0,
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn guest_connects_to_a_host_socket_and_bytes_flow_both_ways() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let host = UnixListener::bind(dir.join("v.sock_52")).unwrap();
    let mut g = Guest::new(&path, None);
    g.post_rx(64);
    g.send(hdr(op::REQUEST, 1234, 52, 0), &[]);
    let (resp, _) = g.expect_one();
    assert_eq!(
        (
            resp.op,
            resp.src_port,
            resp.dst_port,
            resp.dst_cid,
            resp.src_cid
        ),
        (op::RESPONSE, 52, 1234, CID, HOST_CID)
    );
    assert_eq!(resp.buf_alloc, CONN_BUF_SIZE);
    let (mut peer, _) = host.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();

    // Guest -> host.
    let up = pattern(200_000, 1);
    let mut fwd_seen = 0u32;
    for chunk in up.chunks(MAX_PKT_DATA / 2) {
        g.send(hdr(op::RW, 1234, 52, chunk.len() as u32), chunk);
    }
    let mut got = vec![0u8; up.len()];
    peer.read_exact(&mut got).unwrap();
    assert_eq!(got, up);

    // Host -> guest: 300 000 bytes through a 64 KiB guest buffer, so the guest must
    // return credit as it consumes.
    let down = pattern(300_000, 7);
    let writer = {
        let mut p = peer.try_clone().unwrap();
        let d = down.clone();
        std::thread::spawn(move || p.write_all(&d).unwrap())
    };
    let mut received = Vec::new();
    g.pump(|g, pkts| {
        for (h, data) in pkts {
            match h.op {
                op::RW => {
                    assert!(data.len() <= RX_DATA as usize);
                    received.extend_from_slice(&data);
                }
                op::CREDIT_UPDATE => fwd_seen = h.fwd_cnt,
                op::CREDIT_REQUEST => {}
                other => panic!("unexpected op {other}"),
            }
        }
        // The guest consumes everything at once and says so.
        let mut u = hdr(op::CREDIT_UPDATE, 1234, 52, 0);
        u.fwd_cnt = received.len() as u32;
        g.send(u, &[]);
        received.len() >= down.len()
    });
    writer.join().unwrap();
    assert_eq!(received, down);
    assert!(fwd_seen <= up.len() as u32);

    // Host half-closes: the guest hears SHUTDOWN(SEND); the guest half-closes: the host
    // reads end of file; both done: RST.
    peer.shutdown(std::net::Shutdown::Write).unwrap();
    let (sd, _) = g.expect_one();
    assert_eq!((sd.op, sd.flags), (op::SHUTDOWN, shutdown::SEND));
    let mut s = hdr(op::SHUTDOWN, 1234, 52, 0);
    s.flags = shutdown::SEND;
    g.send(s, &[]);
    let mut rest = Vec::new();
    assert_eq!(peer.read_to_end(&mut rest).unwrap(), 0);
    let (rst, _) = g.expect_one();
    assert_eq!(rst.op, op::RST);
    assert_eq!(g.h.muxer.connections().count(), 0);
    let c = g.counters();
    assert_eq!(c.invalid_packets.load(Ordering::Relaxed), 0);
    assert_eq!(c.credit_violations.load(Ordering::Relaxed), 0);
    assert_eq!(c.tx_bytes.load(Ordering::Relaxed), up.len() as u64);
    assert_eq!(c.rx_bytes.load(Ordering::Relaxed), down.len() as u64);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_request_without_a_host_socket_is_refused_with_rst() {
    let dir = temp_dir();
    let mut g = Guest::new(&dir.join("v.sock"), None);
    g.post_rx(4);
    g.send(hdr(op::REQUEST, 1234, 99, 0), &[]);
    let (rst, _) = g.expect_one();
    assert_eq!((rst.op, rst.src_port, rst.dst_port), (op::RST, 99, 1234));
    assert_eq!(g.counters().conns_refused.load(Ordering::Relaxed), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_connects_with_a_connect_line_and_gets_ok_with_its_port() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut g = Guest::new(&path, Some(listener));
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Data right behind the line must reach the guest, not be eaten with the line.
    host.write_all(b"CONNECT 52\nearly bytes").unwrap();
    let (req, _) = g.expect_one();
    assert_eq!(
        (req.op, req.src_port, req.dst_port, req.dst_cid),
        (op::REQUEST, FIRST_LOCAL_PORT, 52, CID)
    );
    let mut resp = hdr(op::RESPONSE, 52, FIRST_LOCAL_PORT, 0);
    resp.buf_alloc = 4096;
    g.send(resp, &[]);
    let mut line = [0u8; 14];
    host.read_exact(&mut line).unwrap();
    assert_eq!(&line, format!("OK {FIRST_LOCAL_PORT}\n").as_bytes());
    let (data, bytes) = g.expect_one();
    assert_eq!((data.op, bytes.as_slice()), (op::RW, &b"early bytes"[..]));
    g.send(hdr(op::RW, 52, FIRST_LOCAL_PORT, 5), b"hello");
    let mut five = [0u8; 5];
    host.read_exact(&mut five).unwrap();
    assert_eq!(&five, b"hello");
    // The guest closes: the host sees end of file.
    let mut s = hdr(op::SHUTDOWN, 52, FIRST_LOCAL_PORT, 0);
    s.flags = shutdown::BOTH;
    g.send(s, &[]);
    let (rst, _) = g.expect_one();
    assert_eq!(rst.op, op::RST);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn host_connection_refused_by_the_guest_is_closed_and_bad_lines_are_rejected() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut g = Guest::new(&path, Some(listener));
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 7\n").unwrap();
    let (req, _) = g.expect_one();
    assert_eq!(req.op, op::REQUEST);
    g.send(hdr(op::RST, 7, req.src_port, 0), &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "closed, no OK");

    for bad in [
        &b"CONNECT\n"[..],
        b"CONNECT x\n",
        b"connect 5\n",
        b"CONNECT 99999999999\n",
        b"CONNECT 1111111111111111111111111111111111111111\n",
    ] {
        let mut h = UnixStream::connect(&path).unwrap();
        h.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        h.write_all(bad).unwrap();
        let mut rest = Vec::new();
        let mut closed = false;
        g.pump(|_, pkts| {
            assert!(pkts.is_empty(), "no REQUEST for {bad:?}");
            h.set_nonblocking(true).unwrap();
            closed = matches!(h.read_to_end(&mut rest), Ok(0));
            closed
        });
        assert!(closed);
    }
    assert_eq!(g.counters().host_rejected.load(Ordering::Relaxed), 5);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn hostile_packets_are_counted_and_answered_with_rst_where_due() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let _host = UnixListener::bind(dir.join("v.sock_52")).unwrap();
    let mut g = Guest::new(&path, None);
    g.post_rx(64);
    let invalid = |g: &Guest| g.counters().invalid_packets.load(Ordering::Relaxed);

    // Shorter than a header: dropped.
    g.send_raw(&[(TX_BUFS, 10, 0)]);
    assert_eq!(invalid(&g), 1);
    // A descriptor outside guest memory.
    g.send_raw(&[(MEM_SIZE as u64 - 8, 64, 0)]);
    assert_eq!(invalid(&g), 2);
    // A write-only descriptor on the tx queue: no readable bytes.
    g.send_raw(&[(TX_BUFS, 64, F_WRITE)]);
    assert_eq!(invalid(&g), 3);
    // Wrong source CID: dropped without answer.
    let mut h = hdr(op::REQUEST, 1, 52, 0);
    h.src_cid = 77;
    g.send(h, &[]);
    assert_eq!(invalid(&g), 4);
    // Bad type, bad op, oversized and truncated payloads: RST.
    let mut h = hdr(op::REQUEST, 2, 52, 0);
    h.type_ = 2;
    g.send(h, &[]);
    g.send(hdr(99, 3, 52, 0), &[]);
    g.send(hdr(op::RW, 4, 52, MAX_PKT_DATA as u32 + 1), &[]);
    g.send(hdr(op::RW, 5, 52, 1000), &[0u8; 10]);
    assert_eq!(invalid(&g), 8);
    let mut rsts = Vec::new();
    g.pump(|_, pkts| {
        rsts.extend(pkts.iter().map(|(h, _)| (h.op, h.dst_port)));
        rsts.len() >= 4
    });
    assert_eq!(
        rsts,
        [(op::RST, 2), (op::RST, 3), (op::RST, 4), (op::RST, 5)]
    );
    // Data for a connection that does not exist: RST, counted apart; an RST for one
    // is not answered.
    g.send(hdr(op::RW, 6, 52, 3), b"abc");
    g.send(hdr(op::RST, 7, 52, 0), &[]);
    let (rst, _) = g.expect_one();
    assert_eq!((rst.op, rst.dst_port), (op::RST, 6));
    assert_eq!(g.counters().unknown_conn_packets.load(Ordering::Relaxed), 2);
    assert!(g.received().is_empty());

    // Credit violation: more than our buffer while the host does not read.
    g.send(hdr(op::REQUEST, 8, 52, 0), &[]);
    let (resp, _) = g.expect_one();
    assert_eq!(resp.op, op::RESPONSE);
    let chunk = vec![0x55u8; MAX_PKT_DATA];
    // The host socket takes some bytes into its own buffer; keep going until the
    // connection is reset.
    let mut sent = 0;
    while g.counters().credit_violations.load(Ordering::Relaxed) == 0 && sent < 64 {
        g.send(hdr(op::RW, 8, 52, chunk.len() as u32), &chunk);
        sent += 1;
    }
    assert_eq!(g.counters().credit_violations.load(Ordering::Relaxed), 1);
    // Credit updates for what the host socket took, then the RST.
    let mut last = None;
    g.pump(|_, pkts| {
        for (h, _) in pkts {
            assert_eq!(h.dst_port, 8);
            assert!(last != Some(op::RST), "nothing after the RST");
            assert!(h.op == op::CREDIT_UPDATE || h.op == op::RST, "{h:?}");
            last = Some(h.op);
        }
        last == Some(op::RST)
    });
    assert!(
        !g.h.interrupt.needs_reset(),
        "bad packets never break the device"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_host_socket_that_never_sends_its_connect_line_is_closed() {
    use super::muxer::CONNECT_LINE_TIMEOUT;
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut g = Guest::new(&path, Some(listener));
    let mut silent = UnixStream::connect(&path).unwrap();
    g.pump(|g, pkts| {
        assert!(pkts.is_empty());
        g.h.muxer.pending_hosts() == 1
    });
    // Not yet.
    g.h.muxer.expire_connecting(Instant::now());
    assert_eq!(g.h.muxer.pending_hosts(), 1);
    g.h.muxer
        .expire_connecting(Instant::now() + CONNECT_LINE_TIMEOUT + Duration::from_millis(1));
    assert_eq!(g.h.muxer.pending_hosts(), 0);
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0, "closed");
    assert_eq!(g.counters().host_rejected.load(Ordering::Relaxed), 1);
    assert!(g.received().is_empty(), "the guest heard nothing of it");
    // The slot is free again: a well-behaved client still gets through.
    let mut host = UnixStream::connect(&path).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.expect_one();
    assert_eq!((req.op, req.dst_port), (op::REQUEST, 52));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_host_connection_the_guest_does_not_answer_times_out() {
    use super::muxer::CONNECT_TIMEOUT;
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let mut g = Guest::new(&path, Some(listener));
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let (req, _) = g.expect_one();
    assert_eq!(req.op, op::REQUEST);
    // Not yet.
    g.h.muxer.expire_connecting(Instant::now());
    assert_eq!(g.h.muxer.connections().count(), 1);
    // The guest never answers.
    g.h.muxer
        .expire_connecting(Instant::now() + CONNECT_TIMEOUT + Duration::from_millis(1));
    let (rst, _) = g.expect_one();
    assert_eq!(
        (rst.op, rst.src_port, rst.dst_port),
        (op::RST, req.src_port, 52)
    );
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0, "closed without OK");
    assert_eq!(g.counters().connect_timeouts.load(Ordering::Relaxed), 1);
    // A late RESPONSE finds no connection: RST.
    g.send(hdr(op::RESPONSE, 52, req.src_port, 0), &[]);
    assert_eq!(g.expect_one().0.op, op::RST);
    // And the real timer fires on its own too.
    let mut host = UnixStream::connect(&path).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    host.write_all(b"CONNECT 53\n").unwrap();
    assert_eq!(g.expect_one().0.op, op::REQUEST);
    assert_eq!(g.expect_one().0.op, op::RST, "after about CONNECT_TIMEOUT");
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Seen with Linux in the sandbox: after we reset a connection, and before our RST
/// reaches the guest, it still returns credit for what it reads. Such packets are
/// ignored, not counted as invalid nor answered, and exactly one RST goes out.
#[test]
fn late_guest_packets_on_a_reset_connection_are_ignored() {
    let dir = temp_dir();
    let host = UnixListener::bind(dir.join("v.sock_52")).unwrap();
    let mut g = Guest::new(&dir.join("v.sock"), None);
    g.post_rx(1);
    g.send(hdr(op::REQUEST, 9, 52, 0), &[]);
    assert_eq!(g.received()[0].0.op, op::RESPONSE);
    // The host process goes away; the guest's next bytes cannot be written: reset.
    drop(host.accept().unwrap());
    g.send(hdr(op::RW, 9, 52, 3), b"abc");
    assert_eq!(g.h.muxer.connections().count(), 1, "RST owed, no rx buffer");
    for o in [op::CREDIT_UPDATE, op::RW, op::SHUTDOWN] {
        let len = if o == op::RW { 3 } else { 0 };
        g.send(hdr(o, 9, 52, len), &b"abc"[..len as usize]);
    }
    let c = g.counters();
    assert_eq!(c.invalid_packets.load(Ordering::Relaxed), 0);
    assert_eq!(c.unknown_conn_packets.load(Ordering::Relaxed), 0);
    let mut ops = Vec::new();
    g.pump(|_, pkts| {
        ops.extend(pkts.iter().map(|(h, _)| h.op));
        !ops.is_empty()
    });
    assert_eq!(ops, [op::RST]);
    assert!(g.received().is_empty());
    assert_eq!(g.h.muxer.connections().count(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unusable_rx_buffers_are_returned_empty_and_the_packet_waits() {
    let dir = temp_dir();
    let mut g = Guest::new(&dir.join("v.sock"), None);
    // One buffer too small for a header, one outside guest memory, one read-only.
    let bad: [(u64, u32, u16); 3] = [
        (RX_BUFS, 10, F_WRITE),
        (MEM_SIZE as u64, 100, F_WRITE),
        (RX_BUFS, 100, 0),
    ];
    for b in bad {
        g.rx_heads.insert(u32::from(g.rx.next_desc), (0, 0));
        g.rx.push(&g.mem, &[b]);
    }
    g.send(hdr(op::REQUEST, 1234, 99, 0), &[]);
    assert!(g.received().is_empty());
    assert!(g.rx_heads.is_empty(), "all three returned");
    assert_eq!(g.counters().invalid_packets.load(Ordering::Relaxed), 3);
    // The RST is still there for a good buffer.
    let (rst, _) = g.expect_one();
    assert_eq!(rst.op, op::RST);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_corrupt_tx_ring_breaks_the_queue_without_panicking() {
    let dir = temp_dir();
    let mut g = Guest::new(&dir.join("v.sock"), None);
    g.tx.set_avail_idx(&g.mem, 1000);
    dispatch(&mut g.h, "vsock", Event::Queue(TX));
    assert!(g.h.interrupt.needs_reset());
    assert_eq!(g.counters().queue_errors.load(Ordering::Relaxed), 1);
    // Broken: left alone until the driver resets the device.
    dispatch(&mut g.h, "vsock", Event::Queue(TX));
    assert_eq!(g.counters().queue_errors.load(Ordering::Relaxed), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn config_space_holds_the_cid_and_paths_are_checked() {
    let dir = temp_dir();
    let path = dir.join("v.sock");
    let v = Vsock::new(42, &path).unwrap();
    let mut b = [0u8; 8];
    v.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), 42);
    assert_eq!(v.device_type(), 19);
    assert_eq!(v.queue_max_sizes().len(), 3);
    // A live listener owns the path.
    assert!(matches!(check_config(42, &path), Err(VsockError::InUse(_))));
    assert!(matches!(Vsock::new(43, &path), Err(VsockError::InUse(_))));
    drop(v);
    assert!(!path.exists(), "our socket is removed with the device");
    // A stale socket is replaced.
    drop(UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    assert!(check_config(3, &path).is_ok());
    let v = Vsock::new(3, &path).unwrap();
    drop(v);
    // Not a socket: refused; missing directory; long path; reserved CIDs.
    std::fs::write(&path, b"x").unwrap();
    assert!(matches!(
        check_config(3, &path),
        Err(VsockError::NotASocket(_))
    ));
    assert!(matches!(
        check_config(3, &dir.join("nope/v.sock")),
        Err(VsockError::NoParent(_))
    ));
    assert!(matches!(
        check_config(3, &dir.join("x".repeat(100))),
        Err(VsockError::PathTooLong(_))
    ));
    for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
        assert!(matches!(check_config(cid, &path), Err(VsockError::Cid(_))));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn connect_lines_parse_strictly() {
    use super::muxer::parse_connect;
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295"), Some(u32::MAX));
    for bad in [
        &b"CONNECT 4294967296"[..],
        b"CONNECT -1",
        b"CONNECT ",
        b"CONNECT +5",
        b"CONNECT  5",
        b"CONNECT 5 ",
        b"\xffCONNECT 5",
        b"",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

/// After a restore the guest is told that every connection is gone: one
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (id 0) in its event queue, and an interrupt.
#[test]
fn a_transport_reset_event_reaches_the_event_queue() {
    let dir = temp_dir();
    let mut g = Guest::new(&dir.join("v.sock"), None);
    let (mut evt_ring, evt_q) = Ring::new(&g.mem, 0x2_0000);
    const EVENT_BUF: u64 = 0x3_0000;
    g.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EVENT_BUF))
        .unwrap();
    evt_ring.push(&g.mem, &[(EVENT_BUF, 8, F_WRITE)]);
    g.h.evt = Some(evt_q);
    g.h.send_transport_reset();
    assert_eq!(evt_ring.used(&g.mem), vec![(0, 4)]);
    let id: u32 = g.mem.read_obj(GuestAddress(EVENT_BUF)).unwrap();
    assert_eq!(id, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Without a buffer there is nothing to do but log; no panic, no used entry.
    g.h.send_transport_reset();
    assert!(evt_ring.used(&g.mem).is_empty());
}
