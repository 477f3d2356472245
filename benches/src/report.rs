//! Shared pieces of the printed and JSON reports: targets, number formatting, dates.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::stats::Summary;

/// A performance target from the issue, with what was measured against it. Targets are
/// reported, never enforced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    /// What the target is, e.g. `boot-to-init at most 0.7 × QEMU's`.
    pub target: String,
    /// The measured figure, in words.
    pub measured: String,
    /// Met (`Some(true)`), missed (`Some(false)`), or not measurable here (`None`).
    pub met: Option<bool>,
}

impl Target {
    /// `met`, `MISSED` or `n/a`.
    pub fn verdict(&self) -> &'static str {
        match self.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "n/a",
        }
    }
}

/// Prints targets as an aligned block.
pub fn format_targets(targets: &[Target]) -> String {
    let w = targets.iter().map(|t| t.target.len()).max().unwrap_or(0);
    let mut s = String::from("targets (from the issue; reported, not enforced):\n");
    for t in targets {
        let _ = writeln!(s, "  {:<w$}  {:<6}  {}", t.target, t.verdict(), t.measured);
    }
    s
}

/// `median / min / max` cells of a summary with `decimals` decimals, or dashes.
pub fn cells(s: Option<&Summary>, decimals: usize) -> [String; 3] {
    match s {
        Some(s) => [
            format!("{:.decimals$}", s.median),
            format!("{:.decimals$}", s.min),
            format!("{:.decimals$}", s.max),
        ],
        None => ["-".into(), "-".into(), "-".into()],
    }
}

/// `a / b` when both exist and `b` is not zero.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// KiB to MiB.
pub fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// The current time, UTC, as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn now_utc() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    utc_datetime(secs)
}

/// Seconds since the Unix epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub fn utc_datetime(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// This machine: kernel release, CPUs, and what its /dev/kvm is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFacts {
    /// `uname -r`.
    pub kernel: String,
    /// Online CPUs.
    pub cpus: usize,
    /// CPU model name.
    pub cpu_model: String,
    /// What provides /dev/kvm (`kvm_pvm`, `kvm_intel`, `kvm_amd`, or unknown).
    pub kvm_module: String,
    /// The workspace's git revision (`git rev-parse --short HEAD`, `+dirty` with local
    /// changes): the VMM measured was built from it.
    pub revision: String,
}

impl HostFacts {
    /// Reads them from /proc and /sys.
    pub fn read() -> Self {
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kvm_module = ["kvm_pvm", "kvm_intel", "kvm_amd"]
            .iter()
            .find(|m| Path::new("/sys/module").join(m).exists())
            .map_or_else(|| "unknown".to_string(), |m| m.to_string());
        HostFacts {
            kernel,
            cpus,
            cpu_model,
            kvm_module,
            revision: git_revision(),
        }
    }
}

/// `git rev-parse --short HEAD` of the workspace, with `+dirty` when `git status` shows
/// changes; `unknown` without git.
pub fn git_revision() -> String {
    let root = quantix_sandbox::build::workspace_root();
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    match git(&["rev-parse", "--short", "HEAD"]) {
        Some(rev) => match git(&["status", "--porcelain", "--untracked-files=no"]) {
            Some(changes) if !changes.is_empty() => format!("{rev}+dirty"),
            _ => rev,
        },
        None => "unknown".to_string(),
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), BenchError> {
    let text = serde_json::to_string_pretty(value).map_err(|source| BenchError::Json {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::write(path, text + "\n")
        .map_err(|e| BenchError::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_datetime(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_datetime(1_795_000_000), "2026-11-18 11:06:40 UTC");
    }

    #[test]
    fn ratios_and_cells() {
        assert_eq!(ratio(Some(1.0), Some(4.0)), Some(0.25));
        assert_eq!(ratio(Some(1.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(1.0)), None);
        let s = crate::stats::summarize(&[1.0, 2.0, 4.0]).unwrap();
        assert_eq!(cells(Some(&s), 1), ["2.0", "1.0", "4.0"]);
        assert_eq!(cells(None, 1), ["-", "-", "-"]);
    }

    #[test]
    fn target_block() {
        let t = [
            Target {
                target: "x < 1".into(),
                measured: "0.5".into(),
                met: Some(true),
            },
            Target {
                target: "longer target".into(),
                measured: "9".into(),
                met: Some(false),
            },
        ];
        let s = format_targets(&t);
        assert!(s.contains("x < 1          met     0.5"), "{s}");
        assert!(s.contains("MISSED"));
    }
}
