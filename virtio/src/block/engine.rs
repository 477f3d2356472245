//! Asynchronous disk I/O: io_uring where the host has it, a small thread pool otherwise.
//!
//! The device's worker thread prepares requests (iovecs that point into guest memory) and
//! submits them here; completions come back through an eventfd that the worker watches,
//! so the worker never waits on the disk and many requests are in flight at once.
//! Dropping an engine waits for every operation in flight: after a device reset the
//! guest may reuse its buffers, so nothing may still write into them.

use crate::threads::Joiner;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};

use io_uring::{opcode, types, IoUring};
use tracing::warn;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The operations that run asynchronously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `preadv` at an offset.
    Read,
    /// `pwritev` at an offset.
    Write,
    /// `fdatasync`.
    Flush,
    /// `fallocate(mode, offset, len)`: discard and write-zeroes (no iovecs; 0 on success).
    Fallocate {
        /// `FALLOC_FL_*`.
        mode: i32,
        /// Bytes from the job's offset.
        len: u64,
    },
}

impl Op {
    /// Whether the operation moves bytes (a result of 0 then means the image ended).
    pub fn moves_data(self) -> bool {
        matches!(self, Op::Read | Op::Write)
    }
}

/// Host memory segments of one request: raw pointers into guest memory.
pub struct IoVecs(pub Vec<libc::iovec>);

// SAFETY: the pointers refer to guest memory, which is mapped for the life of the VM and
// outlives every device (the device holds an `Arc` of it); no thread-local data is involved.
unsafe impl Send for IoVecs {}

/// One operation handed to an engine. Its iovecs must stay valid, and must not move, until
/// the engine returns its completion.
pub struct Job {
    /// What to do.
    pub op: Op,
    /// Byte offset in the image (read, write).
    pub offset: u64,
    /// Where the data is.
    pub iovecs: IoVecs,
}

/// Which engine serves a disk (the configuration's type).
pub use quantix_vmm_api::EngineKind;

/// An I/O engine bound to one image file.
pub enum Engine {
    /// io_uring.
    Uring(Box<UringEngine>),
    /// Thread pool.
    Threads(PoolEngine),
}

impl Engine {
    /// io_uring when `prefer` allows and the host supports it, else the thread pool.
    pub fn new(file: Arc<File>, depth: u32, prefer: EngineKind) -> io::Result<Engine> {
        if prefer == EngineKind::IoUring {
            match UringEngine::new(file.clone(), depth) {
                Ok(e) => return Ok(Engine::Uring(Box::new(e))),
                Err(e) => warn!(error = %e, "io_uring is unavailable; disk I/O uses a thread pool"),
            }
        }
        Ok(Engine::Threads(PoolEngine::new(file, POOL_THREADS)?))
    }

    /// Which engine this is.
    pub fn kind(&self) -> EngineKind {
        match self {
            Engine::Uring(_) => EngineKind::IoUring,
            Engine::Threads(_) => EngineKind::Threads,
        }
    }

    /// The fd that becomes readable when completions are ready.
    pub fn completion_fd(&self) -> RawFd {
        match self {
            Engine::Uring(e) => e.eventfd.as_raw_fd(),
            Engine::Threads(e) => e.eventfd.as_raw_fd(),
        }
    }

    /// Queues `job` under `token`; it may not start before [`Engine::flush_submissions`].
    /// `job`'s iovecs must stay valid and in place until its completion is reaped.
    pub fn submit(&mut self, token: u64, job: &Job) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.submit(token, job),
            Engine::Threads(e) => e.submit(token, job),
        }
    }

    /// Starts everything queued (one system call for a batch on io_uring).
    pub fn flush_submissions(&mut self) -> io::Result<()> {
        match self {
            Engine::Uring(e) => e.ring.submit().map(|_| ()),
            Engine::Threads(_) => Ok(()),
        }
    }

    /// Appends finished operations as `(token, result)`: bytes moved, or a negative errno.
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        match self {
            Engine::Uring(e) => e.reap(out),
            Engine::Threads(e) => e.reap(out),
        }
    }
}

/// io_uring with a registered eventfd.
pub struct UringEngine {
    ring: IoUring,
    eventfd: EventFd,
    /// The image, as registered file 0.
    fd: types::Fixed,
    in_flight: usize,
    _file: Arc<File>,
}

impl UringEngine {
    /// A ring that can do nothing but read, write, sync and fallocate the image. Operations
    /// on a ring run without system calls, so seccomp cannot see them: the ring is created
    /// disabled, the image is registered as its only file, and
    /// `IORING_REGISTER_RESTRICTIONS` allows only READV, WRITEV, FSYNC and FALLOCATE on
    /// registered files and no further registration before the ring is enabled. A device thread taken over by a guest cannot open, connect or
    /// read anything else through it.
    fn new(file: Arc<File>, depth: u32) -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .build(depth.next_power_of_two())?;
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        let submitter = ring.submitter();
        submitter.register_eventfd(eventfd.as_raw_fd())?;
        submitter.register_files(&[file.as_raw_fd()])?;
        let fixed = io_uring::squeue::Flags::FIXED_FILE.bits();
        submitter.register_restrictions(&mut [
            io_uring::register::Restriction::sqe_op(opcode::Readv::CODE),
            io_uring::register::Restriction::sqe_op(opcode::Writev::CODE),
            io_uring::register::Restriction::sqe_op(opcode::Fsync::CODE),
            io_uring::register::Restriction::sqe_op(opcode::Fallocate::CODE),
            io_uring::register::Restriction::sqe_flags_allowed(fixed),
            io_uring::register::Restriction::sqe_flags_required(fixed),
        ])?;
        submitter.register_enable_rings()?;
        Ok(Self {
            ring,
            eventfd,
            fd: types::Fixed(0),
            in_flight: 0,
            _file: file,
        })
    }

    fn submit(&mut self, token: u64, job: &Job) -> io::Result<()> {
        let iov = &job.iovecs.0;
        let count =
            u32::try_from(iov.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let entry = match job.op {
            Op::Read => opcode::Readv::new(self.fd, iov.as_ptr(), count)
                .offset(job.offset)
                .build(),
            Op::Write => opcode::Writev::new(self.fd, iov.as_ptr(), count)
                .offset(job.offset)
                .build(),
            Op::Flush => opcode::Fsync::new(self.fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate { mode, len } => opcode::Fallocate::new(self.fd, len)
                .offset(job.offset)
                .mode(mode)
                .build(),
        }
        .user_data(token);
        loop {
            // SAFETY: the entry refers to the image fd (kept open by `_file`) and to iovecs
            // that the caller keeps valid and in place until the completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // The submission queue is full: hand what is there to the kernel.
            self.ring.submit()?;
        }
        self.in_flight += 1;
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let _ = self.eventfd.read();
        for cqe in self.ring.completion() {
            out.push((cqe.user_data(), cqe.result()));
            self.in_flight = self.in_flight.saturating_sub(1);
        }
    }
}

impl Drop for UringEngine {
    fn drop(&mut self) {
        // Wait for every operation in flight: its buffers may be reused once we are gone.
        while self.in_flight > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!(error = %e, "io_uring: waiting for I/O in flight failed");
                    return;
                }
            }
            let n = self.ring.completion().count();
            self.in_flight = self.in_flight.saturating_sub(n);
        }
    }
}

/// Threads of the fallback engine per disk.
pub const POOL_THREADS: usize = 4;

type Completions = Arc<Mutex<Vec<(u64, i32)>>>;

/// A few threads doing positional vectored I/O.
pub struct PoolEngine {
    jobs: Option<Sender<(u64, Op, u64, IoVecs)>>,
    done: Completions,
    eventfd: EventFd,
    threads: Vec<Joiner<()>>,
    in_flight: Arc<AtomicUsize>,
}

impl PoolEngine {
    fn new(file: Arc<File>, threads: usize) -> io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let rx = Arc::new(Mutex::new(rx));
        let done: Completions = Arc::default();
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::with_capacity(threads);
        for i in 0..threads {
            let (rx, done, file) = (rx.clone(), done.clone(), file.clone());
            let notify = eventfd.try_clone()?;
            let in_flight = in_flight.clone();
            handles.push(crate::threads::spawn(format!("blk-io-{i}"), move || {
                pool_thread(&file, &rx, &done, &notify, &in_flight)
            })?);
        }
        Ok(Self {
            jobs: Some(tx),
            done,
            eventfd,
            threads: handles,
            in_flight,
        })
    }

    fn submit(&mut self, token: u64, job: &Job) -> io::Result<()> {
        // The thread needs its own copy of the iovec array (the pointers, not the data).
        let iov = IoVecs(job.iovecs.0.clone());
        let jobs = self.jobs.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        jobs.send((token, job.op, job.offset, iov))
            .map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))
    }

    fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        let _ = self.eventfd.read();
        out.append(&mut self.done.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

fn pool_thread(
    file: &File,
    jobs: &Mutex<Receiver<(u64, Op, u64, IoVecs)>>,
    done: &Mutex<Vec<(u64, i32)>>,
    notify: &EventFd,
    in_flight: &AtomicUsize,
) {
    loop {
        let job = jobs.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((token, op, offset, iov)) = job else {
            return; // the engine is gone and the queue is empty
        };
        let result = run_blocking(
            file,
            &Job {
                op,
                offset,
                iovecs: iov,
            },
        );
        done.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((token, result));
        in_flight.fetch_sub(1, Ordering::AcqRel);
        let _ = notify.write(1);
    }
}

/// Runs `job` on this thread: bytes moved, or a negative errno.
pub fn run_blocking(file: &File, job: &Job) -> i32 {
    let fd = file.as_raw_fd();
    let iov = &job.iovecs.0;
    let count = iov.len().min(libc::c_int::MAX as usize) as libc::c_int;
    let Ok(offset) = libc::off_t::try_from(job.offset) else {
        return -libc::EINVAL;
    };
    let len = match job.op {
        Op::Fallocate { len, .. } => match libc::off_t::try_from(len) {
            Ok(l) => l,
            Err(_) => return -libc::EINVAL,
        },
        _ => 0,
    };
    // SAFETY: the iovecs point into memory that stays mapped and that the device does not
    // hand back to the guest before this completion; fd is open (`file`).
    let n = unsafe {
        match job.op {
            Op::Read => libc::preadv(fd, iov.as_ptr(), count, offset),
            Op::Write => libc::pwritev(fd, iov.as_ptr(), count, offset),
            Op::Flush => libc::fdatasync(fd) as isize,
            Op::Fallocate { mode, .. } => libc::fallocate(fd, mode, offset, len) as isize,
        }
    };
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

impl Drop for PoolEngine {
    fn drop(&mut self) {
        // Closing the channel lets the threads finish what is queued and end.
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    fn image(name: &str, bytes: &[u8]) -> Arc<File> {
        let path = std::env::temp_dir().join(format!("qx-engine-{name}-{}", std::process::id()));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.write_all(bytes).unwrap();
        let _ = std::fs::remove_file(&path);
        Arc::new(f)
    }

    fn wait_all(engine: &mut Engine, want: usize) -> Vec<(u64, i32)> {
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        while out.len() < want {
            let mut poll = libc::pollfd {
                fd: engine.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd we own.
            unsafe { libc::poll(&mut poll, 1, 100) };
            engine.reap(&mut out);
            assert!(start.elapsed().as_secs() < 10, "completions did not come");
        }
        out.sort();
        out
    }

    fn round_trip(kind: EngineKind) {
        let file = image(kind.name(), &[0u8; 8192]);
        let mut engine = Engine::new(file.clone(), 16, kind).unwrap();
        assert_eq!(engine.kind(), kind);
        let mut a = *b"hello, ";
        let mut b = *b"engine!";
        let write = Job {
            op: Op::Write,
            offset: 4096,
            iovecs: IoVecs(vec![
                libc::iovec {
                    iov_base: a.as_mut_ptr().cast(),
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                },
            ]),
        };
        engine.submit(1, &write).unwrap();
        let flush = Job {
            op: Op::Flush,
            offset: 0,
            iovecs: IoVecs(Vec::new()),
        };
        engine.submit(2, &flush).unwrap();
        engine.flush_submissions().unwrap();
        assert_eq!(wait_all(&mut engine, 2), vec![(1, 14), (2, 0)]);
        let mut on_disk = [0u8; 14];
        file.read_exact_at(&mut on_disk, 4096).unwrap();
        assert_eq!(&on_disk, b"hello, engine!");

        let mut back = [0u8; 14];
        let read = Job {
            op: Op::Read,
            offset: 4096,
            iovecs: IoVecs(vec![libc::iovec {
                iov_base: back.as_mut_ptr().cast(),
                iov_len: back.len(),
            }]),
        };
        engine.submit(3, &read).unwrap();
        engine.flush_submissions().unwrap();
        assert_eq!(wait_all(&mut engine, 1), vec![(3, 14)]);
        assert_eq!(&back, b"hello, engine!");

        // Reading past the end is short, not an error: the caller sees the count.
        let mut tail = [0u8; 16];
        let past = Job {
            op: Op::Read,
            offset: 8192 - 4,
            iovecs: IoVecs(vec![libc::iovec {
                iov_base: tail.as_mut_ptr().cast(),
                iov_len: tail.len(),
            }]),
        };
        engine.submit(4, &past).unwrap();
        engine.flush_submissions().unwrap();
        assert_eq!(wait_all(&mut engine, 1), vec![(4, 4)]);

        // fallocate: zero the range written above, then punch a hole over it.
        let zero = Job {
            op: Op::Fallocate {
                mode: libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                len: 4096,
            },
            offset: 4096,
            iovecs: IoVecs(Vec::new()),
        };
        let punch = Job {
            op: Op::Fallocate {
                mode: libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                len: 4096,
            },
            offset: 0,
            iovecs: IoVecs(Vec::new()),
        };
        engine.submit(5, &zero).unwrap();
        engine.submit(6, &punch).unwrap();
        engine.flush_submissions().unwrap();
        let done = wait_all(&mut engine, 2);
        // A file system without these modes answers EOPNOTSUPP; the device then falls back.
        for (token, r) in &done {
            assert!(*r == 0 || *r == -libc::EOPNOTSUPP, "job {token}: {r}");
        }
        if done[0].1 == 0 {
            file.read_exact_at(&mut on_disk, 4096).unwrap();
            assert_eq!(on_disk, [0u8; 14], "zeroed through the engine");
        }
        assert_eq!(file.metadata().unwrap().len(), 8192, "the size is kept");
    }

    #[test]
    fn io_uring_reads_writes_and_flushes() {
        round_trip(EngineKind::IoUring);
    }

    #[test]
    fn the_ring_refuses_every_other_operation_and_file() {
        let path = std::env::temp_dir().join(format!("qx-engine-rs-{}", std::process::id()));
        std::fs::write(&path, [7u8; 4096]).unwrap();
        let file = Arc::new(File::open(&path).unwrap());
        let other = File::open("/etc/hostname").unwrap();
        let _ = std::fs::remove_file(&path);
        let mut e = match UringEngine::new(file, 8) {
            Ok(e) => e,
            Err(err) => {
                eprintln!("SKIPPED: no io_uring with restrictions here: {err}");
                return;
            }
        };
        let mut buf = [0u8; 16];
        let iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        let refused = [
            // READV on a file that is not the registered image.
            opcode::Readv::new(types::Fd(other.as_raw_fd()), iov.as_ptr(), 1)
                .build()
                .user_data(1),
            // An operation outside the list (OPENAT would let a guest open host files).
            opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), c"/etc/passwd".as_ptr())
                .build()
                .user_data(2),
        ];
        // One at a time: the kernel stops a batch at the first entry it refuses.
        for entry in &refused {
            // SAFETY: the entries point at `iov`, `buf` and a static string, alive until
            // the completions are reaped below.
            unsafe { e.ring.submission().push(entry).unwrap() };
            e.ring.submit_and_wait(1).unwrap();
            let got: Vec<(u64, i32)> = e
                .ring
                .completion()
                .map(|c| (c.user_data(), c.result()))
                .collect();
            assert_eq!(got, vec![(entry.get_user_data(), -libc::EACCES)]);
        }
        // The image itself, through the registered file, works.
        let ok = opcode::Readv::new(e.fd, iov.as_ptr(), 1)
            .build()
            .user_data(3);
        // SAFETY: as above.
        unsafe { e.ring.submission().push(&ok).unwrap() };
        e.ring.submit_and_wait(1).unwrap();
        let c: Vec<(u64, i32)> = e
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        assert_eq!(c, vec![(3, 16)]);
        assert_eq!(buf, [7u8; 16]);
    }

    #[test]
    fn thread_pool_reads_writes_and_flushes() {
        round_trip(EngineKind::Threads);
    }

    #[test]
    fn errors_come_back_as_negative_errno() {
        for kind in [EngineKind::IoUring, EngineKind::Threads] {
            // A read-only file: writes fail with EBADF.
            let path = std::env::temp_dir().join(format!("qx-engine-ro-{}", std::process::id()));
            std::fs::write(&path, [0u8; 512]).unwrap();
            let file = Arc::new(File::open(&path).unwrap());
            let _ = std::fs::remove_file(&path);
            let mut engine = Engine::new(file, 4, kind).unwrap();
            let mut buf = [1u8; 512];
            let job = Job {
                op: Op::Write,
                offset: 0,
                iovecs: IoVecs(vec![libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }]),
            };
            engine.submit(9, &job).unwrap();
            engine.flush_submissions().unwrap();
            assert_eq!(
                wait_all(&mut engine, 1),
                vec![(9, -libc::EBADF)],
                "{kind:?}"
            );
        }
    }
}
