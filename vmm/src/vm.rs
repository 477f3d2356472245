//! Building a VM from its configuration: KVM VM, guest memory, interrupt controllers,
//! devices, boot payload and vCPUs; then running and stopping it.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use quantix_devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use quantix_devices::legacy::serial::{SerialDevice, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
use quantix_devices::legacy::IrqTrigger;
use quantix_devices::power::AcpiPowerDevice;
use quantix_devices::{Bus, BusError};
use thiserror::Error;
use tracing::{error, info, warn};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiConfig, AcpiError};
use crate::boot::{self, BootError, BootInfo};
use crate::chardev::{self, ChardevHandle};
use crate::coalesced::SerialTxCoalescer;
use crate::config::{BootSource, SerialMode, VmConfig};
use crate::cpu::cpuid::{self, CpuidConfig};
use crate::cpu::{msrs, regs, IoBuses, PauseGate, Vcpu, VcpuHandle};
use crate::exit::ExitSignal;
use crate::layout::{self, ACPI_POWER_PORT};
use crate::pause::Pauser;
use crate::power_button::PowerButton;

/// Errors while building or starting a VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm is absent.
    #[error("/dev/kvm does not exist: this host has no KVM (load the kvm module, or enable nested virtualization)")]
    KvmMissing,
    /// /dev/kvm cannot be opened by this user.
    #[error("permission denied opening /dev/kvm: run as a member of the group that owns it (usually kvm)")]
    KvmPermission,
    /// Another failure opening /dev/kvm.
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(io::Error),
    /// A KVM capability the VMM needs is missing.
    #[error("this KVM lacks the capability {0}, which quantix-vmm requires")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be allocated.
    #[error("cannot allocate {mib} MiB of guest memory: {reason}")]
    Memory {
        /// Size asked for.
        mib: u64,
        /// Why.
        reason: String,
    },
    /// Loading the boot payload failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// Writing ACPI tables failed.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// Writing the MP table failed.
    #[error(transparent)]
    MpTable(#[from] crate::mptable::MpTableError),
    /// Two devices claim one range.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A serial or console endpoint (file, pty, socket) cannot be opened.
    #[error(transparent)]
    Chardev(#[from] chardev::ChardevError),
    /// A host resource (eventfd, thread) could not be created.
    #[error("cannot create {what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A disk image cannot be used.
    #[error(transparent)]
    Disk(#[from] quantix_virtio::block::BlockError),
    /// A TAP device cannot be used.
    #[error(transparent)]
    Tap(#[from] quantix_virtio::net::TapError),
    /// The vsock device cannot be set up.
    #[error(transparent)]
    Vsock(#[from] quantix_virtio::vsock::VsockError),
    /// More virtio devices than interrupt lines.
    #[error("{count} virtio devices asked for; at most {max} fit")]
    TooManyDevices {
        /// Devices asked for.
        count: usize,
        /// Devices that fit.
        max: usize,
    },
    /// Writing the initial vCPU state into guest memory failed.
    #[error("cannot write boot tables into guest memory: {0}")]
    BootTables(#[from] vm_memory::GuestMemoryError),
}

fn kvm_err(op: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

/// Opens the KVM device (`/dev/kvm`, or an inherited `/dev/fd/N` in a jail), with errors
/// that say what to do.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    if quantix_hostfs::inherit::fd_of(path).is_some() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let file = quantix_hostfs::inherit::open(path, quantix_hostfs::Access::ReadWrite)
            .map_err(VmError::KvmOpen)?;
        // SAFETY: `file` is an open descriptor we own; Kvm takes it over. A descriptor that
        // is not KVM fails its first ioctl (the API version check below).
        let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
        if kvm.get_api_version() != 12 {
            return Err(VmError::KvmOpen(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not the KVM device", path.display()),
            )));
        }
        return Ok(kvm);
    }
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::KvmOpen(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in the path",
        ))
    })?;
    match Kvm::new_with_path(&c) {
        Ok(kvm) => Ok(kvm),
        Err(e) if e.errno() == libc::ENOENT => Err(VmError::KvmMissing),
        Err(e) if e.errno() == libc::EACCES || e.errno() == libc::EPERM => {
            Err(VmError::KvmPermission)
        }
        Err(e) => Err(VmError::KvmOpen(io::Error::from_raw_os_error(e.errno()))),
    }
}

fn check_caps(kvm: &Kvm) -> Result<(), VmError> {
    for (cap, name) in [
        (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
        (Cap::Irqfd, "KVM_CAP_IRQFD"),
        (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
        (Cap::Pit2, "KVM_CAP_PIT2"),
        (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
        (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
        (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    Ok(())
}

/// A built VM, not yet running.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    mem: Arc<GuestMemoryMmap>,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    serial: Arc<Mutex<SerialDevice>>,
    serial_input: Option<OwnedFd>,
    serial_tx: Option<Arc<SerialTxCoalescer>>,
    chardevs: Vec<ChardevHandle>,
    device_metrics: Vec<crate::virtio::DeviceMetrics>,
    power_button: Arc<PowerButton>,
    gate: Arc<PauseGate>,
    pauser: Arc<Pauser>,
    /// What was booted.
    pub boot: BootInfo,
    config: VmConfig,
}

/// A running VM.
pub struct RunningVm {
    _fd: Arc<VmFd>,
    _mem: Arc<GuestMemoryMmap>,
    handles: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    /// The serial port, for console input.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// What the guest reads on its serial port (standard input, a pty, a socket client).
    pub serial_input: Option<OwnedFd>,
    /// The serial port's coalesced transmit writes (None when KVM cannot coalesce).
    serial_tx: Option<Arc<SerialTxCoalescer>>,
    serial_flusher: Option<std::thread::JoinHandle<()>>,
    _chardevs: Vec<ChardevHandle>,
}

impl Vm {
    /// Builds the VM described by `config`, failing before any guest code runs on bad input.
    pub fn build(config: &VmConfig, exit: Arc<ExitSignal>) -> Result<Vm, VmError> {
        let kvm = open_kvm(&config.kvm)?;
        check_caps(&kvm)?;
        // Read the firmware before allocating anything: a bad file is the likelier failure.
        let firmware = match &config.boot {
            BootSource::Firmware(path) => Some(boot::read_firmware(path)?),
            BootSource::Kernel { .. } => None,
        };
        // Standard input goes to the serial port when it is on stdout, else to the console.
        let serial_end = chardev::open(
            &config.serial,
            "serial",
            config.serial == SerialMode::Stdout,
        )?;
        let (serial_out, mut serial_end) = serial_end.into_parts();
        let serial_input = serial_end.input.take();
        let mut chardevs = vec![serial_end];

        let fd = Arc::new(kvm.create_vm().map_err(kvm_err("CREATE_VM"))?);
        // Intel VMX needs a TSS region below 4 GiB; other KVM flavours ignore or refuse it.
        if let Err(e) = fd.set_tss_address(0xfffb_d000) {
            warn!(error = %e, "KVM_SET_TSS_ADDR failed; continuing (only Intel VMX needs it)");
        }

        let mem_size = config.memory.bytes();
        let mut ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(mem_size)
            .into_iter()
            .map(|(a, s)| (a, s as usize))
            .collect();
        if let Some(fw) = &firmware {
            ranges.push((fw.base, fw.bytes.len()));
        }
        let mem =
            Arc::new(
                GuestMemoryMmap::<()>::from_ranges(&ranges).map_err(|e| VmError::Memory {
                    mib: config.memory.0,
                    reason: e.to_string(),
                })?,
            );
        for (slot, region) in mem.iter().enumerate() {
            let region_desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mmap owned by `mem`, which the Vm (and later
            // RunningVm) keeps alive for as long as the VM fd exists.
            unsafe { fd.set_user_memory_region(region_desc) }
                .map_err(kvm_err("SET_USER_MEMORY_REGION"))?;
        }
        if let Some(fw) = &firmware {
            mem.write_slice(&fw.bytes, fw.base)?;
        }

        fd.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("CREATE_PIT2"))?;
        let power_button = Arc::new(PowerButton::new(fd.clone(), layout::GED_GSI)?);

        // Devices on the port I/O bus.
        let mut pio = Bus::new();
        let host_err = |what| move |source| VmError::Host { what, source };
        let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
        fd.register_irqfd(&serial_evt, COM1_IRQ)
            .map_err(kvm_err("IRQFD (serial)"))?;
        let serial_irq = serial_evt.try_clone().map_err(host_err("serial eventfd"))?;
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            IrqTrigger::new(serial_irq),
            serial_out,
        )));
        pio.insert(serial.clone(), COM1_PORT_BASE, COM1_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(I8042::new(exit.clone()))),
            I8042_PORT_BASE,
            I8042_PORT_LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(AcpiPowerDevice::new(exit.clone()))),
            u64::from(ACPI_POWER_PORT),
            1,
        )?;
        let pio = Arc::new(pio);

        // Virtio devices on the MMIO bus.
        let mut mmio = Bus::new();
        let mut virtio_devices: Vec<Box<dyn quantix_virtio::VirtioDevice>> = Vec::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let name = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
            let block =
                quantix_virtio::block::Block::open(&name, &disk.path, disk.readonly, &name)?
                    .with_engine(disk.aio)
                    .with_rate_limit(disk.rate_limit);
            info!(disk = %name, path = %disk.path.display(), readonly = disk.readonly, aio = disk.aio.name(), sectors = block.capacity_sectors(), "disk attached");
            virtio_devices.push(Box::new(block));
        }
        for (i, net) in config.nets.iter().enumerate() {
            use quantix_virtio::net::{random_mac, Net, Tap};
            let tap = match &net.backend {
                crate::config::NetBackend::Tap(name) => Tap::open(name)?,
                crate::config::NetBackend::Fd(fd) => Tap::from_fd(*fd)?,
            };
            let mac = net.mac.unwrap_or_else(random_mac);
            let card = Net::new(&format!("net{i}"), tap, mac).with_rate_limit(net.rate_limit);
            info!(
                device = format_args!("net{i}"),
                tap = card.tap_name(),
                mac = format_args!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
                ),
                "network card attached"
            );
            virtio_devices.push(Box::new(card));
        }
        if config.console != SerialMode::Off {
            let stdin = config.console == SerialMode::Stdout && config.serial != SerialMode::Stdout;
            let (sink, mut end) = chardev::open(&config.console, "console", stdin)?.into_parts();
            let input = end.input.take();
            chardevs.push(end);
            virtio_devices.push(Box::new(quantix_virtio::console::Console::new(sink, input)));
        }
        if config.rng {
            virtio_devices.push(Box::new(quantix_virtio::rng::Rng::new()));
        }
        if let Some(v) = &config.vsock {
            let dev = quantix_virtio::vsock::Vsock::new(v.cid, &v.socket)?;
            info!(cid = v.cid, socket = %v.socket.display(), "vsock attached");
            virtio_devices.push(Box::new(dev));
        }
        let attached = crate::virtio::attach(&fd, &mem, &mut mmio, virtio_devices)?;
        let (virtio_mmio, device_metrics) = (attached.descs, attached.metrics);
        let gate = Arc::new(PauseGate::new());
        let pauser = Arc::new(Pauser::new(gate.clone(), attached.transports, fd.clone()));
        let mmio = Arc::new(mmio);

        // The boot payload and the tables that describe the machine.
        let rsdp = acpi::write(
            &mem,
            &AcpiConfig {
                vcpus: config.vcpus,
                virtio_mmio,
                ged_gsi: layout::GED_GSI,
            },
        )?;
        crate::mptable::write(&mem, config.vcpus)?;
        let boot = boot::load_linux(&mem, mem_size, &config.boot, rsdp)?;

        // vCPUs.
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
        let msr_list = kvm
            .get_msr_index_list()
            .map_err(kvm_err("GET_MSR_INDEX_LIST"))?;
        let boot_msrs = msrs::boot_msrs(msr_list.as_slice());
        let cpuid_cfg = CpuidConfig {
            vcpus: config.vcpus,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let mut vcpus = Vec::with_capacity(config.vcpus.into());
        let mut buses = IoBuses {
            pio: pio.clone(),
            mmio: mmio.clone(),
            serial_tx: None,
        };
        for index in 0..config.vcpus {
            let vcpu = fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("CREATE_VCPU"))?;
            let mut cpuid: CpuId = supported.clone();
            cpuid::normalize(&mut cpuid, index, &cpuid_cfg);
            vcpu.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
            let msrs = msrs::to_msrs(&boot_msrs).map_err(|e| VmError::Host {
                what: "MSR list",
                source: io::Error::other(format!("{e:?}")),
            })?;
            let written = vcpu.set_msrs(&msrs).map_err(kvm_err("SET_MSRS"))?;
            if written != boot_msrs.len() {
                warn!(
                    vcpu = index,
                    written,
                    wanted = boot_msrs.len(),
                    "KVM accepted only some boot MSRs"
                );
            }
            vcpu.set_fpu(&regs::boot_fpu())
                .map_err(kvm_err("SET_FPU"))?;
            let mut lapic = vcpu.get_lapic().map_err(kvm_err("GET_LAPIC"))?;
            regs::set_lint(&mut lapic);
            vcpu.set_lapic(&lapic).map_err(kvm_err("SET_LAPIC"))?;
            if index == 0 {
                // The coalesced ring is per VM; any vCPU fd maps it.
                let (side_effects, counters) = serial
                    .lock()
                    .map(|s| (s.tx_side_effects(), s.counters()))
                    .map_err(|_| VmError::Host {
                        what: "serial port",
                        source: io::Error::other("lock poisoned"),
                    })?;
                buses.serial_tx =
                    SerialTxCoalescer::new(fd.clone(), &vcpu, pio.clone(), side_effects, counters)
                        .map(Arc::new);
                let sregs = vcpu.get_sregs().map_err(kvm_err("GET_SREGS"))?;
                if let Some((r, s)) = regs::boot_state(&mem, boot.entry, sregs)? {
                    vcpu.set_sregs(&s).map_err(kvm_err("SET_SREGS"))?;
                    vcpu.set_regs(&r).map_err(kvm_err("SET_REGS"))?;
                }
            }
            vcpus.push(Vcpu::new(
                index,
                vcpu,
                buses.clone(),
                exit.clone(),
                stop.clone(),
                gate.clone(),
            ));
        }
        info!(
            vcpus = config.vcpus,
            memory_mib = config.memory.0,
            entry = ?boot.entry,
            format = ?boot.format,
            last_addr = format_args!("{:#x}", mem.last_addr().raw_value()),
            "VM built"
        );
        Ok(Vm {
            _kvm: kvm,
            fd,
            mem,
            vcpus,
            exit,
            stop,
            serial,
            serial_input,
            serial_tx: buses.serial_tx,
            chardevs,
            device_metrics,
            power_button,
            gate,
            pauser,
            boot,
            config: config.clone(),
        })
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Live handles on the VM's counters.
    pub fn metrics(&self) -> crate::metrics::VmMetrics {
        crate::metrics::VmMetrics {
            vcpus: self.vcpus.iter().map(Vcpu::counters).collect(),
            serial: self.serial.lock().map(|s| s.counters()).unwrap_or_default(),
            devices: self.device_metrics.clone(),
            endpoints: self
                .chardevs
                .iter()
                .zip(["serial", "console"])
                .map(|(c, role)| (role, c.counters.clone()))
                .collect(),
        }
    }

    /// The guest's ACPI power button.
    pub fn power_button(&self) -> Arc<PowerButton> {
        self.power_button.clone()
    }

    /// Pause and resume of the VM.
    pub fn pauser(&self) -> Arc<Pauser> {
        self.pauser.clone()
    }

    /// The exit signal the VM reports to.
    pub fn exit_signal(&self) -> Arc<ExitSignal> {
        self.exit.clone()
    }

    /// Starts every vCPU thread.
    pub fn start(self) -> Result<RunningVm, VmError> {
        crate::cpu::register_kick_handler().map_err(|e| VmError::Host {
            what: "vCPU kick signal handler",
            source: io::Error::from_raw_os_error(e.errno()),
        })?;
        let mut running = RunningVm {
            _fd: self.fd,
            _mem: self.mem,
            handles: Vec::with_capacity(self.vcpus.len()),
            stop: self.stop,
            gate: self.gate,
            serial: self.serial,
            serial_input: self.serial_input,
            serial_tx: self.serial_tx,
            serial_flusher: None,
            _chardevs: self.chardevs,
        };
        let failed = |running: RunningVm, what, source| {
            running.stop();
            Err(VmError::Host { what, source })
        };
        for vcpu in self.vcpus {
            match vcpu.spawn() {
                Ok(h) => running.handles.push(h),
                Err(source) => return failed(running, "vCPU thread", source),
            }
        }
        if let Some(tx) = &running.serial_tx {
            match tx.spawn_flusher(running.stop.clone()) {
                Ok(h) => running.serial_flusher = Some(h),
                Err(source) => return failed(running, "serial flush thread", source),
            }
        }
        Ok(running)
    }
}

impl RunningVm {
    /// Stops every vCPU and waits for its thread; no thread is left behind.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        // A paused VM stops too: parked vCPU threads go on to see the stop flag.
        self.gate.release();
        for h in &self.handles {
            h.kick();
        }
        for h in self.handles {
            h.join();
        }
        if let Some(flusher) = self.serial_flusher {
            flusher.thread().unpark();
            if flusher.join().is_err() {
                error!("serial flush thread panicked");
            }
        }
        // What the guest wrote last without an exit (a panic message, say).
        if let Some(tx) = &self.serial_tx {
            tx.replay();
        }
        if let Ok(mut s) = self.serial.lock() {
            s.flush();
        }
    }

    /// Total vCPU exits so far.
    pub fn exit_count(&self) -> u64 {
        self.handles
            .iter()
            .map(|h| h.counters.exits.load(Ordering::Relaxed))
            .sum()
    }
}
