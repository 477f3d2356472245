//! What happens when a filter refuses a call: the SIGSYS handler writes the exit record and
//! a line on stderr, naming the syscall and the thread, and ends the process.
//!
//! Everything here runs in a signal handler on a thread in an unknown state: it allocates
//! nothing, takes no lock, and makes only calls every filter allows (write, pwrite64,
//! ftruncate, exit_group).

use std::io;
use std::sync::atomic::{AtomicI32, Ordering};

use super::EXIT_SECCOMP;

/// The exit record's descriptor, opened at start so that the handler need not open it.
static EXIT_FD: AtomicI32 = AtomicI32::new(-1);

/// Opens `path` for the exit record the handler may have to write (the normal exit path
/// writes it by path, replacing this file).
pub fn prepare_exit_record(path: &std::path::Path) -> io::Result<()> {
    use std::os::fd::IntoRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    EXIT_FD.store(f.into_raw_fd(), Ordering::Release);
    Ok(())
}

/// A fixed buffer the handler formats into.
struct Buf {
    data: [u8; 256],
    len: usize,
}

impl Buf {
    fn push(&mut self, s: &[u8]) {
        for b in s {
            if self.len < self.data.len() {
                self.data[self.len] = *b;
                self.len += 1;
            }
        }
    }
    fn push_num(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
    fn push_hex(&mut self, n: u64) {
        let mut digits = [0u8; 16];
        let mut i = digits.len();
        let mut n = n;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(n & 0xf) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
    fn bytes(&self) -> &[u8] {
        &self.data[..self.len]
    }
}

/// The longest part of a refused call's path that the report shows.
const PATH_SHOWN: usize = 96;

/// `syscall N [(ioctl request 0xR) | (path "P")] on thread NAME (filter KIND)`. `path` is
/// what an open or openat call named (already copied out of the caller's memory).
fn describe(out: &mut Buf, nr: i32, arg1: u64, path: &[u8]) {
    let (kind, name) = super::current();
    out.push(b"syscall ");
    out.push_num(nr as u64);
    if i64::from(nr) == libc::SYS_ioctl {
        // Which ioctl: the request is what the lists filter on.
        out.push(b" (ioctl request 0x");
        out.push_hex(arg1);
        out.push(b")");
    }
    if !path.is_empty() {
        // Which file: the path says which library or part of the VMM asked. Kept
        // JSON-safe (the record is JSON): anything outside a plain set becomes '?'.
        out.push(b" (path ");
        for b in path {
            if b.is_ascii_alphanumeric() || b"/-_.:+@ ".contains(b) {
                out.push(&[*b]);
            } else {
                out.push(b"?");
            }
        }
        out.push(b")");
    }
    out.push(b" on thread ");
    let n = name.iter().position(|b| *b == 0).unwrap_or(name.len());
    // Thread names are ours (vcpu0, virtio-blk...); keep them JSON-safe anyway.
    for b in &name[..n] {
        if b.is_ascii_alphanumeric() || b"-_.".contains(b) {
            out.push(&[*b]);
        }
    }
    out.push(b" (filter ");
    out.push(kind.map(|k| k.name()).unwrap_or("none").as_bytes());
    out.push(b")");
}

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // siginfo_t for SIGSYS: signo, errno, code (3 ints), padding, then the _sigsys member
    // { void *call_addr; int syscall; unsigned arch; } at offset 16.
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; the syscall
    // number is the int at offset 24 of it (x86_64).
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() };
    // The first two arguments (rdi, rsi) as the thread made the call, from the saved context.
    let (arg0, arg1) = if ctx.is_null() {
        (0, 0)
    } else {
        // SAFETY: for a SA_SIGINFO handler the third argument is the thread's ucontext_t.
        let regs = unsafe { &(*(ctx as *const libc::ucontext_t)).uc_mcontext.gregs };
        (
            regs[libc::REG_RDI as usize] as u64,
            regs[libc::REG_RSI as usize] as u64,
        )
    };
    let path_ptr = match i64::from(nr) {
        libc::SYS_openat => arg1,
        libc::SYS_open => arg0,
        _ => 0,
    };
    let mut path = [0u8; PATH_SHOWN];
    // SAFETY: the pointer is what the thread passed to the kernel as a path: a
    // NUL-terminated string in its own memory, which this copy reads no further than
    // PATH_SHOWN bytes or its NUL (a null pointer is skipped).
    let path_len = unsafe { copy_c_string(path_ptr as *const u8, &mut path) };
    let mut detail = Buf {
        data: [0; 256],
        len: 0,
    };
    describe(&mut detail, nr, arg1, &path[..path_len]);
    let mut line = Buf {
        data: [0; 256],
        len: 0,
    };
    line.push(b"quantix-vmm: seccomp: refused ");
    line.push(detail.bytes());
    line.push(b"; the VMM stops\n");
    let mut rec = Buf {
        data: [0; 256],
        len: 0,
    };
    rec.push(b"{\"code\":");
    rec.push_num(EXIT_SECCOMP as u64);
    rec.push(b",\"reason\":\"seccomp\",\"detail\":\"");
    rec.push(detail.bytes());
    rec.push(b"\"}");
    // SAFETY: write, ftruncate, pwrite64 and _exit are async-signal-safe; the buffers are
    // valid for their lengths; a bad descriptor only makes the call fail.
    unsafe {
        let _ = libc::write(2, line.bytes().as_ptr().cast(), line.len);
        let fd = EXIT_FD.load(Ordering::Acquire);
        if fd >= 0 {
            let _ = libc::ftruncate(fd, 0);
            let _ = libc::pwrite(fd, rec.bytes().as_ptr().cast(), rec.len, 0);
        }
        libc::_exit(EXIT_SECCOMP);
    }
}

/// Copies the NUL-terminated string at `src` into `out` (at most its length, without the
/// NUL) and returns how many bytes it copied; nothing for a null pointer.
///
/// # Safety
/// `src` is null or points to readable memory up to its NUL or `out.len()` bytes.
unsafe fn copy_c_string(src: *const u8, out: &mut [u8]) -> usize {
    if src.is_null() {
        return 0;
    }
    let mut n = 0;
    while n < out.len() {
        // SAFETY: within the bound the caller promises.
        let b = unsafe { *src.add(n) };
        if b == 0 {
            break;
        }
        out[n] = b;
        n += 1;
    }
    n
}

/// Installs the SIGSYS handler (process-wide).
pub fn install_handler() -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields that matter are set below.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = on_sigsys as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `sa.sa_mask` is a sigset_t we own.
    unsafe { libc::sigemptyset(&mut sa.sa_mask) };
    // SAFETY: `sa` is a valid sigaction; the old one is not needed.
    if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_formatted_without_allocation() {
        let mut b = Buf {
            data: [0; 256],
            len: 0,
        };
        describe(&mut b, 41, 0, b"");
        // This test thread installed no filter: no name, no kind.
        assert_eq!(b.bytes(), b"syscall 41 on thread  (filter none)");
        let mut b = Buf {
            data: [0; 256],
            len: 0,
        };
        describe(&mut b, libc::SYS_ioctl as i32, 0xAE80, b"");
        assert_eq!(
            b.bytes(),
            b"syscall 16 (ioctl request 0xae80) on thread  (filter none)"
        );
        let mut b = Buf {
            data: [0; 256],
            len: 0,
        };
        let c = c"/sys/devices/system/cpu/online";
        let mut path = [0u8; PATH_SHOWN];
        // SAFETY: a C string literal, NUL-terminated.
        let n = unsafe { copy_c_string(c.as_ptr().cast(), &mut path) };
        describe(&mut b, libc::SYS_openat as i32, 0, &path[..n]);
        assert_eq!(
            b.bytes(),
            &b"syscall 257 (path /sys/devices/system/cpu/online) on thread  (filter none)"[..]
        );
        // A quote or backslash cannot break the JSON record; a long path is cut.
        let mut b = Buf {
            data: [0; 256],
            len: 0,
        };
        describe(&mut b, libc::SYS_openat as i32, 0, br#"a\"b"#);
        assert_eq!(
            b.bytes(),
            b"syscall 257 (path a??b) on thread  (filter none)"
        );
        let long = [b'x'; 200];
        let mut path = [0u8; PATH_SHOWN];
        let mut c = long.to_vec();
        c.push(0);
        // SAFETY: NUL-terminated above.
        assert_eq!(unsafe { copy_c_string(c.as_ptr(), &mut path) }, PATH_SHOWN);
        // SAFETY: null is allowed.
        assert_eq!(unsafe { copy_c_string(std::ptr::null(), &mut path) }, 0);
        let mut n = Buf {
            data: [0; 256],
            len: 0,
        };
        n.push_num(0);
        n.push(b" ");
        n.push_num(18_446_744_073_709_551_615);
        assert_eq!(n.bytes(), b"0 18446744073709551615");
        let mut full = Buf {
            data: [0; 256],
            len: 0,
        };
        for _ in 0..300 {
            full.push(b"x");
        }
        assert_eq!(full.len, 256);
    }
}
