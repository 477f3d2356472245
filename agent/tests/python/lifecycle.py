#!/usr/bin/env python3
"""Drives a VM's lifecycle through the agent with a Python client generated from proto/.

Usage: lifecycle.py PROTO_ROOT AGENT_SOCKET KERNEL WORKDIR
Prints one line per step; exits non-zero (with the reason) on the first failure.
"""
import os
import queue
import sys
import time

from grpc_tools import protoc
import grpc

proto_root, sock, kernel, work = sys.argv[1:5]
out = os.path.join(work, "gen")
os.makedirs(out, exist_ok=True)
rc = protoc.main([
    "protoc",
    f"-I{proto_root}",
    f"--python_out={out}",
    f"--grpc_python_out={out}",
    os.path.join(proto_root, "quantixkvm/agent/v1/agent.proto"),
])
if rc != 0:
    sys.exit(f"protoc failed with {rc}")
sys.path.insert(0, out)
from quantixkvm.agent.v1 import agent_pb2 as pb  # noqa: E402
from quantixkvm.agent.v1 import agent_pb2_grpc as rpc  # noqa: E402


def check(cond, what):
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


# gRPC C-core puts the socket path in :authority; the agent accepts it (vendor/h2), so a client
# needs no authority override.
channel = grpc.insecure_channel(f"unix:{sock}")
vms = rpc.VmServiceStub(channel)
node = rpc.NodeServiceStub(channel)

n = node.GetNode(pb.GetNodeRequest())
check(n.capacity.vcpus >= 1, f"GetNode: {n.capacity.vcpus} CPUs, KVM API {n.kvm.api_version}")

spec = pb.VmSpec(
    name="py-vm", vcpus=1, memory_mib=64,
    boot=pb.BootSource(kernel=kernel),
    labels={"client": "python"},
    restart_policy=pb.RESTART_POLICY_NEVER,
)
vm = vms.CreateVm(pb.CreateVmRequest(vm_id="py-1", spec=spec))
check(vm.status.state == pb.VM_STATE_CREATED, "CreateVm -> CREATED")

try:
    vms.CreateVm(pb.CreateVmRequest(vm_id="py-2", spec=spec))
    check(False, "a duplicate name is refused")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.ALREADY_EXISTS and "spec.name" in e.details(),
          f"duplicate name -> ALREADY_EXISTS ({e.details()})")

vm = vms.StartVm(pb.StartVmRequest(vm_id="py-1"))
check(vm.status.state == pb.VM_STATE_RUNNING and vm.status.pid > 0, f"StartVm -> RUNNING, pid {vm.status.pid}")

# The console: a bidirectional stream; the first message attaches.
requests = queue.Queue()
requests.put(pb.ConsoleInput(attach=pb.ConsoleAttach(vm_id="py-1", replay=True)))


def gen():
    while True:
        item = requests.get()
        if item is None:
            return
        yield item


stream = vms.AttachConsole(gen())
got = b""
deadline = time.time() + 20
for msg in stream:
    got += msg.data
    if b"hello from guest" in got or time.time() > deadline:
        break
requests.put(None)
stream.cancel()
check(b"hello from guest" in got, f"console output {got!r}")

listed = vms.ListVms(pb.ListVmsRequest(label_selector={"client": "python"}))
check([v.id for v in listed.vms] == ["py-1"], "ListVms with a label selector")

vm = vms.StopVm(pb.StopVmRequest(vm_id="py-1", timeout_ms=5000))
check(vm.status.state == pb.VM_STATE_STOPPED and vm.status.last_exit.reason == "api-shutdown",
      f"StopVm -> STOPPED ({vm.status.last_exit.reason})")

try:
    vms.StopVm(pb.StopVmRequest(vm_id="py-1"))
    check(False, "stopping a stopped VM is refused")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.FAILED_PRECONDITION, f"stop again -> FAILED_PRECONDITION ({e.details()})")

vms.DeleteVm(pb.DeleteVmRequest(vm_id="py-1"))
try:
    vms.GetVm(pb.GetVmRequest(vm_id="py-1"))
    check(False, "the VM is gone")
except grpc.RpcError as e:
    check(e.code() == grpc.StatusCode.NOT_FOUND, "DeleteVm, then GetVm -> NOT_FOUND")
print("python client: all steps passed")
