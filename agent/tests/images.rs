//! What a VM may touch: files only beneath the agent's image directories, opened by the
//! agent and inherited by the VMM; images locked while a VM uses them. A real agent, real
//! VMMs with hand-made guests on this host's /dev/kvm, a real gRPC client.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use quantix_proto::v1::{CreateVmRequest, Disk, RestartPolicy, StartVmRequest, VmState};
use tonic::Code;

macro_rules! require_kvm {
    () => {
        if !have_kvm() {
            eprintln!("SKIPPED: /dev/kvm is not available on this host");
            return;
        }
    };
}

fn disk(path: &Path, readonly: bool) -> Disk {
    Disk {
        path: path.display().to_string(),
        readonly,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_come_only_from_the_image_directories() {
    require_kvm!();
    let dir = scratch("images-dirs");
    let g = guests(&dir);
    let images = dir.join("images");
    std::fs::write(dir.join("secret.img"), vec![7u8; 4096]).unwrap();
    std::os::unix::fs::symlink(dir.join("secret.img"), images.join("escape.img")).unwrap();
    std::os::unix::fs::symlink("../secret.img", images.join("relative.img")).unwrap();
    std::fs::write(images.join("ok.img"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink("ok.img", images.join("alias.img")).unwrap();
    let agent = Agent::start(&dir.join("state"), "images-dirs");
    let mut c = agent.client().await;

    let try_create = |kernel: String, disks: Vec<Disk>| {
        let mut s = spec("v", &g.idle, RestartPolicy::Never);
        s.boot.as_mut().unwrap().kernel = kernel;
        s.disks = disks;
        CreateVmRequest {
            vm_id: "v".into(),
            spec: Some(s),
            start: false,
        }
    };
    let idle = g.idle.display().to_string();
    for (req, field, why) in [
        (
            try_create("/etc/shadow".into(), vec![]),
            "spec.boot.kernel",
            "outside the image directories",
        ),
        (
            try_create(idle.clone(), vec![disk(Path::new("/etc/passwd"), false)]),
            "spec.disks[0].path",
            "outside the image directories",
        ),
        (
            try_create(idle.clone(), vec![disk(&images.join("escape.img"), false)]),
            "spec.disks[0].path",
            "leads out of its image directory",
        ),
        (
            try_create(idle.clone(), vec![disk(&images.join("relative.img"), true)]),
            "spec.disks[0].path",
            "leads out of its image directory",
        ),
        (
            try_create(
                idle.clone(),
                vec![disk(&images.join("../secret.img"), true)],
            ),
            "spec.disks[0].path",
            "leads out of its image directory",
        ),
    ] {
        let e = c.create_vm(req).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
        assert!(
            e.message().starts_with(&format!("{field}: ")) && e.message().contains(why),
            "{}",
            e.message()
        );
    }

    // A symlink that stays inside is fine; the VMM gets the file as an inherited descriptor.
    let mut s = spec("in", &g.idle, RestartPolicy::Never);
    s.disks = vec![disk(&images.join("alias.img"), false)];
    s.disks[0].rate_limit = Some(quantix_proto::v1::RateLimit {
        bytes_per_sec: 1 << 20,
        ops_per_sec: 100,
        ..Default::default()
    });
    create(&mut c, "in", s, true).await;
    let vm = wait_state(&mut c, "in", VmState::Running, Duration::from_secs(20)).await;
    let pid = pid(&vm);
    // No rendered flags: the VMM's whole configuration is one sealed descriptor.
    let (args, fd_path, config) = vmm_config(pid);
    for flag in [
        "--kernel", "--disk", "--net", "--memory", "--cpus", "--serial",
    ] {
        assert!(
            !args.contains(&flag.to_string()),
            "{flag} rendered: {args:?}"
        );
    }
    let json = std::fs::read(&fd_path).unwrap();
    match &config.boot {
        quantix_vmm_api::BootSource::Kernel { kernel, .. } => {
            assert_eq!(
                kernel,
                std::path::Path::new("/dev/fd/3"),
                "kernel by descriptor"
            )
        }
        other => panic!("{other:?}"),
    }
    assert!(
        config.disks[0].path.starts_with("/dev/fd/"),
        "disk by descriptor: {config:?}"
    );
    assert_eq!(config.disks[0].rate_limit.bytes_per_sec, 1 << 20);
    assert_eq!(config.disks[0].rate_limit.ops_per_sec, 100);
    let text = String::from_utf8_lossy(&json);
    assert!(
        !text.contains("/images/") && !args.iter().any(|a| a.contains("/images/")),
        "no image path reaches the VMM: {args:?} {text}"
    );
    // Sealed: nobody, the VMM included, rewrites it.
    let f = std::fs::File::open(&fd_path).unwrap();
    // SAFETY: F_GET_SEALS on a descriptor we own.
    let seals = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&f), libc::F_GET_SEALS) };
    assert!(
        seals >= 0 && seals & libc::F_SEAL_WRITE != 0 && seals & libc::F_SEAL_SEAL != 0,
        "seals {seals:#x}"
    );
    let fd3 = std::fs::read_link(format!("/proc/{pid}/fd/3")).unwrap();
    assert_eq!(fd3, g.idle, "descriptor 3 is the kernel");
    stop(&mut c, "in").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_locked_while_a_vm_uses_them() {
    require_kvm!();
    let dir = scratch("images-locks");
    let g = guests(&dir);
    let img = dir.join("images/shared.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let agent = Agent::start(&dir.join("state"), "images-locks");
    let mut c = agent.client().await;
    let with_disk = |name: &str, readonly: bool| {
        let mut s = spec(name, &g.idle, RestartPolicy::Never);
        s.disks = vec![disk(&img, readonly)];
        s
    };

    // Writer first: nobody else gets it, and the refusal names the VM that holds it.
    create(&mut c, "w1", with_disk("w1", false), true).await;
    let w1 = wait_state(&mut c, "w1", VmState::Running, Duration::from_secs(20)).await;
    create(&mut c, "w2", with_disk("w2", false), false).await;
    create(&mut c, "r1", with_disk("r1", true), false).await;
    for id in ["w2", "r1"] {
        let e = c
            .start_vm(StartVmRequest { vm_id: id.into() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
        assert!(
            e.message().starts_with("spec.disks[0].path: ")
                && e.message()
                    .contains(&format!("in use by VM \"w1\" (pid {})", pid(&w1))),
            "{}",
            e.message()
        );
        // The refusal changed nothing.
        assert_eq!(state(&get(&mut c, id).await), VmState::Created);
    }

    // Once the writer is gone, readers share.
    stop(&mut c, "w1").await;
    start(&mut c, "r1").await;
    create(&mut c, "r2", with_disk("r2", true), true).await;
    wait_state(&mut c, "r1", VmState::Running, Duration::from_secs(20)).await;
    wait_state(&mut c, "r2", VmState::Running, Duration::from_secs(20)).await;
    let e = c
        .start_vm(StartVmRequest { vm_id: "w2".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("in use by VM \"r"), "{}", e.message());
    stop(&mut c, "r1").await;
    stop(&mut c, "r2").await;

    // A process outside the agent holding a lock is named by pid.
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import fcntl,struct,sys,time\n\
             f=open(sys.argv[1],'r+')\n\
             fcntl.fcntl(f,37,struct.pack('hhqqi4x',fcntl.F_WRLCK,0,0,0,0))\n\
             print('locked',flush=True)\n\
             time.sleep(60)\n",
        )
        .arg(&img)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
    }
    let e = c
        .start_vm(StartVmRequest { vm_id: "w2".into() })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message()
            .contains(&format!("pid {} (python3)", holder.id())),
        "{}",
        e.message()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    start(&mut c, "w2").await;
    wait_state(&mut c, "w2", VmState::Running, Duration::from_secs(20)).await;
    stop(&mut c, "w2").await;
}
