//! The real `quantix-vmm` process on this host's /dev/kvm with small hand-made guests:
//! the vCPU run loop, port I/O exits, the serial port and every way a VM ends.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{asm, elf64, firmware16, run_vmm, scratch, summary, vmm_bin, wait_limit, write};

const LIMIT: Duration = Duration::from_secs(60);

fn long_mode_guest(dir: &std::path::Path, name: &str, tail: &[u8]) -> String {
    let mut code = asm::print(b"hello from long mode\n", true);
    code.extend_from_slice(tail);
    code.extend_from_slice(&asm::HALT_LOOP);
    write(dir, name, &elf64(&code)).display().to_string()
}

#[test]
fn long_mode_guest_prints_on_serial_and_powers_off_through_acpi() {
    let dir = scratch("poweroff");
    let kernel = long_mode_guest(&dir, "k.elf", &asm::acpi_poweroff(true));
    let out = run_vmm(&["--kernel", &kernel, "--memory", "64M"], LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert_eq!(stdout, "hello from long mode\n");
    assert!(stderr.contains("reason=\"poweroff\""), "{stderr}");
}

#[test]
fn acpi_reset_register_and_i8042_reset_end_the_process_as_reboot() {
    let dir = scratch("reset");
    for (name, tail) in [
        ("acpi.elf", asm::outb(0x600, 1, true)),
        ("kbd.elf", asm::outb(0x64, 0xfe, true)),
    ] {
        let kernel = long_mode_guest(&dir, name, &tail);
        let out = run_vmm(&["--kernel", &kernel, "--memory", "64M"], LIMIT);
        let (code, stdout, stderr) = summary(&out);
        assert_eq!(code, Some(0), "{name}: {stderr}");
        assert_eq!(stdout, "hello from long mode\n");
        assert!(stderr.contains("reason=\"reboot\""), "{name}: {stderr}");
    }
}

#[test]
fn real_mode_firmware_runs_from_the_reset_vector() {
    let dir = scratch("firmware");
    let mut code = asm::print(b"real mode\n", false);
    code.extend(asm::acpi_poweroff(false));
    code.extend_from_slice(&asm::HALT_LOOP);
    let fw = write(&dir, "fw.bin", &firmware16(&code));
    let out = run_vmm(
        &["--firmware", fw.to_str().unwrap(), "--memory", "16M"],
        LIMIT,
    );
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "real mode\n");
}

#[test]
fn triple_fault_exits_3_with_a_register_dump() {
    let dir = scratch("triple");
    // ud2 with an empty IDT: #UD -> #GP -> #DF -> shutdown.
    let kernel = long_mode_guest(&dir, "k.elf", &[0x0f, 0x0b]);
    let out = run_vmm(&["--kernel", &kernel, "--memory", "64M"], LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(3), "{stderr}");
    assert_eq!(stdout, "hello from long mode\n");
    assert!(
        stderr.contains("TripleFault") && stderr.contains("rip="),
        "{stderr}"
    );
    // The exits before the fault come with it, the shutdown itself last (the guest's
    // output went through the coalesced serial ring without exits).
    assert!(
        stderr.contains("exits to user space (of ") && stderr.contains(" other\n"),
        "{stderr}"
    );
}

#[test]
fn executing_from_unbacked_memory_is_a_kvm_error_exit_4() {
    let dir = scratch("internal");
    // mov eax, 0xd0000000 ; jmp rax  -- into the MMIO hole, where no memory backs the fetch.
    let kernel = long_mode_guest(&dir, "k.elf", &[0xb8, 0x00, 0x00, 0x00, 0xd0, 0xff, 0xe0]);
    let out = run_vmm(&["--kernel", &kernel, "--memory", "64M"], LIMIT);
    let (code, _stdout, stderr) = summary(&out);
    assert_eq!(code, Some(4), "{stderr}");
    assert!(
        stderr.contains("KvmError") && stderr.contains("rip="),
        "{stderr}"
    );
}

/// A VMM process with 64 MiB running `kernel`, its output piped.
fn vmm_process(kernel: &str, extra: &[&str]) -> std::process::Child {
    Command::new(vmm_bin())
        .args(["--kernel", kernel, "--memory", "64M"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Kills the VMM when the test fails before stopping it: a spinning guest would otherwise
/// outlive the test and burn a core.
struct KillOnPanic(u32);

impl Drop for KillOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // SAFETY: kill(2) has no memory effects. The pid is our child's; a test that
            // panics has normally not reaped it yet, so the pid is still the VMM's.
            unsafe { libc::kill(self.0 as i32, libc::SIGKILL) };
        }
    }
}

fn spinning_vmm(cpus: &str, extra: &[&str]) -> (std::process::Child, std::path::PathBuf) {
    let dir = scratch(&format!("spin-{cpus}-{}", extra.len()));
    let kernel = long_mode_guest(&dir, "k.elf", &asm::SPIN);
    let mut args = vec!["--cpus", cpus];
    args.extend_from_slice(extra);
    (vmm_process(&kernel, &args), dir)
}

/// Reads the child's stdout until `needle` appears (the guest is running).
fn await_output(child: &mut std::process::Child, needle: &str) {
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    let start = Instant::now();
    while start.elapsed() < LIMIT {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if line.contains(needle) {
            // Keep draining in the background so the guest never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
            return;
        }
    }
    panic!("guest output {needle:?} not seen");
}

#[test]
fn sigterm_and_sigint_stop_every_vcpu_in_order() {
    for (sig, expected) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let (mut child, _dir) = spinning_vmm("4", &[]);
        let _reaper = KillOnPanic(child.id());
        await_output(&mut child, "hello from long mode");
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
        let out = wait_limit(child, LIMIT);
        let (code, _, stderr) = summary(&out);
        assert_eq!(code, Some(expected), "{stderr}");
        assert!(stderr.contains("stop signal received"), "{stderr}");
    }
}

#[test]
fn control_socket_reports_state_and_shuts_down() {
    let dir = scratch("api");
    let sock = dir.join("api.sock");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let disk = format!("path={},id=data", image.display());
    let (mut child, _d) = spinning_vmm(
        "2",
        &["--api-socket", sock.to_str().unwrap(), "--disk", &disk],
    );
    let _reaper = KillOnPanic(child.id());
    await_output(&mut child, "hello from long mode");
    let mut ask = control(&sock);
    let state = ask(r#"{"op":"state"}"#);
    assert_eq!(state["state"], "running", "{state}");
    assert_eq!(state["vcpus"], 2);
    assert_eq!(state["memory_mib"], 64);
    assert_eq!(state["boot"], "elf");
    // The UART counts a byte just after handing it to stdout, so the test can
    // see the newline before the counter does: poll briefly until they agree.
    let expected_tx = "hello from long mode\n".len() as u64;
    let metrics = metrics_once_serial_sent(&mut ask, expected_tx);
    assert_eq!(metrics["ok"], true, "{metrics}");
    assert_eq!(metrics["vcpus"].as_array().unwrap().len(), 2, "{metrics}");
    assert_eq!(metrics["serial"]["tx_bytes"], expected_tx, "{metrics}");
    // Every byte either exited or was coalesced by KVM (see the coalescing test).
    let exited = metrics["vcpus"][0]["io_exits"].as_u64().unwrap();
    let coalesced = metrics["serial"]["tx_coalesced_bytes"].as_u64().unwrap();
    assert!(exited + coalesced >= 21, "{metrics}");
    // Every virtio device with its counters (the guest drives none of them here).
    let devices = metrics["devices"].as_array().unwrap();
    let kinds: Vec<(&str, &str)> = devices
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["type"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("data", "block"), ("rng", "rng")], "{metrics}");
    assert_eq!(devices[0]["counters"]["reads"], 0, "{metrics}");
    assert_eq!(devices[0]["needs_reset_events"], 0, "{metrics}");
    let bad = ask(r#"{"op":"reboot-the-planet"}"#);
    assert_eq!(bad["ok"], false);
    let stop = ask(r#"{"op":"shutdown"}"#);
    assert_eq!(stop["ok"], true);
    let out = wait_limit(child, LIMIT);
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!sock.exists(), "the socket file is removed on exit");
}

/// A guest that polls the UART (THR-empty interrupt disabled), as Linux does for every
/// kernel message, writes its transmit register without exits: KVM coalesces the writes
/// and the VMM replays them in order, also past a full ring (169 entries), and flushes what
/// a guest that went quiet wrote last. While the guest has the THR-empty interrupt enabled,
/// every write exits again, so that the interrupt comes when the guest waits for it.
#[test]
fn serial_writes_are_coalesced_while_the_guest_polls_the_port() {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    if !kvm.check_extension(kvm_ioctls::Cap::CoalescedPio) {
        eprintln!("skipped: this host's KVM has no KVM_CAP_COALESCED_PIO");
        return;
    }
    let dir = scratch("coalesced");
    let sock = dir.join("api.sock");
    let log = dir.join("serial.log");
    let lines = |tag: char, n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("{tag}{i:03}\n").into_bytes())
            .collect()
    };
    // 400 polled bytes (more than the ring holds), 150 with the interrupt on, 5 in
    // loopback mode (each exits too: the byte raises a received-data interrupt), 150 polled.
    const LOOPED: &[u8] = b"loop!";
    let (polled, interrupt, quiet) = (lines('a', 80), lines('b', 30), lines('c', 30));
    let mut code = asm::print(&polled, true);
    code.extend(asm::outb(0x3f9, 0x02, true)); // IER: THR-empty interrupt on
    code.extend(asm::print(&interrupt, true));
    code.extend(asm::outb(0x3f9, 0x00, true)); // IER: off again
    code.extend(asm::outb(0x3fc, 0x10, true)); // MCR: loopback, bytes come back as input
    code.extend(asm::print(LOOPED, true));
    code.extend(asm::outb(0x3fc, 0x00, true)); // MCR: loopback off
    code.extend(asm::print(&quiet, true));
    code.extend_from_slice(&asm::SPIN); // no exit ever again
    let kernel = write(&dir, "k.elf", &elf64(&code)).display().to_string();
    let serial = format!("file={}", log.display());
    let child = vmm_process(
        &kernel,
        &["--serial", &serial, "--api-socket", sock.to_str().unwrap()],
    );
    let _reaper = KillOnPanic(child.id());
    // The socket file exists a moment before the VMM listens on it: retry the connect.
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ask = control(&sock);
    let total = (polled.len() + interrupt.len() + quiet.len()) as u64;
    // The last 150 bytes reach the device only on the VMM's flush tick.
    let metrics = metrics_once_serial_sent(&mut ask, total);
    assert_eq!(metrics["serial"]["tx_bytes"], total, "{metrics}");
    let coalesced = metrics["serial"]["tx_coalesced_bytes"].as_u64().unwrap();
    let exits = metrics["vcpus"][0]["io_exits"].as_u64().unwrap();
    // A full ring turns one write into an exit (which replays the ring first).
    let polled_bytes = (polled.len() + quiet.len()) as u64;
    assert!(
        coalesced <= polled_bytes && coalesced >= polled_bytes - 10,
        "{metrics}"
    );
    // Plus the four IER and MCR writes.
    let exiting = (interrupt.len() + LOOPED.len() + 4) as u64;
    assert!(exits >= exiting && exits <= exiting + 12, "{metrics}");
    assert_eq!(metrics["serial"]["rx_bytes"], 0, "{metrics}");
    assert_eq!(ask(r#"{"op":"shutdown"}"#)["ok"], true);
    let out = wait_limit(child, LIMIT);
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    let written = std::fs::read(&log).unwrap();
    let expected = [polled, interrupt, quiet].concat();
    assert!(
        written == expected,
        "serial output out of order or incomplete:\n{}",
        String::from_utf8_lossy(&written)
    );
}

/// The VMM's metrics once the UART counted `tx_bytes` bytes (or after 10 s).
fn metrics_once_serial_sent(
    ask: &mut impl FnMut(&str) -> serde_json::Value,
    tx_bytes: u64,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = ask(r#"{"op":"metrics"}"#);
        if m["serial"]["tx_bytes"].as_u64() == Some(tx_bytes) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Sends control-socket requests on one connection.
fn control(sock: &std::path::Path) -> impl FnMut(&str) -> serde_json::Value {
    let stream = UnixStream::connect(sock).expect("control socket is listening");
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut w = stream;
    move |req: &str| {
        w.write_all(req.as_bytes()).unwrap();
        w.write_all(b"\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    }
}

/// The power button's interrupt is I/O APIC pin 23. A guest that never unmasks it (no
/// ACPI) is reported as not listening, and the press does not stop the VM; once the guest
/// unmasks the pin, as Linux's GED driver does, the press reports it as listening.
#[test]
fn power_button_reports_whether_the_guest_enabled_its_interrupt() {
    // mov eax, 0xfec00000 (I/O APIC); mov dword [rax], 0x3e (IOREGSEL: low half of
    // redirection entry 23); mov dword [rax+0x10], 0x30 (IOWIN: vector 0x30, unmasked).
    let unmask: &[u8] = &[
        0xb8, 0x00, 0x00, 0xc0, 0xfe, 0xc7, 0x00, 0x3e, 0, 0, 0, 0xc7, 0x40, 0x10, 0x30, 0, 0, 0,
    ];
    for (name, tail) in [("deaf", Vec::new()), ("listening", unmask.to_vec())] {
        let dir = scratch(&format!("button-{name}"));
        let sock = dir.join("api.sock");
        let mut code = tail;
        code.extend(asm::print(b"ready\n", true));
        code.extend_from_slice(&asm::SPIN);
        let kernel = long_mode_guest(&dir, "k.elf", &code);
        let mut child = vmm_process(&kernel, &["--api-socket", sock.to_str().unwrap()]);
        let _reaper = KillOnPanic(child.id());
        await_output(&mut child, "ready");
        let mut ask = control(&sock);
        let press = ask(r#"{"op":"power-button"}"#);
        assert_eq!(press["ok"], true, "{name}: {press}");
        assert_eq!(
            press["guest_enabled"],
            name == "listening",
            "{name}: {press}"
        );
        // The press is the guest's to act on; this guest does not, so the VM runs on.
        let state = ask(r#"{"op":"state"}"#);
        assert_eq!(state["state"], "running", "{name}: {state}");
        assert_eq!(ask(r#"{"op":"shutdown"}"#)["ok"], true);
        let out = wait_limit(child, LIMIT);
        let (code, _, stderr) = summary(&out);
        assert_eq!(code, Some(0), "{name}: {stderr}");
        assert!(stderr.contains("ACPI power button pressed"), "{stderr}");
    }
}

/// Pause parks every vCPU (the guest, which exits to the VMM on each loop round, makes
/// no progress) and resume lets them run again; the control socket answers throughout,
/// and a paused VM still stops in order.
#[test]
fn pause_stops_every_vcpu_and_resume_runs_them_again() {
    let dir = scratch("pause");
    let sock = dir.join("api.sock");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    // L: out 0x80, al; jmp L (every round is a port I/O exit to the VMM).
    let mut code = asm::print(b"ready\n", true);
    code.extend_from_slice(&[0xe6, 0x80, 0xeb, 0xfc]);
    let kernel = write(&dir, "k.elf", &elf64(&code)).display().to_string();
    let disk = format!("path={}", image.display());
    let api = [
        "--cpus",
        "2",
        "--disk",
        &disk,
        "--api-socket",
        sock.to_str().unwrap(),
    ];
    let mut child = vmm_process(&kernel, &api);
    let _reaper = KillOnPanic(child.id());
    await_output(&mut child, "ready");
    let mut ask = control(&sock);
    let exits = |m: &serde_json::Value| m["vcpus"][0]["io_exits"].as_u64().unwrap();
    let progress = |ask: &mut dyn FnMut(&str) -> serde_json::Value| {
        let a = exits(&ask(r#"{"op":"metrics"}"#));
        std::thread::sleep(Duration::from_millis(300));
        exits(&ask(r#"{"op":"metrics"}"#)) - a
    };
    assert!(progress(&mut ask) > 0, "the guest does not run");
    for round in 0..2 {
        let p = ask(r#"{"op":"pause"}"#);
        assert_eq!(p["ok"], true, "round {round}: {p}");
        assert_eq!(ask(r#"{"op":"state"}"#)["state"], "paused");
        assert_eq!(progress(&mut ask), 0, "round {round}: a paused vCPU ran");
        // Pausing a paused VM is fine.
        assert_eq!(ask(r#"{"op":"pause"}"#)["ok"], true);
        let r = ask(r#"{"op":"resume"}"#);
        assert_eq!(r["state"], "running", "round {round}: {r}");
        assert!(
            progress(&mut ask) > 0,
            "round {round}: the guest did not resume"
        );
    }
    assert_eq!(ask(r#"{"op":"pause"}"#)["ok"], true);
    assert_eq!(ask(r#"{"op":"shutdown"}"#)["ok"], true);
    let out = wait_limit(child, LIMIT);
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(0), "a paused VM must stop in order: {stderr}");
    assert!(
        stderr.contains("VM paused") && stderr.contains("VM resumed"),
        "{stderr}"
    );
}

#[test]
fn serial_to_a_file_appends_and_off_discards() {
    let dir = scratch("serialmodes");
    let kernel = long_mode_guest(&dir, "k.elf", &asm::acpi_poweroff(true));
    let log = dir.join("console.log");
    let file_arg = format!("file={}", log.display());
    for _ in 0..2 {
        let out = run_vmm(
            &[
                "--kernel", &kernel, "--memory", "64M", "--serial", &file_arg,
            ],
            LIMIT,
        );
        let (code, stdout, stderr) = summary(&out);
        assert_eq!(code, Some(0), "{stderr}");
        assert_eq!(stdout, "");
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "hello from long mode\n".repeat(2)
    );
    let out = run_vmm(
        &["--kernel", &kernel, "--memory", "64M", "--serial", "off"],
        LIMIT,
    );
    let (code, stdout, stderr) = summary(&out);
    assert_eq!((code, stdout.as_str()), (Some(0), ""), "{stderr}");
    // A serial file that cannot be opened is refused before the guest runs.
    let out = run_vmm(
        &["--kernel", &kernel, "--serial", "file=/nonexistent/dir/log"],
        LIMIT,
    );
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("cannot open output file"), "{stderr}");
}

/// A guest that echoes every byte its UART receives until a newline, then powers off.
fn echo_guest(dir: &std::path::Path) -> String {
    let mut echo = vec![0x66, 0xba, 0xfd, 0x03]; // top: mov dx, 0x3fd (LSR)
    echo.extend_from_slice(&[0xec, 0xa8, 0x01, 0x74, 0xfb]); // in al, dx; test al, 1; jz -5
    echo.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03, 0xec, 0xee]); // mov dx, 0x3f8; in; out
    echo.extend_from_slice(&[0x3c, 0x0a, 0x75, 0xed]); // cmp al, '\n'; jne top
    echo.extend(asm::acpi_poweroff(true));
    long_mode_guest(dir, "echo.elf", &echo)
}

#[test]
fn serial_on_a_unix_socket_echoes_through_the_guest() {
    let dir = scratch("serialsock");
    let kernel = echo_guest(&dir);
    let sock = dir.join("serial.sock");
    let serial = format!("socket={}", sock.display());
    let child = Command::new(vmm_bin())
        .args(["--kernel", &kernel, "--memory", "64M", "--serial", &serial])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _reaper = KillOnPanic(child.id());
    let start = Instant::now();
    let mut stream = loop {
        match UnixStream::connect(&sock) {
            Ok(s) => break s,
            Err(_) if start.elapsed() < LIMIT => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("serial socket never appeared: {e}"),
        }
    };
    stream.write_all(b"ping over a socket\n").unwrap();
    // The greeting went out before we attached: the VMM kept it for the first client.
    let mut seen = Vec::new();
    std::io::Read::read_to_end(&mut stream, &mut seen).unwrap();
    let seen = String::from_utf8_lossy(&seen);
    assert_eq!(seen, "hello from long mode\nping over a socket\n");
    let out = wait_limit(child, LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stdout, "",
        "nothing on stdout when the serial port is on a socket"
    );
    assert!(!sock.exists(), "the socket file is removed on exit");
}

#[test]
fn serial_on_a_pty_echoes_through_the_guest() {
    let dir = scratch("serialpty");
    let kernel = echo_guest(&dir);
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", &kernel, "--memory", "64M", "--serial", "pty"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _reaper = KillOnPanic(child.id());
    // The pty's path is in the VMM's log.
    let mut log = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let pty = loop {
        line.clear();
        assert_ne!(log.read_line(&mut line).unwrap(), 0, "no pty in the log");
        if let Some(rest) = line.split("pty=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::sink()));
    let mut term = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&pty)
        .unwrap();
    term.write_all(b"ping over a pty\n").unwrap();
    let mut reader = BufReader::new(term);
    let mut echoed = String::new();
    while !echoed.contains("ping over a pty") {
        echoed.clear();
        assert_ne!(reader.read_line(&mut echoed).unwrap(), 0);
    }
    let out = wait_limit(child, LIMIT);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn standard_input_reaches_the_guest_through_the_uart() {
    let dir = scratch("stdin");
    let kernel = echo_guest(&dir);
    let mut child = Command::new(vmm_bin())
        .args(["--kernel", &kernel, "--memory", "64M"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _reaper = KillOnPanic(child.id());
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"ping from the host\n")
        .unwrap();
    let out = wait_limit(child, LIMIT);
    let (code, stdout, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "hello from long mode\nping from the host\n");
}

/// Every thread of a running VMM is under a seccomp filter, and NO_NEW_PRIVS is set.
#[test]
fn every_thread_runs_under_a_seccomp_filter() {
    let dir = scratch("seccomp-threads");
    let kernel = long_mode_guest(&dir, "k.elf", &asm::HALT_LOOP);
    let sock = dir.join("api.sock");
    let serial = format!("socket={}", dir.join("serial.sock").display());
    let mut child = vmm_process(
        &kernel,
        &[
            "--cpus",
            "2",
            "--api-socket",
            sock.to_str().unwrap(),
            "--serial",
            &serial,
        ],
    );
    let _reaper = KillOnPanic(child.id());
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    // The control socket is up before the vCPU threads start: wait for them.
    let task_names = || -> Vec<String> {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    };
    while !task_names().iter().any(|n| n == "vcpu1") && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut names = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{}/task", child.id()))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(t.path().join("status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k}:")))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        let name = field("Name");
        assert_eq!(field("Seccomp"), "2", "thread {name} is not filtered");
        assert_eq!(field("NoNewPrivs"), "1", "thread {name}");
        names.push(name);
    }
    for want in ["vcpu0", "vcpu1", "launcher", "serial-socket"] {
        assert!(
            names.iter().any(|n| n == want),
            "no {want} thread in {names:?}"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A call outside a thread's allow-list stops the VMM: exit status 8, an exit record
/// with the reason `seccomp`, the syscall and the thread.
#[test]
fn a_forbidden_syscall_stops_the_vmm_with_the_seccomp_reason() {
    let dir = scratch("seccomp-probe");
    let kernel = long_mode_guest(&dir, "k.elf", &asm::HALT_LOOP);
    for (kind, thread) in [("vcpu", "vcpu0"), ("vmm", "main")] {
        let record = dir.join(format!("exit-{kind}.json"));
        let child = vmm_process(
            &kernel,
            &[
                "--seccomp-probe",
                kind,
                "--exit-file",
                record.to_str().unwrap(),
            ],
        );
        let out = wait_limit(child, LIMIT);
        let (code, _, stderr) = summary(&out);
        assert_eq!(code, Some(8), "{kind}: {stderr}");
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        assert_eq!(rec["reason"], "seccomp", "{rec}");
        assert_eq!(rec["code"], 8, "{rec}");
        let detail = rec["detail"].as_str().unwrap();
        assert!(
            detail.contains(&format!("syscall {} ", libc::SYS_getppid))
                && detail.contains(&format!("on thread {thread} (filter {kind})")),
            "{detail}"
        );
        assert!(stderr.contains("seccomp: refused syscall"), "{stderr}");
    }
    // `off` installs nothing: the same forbidden call passes, and the guest powers off.
    let off = long_mode_guest(&dir, "off.elf", &asm::acpi_poweroff(true));
    let out = wait_limit(
        vmm_process(&off, &["--seccomp", "off", "--seccomp-probe", "vcpu"]),
        LIMIT,
    );
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
}

/// A client that half-closes right after its request still gets the answer (20 of 20), and
/// a `shutdown` sent that way, without its newline, stops the VM.
#[test]
fn half_closed_control_requests_are_answered() {
    let dir = scratch("half-close");
    let kernel = long_mode_guest(&dir, "k.elf", &asm::HALT_LOOP);
    let sock = dir.join("api.sock");
    let child = vmm_process(&kernel, &["--api-socket", sock.to_str().unwrap()]);
    let _reaper = KillOnPanic(child.id());
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ask = |req: &[u8]| -> String {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(req).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        reply
    };
    let answered = (0..20)
        .filter(|_| ask(b"{\"op\":\"state\"}\n").contains("\"state\""))
        .count();
    assert_eq!(answered, 20);
    let reply = ask(b"{\"op\":\"shutdown\"}");
    assert!(reply.contains("\"ok\":true"), "{reply}");
    let out = wait_limit(child, LIMIT);
    let (code, _, stderr) = summary(&out);
    assert_eq!(code, Some(0), "{stderr}");
}

/// A guest that repeats a mistake in a loop (here: accepting a virtio feature it was not
/// offered, thousands of times a second) leaves a few log lines and a rising counter, not
/// megabytes of log.
#[test]
fn a_guest_hammering_a_bad_register_is_rate_limited_in_the_log() {
    let dir = scratch("log-flood");
    // mov ebx, 0xd0000000 (the first virtio-mmio device: rng)
    let mut code = vec![0xbb, 0x00, 0x00, 0x00, 0xd0];
    code.extend([
        0xc7, 0x43, 0x24, 0x01, 0x00, 0x00, 0x00, // DriverFeaturesSel = 1
        0xc7, 0x43, 0x20, 0x00, 0x00, 0x00, 0x80, // DriverFeatures: bit 63, never offered
        0xc7, 0x43, 0x70, 0x0b, 0x00, 0x00, 0x00, // Status = ACK | DRIVER | FEATURES_OK
        0xeb, 0xe9, // jmp back to DriverFeaturesSel
    ]);
    let kernel = long_mode_guest(&dir, "k.elf", &code);
    let sock = dir.join("api.sock");
    let child = vmm_process(&kernel, &["--api-socket", sock.to_str().unwrap()]);
    let _reaper = KillOnPanic(child.id());
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ask = control(&sock);
    let events = |m: &serde_json::Value| {
        m["guest_log"]
            .as_array()
            .and_then(|a| a.iter().find(|k| k["kind"] == "virtio-features"))
            .map(|k| {
                (
                    k["events"].as_u64().unwrap(),
                    k["suppressed"].as_u64().unwrap(),
                )
            })
            .unwrap_or((0, 0))
    };
    // Until the guest has tripped it a few hundred times.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut ev, mut sup) = (0, 0);
    while ev < 500 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        (ev, sup) = events(&ask(r#"{"op":"metrics"}"#));
    }
    assert!(ev >= 500, "the guest tripped the check {ev} times");
    std::thread::sleep(Duration::from_millis(200));
    let (ev2, sup2) = events(&ask(r#"{"op":"metrics"}"#));
    assert!(
        ev2 > ev && sup2 > sup,
        "the counters keep rising: {ev}/{sup} then {ev2}/{sup2}"
    );
    assert_eq!(ask(r#"{"op":"shutdown"}"#)["ok"], true);
    let out = wait_limit(child, LIMIT);
    let (_, _, stderr) = summary(&out);
    let lines = stderr.matches("driver accepted features").count() as u64;
    // The first, then 5 a minute: at most two minutes' worth in this test.
    assert!(
        (1..=12).contains(&lines),
        "{lines} log lines for {ev2} events:\n{stderr}"
    );
    assert!(stderr.contains("suppressed="), "{stderr}");
}
