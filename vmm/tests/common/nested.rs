//! Helpers of the tests in the nested KVM sandbox: a guest initramfs that loads kernel
//! modules, one job run with static binaries in the payload, and reading its output.

use quantix_sandbox::{build, GuestInitramfs, Job, Payload, Sandbox};

/// Where the static quantix-vmm lands in the nested host.
pub const VMM: &str = "/payload/quantix-vmm";

/// A guest initramfs with `files` (path, bytes, mode), the kernel `modules` (as
/// /qx-mod-N.ko, loaded in order at boot; a failure prints `QX-FAIL`) and a script that
/// then runs `body`.
pub fn guest_initramfs(
    sandbox: &Sandbox,
    modules: &[&str],
    files: Vec<(&str, Vec<u8>, u32)>,
    body: &str,
) -> Vec<u8> {
    let assets = sandbox.assets();
    let mut image = GuestInitramfs::new(assets);
    for (path, bytes, mode) in files {
        image = image.file(path, bytes, mode);
    }
    image
        .script_after_modules(assets, modules, body)
        .and_then(|i| i.build())
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Runs `job` in `sandbox` with a static quantix-vmm at [`VMM`], the static binaries `bins`
/// (package, binary, destination) and the files `images` (destination, bytes) in the
/// payload; checks that the job succeeded and printed no `QX-FAIL`; returns its output.
pub fn run_job(
    sandbox: &Sandbox,
    bins: &[(&str, &str, &str)],
    images: Vec<(&str, Vec<u8>)>,
    job: Job,
) -> String {
    let mut payload = Payload::new();
    for (package, bin, dest) in [("quantix-vmm", "quantix-vmm", VMM)].iter().chain(bins) {
        let path = build::static_binary(package, bin).unwrap_or_else(|e| panic!("{e}"));
        payload
            .add_file(&path, dest)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    for (dest, bytes) in images {
        payload
            .add_bytes(dest, bytes, 0o644)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let report = sandbox
        .run(&payload, &[job])
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
    eprintln!("job {} took {:?}", job.name, job.elapsed);
    job.output.clone()
}

/// The value after `key=` on the first line that has it, up to the end of the line or
/// the first `[` (a kernel message printed into the middle of a console line).
pub fn field(out: &str, key: &str) -> String {
    quantix_sandbox::console_field(out, key).unwrap_or_else(|| panic!("no {key}= line:\n{out}"))
}
