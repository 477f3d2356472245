//! The virtio-vsock packet header (virtio 1.2, 5.10.6): 44 bytes, little endian, in
//! front of every packet on the rx and tx queues; and its validation.

use thiserror::Error;

/// Size of the header in bytes.
pub const HDR_LEN: usize = 44;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;
/// Most payload bytes in one packet, in either direction (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`); a longer packet from the guest is invalid.
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// `type`: a stream socket, the only type this device knows.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations.
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (or refused).
    pub const RST: u16 = 3;
    /// One or both directions shut down (see [`super::shutdown`]).
    pub const SHUTDOWN: u16 = 4;
    /// Data.
    pub const RW: u16 = 5;
    /// "Here is my buf_alloc / fwd_cnt".
    pub const CREDIT_UPDATE: u16 = 6;
    /// "Please send me a CREDIT_UPDATE".
    pub const CREDIT_REQUEST: u16 = 7;
}

/// Flags of a SHUTDOWN packet.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both.
    pub const BOTH: u32 = RCV | SEND;
}

/// A packet header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (SHUTDOWN flags).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wrapping).
    pub fwd_cnt: u32,
}

/// Why a header from the guest is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum HeaderError {
    /// Fewer than [`HDR_LEN`] readable bytes in the chain.
    #[error("packet of {0} bytes is shorter than the {HDR_LEN}-byte header")]
    Short(usize),
    /// The source CID is not the guest's.
    #[error("source CID {got} is not the guest's CID {want}")]
    SrcCid {
        /// In the header.
        got: u64,
        /// The guest's.
        want: u64,
    },
    /// The destination is not the host.
    #[error("destination CID {0} is not the host (2)")]
    DstCid(u64),
    /// `len` above [`MAX_PKT_DATA`].
    #[error("payload length {0} is above the {MAX_PKT_DATA}-byte limit")]
    TooLong(u32),
    /// `len` larger than the bytes the chain holds after the header.
    #[error("payload length {len} but the chain holds only {available} bytes after the header")]
    Truncated {
        /// In the header.
        len: u32,
        /// In the chain.
        available: usize,
    },
    /// A socket type other than stream.
    #[error("socket type {0} is not stream (1)")]
    Type(u16),
    /// An unknown operation.
    #[error("unknown operation {0}")]
    Op(u16),
    /// A payload on a packet that cannot carry one.
    #[error("operation {op} carries {len} payload bytes")]
    UnexpectedPayload {
        /// Operation.
        op: u16,
        /// Payload length.
        len: u32,
    },
}

impl HeaderError {
    /// True when the spec wants the device to answer with RST: the packet names a
    /// connection the guest may be waiting on. Packets that do not even come from the
    /// guest's CID, or go elsewhere than the host, are dropped silently.
    pub fn wants_rst(&self) -> bool {
        !matches!(
            self,
            HeaderError::Short(_) | HeaderError::SrcCid { .. } | HeaderError::DstCid(_)
        )
    }
}

impl Header {
    /// Parses the 44 header bytes.
    pub fn parse(b: &[u8; HDR_LEN]) -> Header {
        let u64_at = |i: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The 44 header bytes.
    pub fn to_bytes(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Checks a header the guest put on the tx queue, whose chain holds `chain_len`
    /// readable bytes in all, for a guest whose CID is `guest_cid`. The addressing is
    /// checked first, so that [`HeaderError::wants_rst`] only answers packets that do
    /// name a connection between the guest and the host.
    pub fn validate_tx(&self, guest_cid: u64, chain_len: usize) -> Result<(), HeaderError> {
        if self.src_cid != guest_cid {
            return Err(HeaderError::SrcCid {
                got: self.src_cid,
                want: guest_cid,
            });
        }
        if self.dst_cid != HOST_CID {
            return Err(HeaderError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(HeaderError::Type(self.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(HeaderError::Op(self.op));
        }
        if self.len as usize > MAX_PKT_DATA {
            return Err(HeaderError::TooLong(self.len));
        }
        let available = chain_len.saturating_sub(HDR_LEN);
        if self.len as usize > available {
            return Err(HeaderError::Truncated {
                len: self.len,
                available,
            });
        }
        if self.op != op::RW && self.len != 0 {
            return Err(HeaderError::UnexpectedPayload {
                op: self.op,
                len: self.len,
            });
        }
        Ok(())
    }

    /// A header from the host to the guest `guest_cid`, from host port `local_port` to
    /// guest port `peer_port`, without payload and with zero credit fields (the
    /// connection fills them in).
    pub fn to_guest(guest_cid: u64, local_port: u32, peer_port: u32, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: local_port,
            dst_port: peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    /// An RST answering `self` (addresses swapped), as the host.
    pub fn rst_reply(&self) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_hdr(op_: u16, len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: op_,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_little_endian() {
        let h = Header {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xdead_beef,
            dst_port: 5,
            len: 6,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 0x1122_3344,
            fwd_cnt: 9,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&b[16..20], &[0xef, 0xbe, 0xad, 0xde]);
        assert_eq!(&b[36..40], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(Header::parse(&b), h);
    }

    #[test]
    fn validation_checks_addresses_type_op_and_lengths() {
        assert_eq!(guest_hdr(op::RW, 10).validate_tx(3, HDR_LEN + 10), Ok(()));
        assert_eq!(guest_hdr(op::REQUEST, 0).validate_tx(3, HDR_LEN), Ok(()));
        let e = guest_hdr(op::RW, 0).validate_tx(4, HDR_LEN).unwrap_err();
        assert!(matches!(e, HeaderError::SrcCid { got: 3, want: 4 }));
        assert!(!e.wants_rst());
        let mut h = guest_hdr(op::RW, 0);
        h.dst_cid = 3;
        assert_eq!(h.validate_tx(3, HDR_LEN), Err(HeaderError::DstCid(3)));
        h = guest_hdr(op::RW, 0);
        h.type_ = 2; // seqpacket
        let e = h.validate_tx(3, HDR_LEN).unwrap_err();
        assert_eq!(e, HeaderError::Type(2));
        assert!(e.wants_rst());
        for bad_op in [0, 8, u16::MAX] {
            assert_eq!(
                guest_hdr(bad_op, 0).validate_tx(3, HDR_LEN),
                Err(HeaderError::Op(bad_op))
            );
        }
        assert_eq!(
            guest_hdr(op::RW, MAX_PKT_DATA as u32 + 1).validate_tx(3, usize::MAX),
            Err(HeaderError::TooLong(MAX_PKT_DATA as u32 + 1))
        );
        assert_eq!(
            guest_hdr(op::RW, 100).validate_tx(3, HDR_LEN + 99),
            Err(HeaderError::Truncated {
                len: 100,
                available: 99
            })
        );
        assert_eq!(
            guest_hdr(op::RW, u32::MAX).validate_tx(3, 0),
            Err(HeaderError::TooLong(u32::MAX))
        );
        assert_eq!(
            guest_hdr(op::REQUEST, 4).validate_tx(3, HDR_LEN + 4),
            Err(HeaderError::UnexpectedPayload {
                op: op::REQUEST,
                len: 4
            })
        );
    }

    #[test]
    fn rst_reply_swaps_the_addresses() {
        let r = guest_hdr(op::RW, 3).rst_reply();
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port, r.op, r.len),
            (HOST_CID, 3, 52, 1000, op::RST, 0)
        );
    }
}
