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
/// The snapshot guest's modules: virtio-mmio and virtio-net.
const SNAPSHOT_MODULES: &[&str] = &[
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
];

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

/// The snapshot VM's guest: 32 MiB of random data in RAM and its checksum, then a counter
/// that ticks three times a second, the data's checksum again every tenth tick.
const SNAPSHOT_GUEST: &str = r#"
sum() { sha256sum "$1" | cut -d' ' -f1; }
# The card: its address goes into the snapshot; a restored copy answers on it and is told
# to announce it (gratuitous ARP; the VMM logs the driver's acknowledgement).
ip link set lo up
ip addr add 10.0.5.2/24 dev eth0 && ip link set eth0 up && echo "QX-SNAP net=up"
dd if=/dev/urandom of=/tmp/fill bs=1048576 count=32 2>/dev/null
echo "QX-SNAP before=$(sum /tmp/fill)"
# The disk: the host's label at offset 0.
echo "QX-SNAP disk=$(dd if=/dev/vda bs=16 count=1 2>/dev/null | tr -dc 'A-Za-z-')"
# vsock: a connection to host port 1234 held open, a new one when it ends (the transport
# reset after a restore ends it); each says its attempt and the CID the guest has now.
(
	c=0
	while true; do
		c=$((c + 1))
		qx-vsock hold 2 1234 "QX-VS c=$c cid=$(qx-vsock local-cid)" >/dev/null 2>/tmp/vs.log
		grep -q connected /tmp/vs.log && echo "QX-SNAP vsock-ended c=$c $(tail -1 /tmp/vs.log)"
		sleep 0.5
	done
) &
(
n=0
while true; do
	n=$((n + 1))
	# gen: the VM Generation ID as the guest reads it (the 16 bytes at the ADDR of the
	# ACPI device VGEN, quantix-vmm's 0xfffe0, below 1 MiB where /dev/mem may be read;
	# it may not be mapped there: EPERM).
	# Debian's cloud kernel has no vmgenid driver (CONFIG_VIRT_DRIVERS is off), so the
	# guest is shown the new ID but its kernel does not reseed on it.
	if [ $((n % 10)) = 0 ]; then
		echo "QX-SNAP tick=$n up=$(cut -d' ' -f1 /proc/uptime) sum=$(sum /tmp/fill) vgen=$(ls /sys/bus/acpi/devices | grep -c QNTX0001) gen=$(dd if=/dev/mem bs=16 skip=65534 count=1 2>/dev/null | od -An -tx1 | tr -d ' \n')"
	else echo "QX-SNAP tick=$n up=$(cut -d' ' -f1 /proc/uptime)"; fi
	sleep 0.3
done
) &
# The console answers typed commands (the host's --send), restored or not.
while read -r line; do eval "$line"; done
"#;

/// The snapshot job: a Debian guest saved through the agent with `after: stop` (its VMM
/// exits), restored twice side by side (mapped and lazily), each copy going on from where
/// it was with its data intact; then a full snapshot and a diff of a copy.
const SNAPSHOT_HOST: &str = r#"
set -u
A=/payload/quantix-agent
C="/payload/quantixctl --agent unix:/tmp/qs/agent.sock"
V=/payload/qx-vsock
I=/tmp/qs-images
fail() {
	echo "QX-SNAP-FAILED $1"; cat /tmp/agent-s.log | tail -30
	for v in src copy lazy; do
		tail -5 /tmp/qs/vms/$v/vmm.log 2>/dev/null; cat /tmp/vs-$v.log 2>/dev/null
		$C console $v --until "QX-NEVER" --timeout 2 2>/dev/null | tail -15 | sed "s/^/CONSOLE-$v: /"
	done
	exit 1
}
# A host listener on a VM's vsock port 1234 that keeps its side open; what the guest says
# goes to /tmp/vs-$1.txt.
vs_listen() {
	sock=$($C -o json get $1 | sed -n 's/.*"vsock_socket": "\(.*\)".*/\1/p')
	[ -n "$sock" ] || fail "vsock-socket-$1"
	(cd "$(dirname "$sock")" && sleep 240 | exec $V unix-listen "$(basename "$sock")_1234" >/tmp/vs-$1.txt 2>/tmp/vs-$1.log) </dev/null >/dev/null 2>&1 &
	i=0; while [ ! -S "${sock}_1234" ]; do i=$((i+1)); [ $i -lt 100 ] || break; sleep 0.1; done
	chmod 0666 "${sock}_1234"
}
# Types a command on a VM's console and waits for its answer line.
type_on() {
	$C console $1 --no-replay --send "$2" --until "$3" --timeout 120 >/tmp/typed-$1.txt || fail "typed-$1"
	sed "s/^/TYPED-$1: /" /tmp/typed-$1.txt
}
mkdir -p $I
truncate -s 8M $I/src.img
printf 'QX-DISK-SOURCE' | dd of=$I/src.img conv=notrunc 2>/dev/null
$A --state-dir /tmp/qs --image-dir /guest --image-dir /payload --image-dir $I --metrics-listen 127.0.0.1:9702 \
	--cgroup-name quantix-snapshots --vmm /payload/quantix-vmm >/tmp/agent-s.log 2>&1 &
i=0
while [ ! -S /tmp/qs/agent.sock ]; do
	i=$((i + 1)); [ $i -lt 200 ] || fail agent-up; sleep 0.1
done
printf '%s\n' 'id: src' 'name: snap-src' 'vcpus: 1' 'memory_mib: 256' 'kernel: /guest/vmlinuz' \
	'initramfs: /payload/snapshot.cpio' 'cmdline: console=ttyS0 loglevel=3 qx.action=script' \
	'disks:' "  - path: $I/src.img" '    id: qx-snap-disk' \
	'nics:' '  - tap: qxsnap0' '    mac: 52:54:00:aa:bb:10' 'vsock:' '  guest_cid: 3' >/tmp/snap.yaml
$C create -f /tmp/snap.yaml >/dev/null || fail create
vs_listen src
$C start src >/dev/null || fail start
$C console src --until "sum=" --timeout 300 >/tmp/src.txt || fail console-src
i=0; until grep -q "QX-VS" /tmp/vs-src.txt; do i=$((i + 1)); [ $i -lt 300 ] || fail vsock-src; sleep 0.1; done
echo "QX-SNAP-VS src: $(cat /tmp/vs-src.txt)"
$C -o json snapshot create src snap1 --after stop >/tmp/snap1.json || fail snapshot
i=0
until $C -o json get src | grep -q '"state": "VM_STATE_STOPPED"'; do
	i=$((i + 1)); [ $i -lt 300 ] || fail src-not-stopped; sleep 0.1
done
# Each copy gets its own images (copies of the source's, flushed and stopped), with its
# own label at 4 KiB, which its guest never read before.
for v in copy lazy; do
	cp $I/src.img $I/$v.img
	printf "QX-DISK-$v" | dd of=$I/$v.img bs=4096 seek=1 conv=notrunc 2>/dev/null
done
$C restore snap1 --id copy --name snap-copy --taps qxcopy0 --macs 52:54:00:aa:bb:11 \
	--disks $I/copy.img --cid 4 >/dev/null || fail restore
$C restore snap1 --id lazy --name snap-lazy --taps qxlazy0 --macs 52:54:00:aa:bb:12 \
	--disks $I/lazy.img --cid 5 --lazy >/dev/null || fail restore-lazy
vs_listen copy
vs_listen lazy
$C start copy >/dev/null || fail start-copy
$C start lazy >/dev/null || fail start-lazy
$C console copy --until "sum=" --timeout 300 >/tmp/copy.txt || fail console-copy
$C console lazy --until "sum=" --timeout 300 >/tmp/lazy.txt || fail console-lazy
# The pager's summary line (once every data page is in): how often the guest waited.
i=0
until grep -q '"faults_before_complete"' /tmp/qs/vms/lazy/vmm.log; do
	i=$((i + 1)); [ $i -lt 600 ] || fail lazy-summary; sleep 0.1
done
# vsock: each copy's guest saw its connection reset and connected again, with its new CID.
for v in copy lazy; do
	i=0; until grep -q "QX-VS" /tmp/vs-$v.txt; do i=$((i + 1)); [ $i -lt 600 ] || fail vsock-$v; sleep 0.1; done
	echo "QX-SNAP-VS $v: $(cat /tmp/vs-$v.txt)"
done
# The console, the disk and the card of each copy, driven by typed commands: the disk's
# label read from the device (caches dropped), a line written; the card probed again so
# that the guest takes the copy's own MAC, then re-addressed (the lazy copy on its own net).
for v in copy lazy; do
	type_on $v 'echo 3 >/proc/sys/vm/drop_caches; echo "QX-$((1 + 1))T disk=$(dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | tr -dc A-Za-z-) w=$(echo written-by-guest-$((40 + 2)) | dd of=/dev/vda bs=512 seek=16 conv=fsync 2>/dev/null && echo ok)"' "QX-2T"
done
for v in copy lazy; do
	net=5; [ $v = lazy ] && net=6
	type_on $v "d=\$(basename \$(readlink /sys/class/net/eth0/device)); echo \$d >/sys/bus/virtio/drivers/virtio_net/unbind; echo \$d >/sys/bus/virtio/drivers/virtio_net/bind; sleep 1; ip addr add 10.0.$net.2/24 dev eth0; ip link set eth0 up; echo \"QX-\$((2 + 1))M mac=\$(cat /sys/class/net/eth0/address)\"" "QX-3M"
	tap=qx${v}0
	ip addr add 10.0.$net.1/24 dev $tap && ip link set $tap up
	ok=no; for i in $(seq 60); do if ping -c 1 -W 1 10.0.$net.2 >/dev/null 2>&1; then ok=yes; break; fi; done
	echo "QX-SNAP-NET $v=$ok neigh=$(ip neigh show dev $tap 10.0.$net.2 | sed -n 's/.*lladdr \([0-9a-f:]*\).*/\1/p')"
done
for v in src copy lazy; do
	echo "QX-SNAP-DISK $v: $(dd if=$I/$v.img bs=512 skip=16 count=1 2>/dev/null | tr -dc 'a-z0-9-')"
done
# Each copy's guest announced its card (the VMM logs the driver's ACK); the source never.
for v in copy lazy; do
	i=0; until grep -q "the guest announced the card" /tmp/qs/vms/$v/vmm.log; do
		i=$((i + 1)); [ $i -lt 300 ] || break; sleep 0.1
	done
done
echo "QX-SNAP-ANNOUNCE $(for v in src copy lazy; do printf '%s=%s ' $v $(grep -c "the guest announced the card" /tmp/qs/vms/$v/vmm.log); done)"
echo "QX-SNAP-LAZY faults_before_complete=$(grep -o '"faults_before_complete":[0-9]*' /tmp/qs/vms/lazy/vmm.log | head -1 | sed 's/.*://')"
$C -o json snapshot create copy c-full >/tmp/cfull.json || fail c-full
sleep 2
$C -o json snapshot create copy c-diff --diff >/tmp/cdiff.json || fail c-diff
bytes() { tr -d '\n ' <"$1" | sed -n 's/.*"data_bytes":"\([0-9]*\)".*/\1/p'; }
echo "QX-SNAP-SIZE snap1=$(bytes /tmp/snap1.json) full=$(bytes /tmp/cfull.json) diff=$(bytes /tmp/cdiff.json)"
echo "QX-SNAP-PAUSED snap1=$(tr -d '\n ' </tmp/snap1.json | sed -n 's/.*"paused_ms":"\([0-9]*\)".*/\1/p')"
$C snapshot list
sed 's/^/SRC: /' /tmp/src.txt
sed 's/^/COPY: /' /tmp/copy.txt
sed 's/^/LAZY: /' /tmp/lazy.txt
$C delete copy --force && $C delete lazy --force && echo "QX-SNAP-DONE"
"#;

/// The payload: the static agent, VMM, jailer, quantixctl and qx-vsock, and the devices
/// and snapshot VMs' initramfs.
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
        .file("/bin/qx-vsock", qx_vsock.clone(), 0o755)
        .script_after_modules(assets, DEVICE_MODULES, DEVICES_GUEST)
        .and_then(|i| i.build())
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/devices.cpio", cpio, 0o644)
        .unwrap_or_else(|e| panic!("{e}"));
    let cpio = GuestInitramfs::new(assets)
        .file("/bin/qx-vsock", qx_vsock, 0o755)
        .script_after_modules(assets, SNAPSHOT_MODULES, SNAPSHOT_GUEST)
        .and_then(|i| i.build())
        .unwrap_or_else(|e| panic!("{e}"));
    payload
        .add_bytes("/payload/snapshot.cpio", cpio, 0o644)
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
        Job::shell("agent-snapshots", SNAPSHOT_HOST).timeout(Duration::from_secs(600)),
    ];
    let report = sandbox
        .run(&payload, &jobs)
        .unwrap_or_else(|e| panic!("{e}"));
    devices_work_jailed(&report.jobs[1], &report.log_path);
    snapshots_restore_debian(&report.jobs[2], &report.log_path);
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

/// The third job: the restored copies of the Debian guest went on from where it was saved,
/// with its 32 MiB of data intact, mapped and lazily, side by side, each with its own MAC,
/// CID and images: time went on, the console answers typed commands, the disk reads and
/// writes, the card passes traffic from its new MAC, vsock reconnected; a diff is a small
/// part of a full one.
fn snapshots_restore_debian(r: &quantix_sandbox::JobResult, log: &std::path::Path) {
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
    assert!(out.contains("QX-SNAP-DONE"), "{}", context());
    // Each console's ticks and checksums.
    let of = |prefix: &str| -> (Vec<u64>, Vec<String>, Vec<String>) {
        let mut ticks = Vec::new();
        let mut sums = Vec::new();
        let mut gens = Vec::new();
        for line in out.lines().filter_map(|l| l.strip_prefix(prefix)) {
            for w in line.split_whitespace() {
                if let Some(g) = w.strip_prefix("gen=") {
                    gens.push(g.to_string());
                }
                if let Some(v) = w.strip_prefix("vgen=") {
                    assert_eq!(v, "1", "{prefix}the guest has the ACPI device VGEN");
                }
                if let Some(t) = w.strip_prefix("tick=") {
                    ticks.extend(t.parse::<u64>().ok());
                }
                if let Some(s) = w.strip_prefix("sum=").or_else(|| w.strip_prefix("before=")) {
                    sums.push(s.to_string());
                }
            }
        }
        (ticks, sums, gens)
    };
    let (src_ticks, src_sums, src_gens) = of("SRC: ");
    // Guest time: the uptime on each tick line, which must not go back in a copy.
    let uptimes = |prefix: &str| -> Vec<f64> {
        out.lines()
            .filter_map(|l| l.strip_prefix(prefix))
            .flat_map(|l| l.split_whitespace())
            .filter_map(|w| w.strip_prefix("up="))
            .filter_map(|v| v.parse().ok())
            .collect()
    };
    let src_up = uptimes("SRC: ").into_iter().fold(0.0, f64::max);
    assert!(src_up > 0.0, "the source's uptime: {}", context());
    assert!(
        out.contains("SRC: QX-SNAP disk=QX-DISK-SOURCE"),
        "{}",
        context()
    );
    // The VM Generation ID: one value while the source runs, a new one in each restored
    // copy (read by the guest from the address its ACPI tables give).
    let generation = src_gens.first().cloned().unwrap_or_default();
    assert!(
        generation.len() == 32 && generation.chars().any(|c| c != '0'),
        "the source's generation ID: {}",
        context()
    );
    assert!(src_gens.iter().all(|g| *g == generation), "{}", context());
    let mut copies = Vec::new();
    let before = src_sums.first().cloned().unwrap_or_default();
    assert_eq!(before.len(), 64, "the guest's checksum: {}", context());
    assert!(src_sums.iter().all(|s| *s == before), "{}", context());
    let last_seen = src_ticks.iter().max().copied().unwrap_or(0);
    assert!(last_seen >= 10, "{}", context());
    for prefix in ["COPY: ", "LAZY: "] {
        let (ticks, sums, gens) = of(prefix);
        let copy_gen = gens.first().cloned().unwrap_or_default();
        assert!(
            copy_gen.len() == 32 && copy_gen != generation && gens.iter().all(|g| *g == copy_gen),
            "{prefix}the guest sees a new VM Generation ID: {}",
            context()
        );
        copies.push(copy_gen);
        let up = uptimes(prefix);
        assert!(
            up.first().is_some_and(|u| *u > src_up),
            "{prefix}guest time goes on from {src_up} s, no jump back: {up:?} {}",
            context()
        );
        eprintln!(
            "{prefix}guest uptime {src_up} s at the last tick seen, {:?} s at the first after the restore",
            up.first()
        );
        // It went on counting: no boot (no `before=` line), the first tick past the ones
        // seen before the snapshot.
        assert!(
            !out.lines()
                .any(|l| l.starts_with(prefix) && l.contains("before=")),
            "{prefix}restored, not booted: {}",
            context()
        );
        let first = ticks.first().copied().unwrap_or(0);
        assert!(
            first > last_seen,
            "{prefix}goes on from tick {last_seen}, saw {first}: {}",
            context()
        );
        assert!(!sums.is_empty(), "{}", context());
        assert!(
            sums.iter().all(|s| *s == before),
            "{prefix}the data is intact: {}",
            context()
        );
    }
    assert_ne!(
        copies[0],
        copies[1],
        "two restores, two generations: {}",
        context()
    );
    assert!(out.contains("SRC: QX-SNAP net=up"), "{}", context());
    // vsock: the source's connection, then one from each copy after the transport reset
    // ended the old one, a later attempt, with the copy's own CID.
    let vsock = |who: &str| -> (u64, String) {
        let line = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("QX-SNAP-VS {who}: ")))
            .unwrap_or_default();
        let word = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_default()
                .to_string()
        };
        (word("c=").parse().unwrap_or(0), word("cid="))
    };
    let (src_c, src_cid) = vsock("src");
    assert!(src_c >= 1 && src_cid == "3", "{}", context());
    for (who, cid, mac, tap_ok) in [
        ("copy", "4", "52:54:00:aa:bb:11", "copy=yes"),
        ("lazy", "5", "52:54:00:aa:bb:12", "lazy=yes"),
    ] {
        let (c, got_cid) = vsock(who);
        assert!(
            c > src_c && got_cid == cid,
            "{who}: vsock reconnected (attempt {c} after {src_c}) with CID {got_cid}, want {cid}: {}",
            context()
        );
        // What the guest answered to a command typed on its console.
        let answered = |text: &str| {
            out.lines()
                .any(|l| l.starts_with(&format!("TYPED-{who}: ")) && l.contains(text))
        };
        // The console answered, the disk read the copy's own label and took a write.
        assert!(
            answered(&format!("QX-2T disk=QX-DISK-{who} w=ok")),
            "{who}: typed disk command: {}",
            context()
        );
        assert!(
            out.contains(&format!("QX-SNAP-DISK {who}: written-by-guest-42")),
            "{who}: the write is in the copy's image: {}",
            context()
        );
        // Its own MAC, taken by the guest when it probed the card again, seen by the host.
        assert!(
            answered(&format!("QX-3M mac={mac}")),
            "{who}: the guest has the copy's MAC: {}",
            context()
        );
        assert!(
            out.contains(&format!("QX-SNAP-NET {tap_ok} neigh={mac}")),
            "{who}: traffic from the copy's MAC: {}",
            context()
        );
    }
    assert!(
        out.lines().any(|l| l.trim_end() == "QX-SNAP-DISK src:"),
        "the source's image is untouched by the copies: {}",
        context()
    );
    // After a restore the guest's driver announced its card, and acknowledged it once.
    let announce = out
        .lines()
        .find_map(|l| l.strip_prefix("QX-SNAP-ANNOUNCE "))
        .unwrap_or_default();
    assert_eq!(announce.trim(), "src=0 copy=1 lazy=1", "{}", context());
    // The lazy copy ran before its memory was in.
    let faults: u64 = field(out, "QX-SNAP-LAZY faults_before_complete")
        .parse()
        .unwrap_or(0);
    assert!(faults >= 1, "{}", context());
    // Sizes: a diff after two idle seconds is a small part of the full snapshot.
    let size = |k: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with("QX-SNAP-SIZE"))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{k}=")))
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let (full, diff) = (size("full"), size("diff"));
    assert!(
        full >= 32 << 20,
        "the full snapshot holds the data: {}",
        context()
    );
    assert!(
        diff > 0 && diff * 10 < full,
        "diff {diff} of full {full}: {}",
        context()
    );
    eprintln!(
        "snapshots in the sandbox: full {full} bytes, diff {diff} bytes ({:.2} %), lazy faults before complete {faults}, {}",
        diff as f64 * 100.0 / full as f64,
        out.lines().find(|l| l.starts_with("QX-SNAP-PAUSED")).unwrap_or_default()
    );
}
