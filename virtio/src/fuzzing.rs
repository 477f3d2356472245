//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`).
//!
//! The fuzzer's bytes become guest memory and a queue layout; the device's own request
//! code then serves that queue exactly as its worker thread would. Whatever the bytes,
//! nothing may panic, hang or touch memory outside the guest's.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{serve_queue, GuestMemory, Interrupt};

/// Guest memory the fuzzer controls: 64 KiB at 0, a hole, and 64 KiB at 1 MiB.
const LOW: usize = 0x1_0000;
const HIGH_BASE: u64 = 0x10_0000;

struct Setup {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// Layout: [size u16][desc u16][avail u16][used u16][flags u8][memory...]; addresses are in
/// units of 16 bytes so that any value can point anywhere in the low region or beyond.
fn setup(data: &[u8]) -> Option<Setup> {
    if data.len() < 9 {
        return None;
    }
    let word = |i: usize| u16::from_le_bytes([data[i], data[i + 1]]);
    let mem =
        GuestMemory::from_ranges(&[(GuestAddress(0), LOW), (GuestAddress(HIGH_BASE), LOW)]).ok()?;
    let body = &data[9..];
    let low = body.len().min(LOW);
    mem.write_slice(&body[..low], GuestAddress(0)).ok()?;
    if body.len() > low {
        let high = (body.len() - low).min(LOW);
        mem.write_slice(&body[low..low + high], GuestAddress(HIGH_BASE))
            .ok()?;
    }
    let mut queue = Queue::new(256).ok()?;
    queue.set_size(word(0));
    queue.set_desc_table_address(Some(u32::from(word(2)) * 16), Some(0));
    queue.set_avail_ring_address(Some(u32::from(word(4)) * 16), Some(0));
    queue.set_used_ring_address(Some(u32::from(word(6)) * 16), Some(0));
    queue.set_event_idx(data[8] & 1 != 0);
    queue.set_ready(true);
    // The transport refuses invalid queues before a device ever sees them.
    if !queue.is_valid(&mem) {
        return None;
    }
    let interrupt = Interrupt::new(EventFd::new(EFD_NONBLOCK).ok()?);
    Some(Setup {
        mem,
        queue,
        interrupt,
    })
}

/// virtio-blk: queue and request parsing against a 64-sector in-memory disk.
pub fn blk(data: &[u8]) {
    let Some(mut s) = setup(data) else { return };
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"qx-fuzz-disk".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: a fresh fd that nothing else owns.
    let file = unsafe { <std::fs::File as std::os::unix::io::FromRawFd>::from_raw_fd(fd) };
    if file.set_len(64 * 512).is_err() {
        return;
    }
    let disk = crate::block::fuzz_disk(file, 64, data[8] & 2 != 0);
    let mem = &s.mem;
    // The asynchronous path (prepare, move the data, complete) run to the end in line.
    let _ = serve_queue(&mut s.queue, mem, &s.interrupt, |chain| {
        crate::block::fuzz_execute(&disk, mem, chain)
    });
}

/// Frames in memory instead of a TAP: offers a few frames made from the input (some
/// larger than any receive buffer) and counts what the guest sends.
struct MemoryFrames {
    offered: std::sync::Mutex<Vec<Vec<u8>>>,
    sent: std::sync::atomic::AtomicUsize,
}

impl crate::net::FrameIo for MemoryFrames {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let mut offered = self.offered.lock().unwrap_or_else(|p| p.into_inner());
        let Some(frame) = offered.pop() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len()); // a TAP truncates to the buffer too
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(frame.len())
    }
}

/// virtio-net: the fuzzer's queue is the transmit queue (flag bit 1 clear) or the receive
/// queue (set), served against frames in memory.
pub fn net(data: &[u8]) {
    let Some(s) = setup(data) else { return };
    let flags = data[8];
    // Frame lengths from the input's last bytes: empty, tiny, header-only, jumbo, oversized.
    let offered = data
        .iter()
        .rev()
        .take(4)
        .map(|b| vec![*b; usize::from(*b) * 300])
        .collect();
    let io = Arc::new(MemoryFrames {
        offered: std::sync::Mutex::new(offered),
        sent: Default::default(),
    });
    let Ok(idle) = Queue::new(256) else { return };
    let (mem, interrupt) = (Arc::new(s.mem), Arc::new(s.interrupt));
    if flags & 2 == 0 {
        let mut h = crate::net::NetHandler::for_fuzzing(mem, idle, s.queue, interrupt, io.clone());
        crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Queue(1));
        let c = h.counters();
        let sent = c.tx_frames.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(
            sent as usize,
            io.sent.load(std::sync::atomic::Ordering::Relaxed)
        );
    } else {
        let mut h = crate::net::NetHandler::for_fuzzing(mem, s.queue, idle, interrupt, io);
        crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Queue(0));
        crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Host(0));
    }
}

/// virtio-rng: queue parsing and buffer filling.
pub fn rng(data: &[u8]) {
    let Some(mut s) = setup(data) else { return };
    let counters = crate::rng::RngCounters::default();
    let mem = &s.mem;
    let _ = serve_queue(&mut s.queue, mem, &s.interrupt, |chain| {
        crate::rng::fill_request(mem, &counters, chain)
    });
}

/// virtio-console: the fuzzer's queue is the transmit queue (bit 1 of the flags byte, 8,
/// clear) or the receive queue (set), fed from a pipe that holds the queue's own bytes.
pub fn console(data: &[u8]) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let receive = data.get(8).is_some_and(|f| f & 2 != 0);
    let Some(mut s) = setup(data) else { return };
    let counters = crate::console::ConsoleCounters::default();
    if !receive {
        let sink: std::sync::Mutex<crate::console::ConsoleSink> =
            std::sync::Mutex::new(Box::new(std::io::sink()));
        let mem = &s.mem;
        let _ = serve_queue(&mut s.queue, mem, &s.interrupt, |chain| {
            crate::console::transmit_request(mem, &sink, &counters, chain);
            0
        });
        return;
    }
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
        return;
    }
    // SAFETY: two new descriptors nothing else owns.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let host = &data[9..data.len().min(9 + 4096)];
    let _ = std::io::Write::write_all(&mut std::fs::File::from(w), host);
    let mut input = crate::console::Input::new(s.queue, std::sync::Arc::new(r));
    let _ = input.receive(&s.mem, &s.interrupt, &counters);
}

/// A directory with a Unix listener at `v_1024`, so that guest connections to host port
/// 1024 succeed (any other port is refused); made once per process.
fn vsock_host_dir() -> Option<&'static (std::path::PathBuf, std::os::unix::net::UnixListener)> {
    static DIR: std::sync::OnceLock<
        Option<(std::path::PathBuf, std::os::unix::net::UnixListener)>,
    > = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("qx-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        let port = dir.join("v_1024");
        let _ = std::fs::remove_file(&port);
        let listener = std::os::unix::net::UnixListener::bind(&port).ok()?;
        listener.set_nonblocking(true).ok()?;
        Some((dir.join("v"), listener))
    })
    .as_ref()
}

/// virtio-vsock: the fuzzer's queue (from [`setup`]) is the tx queue, guest CID 3; an rx
/// queue of 16 entries whose rings sit where the first six bytes of guest memory say
/// (units of 16 bytes) takes the answers. Packets run through the device's handler
/// against real Unix sockets (port 1024 accepts), then host events and the rx queue.
pub fn vsock(data: &[u8]) {
    let _ = vsock_run(data);
}

/// [`vsock`], returning the device's counters when the input got that far.
fn vsock_run(data: &[u8]) -> Option<Arc<crate::vsock::VsockCounters>> {
    let s = setup(data)?;
    let (path, listener) = vsock_host_dir()?;
    let mut w = [0u8; 6];
    s.mem.read_slice(&mut w, GuestAddress(0)).ok()?;
    let word = |i: usize| u32::from(u16::from_le_bytes([w[i], w[i + 1]])) * 16;
    let mut rx = Queue::new(16).ok()?;
    rx.set_size(16);
    rx.set_desc_table_address(Some(word(0)), Some(0));
    rx.set_avail_ring_address(Some(word(2)), Some(0));
    rx.set_used_ring_address(Some(word(4)), Some(0));
    rx.set_ready(true);
    if !rx.is_valid(&s.mem) {
        return None;
    }
    let counters: Arc<crate::vsock::VsockCounters> = Arc::default();
    let muxer = crate::vsock::muxer::Muxer::new(3, path, None, counters.clone()).ok()?;
    let mut h = crate::vsock::VsockHandler {
        mem: Arc::new(s.mem),
        rx,
        tx: s.queue,
        interrupt: Arc::new(s.interrupt),
        muxer,
        counters: counters.clone(),
        buf: vec![0u8; crate::vsock::packet::MAX_PKT_DATA],
        guest_cid: 3,
        evt: None,
    };
    crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Queue(1));
    crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Queue(0));
    crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Host(0));
    // Host side: take the connections the packets opened, and close them.
    while listener.accept().is_ok() {}
    crate::worker::dispatch(&mut h, "fuzz", crate::worker::Event::Host(0));
    Some(counters)
}

/// The virtio-mmio transport: a sequence of register accesses from a driver, each
/// `[op u8][offset u16][value u32]`, against an entropy device whose queue lives in the
/// fuzzer-controlled memory.
pub fn mmio(data: &[u8]) {
    use quantix_devices::BusDevice;
    let Ok(mem) = GuestMemory::from_ranges(&[(GuestAddress(0), LOW)]) else {
        return;
    };
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else {
        return;
    };
    let Ok(mut t) =
        crate::mmio::MmioTransport::new(Box::new(crate::rng::Rng::new()), Arc::new(mem), irq)
    else {
        return;
    };
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % crate::mmio::MMIO_WINDOW;
        let value = [op[3], op[4], op[5], op[6]];
        match op[0] % 4 {
            0 => t.write(offset, &value),
            1 => t.write(offset, &value[..1 + (op[3] as usize % 4)]),
            2 => {
                let mut buf = [0u8; 4];
                t.read(offset, &mut buf);
            }
            _ => {
                let mut buf = [0u8; 8];
                t.read(offset, &mut buf[..1 + (op[4] as usize % 8)]);
            }
        }
    }
    // Dropping the transport stops a worker the sequence may have started.
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made vsock input: a REQUEST to host port 1024 and 4 bytes of data, with
    /// two rx buffers for the answers. It must open the connection and move the bytes.
    fn vsock_input_reaches_the_host_socket() {
        use crate::vsock::packet::{op, Header, HOST_CID, TYPE_STREAM};
        use std::sync::atomic::Ordering;
        let mut mem = vec![0u8; 0xc000];
        let put16 =
            |m: &mut Vec<u8>, at: usize, v: u16| m[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let desc = |m: &mut Vec<u8>, at: usize, addr: u64, len: u32, flags: u16| {
            m[at..at + 8].copy_from_slice(&addr.to_le_bytes());
            m[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
            m[at + 12..at + 14].copy_from_slice(&flags.to_le_bytes());
        };
        // Rx rings (at 0x4000, 0x5000, 0x6000), named in the first six bytes.
        put16(&mut mem, 0, 0x400);
        put16(&mut mem, 2, 0x500);
        put16(&mut mem, 4, 0x600);
        // Tx: two packets.
        desc(&mut mem, 0x1000, 0x8000, 44, 0);
        desc(&mut mem, 0x1010, 0x8100, 48, 0);
        put16(&mut mem, 0x2002, 2);
        put16(&mut mem, 0x2006, 1);
        let h = |o: u16, len: u32| Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 5,
            dst_port: 1024,
            len,
            type_: TYPE_STREAM,
            op: o,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        };
        mem[0x8000..0x802c].copy_from_slice(&h(op::REQUEST, 0).to_bytes());
        mem[0x8100..0x812c].copy_from_slice(&h(op::RW, 4).to_bytes());
        mem[0x812c..0x8130].copy_from_slice(b"abcd");
        // Rx: two writable buffers.
        desc(&mut mem, 0x4000, 0x9000, 4096, 2);
        desc(&mut mem, 0x4010, 0xa000, 4096, 2);
        put16(&mut mem, 0x5002, 2);
        put16(&mut mem, 0x5006, 1);
        let mut input = vec![16, 0, 0x00, 0x01, 0x00, 0x02, 0x00, 0x03, 0];
        input.extend_from_slice(&mem);
        let c = vsock_run(&input).expect("a valid layout");
        assert_eq!(c.conns_opened.load(Ordering::Relaxed), 1);
        assert_eq!(c.tx_bytes.load(Ordering::Relaxed), 4);
        assert!(c.rx_packets.load(Ordering::Relaxed) >= 1, "the RESPONSE");
        assert_eq!(c.invalid_packets.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn entry_points_survive_simple_and_degenerate_inputs() {
        for input in [
            &[][..],
            &[0u8; 9],
            &[0xff; 64],
            &[16, 0, 0, 0, 0x10, 0, 0x20, 0, 1, 0xaa, 0xbb],
        ] {
            blk(input);
            net(input);
            rng(input);
            mmio(input);
            vsock(input);
        }
        // Found by the virtio_blk fuzz target: a used ring laid over the available ring made
        // every completion look like a new request, and the device served it forever.
        blk(&[
            0xff, 0xb1, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x0f, 0x0f, 0x0a, 0x30,
        ]);
        vsock_input_reaches_the_host_socket();
        // A full handshake through the transport, then a notification and a reset.
        let mut ops = Vec::new();
        let mut w = |off: u16, v: u32| {
            ops.push(0u8);
            ops.extend_from_slice(&off.to_le_bytes());
            ops.extend_from_slice(&v.to_le_bytes());
        };
        w(0x70, 3);
        w(0x24, 1);
        w(0x20, 1);
        w(0x70, 11);
        w(0x38, 16);
        w(0x80, 0x1000);
        w(0x90, 0x2000);
        w(0xa0, 0x3000);
        w(0x44, 1);
        w(0x70, 15);
        w(0x50, 0);
        w(0x70, 0);
        mmio(&ops);
    }
}

#[cfg(test)]
mod console_smoke {
    #[test]
    fn the_console_entry_takes_any_input() {
        super::console(&[]);
        let mut d = vec![16, 0, 0, 1, 0, 2, 0, 3, 0];
        d.extend(vec![0xab; 512]);
        super::console(&d);
        d[8] = 2;
        super::console(&d);
    }
}
