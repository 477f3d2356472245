//! The data-integrity pattern of `qx-io verify`: every 4 KiB block of a device holds a
//! header naming (seed, block number, pass), a checksum, and a payload derived from the
//! same three values. A block read back is compared byte for byte with the block that
//! should be there, so a lost write (an older pass), a misdirected write (another block
//! number), a torn write, zeros or a flipped bit are all found, and told apart.
//!
//! Standard library only (it runs inside the nested guest as part of `qx-io`).

/// Size of one verified block.
pub const BLOCK: usize = 4096;
/// First bytes of every block.
pub const MAGIC: &[u8; 8] = b"QXVERIFY";
/// Header length (magic, seed, block, pass, checksum, reserved zeros).
pub const HEADER: usize = 64;
const CHECKSUM_AT: usize = 32;

/// splitmix64: a small, good-enough generator for payloads and permutations.
#[derive(Debug, Clone)]
pub struct SplitMix(u64);

impl SplitMix {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A value in `0..n` (`n > 0`; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

/// FNV-1a, 64 bit.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

fn stream_seed(seed: u64, block: u64, pass: u64) -> u64 {
    let mut g = SplitMix::new(seed ^ block.rotate_left(21) ^ pass.rotate_left(43));
    g.next_u64() ^ block
}

/// Writes the block `block` of pass `pass` into `buf` (exactly [`BLOCK`] bytes).
pub fn fill_block(buf: &mut [u8], seed: u64, block: u64, pass: u64) {
    debug_assert_eq!(buf.len(), BLOCK);
    let (head, payload) = buf.split_at_mut(HEADER);
    head.fill(0);
    head[..8].copy_from_slice(MAGIC);
    head[8..16].copy_from_slice(&seed.to_le_bytes());
    head[16..24].copy_from_slice(&block.to_le_bytes());
    head[24..32].copy_from_slice(&pass.to_le_bytes());
    let mut g = SplitMix::new(stream_seed(seed, block, pass));
    for chunk in payload.chunks_mut(8) {
        let v = g.next_u64().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
    let sum = fnv1a(&[&head[..CHECKSUM_AT], payload]);
    head[CHECKSUM_AT..CHECKSUM_AT + 8].copy_from_slice(&sum.to_le_bytes());
}

/// What is wrong with a block read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// The buffer is not [`BLOCK`] bytes long.
    WrongLength(usize),
    /// No magic: never written (all zeros) or overwritten by something else.
    NoMagic {
        /// The block is all zeros.
        zeros: bool,
    },
    /// A block of another seed (another run's data).
    OtherSeed(u64),
    /// A block written for another block number (a misdirected write).
    OtherBlock(u64),
    /// The block of another pass (a lost or stale write).
    OtherPass(u64),
    /// Right header, but the content differs from the pattern (a torn write, a flipped
    /// bit); `checksum_ok` says whether the stored checksum still matches the content.
    Content {
        /// First differing byte.
        offset: usize,
        /// Differing bytes.
        bytes: usize,
        /// The block is consistent with its own checksum (so the corruption was written
        /// as such, not introduced after the checksum was computed).
        checksum_ok: bool,
    },
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mismatch::WrongLength(n) => write!(f, "read {n} bytes instead of {BLOCK}"),
            Mismatch::NoMagic { zeros: true } => write!(f, "all zeros (never written)"),
            Mismatch::NoMagic { zeros: false } => write!(f, "no pattern header"),
            Mismatch::OtherSeed(s) => write!(f, "data of seed {s}"),
            Mismatch::OtherBlock(b) => write!(f, "data of block {b} (misdirected)"),
            Mismatch::OtherPass(p) => write!(f, "data of pass {p} (stale)"),
            Mismatch::Content {
                offset,
                bytes,
                checksum_ok,
            } => write!(
                f,
                "{bytes} byte(s) differ from offset {offset}, stored checksum {}",
                if *checksum_ok { "consistent" } else { "broken" }
            ),
        }
    }
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Checks `buf` against block `block` of pass `pass`. `scratch` is a [`BLOCK`]-byte
/// buffer the expected block is built in.
pub fn check_block(
    buf: &[u8],
    scratch: &mut [u8],
    seed: u64,
    block: u64,
    pass: u64,
) -> Result<(), Mismatch> {
    if buf.len() != BLOCK || scratch.len() != BLOCK {
        return Err(Mismatch::WrongLength(buf.len()));
    }
    fill_block(scratch, seed, block, pass);
    if buf == scratch {
        return Ok(());
    }
    if &buf[..8] != MAGIC {
        return Err(Mismatch::NoMagic {
            zeros: buf.iter().all(|&b| b == 0),
        });
    }
    let (s, b, p) = (le_u64(&buf[8..]), le_u64(&buf[16..]), le_u64(&buf[24..]));
    if s != seed {
        return Err(Mismatch::OtherSeed(s));
    }
    if b != block {
        return Err(Mismatch::OtherBlock(b));
    }
    if p != pass {
        return Err(Mismatch::OtherPass(p));
    }
    let differing: Vec<usize> = (0..BLOCK).filter(|&i| buf[i] != scratch[i]).collect();
    let stored = le_u64(&buf[CHECKSUM_AT..]);
    let computed = fnv1a(&[&buf[..CHECKSUM_AT], &buf[HEADER..]]);
    Err(Mismatch::Content {
        offset: differing.first().copied().unwrap_or(0),
        bytes: differing.len(),
        checksum_ok: stored == computed,
    })
}

/// A random permutation of `0..n` (Fisher–Yates).
pub fn permutation(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut g = SplitMix::new(seed ^ 0x5eed_0f0d_e700_0000);
    for i in (1..v.len()).rev() {
        let j = g.below(i as u64 + 1) as usize;
        v.swap(i, j);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(seed: u64, n: u64, pass: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK];
        fill_block(&mut b, seed, n, pass);
        b
    }

    #[test]
    fn a_good_block_verifies_and_blocks_differ() {
        let mut scratch = vec![0u8; BLOCK];
        let b = block(7, 3, 1);
        assert_eq!(check_block(&b, &mut scratch, 7, 3, 1), Ok(()));
        assert_ne!(b, block(7, 4, 1));
        assert_ne!(b, block(7, 3, 2));
        assert_ne!(b, block(8, 3, 1));
        // The payload is not trivially repetitive.
        assert_ne!(b[64..72], b[72..80]);
    }

    #[test]
    fn every_kind_of_corruption_is_found() {
        let mut scratch = vec![0u8; BLOCK];
        let good = block(7, 3, 1);

        let mut flipped = good.clone();
        flipped[1000] ^= 0x10;
        assert_eq!(
            check_block(&flipped, &mut scratch, 7, 3, 1),
            Err(Mismatch::Content {
                offset: 1000,
                bytes: 1,
                checksum_ok: false
            })
        );
        // A torn write: the second half is from the previous pass.
        let mut torn = good.clone();
        torn[2048..].copy_from_slice(&block(7, 3, 0)[2048..]);
        match check_block(&torn, &mut scratch, 7, 3, 1) {
            Err(Mismatch::Content { offset, .. }) => assert!(offset >= 2048),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            check_block(&block(7, 3, 0), &mut scratch, 7, 3, 1),
            Err(Mismatch::OtherPass(0))
        );
        assert_eq!(
            check_block(&block(7, 9, 1), &mut scratch, 7, 3, 1),
            Err(Mismatch::OtherBlock(9))
        );
        assert_eq!(
            check_block(&block(6, 3, 1), &mut scratch, 7, 3, 1),
            Err(Mismatch::OtherSeed(6))
        );
        assert_eq!(
            check_block(&[0u8; BLOCK], &mut scratch, 7, 3, 1),
            Err(Mismatch::NoMagic { zeros: true })
        );
        assert_eq!(
            check_block(&good[..512], &mut scratch, 7, 3, 1),
            Err(Mismatch::WrongLength(512))
        );
        // A checksum byte itself corrupted.
        let mut sum = good.clone();
        sum[CHECKSUM_AT] ^= 1;
        assert!(matches!(
            check_block(&sum, &mut scratch, 7, 3, 1),
            Err(Mismatch::Content {
                offset: CHECKSUM_AT,
                checksum_ok: false,
                ..
            })
        ));
    }

    #[test]
    fn permutations_cover_every_block_once() {
        let p = permutation(1000, 42);
        let mut sorted = p.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        assert_ne!(p, (0..1000).collect::<Vec<_>>(), "shuffled");
        assert_eq!(p, permutation(1000, 42), "deterministic");
        assert!(permutation(0, 1).is_empty());
    }
}
