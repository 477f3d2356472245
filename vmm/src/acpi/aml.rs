//! The few AML encodings the DSDT needs (ACPI 6.4, chapter 20).

/// `NameOp NameString DataRefObject`.
pub fn name(name: &[u8; 4], value: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08];
    v.extend_from_slice(name);
    v.extend_from_slice(value);
    v
}

/// An integer constant in its shortest encoding.
pub fn integer(n: u64) -> Vec<u8> {
    match n {
        0 => vec![0x00],
        1 => vec![0x01],
        2..=0xff => vec![0x0a, n as u8],
        0x100..=0xffff => {
            let mut v = vec![0x0b];
            v.extend_from_slice(&(n as u16).to_le_bytes());
            v
        }
        0x1_0000..=0xffff_ffff => {
            let mut v = vec![0x0c];
            v.extend_from_slice(&(n as u32).to_le_bytes());
            v
        }
        _ => {
            let mut v = vec![0x0e];
            v.extend_from_slice(&n.to_le_bytes());
            v
        }
    }
}

/// `PackageOp PkgLength NumElements PackageElementList` (up to 255 elements).
pub fn package(elements: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![elements.len() as u8];
    for e in elements {
        body.extend_from_slice(e);
    }
    let mut v = vec![0x12];
    v.extend_from_slice(&pkg_length(body.len()));
    v.extend_from_slice(&body);
    v
}

/// The PkgLength encoding of a body of `len` bytes (the length counts itself).
pub fn pkg_length(len: usize) -> Vec<u8> {
    if len + 1 < 0x40 {
        return vec![(len + 1) as u8];
    }
    for extra in 1..=3usize {
        let total = len + 1 + extra;
        if total < 1 << (4 + 8 * extra) {
            let mut v = vec![((extra as u8) << 6) | (total & 0xf) as u8];
            for i in 0..extra {
                v.push((total >> (4 + 8 * i)) as u8);
            }
            return v;
        }
    }
    // AML objects are limited to 2^28 bytes; the DSDT is far below.
    vec![0xff, 0xff, 0xff, 0xff]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_object_matches_the_reference_encoding() {
        // iasl for `Name (_S5, Package () { 5, 0 })`.
        let s5 = name(b"_S5_", &package(&[integer(5), integer(0)]));
        assert_eq!(s5, [0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]);
    }

    #[test]
    fn integers_and_lengths() {
        assert_eq!(integer(0x1234), [0x0b, 0x34, 0x12]);
        assert_eq!(integer(0x1_0000), [0x0c, 0, 0, 1, 0]);
        assert_eq!(pkg_length(0x3e), [0x3f]);
        // 0x3f body bytes + 2 length bytes = 0x41.
        assert_eq!(pkg_length(0x3f), [0x41, 0x04]);
        assert_eq!(pkg_length(0x1000), [0x83, 0x00, 0x01]);
    }
}
