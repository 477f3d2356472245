//! `quantixctl` against a real agent: tables, JSON, spec files and exit statuses.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

use common::*;

fn ctl(agent: &Agent, args: &[&str]) -> Output {
    Command::new(bin("quantixctl"))
        .arg("--agent")
        .arg(format!("unix:{}", agent.socket().display()))
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"))
}

#[test]
fn quantixctl_lifecycle_output_and_exit_statuses() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let dir = scratch("ctl");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "ctl");

    // A YAML spec file, with a flag overriding one field.
    let spec = dir.join("vm.yaml");
    std::fs::write(
        &spec,
        format!(
            "id: c1\nname: ctl-vm\nvcpus: 1\nmemory_mib: 64\nkernel: {}\nlabels:\n  env: test\nrestart_policy: on-failure\n",
            g.idle.display()
        ),
    )
    .unwrap();
    let v = json(&ctl(
        &agent,
        &[
            "-o",
            "json",
            "create",
            "-f",
            spec.to_str().unwrap(),
            "--memory",
            "80",
            "--start",
        ],
    ));
    assert_eq!(v[0]["id"], "c1");
    // The canonical proto3 JSON mapping: 64-bit integers as strings, enums by name.
    assert_eq!(v[0]["spec"]["memory_mib"], "80");
    assert_eq!(v[0]["spec"]["restart_policy"], "RESTART_POLICY_ON_FAILURE");
    assert_eq!(v[0]["status"]["state"], "VM_STATE_RUNNING");

    // `get -o yaml` is a spec file: a second VM from it, under another id, has the same
    // spec, and a field set by a flag wins.
    let out = ctl(&agent, &["-o", "yaml", "get", "c1"]);
    assert!(out.status.success(), "{out:?}");
    let yaml = dir.join("c1.yaml");
    std::fs::write(&yaml, &out.stdout).unwrap();
    let copy = json(&ctl(
        &agent,
        &[
            "-o",
            "json",
            "create",
            "-f",
            yaml.to_str().unwrap(),
            "--id",
            "c1-copy",
            "--name",
            "copy",
        ],
    ));
    let mut want = v[0]["spec"].clone();
    want["name"] = "copy".into();
    assert_eq!(copy[0]["id"], "c1-copy");
    assert_eq!(
        copy[0]["spec"], want,
        "the spec survives get -o yaml | create -f"
    );
    assert_eq!(copy[0]["status"]["state"], "VM_STATE_CREATED");
    // `-o name` prints ids; `wide` has more columns.
    let out = ctl(&agent, &["-o", "name", "list", "-l", "env=test"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "c1\nc1-copy\n");
    let out = ctl(&agent, &["-o", "wide", "list"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ID ")
            && String::from_utf8_lossy(&out.stdout).contains("RESTARTS"),
        "{out:?}"
    );
    assert!(ctl(&agent, &["delete", "c1-copy"]).status.success());

    // Output into a pipe closed by its reader (`| grep -q`) ends quantixctl quietly.
    let mut child = Command::new(bin("quantixctl"))
        .arg("--agent")
        .arg(format!("unix:{}", agent.socket().display()))
        .args(["-o", "json", "get", "c1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    {
        use std::os::unix::process::ExitStatusExt;
        assert!(
            out.status.signal() == Some(libc::SIGPIPE) || out.status.success(),
            "{:?}: {stderr}",
            out.status
        );
    }

    // The table.
    let out = ctl(&agent, &["list"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("c1 ") && l.contains("ctl-vm") && l.contains("running")),
        "{table}"
    );
    let v = json(&ctl(&agent, &["-o", "json", "list", "-l", "env=test"]));
    assert_eq!(v.as_array().unwrap().len(), 1);
    let v = json(&ctl(&agent, &["-o", "json", "list", "-l", "env=prod"]));
    assert_eq!(v.as_array().unwrap().len(), 0);

    // The console, for scripts: --until exits 0 once the text is seen.
    let out = ctl(
        &agent,
        &[
            "console",
            "c1",
            "--until",
            "hello from guest",
            "--timeout",
            "20",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello from guest"));
    let out = ctl(
        &agent,
        &[
            "console",
            "c1",
            "--until",
            "never printed",
            "--timeout",
            "1",
        ],
    );
    assert_eq!(out.status.code(), Some(9), "{out:?}");
    // Input, then the end of stdin (a script's `echo ... | quantixctl console`): the ended
    // stdin is not a detach, and the output after it (the guest's echo) still comes.
    let out = ctl(
        &agent,
        &[
            "create",
            "--id",
            "c3",
            "--name",
            "ctl-echo",
            "--memory",
            "64M", // the VMM's size syntax works here too
            "--kernel",
            g.echo.to_str().unwrap(),
            "--start",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let ready = ctl(
        &agent,
        &["console", "c3", "--until", "echo ready", "--timeout", "20"],
    );
    assert!(ready.status.success(), "{ready:?}");
    let mut child = Command::new(bin("quantixctl"))
        .arg("--agent")
        .arg(format!("unix:{}", agent.socket().display()))
        .args(["console", "c3", "--no-replay", "--timeout", "3"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ping-123\n").unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ping-123"),
        "{out:?}"
    );
    assert!(ctl(&agent, &["delete", "c3", "--force"]).status.success());

    // Exit statuses by error.
    assert_eq!(ctl(&agent, &["get", "nope"]).status.code(), Some(3));
    let dup = ctl(
        &agent,
        &[
            "create",
            "--id",
            "c2",
            "--name",
            "ctl-vm",
            "--kernel",
            g.idle.to_str().unwrap(),
        ],
    );
    assert_eq!(dup.status.code(), Some(4), "{dup:?}");
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("spec.name"),
        "{dup:?}"
    );
    assert_eq!(ctl(&agent, &["start", "c1"]).status.code(), Some(5));
    let bad = ctl(
        &agent,
        &[
            "create",
            "--name",
            "x",
            "--cpus",
            "0",
            "--kernel",
            g.idle.to_str().unwrap(),
        ],
    );
    assert_eq!(bad.status.code(), Some(6), "{bad:?}");
    let big = ctl(
        &agent,
        &[
            "create",
            "--name",
            "big",
            "--cpus",
            "4",
            "--kernel",
            g.idle.to_str().unwrap(),
            "--start",
        ],
    );
    assert_eq!(big.status.code(), Some(7), "{big:?}");
    assert_eq!(ctl(&agent, &["bogus-command"]).status.code(), Some(2));
    let unreachable = Command::new(bin("quantixctl"))
        .args(["--agent", "unix:/nonexistent/agent.sock", "list"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(8), "{unreachable:?}");
    let said = String::from_utf8_lossy(&unreachable.stderr);
    assert!(said.contains("no such socket"), "{said}");
    // A socket file nobody listens on (an agent that died): refused, and said so.
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let refused = Command::new(bin("quantixctl"))
        .args(["--agent", &format!("unix:{}", stale.display()), "list"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(8), "{refused:?}");
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("connection refused"), "{said}");

    // Events: the stop shows up. The agent keeps no event history, so stop only once the
    // watcher is subscribed: its first line, the VM's current state, proves it.
    let mut events = Command::new(bin("quantixctl"))
        .arg("--agent")
        .arg(format!("unix:{}", agent.socket().display()))
        .args(["-o", "json", "events", "c1", "--initial", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = std::io::BufReader::new(events.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut reader, &mut first).unwrap();
    let initial: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(initial["vm_id"], "c1", "{first}");
    let v = json(&ctl(&agent, &["-o", "json", "stop", "c1"]));
    assert_eq!(v[0]["status"]["state"], "VM_STATE_STOPPED");
    // Within the time limit, then what it printed after its first line.
    wait_limit(&mut events);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
    let lines: Vec<serde_json::Value> = rest
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["kind"], "EVENT_KIND_STOPPING", "{rest}");
    assert_eq!(lines[1]["kind"], "EVENT_KIND_EXITED", "{rest}");
    assert_eq!(lines[1]["exit"]["reason"], "api-shutdown");

    let node = json(&ctl(&agent, &["-o", "json", "node"]));
    // "big" exists: created, its start refused.
    assert_eq!(node["vms_total"], 2);
    assert_eq!(node["vms_running"], 0);
    assert!(node["capacity"]["vcpus"].as_u64().unwrap() >= 1);
    let out = ctl(&agent, &["delete", "c1"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(ctl(&agent, &["get", "c1"]).status.code(), Some(3));
}

fn wait_limit(child: &mut std::process::Child) -> Vec<u8> {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            let mut out = Vec::new();
            use std::io::Read;
            if let Some(mut stdout) = child.stdout.take() {
                stdout.read_to_end(&mut out).unwrap();
            }
            return out;
        }
        if start.elapsed() > std::time::Duration::from_secs(20) {
            let _ = child.kill();
            panic!("quantixctl events did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn quantixctl_snapshot_and_restore() {
    if !have_kvm() {
        eprintln!("SKIPPED: /dev/kvm is not available on this host");
        return;
    }
    let dir = scratch("ctl-snap");
    let g = guests(&dir);
    let agent = Agent::start(&dir.join("state"), "ctl-snap");
    let kernel = g.idle.display().to_string();
    let out = ctl(
        &agent,
        &[
            "create", "--id", "v1", "--name", "snap-vm", "--memory", "64", "--kernel", &kernel,
            "--start",
        ],
    );
    assert!(out.status.success(), "{out:?}");

    let v = json(&ctl(
        &agent,
        &["-o", "json", "snapshot", "create", "v1", "full1"],
    ));
    assert_eq!(v["kind"], "SNAPSHOT_KIND_FULL");
    assert_eq!(v["vm_id"], "v1");
    let v = json(&ctl(
        &agent,
        &[
            "-o", "json", "snapshot", "create", "v1", "diff1", "--diff", "--after", "stop",
        ],
    ));
    assert_eq!(v["kind"], "SNAPSHOT_KIND_DIFF");
    assert_eq!(v["parent_id"], "full1");
    let out = ctl(&agent, &["snapshot", "list", "v1"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("diff1") && l.contains(" diff ")),
        "{table}"
    );
    let out = ctl(&agent, &["-o", "name", "snapshot", "list"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "full1\ndiff1\n");

    // Exit statuses: not found, failed precondition (a diff stands on it), usage.
    assert_eq!(
        ctl(&agent, &["snapshot", "get", "nope"]).status.code(),
        Some(3)
    );
    assert_eq!(
        ctl(&agent, &["snapshot", "delete", "full1"]).status.code(),
        Some(5)
    );
    assert_eq!(
        ctl(
            &agent,
            &["snapshot", "create", "v1", "x", "--after", "later"]
        )
        .status
        .code(),
        Some(2)
    );

    // The source VM still has its name: the copy needs its own.
    assert_eq!(
        ctl(&agent, &["restore", "diff1", "--id", "r1"])
            .status
            .code(),
        Some(4)
    );
    let v = json(&ctl(
        &agent,
        &[
            "-o",
            "json",
            "restore",
            "diff1",
            "--id",
            "r1",
            "--name",
            "snap-copy",
            "--start",
        ],
    ));
    assert_eq!(v["id"], "r1");
    assert_eq!(v["spec"]["name"], "snap-copy");
    assert_eq!(v["status"]["state"], "VM_STATE_RUNNING");
    assert_eq!(v["status"]["restored_from"], "diff1");

    assert!(ctl(&agent, &["delete", "r1", "--force"]).status.success());
    assert!(ctl(&agent, &["snapshot", "delete", "diff1"])
        .status
        .success());
    assert!(ctl(&agent, &["snapshot", "delete", "full1"])
        .status
        .success());
    let out = ctl(&agent, &["-o", "name", "snapshot", "list"]);
    assert!(out.stdout.is_empty(), "{out:?}");
}
