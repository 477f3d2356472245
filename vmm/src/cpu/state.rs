//! A vCPU's complete state as KVM holds it, read and loaded on the vCPU's own thread.
//!
//! What is saved, in the order KVM wants it back (Firecracker's `vstate/vcpu.rs` and
//! Cloud Hypervisor's `hypervisor/src/kvm` restore in this order too): CPUID as the guest
//! saw it, MP state, general registers, segment and control registers, the XSAVE area
//! (FPU, SSE, AVX), XCRs, debug registers, the local APIC, MSRs (every one KVM lists
//! and can read, the TSC among them, the TSC deadline last so that it is taken relative
//! to the restored TSC), and last the pending events (exceptions, interrupts, NMIs),
//! which KVM checks against the rest. The TSC frequency is kept to compare with the
//! restoring host.
//!
//! The state is written as JSON (the snapshot's state file): registers, MSRs, CPUID and
//! XCRs with named fields a person can read; the XSAVE area, the APIC page and the event
//! block as hex blobs of their exact KVM sizes. Loading treats it as untrusted: every
//! length is checked, and KVM's own checks reject inconsistent values with an error.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_dtable, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcr, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::hex::{hex_bytes, hex_words};
use crate::plain::Plain;

/// `IA32_TSC_DEADLINE`: loaded after the TSC, so that the deadline it holds is not
/// measured against the TSC of the new VM's start.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// MSRs read or written per `KVM_GET_MSRS`/`KVM_SET_MSRS` call.
const MSR_BATCH: usize = 64;
/// At most this many MSRs in a saved vCPU (KVM lists a few hundred).
pub const MAX_SAVED_MSRS: usize = 2048;
/// Size of the XSAVE area `KVM_GET_XSAVE` fills, in 32-bit words (4 KiB).
pub const XSAVE_WORDS: usize = 1024;
/// Size of the local APIC page, bytes.
pub const LAPIC_BYTES: usize = 1024;
/// At most this many XCRs (KVM's `kvm_xcrs` array).
const MAX_XCRS: usize = 16;

/// Why a vCPU's state could not be read or loaded.
#[derive(Debug, Error)]
pub enum StateError {
    /// A KVM call failed.
    #[error("vCPU {vcpu}: KVM_{op} failed: {source}")]
    Kvm {
        /// The vCPU.
        vcpu: u8,
        /// The ioctl, without its `KVM_` prefix.
        op: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A saved value does not fit what KVM takes.
    #[error("vCPU {vcpu}: saved {what} is invalid: {reason}")]
    Invalid {
        /// The vCPU.
        vcpu: u8,
        /// Which part.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// KVM took only part of the saved MSRs.
    #[error("vCPU {vcpu}: KVM took {written} of {wanted} MSRs (refused: {refused:#x})")]
    MsrsRefused {
        /// The vCPU.
        vcpu: u8,
        /// MSRs written.
        written: usize,
        /// MSRs asked for.
        wanted: usize,
        /// The first MSR KVM refused.
        refused: u32,
    },
    /// This host's XSAVE area is larger than the 4 KiB `KVM_GET_XSAVE` carries (AMX):
    /// saving would lose state, loading could make KVM read past the buffer.
    #[error(
        "this host's XSAVE area is {0} bytes; states beyond 4096 bytes (AMX) are not supported"
    )]
    XsaveTooLarge(usize),
}

/// One MSR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Msr {
    /// Its index.
    pub index: u32,
    /// Its value.
    pub data: u64,
}

/// One CPUID leaf as the guest saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeaf {
    /// EAX on input.
    pub function: u32,
    /// ECX on input.
    pub index: u32,
    /// KVM's flags (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`).
    pub flags: u32,
    /// Output registers.
    pub eax: u32,
    /// Output registers.
    pub ebx: u32,
    /// Output registers.
    pub ecx: u32,
    /// Output registers.
    pub edx: u32,
}

/// One extended control register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xcr {
    /// Which (0: XCR0).
    pub xcr: u32,
    /// Its value.
    pub value: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_regs", deny_unknown_fields)]
struct RegsDef {
    rax: u64,
    rbx: u64,
    rcx: u64,
    rdx: u64,
    rsi: u64,
    rdi: u64,
    rsp: u64,
    rbp: u64,
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rip: u64,
    rflags: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_segment", deny_unknown_fields)]
struct SegmentDef {
    base: u64,
    limit: u32,
    selector: u16,
    type_: u8,
    present: u8,
    dpl: u8,
    db: u8,
    s: u8,
    l: u8,
    g: u8,
    avl: u8,
    unusable: u8,
    #[serde(skip)]
    padding: u8,
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_dtable", deny_unknown_fields)]
struct DtableDef {
    base: u64,
    limit: u16,
    #[serde(skip)]
    padding: [u16; 3],
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_sregs", deny_unknown_fields)]
struct SregsDef {
    #[serde(with = "SegmentDef")]
    cs: kvm_segment,
    #[serde(with = "SegmentDef")]
    ds: kvm_segment,
    #[serde(with = "SegmentDef")]
    es: kvm_segment,
    #[serde(with = "SegmentDef")]
    fs: kvm_segment,
    #[serde(with = "SegmentDef")]
    gs: kvm_segment,
    #[serde(with = "SegmentDef")]
    ss: kvm_segment,
    #[serde(with = "SegmentDef")]
    tr: kvm_segment,
    #[serde(with = "SegmentDef")]
    ldt: kvm_segment,
    #[serde(with = "DtableDef")]
    gdt: kvm_dtable,
    #[serde(with = "DtableDef")]
    idt: kvm_dtable,
    cr0: u64,
    cr2: u64,
    cr3: u64,
    cr4: u64,
    cr8: u64,
    efer: u64,
    apic_base: u64,
    interrupt_bitmap: [u64; 4],
}

#[derive(Serialize, Deserialize)]
#[serde(remote = "kvm_debugregs", deny_unknown_fields)]
struct DebugregsDef {
    db: [u64; 4],
    dr6: u64,
    dr7: u64,
    flags: u64,
    #[serde(skip)]
    reserved: [u64; 9],
}

/// Everything KVM holds for one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub index: u8,
    /// CPUID as the guest saw it.
    pub cpuid: Vec<CpuidLeaf>,
    /// `KVM_MP_STATE_*` (running, halted, waiting for SIPI...).
    pub mp_state: u32,
    /// General registers, RIP, RFLAGS.
    #[serde(with = "RegsDef")]
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER, APIC base.
    #[serde(with = "SregsDef")]
    pub sregs: kvm_sregs,
    /// The XSAVE area (FPU, SSE, AVX state), 4 KiB, hex.
    #[serde(with = "hex_words")]
    pub xsave: Vec<u32>,
    /// XCR0 and any other extended control registers.
    pub xcrs: Vec<Xcr>,
    /// DR0–DR3, DR6, DR7.
    #[serde(with = "DebugregsDef")]
    pub debugregs: kvm_debugregs,
    /// The local APIC's register page, hex.
    #[serde(with = "hex_bytes")]
    pub lapic: Vec<u8>,
    /// Every MSR KVM lists that could be read.
    pub msrs: Vec<Msr>,
    /// Pending exceptions, interrupts, NMIs and SMIs (`struct kvm_vcpu_events`), hex.
    #[serde(with = "hex_bytes")]
    pub events: Vec<u8>,
    /// The vCPU's TSC frequency, kHz (`None` where KVM cannot say).
    pub tsc_khz: Option<u32>,
}

fn kvm(vcpu: u8, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { vcpu, op, source }
}

fn invalid(vcpu: u8, what: &'static str, reason: impl Into<String>) -> StateError {
    StateError::Invalid {
        vcpu,
        what,
        reason: reason.into(),
    }
}

/// Checks that this host's XSAVE area fits `KVM_GET_XSAVE`'s 4 KiB (`xsave2_size` is
/// `KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2)`, 0 where the capability is absent).
pub fn check_xsave_size(xsave2_size: usize) -> Result<XsaveFits, StateError> {
    if xsave2_size > XSAVE_WORDS * 4 {
        return Err(StateError::XsaveTooLarge(xsave2_size));
    }
    Ok(XsaveFits(()))
}

/// Proof that this host's XSAVE area fits 4 KiB (from [`check_xsave_size`]), which
/// loading a state needs: `KVM_SET_XSAVE` reads as many bytes as the host's area holds.
#[derive(Debug, Clone, Copy)]
pub struct XsaveFits(());

impl VcpuState {
    /// Reads vCPU `index`'s state; `msr_indices` are the MSRs to save (the host's
    /// `KVM_GET_MSR_INDEX_LIST`). An MSR KVM lists but cannot read is left out (KVM
    /// lists a few it cannot read for every configuration). Run on the vCPU's thread,
    /// with the vCPU paused; the caller has checked the XSAVE size.
    pub fn save(fd: &VcpuFd, index: u8, msr_indices: &[u32]) -> Result<Self, StateError> {
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(index, "GET_CPUID2"))?
            .as_slice()
            .iter()
            .map(|e| CpuidLeaf {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect();
        let mp_state = fd
            .get_mp_state()
            .map_err(kvm(index, "GET_MP_STATE"))?
            .mp_state;
        let regs = fd.get_regs().map_err(kvm(index, "GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm(index, "GET_SREGS"))?;
        let xsave = fd
            .get_xsave()
            .map_err(kvm(index, "GET_XSAVE"))?
            .region
            .to_vec();
        let x = fd.get_xcrs().map_err(kvm(index, "GET_XCRS"))?;
        let nr = (x.nr_xcrs as usize).min(MAX_XCRS);
        let xcrs = x.xcrs[..nr]
            .iter()
            .map(|x| Xcr {
                xcr: x.xcr,
                value: x.value,
            })
            .collect();
        let debugregs = fd.get_debug_regs().map_err(kvm(index, "GET_DEBUGREGS"))?;
        let lapic = fd
            .get_lapic()
            .map_err(kvm(index, "GET_LAPIC"))?
            .regs
            .iter()
            .map(|b| *b as u8)
            .collect();
        let msrs = read_msrs(fd, index, msr_indices)?;
        let events = fd
            .get_vcpu_events()
            .map_err(kvm(index, "GET_VCPU_EVENTS"))?
            .to_bytes();
        let tsc_khz = fd.get_tsc_khz().ok();
        Ok(Self {
            index,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Checks every length before anything reaches KVM.
    pub fn validate(&self) -> Result<(), StateError> {
        let i = self.index;
        if self.cpuid.is_empty() || self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(invalid(
                i,
                "CPUID",
                format!("{} leaves (1 to {KVM_MAX_CPUID_ENTRIES})", self.cpuid.len()),
            ));
        }
        if self.xsave.len() != XSAVE_WORDS {
            return Err(invalid(
                i,
                "XSAVE area",
                format!("{} words, not {XSAVE_WORDS}", self.xsave.len()),
            ));
        }
        if self.xcrs.len() > MAX_XCRS {
            return Err(invalid(
                i,
                "XCRs",
                format!("{} (at most {MAX_XCRS})", self.xcrs.len()),
            ));
        }
        if self.lapic.len() != LAPIC_BYTES {
            return Err(invalid(
                i,
                "local APIC",
                format!("{} bytes, not {LAPIC_BYTES}", self.lapic.len()),
            ));
        }
        if self.msrs.len() > MAX_SAVED_MSRS {
            return Err(invalid(
                i,
                "MSRs",
                format!("{} (at most {MAX_SAVED_MSRS})", self.msrs.len()),
            ));
        }
        let size = std::mem::size_of::<kvm_vcpu_events>();
        if self.events.len() != size {
            return Err(invalid(
                i,
                "vCPU events",
                format!("{} bytes, not {size}", self.events.len()),
            ));
        }
        Ok(())
    }

    /// Loads the state into `fd`, a vCPU created for the same configuration and not yet
    /// run. Run on the vCPU's thread; `fits` proves the host's XSAVE area is 4 KiB.
    pub fn restore(&self, fd: &VcpuFd, fits: XsaveFits) -> Result<(), StateError> {
        let _ = fits;
        self.validate()?;
        let i = self.index;
        // The guest's TSC frequency, where this host's differs and KVM can scale it.
        if let Some(khz) = self.tsc_khz {
            if fd.get_tsc_khz().ok() != Some(khz) {
                if let Err(e) = fd.set_tsc_khz(khz) {
                    tracing::warn!(vcpu = i, khz, error = %e, "cannot give the restored guest its TSC frequency; its time may drift");
                }
            }
        }
        let entries: Vec<kvm_cpuid_entry2> = self
            .cpuid
            .iter()
            .map(|l| kvm_cpuid_entry2 {
                function: l.function,
                index: l.index,
                flags: l.flags,
                eax: l.eax,
                ebx: l.ebx,
                ecx: l.ecx,
                edx: l.edx,
                ..Default::default()
            })
            .collect();
        let cpuid =
            CpuId::from_entries(&entries).map_err(|e| invalid(i, "CPUID", format!("{e:?}")))?;
        fd.set_cpuid2(&cpuid).map_err(kvm(i, "SET_CPUID2"))?;
        fd.set_mp_state(kvm_mp_state {
            mp_state: self.mp_state,
        })
        .map_err(kvm(i, "SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm(i, "SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(kvm(i, "SET_SREGS"))?;
        let mut xsave = kvm_xsave::default();
        xsave.region.copy_from_slice(&self.xsave);
        // SAFETY: `xsave` is a whole 4 KiB `kvm_xsave`, and `fits` (only made by
        // `check_xsave_size`) shows this host's XSAVE area is at most 4 KiB, so KVM reads
        // no more than the struct holds.
        unsafe { fd.set_xsave(&xsave) }.map_err(kvm(i, "SET_XSAVE"))?;
        let mut xcrs = kvm_xcrs {
            nr_xcrs: self.xcrs.len() as u32,
            ..Default::default()
        };
        for (slot, x) in xcrs.xcrs.iter_mut().zip(&self.xcrs) {
            *slot = kvm_xcr {
                xcr: x.xcr,
                value: x.value,
                ..Default::default()
            };
        }
        fd.set_xcrs(&xcrs).map_err(kvm(i, "SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm(i, "SET_DEBUGREGS"))?;
        let mut lapic = kvm_lapic_state::default();
        for (slot, b) in lapic.regs.iter_mut().zip(&self.lapic) {
            *slot = *b as _;
        }
        fd.set_lapic(&lapic).map_err(kvm(i, "SET_LAPIC"))?;
        write_msrs(fd, i, &self.msrs)?;
        let events = kvm_vcpu_events::from_bytes(&self.events)
            .ok_or_else(|| invalid(i, "vCPU events", "wrong size"))?;
        fd.set_vcpu_events(&events)
            .map_err(kvm(i, "SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `indices` in batches; an MSR KVM refuses to read is skipped.
fn read_msrs(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Vec<Msr>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() && out.len() < MAX_SAVED_MSRS {
        let batch = &rest[..rest.len().min(MSR_BATCH)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| invalid(vcpu, "MSRs", format!("{e:?}")))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm(vcpu, "GET_MSRS"))?;
        out.extend(
            msrs.as_slice()[..read.min(batch.len())]
                .iter()
                .map(|e| Msr {
                    index: e.index,
                    data: e.data,
                }),
        );
        // KVM stops at the first MSR it cannot read: skip that one and go on after it.
        let consumed = (read + 1).min(batch.len());
        if read < batch.len() {
            tracing::debug!(
                vcpu,
                msr = format_args!("{:#x}", batch[read]),
                "MSR not readable; not saved"
            );
        }
        rest = &rest[consumed..];
    }
    out.truncate(MAX_SAVED_MSRS);
    Ok(out)
}

/// Writes `msrs` in batches, the TSC deadline last; every one must be taken.
fn write_msrs(fd: &VcpuFd, vcpu: u8, msrs: &[Msr]) -> Result<(), StateError> {
    let mut ordered: Vec<Msr> = msrs
        .iter()
        .copied()
        .filter(|m| m.index != MSR_IA32_TSC_DEADLINE)
        .collect();
    ordered.extend(
        msrs.iter()
            .copied()
            .filter(|m| m.index == MSR_IA32_TSC_DEADLINE),
    );
    for batch in ordered.chunks(MSR_BATCH) {
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let list =
            Msrs::from_entries(&entries).map_err(|e| invalid(vcpu, "MSRs", format!("{e:?}")))?;
        let written = fd.set_msrs(&list).map_err(kvm(vcpu, "SET_MSRS"))?;
        if written != batch.len() {
            return Err(StateError::MsrsRefused {
                vcpu,
                written,
                wanted: batch.len(),
                refused: batch.get(written).map_or(0, |m| m.index),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsave_size_check() {
        assert!(check_xsave_size(0).is_ok());
        assert!(check_xsave_size(4096).is_ok());
        assert!(matches!(
            check_xsave_size(11008),
            Err(StateError::XsaveTooLarge(11008))
        ));
    }
}
