#!/bin/sh
# Brings up quantix-agent with its embedded defaults (state in $QX_DEMO_STATE) and boots a VM
# through its API with quantixctl: Debian's kernel with a busybox initramfs, 2 vCPUs and
# 512 MiB. Shows the node, the VM's console up to its init's line, the VM list and the
# events, then stops and deletes the VM and stops the agent (which leaves no VM behind).
# Runs with busybox sh, so that it works inside the nested sandbox too. Used by scripts/demo.
# Environment: QX_BIN (directory of quantix-agent, quantix-vmm, quantixctl), QX_KERNEL,
# QX_INITRAMFS, QX_DEMO_STATE (default /tmp/quantix-demo).
set -eu
bin=${QX_BIN:?}
state=${QX_DEMO_STATE:-/tmp/quantix-demo}
rm -rf "$state"
mkdir -p "$state"
ctl() { "$bin/quantixctl" --agent "unix:$state/agent.sock" "$@"; }
step() { printf '\n==> %s\n' "$*"; }

step "starting quantix-agent (state in $state)"
# The agent opens VM files only beneath its image directories: the kernel's and the
# initramfs's.
"$bin/quantix-agent" --state-dir "$state" --vmm "$bin/quantix-vmm" --log-level warn \
	--image-dir "$(dirname "$QX_KERNEL")" --image-dir "$(dirname "$QX_INITRAMFS")" \
	>"$state/agent.log" 2>&1 &
agent=$!
trap 'kill $agent 2>/dev/null || true' EXIT
i=0
while [ ! -S "$state/agent.sock" ]; do
	i=$((i + 1))
	if [ "$i" -gt 100 ]; then
		cat "$state/agent.log" >&2
		exit 1
	fi
	sleep 0.1
done
ctl node

step "quantixctl events (in the background)"
ctl events &
events=$!
sleep 0.3

step "quantixctl create --start: Debian's kernel, 2 vCPUs, 512 MiB"
ctl create --name demo --cpus 2 --memory 512 --kernel "$QX_KERNEL" --initramfs "$QX_INITRAMFS" \
	--cmdline "console=ttyS0 qx.action=hold" --label app=demo --start

step "quantixctl console demo (until the guest's init reports and listens to its power button)"
ctl console demo --until "power button on" --timeout 240
echo

step "quantixctl list"
ctl list

step "quantixctl stop demo (presses the ACPI power button: the guest powers itself off); quantixctl delete demo"
ctl stop demo
ctl delete demo
sleep 0.3
kill "$events" 2>/dev/null || true
step "done"
