//! Building a VM from its configuration, in named steps that a restore reuses: the KVM
//! VM, guest memory, the interrupt controllers, the devices, the vCPUs, and (for a boot,
//! not a restore) the boot payload and the boot vCPU's registers. Then running and
//! stopping it.

use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use quantix_devices::legacy::i8042::{I8042, I8042_PORT_BASE, I8042_PORT_LEN};
use quantix_devices::legacy::serial::{SerialDevice, COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
use quantix_devices::legacy::IrqTrigger;
use quantix_devices::power::AcpiPowerDevice;
use tracing::{error, info, warn};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiConfig};
use crate::boot::{self, BootInfo, FirmwareImage};
use crate::chardev::{self, ChardevHandle};
use crate::config::{BootSource, NetBackend, SerialMode, VmConfig};
use crate::cpu::cpuid::{self, CpuidConfig};
use crate::cpu::{msrs, regs, PauseGate, Vcpu, VcpuHandle};
use crate::device_manager::coalesced::SerialTxCoalescer;
use crate::device_manager::legacy::{Uart, UartPort};
use crate::device_manager::power_button::{Ged, PowerButton};
use crate::device_manager::vmgenid::VmGenId;
use crate::device_manager::{DeviceId, DeviceManager, DeviceSetup};
use crate::error::{kvm_err, VmError};
use crate::exit::ExitSignal;
use crate::kvm::{check_caps, open_kvm};
use crate::layout::{self, ACPI_POWER_PORT};
use crate::memory::{self, GuestMemory, GuestRam};
use crate::pause::Pauser;
use crate::snapshot::take::Snapshotter;
use crate::snapshot::{self, SnapshotState};

/// A built VM, not yet running.
pub struct Vm {
    _kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    vcpus: Vec<Vcpu>,
    exit: Arc<ExitSignal>,
    stop: Arc<AtomicBool>,
    devices: Arc<DeviceManager>,
    serial_input: Option<OwnedFd>,
    chardevs: Vec<ChardevHandle>,
    power_button: Arc<PowerButton>,
    gate: Arc<PauseGate>,
    pauser: Arc<Pauser>,
    /// What was booted (`None` for a restored VM).
    pub boot: Option<BootInfo>,
    config: VmConfig,
    snapshotter: Arc<Snapshotter>,
    /// A lazily restored VM's pager: its stop flag and thread.
    pager: Option<snapshot::lazy::Running>,
}

/// How a restore brings the snapshot's memory back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum RestoreMemory {
    /// Map the full snapshot's image privately and copy the diffs over it, before the
    /// guest runs.
    #[default]
    Mapped,
    /// Serve each page on first touch through a userfaultfd made from `device` (an
    /// inherited `/dev/fd/N` of `/dev/userfaultfd`; `None`: `/dev/userfaultfd`, else the
    /// syscall), copying the rest in behind (`snapshot::lazy`).
    Lazy {
        /// The userfaultfd device.
        device: Option<std::path::PathBuf>,
    },
}

/// A running VM.
pub struct RunningVm {
    _fd: Arc<VmFd>,
    _mem: Arc<GuestMemory>,
    handles: Vec<VcpuHandle>,
    stop: Arc<AtomicBool>,
    gate: Arc<PauseGate>,
    devices: Arc<DeviceManager>,
    /// The serial port, for console input.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// What the guest reads on its serial port (standard input, a pty, a socket client).
    pub serial_input: Option<OwnedFd>,
    serial_flusher: Option<std::thread::JoinHandle<()>>,
    _chardevs: Vec<ChardevHandle>,
    pager: Option<snapshot::lazy::Running>,
}

/// The host ends of the serial port and the console, opened before anything else.
struct Endpoints {
    serial_out: quantix_devices::legacy::serial::SerialSink,
    serial_input: Option<OwnedFd>,
    chardevs: Vec<ChardevHandle>,
}

impl Vm {
    /// Builds the VM described by `config` and loads its boot payload, failing before
    /// any guest code runs on bad input.
    pub fn build(config: &VmConfig, exit: Arc<ExitSignal>) -> Result<Vm, VmError> {
        let kvm = open_kvm(&config.kvm)?;
        check_caps(&kvm)?;
        // Read the firmware before allocating anything: a bad file is the likelier failure.
        let firmware = match &config.boot {
            BootSource::Firmware(path) => Some(boot::read_firmware(path)?),
            BootSource::Kernel { .. } => None,
        };
        let endpoints = open_endpoints(config)?;
        let fd = Arc::new(create_vm(&kvm)?);
        let ram = create_memory(&fd, config, firmware.as_ref())?;
        let mut vm = assemble(kvm, fd, ram, config, exit, endpoints, Arrival::Boot)?;
        let boot = load_boot(&vm.ram.mem, config, &vm.devices, firmware, &vm.vcpus)?;
        info!(
            vcpus = config.vcpus,
            memory_mib = config.memory.0,
            entry = ?boot.entry,
            format = ?boot.format,
            devices = ?vm.devices.ids(),
            last_addr = format_args!("{:#x}", vm.ram.mem.last_addr().raw_value()),
            "VM built"
        );
        vm.devices
            .boot()
            .map_err(|e| VmError::from(snapshot::SnapshotError::Other(e.to_string())))?;
        vm.boot = Some(boot);
        Ok(vm)
    }

    /// Builds the VM saved in the snapshot directory `dir` (whose state, already read and
    /// checked, is `state`; its `config` may have been adjusted by the caller, e.g. a new
    /// control socket) with the same steps as a boot, then loads every saved state
    /// instead of a boot payload: memory mapped privately (copy-on-write) from the
    /// snapshot's image, the devices, the interrupt controllers, PIT and clock, and each
    /// vCPU (on its own thread as it starts). The VM starts paused: `start` it, then
    /// resume it through its [`Pauser`].
    pub fn restore(state: SnapshotState, dir: &Path, exit: Arc<ExitSignal>) -> Result<Vm, VmError> {
        Self::restore_with(state, dir, exit, RestoreMemory::Mapped)
    }

    /// Restores a snapshot with its memory brought back as `memory` says.
    pub fn restore_with(
        state: SnapshotState,
        dir: &Path,
        exit: Arc<ExitSignal>,
        memory: RestoreMemory,
    ) -> Result<Vm, VmError> {
        let config = state.config.clone();
        let kvm = open_kvm(&config.kvm)?;
        check_caps(&kvm)?;
        let fits = crate::cpu::state::check_xsave_size(xsave2_size(&kvm))
            .map_err(snapshot::SnapshotError::from)?;
        // A diff stands on its parents: the full snapshot at the root is mapped, each
        // diff's pages are copied over it, oldest first, this one's last.
        let chain = snapshot::load_chain(&state, dir)?;
        let (root_state, root_dir) = match chain.first() {
            Some((s, d)) => (s, d.as_path()),
            None => (&state, dir),
        };
        let image = snapshot::memory::open_image(
            &root_dir.join(&root_state.memory.file),
            &root_state.memory,
        )
        .map_err(snapshot::SnapshotError::from)?;
        let endpoints = open_endpoints(&config)?;
        let fd = Arc::new(create_vm(&kvm)?);
        let regions: Vec<(GuestAddress, usize, u64)> = state
            .memory
            .regions
            .iter()
            .map(|r| (GuestAddress(r.guest_addr), r.size as usize, r.file_offset))
            .collect();
        let diffs = chain
            .iter()
            .skip(1)
            .map(|(s, d)| (s, d.as_path()))
            .chain((!chain.is_empty()).then_some((&state, dir)));
        let (ram, pager) = match memory {
            RestoreMemory::Mapped => {
                let ram = memory::map_image(image, &regions, config.memory.0)?;
                for (diff, diff_dir) in diffs {
                    let path = diff_dir.join(&diff.memory.file);
                    let file = snapshot::memory::open_image(&path, &diff.memory)
                        .map_err(snapshot::SnapshotError::from)?;
                    let pages = diff.memory.pages.as_deref().unwrap_or_default();
                    snapshot::memory::apply_diff(&ram, &file, &path, &diff.memory, pages)
                        .map_err(snapshot::SnapshotError::from)?;
                }
                (ram, None)
            }
            RestoreMemory::Lazy { device } => {
                // Fresh memory, as for a boot, every page missing until the pager puts it.
                let ranges: Vec<(GuestAddress, usize)> =
                    regions.iter().map(|(a, l, _)| (*a, *l)).collect();
                let mut ram = memory::create(&ranges, config.memory.0)?;
                // The pager fills it: its pages are not all in the file yet.
                ram.shareable = false;
                let lazy_err = |e: String| {
                    VmError::from(snapshot::SnapshotError::Other(format!("lazy restore: {e}")))
                };
                let root_image = root_dir.join(&root_state.memory.file);
                let mut plan =
                    snapshot::lazy::Plan::new((image, root_image), state.memory.regions.clone());
                for (diff, diff_dir) in diffs {
                    let path = diff_dir.join(&diff.memory.file);
                    let file = snapshot::memory::open_image(&path, &diff.memory)
                        .map_err(snapshot::SnapshotError::from)?;
                    let pages = diff.memory.pages.as_deref().unwrap_or_default();
                    plan.apply_diff((file, path), pages).map_err(lazy_err)?;
                }
                let uffd = crate::uffd::Uffd::open(device.as_deref()).map_err(|e| {
                    lazy_err(format!(
                        "no userfaultfd ({e}); a jailed VMM needs --userfaultfd with an \
                         inherited /dev/userfaultfd"
                    ))
                })?;
                let pager = snapshot::lazy::Pager::new(uffd, &ram, plan).map_err(lazy_err)?;
                // Serving from now on: restoring the devices below touches guest memory.
                let running = pager.spawn(exit.clone()).map_err(|source| VmError::Host {
                    what: "starting the pager thread",
                    source,
                })?;
                (ram, Some(running))
            }
        };
        // The copying is not the guest's writing.
        let _ = ram.take_device_dirty_pages();
        ram.register(&fd, false)?;
        let mut vm = assemble(kvm, fd, ram, &config, exit, endpoints, Arrival::Saved)?;
        vm.pager = pager;
        vm.load_saved(state, fits, crate::device_manager::Arrival::Restore)?;
        info!(
            dir = %dir.display(),
            vcpus = config.vcpus,
            memory_mib = config.memory.0,
            devices = ?vm.devices.ids(),
            "VM restored (paused)"
        );
        Ok(vm)
    }

    /// Loads saved state over a VM assembled from the same configuration: the devices,
    /// the interrupt controllers, PIT and clock, and each vCPU (on its own thread as it
    /// starts); the VM is left paused.
    fn load_saved(
        &mut self,
        state: SnapshotState,
        fits: crate::cpu::state::XsaveFits,
        arrival: crate::device_manager::Arrival,
    ) -> Result<(), VmError> {
        check_cpuid(&self.vcpus, &state)?;
        self.devices
            .restore_as(&state.devices, arrival)
            .map_err(|e| snapshot::SnapshotError::Other(e.to_string()))?;
        state
            .vm
            .restore(&self.fd, needs_pit(&self.config.boot))
            .map_err(snapshot::SnapshotError::from)?;
        for (vcpu, saved) in self.vcpus.iter_mut().zip(state.vcpus) {
            vcpu.restore_at_start(saved, fits);
        }
        crate::control::PauseControl::pause(&*self.pauser).map_err(|e| VmError::Host {
            what: "pausing the restored VM",
            source: io::Error::other(e),
        })?;
        Ok(())
    }

    /// Builds the VM an incoming migration announces (`config`, already checked against
    /// this host, with the memory layout of `regions`): the same steps as a boot, its
    /// memory a fresh memfd that the migration fills, no boot payload. Load the state with
    /// [`Vm::load_incoming`] before starting it.
    /// With `memory`, the source's memfd (a migration on one host), its RAM is that file,
    /// mapped shared: nothing is copied, and nothing here writes it before the switch.
    pub fn incoming(
        config: &VmConfig,
        exit: Arc<ExitSignal>,
        memory: Option<std::fs::File>,
    ) -> Result<Vm, VmError> {
        let kvm = open_kvm(&config.kvm)?;
        check_caps(&kvm)?;
        if matches!(config.boot, BootSource::Firmware(_)) {
            return Err(VmError::from(snapshot::SnapshotError::Other(
                "an incoming migration of a firmware-booted VM is not supported yet".into(),
            )));
        }
        let endpoints = open_endpoints(config)?;
        let fd = Arc::new(create_vm(&kvm)?);
        let ram = match memory {
            None => create_memory(&fd, config, None)?,
            Some(file) => {
                let ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(config.memory.bytes())
                    .into_iter()
                    .map(|(a, s)| (a, s as usize))
                    .collect();
                let ram = memory::map_shared(file, &ranges, config.memory.0)?;
                ram.register(&fd, false)?;
                ram
            }
        };
        let vm = assemble(kvm, fd, ram, config, exit, endpoints, Arrival::Saved)?;
        info!(
            vcpus = config.vcpus,
            memory_mib = config.memory.0,
            devices = ?vm.devices.ids(),
            "VM built for an incoming migration"
        );
        Ok(vm)
    }

    /// Loads an incoming migration's state (its memory is in already); the VM stays
    /// paused.
    pub fn load_incoming(&mut self, mut state: SnapshotState) -> Result<(), VmError> {
        let fits = crate::cpu::state::check_xsave_size(xsave2_size(&self._kvm))
            .map_err(snapshot::SnapshotError::from)?;
        // The host side is this VMM's (its sockets, devices' paths as given here).
        state.config = self.config.clone();
        // What the migration wrote is not the guest's writing.
        let _ = self.ram.take_device_dirty_pages();
        self.load_saved(state, fits, crate::device_manager::Arrival::Migration)?;
        info!(devices = ?self.devices.ids(), "incoming migration loaded (paused)");
        Ok(())
    }

    /// Takes snapshots of this VM.
    pub fn snapshotter(&self) -> Arc<Snapshotter> {
        self.snapshotter.clone()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The VM's devices.
    pub fn devices(&self) -> &Arc<DeviceManager> {
        &self.devices
    }

    /// The VM's memory and the memfd behind it.
    pub fn memory(&self) -> &GuestRam {
        &self.ram
    }

    /// Live handles on the VM's counters.
    pub fn metrics(&self) -> crate::metrics::VmMetrics {
        crate::metrics::VmMetrics {
            vcpus: self.vcpus.iter().map(Vcpu::counters).collect(),
            serial: self
                .devices
                .uart()
                .map(|u| u.counters())
                .unwrap_or_default(),
            devices: self.devices.virtio_metrics().to_vec(),
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
        let serial = match self.devices.uart() {
            Some(u) => u.device(),
            None => {
                return Err(VmError::Host {
                    what: "serial port",
                    source: io::Error::other("the VM has no UART"),
                })
            }
        };
        let mut running = RunningVm {
            _fd: self.fd,
            _mem: self.ram.mem.clone(),
            handles: Vec::with_capacity(self.vcpus.len()),
            stop: self.stop,
            gate: self.gate,
            devices: self.devices,
            serial,
            serial_input: self.serial_input,
            serial_flusher: None,
            _chardevs: self.chardevs,
            pager: self.pager,
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
        let tx = running.devices.uart().and_then(|u| u.coalescer()).cloned();
        if let Some(tx) = tx {
            match tx.spawn_flusher(running.stop.clone()) {
                Ok(h) => running.serial_flusher = Some(h),
                Err(source) => return failed(running, "serial flush thread", source),
            }
        }
        Ok(running)
    }
}

/// The steps a boot and a restore share, once the KVM VM and its memory exist: the
/// interrupt controllers, every device, the vCPUs (with their CPUID and boot MSRs), the
/// serial port's coalescing, and the VM's pause and snapshot controls.
/// Whether a VM boots or takes saved vCPU states (a restore, a migration): the latter
/// skip the boot values their states overwrite (under nested virtualisation every ioctl
/// of a restore counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arrival {
    Boot,
    Saved,
}

fn assemble(
    kvm: Kvm,
    fd: Arc<VmFd>,
    ram: GuestRam,
    config: &VmConfig,
    exit: Arc<ExitSignal>,
    endpoints: Endpoints,
    arrival: Arrival,
) -> Result<Vm, VmError> {
    let pit = needs_pit(&config.boot);
    create_irqchip(&fd, pit)?;
    let (setup, power_button, mut chardevs) =
        attach_devices(&fd, &ram.mem, config, &exit, endpoints.serial_out)?;
    let devices = setup.finish();
    let mut all_chardevs = endpoints.chardevs;
    all_chardevs.append(&mut chardevs);
    let gate = Arc::new(PauseGate::new());
    let stop = Arc::new(AtomicBool::new(false));
    let msrs = kvm
        .get_msr_index_list()
        .map_err(kvm_err("GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let links = VcpuLinks {
        exit: &exit,
        stop: &stop,
        gate: &gate,
    };
    let vcpus = create_vcpus(&kvm, &fd, config, &devices, links, &msrs, arrival)?;
    coalesce_serial(&fd, &devices, &vcpus);
    let devices = Arc::new(devices);
    let pauser = Arc::new(Pauser::new(
        gate.clone(),
        devices.clone(),
        fd.clone(),
        config.vcpus,
    ));
    let snapshotter = Arc::new(Snapshotter::new(snapshot::take::Parts {
        gate: gate.clone(),
        pauser: pauser.clone(),
        devices: devices.clone(),
        vm: fd.clone(),
        ram: ram.clone(),
        config: config.clone(),
        pit,
        msrs,
        xsave2_size: xsave2_size(&kvm),
    }));
    Ok(Vm {
        _kvm: kvm,
        fd,
        ram,
        vcpus,
        exit,
        stop,
        devices,
        serial_input: endpoints.serial_input,
        chardevs: all_chardevs,
        power_button,
        gate,
        pauser,
        boot: None,
        config: config.clone(),
        snapshotter,
        pager: None,
    })
}

/// `KVM_CAP_XSAVE2`'s size of the XSAVE area, 0 without the capability.
fn xsave2_size(kvm: &Kvm) -> usize {
    usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0)
}

/// Refuses a snapshot whose guest saw CPU features this host cannot give it: compared
/// with the CPUID a vCPU of this host, set up as for a boot, reports (`KVM_GET_CPUID2`).
/// On most hosts that is KVM's supported set as the VMM normalised it; on a PVM host,
/// where guest CPUID cannot be filtered, it is the host CPU's own.
fn check_cpuid(vcpus: &[Vcpu], state: &SnapshotState) -> Result<(), VmError> {
    for (vcpu, saved) in vcpus.iter().zip(&state.vcpus) {
        let here = vcpu
            .fd()
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("GET_CPUID2"))?;
        cpuid::check_compatible(&saved.cpuid, here.as_slice()).map_err(|e| {
            VmError::from(snapshot::SnapshotError::Inconsistent(format!(
                "this host cannot run the saved guest's vCPU {}: {e}",
                saved.index
            )))
        })?;
    }
    Ok(())
}

/// Step: the serial port's and the console's host ends (files, ptys, sockets), opened
/// first, since a bad path is a likely failure. Standard input goes to the serial port
/// when it is on stdout, else to the console.
fn open_endpoints(config: &VmConfig) -> Result<Endpoints, VmError> {
    let serial_end = chardev::open(
        &config.serial,
        "serial",
        config.serial == SerialMode::Stdout,
    )?;
    let (serial_out, mut serial_end) = serial_end.into_parts();
    let serial_input = serial_end.input.take();
    Ok(Endpoints {
        serial_out,
        serial_input,
        chardevs: vec![serial_end],
    })
}

/// Step: the KVM VM.
fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let fd = kvm.create_vm().map_err(kvm_err("CREATE_VM"))?;
    // Intel VMX needs a TSS region below 4 GiB; other KVM flavours ignore or refuse it.
    if let Err(e) = fd.set_tss_address(0xfffb_d000) {
        warn!(error = %e, "KVM_SET_TSS_ADDR failed; continuing (only Intel VMX needs it)");
    }
    Ok(fd)
}

/// Step: guest memory (RAM, and the firmware's window when it boots firmware), in one
/// memfd, registered with KVM.
fn create_memory(
    fd: &VmFd,
    config: &VmConfig,
    firmware: Option<&FirmwareImage>,
) -> Result<GuestRam, VmError> {
    let mut ranges: Vec<(GuestAddress, usize)> = layout::ram_regions(config.memory.bytes())
        .into_iter()
        .map(|(a, s)| (a, s as usize))
        .collect();
    if let Some(fw) = firmware {
        ranges.push((fw.base, fw.bytes.len()));
    }
    let ram = memory::create(&ranges, config.memory.0)?;
    ram.register(fd, false)?;
    Ok(ram)
}

pub use crate::boot::needs_pit;

/// Step: the in-kernel interrupt controllers (PIC, I/O APIC, local APICs), and the PIT
/// when the guest uses one ([`needs_pit`]).
fn create_irqchip(fd: &VmFd, pit: bool) -> Result<(), VmError> {
    fd.create_irq_chip().map_err(kvm_err("CREATE_IRQCHIP"))?;
    if !pit {
        return Ok(());
    }
    fd.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("CREATE_PIT2"))?;
    Ok(())
}

/// Step: every device, legacy then virtio, each under its stable id.
fn attach_devices(
    fd: &Arc<VmFd>,
    mem: &Arc<GuestMemory>,
    config: &VmConfig,
    exit: &Arc<ExitSignal>,
    serial_out: quantix_devices::legacy::serial::SerialSink,
) -> Result<(DeviceSetup, Arc<PowerButton>, Vec<ChardevHandle>), VmError> {
    let mut setup = DeviceSetup::new();
    let host_err = |what| move |source| VmError::Host { what, source };

    // COM1.
    let serial_evt = EventFd::new(EFD_NONBLOCK).map_err(host_err("serial eventfd"))?;
    fd.register_irqfd(&serial_evt, COM1_IRQ)
        .map_err(kvm_err("IRQFD (serial)"))?;
    let serial_irq = serial_evt.try_clone().map_err(host_err("serial eventfd"))?;
    let uart = Arc::new(Uart::new(SerialDevice::new(
        IrqTrigger::new(serial_irq),
        serial_out,
    )));
    setup.add_pio(
        DeviceId::new("uart", "com1"),
        Arc::new(Mutex::new(UartPort(uart.clone()))),
        COM1_PORT_BASE,
        COM1_PORT_LEN,
    )?;
    setup.set_uart(uart);
    setup.add_pio(
        DeviceId::new("i8042", "0"),
        Arc::new(Mutex::new(I8042::new(exit.clone()))),
        I8042_PORT_BASE,
        I8042_PORT_LEN,
    )?;
    setup.add_pio(
        DeviceId::new("acpi-pm", "0"),
        Arc::new(Mutex::new(AcpiPowerDevice::new(exit.clone()))),
        u64::from(ACPI_POWER_PORT),
        1,
    )?;
    let power_button = Arc::new(PowerButton::new(fd.clone(), layout::GED_GSI)?);
    setup.add_offbus(
        DeviceId::new("ged", "power-button"),
        Arc::new(Mutex::new(Ged(power_button.clone()))),
    )?;
    setup.add_offbus(
        DeviceId::new("vmgenid", "0"),
        Arc::new(Mutex::new(VmGenId::new(
            fd,
            mem.clone(),
            layout::VMGENID_ADDR,
            layout::VMGENID_GSI,
        )?)),
    )?;

    // Virtio devices, in a fixed order: disks, NICs, console, rng, vsock.
    let mut chardevs = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let name = disk.id.clone().unwrap_or_else(|| format!("disk{i}"));
        let block = quantix_virtio::block::Block::open(&name, &disk.path, disk.readonly, &name)?
            .with_engine(disk.aio)
            .with_rate_limit(disk.rate_limit);
        info!(disk = %name, path = %disk.path.display(), readonly = disk.readonly, aio = disk.aio.name(), sectors = block.capacity_sectors(), "disk attached");
        setup.add_virtio(fd, mem, Box::new(block))?;
    }
    for (i, net) in config.nets.iter().enumerate() {
        use quantix_virtio::net::{random_mac, Net, Tap};
        let tap = match &net.backend {
            NetBackend::Tap(name) => Tap::open(name)?,
            NetBackend::Fd(fd) => Tap::from_fd(*fd)?,
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
        setup.add_virtio(fd, mem, Box::new(card))?;
    }
    if config.console != SerialMode::Off {
        let stdin = config.console == SerialMode::Stdout && config.serial != SerialMode::Stdout;
        let (sink, mut end) = chardev::open(&config.console, "console", stdin)?.into_parts();
        let input = end.input.take();
        chardevs.push(end);
        setup.add_virtio(
            fd,
            mem,
            Box::new(quantix_virtio::console::Console::new(sink, input)),
        )?;
    }
    if config.rng {
        setup.add_virtio(fd, mem, Box::new(quantix_virtio::rng::Rng::new()))?;
    }
    if let Some(v) = &config.vsock {
        let dev = quantix_virtio::vsock::Vsock::new(v.cid, &v.socket)?;
        info!(cid = v.cid, socket = %v.socket.display(), "vsock attached");
        setup.add_virtio(fd, mem, Box::new(dev))?;
    }
    Ok((setup, power_button, chardevs))
}

/// What every vCPU of a VM shares: where it reports, its stop flag, its pause gate.
struct VcpuLinks<'a> {
    exit: &'a Arc<ExitSignal>,
    stop: &'a Arc<AtomicBool>,
    gate: &'a Arc<PauseGate>,
}

/// Step: the vCPUs, with the CPUID every vCPU starts with and, for a boot, its MSRs, FPU
/// and local APIC (a boot then sets the boot vCPU's registers; a restore loads saved
/// states over all of it, so it skips them).
fn create_vcpus(
    kvm: &Kvm,
    fd: &Arc<VmFd>,
    config: &VmConfig,
    devices: &DeviceManager,
    links: VcpuLinks<'_>,
    msr_list: &[u32],
    arrival: Arrival,
) -> Result<Vec<Vcpu>, VmError> {
    let VcpuLinks { exit, stop, gate } = links;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("GET_SUPPORTED_CPUID"))?;
    let boot_msrs = msrs::boot_msrs(msr_list);
    let cpuid_cfg = CpuidConfig {
        vcpus: config.vcpus,
        tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
    };
    let buses = devices.buses();
    let mut vcpus = Vec::with_capacity(config.vcpus.into());
    for index in 0..config.vcpus {
        let vcpu = fd
            .create_vcpu(u64::from(index))
            .map_err(kvm_err("CREATE_VCPU"))?;
        let mut cpuid: CpuId = supported.clone();
        cpuid::normalize(&mut cpuid, index, &cpuid_cfg);
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("SET_CPUID2"))?;
        if arrival == Arrival::Boot {
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
    Ok(vcpus)
}

/// Step: KVM's coalescing of COM1's transmit writes (its ring is mapped through a vCPU
/// fd, so this comes once the vCPUs exist). Without it every write exits, as before.
fn coalesce_serial(fd: &Arc<VmFd>, devices: &DeviceManager, vcpus: &[Vcpu]) {
    let (Some(uart), Some(first)) = (devices.uart(), vcpus.first()) else {
        return;
    };
    if let Some(tx) = SerialTxCoalescer::new(fd.clone(), first.fd(), uart.device()) {
        uart.coalesce(Arc::new(tx));
    }
}

/// Step (a boot, not a restore): the tables that describe the machine (ACPI, MP), the
/// kernel or firmware, and the boot vCPU's registers for its entry point.
fn load_boot(
    mem: &GuestMemory,
    config: &VmConfig,
    devices: &DeviceManager,
    firmware: Option<FirmwareImage>,
    vcpus: &[Vcpu],
) -> Result<BootInfo, VmError> {
    if let Some(fw) = &firmware {
        mem.write_slice(&fw.bytes, fw.base)?;
    }
    let rsdp = acpi::write(
        mem,
        &AcpiConfig {
            vcpus: config.vcpus,
            virtio_mmio: devices.virtio_descs().to_vec(),
            ged_gsi: layout::GED_GSI,
            vmgenid: Some((layout::VMGENID_ADDR.0, layout::VMGENID_GSI)),
        },
    )?;
    crate::mptable::write(mem, config.vcpus)?;
    let boot = boot::load_linux(mem, config.memory.bytes(), &config.boot, rsdp)?;
    if let Some(bsp) = vcpus.first() {
        let sregs = bsp.fd().get_sregs().map_err(kvm_err("GET_SREGS"))?;
        if let Some((r, s)) = regs::boot_state(mem, boot.entry, sregs)? {
            bsp.fd().set_sregs(&s).map_err(kvm_err("SET_SREGS"))?;
            bsp.fd().set_regs(&r).map_err(kvm_err("SET_REGS"))?;
        }
    }
    Ok(boot)
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
        if let Some(uart) = self.devices.uart() {
            uart.flush();
        }
        if let Some(pager) = self.pager {
            pager.stop();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_firmware_and_acpi_off_kernels_get_a_pit() {
        let kernel = |cmdline: &str| BootSource::Kernel {
            kernel: "/k".into(),
            initramfs: None,
            cmdline: cmdline.into(),
        };
        assert!(!needs_pit(&kernel("console=ttyS0 quiet")));
        assert!(!needs_pit(&kernel("noacpi=off")));
        assert!(needs_pit(&kernel("console=ttyS0 acpi=off")));
        assert!(needs_pit(&BootSource::Firmware("/fw".into())));
    }
}
