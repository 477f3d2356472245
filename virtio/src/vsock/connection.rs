//! One vsock stream connection between a guest port and a host Unix socket, as plain
//! data: its state, the credit counters of both directions, the bytes on their way to
//! the host and the control packets owed to the guest. The muxer does the I/O; this
//! module decides what may be sent and received, so that it can be tested (and later
//! saved and restored) without sockets.
//!
//! Flow control (virtio 1.2, 5.10.6.3): each side advertises `buf_alloc` (its receive
//! buffer for the connection) and `fwd_cnt` (bytes it has consumed, ever, wrapping).
//! A sender may have at most `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)` bytes in
//! flight. Toward the guest we never send more than that; from the guest, bytes beyond
//! our `buf_alloc` are a credit violation and reset the connection.

use std::collections::VecDeque;
use std::num::Wrapping;

use thiserror::Error;

use super::packet::{op, shutdown, Header};

/// Our receive buffer per connection: how many bytes the guest may have in flight
/// toward a host socket that does not read.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// We tell the guest about freed buffer space once this much was forwarded since the
/// last time it heard our `fwd_cnt` (a blocked guest has `CONN_BUF_SIZE` in flight,
/// so it always gets an update).
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST owed or sent to the guest, waiting for its RESPONSE.
    Connecting,
    /// Data may flow.
    Established,
    /// Reset or finished: nothing flows any more; an RST may still be owed.
    Closed,
}

/// Control packets owed to the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Owed {
    /// REQUEST (host-initiated connection).
    pub request: bool,
    /// RESPONSE (guest-initiated connection accepted).
    pub response: bool,
    /// CREDIT_UPDATE.
    pub credit_update: bool,
    /// CREDIT_REQUEST (we have data but no credit).
    pub credit_request: bool,
    /// RST.
    pub rst: bool,
}

/// Why a guest packet broke the connection (the connection is reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// More data than our advertised buffer.
    #[error(
        "credit violation: {pending} bytes pending plus {len} new exceed buf_alloc {buf_alloc}"
    )]
    Credit {
        /// Bytes not yet forwarded to the host.
        pending: usize,
        /// The packet's payload.
        len: usize,
        /// Our buffer.
        buf_alloc: u32,
    },
    /// An operation the connection's state does not allow.
    #[error("operation {op} is not allowed in state {state:?}")]
    UnexpectedOp {
        /// The operation.
        op: u16,
        /// The state.
        state: State,
    },
    /// Data after the guest said it would send no more.
    #[error("data after SHUTDOWN(SEND)")]
    DataAfterShutdown,
}

/// What a guest packet did to the connection, for the muxer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing special.
    None,
    /// A host-initiated connection was accepted by the guest.
    Established,
    /// The guest reset the connection: forget it without answering.
    Reset,
}

/// A packet for the guest decided by [`Connection::next_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxPacket {
    /// Its header (credit fields filled in).
    pub hdr: Header,
    /// Payload bytes in the buffer passed to `next_packet`.
    pub len: usize,
}

/// One connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    /// The host side's port (the guest's destination port).
    pub local_port: u32,
    /// The guest's port.
    pub peer_port: u32,
    /// The guest's CID.
    pub guest_cid: u64,
    /// Its state.
    pub state: State,
    /// Control packets owed to the guest.
    pub owed: Owed,
    // Guest -> host.
    /// Bytes from the guest not yet written to the host socket; the first
    /// `to_host_prefix` of them are our own (the `OK <port>` line), outside the credit.
    pub to_host: VecDeque<u8>,
    /// See `to_host`.
    pub to_host_prefix: usize,
    /// Guest bytes written to the host, ever (our `fwd_cnt`).
    pub fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` the guest last heard from us.
    pub last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest will send nothing more.
    pub guest_shut_send: bool,
    /// The guest will receive nothing more.
    pub guest_shut_rcv: bool,
    /// We shut down the host socket's write side (after `guest_shut_send`).
    pub host_write_shut: bool,
    // Host -> guest.
    /// The guest's receive buffer.
    pub peer_buf_alloc: u32,
    /// Bytes the guest has consumed, ever.
    pub peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest, ever.
    pub rx_cnt: Wrapping<u32>,
    /// The host socket may have bytes to read (cleared when a read would block).
    pub host_readable: bool,
    /// The host socket reached end of file.
    pub host_eof: bool,
    /// We sent SHUTDOWN(SEND) after `host_eof`.
    pub shutdown_sent: bool,
}

impl Connection {
    fn new(guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            local_port,
            peer_port,
            guest_cid,
            state,
            owed: Owed::default(),
            to_host: VecDeque::new(),
            to_host_prefix: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            guest_shut_send: false,
            guest_shut_rcv: false,
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            shutdown_sent: false,
        }
    }

    /// A connection the guest asked for with `req` (a validated REQUEST), accepted
    /// because the host socket answered: RESPONSE owed.
    pub fn guest_initiated(guest_cid: u64, req: &Header) -> Self {
        let mut c = Self::new(guest_cid, req.dst_port, req.src_port, State::Established);
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = Wrapping(req.fwd_cnt);
        c.owed.response = true;
        c
    }

    /// A connection a host process asked for to guest port `peer_port`: REQUEST owed.
    pub fn host_initiated(guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(guest_cid, local_port, peer_port, State::Connecting);
        c.owed.request = true;
        c
    }

    /// Bytes the guest can still take: its buffer minus what is in flight. A guest
    /// reporting a `fwd_cnt` ahead of what we sent gets no credit rather than a lot.
    pub fn peer_free(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Guest bytes waiting for the host (without our own prefix).
    pub fn pending_to_host(&self) -> usize {
        self.to_host.len() - self.to_host_prefix
    }

    /// Applies a validated packet from the guest; `data` is its payload.
    pub fn on_guest_packet(&mut self, hdr: &Header, data: &[u8]) -> Result<Effect, ProtocolError> {
        // Every packet carries the sender's credit.
        if hdr.buf_alloc != self.peer_buf_alloc || hdr.fwd_cnt != self.peer_fwd_cnt.0 {
            self.owed.credit_request = false;
        }
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        let unexpected = |state| ProtocolError::UnexpectedOp { op: hdr.op, state };
        if self.state == State::Closed && hdr.op != op::RST {
            // We reset or finished the connection and our RST is on its way; the guest
            // may still be reading what it got and returning credit. Nothing to do.
            return Ok(Effect::None);
        }
        match hdr.op {
            op::RST => {
                self.state = State::Closed;
                self.owed = Owed::default();
                self.to_host.clear();
                self.to_host_prefix = 0;
                Ok(Effect::Reset)
            }
            op::RESPONSE if self.state == State::Connecting => {
                self.state = State::Established;
                self.owed.request = false;
                let line = format!("OK {}\n", self.local_port);
                self.to_host.extend(line.as_bytes());
                self.to_host_prefix = line.len();
                Ok(Effect::Established)
            }
            op::RW if self.state == State::Established => {
                if self.guest_shut_send {
                    return Err(ProtocolError::DataAfterShutdown);
                }
                let pending = self.pending_to_host();
                if pending + data.len() > CONN_BUF_SIZE as usize {
                    return Err(ProtocolError::Credit {
                        pending,
                        len: data.len(),
                        buf_alloc: CONN_BUF_SIZE,
                    });
                }
                self.to_host.extend(data);
                Ok(Effect::None)
            }
            op::SHUTDOWN if self.state == State::Established => {
                if hdr.flags & shutdown::SEND != 0 {
                    self.guest_shut_send = true;
                }
                if hdr.flags & shutdown::RCV != 0 {
                    self.guest_shut_rcv = true;
                }
                Ok(Effect::None)
            }
            op::CREDIT_UPDATE if self.state != State::Closed => Ok(Effect::None),
            op::CREDIT_REQUEST if self.state != State::Closed => {
                self.owed.credit_update = true;
                Ok(Effect::None)
            }
            _ => Err(unexpected(self.state)),
        }
    }

    /// `n` bytes of `to_host` were written to the host socket.
    pub fn host_wrote(&mut self, n: usize) {
        let n = n.min(self.to_host.len());
        self.to_host.drain(..n);
        let ours = n.min(self.to_host_prefix);
        self.to_host_prefix -= ours;
        self.fwd_cnt += Wrapping((n - ours) as u32);
        if (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD {
            self.owed.credit_update = true;
        }
    }

    /// True when the host socket's write side should now be shut down: the guest
    /// will send no more and everything it sent reached the host.
    pub fn wants_host_write_shutdown(&self) -> bool {
        self.state == State::Established
            && self.guest_shut_send
            && !self.host_write_shut
            && self.to_host.is_empty()
    }

    /// Resets the connection: nothing more flows, an RST is owed.
    pub fn reset(&mut self) {
        self.state = State::Closed;
        self.owed = Owed {
            rst: true,
            ..Owed::default()
        };
        self.to_host.clear();
        self.to_host_prefix = 0;
    }

    /// Closes the connection with an RST once both directions are finished: the guest
    /// shut down both (close), or each side has sent its last byte and it arrived.
    pub fn finish_if_done(&mut self) {
        if self.state != State::Established || !self.to_host.is_empty() {
            return;
        }
        let guest_closed = self.guest_shut_send && self.guest_shut_rcv;
        let both_sent = self.guest_shut_send && self.host_write_shut && self.shutdown_sent;
        if guest_closed || both_sent {
            self.reset();
        }
    }

    /// True when the connection can be forgotten: closed and owing nothing.
    pub fn is_finished(&self) -> bool {
        self.state == State::Closed && !self.owed.rst
    }

    /// Whether we want to read the host socket now (and so wait for it to be readable).
    pub fn wants_host_read(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && !self.guest_shut_rcv
            && self.peer_free() > 0
    }

    /// Whether the connection has a packet for the guest (data needs the host socket
    /// to be readable).
    pub fn wants_rx(&self) -> bool {
        let o = &self.owed;
        o.rst
            || o.request
            || o.response
            || o.credit_update
            || o.credit_request
            || (self.state == State::Established && self.host_eof && !self.shutdown_sent)
            || (self.host_readable && self.wants_host_read())
    }

    /// Decides the next packet for the guest. Data is read from the host with `read`
    /// into `buf` (at most `buf.len()` bytes, and never more than the guest's credit);
    /// a read of 0 bytes is the host's end of file, an error `WouldBlock` means nothing
    /// to read now, another error resets the connection.
    pub fn next_packet<R>(&mut self, buf: &mut [u8], mut read: R) -> Option<RxPacket>
    where
        R: FnMut(&mut [u8]) -> std::io::Result<usize>,
    {
        let mut hdr = Header::to_guest(self.guest_cid, self.local_port, self.peer_port, 0);
        let mut len = 0;
        if self.owed.rst {
            self.owed = Owed::default();
            hdr.op = op::RST;
            return Some(RxPacket { hdr, len: 0 });
        }
        if self.state == State::Closed {
            return None;
        }
        if self.owed.request {
            self.owed.request = false;
            hdr.op = op::REQUEST;
        } else if self.owed.response {
            self.owed.response = false;
            hdr.op = op::RESPONSE;
        } else if self.owed.credit_update {
            hdr.op = op::CREDIT_UPDATE;
        } else {
            if self.host_readable && self.wants_host_read() {
                let max = buf.len().min(self.peer_free() as usize);
                match read(&mut buf[..max]) {
                    Ok(0) => {
                        self.host_eof = true;
                        self.host_readable = false;
                    }
                    Ok(n) => {
                        len = n.min(max);
                        hdr.op = op::RW;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        self.reset();
                        return self.next_packet(buf, read);
                    }
                }
            }
            if hdr.op == 0 {
                if self.state == State::Established && self.host_eof && !self.shutdown_sent {
                    self.shutdown_sent = true;
                    hdr.op = op::SHUTDOWN;
                    hdr.flags = shutdown::SEND;
                } else if self.owed.credit_request {
                    self.owed.credit_request = false;
                    hdr.op = op::CREDIT_REQUEST;
                } else {
                    return None;
                }
            }
        }
        // Every packet carries our credit, so it also serves as a credit update.
        self.owed.credit_update = false;
        hdr.len = len as u32;
        hdr.buf_alloc = CONN_BUF_SIZE;
        hdr.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.rx_cnt += Wrapping(len as u32);
        if hdr.op == op::RW && self.peer_free() == 0 && self.host_readable {
            // Out of credit with more to send: ask once.
            self.owed.credit_request = true;
        }
        Some(RxPacket { hdr, len })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::packet::{HOST_CID, TYPE_STREAM};
    use std::io;

    const CID: u64 = 3;

    fn from_guest(op_: u16, len: u32, buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn nothing(_: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn established() -> Connection {
        let mut c = Connection::guest_initiated(CID, &from_guest(op::REQUEST, 0, 4096, 0));
        let mut buf = [0u8; 16];
        let p = c.next_packet(&mut buf, nothing).unwrap();
        assert_eq!(p.hdr.op, op::RESPONSE);
        c
    }

    #[test]
    fn guest_initiated_connection_answers_with_response_and_our_credit() {
        let mut c = Connection::guest_initiated(CID, &from_guest(op::REQUEST, 0, 4096, 0));
        assert_eq!((c.local_port, c.peer_port), (52, 1234));
        assert!(c.wants_rx());
        let mut buf = [0u8; 16];
        let p = c.next_packet(&mut buf, nothing).unwrap();
        assert_eq!(
            (p.hdr.op, p.hdr.src_port, p.hdr.dst_port, p.hdr.dst_cid),
            (op::RESPONSE, 52, 1234, CID)
        );
        assert_eq!((p.hdr.buf_alloc, p.hdr.fwd_cnt), (CONN_BUF_SIZE, 0));
        assert!(!c.wants_rx());
        assert!(c.next_packet(&mut buf, nothing).is_none());
    }

    #[test]
    fn host_initiated_connection_sends_request_then_ok_line_on_response() {
        let mut c = Connection::host_initiated(CID, 1 << 30, 52);
        let mut buf = [0u8; 16];
        assert_eq!(
            c.next_packet(&mut buf, nothing).unwrap().hdr.op,
            op::REQUEST
        );
        // Data before the guest accepted is a protocol error.
        let mut early = c.clone();
        assert!(early
            .on_guest_packet(&from_guest(op::RW, 1, 4096, 0), b"x")
            .is_err());
        let resp = Header {
            src_port: 52,
            dst_port: 1 << 30,
            ..from_guest(op::RESPONSE, 0, 4096, 0)
        };
        assert_eq!(c.on_guest_packet(&resp, &[]), Ok(Effect::Established));
        assert_eq!(c.state, State::Established);
        let line: Vec<u8> = c.to_host.iter().copied().collect();
        assert_eq!(line, format!("OK {}\n", 1 << 30).as_bytes());
        // Our own line is not guest data: it does not count toward fwd_cnt.
        c.on_guest_packet(&from_guest(op::RW, 3, 4096, 0), b"abc")
            .unwrap();
        assert_eq!(c.pending_to_host(), 3);
        c.host_wrote(c.to_host.len());
        assert_eq!(c.fwd_cnt.0, 3);
        assert_eq!(c.to_host_prefix, 0);
    }

    #[test]
    fn host_data_respects_the_guests_credit() {
        let mut c = established();
        let mut buf = [0u8; 8192];
        c.host_readable = true;
        // 4096 bytes of credit; the host has plenty.
        let p = c.next_packet(&mut buf, |b| Ok(b.len())).unwrap();
        assert_eq!((p.hdr.op, p.len), (op::RW, 4096));
        assert_eq!(c.peer_free(), 0);
        assert!(!c.wants_host_read(), "no credit, no read");
        // Out of credit with data left: one CREDIT_REQUEST.
        let p = c
            .next_packet(&mut buf, |_| panic!("must not read"))
            .unwrap();
        assert_eq!(p.hdr.op, op::CREDIT_REQUEST);
        assert!(c
            .next_packet(&mut buf, |_| panic!("must not read"))
            .is_none());
        // The guest consumed 1000 bytes.
        c.on_guest_packet(&from_guest(op::CREDIT_UPDATE, 0, 4096, 1000), &[])
            .unwrap();
        assert_eq!(c.peer_free(), 1000);
        let p = c.next_packet(&mut buf, |b| Ok(b.len())).unwrap();
        assert_eq!(p.len, 1000);
        // A guest that claims to have consumed more than we sent gets no extra credit.
        c.on_guest_packet(&from_guest(op::CREDIT_UPDATE, 0, 4096, 900_000), &[])
            .unwrap();
        assert_eq!(c.peer_free(), 0);
    }

    #[test]
    fn credit_counters_wrap_around() {
        let mut c = established();
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.peer_fwd_cnt = Wrapping(u32::MAX - 10);
        c.host_readable = true;
        let mut buf = [0u8; 100];
        let p = c.next_packet(&mut buf, |b| Ok(b.len())).unwrap();
        assert_eq!(p.len, 100);
        assert_eq!(c.rx_cnt.0, 89);
        assert_eq!(c.peer_free(), 4096 - 100);
        // And on our side.
        c.fwd_cnt = Wrapping(u32::MAX - 1);
        c.last_fwd_cnt_sent = c.fwd_cnt;
        c.on_guest_packet(&from_guest(op::RW, 5, 4096, 89), b"hello")
            .unwrap();
        c.host_wrote(5);
        assert_eq!(c.fwd_cnt.0, 3);
    }

    #[test]
    fn guest_credit_violation_is_refused() {
        let mut c = established();
        let big = vec![0u8; 64 * 1024];
        for _ in 0..4 {
            c.on_guest_packet(&from_guest(op::RW, big.len() as u32, 4096, 0), &big)
                .unwrap();
        }
        assert_eq!(c.pending_to_host(), CONN_BUF_SIZE as usize);
        let e = c
            .on_guest_packet(&from_guest(op::RW, 1, 4096, 0), b"x")
            .unwrap_err();
        assert!(matches!(e, ProtocolError::Credit { .. }), "{e}");
        // Forwarding frees the buffer and earns the guest a credit update.
        c.host_wrote(CREDIT_UPDATE_THRESHOLD as usize);
        assert!(c.owed.credit_update);
        let mut buf = [0u8; 16];
        let p = c.next_packet(&mut buf, nothing).unwrap();
        assert_eq!(
            (p.hdr.op, p.hdr.fwd_cnt),
            (op::CREDIT_UPDATE, CREDIT_UPDATE_THRESHOLD)
        );
        c.on_guest_packet(&from_guest(op::RW, 1, 4096, 0), b"x")
            .unwrap();
    }

    #[test]
    fn credit_request_gets_an_update() {
        let mut c = established();
        c.on_guest_packet(&from_guest(op::CREDIT_REQUEST, 0, 4096, 0), &[])
            .unwrap();
        let mut buf = [0u8; 16];
        let p = c.next_packet(&mut buf, nothing).unwrap();
        assert_eq!(
            (p.hdr.op, p.hdr.buf_alloc),
            (op::CREDIT_UPDATE, CONN_BUF_SIZE)
        );
    }

    #[test]
    fn half_closes_in_both_directions_end_with_rst() {
        let mut c = established();
        c.on_guest_packet(&from_guest(op::RW, 2, 4096, 0), b"hi")
            .unwrap();
        let mut sd = from_guest(op::SHUTDOWN, 0, 4096, 0);
        sd.flags = shutdown::SEND;
        c.on_guest_packet(&sd, &[]).unwrap();
        assert!(!c.wants_host_write_shutdown(), "data first");
        assert!(c
            .on_guest_packet(&from_guest(op::RW, 1, 4096, 0), b"x")
            .is_err());
        let mut c = established();
        c.on_guest_packet(&from_guest(op::RW, 2, 4096, 0), b"hi")
            .unwrap();
        c.on_guest_packet(&sd, &[]).unwrap();
        c.host_wrote(2);
        assert!(c.wants_host_write_shutdown());
        c.host_write_shut = true;
        c.finish_if_done();
        assert_eq!(c.state, State::Established, "the host still sends");
        // The host reaches end of file: SHUTDOWN(SEND) to the guest, then RST.
        c.host_readable = true;
        let mut buf = [0u8; 16];
        let p = c.next_packet(&mut buf, |_| Ok(0)).unwrap();
        assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::SEND));
        c.finish_if_done();
        assert_eq!(c.state, State::Closed);
        assert_eq!(c.next_packet(&mut buf, nothing).unwrap().hdr.op, op::RST);
        assert!(c.is_finished());
    }

    #[test]
    fn guest_close_flushes_then_resets() {
        let mut c = established();
        c.on_guest_packet(&from_guest(op::RW, 2, 4096, 0), b"hi")
            .unwrap();
        let mut sd = from_guest(op::SHUTDOWN, 0, 4096, 0);
        sd.flags = shutdown::BOTH;
        c.on_guest_packet(&sd, &[]).unwrap();
        c.finish_if_done();
        assert_eq!(c.state, State::Established, "two bytes still to deliver");
        c.host_wrote(2);
        c.finish_if_done();
        assert_eq!(c.state, State::Closed);
        assert!(c.owed.rst);
    }

    #[test]
    fn guest_rst_forgets_the_connection_without_answering() {
        let mut c = established();
        c.on_guest_packet(&from_guest(op::RW, 2, 4096, 0), b"hi")
            .unwrap();
        assert_eq!(
            c.on_guest_packet(&from_guest(op::RST, 0, 0, 0), &[]),
            Ok(Effect::Reset)
        );
        assert!(c.is_finished());
        let mut buf = [0u8; 4];
        assert!(c.next_packet(&mut buf, nothing).is_none());
    }

    #[test]
    fn host_read_error_resets() {
        let mut c = established();
        c.host_readable = true;
        let mut buf = [0u8; 16];
        let p = c
            .next_packet(&mut buf, |_| Err(io::ErrorKind::ConnectionReset.into()))
            .unwrap();
        assert_eq!(p.hdr.op, op::RST);
        assert!(c.is_finished());
    }

    #[test]
    fn unexpected_ops_are_protocol_errors() {
        let mut c = established();
        for o in [op::REQUEST, op::RESPONSE] {
            assert!(matches!(
                c.on_guest_packet(&from_guest(o, 0, 4096, 0), &[]),
                Err(ProtocolError::UnexpectedOp { .. })
            ));
        }
        // Once reset, the guest's late packets (credit updates while it reads what it
        // got, data it sent before seeing our RST) are ignored until the RST is out.
        let mut closed = established();
        closed.reset();
        for o in [op::RW, op::CREDIT_UPDATE, op::SHUTDOWN, op::REQUEST] {
            assert_eq!(
                closed.on_guest_packet(&from_guest(o, 1, 4096, 0), b"x"),
                Ok(Effect::None)
            );
        }
        assert!(closed.to_host.is_empty(), "no data accepted");
        assert!(closed.owed.rst);
    }
}
