//! `/proc/PID/smaps` and `/proc/PID/status`, and finding a VMM's guest RAM among its
//! mappings. Standard library only: `qx-probe` uses this inside the nested host.

/// One mapping of `/proc/PID/smaps`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Mapping {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `rw-p` and the like.
    pub perms: String,
    /// Path name, `[heap]`, `anon_inode:kvm-vcpu:0`...; empty for anonymous memory.
    pub name: String,
    /// `Size:` in KiB.
    pub size_kb: u64,
    /// `Rss:` in KiB.
    pub rss_kb: u64,
    /// `Anonymous:` in KiB.
    pub anonymous_kb: u64,
    /// `VmFlags:` (two-letter codes, space-separated).
    pub vmflags: String,
}

impl Mapping {
    /// `start-end` in hex, as in smaps.
    pub fn range(&self) -> String {
        format!("{:x}-{:x}", self.start, self.end)
    }

    /// Anonymous memory: no backing file (possibly named with `PR_SET_VMA_ANON_NAME`,
    /// `[anon:...]`), or a memfd (QEMU's `memory-backend-memfd`).
    pub fn is_anonymous(&self) -> bool {
        self.name.is_empty() || self.name.starts_with("[anon:") || self.name.starts_with("/memfd:")
    }

    /// Readable and writable.
    pub fn is_rw(&self) -> bool {
        self.perms.starts_with("rw")
    }

    /// Has the two-letter VmFlag `flag` (e.g. `hg` for MADV_HUGEPAGE, `mg` for
    /// MADV_MERGEABLE, `nr` for MAP_NORESERVE).
    pub fn has_flag(&self, flag: &str) -> bool {
        self.vmflags.split_whitespace().any(|f| f == flag)
    }
}

/// Parses the header line of a mapping: `start-end perms offset dev inode [name]`.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut fields = Vec::with_capacity(5);
    for _ in 0..5 {
        rest = rest.trim_start_matches([' ', '\t']);
        let end = rest.find([' ', '\t']).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        fields.push(&rest[..end]);
        rest = &rest[end..];
    }
    let (start, end) = fields[0].split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields[1];
    if perms.len() != 4 || end < start {
        return None;
    }
    Some(Mapping {
        start,
        end,
        perms: perms.to_string(),
        name: rest.trim().to_string(),
        ..Mapping::default()
    })
}

/// `Key:   123 kB` → 123.
fn kb_value(value: &str) -> Option<u64> {
    let mut it = value.split_whitespace();
    let n = it.next()?.parse().ok()?;
    match it.next() {
        Some("kB") | None => Some(n),
        Some(_) => None,
    }
}

/// Parses the text of `/proc/PID/smaps`. Unknown fields are ignored; lines that are
/// neither a header nor a `Key: value` field are skipped.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(m) = parse_header(line) {
            maps.push(m);
            continue;
        }
        let Some(current) = maps.last_mut() else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Size" => current.size_kb = kb_value(value).unwrap_or(0),
            "Rss" => current.rss_kb = kb_value(value).unwrap_or(0),
            "Anonymous" => current.anonymous_kb = kb_value(value).unwrap_or(0),
            "VmFlags" => current.vmflags = value.trim().to_string(),
            _ => {}
        }
    }
    maps
}

/// The figures of `/proc/PID/status` that matter here (KiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Status {
    /// `VmRSS`.
    pub vm_rss_kb: Option<u64>,
    /// `VmHWM` (peak RSS).
    pub vm_hwm_kb: Option<u64>,
    /// `RssAnon`.
    pub rss_anon_kb: Option<u64>,
    /// `RssFile`.
    pub rss_file_kb: Option<u64>,
    /// `Threads`.
    pub threads: Option<u64>,
}

/// Parses the text of `/proc/PID/status`.
pub fn parse_status(text: &str) -> Status {
    let mut s = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "VmRSS" => &mut s.vm_rss_kb,
            "VmHWM" => &mut s.vm_hwm_kb,
            "RssAnon" => &mut s.rss_anon_kb,
            "RssFile" => &mut s.rss_file_kb,
            "Threads" => &mut s.threads,
            _ => continue,
        };
        *slot = kb_value(value);
    }
    s
}

/// Which mappings hold the guest's RAM, and by which rule they were picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestRam {
    /// Indices into the mapping list.
    pub indices: Vec<usize>,
    /// The rule that matched, in words (goes into the output).
    pub rule: String,
}

/// The smallest mapping considered as a piece of split guest RAM.
const SPLIT_PIECE_MIN_KB: u64 = 2 * 1024;
/// Slack allowed by the last-resort rule (alignment, a guard page).
const NEAR_SLACK_KB: u64 = 4 * 1024;

/// Finds the guest RAM of a VM with `guest_mib` MiB among `maps`.
///
/// Candidates are anonymous (or memfd), read-write mappings. In order:
/// 1. exactly one candidate of exactly `guest_mib` MiB (quantix-vmm below 3 GiB: one
///    `MAP_NORESERVE` region; QEMU: its RAM block is mmapped with exactly the RAM size,
///    followed by a separate `PROT_NONE` guard page). If several match, the one with the
///    largest RSS is taken and the rule says it was ambiguous;
/// 2. two or three candidates of at least 2 MiB whose sizes add up to exactly
///    `guest_mib` MiB (RAM split around the 3–4 GiB MMIO hole);
/// 3. the single largest candidate, if it is at most 4 MiB larger than `guest_mib` MiB
///    (said so in the rule).
///
/// `None` when nothing fits: the caller reports the overhead as unknown.
pub fn find_guest_ram(maps: &[Mapping], guest_mib: u64) -> Option<GuestRam> {
    let want = guest_mib.checked_mul(1024)?;
    let candidates: Vec<usize> = maps
        .iter()
        .enumerate()
        .filter(|(_, m)| m.is_anonymous() && m.is_rw())
        .map(|(i, _)| i)
        .collect();

    let exact: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| maps[i].size_kb == want)
        .collect();
    if let Some(&best) = exact.iter().max_by_key(|&&i| maps[i].rss_kb) {
        let rule = if exact.len() == 1 {
            format!("the one anonymous rw mapping of exactly {guest_mib} MiB")
        } else {
            format!(
                "ambiguous: {} anonymous rw mappings of exactly {guest_mib} MiB; took the one with the largest RSS",
                exact.len()
            )
        };
        return Some(GuestRam {
            indices: vec![best],
            rule,
        });
    }

    let pieces: Vec<usize> = candidates
        .iter()
        .copied()
        .filter(|&i| maps[i].size_kb >= SPLIT_PIECE_MIN_KB && maps[i].size_kb < want)
        .collect();
    for a in 0..pieces.len() {
        for b in a + 1..pieces.len() {
            let (ia, ib) = (pieces[a], pieces[b]);
            let ab = maps[ia].size_kb + maps[ib].size_kb;
            if ab == want {
                return Some(GuestRam {
                    indices: vec![ia, ib],
                    rule: format!("two anonymous rw mappings adding up to {guest_mib} MiB"),
                });
            }
            for &ic in &pieces[b + 1..] {
                if ab + maps[ic].size_kb == want {
                    return Some(GuestRam {
                        indices: vec![ia, ib, ic],
                        rule: format!("three anonymous rw mappings adding up to {guest_mib} MiB"),
                    });
                }
            }
        }
    }

    let largest = candidates
        .iter()
        .copied()
        .max_by_key(|&i| maps[i].size_kb)?;
    let size = maps[largest].size_kb;
    if size > want && size <= want + NEAR_SLACK_KB {
        return Some(GuestRam {
            indices: vec![largest],
            rule: format!(
                "approximate: no mapping of exactly {guest_mib} MiB; took the largest anonymous rw mapping ({size} KiB)"
            ),
        });
    }
    None
}

/// Sum of `Rss:` over all mappings, KiB.
pub fn total_rss_kb(maps: &[Mapping]) -> u64 {
    maps.iter().map(|m| m.rss_kb).sum()
}

/// The `n` mappings with the largest RSS that are not in `exclude`, largest first.
pub fn largest_by_rss<'a>(maps: &'a [Mapping], exclude: &[usize], n: usize) -> Vec<&'a Mapping> {
    let mut v: Vec<(usize, &Mapping)> = maps
        .iter()
        .enumerate()
        .filter(|(i, m)| !exclude.contains(i) && m.rss_kb > 0)
        .collect();
    v.sort_by(|a, b| b.1.rss_kb.cmp(&a.1.rss_kb).then(a.0.cmp(&b.0)));
    v.into_iter().take(n).map(|(_, m)| m).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from QEMU 7.2 (`-M microvm -m 64`) on this host, cut down to a few
    /// mappings: the RAM block (exactly 64 MiB, MADV_HUGEPAGE and MADV_MERGEABLE) and
    /// its PROT_NONE guard page, a thread stack, the heap, a library, a vCPU page.
    const QEMU_SMAPS: &str = include_str!("../testdata/qemu-microvm-64m.smaps");

    #[test]
    fn parses_headers_fields_and_names() {
        let maps = parse_smaps(QEMU_SMAPS);
        assert!(maps.len() >= 6, "{maps:#?}");
        let heap = maps.iter().find(|m| m.name == "[heap]").unwrap();
        assert!(heap.rss_kb > 0 && heap.size_kb >= heap.rss_kb);
        assert!(heap.is_rw() && !heap.is_anonymous());
        let vcpu = maps
            .iter()
            .find(|m| m.name.starts_with("anon_inode:kvm-vcpu"))
            .unwrap();
        assert!(!vcpu.is_anonymous());
        let lib = maps
            .iter()
            .find(|m| m.name.ends_with(".so.6") || m.name.contains(".so"))
            .unwrap();
        assert_eq!(lib.perms.len(), 4);
        for m in &maps {
            assert_eq!(m.size_kb * 1024, m.end - m.start, "{m:?}");
            assert!(!m.vmflags.is_empty(), "{m:?}");
        }
    }

    #[test]
    fn finds_qemus_ram_block() {
        let maps = parse_smaps(QEMU_SMAPS);
        let ram = find_guest_ram(&maps, 64).unwrap();
        assert_eq!(ram.indices.len(), 1);
        let m = &maps[ram.indices[0]];
        assert_eq!(m.size_kb, 64 * 1024);
        assert!(m.has_flag("hg") && m.has_flag("mg"), "{m:?}");
        assert!(ram.rule.starts_with("the one"), "{}", ram.rule);
        // The guard page right after it is not read-write.
        let guard = maps.iter().find(|m2| m2.start == m.end).unwrap();
        assert_eq!(guard.perms, "---p");
        // Nothing of 32 MiB, 70 MiB.
        assert_eq!(find_guest_ram(&maps, 32), None);
        assert_eq!(find_guest_ram(&maps, 70), None);
        let others = largest_by_rss(&maps, &ram.indices, 3);
        assert!(others.iter().all(|o| o.start != m.start));
        assert!(others.windows(2).all(|w| w[0].rss_kb >= w[1].rss_kb));
        assert!(total_rss_kb(&maps) >= m.rss_kb);
    }

    fn anon(start: u64, size_mib: u64, rss_kb: u64) -> Mapping {
        Mapping {
            start,
            end: start + (size_mib << 20),
            perms: "rw-p".into(),
            name: String::new(),
            size_kb: size_mib * 1024,
            rss_kb,
            anonymous_kb: rss_kb,
            vmflags: "rd wr mr mw me ac nr".into(),
        }
    }

    #[test]
    fn split_ambiguous_and_approximate_guest_ram() {
        // quantix-vmm with 4 GiB: 3 GiB below the hole and 1 GiB above.
        let maps = vec![
            anon(0x1000_0000, 8, 100),
            anon(0x7000_0000_0000, 3072, 5000),
            anon(0x7100_0000_0000, 1024, 10),
        ];
        let ram = find_guest_ram(&maps, 4096).unwrap();
        assert_eq!(ram.indices, vec![1, 2]);
        // Two of exactly the size: the one with more RSS, flagged.
        let maps = vec![anon(0, 256, 1), anon(1 << 40, 256, 99)];
        let ram = find_guest_ram(&maps, 256).unwrap();
        assert_eq!(ram.indices, vec![1]);
        assert!(ram.rule.starts_with("ambiguous"));
        // Slightly larger (2 MiB of alignment): approximate.
        let maps = vec![anon(0, 258, 1), anon(1 << 40, 8, 99)];
        let ram = find_guest_ram(&maps, 256).unwrap();
        assert_eq!(ram.indices, vec![0]);
        assert!(ram.rule.starts_with("approximate"));
        // File-backed or read-only mappings never count.
        let mut file = anon(0, 256, 1);
        file.name = "/usr/bin/x".into();
        let mut ro = anon(1 << 40, 256, 1);
        ro.perms = "r--p".into();
        assert_eq!(find_guest_ram(&[file, ro], 256), None);
    }

    #[test]
    fn header_edge_cases() {
        let m = parse_header("7f00-7f10 rw-p 00000000 00:00 0 ").unwrap();
        assert_eq!((m.start, m.end, m.name.as_str()), (0x7f00, 0x7f10, ""));
        let m = parse_header("1000-2000 r--s 00000000 00:05 42   /memfd:a b (deleted)").unwrap();
        assert_eq!(m.name, "/memfd:a b (deleted)");
        assert!(m.is_anonymous());
        assert_eq!(parse_header("Rss:  4 kB"), None);
        assert_eq!(parse_header("zz-10 rw-p 0 0:0 0"), None);
        assert_eq!(parse_header("2000-1000 rw-p 0 0:0 0"), None);
    }

    #[test]
    fn status_fields() {
        let s = parse_status(
            "Name:\tqemu\nVmHWM:\t   30000 kB\nVmRSS:\t   29000 kB\nRssAnon:\t 20000 kB\n\
             RssFile:\t  9000 kB\nThreads:\t4\nVmSwap:\t0 kB\n",
        );
        assert_eq!(
            s,
            Status {
                vm_rss_kb: Some(29000),
                vm_hwm_kb: Some(30000),
                rss_anon_kb: Some(20000),
                rss_file_kb: Some(9000),
                threads: Some(4),
            }
        );
        assert_eq!(parse_status(""), Status::default());
    }
}
