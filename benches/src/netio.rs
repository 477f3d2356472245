//! TCP throughput and latency of `qx-io`: a server (run in the guest) and a client (run
//! in the nested host) that drives every test, in both directions.
//!
//! Protocol: the client connects and sends one command line; the server then
//!
//! - `SINK n`: reads `n` bytes, answers `OK n` (client → server throughput, timed by the
//!   client from the first byte sent to the answer);
//! - `SOURCE n`: writes `n` bytes (server → client throughput, timed by the client from
//!   the command to the last byte read);
//! - `ECHO n`: echoes `n` single bytes (request/response initiated by the client, timed
//!   by the client);
//! - `PING n`: sends `n` single bytes, each after the echo of the previous one, times
//!   each round trip itself and answers `RTT <ns> <ns> ...` (request/response initiated
//!   by the server);
//! - `QUIT`: answers `BYE` and ends the server.
//!
//! Both ends set `TCP_NODELAY`. Standard library only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Buffer size of bulk transfers.
const CHUNK: usize = 256 * 1024;
/// Longest command or answer line.
const MAX_LINE: usize = 64 * 1024 * 1024;

/// A test the client runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetTest {
    /// Client → server bulk.
    Send,
    /// Server → client bulk.
    Recv,
    /// 1-byte ping-pong, client initiates.
    Echo,
    /// 1-byte ping-pong, server initiates.
    Ping,
    /// Ends the server.
    Quit,
}

impl NetTest {
    /// `send`, `recv`, `echo`, `ping`, `quit`.
    pub fn name(self) -> &'static str {
        match self {
            NetTest::Send => "send",
            NetTest::Recv => "recv",
            NetTest::Echo => "echo",
            NetTest::Ping => "ping",
            NetTest::Quit => "quit",
        }
    }

    /// Parses [`NetTest::name`].
    pub fn parse(s: &str) -> Option<NetTest> {
        [
            NetTest::Send,
            NetTest::Recv,
            NetTest::Echo,
            NetTest::Ping,
            NetTest::Quit,
        ]
        .into_iter()
        .find(|t| t.name() == s)
    }
}

/// What a client test measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetResult {
    /// Bytes moved (bulk tests) or round trips made (latency tests).
    pub amount: u64,
    /// Wall time of the test, s.
    pub secs: f64,
    /// Round-trip times, µs (latency tests).
    pub rtts_us: Vec<f64>,
}

impl NetResult {
    /// Bulk throughput, MB/s.
    pub fn mbps(&self) -> f64 {
        if self.secs > 0.0 {
            self.amount as f64 / 1e6 / self.secs
        } else {
            0.0
        }
    }
}

fn read_line(r: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    let n = r.take(MAX_LINE as u64).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed",
        ));
    }
    Ok(line.trim_end().to_string())
}

fn bad(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

fn sink(r: &mut impl Read, mut n: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    while n > 0 {
        let want = (n as usize).min(CHUNK);
        let got = r.read(&mut buf[..want])?;
        if got == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("closed with {n} bytes still to come"),
            ));
        }
        n -= got as u64;
    }
    Ok(())
}

fn source(w: &mut impl Write, mut n: u64) -> std::io::Result<()> {
    let buf: Vec<u8> = (0..CHUNK).map(|i| (i * 131 % 251) as u8).collect();
    while n > 0 {
        let len = (n as usize).min(CHUNK);
        w.write_all(&buf[..len])?;
        n -= len as u64;
    }
    w.flush()
}

fn ping(s: &mut TcpStream, n: u64) -> std::io::Result<Vec<f64>> {
    let mut b = [0u8; 1];
    let mut rtts = Vec::with_capacity(n.min(1 << 20) as usize);
    for i in 0..n {
        let t = Instant::now();
        s.write_all(&[i as u8])?;
        s.read_exact(&mut b)?;
        rtts.push(t.elapsed().as_secs_f64() * 1e6);
        if b[0] != i as u8 {
            return Err(bad("the echo is not the byte sent"));
        }
    }
    Ok(rtts)
}

/// Serves one connection; `Ok(true)` after `QUIT`.
fn serve_one(stream: TcpStream) -> std::io::Result<bool> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let line = read_line(&mut reader)?;
    let (cmd, arg) = line.split_once(' ').unwrap_or((line.as_str(), "0"));
    let n: u64 = arg
        .trim()
        .parse()
        .map_err(|_| bad(format!("bad count in {line:?}")))?;
    match cmd {
        "SINK" => {
            sink(&mut reader, n)?;
            writeln!(w, "OK {n}")?;
        }
        "SOURCE" => source(&mut w, n)?,
        "ECHO" => {
            // Bytes may already sit in the reader's buffer.
            let mut b = [0u8; 1];
            for _ in 0..n {
                reader.read_exact(&mut b)?;
                w.write_all(&b)?;
            }
        }
        "PING" => {
            let mut s = w.try_clone()?;
            // The client sends nothing more before echoing, so the buffer is empty.
            if !reader.buffer().is_empty() {
                return Err(bad("data after PING"));
            }
            let rtts = ping(&mut s, n)?;
            let mut answer = String::from("RTT");
            for r in rtts {
                answer.push_str(&format!(" {}", (r * 1000.0).round() as u64));
            }
            writeln!(w, "{answer}")?;
        }
        "QUIT" => {
            writeln!(w, "BYE")?;
            return Ok(true);
        }
        _ => return Err(bad(format!("unknown command {line:?}"))),
    }
    let _ = w.shutdown(Shutdown::Write);
    Ok(false)
}

/// Accepts connections on `listener` until a `QUIT`; each connection on a thread of its
/// own. Errors of one connection are printed and do not end the server.
pub fn serve(listener: TcpListener) -> std::io::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    listener.set_nonblocking(true)?;
    loop {
        if rx.try_recv().is_ok() {
            return Ok(());
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                let tx = tx.clone();
                std::thread::spawn(move || match serve_one(stream) {
                    Ok(true) => {
                        let _ = tx.send(());
                    }
                    Ok(false) => {}
                    Err(e) => eprintln!("qx-io net-server: connection from {peer}: {e}"),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Connects to `addr`, retrying until `wait` has passed (the guest may not be up yet).
pub fn connect(addr: &str, wait: Duration) -> std::io::Result<TcpStream> {
    let deadline = Instant::now() + wait;
    loop {
        let attempt = addr.to_socket_addrs().and_then(|mut a| {
            let sa = a
                .next()
                .ok_or_else(|| bad(format!("{addr} resolves to nothing")))?;
            TcpStream::connect_timeout(&sa, Duration::from_secs(2))
        });
        match attempt {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Runs `test` with `amount` (bytes, or round trips) against the server at `stream`.
pub fn run_client(stream: TcpStream, test: NetTest, amount: u64) -> std::io::Result<NetResult> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let mut result = NetResult {
        amount,
        ..NetResult::default()
    };
    match test {
        NetTest::Send => {
            writeln!(w, "SINK {amount}")?;
            let t = Instant::now();
            source(&mut w, amount)?;
            let answer = read_line(&mut reader)?;
            result.secs = t.elapsed().as_secs_f64();
            if answer != format!("OK {amount}") {
                return Err(bad(format!("server answered {answer:?}")));
            }
        }
        NetTest::Recv => {
            writeln!(w, "SOURCE {amount}")?;
            let t = Instant::now();
            sink(&mut reader, amount)?;
            result.secs = t.elapsed().as_secs_f64();
        }
        NetTest::Echo => {
            writeln!(w, "ECHO {amount}")?;
            let t = Instant::now();
            result.rtts_us = ping(&mut w, amount)?;
            result.secs = t.elapsed().as_secs_f64();
        }
        NetTest::Ping => {
            writeln!(w, "PING {amount}")?;
            let t = Instant::now();
            let mut b = [0u8; 1];
            for _ in 0..amount {
                reader.read_exact(&mut b)?;
                w.write_all(&b)?;
            }
            let answer = read_line(&mut reader)?;
            result.secs = t.elapsed().as_secs_f64();
            let mut parts = answer.split(' ');
            if parts.next() != Some("RTT") {
                return Err(bad(format!("server answered {:.60}", answer)));
            }
            result.rtts_us = parts
                .map(|p| p.parse::<f64>().map(|ns| ns / 1000.0))
                .collect::<Result<_, _>>()
                .map_err(|_| bad("bad RTT list"))?;
            if result.rtts_us.len() as u64 != amount {
                return Err(bad("RTT list of the wrong length"));
            }
        }
        NetTest::Quit => {
            writeln!(w, "QUIT")?;
            let answer = read_line(&mut reader)?;
            if answer != "BYE" {
                return Err(bad(format!("server answered {answer:?}")));
            }
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_test_over_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = std::thread::spawn(move || serve(listener));
        let run = |t: NetTest, n: u64| {
            let s = connect(&addr, Duration::from_secs(5)).unwrap();
            run_client(s, t, n).unwrap()
        };
        let r = run(NetTest::Send, 3 * CHUNK as u64 + 17);
        assert!(r.secs > 0.0 && r.mbps() > 0.0);
        let r = run(NetTest::Recv, 1_000_001);
        assert_eq!(r.amount, 1_000_001);
        let r = run(NetTest::Echo, 300);
        assert_eq!(r.rtts_us.len(), 300);
        assert!(r.rtts_us.iter().all(|&x| x > 0.0));
        let r = run(NetTest::Ping, 200);
        assert_eq!(r.rtts_us.len(), 200);
        run(NetTest::Quit, 0);
        server.join().unwrap().unwrap();
        for t in ["send", "recv", "echo", "ping", "quit"] {
            assert_eq!(NetTest::parse(t).unwrap().name(), t);
        }
    }
}
