//! Table layouts and checksums.

use super::aml;
use crate::layout::{ACPI_POWER_PORT, IOAPIC_ADDR, LAPIC_ADDR};
use quantix_devices::legacy::serial::{COM1_IRQ, COM1_PORT_BASE, COM1_PORT_LEN};
use quantix_devices::power::{ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};

const OEM_ID: &[u8; 6] = b"QNTXKV";
const OEM_TABLE_ID: &[u8; 8] = b"QUANTIX ";
const CREATOR_ID: &[u8; 4] = b"QNTX";

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDesc {
    /// Base of its 4 KiB register window.
    pub base: u64,
    /// Its interrupt (I/O APIC pin).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPU count; vCPU `i` has APIC ID `i`.
    pub vcpus: u8,
    /// virtio-mmio devices, found by Linux's virtio_mmio driver through `LNRO0005`.
    pub virtio_mmio: Vec<VirtioMmioDesc>,
    /// The interrupt of the Generic Event Device that carries power button presses.
    pub ged_gsi: u32,
    /// The VM Generation ID: its address and the interrupt of the Generic Event Device
    /// that notifies a change.
    pub vmgenid: Option<(u64, u32)>,
}

/// An SDT: a 36-byte header and a body; the length and checksum are filled by `finish`.
struct Sdt(Vec<u8>);

impl Sdt {
    fn new(signature: &[u8; 4], revision: u8) -> Self {
        let mut v = Vec::with_capacity(256);
        v.extend_from_slice(signature);
        v.extend_from_slice(&[0; 4]); // length
        v.push(revision);
        v.push(0); // checksum
        v.extend_from_slice(OEM_ID);
        v.extend_from_slice(OEM_TABLE_ID);
        v.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
        v.extend_from_slice(CREATOR_ID);
        v.extend_from_slice(&1u32.to_le_bytes()); // creator revision
        Sdt(v)
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u8(&mut self, n: u8) -> &mut Self {
        self.bytes(&[n])
    }
    fn u16(&mut self, n: u16) -> &mut Self {
        self.bytes(&n.to_le_bytes())
    }
    fn u32(&mut self, n: u32) -> &mut Self {
        self.bytes(&n.to_le_bytes())
    }
    fn u64(&mut self, n: u64) -> &mut Self {
        self.bytes(&n.to_le_bytes())
    }

    fn finish(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[4..8].copy_from_slice(&len.to_le_bytes());
        self.0[9] = checksum(&self.0);
        self.0
    }
}

/// The byte that makes `bytes` sum to zero.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A Generic Address Structure for a byte-wide I/O port.
fn gas_io_byte(port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = 8; // register bit width
    g[3] = 1; // byte access
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

fn dsdt(virtio: &[VirtioMmioDesc], ged_gsi: u32, vmgenid: Option<(u64, u32)>) -> Vec<u8> {
    let mut t = Sdt::new(b"DSDT", 6);
    // \_S5: the sleep type value for soft-off that the guest writes to the sleep control register.
    t.bytes(&aml::name(
        b"_S5_",
        &aml::package(&[aml::integer(ACPI_S5_SLEEP_TYPE.into()), aml::integer(0)]),
    ));
    // COM1, so that the kernel maps its IRQ through the I/O APIC (there is no legacy PIC
    // on a hardware-reduced platform).
    let mut com1 = aml::name(b"_HID", &aml::eisa_id(b"PNP0501"));
    com1.extend(aml::name(b"_UID", &aml::integer(1)));
    com1.extend(aml::name(
        b"_CRS",
        &aml::io_irq_resources(COM1_PORT_BASE as u16, COM1_PORT_LEN as u8, COM1_IRQ as u8),
    ));
    let mut sb = aml::device(b"COM1", &com1);
    // The power button, a control-method button (FADT PWR_BUTTON flag): a hardware-reduced
    // platform has no fixed one. Pressing it raises the Generic Event Device's interrupt,
    // whose _EVT method notifies the button (0x80: pressed); the guest's button driver
    // turns that into KEY_POWER, which its init (systemd-logind, acpid) acts on.
    let mut pwrb = aml::name(b"_HID", &aml::eisa_id(b"PNP0C0C"));
    pwrb.extend(aml::name(b"_UID", &aml::integer(0)));
    sb.extend(aml::device(b"PWRB", &pwrb));
    let mut ged = aml::name(b"_HID", &aml::string("ACPI0013"));
    ged.extend(aml::name(b"_UID", &aml::integer(0)));
    ged.extend(aml::name(b"_CRS", &aml::irq_resources(ged_gsi)));
    ged.extend(aml::method(
        b"_EVT",
        1,
        &aml::notify(b"_SB_", b"PWRB", 0x80),
    ));
    sb.extend(aml::device(b"GED_", &ged));
    if let Some((addr, gsi)) = vmgenid {
        // The VM Generation ID device as Microsoft's specification (and Linux's vmgenid
        // driver, QEMU, Firecracker) has it: `_CID "VM_Gen_Counter"`, and `ADDR`, the
        // identifier's address as a package of its low and high 32 bits. A change is
        // notified (0x80) through a Generic Event Device of its own, so that a power
        // button press and a new generation never share an interrupt.
        let mut vgen = aml::name(b"_HID", &aml::string("QNTX0001"));
        vgen.extend(aml::name(b"_CID", &aml::string("VM_Gen_Counter")));
        vgen.extend(aml::name(b"_DDN", &aml::string("VM_Gen_Counter")));
        vgen.extend(aml::name(
            b"ADDR",
            &aml::package(&[aml::integer(addr & 0xffff_ffff), aml::integer(addr >> 32)]),
        ));
        sb.extend(aml::device(b"VGEN", &vgen));
        let mut ged1 = aml::name(b"_HID", &aml::string("ACPI0013"));
        ged1.extend(aml::name(b"_UID", &aml::integer(1)));
        ged1.extend(aml::name(b"_CRS", &aml::irq_resources(gsi)));
        ged1.extend(aml::method(
            b"_EVT",
            1,
            &aml::notify(b"_SB_", b"VGEN", 0x80),
        ));
        sb.extend(aml::device(b"GED1", &ged1));
    }
    for (i, dev) in virtio.iter().enumerate() {
        let mut body = aml::name(b"_HID", &aml::string("LNRO0005"));
        body.extend(aml::name(b"_UID", &aml::integer(i as u64)));
        body.extend(aml::name(b"_CCA", &aml::integer(1)));
        body.extend(aml::name(
            b"_CRS",
            &aml::mmio_irq_resources(dev.base as u32, 0x1000, dev.gsi),
        ));
        let name = format!("VR{i:02X}");
        let mut n = [0u8; 4];
        n.copy_from_slice(&name.as_bytes()[..4]);
        sb.extend(aml::device(&n, &body));
    }
    t.bytes(&aml::scope(b"_SB_", &sb));
    t.finish()
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    const FLAG_WBINVD: u32 = 1 << 0;
    const FLAG_PWR_BUTTON: u32 = 1 << 4;
    const FLAG_SLP_BUTTON: u32 = 1 << 5;
    const FLAG_RESET_REG_SUP: u32 = 1 << 10;
    const FLAG_HW_REDUCED_ACPI: u32 = 1 << 20;
    // IA-PC boot architecture: no VGA, no CMOS RTC. The 8042 flag stays clear so that
    // Linux does not probe a keyboard; only its reset line is emulated.
    const BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
    const BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;

    let mut t = Sdt::new(b"FACP", 6);
    t.u32(0) // FIRMWARE_CTRL
        .u32(dsdt_addr as u32) // DSDT
        .u8(0) // reserved
        .u8(0) // preferred PM profile: unspecified
        .u16(0) // SCI_INT
        .u32(0) // SMI_CMD
        .bytes(&[0; 4]) // ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        .bytes(&[0; 32]) // PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM TMR, GPE0, GPE1 blocks
        .bytes(&[0; 8]) // their lengths, GPE1_BASE, CST_CNT
        .u16(0)
        .u16(0) // P_LVL2/3 latency
        .u16(0)
        .u16(0) // flush size/stride
        .bytes(&[0; 5]) // duty offset/width, alarms, century
        .u16(BOOT_ARCH_VGA_NOT_PRESENT | BOOT_ARCH_CMOS_RTC_NOT_PRESENT)
        .u8(0) // reserved
        .u32(
            FLAG_WBINVD
                | FLAG_PWR_BUTTON
                | FLAG_SLP_BUTTON
                | FLAG_RESET_REG_SUP
                | FLAG_HW_REDUCED_ACPI,
        )
        .bytes(&gas_io_byte(ACPI_POWER_PORT)) // RESET_REG
        .u8(ACPI_RESET_VALUE)
        .u16(0) // ARM boot arch
        .u8(0) // FADT minor version
        .u64(0) // X_FIRMWARE_CTRL
        .u64(dsdt_addr) // X_DSDT
        .bytes(&[0; 12 * 8]) // X_PM1a_EVT .. X_GPE1 blocks
        .bytes(&gas_io_byte(ACPI_POWER_PORT)) // SLEEP_CONTROL_REG
        .bytes(&gas_io_byte(ACPI_POWER_PORT)) // SLEEP_STATUS_REG
        .bytes(b"QUANTIX\0"); // hypervisor vendor identity
    t.finish()
}

fn madt(vcpus: u8) -> Vec<u8> {
    const PCAT_COMPAT: u32 = 1;
    const LAPIC_ENABLED: u32 = 1;
    let mut t = Sdt::new(b"APIC", 5);
    t.u32(LAPIC_ADDR as u32).u32(PCAT_COMPAT);
    for id in 0..vcpus {
        // Processor local APIC: ACPI processor UID, APIC ID, flags.
        t.u8(0).u8(8).u8(id).u8(id).u32(LAPIC_ENABLED);
    }
    // I/O APIC 0 at its default address, GSIs from 0.
    t.u8(1).u8(12).u8(0).u8(0).u32(IOAPIC_ADDR as u32).u32(0);
    // LINT1 of every processor is the NMI input.
    t.u8(4).u8(6).u8(0xff).u16(0).u8(1);
    t.finish()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut t = Sdt::new(b"XSDT", 1);
    for e in entries {
        t.u64(*e);
    }
    t.finish()
}

fn rsdp(xsdt_addr: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(36);
    v.extend_from_slice(b"RSD PTR ");
    v.push(0); // checksum of the first 20 bytes
    v.extend_from_slice(OEM_ID);
    v.push(2); // revision: ACPI 2.0+
    v.extend_from_slice(&0u32.to_le_bytes()); // RSDT address: none
    v.extend_from_slice(&36u32.to_le_bytes());
    v.extend_from_slice(&xsdt_addr.to_le_bytes());
    v.push(0); // extended checksum
    v.extend_from_slice(&[0; 3]);
    v[8] = checksum(&v[..20]);
    v[32] = checksum(&v);
    v
}

fn align16(v: &mut Vec<u8>) {
    v.resize(v.len().next_multiple_of(16), 0);
}

/// Builds all tables as one blob to be placed at guest address `base`; the RSDP comes first.
pub fn build(config: &AcpiConfig, base: u64) -> Vec<u8> {
    let mut blob = vec![0u8; 48]; // room for the RSDP, patched in last
    let place = |table: Vec<u8>, blob: &mut Vec<u8>| {
        let addr = base + blob.len() as u64;
        blob.extend_from_slice(&table);
        align16(blob);
        addr
    };
    let dsdt_addr = place(
        dsdt(&config.virtio_mmio, config.ged_gsi, config.vmgenid),
        &mut blob,
    );
    let fadt_addr = place(fadt(dsdt_addr), &mut blob);
    let madt_addr = place(madt(config.vcpus), &mut blob);
    let xsdt_addr = place(xsdt(&[fadt_addr, madt_addr]), &mut blob);
    blob[..36].copy_from_slice(&rsdp(xsdt_addr));
    blob
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER_LEN: usize = 36;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Returns the table at guest address `addr` of a blob based at `base`, checking its checksum.
    fn table(blob: &[u8], base: u64, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let off = (addr - base) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        let t = blob[off..off + len].to_vec();
        assert_eq!(
            t.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "checksum of {sig:?}"
        );
        t
    }

    #[test]
    fn tables_link_up_with_valid_checksums() {
        let base = 0xe0000;
        let blob = build(
            &AcpiConfig {
                vcpus: 4,
                virtio_mmio: vec![VirtioMmioDesc {
                    base: 0xd000_0000,
                    gsi: 5,
                }],
                ged_gsi: 23,
                vmgenid: Some((0xf_ffe0, 3)),
            },
            base,
        );
        let rsdp = &blob[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let xsdt = table(&blob, base, u64_at(rsdp, 24), b"XSDT");
        assert_eq!(xsdt.len(), HEADER_LEN + 16);
        let fadt = table(&blob, base, u64_at(&xsdt, 36), b"FACP");
        assert_eq!(fadt.len(), 276, "ACPI 6 FADT size");
        let madt = table(&blob, base, u64_at(&xsdt, 44), b"APIC");
        let dsdt = table(&blob, base, u64_at(&fadt, 140), b"DSDT");
        assert_eq!(u32_at(&fadt, 40) as u64, u64_at(&fadt, 140));
        // Hardware-reduced, reset register supported, reset and sleep registers on the power port.
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0);
        assert_ne!(flags & (1 << 10), 0);
        assert_eq!(&fadt[116..128], &gas_io_byte(ACPI_POWER_PORT));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        assert_eq!(&fadt[244..256], &gas_io_byte(ACPI_POWER_PORT));
        // _S5_ is in the DSDT, and the virtio device with its window and GSI.
        assert!(dsdt.windows(4).any(|w| w == b"_S5_"));
        assert!(dsdt.windows(8).any(|w| w == b"LNRO0005"));
        assert!(dsdt.windows(4).any(|w| w == b"VR00"));
        assert!(dsdt.windows(4).any(|w| w == 0xd000_0000u32.to_le_bytes()));
        // The power button and the Generic Event Device whose _EVT notifies it.
        assert!(dsdt.windows(4).any(|w| w == b"PWRB"));
        assert!(dsdt.windows(8).any(|w| w == b"ACPI0013"));
        assert!(dsdt.windows(4).any(|w| w == b"_EVT"));
        // The generation ID device, its address package, and its own GED.
        assert!(dsdt.windows(14).any(|w| w == b"VM_Gen_Counter"));
        assert!(dsdt.windows(4).any(|w| w == b"GED1"));
        let addr = [
            b"ADDR".as_slice(),
            &[0x12, 0x08, 0x02, 0x0c],
            &0xf_ffe0u32.to_le_bytes(),
            &[0x00],
        ]
        .concat();
        assert!(dsdt.windows(addr.len()).any(|w| w == addr), "ADDR package");
        let ged_crs = aml::irq_resources(23);
        assert!(dsdt.windows(ged_crs.len()).any(|w| w == ged_crs));
        // One enabled local APIC per vCPU with APIC IDs 0..n.
        let mut off = HEADER_LEN + 8;
        let mut apic_ids = vec![];
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            if kind == 0 {
                assert_eq!(u32_at(&madt, off + 4), 1);
                apic_ids.push(madt[off + 3]);
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(apic_ids, vec![0, 1, 2, 3]);
    }

    #[test]
    fn many_vcpus_fit_in_the_acpi_area() {
        let blob = build(
            &AcpiConfig {
                vcpus: crate::config::MAX_VCPUS,
                virtio_mmio: (0..18u32)
                    .map(|i| VirtioMmioDesc {
                        base: 0xd000_0000 + u64::from(i) * 0x1000,
                        gsi: 5 + i,
                    })
                    .collect(),
                ged_gsi: 23,
                vmgenid: Some((crate::layout::VMGENID_ADDR.0, 3)),
            },
            0xe0000,
        );
        assert!((blob.len() as u64) <= crate::layout::VMGENID_ADDR.0 - 0xe0000);
    }
}
