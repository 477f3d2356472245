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

/// virtio-rng: queue parsing and buffer filling.
pub fn rng(data: &[u8]) {
    let Some(mut s) = setup(data) else { return };
    let counters = crate::rng::RngCounters::default();
    let mem = &s.mem;
    let _ = serve_queue(&mut s.queue, mem, &s.interrupt, |chain| {
        crate::rng::fill_request(mem, &counters, chain)
    });
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

    #[test]
    fn entry_points_survive_simple_and_degenerate_inputs() {
        for input in [
            &[][..],
            &[0u8; 9],
            &[0xff; 64],
            &[16, 0, 0, 0, 0x10, 0, 0x20, 0, 1, 0xaa, 0xbb],
        ] {
            blk(input);
            rng(input);
            mmio(input);
        }
        // Found by the virtio_blk fuzz target: a used ring laid over the available ring made
        // every completion look like a new request, and the device served it forever.
        blk(&[
            0xff, 0xb1, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x0f, 0x0f, 0x0a, 0x30,
        ]);
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
