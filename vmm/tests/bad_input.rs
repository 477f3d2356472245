//! Bad input gets a clear message and a non-zero exit status, never a panic.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{asm, elf64, run_vmm, scratch, summary, vmm_bin, write};

const LIMIT: Duration = Duration::from_secs(60);

/// Runs the VMM and returns (exit code, stderr), checking that it did not panic.
fn fails(args: &[&str]) -> (i32, String) {
    let out = run_vmm(args, LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.is_empty(), "no guest output expected: {stdout}");
    (code.expect("exited, not killed"), stderr)
}

fn good_kernel(dir: &std::path::Path) -> String {
    let mut code = asm::acpi_poweroff(true);
    code.extend_from_slice(&asm::HALT_LOOP);
    write(dir, "k.elf", &elf64(&code)).display().to_string()
}

#[test]
fn missing_and_unreadable_kernel() {
    let (code, err) = fails(&["--kernel", "/nonexistent/vmlinux"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read kernel /nonexistent/vmlinux"),
        "{err}"
    );
    let dir = scratch("dir-kernel");
    let (code, err) = fails(&["--kernel", dir.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("not a regular file"), "{err}");
}

#[test]
fn a_file_that_is_no_kernel() {
    let dir = scratch("nokernel");
    for (name, bytes) in [
        ("text", b"#!/bin/sh\necho hi\n".to_vec()),
        ("empty", vec![]),
        (
            "elf32",
            b"\x7fELF\x01\x01\x01\0\0\0\0\0\0\0\0\0\x02\0\x03\0".to_vec(),
        ),
    ] {
        let p = write(&dir, name, &bytes);
        let (code, err) = fails(&["--kernel", p.to_str().unwrap()]);
        assert_eq!(code, 1, "{name}");
        assert!(err.contains("is not a Linux kernel"), "{name}: {err}");
    }
    // An ELF whose header lies about its program headers.
    let mut elf = elf64(&[0xf4]);
    elf[0x20..0x28].copy_from_slice(&0xffff_ffffu64.to_le_bytes()); // e_phoff far past the end
    let p = write(&dir, "broken.elf", &elf);
    let (code, err) = fails(&["--kernel", p.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot load kernel"), "{err}");
}

#[test]
fn initramfs_that_does_not_fit_and_missing_initramfs() {
    let dir = scratch("initrd");
    let kernel = good_kernel(&dir);
    let big = dir.join("big.cpio");
    std::fs::File::create(&big)
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    let (code, err) = fails(&[
        "--kernel",
        &kernel,
        "--initramfs",
        big.to_str().unwrap(),
        "--memory",
        "32M",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("does not fit in guest memory"), "{err}");
    let (code, err) = fails(&["--kernel", &kernel, "--initramfs", "/nonexistent.cpio"]);
    assert_eq!(code, 1);
    assert!(err.contains("cannot read initramfs"), "{err}");
}

#[test]
fn kernel_larger_than_memory() {
    let dir = scratch("bigkernel");
    // A 20 MiB kernel loaded at 16 MiB in a 16 MiB VM.
    let mut code = vec![0x90u8; 20 << 20];
    code.push(0xf4);
    let p = write(&dir, "big.elf", &elf64(&code));
    let (code, err) = fails(&["--kernel", p.to_str().unwrap(), "--memory", "16M"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot load kernel") || err.contains("beyond guest RAM"),
        "{err}"
    );
}

#[test]
fn memory_too_small_too_large_or_malformed() {
    let dir = scratch("mem");
    let kernel = good_kernel(&dir);
    let (code, err) = fails(&["--kernel", &kernel, "--memory", "8M"]);
    assert_eq!(code, 1);
    assert!(err.contains("too small"), "{err}");
    let (code, err) = fails(&["--kernel", &kernel, "--memory", "100000G"]);
    assert_eq!(code, 1);
    assert!(err.contains("larger than the host"), "{err}");
    let (code, err) = fails(&["--kernel", &kernel, "--memory", "lots"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid memory size"), "{err}");
}

#[test]
fn vcpu_counts_out_of_range_and_unknown_flags() {
    let dir = scratch("cpus");
    let kernel = good_kernel(&dir);
    for n in ["0", "255", "-1", "many"] {
        let flag = format!("--cpus={n}");
        let (code, err) = fails(&["--kernel", &kernel, &flag]);
        assert_eq!(code, 2, "--cpus {n}");
        assert!(err.contains("--cpus"), "{err}");
    }
    let (code, err) = fails(&["--kernel", &kernel, "--frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("--frobnicate"), "{err}");
    let (code, err) = fails(&[]);
    assert_eq!(code, 2);
    assert!(err.contains("--kernel"), "{err}");
    let (code, err) = fails(&["--kernel", &kernel, "--serial", "tty"]);
    assert_eq!(code, 2);
    assert!(err.contains("invalid output setting"), "{err}");
}

#[test]
fn api_socket_path_that_is_a_file_is_refused_before_boot() {
    let dir = scratch("apifile");
    let kernel = good_kernel(&dir);
    let file = write(&dir, "not-a-socket", b"precious data");
    let (code, err) = fails(&["--kernel", &kernel, "--api-socket", file.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("is not a socket"), "{err}");
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"precious data",
        "the file is left alone"
    );
}

/// Runs the VMM in a new mount namespace with /dev replaced by an empty directory.
#[test]
fn kvm_device_missing_or_not_permitted() {
    let dir = scratch("nokvm");
    let kernel = good_kernel(&dir);
    let empty = dir.join("emptydev");
    std::fs::create_dir_all(&empty).unwrap();
    let script = format!(
        "mount --bind {} /dev && exec {} --kernel {kernel}",
        empty.display(),
        vmm_bin()
    );
    let out = Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .output()
        .unwrap();
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/dev/kvm does not exist"), "{err}");

    // As an unprivileged user, /dev/kvm (root-only here) cannot be opened.
    let meta = std::fs::metadata("/dev/kvm").unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        meta.permissions().mode() & 0o006,
        0,
        "test assumes /dev/kvm is not world-accessible"
    );
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            vmm_bin(),
            "--kernel",
            &kernel,
        ])
        .output()
        .unwrap();
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("permission denied opening /dev/kvm"), "{err}");
}

#[test]
fn disks_that_cannot_be_used_are_refused_before_boot() {
    let dir = scratch("disks");
    let kernel = good_kernel(&dir);
    let img = dir.join("a.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let img = img.to_str().unwrap().to_string();
    let empty = write(&dir, "empty.img", b"");
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["--disk".into(), "path=/nonexistent/disk.img".into()],
            1,
            "cannot open disk image /nonexistent/disk.img",
        ),
        (
            vec!["--disk".into(), format!("path={}", dir.display())],
            1,
            "Is a directory",
        ),
        (
            vec!["--disk".into(), format!("path={}", empty.display())],
            1,
            "needs at least one 512-byte sector",
        ),
        (
            vec![
                "--disk".into(),
                format!("path={img},id=x"),
                "--disk".into(),
                format!("path={img}.b,id=x"),
            ],
            1,
            "two disks have the id \"x\"",
        ),
        (
            vec![
                "--disk".into(),
                format!("path={img}"),
                "--disk".into(),
                format!("path={img}"),
            ],
            1,
            "is given twice",
        ),
        (vec!["--disk".into(), img.clone()], 2, "invalid --disk"),
        (
            vec!["--disk".into(), format!("path={img},cache=none")],
            2,
            "unknown key \"cache\"",
        ),
    ];
    for (extra, want_code, want_msg) in cases {
        let mut args = vec!["--kernel", kernel.as_str()];
        args.extend(extra.iter().map(String::as_str));
        let (code, err) = fails(&args);
        assert_eq!(code, want_code, "{extra:?}: {err}");
        assert!(
            err.contains(want_msg),
            "{extra:?}: expected {want_msg:?} in {err}"
        );
    }
    // The image was never touched.
    assert_eq!(std::fs::read(&img).unwrap(), vec![0u8; 1 << 20]);
}

#[test]
fn network_cards_that_cannot_be_used_are_refused_before_boot() {
    let dir = scratch("nets");
    let kernel = good_kernel(&dir);
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--net", "qxtap0"], 2, "invalid --net"),
        (&["--net", "tap=qx0,mac=01:00:5e:00:00:01"], 2, "unicast"),
        (&["--net", "tap=a/b"], 1, "invalid TAP name"),
        (&["--net", "fd=99"], 1, "fd 99 is not a TAP"),
        (
            &["--net", "tap=qxa", "--net", "tap=qxa"],
            1,
            "two network cards use",
        ),
    ];
    for (extra, want_code, want_msg) in cases {
        let mut args = vec!["--kernel", kernel.as_str()];
        args.extend_from_slice(extra);
        let (code, err) = fails(&args);
        assert_eq!(code, *want_code, "{extra:?}: {err}");
        assert!(
            err.contains(want_msg),
            "{extra:?}: expected {want_msg:?} in {err}"
        );
    }
}

#[test]
fn character_device_endpoints_that_cannot_be_used_are_refused_before_boot() {
    let dir = scratch("chardevs");
    let kernel = good_kernel(&dir);
    let live = dir.join("live.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let live_arg = format!("socket={}", live.display());
    let same = format!("socket={}", dir.join("same.sock").display());
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["--serial", "tty"],
            2,
            "expected stdout, file=PATH, pty, socket=PATH",
        ),
        (&["--console", "socket="], 2, "invalid output setting"),
        (
            &["--serial", &same, "--console", &same],
            1,
            "--serial and --console both use",
        ),
        (
            &["--console", "socket=/nonexistent-dir/c.sock"],
            1,
            "console: cannot listen on /nonexistent-dir/c.sock",
        ),
        (&["--serial", &live_arg], 1, "is in use by a live listener"),
    ];
    for (extra, want_code, want_msg) in cases {
        let mut args = vec!["--kernel", kernel.as_str()];
        args.extend_from_slice(extra);
        let (code, err) = fails(&args);
        assert_eq!(code, *want_code, "{extra:?}: {err}");
        assert!(
            err.contains(want_msg),
            "{extra:?}: expected {want_msg:?} in {err}"
        );
    }
    assert!(live.exists(), "a live listener's socket is left alone");
}

/// In a network namespace of its own, the VMM creates the TAP, brings it up, runs the
/// guest and exits; the TAP goes away with the process.
#[test]
fn a_tap_is_created_in_a_private_network_namespace() {
    let dir = scratch("tapns");
    let kernel = good_kernel(&dir);
    let script = format!(
        "{} --kernel {kernel} --memory 64M --net tap=qxtest0,mac=52:54:00:00:00:42 && ! ip link show qxtest0 2>/dev/null",
        vmm_bin()
    );
    let out = Command::new("unshare")
        .args(["--net", "sh", "-c", &script])
        .output()
        .unwrap();
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        err.contains("network card attached") && err.contains("qxtest0"),
        "{err}"
    );
    assert!(err.contains("52:54:00:00:00:42"), "{err}");
}

#[test]
fn vsock_specs_that_cannot_be_used_are_refused_before_boot() {
    use std::os::unix::net::UnixListener;
    let dir = scratch("vsock");
    let kernel = good_kernel(&dir);
    let live = dir.join("live.sock");
    let _listener = UnixListener::bind(&live).unwrap();
    let file = write(&dir, "file.sock", b"not a socket");
    let sock = dir.join("v.sock").display().to_string();
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (
            vec!["--vsock".into(), format!("cid=2,socket={sock}")],
            2,
            "cid must be between 3 and 4294967294",
        ),
        (
            vec!["--vsock".into(), format!("cid=4294967295,socket={sock}")],
            2,
            "reserved",
        ),
        (
            vec!["--vsock".into(), format!("socket={sock}")],
            2,
            "cid= is required",
        ),
        (
            vec!["--vsock".into(), "cid=3".into()],
            2,
            "socket= is required",
        ),
        (
            vec!["--vsock".into(), format!("cid=3,socket={sock},port=1")],
            2,
            "unknown key \"port\"",
        ),
        (
            vec![
                "--vsock".into(),
                format!("cid=3,socket={sock}"),
                "--vsock".into(),
                format!("cid=4,socket={sock}.b"),
            ],
            2,
            "cannot be used multiple times",
        ),
        (
            vec![
                "--vsock".into(),
                "cid=3,socket=/nonexistent/dir/v.sock".into(),
            ],
            1,
            "does not exist",
        ),
        (
            vec!["--vsock".into(), format!("cid=3,socket={}", live.display())],
            1,
            "in use by a running process",
        ),
        (
            vec!["--vsock".into(), format!("cid=3,socket={}", file.display())],
            1,
            "is not a socket",
        ),
        (
            vec![
                "--vsock".into(),
                format!("cid=3,socket={}/{}", dir.display(), "x".repeat(110)),
            ],
            1,
            "too long",
        ),
    ];
    for (extra, want_code, want_msg) in cases {
        let mut args = vec!["--kernel", kernel.as_str()];
        args.extend(extra.iter().map(String::as_str));
        let (code, err) = fails(&args);
        assert_eq!(code, want_code, "{extra:?}: {err}");
        assert!(
            err.contains(want_msg),
            "{extra:?}: expected {want_msg:?} in {err}"
        );
    }
    // The regular file was left alone.
    assert_eq!(std::fs::read(&file).unwrap(), b"not a socket");
}

/// A socket left behind by a VMM that died is replaced, and the VM runs.
#[test]
fn a_stale_vsock_socket_is_replaced() {
    let dir = scratch("vsock-stale");
    let kernel = good_kernel(&dir);
    let sock = dir.join("v.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let spec = format!("cid=3,socket={}", sock.display());
    let out = run_vmm(
        &["--kernel", &kernel, "--memory", "64M", "--vsock", &spec],
        LIMIT,
    );
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("vsock attached"), "{err}");
}

#[test]
fn an_image_another_vmm_uses_is_refused_and_inherited_descriptors_work() {
    let dir = scratch("locks");
    // A guest that parks forever: the first VMM keeps its disk.
    let idle = write(&dir, "idle.elf", &elf64(&asm::HALT_LOOP));
    let img = dir.join("shared.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let api = dir.join("api.sock");
    let mut first = Command::new(vmm_bin())
        .args(["--kernel", idle.to_str().unwrap(), "--api-socket"])
        .arg(&api)
        .arg("--disk")
        .arg(format!("path={}", img.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !api.exists() {
        assert!(start.elapsed() < LIMIT, "the first VMM did not come up");
        assert!(first.try_wait().unwrap().is_none(), "the first VMM exited");
        std::thread::sleep(Duration::from_millis(10));
    }
    let kernel = good_kernel(&dir);
    for disk in [
        format!("path={}", img.display()),
        format!("path={},readonly=on", img.display()),
    ] {
        let (code, err) = fails(&["--kernel", &kernel, "--disk", &disk]);
        assert_eq!(code, 1, "{disk}: {err}");
        assert!(
            err.contains("is in use: locked by pid")
                && err.contains(&format!("pid {} (quantix-vmm)", first.id())),
            "{disk}: {err}"
        );
    }
    let _ = first.kill();
    let _ = first.wait();

    // Files handed over as descriptors (as the agent does): /dev/fd/N is not reopened, so it
    // works without /proc and keeps the descriptor's mode.
    let script = format!(
        "exec {vmm} --kernel /dev/fd/3 --disk path=/dev/fd/4 3<{kernel} 4<>{img}",
        vmm = vmm_bin(),
        img = img.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(0), "{err}");
    // A read-only descriptor cannot be a read-write disk.
    let script = format!(
        "exec {vmm} --kernel /dev/fd/3 --disk path=/dev/fd/4 3<{kernel} 4<{img}",
        vmm = vmm_bin(),
        img = img.display()
    );
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("descriptor 4 is not open for reading and writing"),
        "{err}"
    );
    let (code, err) = fails(&["--kernel", "/dev/fd/987"]);
    assert_eq!(code, 1);
    assert!(err.contains("descriptor 987 was not inherited"), "{err}");
}
