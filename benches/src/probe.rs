//! The record `qx-probe` prints for one VMM run inside the nested host, as one line
//! `QX-PROBE {json}`, and its parsing on the host side.
//!
//! The probe writes the JSON by hand ([`ProbeRecord::to_json`], standard library only,
//! so the static probe stays small); the host reads it with serde. A unit test checks
//! that both agree.

use serde::{Deserialize, Serialize};

use crate::smaps::{self, Mapping};

/// Marker that starts the probe's result line.
pub const PROBE_MARKER: &str = "QX-PROBE ";
/// The kernel's first console line contains this.
pub const KERNEL_BANNER: &str = "Linux version ";
/// Marker of the nested guest's init line.
pub const GUEST_INIT_MARKER: &str = "QX-GUEST-INIT ";
/// How many non-guest mappings a record lists.
pub const LARGEST_OTHER: usize = 8;

/// One mapping, as reported.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MappingInfo {
    /// `start-end` (hex).
    pub range: String,
    /// `rw-p` and the like.
    pub perms: String,
    /// Path name, `[heap]`, or empty for anonymous memory.
    pub name: String,
    /// Size, KiB.
    pub size_kb: u64,
    /// Resident, KiB.
    pub rss_kb: u64,
    /// Anonymous resident, KiB.
    pub anon_kb: u64,
    /// `VmFlags`.
    pub vmflags: String,
}

impl From<&Mapping> for MappingInfo {
    fn from(m: &Mapping) -> Self {
        MappingInfo {
            range: m.range(),
            perms: m.perms.clone(),
            name: m.name.clone(),
            size_kb: m.size_kb,
            rss_kb: m.rss_kb,
            anon_kb: m.anonymous_kb,
            vmflags: m.vmflags.clone(),
        }
    }
}

/// Memory of the VMM process when the guest's init line appeared.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    /// `VmRSS` of `/proc/PID/status`, KiB.
    pub vm_rss_kb: Option<u64>,
    /// `VmHWM` (peak RSS so far), KiB.
    pub vm_hwm_kb: Option<u64>,
    /// `RssAnon`, KiB.
    pub rss_anon_kb: Option<u64>,
    /// `RssFile`, KiB.
    pub rss_file_kb: Option<u64>,
    /// Threads of the VMM process.
    pub threads: Option<u64>,
    /// Sum of `Rss:` over every mapping of `/proc/PID/smaps`, KiB.
    pub smaps_rss_kb: u64,
    /// Number of mappings.
    pub mappings: u64,
    /// How the guest RAM mapping(s) were identified; `None` if they were not found.
    pub guest_rule: Option<String>,
    /// The guest RAM mapping(s).
    pub guest_mappings: Vec<MappingInfo>,
    /// RSS of the guest RAM mapping(s), KiB.
    pub guest_rss_kb: Option<u64>,
    /// `smaps_rss_kb - guest_rss_kb`: what the VMM itself keeps resident, KiB.
    pub overhead_kb: Option<u64>,
    /// The largest other mappings by RSS.
    pub largest_other: Vec<MappingInfo>,
    /// What could not be read, if anything.
    pub error: Option<String>,
}

impl MemorySnapshot {
    /// Builds the snapshot from the texts of `/proc/PID/status` and `/proc/PID/smaps`.
    pub fn from_proc(status: &str, smaps_text: &str, guest_mib: u64) -> Self {
        let st = smaps::parse_status(status);
        let maps = smaps::parse_smaps(smaps_text);
        let total = smaps::total_rss_kb(&maps);
        let ram = smaps::find_guest_ram(&maps, guest_mib);
        let (guest_rule, guest_idx) = match ram {
            Some(r) => (Some(r.rule), r.indices),
            None => (None, Vec::new()),
        };
        let guest_rss_kb = guest_rule
            .as_ref()
            .map(|_| guest_idx.iter().map(|&i| maps[i].rss_kb).sum::<u64>());
        MemorySnapshot {
            vm_rss_kb: st.vm_rss_kb,
            vm_hwm_kb: st.vm_hwm_kb,
            rss_anon_kb: st.rss_anon_kb,
            rss_file_kb: st.rss_file_kb,
            threads: st.threads,
            smaps_rss_kb: total,
            mappings: maps.len() as u64,
            guest_mappings: guest_idx.iter().map(|&i| (&maps[i]).into()).collect(),
            overhead_kb: guest_rss_kb.map(|g| total.saturating_sub(g)),
            guest_rss_kb,
            guest_rule,
            largest_other: smaps::largest_by_rss(&maps, &guest_idx, LARGEST_OTHER)
                .into_iter()
                .map(MappingInfo::from)
                .collect(),
            error: None,
        }
    }
}

/// What the probe measured for one VMM run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeRecord {
    /// `quantix` or `qemu`.
    pub vmm: String,
    /// The run's label (the sandbox job's name).
    pub label: String,
    /// Guest memory, MiB (what the guest RAM mapping is looked for with).
    pub guest_mib: u64,
    /// The command could not be started: why.
    pub spawn_error: Option<String>,
    /// Milliseconds from just before spawning the VMM to the first complete line on its
    /// stdout (the guest's first console message; VMM setup, kernel loading and, for a
    /// bzImage, the kernel's decompression come before it); `None` if there was none.
    pub first_output_ms: Option<f64>,
    /// Milliseconds from just before spawning the VMM to the kernel's `Linux version`
    /// banner on the console (with QEMU and a bzImage, the setup code's "Probing EDD"
    /// comes earlier, so this is the comparable "kernel started" point).
    pub kernel_banner_ms: Option<f64>,
    /// Milliseconds from just before spawning the VMM to reading the guest's
    /// `QX-GUEST-INIT` line from its stdout; `None` if it never came.
    pub start_to_init_ms: Option<f64>,
    /// The guest's init line, as read.
    pub init_line: Option<String>,
    /// The guest's uptime (s) in that line.
    pub guest_uptime_s: Option<f64>,
    /// VMM memory at that moment.
    pub memory: Option<MemorySnapshot>,
    /// Exit code of the VMM.
    pub exit_code: Option<i32>,
    /// Signal that ended the VMM.
    pub exit_signal: Option<i32>,
    /// The probe's own limit ran out and it killed the VMM.
    pub timed_out: bool,
    /// Milliseconds from spawn to the VMM's exit.
    pub total_ms: f64,
    /// Lines the VMM wrote to stdout (the guest console).
    pub console_lines: u64,
}

impl ProbeRecord {
    /// The run counts: the guest reached init, the VMM exited 0, in time.
    pub fn succeeded(&self) -> bool {
        self.failure().is_none()
    }

    /// Why the run does not count, in words; `None` if it does.
    pub fn failure(&self) -> Option<String> {
        if let Some(e) = &self.spawn_error {
            return Some(format!("could not start the VMM: {e}"));
        }
        if self.timed_out {
            return Some(format!(
                "timed out after {:.0} ms ({})",
                self.total_ms,
                if self.start_to_init_ms.is_some() {
                    "after the guest's init"
                } else {
                    "before the guest's init"
                }
            ));
        }
        if self.start_to_init_ms.is_none() {
            return Some(format!(
                "no QX-GUEST-INIT line from the guest ({} console lines); {}",
                self.console_lines,
                self.exit_text()
            ));
        }
        if self.exit_code != Some(0) {
            return Some(self.exit_text());
        }
        None
    }

    /// `exit status 0`, `killed by signal 9`...
    pub fn exit_text(&self) -> String {
        match (self.exit_code, self.exit_signal) {
            (Some(c), _) => format!("exit status {c}"),
            (None, Some(s)) => format!("killed by signal {s}"),
            (None, None) => "no exit status".to_string(),
        }
    }

    /// The record as one line of JSON (the same shape serde reads).
    pub fn to_json(&self) -> String {
        let mut o = Obj::new();
        o.str("vmm", &self.vmm);
        o.str("label", &self.label);
        o.num("guest_mib", self.guest_mib);
        o.opt_str("spawn_error", self.spawn_error.as_deref());
        o.opt_f64("first_output_ms", self.first_output_ms);
        o.opt_f64("kernel_banner_ms", self.kernel_banner_ms);
        o.opt_f64("start_to_init_ms", self.start_to_init_ms);
        o.opt_str("init_line", self.init_line.as_deref());
        o.opt_f64("guest_uptime_s", self.guest_uptime_s);
        match &self.memory {
            Some(m) => o.raw("memory", &memory_json(m)),
            None => o.raw("memory", "null"),
        }
        o.opt_num("exit_code", self.exit_code);
        o.opt_num("exit_signal", self.exit_signal);
        o.raw("timed_out", if self.timed_out { "true" } else { "false" });
        o.f64("total_ms", self.total_ms);
        o.num("console_lines", self.console_lines);
        o.finish()
    }
}

fn memory_json(m: &MemorySnapshot) -> String {
    let mut o = Obj::new();
    o.opt_num("vm_rss_kb", m.vm_rss_kb);
    o.opt_num("vm_hwm_kb", m.vm_hwm_kb);
    o.opt_num("rss_anon_kb", m.rss_anon_kb);
    o.opt_num("rss_file_kb", m.rss_file_kb);
    o.opt_num("threads", m.threads);
    o.num("smaps_rss_kb", m.smaps_rss_kb);
    o.num("mappings", m.mappings);
    o.opt_str("guest_rule", m.guest_rule.as_deref());
    o.raw("guest_mappings", &mappings_json(&m.guest_mappings));
    o.opt_num("guest_rss_kb", m.guest_rss_kb);
    o.opt_num("overhead_kb", m.overhead_kb);
    o.raw("largest_other", &mappings_json(&m.largest_other));
    o.opt_str("error", m.error.as_deref());
    o.finish()
}

fn mappings_json(maps: &[MappingInfo]) -> String {
    let items: Vec<String> = maps
        .iter()
        .map(|m| {
            let mut o = Obj::new();
            o.str("range", &m.range);
            o.str("perms", &m.perms);
            o.str("name", &m.name);
            o.num("size_kb", m.size_kb);
            o.num("rss_kb", m.rss_kb);
            o.num("anon_kb", m.anon_kb);
            o.str("vmflags", &m.vmflags);
            o.finish()
        })
        .collect();
    format!("[{}]", items.join(","))
}

/// A JSON object written field by field.
struct Obj(String);

impl Obj {
    fn new() -> Self {
        Obj(String::from("{"))
    }
    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        push_json_string(&mut self.0, k);
        self.0.push(':');
    }
    fn raw(&mut self, k: &str, v: &str) {
        self.key(k);
        self.0.push_str(v);
    }
    fn str(&mut self, k: &str, v: &str) {
        self.key(k);
        push_json_string(&mut self.0, v);
    }
    fn opt_str(&mut self, k: &str, v: Option<&str>) {
        match v {
            Some(v) => self.str(k, v),
            None => self.raw(k, "null"),
        }
    }
    fn num(&mut self, k: &str, v: impl std::fmt::Display) {
        self.raw(k, &v.to_string());
    }
    fn opt_num(&mut self, k: &str, v: Option<impl std::fmt::Display>) {
        match v {
            Some(v) => self.num(k, v),
            None => self.raw(k, "null"),
        }
    }
    fn f64(&mut self, k: &str, v: f64) {
        self.opt_f64(k, Some(v));
    }
    fn opt_f64(&mut self, k: &str, v: Option<f64>) {
        match v {
            // Rust's Display of a finite f64 is plain decimal notation, valid JSON.
            Some(v) if v.is_finite() => self.raw(k, &format!("{v}")),
            _ => self.raw(k, "null"),
        }
    }
    fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The guest's uptime (seconds) in a `QX-GUEST-INIT ... uptime=16.37 ...` line.
pub fn guest_uptime(line: &str) -> Option<f64> {
    let at = line.find(GUEST_INIT_MARKER)?;
    line[at..]
        .split_whitespace()
        .find_map(|t| t.strip_prefix("uptime="))
        .and_then(|v| v.parse().ok())
}

/// Why a probe line could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeLineError {
    /// No `QX-PROBE` line in the output.
    #[error("no QX-PROBE line")]
    Missing,
    /// The JSON is malformed (e.g. a kernel message landed in the middle of the line).
    #[error("malformed QX-PROBE line: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// The first `QX-PROBE {json}` line of `output`. The marker may be preceded by other
/// text on its line (a kernel message on the shared console).
pub fn find_probe_record(output: &str) -> Result<ProbeRecord, ProbeLineError> {
    let mut first_error = None;
    for line in output.lines() {
        let Some(at) = line.find(PROBE_MARKER) else {
            continue;
        };
        match serde_json::from_str::<ProbeRecord>(line[at + PROBE_MARKER.len()..].trim_end()) {
            Ok(r) => return Ok(r),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.map_or(ProbeLineError::Missing, ProbeLineError::Malformed))
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU_SMAPS: &str = include_str!("../testdata/qemu-microvm-64m.smaps");

    fn sample() -> ProbeRecord {
        ProbeRecord {
            vmm: "qemu".into(),
            label: "qemu-1".into(),
            guest_mib: 64,
            spawn_error: None,
            first_output_ms: Some(2000.25),
            kernel_banner_ms: Some(2100.5),
            start_to_init_ms: Some(12345.678),
            init_line: Some(
                "QX-GUEST-INIT cpus=1 memtotal_kb=1 uptime=3.25 kernel=6.1 \"q\"\\\t\u{1}".into(),
            ),
            guest_uptime_s: Some(3.25),
            memory: Some(MemorySnapshot::from_proc(
                "VmRSS:\t 34320 kB\nThreads:\t3\n",
                QEMU_SMAPS,
                64,
            )),
            exit_code: Some(0),
            exit_signal: None,
            timed_out: false,
            total_ms: 20000.5,
            console_lines: 321,
        }
    }

    #[test]
    fn hand_written_json_round_trips_through_serde() {
        let r = sample();
        let json = r.to_json();
        assert!(!json.contains('\n'));
        let back: ProbeRecord = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r);
        let empty = ProbeRecord {
            spawn_error: Some("No such file or directory (os error 2)".into()),
            ..ProbeRecord::default()
        };
        let back: ProbeRecord = serde_json::from_str(&empty.to_json()).unwrap();
        assert_eq!(back, empty);
        assert!(!back.succeeded());
    }

    #[test]
    fn memory_snapshot_of_qemu() {
        let m = sample().memory.unwrap();
        assert_eq!(m.vm_rss_kb, Some(34320));
        assert_eq!(m.threads, Some(3));
        assert_eq!(m.guest_mappings.len(), 1);
        assert_eq!(m.guest_mappings[0].size_kb, 65536);
        assert_eq!(m.guest_rss_kb, Some(0));
        assert_eq!(m.overhead_kb, Some(m.smaps_rss_kb));
        assert!(m.largest_other.len() <= LARGEST_OTHER);
        assert!(m.largest_other[0].rss_kb >= m.largest_other[1].rss_kb);
        // Without a matching mapping, the overhead is unknown rather than wrong.
        let m = MemorySnapshot::from_proc("", QEMU_SMAPS, 512);
        assert_eq!(
            (m.guest_rule, m.guest_rss_kb, m.overhead_kb),
            (None, None, None)
        );
    }

    #[test]
    fn finds_probe_lines_in_job_output() {
        let r = sample();
        let out = format!(
            "vmm-stderr| warning\n[  12.3] kvm: noise QX-PROBE {}\nmore\n",
            r.to_json()
        );
        assert_eq!(find_probe_record(&out).unwrap(), r);
        assert!(matches!(
            find_probe_record("nothing\n"),
            Err(ProbeLineError::Missing)
        ));
        let cut = format!("QX-PROBE {}", &r.to_json()[..40]);
        assert!(matches!(
            find_probe_record(&cut),
            Err(ProbeLineError::Malformed(_))
        ));
        // A malformed line followed by a good one: the good one.
        let both = format!("{cut}\nQX-PROBE {}\n", r.to_json());
        assert_eq!(find_probe_record(&both).unwrap(), r);
    }

    #[test]
    fn uptime_and_failures() {
        assert_eq!(
            guest_uptime("x QX-GUEST-INIT cpus=2 memtotal_kb=3 uptime=16.37 kernel=k"),
            Some(16.37)
        );
        assert_eq!(guest_uptime("QX-GUEST-INIT cpus=2"), None);
        assert_eq!(guest_uptime("uptime=1"), None);
        let mut r = sample();
        assert!(r.succeeded());
        r.exit_code = Some(3);
        assert_eq!(r.failure().unwrap(), "exit status 3");
        r.exit_code = None;
        r.exit_signal = Some(9);
        r.timed_out = true;
        assert!(r.failure().unwrap().contains("after the guest's init"));
        r.timed_out = false;
        r.start_to_init_ms = None;
        assert!(r.failure().unwrap().contains("killed by signal 9"));
    }
}
