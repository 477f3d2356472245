//! Data integrity of virtio-blk end to end, on a real KVM in the nested sandbox, with the
//! unmodified Debian kernel: `qx-io verify` (benches/src/bin/qx-io.rs) writes every 4 KiB
//! block of a 64 MiB disk with a pattern derived from (seed, block number, pass) and a
//! checksum, in random order from four writer threads with `O_DIRECT`, `fsync`s, and reads
//! every block back; then a second pass overwrites everything in another order (a lost or
//! stale write shows up as the previous pass's data). A second VMM process on the same
//! image verifies again, and the nested host checks the image file itself with the same
//! tool. Finally one byte of the image is changed on the host and the check must fail,
//! naming that block: the verifier can fail (its unit tests in `benches/src/pattern.rs`
//! and `benches/src/blockio.rs` cover each kind of corruption).

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quantix_sandbox::{build, paths, Job, Payload, Sandbox};

mod common;
use common::nested::VMM;

/// A guest initramfs with the virtio-blk modules, `qx-io` at [`QX_IO`], and `body`.
fn guest_initramfs(sandbox: &Sandbox, qx_io: &[u8], body: &str) -> Vec<u8> {
    common::nested::guest_initramfs(sandbox, MODULES, vec![(QX_IO, qx_io.to_vec(), 0o755)], body)
}

const QX_IO: &str = "/payload/qx-io";
const IMAGE: &str = "/tmp/integrity.img";
const DISK_MIB: u64 = 64;
const BLOCKS: u64 = DISK_MIB * 1024 * 1024 / 4096;
/// The block the host corrupts for the negative control, and the offset in it.
const CORRUPT_BLOCK: u64 = 1234;
const CORRUPT_OFFSET: u64 = 100;

const MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
];

/// The `key=value` fields of the `QX-VERIFY` line whose `id` is `id` and whose phase is
/// `phase` (a kernel message printed into the line ends it at its `[`).
fn verify_line(out: &str, id: &str, phase: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let at = l.find("QX-VERIFY ")?;
            let fields: Vec<(String, String)> = l[at + 10..]
                .split_whitespace()
                .take_while(|t| !t.contains('['))
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            let has = |k: &str, v: &str| fields.iter().any(|(a, b)| a == k && b == v);
            (has("id", id) && has("phase", phase)).then_some(fields)
        })
        .next()
        .unwrap_or_else(|| panic!("no QX-VERIFY id={id} phase={phase} line:\n{out}"))
}

fn get<'a>(fields: &'a [(String, String)], key: &str) -> &'a str {
    fields
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key}= in {fields:?}"))
}

/// Asserts that the `read` phase of `id` checked every block and found them all intact.
fn assert_clean(out: &str, id: &str) {
    let f = verify_line(out, id, "read");
    assert_eq!(
        (
            get(&f, "blocks"),
            get(&f, "verified"),
            get(&f, "mismatches")
        ),
        (
            BLOCKS.to_string().as_str(),
            BLOCKS.to_string().as_str(),
            "0"
        ),
        "{id}: {f:?}\n{out}"
    );
}

#[test]
fn virtio_blk_keeps_every_block_across_passes_restarts_and_on_the_host() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let vmm = build::static_binary("quantix-vmm", "quantix-vmm").unwrap_or_else(|e| panic!("{e}"));
    let qx_io_path =
        build::static_binary("quantix-bench", "qx-io").unwrap_or_else(|e| panic!("{e}"));
    let qx_io = std::fs::read(&qx_io_path).unwrap_or_else(|e| panic!("{e}"));
    // A new seed each run (printed in every failure message through the output).
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64 & 0xffff_ffff)
        .unwrap_or(1);
    let verify = |id: &str, pass: u32, mode: &str| {
        format!(
            "{QX_IO} verify --dev /dev/vda --seed {seed} --pass {pass} {mode} --threads 4 \
             --io-blocks 16 --direct on --id {id} || echo \"QX-FAIL verify {id}\"\n"
        )
    };
    let writer = guest_initramfs(
        &sandbox,
        &qx_io,
        &format!("{}{}", verify("pass1", 1, ""), verify("pass2", 2, "")),
    );
    let reader = guest_initramfs(&sandbox, &qx_io, &verify("restart", 2, "--read"));

    let mut payload = Payload::new();
    payload
        .add_file(&vmm, VMM)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_file(&qx_io_path, QX_IO)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/writer.cpio", writer, 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/reader.cpio", reader, 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    let boot = |initramfs: &str| {
        format!(
            "{VMM} --kernel {} --initramfs {initramfs} --cpus 2 --memory 256M --rng off \
             --disk path={IMAGE},id=data --cmdline 'console=ttyS0 quiet qx.action=script'; \
             echo \"QX-HOST vmm-status=$?\"",
            paths::GUEST_VMLINUZ
        )
    };
    let host_check = |id: &str| {
        format!(
            "{QX_IO} verify --read --dev {IMAGE} --seed {seed} --pass 2 --threads 2 --id {id}; \
             echo \"QX-HOST {id}-status=$?\""
        )
    };
    let script = format!(
        "dd if=/dev/zero of={IMAGE} bs=1M count={DISK_MIB} 2>/dev/null\n\
         {}\n\
         {}\n\
         {}\n\
         printf XXXX | dd of={IMAGE} bs=1 seek={} conv=notrunc 2>/dev/null\n\
         {}\n",
        boot("/payload/writer.cpio"),
        boot("/payload/reader.cpio"),
        host_check("host"),
        CORRUPT_BLOCK * 4096 + CORRUPT_OFFSET,
        host_check("corrupted"),
    );
    let job = Job::shell("integrity", script).timeout(Duration::from_secs(240));
    let report = sandbox
        .run(&payload, &[job])
        .unwrap_or_else(|e| panic!("{e}"));
    let job = &report.jobs[0];
    let out = &job.output;
    eprintln!("seed {seed}; job took {:?}", job.elapsed);
    assert!(
        job.success(),
        "status {:?}, timed out {}\n{out}",
        job.status,
        job.timed_out
    );
    assert!(!out.contains("QX-FAIL"), "{out}");
    let statuses: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once("QX-HOST vmm-status=").map(|(_, s)| s.trim()))
        .collect();
    assert_eq!(statuses, ["0", "0"], "both VMM runs exit 0: {out}");

    for (id, pass) in [("pass1", "1"), ("pass2", "2")] {
        let w = verify_line(out, id, "write");
        assert_eq!(get(&w, "blocks"), BLOCKS.to_string(), "{out}");
        assert_eq!(get(&w, "pass"), pass, "{out}");
        assert_eq!(
            get(&w, "direct"),
            "1",
            "the guest wrote with O_DIRECT: {out}"
        );
        assert_eq!(get(&w, "threads"), "4", "{out}");
        assert_clean(out, id);
    }
    assert_clean(out, "restart");
    assert_clean(out, "host");
    assert!(out.contains("QX-HOST host-status=0"), "{out}");

    // The negative control: the one block the host changed, and only it, is reported.
    let bad = verify_line(out, "corrupted", "read");
    assert_eq!(
        (get(&bad, "verified"), get(&bad, "mismatches")),
        ((BLOCKS - 1).to_string().as_str(), "1"),
        "{out}"
    );
    assert!(out.contains("QX-HOST corrupted-status=1"), "{out}");
    let listed = out
        .lines()
        .find(|l| l.contains("QX-VERIFY-BAD id=corrupted"))
        .unwrap_or_else(|| panic!("no mismatch listed:\n{out}"));
    assert!(
        listed.contains(&format!("block={CORRUPT_BLOCK} "))
            && listed.contains(&format!("differ_from_offset_{CORRUPT_OFFSET}")),
        "{listed}"
    );
}
