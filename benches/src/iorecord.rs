//! The one-line records `qx-io` prints: `MARKER key=value key=value ...`.
//!
//! They travel over the guest's serial console, where a kernel message can be printed
//! into the middle of a line: parsing stops at the first token that is not `key=value`
//! or that holds a `[`, and the harness checks that the keys it needs are there.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// A workload or integrity result.
pub const IO_MARKER: &str = "QX-IO";
/// Printed by the guest just before a workload starts (the host samples CPU then).
pub const BEGIN_MARKER: &str = "QX-IO-BEGIN";
/// The host's CPU time of the VMM between a `QX-IO-BEGIN` and its `QX-IO`.
pub const CPU_MARKER: &str = "QX-CPU";
/// An integrity result.
pub const VERIFY_MARKER: &str = "QX-VERIFY";

/// Builds a record line.
#[derive(Debug, Clone)]
pub struct Line(String);

impl Line {
    /// Starts a line with `marker`.
    pub fn new(marker: &str) -> Self {
        Line(marker.to_string())
    }

    /// Adds `key=value` (`value` must not hold spaces; they become `_`).
    pub fn kv(mut self, key: &str, value: impl std::fmt::Display) -> Self {
        let v = value.to_string().replace([' ', '\n', '\t'], "_");
        let _ = write!(self.0, " {key}={v}");
        self
    }

    /// Adds a float with `decimals` decimals.
    pub fn f(self, key: &str, value: f64, decimals: usize) -> Self {
        let v = format!("{value:.decimals$}");
        self.kv(key, v)
    }

    /// The line.
    pub fn finish(self) -> String {
        self.0
    }
}

/// A parsed record.
pub type Record = BTreeMap<String, String>;

/// Parses `line` if it holds `marker` followed by a space (anywhere: console lines may
/// carry a prefix).
pub fn parse_line(line: &str, marker: &str) -> Option<Record> {
    let needle = format!("{marker} ");
    let at = line.find(&needle)?;
    // `QX-IO ` must not match inside `QX-IO-BEGIN `: the marker starts a word.
    if at > 0 && !line[..at].ends_with([' ', ']', '|']) {
        return None;
    }
    let mut out = Record::new();
    for token in line[at + needle.len()..].split_whitespace() {
        if token.contains('[') {
            break;
        }
        let Some((k, v)) = token.split_once('=') else {
            break;
        };
        out.insert(k.to_string(), v.to_string());
    }
    Some(out)
}

/// All records with `marker` in `text`.
pub fn find_all(text: &str, marker: &str) -> Vec<Record> {
    text.lines().filter_map(|l| parse_line(l, marker)).collect()
}

/// A float field.
pub fn get_f64(r: &Record, key: &str) -> Option<f64> {
    r.get(key)?.parse().ok()
}

/// An integer field.
pub fn get_u64(r: &Record, key: &str) -> Option<u64> {
    r.get(key)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_survive_kernel_messages() {
        let l = Line::new(IO_MARKER)
            .kv("id", "blk-read-4k")
            .kv("ops", 12)
            .f("mbps", 12.3456, 2)
            .kv("note", "a b")
            .finish();
        assert_eq!(l, "QX-IO id=blk-read-4k ops=12 mbps=12.35 note=a_b");
        let r = parse_line(&format!("[job] {l}"), IO_MARKER).unwrap();
        assert_eq!(r["id"], "blk-read-4k");
        assert_eq!(get_u64(&r, "ops"), Some(12));
        assert_eq!(get_f64(&r, "mbps"), Some(12.35));
        let broken = "QX-IO id=x ops=3 mb[   12.5] random: crng init done";
        let r = parse_line(broken, IO_MARKER).unwrap();
        assert_eq!((r.len(), r.get("mb")), (2, None));
        assert!(parse_line("QX-IO-BEGIN id=x", IO_MARKER).is_none());
        assert!(parse_line("NOTQX-IO id=x", IO_MARKER).is_none());
        assert_eq!(
            parse_line("QX-IO-BEGIN id=x", BEGIN_MARKER).unwrap()["id"],
            "x"
        );
        let text = format!("{l}\nnoise\n{l}\n");
        assert_eq!(find_all(&text, IO_MARKER).len(), 2);
    }
}
