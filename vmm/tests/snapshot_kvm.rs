//! Snapshots on this host's /dev/kvm with a hand-made guest: every vCPU register class
//! survives a save and a restore, memory comes back and the image is never written by
//! the restored guest, a restored VM runs on from where it was, and damaged or mismatched
//! snapshots are refused with a clear message.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use common::{elf64, scratch, summary, vmm_bin, wait_limit, write};
use quantix_vmm::api::PauseControl;
use quantix_vmm::cpu::state::VcpuState;
use quantix_vmm::exit::ExitSignal;
use quantix_vmm::snapshot::take::Kind;
use quantix_vmm::snapshot::{
    file, PageRange, SnapshotError, SnapshotState, MEMORY_FILE, STATE_FILE,
};
use quantix_vmm::vm::Vm;
use quantix_vmm_api::{SerialMode, VmConfig};
use vm_memory::{Bytes, GuestAddress};

/// Where the guest keeps its counter.
const COUNTER: u64 = 0x20_0000;
/// The MSR the guest writes (IA32_KERNEL_GS_BASE) and its value.
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_VALUE: u64 = 0x0000_7f11_2233_4455; // canonical: the MSR holds an address
/// What the guest puts in RAX..R14 (register n gets `REG_BASE * (n + 1)`).
const REG_BASE: u64 = 0x0101_0101_0101_0101;

/// A guest that enables SSE, writes an MSR, fills every general register and DR0 with
/// known values, then counts in R15 forever, storing the count at
/// [`COUNTER`] after each step.
fn register_guest() -> Vec<u8> {
    let mut c = Vec::new();
    // mov rax, cr4; or rax, 0x600 (OSFXSR | OSXMMEXCPT); mov cr4, rax
    c.extend([
        0x0f, 0x20, 0xe0, 0x48, 0x0d, 0x00, 0x06, 0x00, 0x00, 0x0f, 0x22, 0xe0,
    ]);
    // mov ecx, MSR; mov eax, low; mov edx, high; wrmsr
    c.push(0xb9);
    c.extend(MSR_KERNEL_GS_BASE.to_le_bytes());
    c.push(0xb8);
    c.extend((MSR_VALUE as u32).to_le_bytes());
    c.push(0xba);
    c.extend(((MSR_VALUE >> 32) as u32).to_le_bytes());
    c.extend([0x0f, 0x30]);
    // mov r64, imm64 for rax, rcx, rdx, rbx, (rsp skipped), rbp, rsi, rdi, r8..r14.
    for n in 0..15u8 {
        if n == 4 {
            continue; // rsp
        }
        let (rex, reg) = if n < 8 { (0x48, n) } else { (0x49, n - 8) };
        c.extend([rex, 0xb8 + reg]);
        c.extend((REG_BASE * (u64::from(n) + 1)).to_le_bytes());
    }
    // mov dr0, rax. (No SSE: this host's PVM emulates CPL0 code and cannot emulate
    // `movq xmm, r64`; the XSAVE area is checked against what the VMM loaded instead.)
    c.extend([0x0f, 0x23, 0xc0]);
    // loop: inc r15; mov [COUNTER], r15; jmp loop
    c.extend([0x49, 0xff, 0xc7, 0x4c, 0x89, 0x3c, 0x25]);
    c.extend((COUNTER as u32).to_le_bytes());
    c.extend([0xeb, 0xf3]);
    c
}

fn seccomp() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        quantix_vmm::seccomp::init(quantix_vmm_api::SeccompMode::Kill, None).unwrap()
    });
}

fn config(dir: &Path) -> VmConfig {
    let kernel = write(dir, "k.elf", &elf64(&register_guest()));
    let mut config = VmConfig::with_kernel(kernel.to_str().unwrap());
    config.memory = "32M".parse().unwrap();
    config.rng = false;
    config.serial = SerialMode::Off;
    config
}

fn read_state(dir: &Path) -> SnapshotState {
    SnapshotState::parse(&file::read(&dir.join(STATE_FILE)).unwrap()).unwrap()
}

fn msr(s: &VcpuState, index: u32) -> Option<u64> {
    s.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

/// The x87 control word and MXCSR in the XSAVE area's legacy region (bytes 0 and 24).
fn fcw_mxcsr(s: &VcpuState) -> (u16, u32) {
    ((s.xsave[0] & 0xffff) as u16, s.xsave[6])
}

/// Waits until the guest's counter is past `at_least`.
fn wait_counter(mem: &quantix_vmm::memory::GuestMemory, at_least: u64) -> u64 {
    let start = Instant::now();
    loop {
        let n: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
        if n > at_least {
            return n;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the guest does not count (at {n})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_register_class_and_memory_survive_a_save_and_a_restore() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    seccomp();
    let dir = scratch("snapshot-registers");
    let _ = std::fs::remove_dir_all(dir.join("snap"));
    let _ = std::fs::remove_dir_all(dir.join("again"));
    let _ = std::fs::remove_dir_all(dir.join("diff"));
    let config = config(&dir);

    // The original: run until it counts, then snapshot it (it stays paused).
    let vm = Vm::build(&config, Arc::new(ExitSignal::new().unwrap())).unwrap();
    let mem = vm.memory().mem.clone();
    let snapshotter = vm.snapshotter();
    let running = vm.start().unwrap();
    wait_counter(&mem, 1000);
    let snap = dir.join("snap");
    let e = snapshotter.take(&snap, Kind::Diff, |_, _| {}).unwrap_err();
    assert!(
        matches!(e, SnapshotError::NoBase),
        "a diff needs a base: {e}"
    );
    assert!(!snap.exists());
    let taken = snapshotter.take(&snap, Kind::Full, |_, _| {}).unwrap();
    assert_eq!(taken.vcpus, 1);
    assert_eq!(taken.memory_bytes, 32 << 20);
    assert!(
        taken.data_bytes > 0 && taken.data_bytes < (1 << 20),
        "{taken:?}"
    );
    let counted: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    running.stop();

    let state = read_state(&snap);
    let saved = state.vcpus[0].clone();
    let r = saved.regs;
    let gprs = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13,
        r.r14,
    ];
    let want: Vec<u64> = [0u64, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
        .iter()
        .map(|n| REG_BASE * (n + 1))
        .collect();
    assert_eq!(
        gprs.to_vec(),
        want,
        "general registers as the guest set them"
    );
    assert!(
        r.r15 == counted || r.r15 == counted + 1,
        "r15 {} vs memory {counted}",
        r.r15
    );
    assert_eq!(
        fcw_mxcsr(&saved),
        (0x37f, 0x1f80),
        "the FPU state the VMM booted with"
    );
    assert_eq!(msr(&saved, MSR_KERNEL_GS_BASE), Some(MSR_VALUE));
    assert!(msr(&saved, 0x10).is_some(), "the TSC is saved");
    assert_ne!(saved.sregs.cr4 & 0x600, 0, "CR4 with OSFXSR");
    assert_ne!(saved.sregs.efer & 0x500, 0, "EFER with LME/LMA");
    assert_eq!(saved.debugregs.db[0], REG_BASE, "DR0");
    assert!(!saved.cpuid.is_empty());
    assert_eq!(state.devices.len(), 5, "{:?}", state.devices);

    // The image holds the counter; the state file is JSON after its header line.
    let image = std::fs::File::open(snap.join(MEMORY_FILE)).unwrap();
    let mut b = [0u8; 8];
    image.read_exact_at(&mut b, COUNTER).unwrap();
    assert_eq!(u64::from_le_bytes(b), counted);
    let text = std::fs::read_to_string(snap.join(STATE_FILE)).unwrap();
    assert!(text.starts_with("QUANTIX-VMSTATE 1.0 "));
    let (_, body) = text.split_once('\n').unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["vcpus"][0]["regs"]["rax"], REG_BASE);

    // The copy: restored paused, its vCPU loaded on its own thread. Saved again at once,
    // it has exactly the saved state (but for what runs on in the host: the TSC and the
    // APIC timer's current count).
    let vm = Vm::restore(state.clone(), &snap, Arc::new(ExitSignal::new().unwrap())).unwrap();
    assert!(vm.boot.is_none());
    let mem = vm.memory().mem.clone();
    let pauser = vm.pauser();
    let snapshotter = vm.snapshotter();
    let running = vm.start().unwrap();
    assert!(pauser.paused(), "a restored VM waits paused");
    let n: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(n, counted, "memory as saved");
    let again = dir.join("again");
    snapshotter.take(&again, Kind::Full, |_, _| {}).unwrap();
    let copy = read_state(&again).vcpus[0].clone();
    assert_eq!(format!("{:?}", copy.regs), format!("{:?}", saved.regs));
    assert_eq!(format!("{:?}", copy.sregs), format!("{:?}", saved.sregs));
    assert_eq!(copy.xsave, saved.xsave, "XSAVE area");
    assert_eq!(copy.xcrs, saved.xcrs);
    assert_eq!(
        format!("{:?}", copy.debugregs),
        format!("{:?}", saved.debugregs)
    );
    assert_eq!(copy.mp_state, saved.mp_state);
    assert_eq!(copy.events, saved.events, "pending events");
    assert_eq!(copy.cpuid, saved.cpuid);
    let runs_on = [0x10, 0x6e0, 0x4b56_4d01, 0x4b56_4d00];
    for (a, b) in saved.msrs.iter().zip(&copy.msrs) {
        assert_eq!(a.index, b.index);
        if !runs_on.contains(&a.index) {
            assert_eq!(a, b, "MSR {:#x}", a.index);
        }
    }
    assert_eq!(saved.msrs.len(), copy.msrs.len());
    // APIC page but the timer's current count (0x390).
    for (i, (a, b)) in saved.lapic.iter().zip(&copy.lapic).enumerate() {
        if !(0x390..0x394).contains(&i) {
            assert_eq!(a, b, "local APIC byte {i:#x}");
        }
    }

    // Resumed, it counts on from the saved value; its writes never reach the image.
    pauser.resume();
    let later = wait_counter(&mem, counted + 1000);
    assert!(later > counted);
    image.read_exact_at(&mut b, COUNTER).unwrap();
    assert_eq!(
        u64::from_le_bytes(b),
        counted,
        "the image is mapped privately"
    );

    // A diff since `again`: exactly the one page the guest writes.
    let diff = dir.join("diff");
    let taken = snapshotter.take(&diff, Kind::Diff, |_, _| {}).unwrap();
    let at_diff: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    running.stop();
    let diff_state = read_state(&diff);
    assert_eq!(
        diff_state.memory.pages.as_deref(),
        Some(
            &[PageRange {
                guest_addr: COUNTER,
                pages: 1
            }][..]
        ),
        "the dirty log holds the counter's page and nothing else"
    );
    assert_eq!(taken.data_bytes, 4096);
    assert_eq!(
        diff_state.memory.parent.as_deref(),
        again.file_name().and_then(|n| n.to_str()),
        "a diff names its parent, which sits beside it"
    );

    // Restored from the diff: the full snapshot under it, then the diff's page.
    let vm = Vm::restore(diff_state, &diff, Arc::new(ExitSignal::new().unwrap())).unwrap();
    let mem = vm.memory().mem.clone();
    let running = vm.start().unwrap();
    let n: u64 = mem.read_obj(GuestAddress(COUNTER)).unwrap();
    assert_eq!(n, at_diff, "the diff's page over its parent's memory");
    running.stop();
    // A diff whose parent is gone is refused with the reason.
    std::fs::remove_file(again.join(STATE_FILE)).unwrap();
    let e = Vm::restore(
        read_state(&diff),
        &diff,
        Arc::new(ExitSignal::new().unwrap()),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("again") && e.contains("No such file"), "{e}");
}

fn connect(sock: &Path) -> impl FnMut(&str) -> serde_json::Value {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if start.elapsed() < Duration::from_secs(20) => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("control socket {}: {e}", sock.display()),
        }
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    move |req: &str| {
        w.write_all(req.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

fn spawn(args: &[&str]) -> std::process::Child {
    Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Through the process and its control socket, with the production seccomp filters: a
/// snapshot, then `--restore --resume` in a new process that runs on, snapshotted again.
/// Damaged snapshots and a snapshot into an existing directory are refused.
#[test]
fn a_snapshot_restores_in_a_new_process_and_bad_ones_are_refused() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("snapshot-process");
    for d in ["one", "two", "three", "four"] {
        let _ = std::fs::remove_dir_all(dir.join(d));
    }
    let kernel = write(&dir, "k.elf", &elf64(&register_guest()));
    let (s1, s2) = (dir.join("a.sock"), dir.join("b.sock"));
    let one = dir.join("one");
    let child = spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "32M",
        "--rng",
        "off",
        "--serial",
        "off",
        "--api-socket",
        s1.to_str().unwrap(),
    ]);
    let mut c = connect(&s1);
    assert_eq!(c(r#"{"op":"version"}"#)["protocol"], 4);
    std::thread::sleep(Duration::from_millis(200));
    // Into a directory that exists: refused, the VM runs on.
    let exists = c(&format!(r#"{{"op":"snapshot","dir":"{}"}}"#, dir.display()));
    assert_eq!(exists["ok"], false, "{exists}");
    assert_eq!(exists["code"], "failed");
    assert!(
        exists["error"].as_str().unwrap().contains("File exists"),
        "{exists}"
    );
    assert_eq!(c(r#"{"op":"state"}"#)["state"], "running");
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","after":"stop"}}"#,
        one.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "stopping");
    assert_eq!(reply["vcpus"], 1);
    assert_eq!(reply["memory_bytes"], 32u64 << 20);
    let out = wait_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let first = read_state(&one).vcpus[0].regs.r15;

    // Restored in a new process with its own control socket; it waits paused.
    let child = spawn(&[
        "--restore",
        one.to_str().unwrap(),
        "--api-socket",
        s2.to_str().unwrap(),
    ]);
    let mut c = connect(&s2);
    let st = c(r#"{"op":"state"}"#);
    assert_eq!(st["state"], "paused", "{st}");
    assert_eq!(st["boot"], "restored");
    // A relative directory is refused (and the filtered VMM lives on).
    let relative = c(r#"{"op":"snapshot","dir":"relative/snap"}"#);
    assert!(
        relative["error"]
            .as_str()
            .unwrap()
            .contains("not an absolute path"),
        "{relative}"
    );
    assert_eq!(c(r#"{"op":"state"}"#)["state"], "paused");
    // A restored VMM has no base for a diff until its first full snapshot.
    let no_base = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","diff":true}}"#,
        dir.join("three").display()
    ));
    assert_eq!(no_base["code"], "conflict", "{no_base}");
    let two = dir.join("two");
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","after":"resume"}}"#,
        two.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["state"], "running");
    // Saved before it ran a single instruction: exactly where the first snapshot left it.
    assert_eq!(
        read_state(&two).vcpus[0].regs.r15,
        first,
        "restored exactly"
    );
    // A restore is a new generation: the VM Generation ID in guest memory changed, and
    // each snapshot's device state holds the one its memory holds.
    let genid = |dir: &Path| -> (String, String) {
        let mut id = [0u8; 16];
        std::fs::File::open(dir.join(MEMORY_FILE))
            .unwrap()
            .read_exact_at(&mut id, quantix_vmm::layout::VMGENID_ADDR.0)
            .unwrap();
        let in_memory: String = id.iter().map(|b| format!("{b:02x}")).collect();
        let saved = read_state(dir)
            .devices
            .iter()
            .find(|d| d.id.starts_with("vmgenid"))
            .map(|d| d.state["id"].as_str().unwrap().to_string())
            .unwrap();
        (in_memory, saved)
    };
    let (g1, s1) = genid(&one);
    let (g2, s2) = genid(&two);
    assert_eq!(g1, s1);
    assert_eq!(g2, s2);
    assert_ne!(g1, g2, "a new generation ID on restore");
    assert_ne!(g1, "0".repeat(32));
    std::thread::sleep(Duration::from_millis(100));
    let three = dir.join("three");
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","diff":true,"after":"stop"}}"#,
        three.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["data_bytes"], 4096, "one page written since: {reply}");
    let out = wait_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let second = read_state(&two).vcpus[0].regs.r15;
    let third = read_state(&three).vcpus[0].regs.r15;
    assert!(
        third > second,
        "it ran between the full and the diff snapshot"
    );
    // The diff restores in a new process (on top of `two`), and runs.
    let s3 = dir.join("c.sock");
    let child = spawn(&[
        "--restore",
        three.to_str().unwrap(),
        "--api-socket",
        s3.to_str().unwrap(),
    ]);
    let mut c = connect(&s3);
    assert_eq!(c(r#"{"op":"state"}"#)["state"], "paused");
    // Saved again at once (paused, `after` keeps it so): the diff's state exactly.
    let four = dir.join("four");
    let _ = std::fs::remove_dir_all(&four);
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}"}}"#,
        four.display()
    ));
    assert_eq!(reply["state"], "paused", "{reply}");
    assert_eq!(
        read_state(&four).vcpus[0].regs.r15,
        third,
        "the diff restored exactly"
    );
    assert_eq!(c(r#"{"op":"resume"}"#)["state"], "running");
    assert_eq!(c(r#"{"op":"shutdown"}"#)["state"], "stopping");
    let out = wait_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    assert_eq!(second, first);

    // With a configuration: its host side (here the control socket) is taken, its guest
    // side must match the snapshot's.
    let mut given = read_state(&one).config;
    let s4 = dir.join("d.sock");
    given.api_socket = Some(s4.clone());
    let cfg = write(
        &dir,
        "given.json",
        serde_json::to_string(&given).unwrap().as_bytes(),
    );
    let child = spawn(&[
        "--restore",
        one.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--resume",
    ]);
    let mut c = connect(&s4);
    assert_eq!(c(r#"{"op":"state"}"#)["state"], "running");
    assert_eq!(c(r#"{"op":"shutdown"}"#)["state"], "stopping");
    let out = wait_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    given.vcpus = 2;
    let cfg = write(
        &dir,
        "bad.json",
        serde_json::to_string(&given).unwrap().as_bytes(),
    );
    let out = wait_limit(
        spawn(&[
            "--restore",
            one.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ]),
        Duration::from_secs(20),
    );
    let (code, _, err) = summary(&out);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("vCPU count (2) differs from the snapshot's (1)"),
        "{err}"
    );

    // Damaged: each refused before the VM runs, with what is wrong (exit status 1).
    let refused = |dir: &Path, want: &str| {
        let out = wait_limit(
            spawn(&["--restore", dir.to_str().unwrap()]),
            Duration::from_secs(20),
        );
        let (code, _, err) = summary(&out);
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(want), "expected {want:?} in: {err}");
    };
    refused(&dir.join("absent"), "No such file");
    let state = std::fs::read(two.join(STATE_FILE)).unwrap();
    let mut flipped = state.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x20;
    std::fs::write(two.join(STATE_FILE), &flipped).unwrap();
    refused(&two, "checksum mismatch");
    std::fs::write(two.join(STATE_FILE), &state[..state.len() - 10]).unwrap();
    refused(&two, "truncated");
    std::fs::write(two.join(STATE_FILE), &state).unwrap();
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(two.join(MEMORY_FILE))
        .unwrap();
    memory.set_len(16 << 20).unwrap();
    refused(&two, "truncated or replaced");
    // A restore takes no VM flags.
    let out = wait_limit(
        spawn(&["--restore", two.to_str().unwrap(), "--memory", "64M"]),
        Duration::from_secs(10),
    );
    assert_eq!(out.status.code(), Some(2));
}

/// Pages of the lazy test's pattern: from 32 MiB, 128 MiB of them, each page holding its
/// own address in its first 8 bytes.
const PATTERN_START: u64 = 0x200_0000;
const PATTERN_END: u64 = 0xA00_0000;
/// The lazy test guest's counter: near the top of its 256 MiB, above everything the pager
/// copies first.
const HIGH_COUNTER: u32 = 0xF00_0000;

/// Writes the pattern, then counts in R15, storing the count at [`HIGH_COUNTER`].
fn pattern_guest() -> Vec<u8> {
    let mut c = vec![0x48, 0xb8]; // mov rax, PATTERN_START
    c.extend(PATTERN_START.to_le_bytes());
    c.extend([0x48, 0x89, 0x00]); // fill: mov [rax], rax
    c.extend([0x48, 0x05, 0x00, 0x10, 0x00, 0x00]); // add rax, 4096
    c.extend([0x48, 0x3d]); // cmp rax, PATTERN_END
    c.extend((PATTERN_END as u32).to_le_bytes());
    c.extend([0x72, 0xef]); // jb fill
    c.extend([0x49, 0xff, 0xc7, 0x4c, 0x89, 0x3c, 0x25]); // loop: inc r15; mov [HIGH_COUNTER], r15
    c.extend(HIGH_COUNTER.to_le_bytes());
    c.extend([0xeb, 0xf3]); // jmp loop
    c
}

/// A lazy restore (`--restore --lazy`) of a chain (a full snapshot and a diff), with the
/// production seccomp filters: the guest runs before its memory is in (it touches its
/// counter, at the top of RAM, long before the pager's copying gets there), goes on
/// counting, and every page of its 128 MiB pattern is back, as a full snapshot of the
/// restored VM shows.
#[test]
fn a_lazy_restore_runs_the_guest_before_its_memory_is_in() {
    if !Path::new("/dev/kvm").exists() {
        eprintln!("skipped: no /dev/kvm");
        return;
    }
    let dir = scratch("snapshot-lazy");
    let kernel = write(&dir, "p.elf", &elf64(&pattern_guest()));
    let (s1, s2) = (dir.join("a.sock"), dir.join("b.sock"));
    let (one, two, three) = (dir.join("one"), dir.join("two"), dir.join("three"));
    let child = spawn(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256M",
        "--rng",
        "off",
        "--serial",
        "off",
        "--api-socket",
        s1.to_str().unwrap(),
    ]);
    let mut c = connect(&s1);
    // The fill takes a moment under emulation: wait until the guest counts.
    let start = Instant::now();
    loop {
        let _ = std::fs::remove_dir_all(&one);
        let reply = c(&format!(r#"{{"op":"snapshot","dir":"{}"}}"#, one.display()));
        assert_eq!(reply["ok"], true, "{reply}");
        if read_state(&one).vcpus[0].regs.r15 > 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guest never counted"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(100));
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","diff":true,"after":"stop"}}"#,
        two.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(reply["data_bytes"].as_u64().unwrap() < 1 << 20, "{reply}");
    let out = wait_limit(child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let saved = read_state(&two).vcpus[0].regs.r15;

    let child = spawn(&[
        "--restore",
        two.to_str().unwrap(),
        "--lazy",
        "--resume",
        "--api-socket",
        s2.to_str().unwrap(),
        "--log-level",
        "info",
    ]);
    let mut c = connect(&s2);
    assert_eq!(c(r#"{"op":"state"}"#)["state"], "running");
    // Long enough for the pager to copy the whole pattern in.
    std::thread::sleep(Duration::from_millis(2000));
    let reply = c(&format!(
        r#"{{"op":"snapshot","dir":"{}","after":"stop"}}"#,
        three.display()
    ));
    assert_eq!(reply["ok"], true, "{reply}");
    let out = wait_limit(child, Duration::from_secs(30));
    let (code, _, log) = summary(&out);
    assert_eq!(code, Some(0), "{log}");
    let after = read_state(&three);
    assert!(
        after.vcpus[0].regs.r15 > saved,
        "the restored guest went on counting ({} then {saved})",
        after.vcpus[0].regs.r15
    );
    // Every page of the pattern came back through the pager.
    let image = std::fs::File::open(three.join(MEMORY_FILE)).unwrap();
    let mut word = [0u8; 8];
    let mut addr = PATTERN_START;
    while addr < PATTERN_END {
        image.read_exact_at(&mut word, addr).unwrap();
        assert_eq!(u64::from_le_bytes(word), addr, "page {addr:#x}");
        addr += 4096;
    }
    // The pager's account: the guest faulted on pages before the copying was done.
    let line = log
        .lines()
        .find(|l| l.contains("every data page of the snapshot is in guest memory"))
        .unwrap_or_else(|| panic!("no pager summary in the log: {log}"));
    let field = |name: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {line}"))
    };
    assert!(field("faults_before_complete") >= 1, "{line}");
    assert!(
        field("pages_copied_ahead") >= (PATTERN_END - PATTERN_START) / 4096 / 2,
        "{line}"
    );
    eprintln!("{line}");
}
