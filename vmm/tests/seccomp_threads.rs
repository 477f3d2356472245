//! Device threads started the way a guest's driver starts them (from a vCPU thread, through
//! the launcher) run under the device filter, and disk I/O works under it with both engines.
//! Runs in a child process of its own: a refusal ends the whole process.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn child_main() {
    use quantix_virtio::block::engine::{Engine, EngineKind, IoVecs, Job, Op};
    use quantix_vmm::seccomp::{self, Kind, Mode};
    use std::sync::Arc;
    // Files the test needs, before any filter (the main thread's forbids mkdir).
    let dir = std::env::temp_dir().join(format!("qx-seccomp-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("v.sock");
    seccomp::init(Mode::Kill, None).unwrap();
    seccomp::launcher::start().unwrap();
    seccomp::install(Kind::Vmm).unwrap();
    let path = std::env::var("QX_SECCOMP_CHILD_IMAGE").unwrap();
    let file = Arc::new(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap(),
    );
    // As a vCPU: its filter, then the activation.
    let vcpu = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            seccomp::install(Kind::Vcpu).unwrap();
            // Several thread pools at once: past 8 threads, glibc's malloc makes new
            // arenas (and once asked /sys for the CPU count, which no filter allows).
            let mut keep = Vec::new();
            for kind in [
                EngineKind::Threads,
                EngineKind::Threads,
                EngineKind::Threads,
                EngineKind::IoUring,
            ] {
                let mut engine = Engine::new(file.clone(), 8, kind).unwrap();
                let mut buf = [0u8; 512];
                let job = Job {
                    op: Op::Read,
                    offset: 0,
                    iovecs: IoVecs(vec![libc::iovec {
                        iov_base: buf.as_mut_ptr().cast(),
                        iov_len: buf.len(),
                    }]),
                };
                engine.submit(1, &job).unwrap();
                engine.flush_submissions().unwrap();
                let mut done = Vec::new();
                for _ in 0..1000 {
                    engine.reap(&mut done);
                    if !done.is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(2));
                }
                assert_eq!(done, vec![(1, 512)], "{kind:?}");
                assert_eq!(buf, [0x5a; 512]);
                println!("engine {:?} ok", engine.kind());
                keep.push(engine);
            }
        })
        .unwrap();
    vcpu.join().unwrap();
    println!("all engines ok");
    // A vsock activation (on the vCPU that writes DRIVER_OK) makes the muxer: its epoll,
    // eventfd and timer.
    let vcpu = std::thread::Builder::new()
        .name("vcpu1".into())
        .spawn(move || {
            seccomp::install(Kind::Vcpu).unwrap();
            let m = quantix_virtio::vsock::muxer::Muxer::new(3, &sock, None, Arc::default());
            assert!(m.is_ok(), "{:?}", m.err());
        })
        .unwrap();
    vcpu.join().unwrap();
    println!("vsock activation ok");
}

#[test]
fn disk_io_threads_run_under_the_device_filter() {
    if std::env::var_os("QX_SECCOMP_CHILD").is_some() {
        child_main();
        return;
    }
    let img = std::env::temp_dir().join(format!("qx-seccomp-threads-{}.img", std::process::id()));
    std::fs::write(&img, vec![0x5a; 4096]).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "disk_io_threads_run_under_the_device_filter",
            "--nocapture",
        ])
        .env("QX_SECCOMP_CHILD", "1")
        .env("QX_SECCOMP_CHILD_IMAGE", &img)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_file(&img);
    assert!(
        out.status.success() && stdout.contains("vsock activation ok"),
        "{:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
}
