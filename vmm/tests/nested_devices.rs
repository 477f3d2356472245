//! End to end, on a real KVM: an unmodified Debian kernel finds quantix-vmm's virtio
//! devices through ACPI (`LNRO0005`, loaded from its initramfs as modules) and uses them.
//! See docs/devices.md and docs/testing.md.

use std::time::Duration;

use quantix_sandbox::{build, paths, GuestInitramfs, Job, Payload, Sandbox};

const VMM: &str = "/payload/quantix-vmm";

/// The virtio modules of the guest kernel, in load order (each after its dependencies).
const VIRTIO_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
];

/// A guest initramfs with the given modules (at the root, as /qx-mod-N.ko) and a script
/// that loads them in order and then runs `body`.
fn guest_initramfs(sandbox: &Sandbox, modules: &[&str], body: &str) -> Vec<u8> {
    let assets = sandbox.assets();
    let mut image = GuestInitramfs::new(assets);
    let mut script = String::from("#!/bin/sh\n");
    for (i, m) in modules.iter().enumerate() {
        let data = std::fs::read(assets.module(m)).unwrap_or_else(|e| panic!("module {m}: {e}"));
        let dest = format!("/qx-mod-{i}.ko");
        script.push_str(&format!("insmod {dest} || echo \"QX-FAIL insmod {m}\"\n"));
        image = image.file(&dest, data, 0o644);
    }
    script.push_str(body);
    image
        .script(script)
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn virtio_rng_feeds_the_guests_hwrng() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm").unwrap_or_else(|e| panic!("{e}"));
    let mut modules = VIRTIO_MODULES.to_vec();
    modules.push("kernel/drivers/char/hw_random/virtio-rng.ko");
    let initramfs = guest_initramfs(
        &sandbox,
        &modules,
        "echo \"QX-RNG devices=$(ls /sys/bus/virtio/devices | tr '\\n' ' ')\"\n\
         echo \"QX-RNG current=$(cat /sys/class/misc/hw_random/rng_current)\"\n\
         echo \"QX-RNG bytes=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n')\"\n",
    );
    let mut payload = Payload::new();
    payload
        .add_file(&vmm, VMM)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/rng-initramfs.cpio", initramfs, 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    let jobs = [Job::new(
        "rng",
        [
            VMM,
            "--kernel",
            paths::GUEST_VMLINUZ,
            "--initramfs",
            "/payload/rng-initramfs.cpio",
            "--memory",
            "256M",
            "--cmdline",
            "console=ttyS0 qx.action=script",
        ],
    )
    .timeout(Duration::from_secs(180))];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    let job = &report.jobs[0];
    let out = &job.output;
    assert!(
        job.success(),
        "status {:?}, timed out {}\n{out}",
        job.status,
        job.timed_out
    );
    assert!(!out.contains("QX-FAIL"), "{out}");
    assert!(
        out.contains("virtio device activated") && out.contains("device=rng"),
        "{out}"
    );
    let line = |key: &str| {
        out.lines()
            .find_map(|l| {
                l.split_once(&format!("QX-RNG {key}="))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("no QX-RNG {key}= line:\n{out}"))
    };
    assert!(line("devices").contains("virtio0"), "{out}");
    assert_eq!(line("current"), "virtio_rng.0", "{out}");
    let bytes = line("bytes");
    assert_eq!(bytes.len(), 64, "32 bytes in hex: {bytes}");
    assert_ne!(bytes, "0".repeat(64), "entropy, not zeros");
    eprintln!("rng job {:?}: {bytes}", job.elapsed);
}
