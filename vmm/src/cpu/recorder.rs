//! The last exits of one vCPU to user space, kept for the report of a fatal exit.
//!
//! A vCPU that triple-faults on an AMD host leaves no registers behind: KVM's SVM code
//! clears the VMCB and INITs the vCPU before it reports `KVM_EXIT_SHUTDOWN`, so what
//! `KVM_GET_REGS` returns afterwards is the reset state (`cs=0xf000`, base `0xffff0000`,
//! `rip=0xfff0`, `rdx` = the CPUID signature), not where the guest was. The exits the
//! vCPU took just before are then the only trace of what it was doing. Recording one
//! costs a few stores into a fixed ring on the vCPU's own thread.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};

/// How many exits are kept.
pub const RECORDED_EXITS: usize = 16;

/// The kind of an exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O read.
    PioRead,
    /// Port I/O write.
    PioWrite,
    /// MMIO read.
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// KVM_RUN returned EINTR (a kick, a signal) or EAGAIN.
    Interrupted,
    /// Any other exit.
    Other,
}

/// One recorded exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordedExit {
    /// What it was.
    pub kind: ExitKind,
    /// Port or guest-physical address (0 for the other kinds).
    pub addr: u64,
    /// Access width in bytes (0 for the other kinds).
    pub len: u8,
    /// The vCPU's exit count at this exit (1-based).
    pub seq: u64,
}

/// A ring of the last [`RECORDED_EXITS`] exits.
#[derive(Debug, Default)]
pub struct ExitRecorder {
    ring: [Option<RecordedExit>; RECORDED_EXITS],
    seq: u64,
}

impl ExitRecorder {
    /// Records one exit.
    pub fn record(&mut self, kind: ExitKind, addr: u64, len: usize) {
        self.seq += 1;
        let slot = (self.seq % RECORDED_EXITS as u64) as usize;
        self.ring[slot] = Some(RecordedExit {
            kind,
            addr,
            len: u8::try_from(len).unwrap_or(u8::MAX),
            seq: self.seq,
        });
    }

    /// The recorded exits, oldest first.
    pub fn exits(&self) -> Vec<RecordedExit> {
        let mut v: Vec<RecordedExit> = self.ring.iter().flatten().copied().collect();
        v.sort_by_key(|e| e.seq);
        v
    }
}

impl fmt::Display for ExitRecorder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exits = self.exits();
        if exits.is_empty() {
            return write!(f, "no exits to user space before this one");
        }
        write!(
            f,
            "last {} exits to user space (of {}):",
            exits.len(),
            self.seq
        )?;
        for e in exits {
            let (bus, op) = match e.kind {
                ExitKind::PioRead => ("pio", "in"),
                ExitKind::PioWrite => ("pio", "out"),
                ExitKind::MmioRead => ("mmio", "read"),
                ExitKind::MmioWrite => ("mmio", "write"),
                ExitKind::Interrupted => {
                    write!(f, " #{} interrupted", e.seq)?;
                    continue;
                }
                ExitKind::Other => {
                    write!(f, " #{} other", e.seq)?;
                    continue;
                }
            };
            write!(f, " #{} {bus} {op} {:#x}/{}", e.seq, e.addr, e.len)?;
        }
        Ok(())
    }
}

/// Whether `regs`/`sregs` are the state of a vCPU just after INIT (or reset), which is
/// what an AMD host's KVM leaves after a triple fault: then they say nothing about the
/// fault.
pub fn is_reset_state(regs: &kvm_regs, sregs: &kvm_sregs) -> bool {
    regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_exits_in_order() {
        let mut r = ExitRecorder::default();
        assert!(r.exits().is_empty());
        assert!(r.to_string().contains("no exits"));
        for i in 0..40u64 {
            r.record(ExitKind::PioWrite, 0x3f8 + i, 1);
        }
        let exits = r.exits();
        assert_eq!(exits.len(), RECORDED_EXITS);
        assert_eq!(exits[0].seq, 40 - RECORDED_EXITS as u64 + 1);
        assert_eq!(
            exits.last().map(|e| (e.seq, e.addr)),
            Some((40, 0x3f8 + 39))
        );
        r.record(ExitKind::MmioRead, 0xd000_0000, 4);
        let text = r.to_string();
        assert!(text.contains("mmio read 0xd0000000/4"), "{text}");
        assert!(text.contains("(of 41)"), "{text}");
        r.record(ExitKind::Interrupted, 0, 0);
        assert!(r.to_string().ends_with("interrupted"));
        // A width that does not fit a byte is clamped, not wrapped.
        r.record(ExitKind::MmioWrite, 0, 4096);
        assert_eq!(r.exits().last().map(|e| e.len), Some(u8::MAX));
    }

    #[test]
    fn recognises_the_reset_state() {
        let mut regs = kvm_regs {
            rip: 0xfff0,
            rdx: 0x800f12,
            ..Default::default()
        };
        let mut sregs = kvm_sregs::default();
        sregs.cs.selector = 0xf000;
        sregs.cs.base = 0xffff_0000;
        assert!(is_reset_state(&regs, &sregs));
        regs.rip = 0xffff_ffff_8100_0000;
        assert!(!is_reset_state(&regs, &sregs));
    }
}
