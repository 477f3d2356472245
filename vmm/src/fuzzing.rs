//! Entry points for the fuzz targets in fuzz/: what a VMM reads from outside the guest
//! (its control socket, the files it boots), fed arbitrary bytes.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use crate::memory::GuestMemory;
use vm_memory::GuestAddress;

use crate::api::{respond, VmInfo};
use crate::config::BootSource;
use crate::exit::ExitSignal;

/// The control protocol: every line of `data` as a request (the answer must be one JSON
/// line whatever the request).
pub fn control(data: &[u8]) {
    static EXIT: OnceLock<Option<ExitSignal>> = OnceLock::new();
    let Some(exit) = EXIT.get_or_init(|| ExitSignal::new().ok()).as_ref() else {
        return;
    };
    let info = VmInfo {
        vcpus: 1,
        memory_mib: 64,
        boot: "elf",
        pid: 1,
        version: "fuzz",
        metrics: Default::default(),
        power_button: None,
        pause: None,
        snapshot: None,
        migration: None,
    };
    let started = Instant::now();
    for line in data.split(|b| *b == b'\n') {
        let reply = respond(line, &info, started, exit);
        assert!(!reply.contains('\n'), "a reply is one line: {reply:?}");
        assert!(
            serde_json::from_str::<serde_json::Value>(&reply).is_ok(),
            "a reply is JSON: {reply:?}"
        );
    }
}

/// A file holding `bytes`, named `/dev/fd/N` (a memfd: no file system involved).
fn memfd(bytes: &[u8]) -> Option<(OwnedFd, PathBuf)> {
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"qx-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let f = std::fs::File::from(fd.try_clone().ok()?);
    std::io::Write::write_all(&mut &f, bytes).ok()?;
    let path = PathBuf::from(format!("/dev/fd/{}", fd.as_raw_fd()));
    Some((fd, path))
}

/// The kernel, initramfs and firmware loaders. `data[0]` chooses: 0 a kernel (`data[1..]`),
/// 1 a minimal ELF kernel with `data[1..]` as its initramfs, 2 a firmware image. Loading
/// must fail cleanly or succeed within the 64 MiB of guest memory.
pub fn loaders(data: &[u8]) {
    const MEM: u64 = 64 << 20;
    static GUEST: OnceLock<Option<GuestMemory>> = OnceLock::new();
    let Some(mem) = GUEST
        .get_or_init(|| GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).ok())
        .as_ref()
    else {
        return;
    };
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let Some((_fd, kernel)) = memfd(rest) else {
                return;
            };
            let src = BootSource::Kernel {
                kernel,
                initramfs: None,
                cmdline: "console=ttyS0".into(),
            };
            let _ = crate::boot::load_linux(mem, MEM, &src, GuestAddress(0xe0000));
        }
        1 => {
            let (Some((_k, kernel)), Some((_i, initrd))) = (memfd(&tiny_elf()), memfd(rest)) else {
                return;
            };
            let src = BootSource::Kernel {
                kernel,
                initramfs: Some(initrd),
                cmdline: String::from_utf8_lossy(&rest[..rest.len().min(64)]).into_owned(),
            };
            let _ = crate::boot::load_linux(mem, MEM, &src, GuestAddress(0xe0000));
        }
        _ => {
            let Some((_fd, fw)) = memfd(rest) else {
                return;
            };
            let _ = crate::boot::read_firmware(&fw);
        }
    }
}

/// A valid ELF64 kernel of one `hlt` at 16 MiB.
fn tiny_elf() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let entry = LOAD + 64 + 56;
    let total = 64 + 56 + 1u64;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&62u16.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend_from_slice(&64u64.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    for h in [64u16, 56, 1, 64, 0, 0] {
        v.extend_from_slice(&h.to_le_bytes());
    }
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&7u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&LOAD.to_le_bytes());
    v.extend_from_slice(&LOAD.to_le_bytes());
    v.extend_from_slice(&total.to_le_bytes());
    v.extend_from_slice(&total.to_le_bytes());
    v.extend_from_slice(&0x1000u64.to_le_bytes());
    v.push(0xf4);
    v
}

/// A snapshot's state file, as `--restore` reads it: the header's checks, then the JSON
/// state and its consistency checks. Whatever the bytes, an error and never a panic.
pub fn snapshot_state(data: &[u8]) {
    if let Ok(body) = crate::snapshot::file::decode(data) {
        let _ = crate::snapshot::SnapshotState::parse(body);
    }
    // The body alone too, so that the fuzzer need not forge checksums to reach the parser.
    let _ = crate::snapshot::SnapshotState::parse(data);
}

/// A migration stream, as a destination reads it from its source: messages one after
/// the other until the first error, batches checked against a 64 MiB guest's RAM; a
/// state body parsed as the destination parses it. Whatever the bytes, an error and never
/// a panic or an allocation past a message's cap.
pub fn migration_stream(data: &[u8]) {
    use crate::migration::protocol::{receive, Message};
    let regions = [crate::snapshot::MemoryRegion {
        guest_addr: 0,
        size: 64 << 20,
        file_offset: 0,
    }];
    let mut r = data;
    for _ in 0..64 {
        match receive(&mut r, &regions) {
            Ok(Message::State(body)) => {
                let _ = crate::snapshot::SnapshotState::parse(&body);
            }
            Ok(Message::Memory(batch)) => {
                for (range, piece) in batch.pieces() {
                    let _ = (range.addr, piece.map(<[u8]>::len));
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_entries_take_any_input() {
        control(b"");
        control(b"{\"op\":\"state\"}\n{\"op\":\"metrics\"}\nnot json\n{\"op\":\"nope\"}\n\xff\xfe");
        migration_stream(b"");
        migration_stream(b"QXMG\x03\0\0\0\x18\0\0\0\0\0\0\0\x01\0\0\0\0\0\0\0\0\x10\0\0\0\0\0\0\x01\0\0\0\x01\0\0\0");
        snapshot_state(b"");
        snapshot_state(b"QUANTIX-VMSTATE 1.0 2 0000000000000000\n{}");
        snapshot_state(&crate::snapshot::file::encode(
            b"{\"vcpus\":[{\"index\":300}]}",
        ));
        loaders(&[]);
        loaders(b"\x00garbage kernel");
        loaders(b"\x01garbage initramfs");
        loaders(b"\x02short firmware");
        let mut fw = vec![2u8];
        fw.extend(vec![0xf4; 4096]);
        loaders(&fw);
        // The tiny kernel itself loads.
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let (_fd, kernel) = memfd(&tiny_elf()).unwrap();
        let src = BootSource::Kernel {
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0".into(),
        };
        let info = crate::boot::load_linux(&mem, 64 << 20, &src, GuestAddress(0xe0000));
        assert!(info.is_ok(), "{info:?}");
    }
}
