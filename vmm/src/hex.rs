//! Hex text for the binary blobs of a saved VM (the XSAVE area, the APIC page, KVM's
//! event and interrupt-controller structs), so that its state file stays JSON text. A
//! dozen lines: not worth a dependency.

/// At most this many hex digits in one field (a 4 KiB XSAVE area is 8192).
pub const MAX_DIGITS: usize = 64 * 1024;

/// Lowercase hex of `bytes`.
pub fn encode(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// The bytes of hex `text` (either case), at most [`MAX_DIGITS`] digits.
pub fn decode(text: &str) -> Result<Vec<u8>, String> {
    if text.len() > MAX_DIGITS {
        return Err(format!("{} hex digits (at most {MAX_DIGITS})", text.len()));
    }
    if !text.len().is_multiple_of(2) {
        return Err("an odd number of hex digits".into());
    }
    let mut out = Vec::with_capacity(text.len() / 2);
    for pair in text.as_bytes().chunks_exact(2) {
        let (h, l) = (DIGITS[usize::from(pair[0])], DIGITS[usize::from(pair[1])]);
        if h > 15 || l > 15 {
            return Err("a character that is not a hex digit".to_string());
        }
        out.push(h << 4 | l);
    }
    Ok(out)
}

/// Each byte's value as a hex digit, or 0xff: a table, because a restore decodes tens of
/// KiB of hex before the guest runs.
const DIGITS: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        t[b'A' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

/// Serde: byte vectors as hex strings.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises.
    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::encode(bytes))
    }

    /// Deserialises.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        super::decode(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde: 32-bit word vectors as hex strings of their little-endian bytes.
pub mod hex_words {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serialises.
    pub fn serialize<S: Serializer>(words: &[u32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        s.serialize_str(&super::encode(&bytes))
    }

    /// Deserialises.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        let bytes = super::decode(&text).map_err(serde::de::Error::custom)?;
        if !bytes.len().is_multiple_of(4) {
            return Err(serde::de::Error::custom(
                "not a whole number of 32-bit words",
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_junk() {
        assert_eq!(encode(&[0, 0xab, 0x10]), "00ab10");
        assert_eq!(decode("00ab10").unwrap(), [0, 0xab, 0x10]);
        assert_eq!(decode("00AB").unwrap(), [0, 0xab]);
        assert!(decode("abc").is_err());
        assert!(decode("zz").is_err());
        assert!(decode("é").is_err(), "two bytes, not hex digits");
        assert!(decode(&"0".repeat(70_000)).is_err());
    }
}
