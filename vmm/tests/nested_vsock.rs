//! End to end, on a real KVM: an unmodified Debian guest kernel talks AF_VSOCK to host
//! processes through quantix-vmm's virtio-vsock device and its Unix sockets, in both
//! connection directions, more than 1 MiB each way on each connection, checked with
//! SHA-256 at both ends. See docs/devices.md (vsock) and docs/testing.md.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{build, paths, Job, Sandbox};

mod common;
use common::nested::{field, VMM};

/// A guest initramfs with the vsock modules, qx-vsock at /bin/qx-vsock and `body`.
fn guest_initramfs(sandbox: &Sandbox, qx_vsock: &[u8], body: &str) -> Vec<u8> {
    let files = vec![("/bin/qx-vsock", qx_vsock.to_vec(), 0o755)];
    common::nested::guest_initramfs(sandbox, MODULES, files, body)
}

/// Runs `job` with qx-vsock also in the nested host's payload.
fn run_job(sandbox: &Sandbox, images: Vec<(&str, Vec<u8>)>, job: Job) -> String {
    common::nested::run_job(
        sandbox,
        &[("quantix-sandbox", "qx-vsock", QX_VSOCK)],
        images,
        job,
    )
}

const QX_VSOCK: &str = "/payload/qx-vsock";

/// The guest modules, in load order (each after its dependencies).
const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
];

/// (1) The guest connects to host port 1234, which reaches a host process listening on
/// `<socket>_1234`; (2) a host process connects to `<socket>`, sends `CONNECT 5000` and
/// reaches a guest process listening on vsock port 5000. On each connection both sides
/// send 1.5 MiB of random bytes at once and half-close; each side's SHA-256 of what it
/// received matches the sender's.
#[test]
fn virtio_vsock_carries_streams_both_ways_in_both_directions() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let qx = build::static_binary("quantix-sandbox", "qx-vsock").unwrap_or_else(|e| panic!("{e}"));
    let qx = std::fs::read(qx).unwrap_or_else(|e| panic!("{e}"));
    let guest = guest_initramfs(
        &sandbox,
        &qx,
        "sum() { sha256sum \"$1\" | cut -d' ' -f1; }\n\
         dd if=/dev/urandom of=/tmp/g2h bs=1024 count=1536 2>/dev/null\n\
         echo \"QX-GUEST g2h=$(sum /tmp/g2h)\"\n\
         ok=no; for i in $(seq 20); do if qx-vsock connect 2 1234 </tmp/g2h >/tmp/in1 2>/tmp/c1.log; then ok=yes; break; fi; cat /tmp/c1.log; sleep 0.5; done\n\
         cat /tmp/c1.log\n\
         echo \"QX-GUEST connect=$ok\"\n\
         echo \"QX-GUEST in1=$(sum /tmp/in1)\"\n\
         qx-vsock listen 5000 </tmp/g2h >/tmp/in2 2>/tmp/l2.log; echo \"QX-GUEST listen-status=$?\"\n\
         cat /tmp/l2.log\n\
         echo \"QX-GUEST in2=$(sum /tmp/in2)\"\n\
         cat /proc/net/vsock 2>/dev/null | head -5\n",
    );
    let images = vec![("/payload/vsock.cpio", guest)];
    let script = format!(
        "sum() {{ sha256sum \"$1\" | cut -d' ' -f1; }}\n\
         dd if=/dev/urandom of=/tmp/h2g bs=1024 count=1536 2>/dev/null\n\
         echo \"QX-HOST h2g=$(sum /tmp/h2g)\"\n\
         timeout 150 {QX_VSOCK} unix-listen /tmp/v.sock_1234 </tmp/h2g >/tmp/out1 2>/tmp/ul.log &\n\
         ul=$!\n\
         {VMM} --kernel {} --initramfs /payload/vsock.cpio --memory 256M --rng off \
           --vsock cid=3,socket=/tmp/v.sock --cmdline 'console=ttyS0 loglevel=4 qx.action=script' >/tmp/vmm.log 2>&1 &\n\
         vmm=$!\n\
         wait $ul; echo \"QX-HOST listen-status=$?\"\n\
         if ! kill -0 $vmm 2>/dev/null; then echo 'QX-HOST the VMM is gone:'; cat /tmp/vmm.log; fi\n\
         cat /tmp/ul.log\n\
         echo \"QX-HOST out1=$(sum /tmp/out1)\"\n\
         ok=no; i=0\n\
         while [ $i -lt 240 ]; do\n\
           {QX_VSOCK} unix-connect /tmp/v.sock 5000 </tmp/h2g >/tmp/out2 2>/tmp/uc.log; st=$?\n\
           if [ $st = 0 ]; then ok=yes; break; fi\n\
           [ $st = 3 ] || cat /tmp/uc.log\n\
           i=$((i+1)); sleep 0.5\n\
         done\n\
         cat /tmp/uc.log\n\
         echo \"QX-HOST connect=$ok attempts=$i\"\n\
         echo \"QX-HOST out2=$(sum /tmp/out2)\"\n\
         wait $vmm; status=$?\n\
         cat /tmp/vmm.log\n\
         echo \"QX-HOST socket-left=$([ -e /tmp/v.sock ] && echo yes || echo no)\"\n\
         echo \"QX-HOST vmm-status=$status\"\n",
        paths::GUEST_VMLINUZ
    );
    let job = Job::shell("vsock", script).timeout(Duration::from_secs(400));
    let out = &run_job(&sandbox, images, job);
    assert_eq!(field(out, "QX-HOST vmm-status"), "0", "{out}");
    let h2g = field(out, "QX-HOST h2g");
    let g2h = field(out, "QX-GUEST g2h");
    assert_eq!(h2g.len(), 64, "{out}");
    assert_eq!(g2h.len(), 64, "{out}");
    assert_ne!(h2g, g2h);
    // (1) guest-initiated.
    assert_eq!(field(out, "QX-GUEST connect"), "yes", "{out}");
    assert_eq!(field(out, "QX-HOST listen-status"), "0", "{out}");
    assert_eq!(
        field(out, "QX-HOST out1"),
        g2h,
        "guest to host on a guest connection: {out}"
    );
    assert_eq!(
        field(out, "QX-GUEST in1"),
        h2g,
        "host to guest on a guest connection: {out}"
    );
    // (2) host-initiated.
    assert!(field(out, "QX-HOST connect").starts_with("yes"), "{out}");
    assert_eq!(field(out, "QX-GUEST listen-status"), "0", "{out}");
    assert_eq!(
        field(out, "QX-HOST out2"),
        g2h,
        "guest to host on a host connection: {out}"
    );
    assert_eq!(
        field(out, "QX-GUEST in2"),
        h2g,
        "host to guest on a host connection: {out}"
    );
    let port: u64 = out
        .lines()
        .find_map(|l| {
            l.split_once("qx-vsock: OK ")
                .map(|(_, p)| p.trim().to_string())
        })
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no OK line with a port: {out}"));
    assert!(
        port >= 1 << 30,
        "host ports of host connections start at 2^30: {port}"
    );
    assert!(out.contains("device=vsock"), "{out}");
}
