//! Host CPU time of a process from `/proc/PID/stat` (all its threads together).

use std::path::Path;

/// CPU time of a process so far, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuTicks {
    /// User time (includes the time its vCPU threads ran the guest).
    pub utime: u64,
    /// System time.
    pub stime: u64,
    /// Of `utime`, the time spent running a guest.
    pub guest: u64,
}

impl CpuTicks {
    /// Parses the contents of `/proc/PID/stat`. The command name (field 2) may hold
    /// spaces and parentheses, so fields are counted after its last `)`.
    pub fn parse(stat: &str) -> Option<CpuTicks> {
        let rest = &stat[stat.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        // After the name: field 3 (state) is f[0]; utime is field 14, stime 15,
        // guest_time 43.
        Some(CpuTicks {
            utime: f.get(11)?.parse().ok()?,
            stime: f.get(12)?.parse().ok()?,
            guest: f.get(40)?.parse().ok()?,
        })
    }

    /// Reads `/proc/<pid>/stat`.
    pub fn read(pid: u32) -> Option<CpuTicks> {
        let text =
            std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
        Self::parse(&text)
    }

    /// `self - earlier`, per field (saturating).
    pub fn since(self, earlier: CpuTicks) -> CpuTicks {
        CpuTicks {
            utime: self.utime.saturating_sub(earlier.utime),
            stime: self.stime.saturating_sub(earlier.stime),
            guest: self.guest.saturating_sub(earlier.guest),
        }
    }

    /// User plus system time, ms.
    pub fn total_ms(self) -> f64 {
        (self.utime + self.stime) as f64 * 1000.0 / ticks_per_second()
    }

    /// Guest time, ms.
    pub fn guest_ms(self) -> f64 {
        self.guest as f64 * 1000.0 / ticks_per_second()
    }
}

/// `sysconf(_SC_CLK_TCK)` (100 where it cannot be read).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf takes no pointers and has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_stat_line_with_a_strange_name() {
        // A real line of a QEMU process, name changed to hold ") (".
        let line = "4242 (qemu) (x y) S 1 4242 4242 0 -1 4194560 9517 0 0 0 \
                    315 127 0 0 20 0 4 0 1370 1010053120 36540 18446744073709551615 1 1 0 0 0 0 \
                    0 4096 17475 0 0 0 17 0 0 0 0 211 0 0 0 0 0 0 0 0 0";
        let t = CpuTicks::parse(line).unwrap();
        assert_eq!(
            t,
            CpuTicks {
                utime: 315,
                stime: 127,
                guest: 211
            }
        );
        let later = CpuTicks {
            utime: 400,
            stime: 130,
            guest: 250,
        };
        assert_eq!(
            later.since(t),
            CpuTicks {
                utime: 85,
                stime: 3,
                guest: 39
            }
        );
        assert!(CpuTicks::parse("1 (x) S 1 2").is_none());
        // Our own process can be read.
        assert!(CpuTicks::read(std::process::id()).is_some());
    }
}
