//! A paused vCPU's state is complete, and work on a vCPU runs on its own thread: a
//! hand-made guest on this host's /dev/kvm, driven through the VMM's library (the VM
//! built by `Vm::build`, paused by its `Pauser`), with the production seccomp filters.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::{elf64, scratch, write};
use quantix_vmm::api::PauseControl;
use quantix_vmm::exit::ExitSignal;
use quantix_vmm::vm::Vm;
use quantix_vmm_api::{SerialMode, VmConfig};

/// Where `elf64` puts the first instruction.
const ENTRY: u64 = 0x100_0000 + 64 + 56;

/// Counts its port reads in RBX; each round puts a marker in EAX, then reads port
/// 0x70 (no device there: the read returns 0xff, through an exit to the VMM).
///
/// ```text
///   0: 31 db            xor ebx, ebx
///   2: b8 00 56 34 12   mov eax, 0x12345600
///   7: e4 70            in  al, 0x70
///   9: 48 ff c3         inc rbx
///   c: eb f4            jmp 2
/// ```
const GUEST: [u8; 14] = [
    0x31, 0xdb, 0xb8, 0x00, 0x56, 0x34, 0x12, 0xe4, 0x70, 0x48, 0xff, 0xc3, 0xeb, 0xf4,
];
const AFTER_IN: u64 = ENTRY + 9;

#[test]
fn a_paused_vcpu_has_completed_the_port_read_it_was_in() {
    let dir = scratch("vcpu-pause");
    let kernel = write(&dir, "k.elf", &elf64(&GUEST));
    let mut config = VmConfig::with_kernel(kernel.to_str().unwrap());
    config.memory = "32M".parse().unwrap();
    config.rng = false;
    config.serial = SerialMode::Off;
    quantix_vmm::seccomp::init(config.seccomp, None).unwrap();

    let exit = Arc::new(ExitSignal::new().unwrap());
    let vm = Vm::build(&config, exit.clone()).unwrap();
    assert_eq!(
        vm.devices().ids(),
        ["uart:com1", "i8042:0", "acpi-pm:0", "ged:power-button"]
    );
    let pauser = vm.pauser();
    let exits = vm.metrics().vcpus[0].clone();
    assert!(
        pauser.vcpu_registers().is_err(),
        "register reads need a paused VM"
    );
    let running = vm.start().unwrap();

    // Pause again and again. Every read the VMM served must be one the guest completed
    // (RBX, plus one when the vCPU stopped right after the IN), with its value in AL.
    // Without completing the read before parking, the paused vCPU is still in the IN:
    // its value is not in AL yet, and a restored VM would read the port again. (Here,
    // without the completion, about one pause in 500 stops in that state: hence the
    // 2000 rounds, about a second.)
    let (mut after_in, mut rounds) = (0, 0);
    let start = std::time::Instant::now();
    while (after_in < 20 || rounds < 2000) && start.elapsed().as_secs() < 60 {
        pauser.pause().unwrap();
        let regs = pauser.vcpu_registers().unwrap();
        assert_eq!(regs.len(), 1);
        let r = regs[0].regs;
        let (rip, eax) = (r.rip, r.rax as u32);
        assert!(
            (ENTRY..ENTRY + GUEST.len() as u64).contains(&rip),
            "rip {rip:#x} outside the guest's loop"
        );
        let served = exits.io.load(std::sync::atomic::Ordering::Relaxed);
        let completed = r.rbx + u64::from(rip == AFTER_IN);
        assert_eq!(
            served,
            completed,
            "the VMM served {served} reads, the guest completed {completed} (rip {:#x}, round {rounds})",
            rip - ENTRY
        );
        if rip == AFTER_IN {
            after_in += 1;
            assert_eq!(
                eax, 0x1234_56ff,
                "paused after the IN without its value (round {rounds})"
            );
        }
        pauser.resume();
        rounds += 1;
    }
    assert!(
        after_in >= 20,
        "only {after_in} of {rounds} pauses stopped right after the IN"
    );
    assert!(exit.reason().is_none(), "the guest kept running");
    running.stop();
    assert!(
        pauser.vcpu_registers().is_err(),
        "no vCPU thread after the stop"
    );
}
