//! A real `quantix-agent` process on this host's /dev/kvm, its gRPC client, and hand-made
//! guests (see vmm/tests/common for how they are built).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use quantix_proto::v1::node_service_client::NodeServiceClient;
use quantix_proto::v1::vm_service_client::VmServiceClient;
use quantix_proto::v1::{
    BootSource, CreateVmRequest, DeleteVmRequest, GetVmRequest, RestartPolicy, StartVmRequest,
    StopVmRequest, Vm, VmEvent, VmSpec, VmState, WatchVmsRequest,
};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};

/// target/debug (or release): where cargo put this test's sibling binaries.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/debug/deps/agent_kvm-xxxx -> target/debug
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// A binary of the workspace; panics with the command to build it when missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build it first (cargo build -p quantix-vmm -p quantix-jailer -p quantix-agent -p quantix-ctl)",
        p.display()
    );
    p
}

/// One request to a VM's VMM on its control socket, and its reply line as JSON.
pub fn vmm_reply(
    state_dir: &Path,
    id: &str,
    request: quantix_vmm_api::control::Request,
) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let sock = api_socket(state_dir, id);
    let mut stream = std::os::unix::net::UnixStream::connect(&sock)
        .unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    stream.write_all(request.to_line().as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// The state a VM's own VMM reports on its control socket (`running`, `paused`...).
pub fn vmm_state(state_dir: &Path, id: &str) -> String {
    let v = vmm_reply(state_dir, id, quantix_vmm_api::control::Request::State {});
    v["state"].as_str().unwrap_or_default().to_string()
}

/// The connections a VM's serial socket has accepted, from its VMM's control socket.
pub fn serial_connections(state_dir: &Path, id: &str) -> u64 {
    let v = vmm_reply(state_dir, id, quantix_vmm_api::control::Request::Metrics {});
    v["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["device"] == "serial"))
        .and_then(|e| e["connections"].as_u64())
        .unwrap_or_default()
}

/// A VM's control socket (in its jail's private directory).
pub fn api_socket(state_dir: &Path, id: &str) -> PathBuf {
    state_dir.join("vms").join(id).join("root/run/api.sock")
}

/// The pid of the process listening on `sock` (the kernel's peer credentials).
pub fn listener_pid(sock: &Path) -> Option<i32> {
    use std::os::fd::AsRawFd;
    let s = std::os::unix::net::UnixStream::connect(sock).ok()?;
    let peer = quantix_agent::access::UnixPeer::of(s.as_raw_fd()).ok()?;
    (peer.pid > 0).then_some(peer.pid)
}

/// Whether /dev/kvm can be used here.
pub fn have_kvm() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// A scratch directory unique to one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qx-agent-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

pub mod asm {
    pub fn mov_dx(port: u16) -> Vec<u8> {
        let mut v = vec![0x66, 0xba];
        v.extend_from_slice(&port.to_le_bytes());
        v
    }
    pub fn print(text: &[u8]) -> Vec<u8> {
        let mut v = mov_dx(0x3f8);
        for b in text {
            v.extend([0xb0, *b, 0xee]);
        }
        v
    }
    /// `hlt; jmp $-1`: park the vCPU (no host CPU spent).
    pub const HALT_LOOP: [u8; 3] = [0xf4, 0xeb, 0xfd];
    /// ACPI S5 through the sleep control register (port 0x600).
    pub fn acpi_poweroff() -> Vec<u8> {
        let mut v = mov_dx(0x600);
        v.extend([0xb0, (5 << 2) | (1 << 5), 0xee]);
        v
    }
    /// `ud2` with no IDT: the guest dies (triple fault, or a KVM error on PVM).
    pub const CRASH: [u8; 2] = [0x0f, 0x0b];
}

/// 64-bit code in a minimal ELF64 executable loaded at 16 MiB.
pub fn elf64(code: &[u8]) -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let entry = LOAD + (EHDR + PHDR) as u64;
    let total = (EHDR + PHDR + code.len()) as u64;
    let mut v = Vec::new();
    v.extend_from_slice(b"\x7fELF");
    v.extend_from_slice(&[2, 1, 1, 0]);
    v.extend_from_slice(&[0; 8]);
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&62u16.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&entry.to_le_bytes());
    v.extend_from_slice(&(EHDR as u64).to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&(EHDR as u16).to_le_bytes());
    v.extend_from_slice(&(PHDR as u16).to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes());
    v.extend_from_slice(&64u16.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&0u16.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(&7u32.to_le_bytes());
    v.extend_from_slice(&0u64.to_le_bytes());
    v.extend_from_slice(&LOAD.to_le_bytes());
    v.extend_from_slice(&LOAD.to_le_bytes());
    v.extend_from_slice(&total.to_le_bytes());
    v.extend_from_slice(&total.to_le_bytes());
    v.extend_from_slice(&0x1000u64.to_le_bytes());
    v.extend_from_slice(code);
    v
}

/// Guest kernels written into `dir`.
pub struct Guests {
    /// Prints "hello from <tag>\n" and halts forever.
    pub idle: PathBuf,
    /// Prints "bye\n" and powers off.
    pub poweroff: PathBuf,
    /// Prints "crash\n" and dies.
    pub crash: PathBuf,
    /// Prints "echo ready\n", then echoes every byte it receives on COM1 (busy polling).
    pub echo: PathBuf,
}

/// About 0.2 s of busy waiting on this host's KVM (PVM emulates each iteration at CPL0 in
/// about 2 us; far less on hardware KVM). The VMM drops serial output while no client is on
/// its socket, and the agent attaches a few ms after the VMM binds it: a guest that prints
/// at its first instruction would print into the void (a real kernel takes longer).
pub fn delay() -> Vec<u8> {
    // mov ecx, 100000; dec ecx; jnz -4
    let mut v = vec![0xb9];
    v.extend_from_slice(&100_000u32.to_le_bytes());
    v.extend([0xff, 0xc9, 0x75, 0xfc]);
    v
}

/// The image directory of the agents these tests start: `images/` beside the state
/// directory.
pub fn images_of(state_dir: &Path) -> PathBuf {
    state_dir.parent().unwrap().join("images")
}

/// Writes the guests into `dir/images` (the image directory of an agent whose state is in
/// `dir/...`).
pub fn guests(dir: &Path) -> Guests {
    let dir = &dir.join("images");
    std::fs::create_dir_all(dir).unwrap();
    let mut idle = delay();
    idle.extend(asm::print(b"hello from guest\n"));
    idle.extend(asm::HALT_LOOP);
    let mut off = delay();
    off.extend(asm::print(b"bye\n"));
    off.extend(asm::acpi_poweroff());
    off.extend(asm::HALT_LOOP);
    let mut crash = delay();
    crash.extend(asm::print(b"crash\n"));
    crash.extend(asm::CRASH);
    let w = |name: &str, code: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, elf64(code)).unwrap();
        p
    };
    let mut echo = delay();
    echo.extend(asm::print(b"echo ready\n"));
    echo.extend([
        0x66, 0xba, 0xfd, 0x03, // mov dx, 0x3fd (line status)
        0xec, // in al, dx
        0xa8, 0x01, // test al, 1 (data ready)
        0x74, 0xf7, // jz back to mov dx, 0x3fd
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xec, // in al, dx
        0xee, // out dx, al
        0xeb, 0xef, // jmp back to the start of the loop
    ]);
    Guests {
        echo: w("echo.elf", &echo),
        idle: w("idle.elf", &idle),
        poweroff: w("poweroff.elf", &off),
        crash: w("crash.elf", &crash),
    }
}

/// A running agent.
pub struct Agent {
    pub child: Option<Child>,
    pub state_dir: PathBuf,
    pub extra: Vec<String>,
    pub name: String,
    /// A cgroup v2 directory the agent starts in (as a systemd unit's would be).
    pub cgroup: Option<PathBuf>,
}

impl Agent {
    /// Starts an agent on `state_dir` (limits: 4 vCPUs, 1024 MiB).
    pub fn start(state_dir: &Path, name: &str) -> Self {
        Self::start_with(state_dir, name, &[])
    }

    pub fn start_with(state_dir: &Path, name: &str, extra: &[&str]) -> Self {
        let mut a = Agent {
            child: None,
            state_dir: state_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            name: name.to_string(),
            cgroup: None,
        };
        a.spawn();
        a
    }

    pub fn socket(&self) -> PathBuf {
        self.state_dir.join("agent.sock")
    }

    /// (Re)starts the agent process.
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.socket());
        std::fs::create_dir_all(images_of(&self.state_dir)).unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.with_extension("agent.log"))
            .unwrap();
        let mut cmd = Command::new(bin("quantix-agent"));
        if let Some(cg) = &self.cgroup {
            use std::os::unix::process::CommandExt;
            let procs =
                std::ffi::CString::new(cg.join("cgroup.procs").as_os_str().as_encoded_bytes())
                    .unwrap();
            // SAFETY: open, write and close are async-signal-safe; `procs` was built
            // before the fork.
            unsafe {
                cmd.pre_exec(move || {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                    if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                    Ok(())
                });
            }
        }
        let child = cmd
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--metrics-listen", "127.0.0.1:0"])
            .arg("--image-dir")
            .arg(images_of(&self.state_dir))
            .arg("--vmm")
            .arg(bin("quantix-vmm"))
            .args([
                "--cgroup-name",
                &format!("qx-test-{}-{}", std::process::id(), self.name),
            ])
            .args([
                "--max-vcpus",
                "4",
                "--max-memory-mib",
                "1024",
                "--log-level",
                "debug",
            ])
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        while !self.socket().exists() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the agent did not come up; see {}",
                self.log_path().display()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.state_dir.with_extension("agent.log")
    }

    /// SIGKILLs the agent (its VMMs keep running).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn client(&self) -> VmServiceClient<Channel> {
        VmServiceClient::new(channel(&self.socket()).await)
    }

    pub async fn node_client(&self) -> NodeServiceClient<Channel> {
        NodeServiceClient::new(channel(&self.socket()).await)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Kill every VMM this agent's state directory names, then the agent.
        if let Ok(entries) = std::fs::read_dir(self.state_dir.join("vms")) {
            for e in entries.flatten() {
                let sock = e.path().join("root/run/api.sock");
                if let Some(pid) = listener_pid(&sock) {
                    // SAFETY: sending SIGKILL to a test VMM.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        self.kill();
    }
}

pub async fn channel(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://agent.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}

/// A spec booting `kernel` with 1 vCPU and 64 MiB.
pub fn spec(name: &str, kernel: &Path, policy: RestartPolicy) -> VmSpec {
    VmSpec {
        name: name.into(),
        vcpus: 1,
        memory_mib: 64,
        boot: Some(BootSource {
            kernel: kernel.display().to_string(),
            ..Default::default()
        }),
        restart_policy: policy as i32,
        ..Default::default()
    }
}

pub async fn create(c: &mut VmServiceClient<Channel>, id: &str, spec: VmSpec, start: bool) -> Vm {
    c.create_vm(CreateVmRequest {
        vm_id: id.into(),
        spec: Some(spec),
        start,
    })
    .await
    .unwrap_or_else(|e| panic!("create {id}: {e}"))
    .into_inner()
}

pub async fn get(c: &mut VmServiceClient<Channel>, id: &str) -> Vm {
    c.get_vm(GetVmRequest { vm_id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("get {id}: {e}"))
        .into_inner()
}

pub fn state(vm: &Vm) -> VmState {
    VmState::try_from(vm.status.as_ref().unwrap().state).unwrap()
}

pub fn pid(vm: &Vm) -> u32 {
    vm.status.as_ref().unwrap().pid
}

/// Polls until the VM is in `want` (or panics after `limit`).
pub async fn wait_state(
    c: &mut VmServiceClient<Channel>,
    id: &str,
    want: VmState,
    limit: Duration,
) -> Vm {
    let start = Instant::now();
    loop {
        let vm = get(c, id).await;
        if state(&vm) == want {
            return vm;
        }
        assert!(
            start.elapsed() < limit,
            "{id} is {:?}, not {want:?}, after {limit:?}: {vm:?}",
            state(&vm)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Collects events from a watch stream until `pred` matches one (panics after `limit`).
pub async fn wait_event(
    stream: &mut tonic::Streaming<VmEvent>,
    limit: Duration,
    mut pred: impl FnMut(&VmEvent) -> bool,
) -> Vec<VmEvent> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(ev))) => {
                let hit = pred(&ev);
                seen.push(ev);
                if hit {
                    return seen;
                }
            }
            other => panic!("no matching event within {limit:?} ({other:?}); seen: {seen:#?}"),
        }
    }
}

pub async fn watch(c: &mut VmServiceClient<Channel>, id: &str) -> tonic::Streaming<VmEvent> {
    c.watch_vms(WatchVmsRequest {
        vm_id: id.into(),
        initial_state: false,
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn start(c: &mut VmServiceClient<Channel>, id: &str) -> Vm {
    c.start_vm(StartVmRequest { vm_id: id.into() })
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e}"))
        .into_inner()
}

pub async fn stop(c: &mut VmServiceClient<Channel>, id: &str) -> Vm {
    c.stop_vm(StopVmRequest {
        vm_id: id.into(),
        timeout_ms: 5000,
        force: false,
    })
    .await
    .unwrap_or_else(|e| panic!("stop {id}: {e}"))
    .into_inner()
}

pub async fn delete(c: &mut VmServiceClient<Channel>, id: &str, force: bool) {
    c.delete_vm(DeleteVmRequest {
        vm_id: id.into(),
        force,
    })
    .await
    .unwrap_or_else(|e| panic!("delete {id}: {e}"));
}

/// Attaches to a VM's console (`replay`: the ring's content first); returns the input
/// sender and the output stream.
pub async fn attach_console(
    c: &mut VmServiceClient<Channel>,
    id: &str,
    replay: bool,
) -> (
    tokio::sync::mpsc::Sender<quantix_proto::v1::ConsoleInput>,
    tonic::Streaming<quantix_proto::v1::ConsoleOutput>,
) {
    use quantix_proto::v1::{console_input, ConsoleAttach, ConsoleInput};
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(ConsoleInput {
        input: Some(console_input::Input::Attach(ConsoleAttach {
            vm_id: id.into(),
            replay,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let out = c
        .attach_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, out)
}

/// Reads the console (with replay) until `text` appears.
pub async fn console_until(
    c: &mut VmServiceClient<Channel>,
    id: &str,
    text: &str,
    limit: Duration,
) -> String {
    // The sender lives until the text is seen: dropping it would end the session.
    let (tx, mut out) = attach_console(c, id, true).await;
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while !String::from_utf8_lossy(&got).contains(text) {
        match tokio::time::timeout_at(deadline, out.next()).await {
            Ok(Some(Ok(m))) => got.extend(m.data),
            other => panic!(
                "console of {id}: {text:?} not seen ({other:?}); got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    drop(tx);
    String::from_utf8_lossy(&got).into_owned()
}

/// What a running VMM was started with: its arguments, the `/proc` path of its
/// `--config /dev/fd/N` descriptor, and the configuration read back from it.
pub fn vmm_config(pid: u32) -> (Vec<String>, PathBuf, quantix_vmm_api::VmConfig) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--config").expect("--config");
    let fd = quantix_hostfs::inherit::fd_of(args[at + 1].as_ref()).expect("--config /dev/fd/N");
    let fd_path = PathBuf::from(format!("/proc/{pid}/fd/{fd}"));
    let config = quantix_vmm_api::VmConfig::from_json(&std::fs::read(&fd_path).unwrap()).unwrap();
    (args, fd_path, config)
}
