//! MAC addresses: `52:54:00:12:34:56` in flags and configuration files.

/// Parses a unicast MAC address (`52:54:00:12:34:56`); multicast and all-zero are refused.
pub fn parse(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(&parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    (mac[0] & 1 == 0 && mac != [0; 6]).then_some(mac)
}

/// Formats `mac` as `52:54:00:12:34:56`.
pub fn format(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Serde for `Option<[u8; 6]>` as an optional string.
pub mod serde_opt {
    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `None` as null, a MAC as its string.
    pub fn serialize<S: Serializer>(mac: &Option<[u8; 6]>, s: S) -> Result<S::Ok, S::Error> {
        match mac {
            Some(m) => s.serialize_some(&super::format(m)),
            None => s.serialize_none(),
        }
    }

    /// Reads null or a unicast MAC string.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => super::parse(&s).map(Some).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "{s:?} is not a unicast MAC address like 52:54:00:12:34:56"
                ))
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_format() {
        let m = parse("52:54:00:12:34:ab").unwrap();
        assert_eq!(m, [0x52, 0x54, 0, 0x12, 0x34, 0xab]);
        assert_eq!(format(&m), "52:54:00:12:34:ab");
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:ab:cd",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "52-54-00-12-34-ab",
            "5:54:00:12:34:ab",
            "zz:54:00:12:34:ab",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
