//! What the node offers: CPUs, memory, KVM, cgroups, versions.

use kvm_ioctls::{Cap, Kvm};
use quantix_proto::v1::{CgroupInfo, KvmInfo, Node, Resources};

/// Host CPUs and memory.
pub fn host_resources() -> Resources {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    Resources {
        vcpus: cpus,
        memory_mib: mem_kib / 1024,
    }
}

/// KVM's version and the capabilities the VMM relies on.
pub fn kvm_info() -> KvmInfo {
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            return KvmInfo {
                available: false,
                detail: format!("cannot open /dev/kvm: {e}"),
                ..Default::default()
            }
        }
    };
    let caps = [
        (Cap::Irqchip, "irqchip"),
        (Cap::Irqfd, "irqfd"),
        (Cap::Ioeventfd, "ioeventfd"),
        (Cap::Pit2, "pit2"),
        (Cap::ImmediateExit, "immediate-exit"),
        (Cap::SplitIrqchip, "split-irqchip"),
        (Cap::TscDeadlineTimer, "tsc-deadline-timer"),
        (Cap::Xsave, "xsave"),
        (Cap::Xcrs, "xcrs"),
        (Cap::VcpuEvents, "vcpu-events"),
        (Cap::KvmclockCtrl, "kvmclock-ctrl"),
        (Cap::TscControl, "tsc-control"),
        (Cap::SignalMsi, "signal-msi"),
    ];
    KvmInfo {
        available: true,
        api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus() as i32,
        capabilities: caps
            .into_iter()
            .filter(|(c, _)| kvm.check_extension(*c))
            .map(|(_, n)| n.to_string())
            .collect(),
        detail: if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            "KVM on PVM (software nested hypervisor)".into()
        } else {
            String::new()
        },
    }
}

/// The static part of the node's description (computed once).
pub fn describe(
    cgroups: &crate::cgroup::Cgroups,
    vmm: &std::path::Path,
    allocatable: Resources,
) -> Node {
    let (available, version, detail) = cgroups.describe();
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    Node {
        hostname: read("/proc/sys/kernel/hostname"),
        capacity: Some(host_resources()),
        allocatable: Some(allocatable),
        committed: None,
        vms_total: 0,
        vms_running: 0,
        kvm: Some(kvm_info()),
        cgroups: Some(CgroupInfo {
            available,
            version: version.into(),
            detail,
        }),
        agent_version: env!("CARGO_PKG_VERSION").into(),
        vmm_version: crate::process::vmm_version(vmm),
        kernel_release: read("/proc/sys/kernel/osrelease"),
    }
}
