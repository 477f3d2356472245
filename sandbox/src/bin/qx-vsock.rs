//! `qx-vsock`: a tiny static helper for the vsock end-to-end tests (busybox has no
//! AF_VSOCK, and its `nc` has no Unix sockets). It opens one stream connection, copies
//! stdin to the socket (then shuts down its write side) and the socket to stdout until
//! end of file, and prints `qx-vsock: sent=N received=M` on stderr.
//!
//! ```text
//! qx-vsock connect CID PORT        guest: AF_VSOCK connect
//! qx-vsock listen PORT             guest: AF_VSOCK listen, accept one
//! qx-vsock unix-connect PATH PORT  host: connect to the VMM's socket, CONNECT PORT,
//!                                  wait for "OK <port>" (exit 3 if refused)
//! qx-vsock unix-listen PATH        host: listen on PATH (e.g. <socket>_<port>), accept one
//! qx-vsock hold CID PORT LINE      guest: connect, send LINE, then copy the socket to
//!                                  stdout until the connection ends (printing how)
//! qx-vsock local-cid               guest: print this machine's CID (from /dev/vsock)
//! ```

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

fn usage() -> ExitCode {
    eprintln!(
        "usage: qx-vsock connect CID PORT | listen PORT | unix-connect PATH PORT | unix-listen PATH | hold CID PORT LINE | local-cid"
    );
    ExitCode::from(2)
}

fn vsock_addr(cid: u32, port: u32) -> libc::sockaddr_vm {
    // SAFETY: sockaddr_vm is plain data; all zeroes is a valid value.
    let mut a: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    a.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    a.svm_cid = cid;
    a.svm_port = port;
    a
}

fn vsock_socket() -> io::Result<File> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn check(r: libc::c_int, what: &str) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn vsock_connect(cid: u32, port: u32) -> io::Result<File> {
    let s = vsock_socket()?;
    let a = vsock_addr(cid, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
    let r = unsafe { libc::connect(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) };
    check(r, "connect")?;
    Ok(s)
}

fn vsock_listen(port: u32) -> io::Result<File> {
    let s = vsock_socket()?;
    let a = vsock_addr(libc::VMADDR_CID_ANY, port);
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `a` is a valid sockaddr_vm of `len` bytes.
    let r = unsafe { libc::bind(s.as_raw_fd(), (&a as *const libc::sockaddr_vm).cast(), len) };
    check(r, "bind")?;
    // SAFETY: listen(2) on our socket.
    check(unsafe { libc::listen(s.as_raw_fd(), 1) }, "listen")?;
    eprintln!("qx-vsock: listening on port {port}");
    // SAFETY: accept(2) on our listening socket; we do not want the peer address.
    let fd = unsafe {
        libc::accept4(
            s.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    check(fd, "accept")?;
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Reads the VMM's answer line byte by byte (what follows is data).
fn read_line(s: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "closed before the OK line: refused",
            ));
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
        if line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "answer too long",
            ));
        }
    }
}

/// Copies stdin to `w` in a thread (then shuts `w_fd` down for writing) and `r` to
/// stdout; returns (sent, received).
fn pump<R: Read, W: Write + Send + 'static>(
    mut r: R,
    mut w: W,
    w_fd: RawFd,
) -> io::Result<(u64, u64)> {
    let sender = std::thread::spawn(move || -> io::Result<u64> {
        let n = io::copy(&mut io::stdin().lock(), &mut w)?;
        w.flush()?;
        // SAFETY: shutdown(2) on the socket `w` writes to, which is still open (w lives).
        unsafe { libc::shutdown(w_fd, libc::SHUT_WR) };
        drop(w);
        Ok(n)
    });
    let mut out = io::stdout().lock();
    let received = io::copy(&mut r, &mut out)?;
    out.flush()?;
    let sent = sender
        .join()
        .map_err(|_| io::Error::other("sender thread panicked"))??;
    Ok((sent, received))
}

fn run(args: &[String]) -> io::Result<Option<(u64, u64)>> {
    let num = |s: &str| -> io::Result<u32> {
        s.parse().map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{s:?} is not a number"),
            )
        })
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match args.as_slice() {
        ["connect", cid, port] => {
            let s = vsock_connect(num(cid)?, num(port)?)?;
            let fd = s.as_raw_fd();
            pump(s.try_clone()?, s, fd)?
        }
        ["hold", cid, port, line] => {
            let mut s = vsock_connect(num(cid)?, num(port)?)?;
            eprintln!("qx-vsock: connected");
            s.write_all(format!("{line}\n").as_bytes())?;
            let mut out = io::stdout().lock();
            let mut buf = [0u8; 4096];
            let mut received = 0u64;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        eprintln!("qx-vsock: held; the peer closed");
                        break;
                    }
                    Ok(n) => {
                        out.write_all(&buf[..n])?;
                        out.flush()?;
                        received += n as u64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io::Error::new(e.kind(), format!("held; {e}"))),
                }
            }
            (line.len() as u64 + 1, received)
        }
        ["listen", port] => {
            let s = vsock_listen(num(port)?)?;
            let fd = s.as_raw_fd();
            pump(s.try_clone()?, s, fd)?
        }
        ["unix-connect", path, port] => {
            let mut s = UnixStream::connect(path)?;
            s.write_all(format!("CONNECT {}\n", num(port)?).as_bytes())?;
            let line = read_line(&mut s)?;
            if !line.starts_with("OK ") {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("answer {line:?}"),
                ));
            }
            eprintln!("qx-vsock: {line}");
            let fd = s.as_raw_fd();
            pump(s.try_clone()?, s, fd)?
        }
        ["unix-listen", path] => {
            let l = UnixListener::bind(path)?;
            eprintln!("qx-vsock: listening on {path}");
            let (s, _) = l.accept()?;
            let fd = s.as_raw_fd();
            pump(s.try_clone()?, s, fd)?
        }
        _ => return Ok(None),
    };
    Ok(Some(r))
}

/// The local CID, as the guest's vsock transport has it now (`IOCTL_VM_SOCKETS_GET_LOCAL_CID`).
fn local_cid() -> io::Result<u32> {
    const IOCTL_VM_SOCKETS_GET_LOCAL_CID: libc::c_ulong = 0x7b9;
    let dev = File::open("/dev/vsock")?;
    let mut cid: u32 = 0;
    // SAFETY: the ioctl writes one u32 through the pointer, which is valid for it.
    let r = unsafe {
        libc::ioctl(
            dev.as_raw_fd(),
            IOCTL_VM_SOCKETS_GET_LOCAL_CID,
            &mut cid as *mut u32,
        )
    };
    check(r, "IOCTL_VM_SOCKETS_GET_LOCAL_CID")?;
    Ok(cid)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args == ["local-cid"] {
        return match local_cid() {
            Ok(cid) => {
                println!("{cid}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("qx-vsock: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&args) {
        Ok(Some((sent, received))) => {
            eprintln!("qx-vsock: sent={sent} received={received}");
            ExitCode::SUCCESS
        }
        Ok(None) => usage(),
        Err(e) => {
            eprintln!("qx-vsock: {e}");
            ExitCode::from(if e.kind() == io::ErrorKind::ConnectionRefused {
                3
            } else {
                1
            })
        }
    }
}
