//! `quantix-vmm --config FILE`: the shared configuration type boots the same VM as the
//! flags, and a bad file is refused with the reason, on this host's /dev/kvm.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{asm, elf64, run_vmm, scratch, summary, vmm_bin, wait_limit, write};
use quantix_vmm_api::{SerialMode, VmConfig};

const LIMIT: Duration = Duration::from_secs(60);

fn guest(dir: &std::path::Path) -> String {
    let mut code = asm::print(b"hello from long mode\n", true);
    code.extend_from_slice(&asm::acpi_poweroff(true));
    code.extend_from_slice(&asm::HALT_LOOP);
    write(dir, "k.elf", &elf64(&code)).display().to_string()
}

#[test]
fn a_config_file_boots_the_same_vm_as_the_flags() {
    let dir = scratch("config-file");
    let kernel = guest(&dir);
    let out = run_vmm(
        &[
            "--kernel", &kernel, "--memory", "64M", "--cpus", "2", "--rng", "off",
        ],
        LIMIT,
    );
    let (code, by_flags, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("vcpus=2 memory_mib=64"), "{stderr}");

    // The same VM from a file, its serial port into a file this time.
    let serial = dir.join("serial.log");
    let mut c = VmConfig::with_kernel(&kernel);
    c.memory = "64M".parse().unwrap();
    c.vcpus = 2;
    c.rng = false;
    c.serial = SerialMode::File(serial.clone());
    let file = write(&dir, "vm.json", c.to_json().as_bytes());
    let out = run_vmm(&["--config", file.to_str().unwrap()], LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("vcpus=2 memory_mib=64"), "{stderr}");
    assert_eq!(stdout, "");
    assert_eq!(std::fs::read_to_string(&serial).unwrap(), by_flags);

    // And from standard input.
    c.serial = SerialMode::Stdout;
    let mut child = Command::new(vmm_bin())
        .args(["--config", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(c.to_json().as_bytes())
        .unwrap();
    let (code, stdout, stderr) = summary(&wait_limit(child, LIMIT));
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, by_flags);
}

#[test]
fn a_bad_config_file_is_refused_with_its_reason() {
    let dir = scratch("config-bad");
    let kernel = guest(&dir);
    let record = dir.join("exit.json");
    let cases: [(&str, &str); 4] = [
        (
            r#"{"boot": {"kernel": {"path": "/k"}}, "cpus": 2}"#,
            "unknown field `cpus`",
        ),
        (
            r#"{"boot": {"kernel": {"path": "/k"}}, "vcpus": 0}"#,
            "vCPU count 0",
        ),
        ("{ not json", "key must be a string"),
        (
            r#"{"boot": {"kernel": {"path": "/nonexistent/vmlinux"}}}"#,
            "/nonexistent/vmlinux",
        ),
    ];
    for (i, (json, want)) in cases.iter().enumerate() {
        let file = write(&dir, &format!("bad-{i}.json"), json.as_bytes());
        let _ = std::fs::remove_file(&record);
        let out = run_vmm(
            &[
                "--config",
                file.to_str().unwrap(),
                "--exit-file",
                record.to_str().unwrap(),
            ],
            LIMIT,
        );
        let (code, _, stderr) = summary(&out);
        assert_eq!(code, Some(1), "{json}: {stderr}");
        assert!(stderr.contains(want), "{json}: {stderr}");
        let rec: quantix_vmm_api::ExitRecord =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(rec.reason, "setup-error");
        assert!(rec.detail.contains(want), "{rec:?}");
    }
    let missing = dir.join("missing.json");
    let (code, _, stderr) = summary(&run_vmm(&["--config", missing.to_str().unwrap()], LIMIT));
    assert_eq!(code, Some(1));
    assert!(stderr.contains("cannot read --config"), "{stderr}");
    // A file and VM flags together: a usage error, nothing started.
    let file = write(
        &dir,
        "ok.json",
        VmConfig::with_kernel(&kernel).to_json().as_bytes(),
    );
    let (code, _, stderr) = summary(&run_vmm(
        &["--config", file.to_str().unwrap(), "--memory", "64M"],
        LIMIT,
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("cannot be used with"), "{stderr}");
}
