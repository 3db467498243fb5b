//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT, DSDT, MCFG, written at 0xE0000.
//!
//! The fixed hardware is the PM1a block at I/O 0x600 (event, 4 bytes) and 0x604 (control,
//! 2 bytes), SCI on IRQ 9, and the reset register at I/O 0xCF9 (value 6). See docs/vmm.md.
//!
//! With hotplug ([`AcpiConfig`]): the MADT lists every possible vCPU (boot ones enabled, the
//! rest online capable), and the DSDT gains the vCPU hotplug devices, the PCI slot devices and
//! the Generic Event Device of [`crate::hotplug`].
//!
//! Firmware boot ([`firmware`]): the same MADT and hotplug AML, a q35 FADT/DSDT/MCFG, served as
//! fw_cfg files with linker/loader commands ([`loader`]) instead of being written into RAM.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::GuestMem;

pub mod firmware;
pub mod loader;

use crate::hotplug::{self, cpu, ged, pci, RawAml};
use crate::layout::*;
pub use firmware::{firmware_blobs, intx_gsi, FirmwarePlatform, FwCfgAcpi};

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    /// vCPUs running at boot: ids `0..boot_vcpus`, enabled in the MADT.
    pub boot_vcpus: u32,
    /// Possible vCPUs. Above `boot_vcpus`, the MADT lists ids up to `max_vcpus - 1` as online
    /// capable and the DSDT gets `\_SB.CPUS`; then a [`cpu::CpuHotplug`] **must** be on the
    /// port I/O bus at [`ports::CPU_HOTPLUG`] before any vCPU runs (unmapped ports read all
    /// ones, which would make every possible vCPU look present).
    pub max_vcpus: u32,
    /// Guest RAM in bytes (places the 64-bit PCI window).
    pub ram: u64,
    /// Declare the root bus slots hotpluggable (`\_SB.PCI0.Sxx`, `\_SB.PHPR`); then a
    /// [`pci::PciHotplug`] **must** be on the port I/O bus at [`ports::PCI_HOTPLUG`].
    pub pci_hotplug: bool,
}

impl AcpiConfig {
    /// Whether vCPUs can be hotplugged (`max_vcpus > boot_vcpus`).
    pub fn cpu_hotplug(&self) -> bool {
        self.max_vcpus > self.boot_vcpus
    }

    /// Whether the DSDT has the GED (any hotplug); then a [`ged::Ged`] **must** be on the port
    /// I/O bus at [`ports::GED`] and its interrupt on [`GED_GSI`].
    pub fn ged(&self) -> bool {
        self.cpu_hotplug() || self.pci_hotplug
    }
}

/// Tables that cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU counts are not possible.
    #[error(transparent)]
    Vcpus(#[from] hotplug::HotplugError),
    /// The tables do not fit in the ACPI area.
    #[error("the ACPI tables need {need} bytes, the area at {ACPI_START:#x} has {have}")]
    TooBig { need: u64, have: u64 },
    /// A PCI window of the firmware platform is empty or out of range.
    #[error("the {what} PCI window {start:#x}..{end:#x} is empty or out of range")]
    Window {
        what: &'static str,
        start: u64,
        end: u64,
    },
    /// Writing guest memory failed.
    #[error("writing the ACPI tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// End of the ACPI area (the BIOS area ends at 1 MiB).
const ACPI_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"RVIRT ";
const OEM_TABLE: [u8; 8] = *b"RVIRTVMM";

fn checksum(data: &[u8]) -> u8 {
    data.iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// A system description table: 36-byte header + `body`, checksummed.
fn sdt(sig: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let len = 36 + body.len() as u32;
    let mut v = Vec::with_capacity(len as usize);
    v.extend_from_slice(sig);
    v.extend_from_slice(&len.to_le_bytes());
    v.push(revision);
    v.push(0);
    v.extend_from_slice(&OEM_ID);
    v.extend_from_slice(&OEM_TABLE);
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(b"RVRT");
    v.extend_from_slice(&1u32.to_le_bytes());
    v.extend_from_slice(body);
    v[9] = checksum(&v);
    v
}

/// Generic address structure for an I/O port register.
fn gas_io(bits: u8, access: u8, port: u16) -> [u8; 12] {
    let mut g = [0u8; 12];
    g[0] = 1; // system I/O
    g[1] = bits;
    g[2] = 0;
    g[3] = access;
    g[4..12].copy_from_slice(&u64::from(port).to_le_bytes());
    g
}

/// What differs between the direct-boot FADT and the firmware-mode one.
struct FadtBlocks {
    /// PM timer port (PM_TMR_BLK, 4 bytes), if any.
    pm_timer: Option<u16>,
    /// GPE0 block (port, length in bytes), if any.
    gpe0: Option<(u16, u8)>,
    /// IAPC_BOOT_ARCH.
    boot_arch: u16,
}

/// Direct boot: no PM timer, no GPE block, "VGA not present" only.
const FADT_DIRECT: FadtBlocks = FadtBlocks {
    pm_timer: None,
    gpe0: None,
    boot_arch: 1 << 2,
};

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    fadt_with(dsdt, facs, &FADT_DIRECT)
}

/// FADT (6.5 layout, 276 bytes) with the PM1a blocks, reset register and `blocks`.
fn fadt_with(dsdt: u64, facs: u64, blocks: &FadtBlocks) -> Vec<u8> {
    let mut b = vec![0u8; 276 - 36];
    let put =
        |b: &mut Vec<u8>, off: usize, d: &[u8]| b[off - 36..off - 36 + d.len()].copy_from_slice(d);
    put(&mut b, 36, &(facs as u32).to_le_bytes());
    put(&mut b, 40, &(dsdt as u32).to_le_bytes());
    put(&mut b, 46, &9u16.to_le_bytes()); // SCI_INT
    put(&mut b, 56, &u32::from(ports::PM1A_EVT).to_le_bytes());
    put(&mut b, 64, &u32::from(ports::PM1A_CNT).to_le_bytes());
    put(&mut b, 88, &[4]); // PM1_EVT_LEN
    put(&mut b, 89, &[2]); // PM1_CNT_LEN
    if let Some(port) = blocks.pm_timer {
        put(&mut b, 76, &u32::from(port).to_le_bytes()); // PM_TMR_BLK
        put(&mut b, 91, &[4]); // PM_TMR_LEN
        put(&mut b, 208, &gas_io(32, 3, port)); // X_PM_TMR_BLK
    }
    if let Some((port, len)) = blocks.gpe0 {
        put(&mut b, 80, &u32::from(port).to_le_bytes()); // GPE0_BLK
        put(&mut b, 92, &[len]); // GPE0_BLK_LEN
        put(&mut b, 220, &gas_io(len.saturating_mul(8), 1, port)); // X_GPE0_BLK
    }
    put(&mut b, 109, &blocks.boot_arch.to_le_bytes()); // IAPC_BOOT_ARCH
                                                       // Flags: WBINVD, PROC_C1, SLP_BUTTON (no sleep button), RESET_REG_SUP.
    let flags: u32 = 1 | (1 << 2) | (1 << 5) | (1 << 10);
    put(&mut b, 112, &flags.to_le_bytes());
    put(&mut b, 116, &gas_io(8, 1, ports::RESET));
    put(&mut b, 128, &[ports::RESET_VALUE]);
    put(&mut b, 131, &[5]); // minor version 6.5
    put(&mut b, 132, &facs.to_le_bytes());
    put(&mut b, 140, &dsdt.to_le_bytes());
    put(&mut b, 148, &gas_io(32, 2, ports::PM1A_EVT));
    put(&mut b, 172, &gas_io(16, 2, ports::PM1A_CNT));
    sdt(b"FACP", 6, &b)
}

fn facs() -> Vec<u8> {
    let mut v = vec![0u8; 64];
    v[0..4].copy_from_slice(b"FACS");
    v[4..8].copy_from_slice(&64u32.to_le_bytes());
    v[32] = 2; // version
    v
}

/// MADT (revision 5, ACPI 6.3 flags) for `boot` running and `max` possible vCPUs.
fn madt(boot: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for i in 0..max.max(boot) {
        // Online Capable must be 0 when Enabled is set.
        let flags = if i < boot {
            cpu::MADT_ENABLED
        } else {
            cpu::MADT_ONLINE_CAPABLE
        };
        b.extend_from_slice(&cpu::madt_entry(i, flags));
    }
    // IOAPIC id 0 at 0xFEC00000, GSI base 0.
    b.extend_from_slice(&[1, 12, 0, 0]);
    b.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    // ISO: ISA IRQ0 -> GSI 2 (conforming).
    b.extend_from_slice(&[2, 10, 0, 0]);
    b.extend_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    // ISO: IRQ9 (SCI) -> GSI 9, level, active high.
    b.extend_from_slice(&[2, 10, 0, 9]);
    b.extend_from_slice(&9u32.to_le_bytes());
    b.extend_from_slice(&0x000du16.to_le_bytes());
    // Local APIC NMI: all processors, LINT1.
    b.extend_from_slice(&[4, 6, 0xff]);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.push(1);
    if max > cpu::MAX_XAPIC_ID + 1 {
        // Local x2APIC NMI for the x2APIC entries: all processors, LINT1.
        b.extend_from_slice(&[0x0a, 12]);
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[1, 0, 0, 0]);
    }
    sdt(b"APIC", 5, &b)
}

fn mcfg() -> Vec<u8> {
    mcfg_at(ECAM_BASE)
}

/// MCFG for one segment, buses 0–255, ECAM at `base`.
fn mcfg_at(base: u64) -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b.extend_from_slice(&base.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // segment
    b.push(0); // start bus
    b.push(((ECAM_SIZE >> 20) - 1) as u8); // end bus
    b.extend_from_slice(&[0; 4]);
    sdt(b"MCFG", 1, &b)
}

/// `\_SB.PCI0`, the root bus (PNP0A08, segment 0, bus 0) with `crs` as its resources, then
/// `children`, then the hotplug slot devices when `cfg` asks for them: the same device in the
/// direct-boot and the firmware DSDT.
pub(crate) fn pci0_aml(crs: &dyn Aml, children: &[&dyn Aml], cfg: &AcpiConfig) -> Vec<u8> {
    let pci_hid = EISAName::new("PNP0A08");
    let pci_cid = EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let n_hid = Name::new("_HID".into(), &pci_hid);
    let n_cid = Name::new("_CID".into(), &pci_cid);
    let n_adr = Name::new("_ADR".into(), &zero);
    let n_seg = Name::new("_SEG".into(), &zero);
    let n_uid = Name::new("_UID".into(), &zero);
    let n_bbn = Name::new("_BBN".into(), &zero);
    let n_crs = Name::new("_CRS".into(), crs);
    let slots = RawAml(if cfg.pci_hotplug {
        pci::pci0_aml()
    } else {
        Vec::new()
    });
    let mut items: Vec<&dyn Aml> = vec![&n_hid, &n_cid, &n_adr, &n_seg, &n_uid, &n_bbn, &n_crs];
    items.extend_from_slice(children);
    items.push(&slots);
    let mut out = Vec::new();
    Device::new("PCI0".into(), items).to_aml_bytes(&mut out);
    out
}

/// The DSDT's AML, with the hotplug devices `cfg` asks for.
pub fn dsdt_aml(mmio64: std::ops::Range<u64>, cfg: &AcpiConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let bus = AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let m32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO32.start as u32,
        (PCI_MMIO32.end - 1) as u32,
        None,
    );
    let m64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        mmio64.start,
        mmio64.end - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &m32, &m64]);
    let pci = RawAml(pci0_aml(&crs, &[], cfg));
    let com = RawAml(com1_aml());
    let hp = RawAml(hotplug_aml(cfg));
    Scope::new("\\_SB_".into(), vec![&pci, &com, &hp]).to_aml_bytes(&mut out);
    s5_aml(&mut out);
    out
}

/// `Device (COM1)`: the 16550 at 0x3F8, IRQ 4.
fn com1_aml() -> Vec<u8> {
    let zero = aml::ZERO;
    let com_hid = EISAName::new("PNP0501");
    let com_io = IO::new(0x3f8, 0x3f8, 0, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com_crs = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let c_hid = Name::new("_HID".into(), &com_hid);
    let c_uid = Name::new("_UID".into(), &zero);
    let c_crs = Name::new("_CRS".into(), &com_crs);
    let mut out = Vec::new();
    Device::new("COM1".into(), vec![&c_hid, &c_uid, &c_crs]).to_aml_bytes(&mut out);
    out
}

/// The hotplug devices under `\_SB` that `cfg` asks for (empty without hotplug).
fn hotplug_aml(cfg: &AcpiConfig) -> Vec<u8> {
    let mut hp = Vec::new();
    if cfg.cpu_hotplug() {
        hp.extend(cpu::aml(cfg.max_vcpus, ports::CPU_HOTPLUG));
    }
    if cfg.pci_hotplug {
        hp.extend(pci::controller_aml(ports::PCI_HOTPLUG));
    }
    if cfg.ged() {
        hp.extend(ged::aml(
            ports::GED,
            GED_GSI,
            cfg.cpu_hotplug(),
            cfg.pci_hotplug,
        ));
    }
    hp
}

/// `Name (_S5, Package { 5, 5, 0, 0 })`: SLP_TYP 5 powers off.
fn s5_aml(out: &mut Vec<u8>) {
    let zero = aml::ZERO;
    let five: u8 = 5;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&five, &five, &zero, &zero]),
    )
    .to_aml_bytes(out);
}

fn align(a: u64, n: u64) -> u64 {
    a.div_ceil(n) * n
}

/// Every table, each at its guest address.
struct Tables {
    /// (address, bytes), RSDP first.
    blobs: Vec<(u64, Vec<u8>)>,
    /// First byte past the last table.
    end: u64,
}

/// Lays the tables out from [`ACPI_START`]: RSDP, DSDT, FACS, FADT, MADT, MCFG, XSDT.
fn build(cfg: &AcpiConfig) -> Result<Tables, AcpiError> {
    // Validates the counts (1 <= boot <= max <= cpu::MAX_VCPUS).
    cpu::CpuHotplug::new(cfg.boot_vcpus, cfg.max_vcpus)?;
    let mut blobs = Vec::new();
    let mut cur = ACPI_START + 0x40;
    let mut place = |data: Vec<u8>, al: u64| -> u64 {
        cur = align(cur, al);
        let at = cur;
        cur += data.len() as u64;
        blobs.push((at, data));
        at
    };
    let m64 = pci_mmio64_start(cfg.ram);
    let dsdt_addr = place(
        sdt(b"DSDT", 2, &dsdt_aml(m64..m64 + PCI_MMIO64_SIZE, cfg)),
        16,
    );
    let facs_addr = place(facs(), 64);
    let fadt_addr = place(fadt(dsdt_addr, facs_addr), 16);
    let madt_addr = place(madt(cfg.boot_vcpus, cfg.max_vcpus), 16);
    let mcfg_addr = place(mcfg(), 16);
    let mut xb = Vec::new();
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xb.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt_addr = place(sdt(b"XSDT", 1, &xb), 16);
    let end = cur;
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    blobs.insert(0, (ACPI_START, r));
    if end > ACPI_END {
        return Err(AcpiError::TooBig {
            need: end - ACPI_START,
            have: ACPI_END - ACPI_START,
        });
    }
    Ok(Tables { blobs, end })
}

/// Write all tables into guest memory; returns the RSDP address. Nothing is written when the
/// configuration is refused.
pub fn write_tables(mem: &GuestMem, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let t = build(cfg)?;
    debug_assert!(t.end <= ACPI_END);
    for (at, data) in &t.blobs {
        mem.write_slice(data, GuestAddress(*at))?;
    }
    Ok(ACPI_START)
}

#[cfg(test)]
mod firmware_tests;
#[cfg(test)]
mod tests;
