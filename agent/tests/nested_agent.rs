//! End to end on a real KVM, in the nested sandbox: the agent (static binary) boots Debian's
//! unmodified cloud kernel through its gRPC API, driven by quantixctl, with every VMM jailed
//! (the agent's default). (1) The console carries the kernel's messages and the guest init's
//! line; events show the lifecycle; the VM is paused and resumed; a graceful stop presses the
//! guest's ACPI power button and the resumed guest powers itself off; delete works. (2) A VM
//! with a disk, a NIC and vsock: the guest reads what the host wrote on the disk and writes
//! its own, pings the host and fetches a file over TCP, and carries streams over vsock in
//! both connection directions, all checked with SHA-256 at both ends; the VMM meanwhile runs
//! as an unprivileged uid under seccomp. See docs/testing.md.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use quantix_sandbox::{
    build, paths, Assets, GuestInit, GuestInitramfs, Job, Payload, Sandbox, SandboxConfig,
};

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
# The console also goes to this job's output as it comes, so that a nested host that
# hangs meanwhile shows how far the guest got (quantixctl's status through a file: the
# shell gives a pipeline the status of its last command).
{ $C console deb --until "power button on" --timeout 200; echo $? >/tmp/console.status; } |
	tee /tmp/console.txt | sed 's/^/guest: /'
if [ "$(cat /tmp/console.status)" != 0 ]; then
	echo "QX-AGENT-CONSOLE-FAILED"; cat /tmp/agent.log; exit 12
fi
grep "QX-GUEST-INIT" /tmp/console.txt
grep -q "Linux version" /tmp/console.txt && echo "QX-AGENT-SAW-LINUX-VERSION"
$C list -l os=debian
$C pause deb || { echo "QX-AGENT-PAUSE-FAILED"; cat /tmp/agent.log; exit 14; }
$C -o json get deb | grep -q '"state": "VM_STATE_PAUSED"' && echo "QX-AGENT-PAUSED"
sleep 2
$C resume deb || { echo "QX-AGENT-RESUME-FAILED"; cat /tmp/agent.log; exit 15; }
$C stop deb --timeout 60 || { echo "QX-AGENT-STOP-FAILED"; cat /tmp/agent.log; exit 13; }
$C -o json get deb | grep -q '"state": "VM_STATE_STOPPED"' && echo "QX-AGENT-STOPPED"
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

/// The devices VM's guest modules, in load order (each after its dependencies).
const DEVICE_MODULES: &[&str] = &[
    "kernel/drivers/virtio/virtio_ring.ko",
    "kernel/drivers/virtio/virtio.ko",
    "kernel/drivers/virtio/virtio_mmio.ko",
    "kernel/drivers/block/virtio_blk.ko",
    "kernel/net/core/failover.ko",
    "kernel/drivers/net/net_failover.ko",
    "kernel/drivers/net/virtio_net.ko",
    "kernel/net/vmw_vsock/vsock.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko",
    "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
    "kernel/drivers/char/virtio_console.ko",
];

/// The devices VM's guest script (`qx.action=script`; the guest powers off after it).
const DEVICES_GUEST: &str = r#"
sum() { sha256sum "$1" | cut -d' ' -f1; }
dd if=/dev/urandom of=/tmp/g bs=1024 count=1536 2>/dev/null
echo "QX-DEV g=$(sum /tmp/g)"
# The disk: the host's 1 MiB at offset 0, the guest's 1.5 MiB at offset 1 MiB.
dd if=/dev/vda of=/tmp/disk-in bs=1024 count=1024 2>/dev/null
echo "QX-DEV disk-in=$(sum /tmp/disk-in)"
dd if=/tmp/g of=/dev/vda bs=1024 seek=1024 conv=fsync 2>/dev/null && echo "QX-DEV disk-write=ok"
echo "QX-DEV serial=$(cat /sys/block/vda/serial 2>/dev/null)"
# The NIC.
ip link set eth0 up && ip addr add 10.0.2.2/24 dev eth0
echo "QX-DEV mac=$(cat /sys/class/net/eth0/address)"
ok=no; for i in $(seq 60); do if ping -c 1 -W 1 10.0.2.1 >/dev/null 2>&1; then ok=yes; break; fi; done
echo "QX-DEV ping=$ok"
wget -q -O /tmp/net-in http://10.0.2.1:8080/h && echo "QX-DEV net-in=$(sum /tmp/net-in)"
# vsock: the guest connects to host port 1234, then listens on 5000 for the host.
ok=no; for i in $(seq 60); do if qx-vsock connect 2 1234 </tmp/g >/tmp/v1 2>/tmp/c1.log; then ok=yes; break; fi; sleep 0.5; done
cat /tmp/c1.log
echo "QX-DEV vsock-connect=$ok"
echo "QX-DEV vsock-in1=$(sum /tmp/v1)"
qx-vsock listen 5000 </tmp/g >/tmp/v2 2>/tmp/l2.log; echo "QX-DEV vsock-listen-status=$?"
cat /tmp/l2.log
echo "QX-DEV vsock-in2=$(sum /tmp/v2)"
# The virtio console: a line on hvc0, which the agent's second console hub carries.
for i in $(seq 50); do [ -c /dev/hvc0 ] && break; sleep 0.1; done
echo "QX-HVC-AGENT hello from hvc0" >/dev/hvc0 && echo "QX-DEV hvc=written"
echo "QX-DEV-END"
"#;

/// The host side of the devices VM (a second job in the same nested host).
const DEVICES_HOST: &str = r#"
set -u
A=/payload/quantix-agent
C="/payload/quantixctl --agent unix:/tmp/qd/agent.sock"
V=/payload/qx-vsock
sum() { sha256sum "$1" | cut -d' ' -f1; }
mkdir -p /tmp/qd-images /tmp/www
dd if=/dev/urandom of=/tmp/www/h bs=1024 count=1536 2>/dev/null
echo "QX-HOST h=$(sum /tmp/www/h)"
head -c 1048576 /tmp/www/h >/tmp/h1m
echo "QX-HOST disk-h=$(sum /tmp/h1m)"
truncate -s 8M /tmp/qd-images/data.img
dd if=/tmp/h1m of=/tmp/qd-images/data.img conv=notrunc 2>/dev/null
$A --state-dir /tmp/qd --image-dir /guest --image-dir /payload --image-dir /tmp/qd-images 	--metrics-listen 127.0.0.1:9701 --cgroup-name quantix-devices --vmm /payload/quantix-vmm >/tmp/agent-d.log 2>&1 &
i=0
while [ ! -S /tmp/qd/agent.sock ]; do
	i=$((i + 1))
	if [ $i -gt 200 ]; then echo "QX-AGENT-NOT-UP"; cat /tmp/agent-d.log; exit 10; fi
	sleep 0.1
done
printf '%s
' 'id: dev' 'name: devices' 'vcpus: 1' 'memory_mib: 256' 'kernel: /guest/vmlinuz' 	'initramfs: /payload/devices.cpio' 'cmdline: console=ttyS0 loglevel=3 qx.action=script' 	'disks:' '  - path: /tmp/qd-images/data.img' '    id: qx-data-1' 	'nics:' '  - tap: qxtap0' '    mac: 52:54:00:aa:bb:07' 	'vsock:' '  guest_cid: 3' 'console_virtio: true' >/tmp/dev.yaml
$C create -f /tmp/dev.yaml || { echo "QX-HOST-CREATE-FAILED"; cat /tmp/agent-d.log; exit 11; }
sock=$($C -o json get dev | sed -n 's/.*"vsock_socket": "\(.*\)".*/\1/p')
echo "QX-HOST vsock-socket=$sock"
# A host service for the guest's connections to port 1234, bound before the VM starts. The
# directory is shared with the VMM's uid only, so the socket may be open to everyone in it.
(cd "$(dirname "$sock")" && exec timeout 200 $V unix-listen vsock.sock_1234 </tmp/www/h >/tmp/out1 2>/tmp/ul.log) &
ul=$!
i=0; while [ ! -S "${sock}_1234" ]; do i=$((i+1)); [ $i -lt 100 ] || break; sleep 0.1; done
chmod 0666 "${sock}_1234"
$C start dev || { echo "QX-HOST-START-FAILED"; cat /tmp/agent-d.log; exit 12; }
# The guest's lines, from the console ring's start (the guest powers off right after its last).
$C console dev --until "QX-DEV-END" --timeout 300 >/tmp/dev-console.txt &
cons=$!
$C console dev --device virtio --until "QX-HVC-AGENT" --timeout 300 >/tmp/dev-hvc.txt &
hvc=$!
i=0; while ! ip link show qxtap0 >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 300 ] || break; sleep 0.1; done
ip addr add 10.0.2.1/24 dev qxtap0 && ip link set qxtap0 up
httpd -f -p 8080 -h /tmp/www >/dev/null 2>&1 &
httpd_pid=$!
pid=$($C -o json get dev | sed -n 's/.*"pid": \([0-9]*\).*/\1/p')
echo "QX-HOST vmm-uid=$(awk '/^Uid:/ { print $2 }' /proc/$pid/status)"
echo "QX-HOST vmm-seccomp=$(awk '/^Seccomp:/ { print $2 }' /proc/$pid/status)"
echo "QX-HOST vmm-nnp=$(awk '/^NoNewPrivs:/ { print $2 }' /proc/$pid/status)"
echo "QX-HOST vmm-root=$(ls /proc/$pid/root/ | tr '
' ' ')"
wait $ul; echo "QX-HOST vsock-listen-status=$?"
cat /tmp/ul.log
echo "QX-HOST vsock-out1=$(sum /tmp/out1)"
ok=no; i=0
while [ $i -lt 240 ]; do
	$V unix-connect "$sock" 5000 </tmp/www/h >/tmp/out2 2>/tmp/uc.log; st=$?
	if [ $st = 0 ]; then ok=yes; break; fi
	[ $st = 3 ] || cat /tmp/uc.log
	i=$((i+1)); sleep 0.5
done
echo "QX-HOST vsock-connect=$ok"
echo "QX-HOST vsock-out2=$(sum /tmp/out2)"
wait $cons || echo "QX-HOST-CONSOLE-FAILED status=$?"
cat /tmp/dev-console.txt
if wait $hvc; then echo "QX-HOST hvc=ok"; else echo "QX-HOST hvc=failed status=$?"; fi
sed 's/^/HVC: /' /tmp/dev-hvc.txt
i=0
until $C -o json get dev | grep -q '"state": "VM_STATE_STOPPED"'; do
	i=$((i + 1))
	if [ $i -gt 300 ]; then echo "QX-HOST-NOT-STOPPED"; $C -o json get dev; cat /tmp/agent-d.log; exit 13; fi
	sleep 0.1
done
echo "QX-HOST exit=$($C -o json get dev | tr -d '
 ' | sed -n 's/.*"last_exit":{[^}]*"reason":"\([a-z-]*\)".*/\1/p')"
kill $httpd_pid
dd if=/tmp/qd-images/data.img of=/tmp/disk-out bs=1024 skip=1024 count=1536 2>/dev/null
echo "QX-HOST disk-out=$(sum /tmp/disk-out)"
cat /tmp/qd/vms/dev/vmm.log | tail -20
"#;

/// The payload: the static agent, VMM, jailer, quantixctl and qx-vsock, and the devices
/// VM's initramfs.
fn payload(assets: &Assets) -> Payload {
    let mut payload = Payload::new();
    for (package, bin) in [
        ("quantix-vmm", "quantix-vmm"),
        ("quantix-agent", "quantix-agent"),
        ("quantix-jailer", "quantix-jailer"),
        ("quantix-ctl", "quantixctl"),
        ("quantix-sandbox", "qx-vsock"),
    ] {
        let path = build::static_binary(package, bin).unwrap_or_else(|e| panic!("{e}"));
        payload
            .add_file(&path, &format!("{}/{bin}", paths::PAYLOAD_DIR))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let qx_vsock =
        build::static_binary("quantix-sandbox", "qx-vsock").unwrap_or_else(|e| panic!("{e}"));
    let qx_vsock =
        std::fs::read(&qx_vsock).unwrap_or_else(|e| panic!("{}: {e}", qx_vsock.display()));
    let cpio = GuestInitramfs::new(assets)
        .file("/bin/qx-vsock", qx_vsock, 0o755)
        .script_after_modules(assets, DEVICE_MODULES, DEVICES_GUEST)
        .and_then(|i| i.build())
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/devices.cpio", cpio, 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    payload
}

/// [`quantix_sandbox::console_field`], empty when no line has it (the assertions then
/// show the whole output).
fn field(out: &str, key: &str) -> String {
    quantix_sandbox::console_field(out, key).unwrap_or_default()
}

#[test]
fn agent_boots_debian_through_its_api_in_the_nested_sandbox() {
    let assets = Assets::from_env().unwrap_or_else(|e| panic!("{e}"));
    let payload = payload(&assets);
    let config = SandboxConfig {
        network_modules: true,
        ..SandboxConfig::default()
    };
    let sandbox = Sandbox::with_config(assets, config);
    let jobs = [
        Job::shell("agent-debian", SCRIPT).timeout(Duration::from_secs(300)),
        Job::shell("agent-devices", DEVICES_HOST).timeout(Duration::from_secs(400)),
    ];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    devices_work_jailed(&report.jobs[1], &report.log_path);
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
        [
            "EVENT_KIND_CREATED",
            "EVENT_KIND_STARTED",
            "EVENT_KIND_PAUSED",
            "EVENT_KIND_RESUMED",
            "EVENT_KIND_STOPPING",
            "EVENT_KIND_EXITED",
            "EVENT_KIND_DELETED"
        ],
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

/// The second job: the devices VM's disk, NIC and vsock carried what both ends sent, and its
/// VMM was jailed.
fn devices_work_jailed(r: &quantix_sandbox::JobResult, log: &std::path::Path) {
    let out = &r.output;
    let context = || {
        format!(
            "status {:?}, timed out {}, log {}\n{out}",
            r.status,
            r.timed_out,
            log.display()
        )
    };
    assert!(!r.timed_out, "{}", context());
    assert_eq!(r.status, Some(0), "{}", context());
    assert!(!out.contains("QX-FAIL"), "{}", context());
    assert!(!out.contains("QX-HOST-CONSOLE-FAILED"), "{}", context());
    let h = field(out, "QX-HOST h");
    let g = field(out, "QX-DEV g");
    assert_eq!(h.len(), 64, "{}", context());
    assert_eq!(g.len(), 64, "{}", context());
    // The VMM was jailed: its own uid, seccomp filter mode, no new privileges, and a root
    // that holds only its directories.
    let uid: u64 = field(out, "QX-HOST vmm-uid").parse().unwrap_or(0);
    assert!(uid >= 2_100_000_000, "a jail uid: {}", context());
    assert_eq!(field(out, "QX-HOST vmm-seccomp"), "2", "{}", context());
    assert_eq!(field(out, "QX-HOST vmm-nnp"), "1", "{}", context());
    assert_eq!(field(out, "QX-HOST vmm-root"), "run vsock", "{}", context());
    // The disk, both ways, and its serial.
    assert_eq!(
        field(out, "QX-DEV disk-in"),
        field(out, "QX-HOST disk-h"),
        "host to guest on the disk: {}",
        context()
    );
    assert_eq!(field(out, "QX-DEV disk-write"), "ok", "{}", context());
    assert_eq!(
        field(out, "QX-HOST disk-out"),
        g,
        "guest to host on the disk: {}",
        context()
    );
    assert_eq!(field(out, "QX-DEV serial"), "qx-data-1", "{}", context());
    // The NIC.
    assert_eq!(
        field(out, "QX-DEV mac"),
        "52:54:00:aa:bb:07",
        "{}",
        context()
    );
    assert_eq!(field(out, "QX-DEV ping"), "yes", "{}", context());
    assert_eq!(
        field(out, "QX-DEV net-in"),
        h,
        "host to guest over TCP: {}",
        context()
    );
    // vsock, the guest's connection then the host's.
    assert!(
        field(out, "QX-HOST vsock-socket").ends_with("/vms/dev/root/vsock/vsock.sock"),
        "{}",
        context()
    );
    assert_eq!(field(out, "QX-DEV vsock-connect"), "yes", "{}", context());
    assert_eq!(
        field(out, "QX-HOST vsock-listen-status"),
        "0",
        "{}",
        context()
    );
    assert_eq!(field(out, "QX-HOST vsock-out1"), g, "{}", context());
    assert_eq!(field(out, "QX-DEV vsock-in1"), h, "{}", context());
    assert_eq!(field(out, "QX-HOST vsock-connect"), "yes", "{}", context());
    assert_eq!(
        field(out, "QX-DEV vsock-listen-status"),
        "0",
        "{}",
        context()
    );
    assert_eq!(field(out, "QX-HOST vsock-out2"), g, "{}", context());
    assert_eq!(field(out, "QX-DEV vsock-in2"), h, "{}", context());
    // The guest powered itself off when done.
    assert_eq!(field(out, "QX-HOST exit"), "poweroff", "{}", context());
    // The virtio console: the guest's line on hvc0 came through `console --device virtio`.
    assert_eq!(field(out, "QX-HOST hvc"), "ok", "{}", context());
    assert!(
        out.contains("HVC: QX-HVC-AGENT hello from hvc0"),
        "{}",
        context()
    );
}
