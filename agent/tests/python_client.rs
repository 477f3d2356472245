//! The proto is usable from another language: a Python client generated from proto/ by
//! grpcio-tools drives a VM's lifecycle through a real agent.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;

use common::*;

#[test]
fn python_client_drives_a_vm_lifecycle() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let probe = Command::new("python3")
        .args(["-c", "import grpc_tools, grpc"])
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!(
                "\n*** SKIPPED python_client_drives_a_vm_lifecycle: python3 with grpcio-tools is not \
                 installed ({other:?}).\n*** Install it with `pip install grpcio-tools` or \
                 `apt-get install python3-grpc-tools`; scripts/test does.\n"
            );
            return;
        }
    }
    let dir = scratch("python");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "python");
    let proto_root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/lifecycle.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(&proto_root)
        .arg(agent.socket())
        .arg(&g.idle)
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python client failed ({:?})\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("python client: all steps passed"),
        "{stdout}"
    );
    assert!(stdout.contains("ok: console output"), "{stdout}");
}
