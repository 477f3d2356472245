//! Sizes and counts as people write them: `512`, `512M`, `2G`, `10K`.

use serde::{Deserialize, Serialize};

use crate::config::ConfigError;
use crate::limits::MAX_MEMORY_MIB;

/// A count with an optional K, M or G suffix (powers of 1024): `10M` is 10485760.
pub fn parse_count(v: &str) -> Option<u64> {
    let (num, mul) = match v.as_bytes().last()? {
        b'K' | b'k' => (&v[..v.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&v[..v.len() - 1], 1 << 20),
        b'G' | b'g' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    num.parse::<u64>().ok()?.checked_mul(mul)
}

/// A guest memory size in MiB, parsed from `512`, `512M`, `2G` (a plain number is MiB);
/// a JSON number of MiB in a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemorySize(pub u64);

impl MemorySize {
    /// The size in bytes.
    pub fn bytes(self) -> u64 {
        self.0 << 20
    }
}

impl std::str::FromStr for MemorySize {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let err = || ConfigError::MemorySyntax(s.to_string());
        let t = s.trim();
        let (digits, shift) = match t.char_indices().last() {
            Some((i, 'M' | 'm')) => (&t[..i], 0),
            Some((i, 'G' | 'g')) => (&t[..i], 10),
            Some(_) => (t, 0),
            None => return Err(err()),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let n: u64 = digits.parse().map_err(|_| err())?;
        n.checked_mul(1 << shift)
            .filter(|mib| *mib <= MAX_MEMORY_MIB)
            .map(MemorySize)
            .ok_or_else(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!("512".parse(), Ok(MemorySize(512)));
        assert_eq!("512M".parse(), Ok(MemorySize(512)));
        assert_eq!("2G".parse(), Ok(MemorySize(2048)));
        assert_eq!("2g".parse(), Ok(MemorySize(2048)));
        assert_eq!(MemorySize(3).bytes(), 3 << 20);
        for bad in [
            "",
            "M",
            "G",
            "-1",
            "1.5G",
            "12K",
            "1T",
            "0x10",
            " ",
            "99999999999999999999",
        ] {
            assert!(
                bad.parse::<MemorySize>().is_err(),
                "{bad:?} should not parse"
            );
        }
    }

    #[test]
    fn counts() {
        assert_eq!(parse_count("5000"), Some(5000));
        assert_eq!(parse_count("10K"), Some(10 << 10));
        assert_eq!(parse_count("100m"), Some(100 << 20));
        assert_eq!(parse_count("1G"), Some(1 << 30));
        for bad in ["", "K", "-1", "+5", "1.5M", "99999999999G", "10T"] {
            assert_eq!(parse_count(bad), None, "{bad:?}");
        }
    }
}
