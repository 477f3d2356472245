//! End to end on a real KVM, in the nested sandbox: the agent (static binary) boots Debian's
//! unmodified cloud kernel through its gRPC API, driven by quantixctl; the console carries
//! the kernel's messages and the guest init's line; events show the lifecycle; the VM is
//! paused and resumed; a graceful stop presses the guest's ACPI power button and the
//! resumed guest powers itself off; delete works. See docs/testing.md.

use std::time::Duration;

use quantix_sandbox::{build, paths, GuestInit, Job, Payload, Sandbox};

const SCRIPT: &str = r#"
set -u
A=/payload/quantix-agent
C="/payload/quantixctl --agent unix:/tmp/qa/agent.sock"
$A --state-dir /tmp/qa --image-dir /guest --metrics-listen 127.0.0.1:9700 --vmm /payload/quantix-vmm >/tmp/agent.log 2>&1 &
i=0
while [ ! -S /tmp/qa/agent.sock ]; do
	i=$((i + 1))
	if [ $i -gt 200 ]; then echo "QX-AGENT-NOT-UP"; cat /tmp/agent.log; exit 10; fi
	sleep 0.1
done
$C node
$C -o json events --count 7 >/tmp/events.json &
ev=$!
# The agent keeps no event history: create only once the watcher has subscribed (the
# agent counts a WatchVms request once its subscription exists).
i=0
until wget -qO- http://127.0.0.1:9700/metrics 2>/dev/null | grep -q 'method="WatchVms"'; do
	i=$((i + 1))
	if [ $i -gt 300 ]; then echo "QX-AGENT-WATCH-NOT-UP"; cat /tmp/agent.log; exit 16; fi
	sleep 0.1
done
printf '%s\n' 'id: deb' 'name: debian' 'vcpus: 2' 'memory_mib: 512' 'kernel: /guest/vmlinuz' \
	'initramfs: /guest/initramfs.cpio' 'cmdline: console=ttyS0 qx.action=hold' \
	'console_ring_bytes: 1048576' 'labels:' '  os: debian' >/tmp/vm.yaml
$C create -f /tmp/vm.yaml --start || { echo "QX-AGENT-CREATE-FAILED"; cat /tmp/agent.log; exit 11; }
# Past its init line, the guest loads its power button driver; stop only once it listens.
if ! $C console deb --until "power button on" --timeout 200 >/tmp/console.txt; then
	echo "QX-AGENT-CONSOLE-FAILED"; cat /tmp/console.txt; cat /tmp/agent.log; exit 12
fi
grep "QX-GUEST-INIT" /tmp/console.txt
grep -q "Linux version" /tmp/console.txt && echo "QX-AGENT-SAW-LINUX-VERSION"
$C list -l os=debian
$C pause deb || { echo "QX-AGENT-PAUSE-FAILED"; cat /tmp/agent.log; exit 14; }
$C -o json get deb | grep -q '"state": "paused"' && echo "QX-AGENT-PAUSED"
sleep 2
$C resume deb || { echo "QX-AGENT-RESUME-FAILED"; cat /tmp/agent.log; exit 15; }
$C stop deb --timeout 60 || { echo "QX-AGENT-STOP-FAILED"; cat /tmp/agent.log; exit 13; }
$C -o json get deb | grep -q '"state": "stopped"' && echo "QX-AGENT-STOPPED"
$C delete deb && echo "QX-AGENT-DELETED"
$C get deb
echo "QX-AGENT-GET-AFTER-DELETE status=$?"
i=0
while kill -0 $ev 2>/dev/null; do
	i=$((i + 1))
	if [ $i -gt 300 ]; then echo "QX-AGENT-EVENTS-INCOMPLETE"; kill $ev; break; fi
	sleep 0.1
done
echo "QX-AGENT-EVENTS-BEGIN"
cat /tmp/events.json
echo "QX-AGENT-EVENTS-END"
"#;

#[test]
fn agent_boots_debian_through_its_api_in_the_nested_sandbox() {
    let sandbox = Sandbox::from_env().unwrap_or_else(|e| panic!("{e}"));
    let mut payload = Payload::new();
    for (package, bin) in [
        ("quantix-vmm", "quantix-vmm"),
        ("quantix-agent", "quantix-agent"),
        ("quantix-jailer", "quantix-jailer"),
        ("quantix-ctl", "quantixctl"),
    ] {
        let path = build::static_binary(package, bin).unwrap_or_else(|e| panic!("{e}"));
        payload
            .add_file(&path, &format!("{}/{bin}", paths::PAYLOAD_DIR))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let jobs = [Job::shell("agent-debian", SCRIPT).timeout(Duration::from_secs(300))];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    let r = &report.jobs[0];
    let context = || {
        format!(
            "status {:?}, timed out {}, log {}\n{}",
            r.status,
            r.timed_out,
            report.log_path.display(),
            r.output
        )
    };
    assert!(!r.timed_out, "{}", context());
    assert_eq!(r.status, Some(0), "{}", context());
    let init =
        GuestInit::find(&r.output).unwrap_or_else(|| panic!("no guest init line: {}", context()));
    assert_eq!(init.cpus, 2, "{}", context());
    for marker in [
        "QX-AGENT-SAW-LINUX-VERSION",
        "QX-AGENT-PAUSED",
        "QX-AGENT-STOPPED",
        "QX-AGENT-DELETED",
        "QX-AGENT-GET-AFTER-DELETE status=3",
    ] {
        assert!(r.output.contains(marker), "{marker} missing: {}", context());
    }
    let events: Vec<serde_json::Value> = r
        .output
        .split("QX-AGENT-EVENTS-BEGIN")
        .nth(1)
        .and_then(|s| s.split("QX-AGENT-EVENTS-END").next())
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l.trim()).ok())
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        ["created", "started", "paused", "resumed", "stopping", "exited", "deleted"],
        "{}",
        context()
    );
    // The guest, paused and resumed, then powered itself off (ACPI S5) on the power button
    // press: the VMM was not stopped from outside, which would be "api-shutdown".
    assert_eq!(events[5]["exit"]["reason"], "poweroff", "{}", context());
    eprintln!(
        "agent in the sandbox: guest init at {:.2} s uptime, job {:?}",
        init.uptime_s, r.elapsed
    );
}
