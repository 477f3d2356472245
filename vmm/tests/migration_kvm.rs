//! Live migration between two quantix-vmm processes on this host's /dev/kvm, with a
//! hand-made guest that checks every page of its memory itself: pass `k` reads each
//! page's first word, expects `k - 1` (it wrote that in the pass before), and writes `k`;
//! a page that comes back stale or lost after the move stops it with `X` on COM1. Each
//! pass ends with `P`. After a migration the destination's guest must go on passing, and
//! a snapshot of the destination's memory must show the two values with one boundary.
//! Failures (a destination killed mid-transfer, a cancel, a destination that is not
//! there, a hostile destination) leave the source running with its data intact.

// Test code: a failed unwrap is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{elf64, scratch, summary, vmm_bin, wait_limit, write};

/// Guest memory.
const MEMORY_MIB: u64 = 128;
/// The pages the guest checks and writes: from 32 MiB (above its code at 16 MiB) to the
/// end of its RAM.
const BUF_START: u64 = 32 << 20;
const BUF_END: u64 = MEMORY_MIB << 20;

/// The checking guest (see the module's comment). RBX holds the pass number.
fn dirtying_guest() -> Vec<u8> {
    let mut c = Vec::new();
    c.extend([0x48, 0xc7, 0xc3, 0x01, 0, 0, 0]); // mov rbx, 1
    let pass = c.len();
    c.extend([0x48, 0xc7, 0xc7]); // mov rdi, BUF_START
    c.extend((BUF_START as u32).to_le_bytes());
    let page = c.len();
    c.extend([0x48, 0x8b, 0x07]); // mov rax, [rdi]
    c.extend([0x48, 0x8d, 0x4b, 0xff]); // lea rcx, [rbx - 1]
    c.extend([0x48, 0x39, 0xc8]); // cmp rax, rcx
    c.extend([0x0f, 0x85]); // jne bad (rel32, patched)
    let jne = c.len();
    c.extend([0; 4]);
    c.extend([0x48, 0x89, 0x1f]); // mov [rdi], rbx
    c.extend([0x48, 0x81, 0xc7, 0x00, 0x10, 0, 0]); // add rdi, 4096
    c.extend([0x48, 0x81, 0xff]); // cmp rdi, BUF_END
    c.extend((BUF_END as u32).to_le_bytes());
    c.push(0x72); // jb page
    c.push((page as i64 - (c.len() as i64 + 1)) as i8 as u8);
    c.extend([0x66, 0xba, 0xf8, 0x03, 0xb0, b'P', 0xee]); // COM1 <- 'P'
    c.extend([0x48, 0xff, 0xc3]); // inc rbx
    c.push(0xe9); // jmp pass
    let to = pass as i64 - (c.len() as i64 + 4);
    c.extend((to as i32).to_le_bytes());
    let bad = c.len();
    let rel = (bad as i64 - (jne as i64 + 4)) as i32;
    c[jne..jne + 4].copy_from_slice(&rel.to_le_bytes());
    c.extend([0x66, 0xba, 0xf8, 0x03, 0xb0, b'X', 0xee]); // COM1 <- 'X'
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    c
}

/// What a VMM's COM1 (its stdout) said: passes and failures.
#[derive(Clone, Default)]
struct Console(Arc<Mutex<(u64, u64)>>);

impl Console {
    fn attach(mut out: ChildStdout) -> Console {
        let c = Console::default();
        let seen = c.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut s = seen.lock().unwrap();
                s.0 += buf[..n].iter().filter(|b| **b == b'P').count() as u64;
                s.1 += buf[..n].iter().filter(|b| **b == b'X').count() as u64;
            }
        });
        c
    }
    fn passes(&self) -> u64 {
        self.0.lock().unwrap().0
    }
    fn failures(&self) -> u64 {
        self.0.lock().unwrap().1
    }
    /// Waits for `n` more passes than `from`, failing on a guest-detected error.
    fn wait_passes(&self, from: u64, n: u64, what: &str) {
        let start = Instant::now();
        while self.passes() < from + n {
            assert_eq!(
                self.failures(),
                0,
                "{what}: the guest found a page it did not write"
            );
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "{what}: the guest made {} passes, not {n}",
                self.passes() - from
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            self.failures(),
            0,
            "{what}: the guest found a page it did not write"
        );
    }
}

struct Vmm {
    child: Child,
    console: Console,
    control: PathBuf,
}

fn spawn(args: &[&str], control: &Path) -> Vmm {
    let mut child = Command::new(vmm_bin())
        .args(args)
        .args(["--api-socket", control.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = Console::attach(child.stdout.take().unwrap());
    Vmm {
        child,
        console,
        control: control.to_path_buf(),
    }
}

/// The source: the checking guest booted, its exit record at `dir/source.exit`.
fn source(dir: &Path) -> Vmm {
    let kernel = write(dir, "guest.elf", &elf64(&dirtying_guest()));
    let exit = dir.join("source.exit");
    let _ = std::fs::remove_file(&exit);
    spawn(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            &format!("{MEMORY_MIB}M"),
            "--rng",
            "off",
            "--serial",
            "stdout",
            "--exit-file",
            exit.to_str().unwrap(),
        ],
        &dir.join("source.sock"),
    )
}

/// A destination listening on `dir/incoming.sock`.
fn destination(dir: &Path) -> Vmm {
    destination_with(dir, &[])
}

/// The same, with more flags.
fn destination_with(dir: &Path, flags: &[&str]) -> Vmm {
    let incoming = dir.join("incoming.sock");
    let _ = std::fs::remove_file(&incoming);
    let mut args = vec!["--incoming", incoming.to_str().unwrap()];
    args.extend(flags);
    let v = spawn(&args, &dir.join("destination.sock"));
    let start = Instant::now();
    while !incoming.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the destination does not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    v
}

fn call(sock: &Path, req: &str) -> serde_json::Value {
    try_call(sock, req).unwrap_or_else(|e| panic!("{}: {e}", sock.display()))
}

/// One request; an error when the VMM went away meanwhile (a completed source exits).
fn try_call(sock: &Path, req: &str) -> std::io::Result<serde_json::Value> {
    let start = Instant::now();
    let stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    start.elapsed() < Duration::from_secs(20),
                    "{}: {e}",
                    sock.display()
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    let mut w = stream.try_clone()?;
    w.write_all(req.as_bytes())?;
    w.write_all(b"\n")?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

/// Polls `migration` until the phase is no longer under way; returns the last status,
/// or null once the VMM is gone (a completed source exits at once).
fn wait_migration(sock: &Path, limit: Duration) -> serde_json::Value {
    let start = Instant::now();
    loop {
        if UnixStream::connect(sock).is_err() {
            return serde_json::Value::Null;
        }
        let Ok(s) = try_call(sock, r#"{"op":"migration"}"#) else {
            return serde_json::Value::Null;
        };
        let phase = s["phase"].as_str().unwrap_or("").to_string();
        if !["connecting", "pre-copy", "switching", "post-copy"].contains(&phase.as_str()) {
            return s;
        }
        assert!(start.elapsed() < limit, "the migration did not end: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn has_kvm() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("skipped: no /dev/kvm");
    false
}

/// The first word of every page of the checking buffer in a memory image.
fn page_words(image: &Path) -> Vec<u64> {
    let f = std::fs::File::open(image).unwrap();
    (BUF_START..BUF_END)
        .step_by(4096)
        .map(|a| {
            let mut b = [0u8; 8];
            f.read_exact_at(&mut b, a).unwrap();
            u64::from_le_bytes(b)
        })
        .collect()
}

/// The pass the guest was in when `snap` was taken: every page of the checking buffer
/// holds `k` up to one page and `k - 1` after it.
fn checked_pass(snap: &Path) -> u64 {
    let words = page_words(&snap.join("memory"));
    let k = words[0];
    let boundary = words.iter().position(|w| *w != k).unwrap_or(words.len());
    assert!(
        words[boundary..].iter().all(|w| *w + 1 == k),
        "pages after the first {boundary} hold {} (expected {})",
        words[boundary..].iter().find(|w| **w + 1 != k).unwrap(),
        k - 1
    );
    k
}

/// The VM Generation ID in a snapshot's state.
fn generation_id(snap: &Path) -> String {
    let text = std::fs::read_to_string(snap.join("vmstate")).unwrap();
    let (_, body) = text.split_once('\n').unwrap();
    let state: serde_json::Value = serde_json::from_str(body).unwrap();
    let dev = state["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["id"] == "vmgenid:0")
        .unwrap_or_else(|| panic!("no vmgenid in {}", snap.display()));
    dev["state"]["id"].as_str().unwrap().to_string()
}

#[test]
fn a_guest_dirtying_every_page_migrates_and_every_page_is_intact() {
    if !has_kvm() {
        return;
    }
    let dir = scratch("migration-dirty");
    let src = source(&dir);
    src.console.wait_passes(0, 3, "the source before migrating");
    // The VM Generation ID before: a snapshot's state holds it.
    let before = dir.join("before");
    let _ = std::fs::remove_dir_all(&before);
    let reply = call(
        &src.control,
        &format!(r#"{{"op":"snapshot","dir":"{}"}}"#, before.display()),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let dst = destination(&dir);
    let reply = call(
        &src.control,
        &format!(
            r#"{{"op":"migrate","to":"{}"}}"#,
            dir.join("incoming.sock").display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(reply["phase"], "connecting");
    // The source exits as soon as it completes: its last status, if it was seen, is not
    // a failure.
    let last = wait_migration(&src.control, Duration::from_secs(120));
    assert!(last.is_null() || last["phase"] == "completed", "{last}");

    // The source exits 0 with the reason `migrated` and the downtime; the guest goes on at
    // the destination.
    let passes_at_source = src.console.passes();
    let out = wait_limit(src.child, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let rec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("source.exit")).unwrap()).unwrap();
    assert_eq!(rec["reason"], "migrated", "{rec}");
    let (_, _, log) = summary(&out);
    let done = log
        .lines()
        .find(|l| l.contains("migration completed"))
        .unwrap_or_else(|| panic!("no completion in the log: {log}"));
    let field = |name: &str| -> u64 {
        let at = done
            .find(&format!("{name}="))
            .unwrap_or_else(|| panic!("{name} in {done}"));
        done[at + name.len() + 1..]
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (downtime, total) = (field("downtime_ms"), field("total_ms"));
    let rounds = log.matches("pre-copy round done").count();
    eprintln!(
        "migration: downtime {downtime} ms, total {total} ms, {rounds} rounds ({})",
        rec["detail"]
    );
    assert_eq!(
        rec["detail"],
        format!("downtime {downtime} ms, total {total} ms")
    );
    // Not a timing target (benches/ measure it): a bound that only a broken switch breaks.
    assert!(downtime < 5_000, "{done}");
    assert_eq!(src.console.failures(), 0);
    dst.console
        .wait_passes(0, 3, "the destination after the switch");
    let st = call(&dst.control, r#"{"op":"state"}"#);
    assert_eq!(st["state"], "running", "{st}");

    // Every page on the destination: pass k written up to one page, k - 1 after it.
    let snap = dir.join("after");
    let _ = std::fs::remove_dir_all(&snap);
    let reply = call(
        &dst.control,
        &format!(
            r#"{{"op":"snapshot","dir":"{}","after":"stop"}}"#,
            snap.display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    // The same VM, moved: its generation ID stays (a restore would change it).
    assert_eq!(generation_id(&snap), generation_id(&before));
    let k = checked_pass(&snap);
    assert!(
        k > passes_at_source,
        "the destination's passes go on from the source's"
    );
    let out = wait_limit(dst.child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    assert_eq!(dst.console.failures(), 0);
    // The timeline of the switch, for whoever reads the test's output.
    for l in log.lines().chain(summary(&out).2.lines()) {
        if l.contains("migration") || l.contains("paused") || l.contains("VM running") {
            eprintln!("  {l}");
        }
    }
}

#[test]
fn a_failed_or_cancelled_migration_leaves_the_source_running_intact() {
    if !has_kvm() {
        return;
    }
    let dir = scratch("migration-fail");
    let src = source(&dir);
    src.console.wait_passes(0, 2, "the source");
    let incoming = dir.join("incoming.sock");
    let migrate = |policy: &str| {
        call(
            &src.control,
            &format!(
                r#"{{"op":"migrate","to":"{}"{policy}}}"#,
                incoming.display()
            ),
        )
    };

    // Nobody listens.
    assert_eq!(migrate("")["ok"], true);
    let s = wait_migration(&src.control, Duration::from_secs(30));
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("connecting"), "{s}");

    // The destination killed mid-transfer (the link held to 20 MB/s so that it is).
    let mut dst = destination(&dir);
    let slow = r#","policy":{"bandwidth_bytes_per_s":20000000}"#;
    assert_eq!(migrate(slow)["ok"], true);
    let start = Instant::now();
    while call(&src.control, r#"{"op":"migration"}"#)["sent_bytes"]
        .as_u64()
        .unwrap()
        < 4 << 20
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no memory goes out"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Busy: a second migration, a pause, a snapshot wait for this one.
    let busy = migrate("");
    assert_eq!(busy["code"], "conflict", "{busy}");
    assert_eq!(call(&src.control, r#"{"op":"pause"}"#)["code"], "conflict");
    dst.child.kill().unwrap();
    let _ = dst.child.wait();
    let s = wait_migration(&src.control, Duration::from_secs(60));
    assert_eq!(s["phase"], "failed", "{s}");
    assert_eq!(
        dst.console.passes(),
        0,
        "the destination never ran the guest"
    );
    let p = src.console.passes();
    src.console
        .wait_passes(p, 2, "the source after the destination died");
    assert_eq!(call(&src.control, r#"{"op":"state"}"#)["state"], "running");

    // Cancelled: the source runs on; the destination exits with an error, never having run.
    let dst = destination(&dir);
    assert_eq!(migrate(slow)["ok"], true);
    std::thread::sleep(Duration::from_millis(300));
    let c = call(&src.control, r#"{"op":"migrate-cancel"}"#);
    assert_eq!(c["ok"], true, "{c}");
    let s = wait_migration(&src.control, Duration::from_secs(60));
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("cancelled"), "{s}");
    let out = wait_limit(dst.child, Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0), "{:?}", summary(&out));
    let (_, _, stderr) = summary(&out);
    assert!(
        stderr.contains("source gave up") && stderr.contains("cancelled"),
        "{stderr}"
    );
    assert_eq!(
        dst.console.passes(),
        0,
        "the destination never ran the guest"
    );
    let p = src.console.passes();
    src.console.wait_passes(p, 2, "the source after the cancel");
    assert_eq!(
        call(&src.control, r#"{"op":"migrate-cancel"}"#)["code"],
        "conflict",
        "nothing to cancel"
    );

    // A hostile destination: garbage instead of `ready`.
    let _ = std::fs::remove_file(&incoming);
    let listener = UnixListener::bind(&incoming).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 16];
        s.read_exact(&mut hello).unwrap();
        s.write_all(&[0xff; 64]).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    });
    assert_eq!(migrate("")["ok"], true);
    let s = wait_migration(&src.control, Duration::from_secs(30));
    fake.join().unwrap();
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(s["error"].as_str().unwrap().contains("magic"), "{s}");
    let p = src.console.passes();
    src.console
        .wait_passes(p, 2, "the source after a hostile destination");

    // A source that is no quantix-vmm: the destination refuses it and exits.
    let dst = destination(&dir);
    let mut s = UnixStream::connect(&incoming).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let out = wait_limit(dst.child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{:?}", summary(&out));
    let (_, _, stderr) = summary(&out);
    assert!(stderr.contains("magic"), "{stderr}");

    let _ = call(&src.control, r#"{"op":"shutdown"}"#);
    let out = wait_limit(src.child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    assert_eq!(src.console.failures(), 0);
}

/// The inode of the guest-memory memfd `pid` maps (`memfd:quantix-guest-ram`).
fn memfd_inode(pid: u32) -> String {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| l.contains("memfd:quantix-guest-ram"))
        .unwrap_or_else(|| panic!("no guest memfd mapped by {pid}"));
    line.split_whitespace().nth(4).unwrap().to_string()
}

#[test]
fn a_local_migration_hands_the_memory_over_without_copying_it() {
    if !has_kvm() {
        return;
    }
    let dir = scratch("migration-local");
    let src = source(&dir);
    src.console.wait_passes(0, 2, "the source before migrating");
    let inode = memfd_inode(src.child.id());
    let dst = destination(&dir);
    let reply = call(
        &src.control,
        &format!(
            r#"{{"op":"migrate","to":"{}","policy":{{"share_memory":true}}}}"#,
            dir.join("incoming.sock").display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let last = wait_migration(&src.control, Duration::from_secs(60));
    assert!(last.is_null() || last["phase"] == "completed", "{last}");
    let out = wait_limit(src.child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let (_, _, log) = summary(&out);
    let done = log
        .lines()
        .find(|l| l.contains("the destination runs the VM"))
        .unwrap_or_else(|| panic!("no switch in the log: {log}"));
    assert!(done.contains("sent_bytes=0"), "nothing is copied: {done}");
    assert!(!log.contains("pre-copy round"), "no pre-copy: {log}");
    eprintln!(
        "local migration: {}",
        done.split("INFO").nth(1).unwrap_or(done)
    );
    // The destination maps the very memfd the source had.
    assert_eq!(memfd_inode(dst.child.id()), inode, "the same memory object");
    dst.console
        .wait_passes(0, 3, "the destination after the switch");
    let _ = call(&dst.control, r#"{"op":"shutdown"}"#);
    let out = wait_limit(dst.child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    assert_eq!(dst.console.failures(), 0);

    // A VM restored from a snapshot maps it privately: its memory cannot be handed over.
    let snap = dir.join("snap");
    let _ = std::fs::remove_dir_all(&snap);
    let src = source(&dir);
    src.console.wait_passes(0, 1, "a second source");
    let r = call(
        &src.control,
        &format!(
            r#"{{"op":"snapshot","dir":"{}","after":"stop"}}"#,
            snap.display()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    let _ = wait_limit(src.child, Duration::from_secs(20));
    let restored = spawn(
        &["--restore", snap.to_str().unwrap(), "--resume"],
        &dir.join("restored.sock"),
    );
    restored.console.wait_passes(0, 1, "the restored source");
    let dst = destination(&dir);
    let r = call(
        &restored.control,
        &format!(
            r#"{{"op":"migrate","to":"{}","policy":{{"share_memory":true}}}}"#,
            dir.join("incoming.sock").display()
        ),
    );
    assert_eq!(r["ok"], true, "{r}");
    let s = wait_migration(&restored.control, Duration::from_secs(30));
    assert_eq!(s["phase"], "failed", "{s}");
    assert!(
        s["error"]
            .as_str()
            .unwrap()
            .contains("cannot be handed over"),
        "{s}"
    );
    let p = restored.console.passes();
    restored
        .console
        .wait_passes(p, 1, "the restored source after the refusal");
    let out = wait_limit(dst.child, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "{:?}", summary(&out));
    let _ = call(&restored.control, r#"{"op":"shutdown"}"#);
    let _ = wait_limit(restored.child, Duration::from_secs(20));
}

#[test]
fn a_guest_that_does_not_converge_moves_by_post_copy_with_every_page_intact() {
    if !has_kvm() {
        return;
    }
    let dir = scratch("migration-postcopy");
    let src = source(&dir);
    src.console.wait_passes(0, 2, "the source before migrating");
    // The userfaultfd from the device, as a jailed destination gets it (by descriptor).
    let device = ["--userfaultfd", "/dev/userfaultfd"];
    let dst = if Path::new(device[1]).exists() {
        destination_with(&dir, &device)
    } else {
        destination(&dir)
    };
    // One round and no throttle: the guest dirties its 96 MiB faster than that converges.
    let policy = r#"{"max_rounds":1,"auto_converge":false,"post_copy":true}"#;
    let reply = call(
        &src.control,
        &format!(
            r#"{{"op":"migrate","to":"{}","policy":{policy}}}"#,
            dir.join("incoming.sock").display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let last = wait_migration(&src.control, Duration::from_secs(120));
    assert!(last.is_null() || last["phase"] == "completed", "{last}");
    let out = wait_limit(src.child, Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let (_, _, log) = summary(&out);
    let done = log
        .lines()
        .find(|l| l.contains("post-copy complete"))
        .unwrap_or_else(|| panic!("no post-copy in the log: {log}"));
    eprintln!("post-copy: {}", done.split("INFO").nth(1).unwrap_or(done));
    // The guest goes on at the destination, checking every page as it goes.
    dst.console
        .wait_passes(0, 3, "the destination after a post-copy switch");
    let snap = dir.join("after");
    let _ = std::fs::remove_dir_all(&snap);
    let reply = call(
        &dst.control,
        &format!(
            r#"{{"op":"snapshot","dir":"{}","after":"stop"}}"#,
            snap.display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    checked_pass(&snap);
    let out = wait_limit(dst.child, Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{:?}", summary(&out));
    let (_, _, dlog) = summary(&out);
    assert!(
        dlog.contains("post-copy complete: every page is here"),
        "{dlog}"
    );
    assert_eq!(dst.console.failures(), 0);
}

#[test]
fn a_source_lost_during_post_copy_stops_the_destination_with_the_reason() {
    if !has_kvm() {
        return;
    }
    let dir = scratch("migration-postcopy-lost");
    let mut src = source(&dir);
    src.console.wait_passes(0, 2, "the source before migrating");
    let dst = destination(&dir);
    // Post-copy at once after round 0, the link held to 20 MB/s: the background copy of
    // the missing pages takes seconds.
    let policy = r#"{"max_rounds":0,"auto_converge":false,"post_copy":true,"bandwidth_bytes_per_s":20000000}"#;
    let reply = call(
        &src.control,
        &format!(
            r#"{{"op":"migrate","to":"{}","policy":{policy}}}"#,
            dir.join("incoming.sock").display()
        ),
    );
    assert_eq!(reply["ok"], true, "{reply}");
    let start = Instant::now();
    loop {
        let s = call(&src.control, r#"{"op":"migration"}"#);
        if s["phase"] == "post-copy" {
            break;
        }
        assert!(
            ["connecting", "pre-copy", "switching"].contains(&s["phase"].as_str().unwrap()),
            "{s}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no post-copy: {s}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    src.child.kill().unwrap();
    let _ = src.child.wait();
    // The destination cannot go on without the pages: it stops with the reason, in time.
    let out = wait_limit(dst.child, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(7), "{:?}", summary(&out));
    let (_, _, log) = summary(&out);
    assert!(log.contains("post-copy failed with"), "{log}");
}
