//! End to end, on a real KVM: an unmodified Debian kernel finds quantix-vmm's virtio
//! devices through ACPI (`LNRO0005`, loaded from its initramfs as modules) and uses them.
//! See docs/devices.md and docs/testing.md.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{paths, Job, Sandbox, SandboxConfig};

mod common;
use common::nested::{field, VMM};

fn guest_initramfs(sandbox: &Sandbox, modules: &[&str], body: &str) -> Vec<u8> {
    common::nested::guest_initramfs(sandbox, modules, Vec::new(), body)
}

fn run_job(sandbox: &Sandbox, images: Vec<(&str, Vec<u8>)>, job: Job) -> String {
    common::nested::run_job(sandbox, &[], images, job)
}

/// The virtio modules of the guest kernel, in load order (each after its dependencies).
const VIRTIO_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
];

#[test]
fn virtio_rng_feeds_the_guests_hwrng() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let mut modules = VIRTIO_MODULES.to_vec();
    modules.push("kernel/drivers/char/hw_random/virtio-rng.ko");
    let initramfs = guest_initramfs(
        &sandbox,
        &modules,
        "echo \"QX-RNG devices=$(ls /sys/bus/virtio/devices | tr '\\n' ' ')\"\n\
         echo \"QX-RNG current=$(cat /sys/class/misc/hw_random/rng_current)\"\n\
         echo \"QX-RNG bytes=$(head -c 32 /dev/hwrng | od -An -tx1 | tr -d ' \\n')\"\n",
    );
    let images = vec![("/payload/rng-initramfs.cpio", initramfs)];
    let job = Job::new(
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
    .timeout(Duration::from_secs(180));
    let out = &run_job(&sandbox, images, job);
    assert!(
        out.contains("virtio device activated") && out.contains("device=rng"),
        "{out}"
    );
    let line = |key: &str| field(out, &format!("QX-RNG {key}"));
    assert!(line("devices").contains("virtio0"), "{out}");
    assert_eq!(line("current"), "virtio_rng.0", "{out}");
    let bytes = line("bytes");
    assert_eq!(bytes.len(), 64, "32 bytes in hex: {bytes}");
    assert_ne!(bytes, "0".repeat(64), "entropy, not zeros");
}

/// Two disks, one read-only: the guest makes a file system on the first, writes a file,
/// syncs and powers off; a second VM on the same image reads the file back bit for bit;
/// the read-only disk can be read but not written.
#[test]
fn virtio_blk_data_survives_a_vmm_restart_and_readonly_is_enforced() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let mut modules = VIRTIO_MODULES.to_vec();
    modules.push("kernel/drivers/block/virtio_blk.ko");
    let writer = guest_initramfs(
        &sandbox,
        &modules,
        "echo \"QX-BLK serial=$(cat /sys/block/vda/serial) ro=$(cat /sys/block/vdb/ro) size=$(cat /sys/block/vda/size)\"\n\
         mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt\n\
         dd if=/dev/urandom of=/mnt/data bs=1024 count=3000 2>/dev/null\n\
         echo \"QX-BLK written=$(sha256sum /mnt/data | cut -d' ' -f1)\"\n\
         sync && umount /mnt\n\
         echo \"QX-BLK ro-content=$(head -c 16 /dev/vdb)\"\n\
         if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then echo QX-BLK ro-write=succeeded; else echo QX-BLK ro-write=refused; fi\n",
    );
    let reader = guest_initramfs(
        &sandbox,
        &modules,
        "mkdir -p /mnt && mount -t ext4 -o ro /dev/vda /mnt\n\
         echo \"QX-BLK read=$(sha256sum /mnt/data | cut -d' ' -f1)\"\n",
    );
    let images = vec![
        ("/payload/blk-writer.cpio", writer),
        ("/payload/blk-reader.cpio", reader),
    ];
    // The writer's disks use io_uring, the reader's the thread pool: both engines see
    // the same data.
    let boot = |initramfs: &str, aio: &str| {
        format!(
            "{VMM} --kernel {} --initramfs {initramfs} --memory 256M --rng off \
             --disk path=/tmp/data.img,id=data,aio={aio} \
             --disk path=/tmp/ro.img,readonly=on,id=ro,aio={aio} \
             --cmdline 'console=ttyS0 qx.action=script'",
            paths::GUEST_VMLINUZ
        )
    };
    let script = format!(
        "set -e\n\
         dd if=/dev/zero of=/tmp/data.img bs=1M count=64 2>/dev/null\n\
         dd if=/dev/zero of=/tmp/ro.img bs=1M count=4 2>/dev/null\n\
         printf READONLY-DISK-42 | dd of=/tmp/ro.img conv=notrunc 2>/dev/null\n\
         ro_before=$(sha256sum /tmp/ro.img | cut -d' ' -f1)\n\
         {}\n\
         {}\n\
         echo \"QX-HOST ro-unchanged=$([ \"$(sha256sum /tmp/ro.img | cut -d' ' -f1)\" = \"$ro_before\" ] && echo yes || echo no)\"\n",
        boot("/payload/blk-writer.cpio", "io_uring"),
        boot("/payload/blk-reader.cpio", "threads"),
    );
    let job = Job::shell("blk", script).timeout(Duration::from_secs(300));
    let out = &run_job(&sandbox, images, job);
    let info = field(out, "QX-BLK serial");
    assert!(
        info.starts_with("data ro=1 size=131072"),
        "serial, read-only flag, 64 MiB in sectors: {info}"
    );
    let written = field(out, "QX-BLK written");
    assert_eq!(written.len(), 64, "{out}");
    assert_eq!(
        field(out, "QX-BLK read"),
        written,
        "the file read by the second VM: {out}"
    );
    assert_eq!(field(out, "QX-BLK ro-content"), "READONLY-DISK-42", "{out}");
    assert_eq!(field(out, "QX-BLK ro-write"), "refused", "{out}");
    assert_eq!(field(out, "QX-HOST ro-unchanged"), "yes", "{out}");
    let engines: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("disk I/O engine") && l.contains("disk=data"))
        .collect();
    assert_eq!(engines.len(), 2, "{out}");
    assert!(
        engines[0].contains("io_uring"),
        "the writer used io_uring: {out}"
    );
    assert!(
        engines[1].contains("threads"),
        "the reader used threads: {out}"
    );
}

/// Two cards on two TAPs in the nested host: the guest pings the host through each, then
/// each side fetches a 4 MiB random file from the other's HTTP server (busybox httpd and
/// wget) over the first card, and the SHA-256 sums match at both ends.
#[test]
fn virtio_net_carries_ping_and_tcp_both_ways_through_a_tap() {
    let assets = quantix_sandbox::Assets::from_env().unwrap_or_else(|e| panic!("{e}"));
    let config = SandboxConfig {
        network_modules: true,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::with_config(assets, config);
    let mut modules = VIRTIO_MODULES.to_vec();
    modules.extend([
        "kernel/net/core/failover.ko",
        "kernel/drivers/net/net_failover.ko",
        "kernel/drivers/net/virtio_net.ko",
    ]);
    let guest = guest_initramfs(
        &sandbox,
        &modules,
        "ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0\n\
         ip link set eth1 up && ip addr add 10.0.3.2/24 dev eth1\n\
         echo \"QX-NET mac=$(cat /sys/class/net/eth0/address)\"\n\
         echo \"QX-NET mac1=$(cat /sys/class/net/eth1/address)\"\n\
         ok=no; for i in $(seq 60); do if ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1; then ok=yes; break; fi; done\n\
         echo \"QX-NET ping=$ok\"\n\
         ok=no; for i in $(seq 60); do if ping -c 1 -W 1 10.0.3.1 >/dev/null 2>&1; then ok=yes; break; fi; done\n\
         echo \"QX-NET ping1=$ok\"\n\
         mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/from-guest bs=1024 count=4096 2>/dev/null\n\
         echo \"QX-NET from-guest=$(sha256sum /tmp/www/from-guest | cut -d' ' -f1)\"\n\
         httpd -p 8080 -h /tmp/www\n\
         wget -q -O /tmp/to-guest http://10.0.2.1:8080/to-guest && echo \"QX-NET to-guest=$(sha256sum /tmp/to-guest | cut -d' ' -f1)\"\n\
         for i in $(seq 240); do wget -q -O /dev/null http://10.0.2.1:8080/done 2>/dev/null && break; sleep 0.5; done\n",
    );
    let images = vec![("/payload/net.cpio", guest)];
    let script = format!(
        "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/to-guest bs=1024 count=4096 2>/dev/null\n\
         echo \"QX-HOST to-guest=$(sha256sum /tmp/www/to-guest | cut -d' ' -f1)\"\n\
         {VMM} --kernel {} --initramfs /payload/net.cpio --memory 256M --rng off \
           --net tap=qxtap0,mac=52:54:00:aa:bb:01 --net tap=qxtap1,mac=52:54:00:aa:bb:02 --cmdline 'console=ttyS0 loglevel=3 qx.action=script' >/tmp/vmm.log 2>&1 &\n\
         vmm=$!\n\
         i=0; while ! ip link show qxtap0 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 300 ] || break; sleep 0.1; done\n\
         i=0; while ! ip link show qxtap1 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 300 ] || break; sleep 0.1; done\n\
         ip addr add 10.0.2.1/24 dev qxtap0 && ip link set qxtap0 up\n\
         ip addr add 10.0.3.1/24 dev qxtap1 && ip link set qxtap1 up\n\
         httpd -f -p 8080 -h /tmp/www >/dev/null 2>&1 &\n\
         httpd_pid=$!\n\
         i=0; until wget -q -O /tmp/from-guest http://10.0.2.2:8080/from-guest 2>/dev/null; do i=$((i+1)); [ $i -lt 240 ] || break; sleep 0.5; done\n\
         echo \"QX-HOST from-guest=$(sha256sum /tmp/from-guest | cut -d' ' -f1)\"\n\
         touch /tmp/www/done\n\
         wait $vmm; status=$?\n\
         kill $httpd_pid\n\
         cat /tmp/vmm.log\n\
         echo \"QX-HOST vmm-status=$status\"\n",
        paths::GUEST_VMLINUZ
    );
    let job = Job::shell("net", script).timeout(Duration::from_secs(300));
    let out = &run_job(&sandbox, images, job);
    assert_eq!(field(out, "QX-HOST vmm-status"), "0", "{out}");
    assert_eq!(field(out, "QX-NET mac"), "52:54:00:aa:bb:01", "{out}");
    assert_eq!(field(out, "QX-NET ping"), "yes", "{out}");
    assert_eq!(field(out, "QX-NET mac1"), "52:54:00:aa:bb:02", "{out}");
    assert_eq!(field(out, "QX-NET ping1"), "yes", "second card: {out}");
    let to_guest = field(out, "QX-HOST to-guest");
    assert_eq!(to_guest.len(), 64, "{out}");
    assert_eq!(
        field(out, "QX-NET to-guest"),
        to_guest,
        "host to guest: {out}"
    );
    let from_guest = field(out, "QX-NET from-guest");
    assert_eq!(from_guest.len(), 64, "{out}");
    assert_eq!(
        field(out, "QX-HOST from-guest"),
        from_guest,
        "guest to host: {out}"
    );
}

/// The guest writes to `hvc0`; the line lands in the console's file, not on the serial port.
#[test]
fn virtio_console_carries_output_and_input() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let mut modules = VIRTIO_MODULES.to_vec();
    modules.push("kernel/drivers/char/virtio_console.ko");
    // The guest writes to hvc0, then reads a line from it and reports it on the serial port.
    let guest = guest_initramfs(
        &sandbox,
        &modules,
        "for i in $(seq 50); do [ -c /dev/hvc0 ] && break; sleep 0.1; done\n\
         exec 3<> /dev/hvc0\n\
         stty -echo <&3\n\
         echo 'QX-HVC hello from hvc0' >&3 && echo QX-HVC-WRITTEN\n\
         echo QX-HVC-READY\n\
         read -t 60 line <&3\n\
         echo \"QX-HVC-GOT $line\"\n",
    );
    let images = vec![("/payload/hvc.cpio", guest)];
    // The console is on the VMM's stdout and stdin (a FIFO); the serial port goes to a
    // file. A tty drops input that arrives while nobody has it open, so the host writes
    // only once the guest says it holds hvc0 open.
    let script = format!(
        "mkfifo /tmp/hvc.in\n\
         {VMM} --kernel {} --initramfs /payload/hvc.cpio \
           --memory 256M --rng off --serial file=/tmp/serial.log --console stdout \
           --cmdline 'console=ttyS0 qx.action=script' < /tmp/hvc.in > /tmp/hvc.log &\n\
         vmm=$!\n\
         exec 3> /tmp/hvc.in\n\
         for i in $(seq 1200); do grep -q QX-HVC-READY /tmp/serial.log 2>/dev/null && break; sleep 0.1; done\n\
         echo 'QX-IN ping over hvc0' >&3\n\
         exec 3>&-\n\
         wait $vmm\n\
         status=$?\n\
         sed 's/^/HVC-OUT: /' /tmp/hvc.log\n\
         sed 's/^/SERIAL: /' /tmp/serial.log\n\
         exit $status\n",
        paths::GUEST_VMLINUZ
    );
    let job = Job::shell("hvc", script).timeout(Duration::from_secs(180));
    let out = &run_job(&sandbox, images, job);
    assert!(out.contains("SERIAL: QX-HVC-WRITTEN"), "{out}");
    assert!(out.contains("HVC-OUT: QX-HVC hello from hvc0"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("SERIAL:") && l.contains("QX-HVC hello")),
        "console output stays off the serial port: {out}"
    );
    assert!(
        out.contains("SERIAL: QX-HVC-GOT QX-IN ping over hvc0"),
        "host input reached the guest's hvc0: {out}"
    );
}
