//! Where a hung nested host's CPU is: QEMU's human monitor (`info registers`, then
//! `info lapic`) sampled a few times before the sandbox kills QEMU, each instruction
//! pointer given relative to the nested host kernel's `_text`, whose KASLR address its
//! init printed. Debian's `System.map` is a placeholder (the real one is in the `-dbg`
//! package), so an offset is named by hand.
//!
//! A hung nested host says nothing on its console; the samples tell a loop in the nested
//! host's kernel (an offset from `_text`, the same or nearby each time) from a CPU in the
//! nested guest (an address outside that kernel), and the APIC state shows an interrupt
//! pending that the CPU never takes.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// The console line prefix of the nested host's KASLR base (`_text` in /proc/kallsyms).
pub(crate) const KASLR_LINE: &str = "qx-host-kallsyms ";

/// The prompt QEMU's human monitor prints when it waits for a command.
const PROMPT: &str = "(qemu) ";

/// One `info registers` sample: the lines that locate the CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuSample {
    /// `RIP=` of the sample.
    pub rip: u64,
    /// The first lines (general registers, RIP, flags, CPL, HLT) and CR0..CR4, EFER.
    pub lines: Vec<String>,
}

/// What the monitor said of a hung CPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CpuState {
    /// The register samples, in order.
    pub samples: Vec<CpuSample>,
    /// `info lapic` after them: the timer, ISR and IRR (an interrupt in service that is
    /// never ended blocks every one of lower priority, the CPU idles with IF set).
    pub lapic: Vec<String>,
}

/// Asks the monitor at `socket` for the CPU's registers `count` times, `interval` apart,
/// then for its local APIC.
pub(crate) fn sample(socket: &Path, count: usize, interval: Duration) -> Result<CpuState, String> {
    let stream = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to QEMU's monitor {}: {e}", socket.display()))?;
    let timeout = Some(Duration::from_secs(5));
    stream
        .set_read_timeout(timeout)
        .and_then(|()| stream.set_write_timeout(timeout))
        .map_err(|e| format!("monitor socket: {e}"))?;
    let mut writer = stream
        .try_clone()
        .map_err(|e| format!("monitor socket: {e}"))?;
    let mut reader = BufReader::new(stream);
    read_until_prompt(&mut reader)?;
    let mut samples = Vec::with_capacity(count);
    for i in 0..count {
        if i > 0 {
            std::thread::sleep(interval);
        }
        writer
            .write_all(b"info registers\n")
            .map_err(|e| format!("writing to QEMU's monitor: {e}"))?;
        let text = read_until_prompt(&mut reader)?;
        samples.push(parse_registers(&text)?);
    }
    writer
        .write_all(b"info lapic\n")
        .map_err(|e| format!("writing to QEMU's monitor: {e}"))?;
    let lapic = read_until_prompt(&mut reader)?
        .lines()
        .skip(1) // the echoed command
        .map(strip_escapes)
        .filter(|l| !l.trim().is_empty())
        .collect();
    Ok(CpuState { samples, lapic })
}

/// Reads the monitor's output up to its next prompt (which ends without a newline).
fn read_until_prompt(reader: &mut impl BufRead) -> Result<String, String> {
    let mut out = Vec::new();
    loop {
        let buf = reader
            .fill_buf()
            .map_err(|e| format!("reading QEMU's monitor: {e}"))?;
        if buf.is_empty() {
            return Err("QEMU's monitor closed the connection".to_string());
        }
        let n = buf.len();
        out.extend_from_slice(buf);
        reader.consume(n);
        if out.ends_with(PROMPT.as_bytes()) {
            out.truncate(out.len() - PROMPT.len());
            return Ok(String::from_utf8_lossy(&out).into_owned());
        }
        if out.len() > 1 << 20 {
            return Err("QEMU's monitor sent more than 1 MiB without a prompt".to_string());
        }
    }
}

/// The lines of `info registers` that locate the CPU, and its RIP.
fn parse_registers(text: &str) -> Result<CpuSample, String> {
    // The monitor echoes the command with terminal escapes; keep only register lines.
    let lines: Vec<String> = text
        .lines()
        .map(strip_escapes)
        .filter(|l| {
            [
                "RAX=", "RSI=", "R8 =", "R12=", "RIP=", "EAX=", "ESI=", "EIP=", "CS =", "CR0=",
                "EFER=",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .collect();
    let rip = lines
        .iter()
        .find_map(|l| l.strip_prefix("RIP=").or_else(|| l.strip_prefix("EIP=")))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| {
            format!(
                "no RIP in QEMU's `info registers` reply: {:?}",
                text.chars().take(200).collect::<String>()
            )
        })?;
    Ok(CpuSample { rip, lines })
}

/// A line without terminal escape sequences (`ESC [ ... letter`) and control characters.
fn strip_escapes(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else if !c.is_control() {
            out.push(c);
        }
    }
    out
}

/// The runtime `_text` from the console line the nested host's init printed.
pub(crate) fn kaslr_text(console_line: &str) -> Option<u64> {
    let rest = console_line.strip_prefix(KASLR_LINE)?;
    u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
}

/// The samples as text for a person: each RIP (as an offset from the kernel's `_text`
/// when the KASLR base is known), then the first sample's registers and the local APIC.
pub(crate) fn describe(state: &CpuState, kaslr_text: Option<u64>) -> String {
    let mut out = String::new();
    let samples = &state.samples;
    for (i, s) in samples.iter().enumerate() {
        let place = match kaslr_text {
            Some(text) if s.rip >= text => format!("_text+{:#x}", s.rip - text),
            Some(_) => "below the nested host's kernel (a nested guest, or user space)".into(),
            None => "(no KASLR base: the nested host's init did not print it)".into(),
        };
        out.push_str(&format!("sample {i}: RIP={:016x} {place}\n", s.rip));
    }
    if let Some(first) = samples.first() {
        out.push_str(&first.lines.join("\n"));
    }
    if !state.lapic.is_empty() {
        out.push_str("\nlocal APIC:\n");
        out.push_str(&state.lapic.join("\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const REGS: &str = "info registers\r\n\x1b[K\
RAX=0000000000000000 RBX=ffffffff82a13940 RCX=0000000000000001 RDX=0000000000000000\r\n\
RSI=0000000000000083 RDI=0000000000000000 RBP=0000000000000000 RSP=ffffffff82a03e90\r\n\
R8 =0000000000000001 R9 =0000000000000000 R10=0000000000000001 R11=0000000000000000\r\n\
R12=0000000000000000 R13=0000000000000000 R14=0000000000000000 R15=0000000000000000\r\n\
RIP=ffffffff81c5e2ab RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n\
ES =0000 0000000000000000 00000000 00000000\r\n\
CS =0010 0000000000000000 ffffffff 00af9b00 DPL=0 CS64 [-RA]\r\n\
CR0=80050033 CR2=0000000000000000 CR3=0000000002a10000 CR4=003506f0\r\n\
EFER=0000000000001d01\r\n";

    #[test]
    fn a_register_dump_gives_rip_and_the_locating_lines() {
        let s = parse_registers(REGS).unwrap();
        assert_eq!(s.rip, 0xffff_ffff_81c5_e2ab);
        assert_eq!(s.lines.len(), 8, "{:?}", s.lines);
        assert!(s.lines[4].contains("HLT=1"));
        assert!(parse_registers("no registers here").is_err());
    }

    /// Against a real QEMU (the one the sandbox uses), stopped at the reset vector.
    #[test]
    fn a_real_qemu_monitor_is_sampled() {
        let dir = std::env::temp_dir().join(format!("qx-monitor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("m.sock");
        let mut qemu = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-S",
                "-display",
                "none",
                "-nodefaults",
                "-monitor",
            ])
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .spawn()
            .expect("qemu-system-x86_64 (scripts/sandbox-assets installs it)");
        let mut waited = 0;
        while !socket.exists() && waited < 100 {
            std::thread::sleep(Duration::from_millis(50));
            waited += 1;
        }
        let result = sample(&socket, 2, Duration::from_millis(10));
        let _ = qemu.kill();
        let _ = qemu.wait();
        let _ = std::fs::remove_dir_all(&dir);
        let state = result.unwrap();
        let samples = &state.samples;
        assert_eq!(samples.len(), 2);
        assert!(
            state.lapic.iter().any(|l| l.starts_with("ISR")),
            "{:?}",
            state.lapic
        );
        // A CPU that never ran sits at the reset vector (EIP=fff0 in real mode).
        assert_eq!(samples[0].rip, 0xfff0, "{:?}", samples[0].lines);
        assert!(samples[0].lines.iter().any(|l| l.starts_with("CS =f000")));
    }

    #[test]
    fn the_kaslr_line_is_read() {
        assert_eq!(
            kaslr_text("qx-host-kallsyms ffffffffa3e00000 T _text"),
            Some(0xffff_ffff_a3e0_0000)
        );
        assert_eq!(kaslr_text("[ 1.0] something"), None);
    }

    #[test]
    fn samples_are_described_relative_to_the_kernel() {
        let s = parse_registers(REGS).unwrap();
        let state = CpuState {
            samples: vec![s.clone(), CpuSample { rip: 0x1000, ..s }],
            lapic: vec!["ISR\t 0xec".to_string()],
        };
        let text = describe(&state, Some(0xffff_ffff_8100_0000));
        assert!(
            text.contains("sample 0: RIP=ffffffff81c5e2ab _text+0xc5e2ab"),
            "{text}"
        );
        assert!(
            text.contains("sample 1: RIP=0000000000001000 below"),
            "{text}"
        );
        assert!(text.contains("HLT=1"), "{text}");
        assert!(text.contains("local APIC:\nISR\t 0xec"), "{text}");
        let bare = describe(&state, None);
        assert!(
            bare.contains("RIP=ffffffff81c5e2ab (no KASLR base"),
            "{bare}"
        );
    }
}
