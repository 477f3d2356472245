//! CPUID as the guest sees it: KVM's supported set, normalised per vCPU.
//!
//! The topology is one socket with `n` single-threaded cores; vCPU `i` has APIC ID `i`.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1 ECX: the guest runs under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC-deadline timer mode of the local APIC.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: hyper-threading (more than one logical processor per package).
const EDX_HTT: u32 = 1 << 28;

/// Facts about the VM that shape its CPUID.
#[derive(Debug, Clone, Copy)]
pub struct CpuidConfig {
    /// vCPU count.
    pub vcpus: u8,
    /// Whether KVM emulates the TSC-deadline timer.
    pub tsc_deadline: bool,
}

/// Bits needed to hold `n` distinct IDs.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `cpuid` (a copy of KVM's supported CPUID) for vCPU `index`.
pub fn normalize(cpuid: &mut CpuId, index: u8, cfg: &CpuidConfig) {
    let apic_id = u32::from(index);
    let n = u32::from(cfg.vcpus);
    let core_bits = id_bits(n);
    for e in cpuid.as_mut_slice().iter_mut() {
        normalize_entry(e, apic_id, n, core_bits, cfg);
    }
}

fn normalize_entry(
    e: &mut kvm_cpuid_entry2,
    apic_id: u32,
    n: u32,
    core_bits: u32,
    cfg: &CpuidConfig,
) {
    match e.function {
        0x1 => {
            // EBX: APIC ID [31:24], logical processors per package [23:16], CLFLUSH 8*8 bytes.
            e.ebx = (apic_id << 24) | ((n.min(255)) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= ECX_HYPERVISOR;
            if cfg.tsc_deadline {
                e.ecx |= ECX_TSC_DEADLINE;
            }
            if n > 1 {
                e.edx |= EDX_HTT;
            } else {
                e.edx &= !EDX_HTT;
            }
        }
        0x4 => {
            // Deterministic cache parameters: cores per package - 1 in [31:26]; caches are
            // per core except the last level, shared by the package.
            let level = (e.eax >> 5) & 0x7;
            let sharing = if level >= 3 { n.saturating_sub(1) } else { 0 };
            e.eax =
                (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((n.saturating_sub(1) & 0x3f) << 26);
        }
        0x6 => {
            // No thermal or power management to offer.
            e.eax = 0;
            e.ebx = 0;
            e.ecx = 0;
            e.edx = 0;
        }
        0xb | 0x1f => {
            // Extended topology: level 0 is SMT (one thread per core), level 1 is core.
            e.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = core_bits;
                    e.ebx = n;
                    e.ecx = (2 << 8) | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i & 0xff;
                }
            }
        }
        0x8000_0008 => {
            // AMD: number of cores - 1 in ECX[7:0], APIC ID size in [15:12].
            e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (n.saturating_sub(1) & 0xff);
        }
        0x8000_001e => {
            // AMD extended APIC ID; compute unit = core, one thread per unit; node 0.
            e.eax = apic_id;
            e.ebx = apic_id & 0xff;
            e.ecx = 0;
            e.edx = 0;
        }
        _ => {}
    }
}

/// The feature words a restore compares: (leaf, subleaf, register name, mask of bits the
/// VMM sets itself or that follow the guest's control registers rather than the host).
const FEATURE_WORDS: [(u32, u32, &str, u32); 9] = [
    // HYPERVISOR and TSC_DEADLINE are ours; OSXSAVE (27) mirrors the guest's CR4.
    (0x1, 0, "ecx", ECX_HYPERVISOR | ECX_TSC_DEADLINE | (1 << 27)),
    (0x1, 0, "edx", EDX_HTT),
    (0x7, 0, "ebx", 0),
    // OSPKE (4) mirrors the guest's CR4.
    (0x7, 0, "ecx", 1 << 4),
    (0x7, 0, "edx", 0),
    (0x7, 1, "eax", 0),
    (0xd, 1, "eax", 0),
    (0x8000_0001, 0, "ecx", 0),
    (0x8000_0001, 0, "edx", 0),
];

fn word(entries: &[(u32, u32, [u32; 4])], leaf: u32, sub: u32, reg: &str) -> Option<u32> {
    let (_, _, r) = entries.iter().find(|(f, i, _)| *f == leaf && *i == sub)?;
    Some(match reg {
        "eax" => r[0],
        "ebx" => r[1],
        "ecx" => r[2],
        _ => r[3],
    })
}

/// Checks that every CPU feature a saved guest saw (`saved`, as `(leaf, subleaf, [eax,
/// ebx, ecx, edx])`) is one this host's KVM offers (`supported`): a guest restored onto a
/// CPU without a feature it uses would fault. Names the missing bits.
pub fn check_compatible(
    saved: &[crate::cpu::state::CpuidLeaf],
    supported: &[kvm_cpuid_entry2],
) -> Result<(), String> {
    let saved: Vec<(u32, u32, [u32; 4])> = saved
        .iter()
        .map(|l| (l.function, l.index, [l.eax, l.ebx, l.ecx, l.edx]))
        .collect();
    let host: Vec<(u32, u32, [u32; 4])> = supported
        .iter()
        .map(|e| (e.function, e.index, [e.eax, e.ebx, e.ecx, e.edx]))
        .collect();
    let mut missing = Vec::new();
    for (leaf, sub, reg, ours) in FEATURE_WORDS {
        let Some(guest) = word(&saved, leaf, sub, reg) else {
            continue;
        };
        let offered = word(&host, leaf, sub, reg).unwrap_or(0);
        let lacking = guest & !offered & !ours;
        if lacking != 0 {
            missing.push(format!("CPUID {leaf:#x}.{sub} {reg} bits {lacking:#010x}"));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the guest saw CPU features this host lacks: {}",
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn sample() -> CpuId {
        CpuId::from_entries(&[
            entry(0x1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            kvm_cpuid_entry2 {
                function: 0x4,
                index: 3,
                eax: (3 << 5) | 0x1,
                ..Default::default()
            },
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn apic_ids_and_topology_per_vcpu() {
        let cfg = CpuidConfig {
            vcpus: 4,
            tsc_deadline: true,
        };
        for idx in 0..4u8 {
            let mut c = sample();
            normalize(&mut c, idx, &cfg);
            let l1 = find(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, u32::from(idx));
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
            assert_ne!(l1.edx & EDX_HTT, 0);
            let smt = find(&c, 0xb, 0);
            let core = find(&c, 0xb, 1);
            let end = find(&c, 0xb, 2);
            assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, 1, u32::from(idx)));
            assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 4, 2));
            assert_eq!((end.ebx, (end.ecx >> 8) & 0xff), (0, 0));
            let l3 = find(&c, 0x4, 3);
            assert_eq!(l3.eax >> 26, 3);
            assert_eq!((l3.eax >> 14) & 0xfff, 3);
            assert_eq!(find(&c, 0x8000_001e, 0).eax, u32::from(idx));
        }
    }

    #[test]
    fn single_vcpu_has_no_htt_and_zero_core_bits() {
        let mut c = sample();
        normalize(
            &mut c,
            0,
            &CpuidConfig {
                vcpus: 1,
                tsc_deadline: false,
            },
        );
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.edx & EDX_HTT, 0);
        assert_eq!(l1.ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(16), 4);
    }

    #[test]
    fn a_guest_that_saw_more_features_than_the_host_has_is_refused() {
        use crate::cpu::state::CpuidLeaf;
        let leaf = |function, ecx, edx| CpuidLeaf {
            function,
            index: 0,
            flags: 0,
            eax: 0,
            ebx: 0,
            ecx,
            edx,
        };
        let mut host = entry(0x1, 0);
        host.ecx = 0x0000_0001;
        host.edx = 0x0000_0010;
        // The bits the VMM sets itself do not count.
        let guest = [leaf(
            0x1,
            0x0000_0001 | ECX_HYPERVISOR | ECX_TSC_DEADLINE,
            0x10 | EDX_HTT,
        )];
        assert!(check_compatible(&guest, &[host]).is_ok());
        let more = [leaf(0x1, 0x0000_0003, 0x10)];
        let e = check_compatible(&more, &[host]).unwrap_err();
        assert!(e.contains("CPUID 0x1.0 ecx bits 0x00000002"), "{e}");
    }
}
