//! ACPI tables for firmware boot (OVMF, SeaBIOS), served through fw_cfg's linker/loader.
//!
//! The firmware, not the VMM, places the tables: [`firmware_blobs`] returns the tables as one
//! blob whose pointer fields hold offsets from the blob start, the RSDP as a second blob, and
//! the `etc/table-loader` commands that allocate both, add the real addresses to every
//! pointer and then recompute every checksum. OVMF installs each table some ADD_POINTER
//! targets (and builds its own RSDP/RSDT/XSDT); SeaBIOS keeps the blobs where it put them
//! and finds the RSDP in the F segment, then the FADT through the RSDT.
//!
//! The platform is the q35 subset of issue #11: ECAM at 0xB0000000, the ICH9 PM block at
//! 0x600 (timer at 0x608, GPE0 at 0x620), the LPC bridge at 00:1f.0 with the PS/2
//! controller, RTC and COM1 behind it, and fw_cfg at 0x510.

use std::ops::Range;

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::Aml;

use super::loader::{Loader, ZONE_FSEG, ZONE_HIGH};
use super::{
    com1_aml, facs, fadt_with, hotplug_aml, madt, mcfg_at, s5_aml, sdt, AcpiConfig, AcpiError,
    FadtBlocks, OEM_ID,
};
use crate::hotplug::{cpu, RawAml};
use crate::legacy::fw_cfg;

/// fw_cfg file with every table, concatenated.
pub const TABLES_FILE: &str = "etc/acpi/tables";
/// fw_cfg file with the RSDP.
pub const RSDP_FILE: &str = "etc/acpi/rsdp";
/// fw_cfg file with the linker/loader commands.
pub const LOADER_FILE: &str = "etc/table-loader";

/// q35's ECAM (MCH PCIEXBAR as SeaBIOS and OVMF program it), 256 buses.
pub const Q35_ECAM_BASE: u64 = 0xb000_0000;
/// 32-bit PCI window of the firmware-mode `_CRS`: from the end of the ECAM to just below the
/// IOAPIC, as QEMU's q35 declares it. OVMF allocates below 0xFC000000 and SeaBIOS below
/// 0xFEC00000, both inside; the IOAPIC, HPET, LAPIC and flash ranges stay outside.
pub const Q35_MMIO32: Range<u64> = 0xc000_0000..0xfec0_0000;
/// ICH9 PM base as OVMF programs it (PM1a event block).
pub const PM_BASE: u16 = 0x600;
/// PM timer (PM_BASE + 8, 4 bytes, 3.579545 MHz, read as 24 bits: TMR_VAL_EXT is clear).
pub const PM_TIMER: u16 = PM_BASE + 8;
/// GPE0 block (PM_BASE + 0x20).
pub const GPE0_BLK: u16 = PM_BASE + 0x20;
/// GPE0 block length in bytes (status then enable halves).
pub const GPE0_LEN: u8 = 16;
/// First GSI of the legacy PCI INTx lines (see [`intx_gsi`]).
pub const INTX_GSI_BASE: u32 = 16;

/// IAPC_BOOT_ARCH bits.
const BOOT_ARCH_LEGACY_DEVICES: u16 = 1 << 0;
const BOOT_ARCH_8042: u16 = 1 << 1;
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;

/// What the firmware-mode tables describe beyond [`AcpiConfig`] (whose `ram` they ignore: the
/// 64-bit window is given here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwarePlatform {
    /// ECAM base for the MCFG (buses 0–255).
    pub ecam_base: u64,
    /// 32-bit PCI MMIO window of `\_SB.PCI0._CRS` (end exclusive, below 4 GiB).
    pub mmio32: Range<u64>,
    /// 64-bit PCI MMIO window of `\_SB.PCI0._CRS` (end exclusive): must cover where the
    /// firmware puts 64-bit BARs.
    pub mmio64: Range<u64>,
    /// A VGA-compatible display is present: the FADT then does not say "VGA not present"
    /// and `_CRS` gains the legacy VGA window 0xA0000–0xBFFFF.
    pub vga: bool,
}

impl FirmwarePlatform {
    /// The q35 subset with the 64-bit window `mmio64`.
    pub fn q35(mmio64: Range<u64>, vga: bool) -> Self {
        Self {
            ecam_base: Q35_ECAM_BASE,
            mmio32: Q35_MMIO32,
            mmio64,
            vga,
        }
    }
}

/// The three fw_cfg files of the ACPI linker/loader interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwCfgAcpi {
    /// [`TABLES_FILE`]: FACS, DSDT, FADT, MADT, MCFG, RSDT, XSDT.
    pub tables: Vec<u8>,
    /// [`RSDP_FILE`]: the 36-byte RSDP (revision 2).
    pub rsdp: Vec<u8>,
    /// [`LOADER_FILE`]: 128-byte commands.
    pub loader: Vec<u8>,
}

impl FwCfgAcpi {
    /// `(name, contents)` of each file, to add to the fw_cfg device.
    pub fn files(&self) -> [(&'static str, &[u8]); 3] {
        [
            (TABLES_FILE, &self.tables),
            (RSDP_FILE, &self.rsdp),
            (LOADER_FILE, &self.loader),
        ]
    }
}

/// GSI of INTx `pin` (0 = INTA .. 3 = INTD) of a device in root bus slot `slot`, as the
/// firmware-mode `_PRT` declares it: the usual swizzle `16 + (slot + pin) % 4`. The VMM must
/// route that INTx to that IOAPIC pin, level-triggered, active low. Virtio devices use MSI-X;
/// this is the fallback for a guest or device without it.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    INTX_GSI_BASE + (u32::from(slot) + u32::from(pin)) % 4
}

/// ISA `IRQNoFlags` descriptor (edge, active high, exclusive) for `irq` (< 16).
fn irq_no_flags(irq: u8) -> RawAml {
    let mask = 1u16 << (irq & 15);
    RawAml(vec![0x22, mask as u8, (mask >> 8) as u8])
}

/// An ISA device `name` with `_HID` EISA id `hid`, `_UID` and `_CRS` = `io` ports (each
/// `(port, length)`) and one IRQ.
fn isa_device(name: &str, hid: &str, io: &[(u16, u8)], irq: u8) -> Vec<u8> {
    let ios: Vec<IO> = io.iter().map(|&(p, l)| IO::new(p, p, 1, l)).collect();
    let irq = irq_no_flags(irq);
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    res.push(&irq);
    let crs = ResourceTemplate::new(res);
    let hid = EISAName::new(hid);
    let n_hid = Name::new("_HID".into(), &hid);
    let n_uid = Name::new("_UID".into(), &aml::ZERO);
    let n_crs = Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    Device::new(name.into(), vec![&n_hid, &n_uid, &n_crs]).to_aml_bytes(&mut out);
    out
}

/// `Device (ISA_)`: the ICH9 LPC bridge (00:1f.0) and the legacy devices behind it.
fn lpc_aml() -> Vec<u8> {
    let adr: u32 = 0x001f_0000;
    let n_adr = Name::new("_ADR".into(), &adr);
    let kbd = RawAml(isa_device("KBD_", "PNP0303", &[(0x60, 1), (0x64, 1)], 1));
    let mou = RawAml(isa_device("MOU_", "PNP0F13", &[], 12));
    let rtc = RawAml(isa_device("RTC_", "PNP0B00", &[(0x70, 2)], 8));
    let com = RawAml(com1_aml());
    let mut out = Vec::new();
    Device::new("ISA_".into(), vec![&n_adr, &kbd, &mou, &rtc, &com]).to_aml_bytes(&mut out);
    out
}

/// `Device (FWCF)`: QEMU's fw_cfg (selector, data and DMA ports), so that Linux's
/// `qemu_fw_cfg` driver finds it.
fn fw_cfg_aml() -> Vec<u8> {
    let n_hid = Name::new("_HID".into(), &"QEMU0002");
    let sta: u8 = 0x0b; // present, enabled, not shown in the UI
    let n_sta = Name::new("_STA".into(), &sta);
    let io = IO::new(
        fw_cfg::PORT_BASE,
        fw_cfg::PORT_BASE,
        1,
        fw_cfg::PORT_LEN as u8,
    );
    let crs = ResourceTemplate::new(vec![&io]);
    let n_crs = Name::new("_CRS".into(), &crs);
    let mut out = Vec::new();
    Device::new("FWCF".into(), vec![&n_hid, &n_sta, &n_crs]).to_aml_bytes(&mut out);
    out
}

/// `Name (_PRT, ...)`: INTA–INTD of root bus slots 1–31 to GSIs [`intx_gsi`].
fn prt_aml() -> Vec<u8> {
    let mut entries: Vec<(u32, u8, u32)> = Vec::new();
    for slot in 1u8..32 {
        for pin in 0u8..4 {
            entries.push(((u32::from(slot) << 16) | 0xffff, pin, intx_gsi(slot, pin)));
        }
    }
    let zero = aml::ZERO;
    let pkgs: Vec<Package> = entries
        .iter()
        .map(|(adr, pin, gsi)| Package::new(vec![adr, pin, &zero, gsi]))
        .collect();
    let prt = Package::new(pkgs.iter().map(|p| p as &dyn Aml).collect());
    let mut out = Vec::new();
    Name::new("_PRT".into(), &prt).to_aml_bytes(&mut out);
    out
}

/// The firmware-mode DSDT's AML.
pub fn dsdt_aml(cfg: &AcpiConfig, p: &FirmwarePlatform) -> Vec<u8> {
    let bus = AddressSpace::new_bus_number(0u16, 0xffu16);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::new_io(0u16, 0xcf7u16, None);
    let io_hi = AddressSpace::new_io(0xd00u16, 0xffffu16, None);
    let vga = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        0xa_0000u32,
        0xb_ffffu32,
        None,
    );
    let m32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        p.mmio32.start as u32,
        (p.mmio32.end - 1) as u32,
        None,
    );
    let m64 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        p.mmio64.start,
        p.mmio64.end - 1,
        None,
    );
    let mut res: Vec<&dyn Aml> = vec![&bus, &cfg_io, &io_lo, &io_hi];
    if p.vga {
        res.push(&vga);
    }
    res.extend([&m32 as &dyn Aml, &m64]);
    let crs = ResourceTemplate::new(res);
    let prt = RawAml(prt_aml());
    let lpc = RawAml(lpc_aml());
    let fwcf = RawAml(fw_cfg_aml());
    let pci0 = RawAml(super::pci0_aml(&crs, &[&prt, &lpc, &fwcf], cfg));
    let hp = RawAml(hotplug_aml(cfg));
    let mut out = Vec::new();
    Scope::new("\\_SB_".into(), vec![&pci0, &hp]).to_aml_bytes(&mut out);
    s5_aml(&mut out);
    out
}

/// The tables blob being laid out, and the loader commands that fix it up.
struct Layout {
    blob: Vec<u8>,
    loader: Loader,
}

impl Layout {
    /// Appends `table` at the next multiple of `align`; returns its offset.
    fn place(&mut self, table: Vec<u8>, align: usize) -> u32 {
        let at = self.blob.len().div_ceil(align) * align;
        self.blob.resize(at, 0);
        self.blob.extend_from_slice(&table);
        at as u32
    }

    /// Writes `value` (an offset in the tables blob) at `table + field` and links it.
    fn link(&mut self, table: u32, field: u32, size: u8, value: u32) {
        let at = (table + field) as usize;
        let v = u64::from(value).to_le_bytes();
        self.blob[at..at + usize::from(size)].copy_from_slice(&v[..usize::from(size)]);
        self.loader
            .add_pointer(TABLES_FILE, TABLES_FILE, table + field, size);
    }

    /// Zeroes the checksum of the table at `at` and has the loader compute it, after the
    /// pointers added so far (the loader runs commands in order).
    fn checksum(&mut self, at: u32) {
        let a = at as usize;
        let len = u32::from_le_bytes([
            self.blob[a + 4],
            self.blob[a + 5],
            self.blob[a + 6],
            self.blob[a + 7],
        ]);
        self.blob[a + 9] = 0;
        self.loader.add_checksum(TABLES_FILE, at + 9, at, len);
    }
}

/// A system description table whose entries are the 4- or 8-byte pointers `entries`.
fn root_table(sig: &[u8; 4], size: u8, entries: usize) -> Vec<u8> {
    sdt(sig, 1, &vec![0u8; usize::from(size) * entries])
}

fn check(cfg: &AcpiConfig, p: &FirmwarePlatform) -> Result<(), AcpiError> {
    // Validates the counts (1 <= boot <= max <= cpu::MAX_VCPUS).
    cpu::CpuHotplug::new(cfg.boot_vcpus, cfg.max_vcpus)?;
    let bad = |what: &'static str, r: &Range<u64>| AcpiError::Window {
        what,
        start: r.start,
        end: r.end,
    };
    if p.mmio32.start >= p.mmio32.end || p.mmio32.end > 1 << 32 {
        return Err(bad("32-bit", &p.mmio32));
    }
    if p.mmio64.start >= p.mmio64.end {
        return Err(bad("64-bit", &p.mmio64));
    }
    Ok(())
}

/// The fw_cfg files with rvirt's tables for firmware boot: MADT as in direct boot, MCFG at
/// `platform.ecam_base`, FADT with the q35 PM block, and the firmware-mode DSDT.
pub fn firmware_blobs(
    cfg: &AcpiConfig,
    platform: &FirmwarePlatform,
) -> Result<FwCfgAcpi, AcpiError> {
    check(cfg, platform)?;
    let mut l = Layout {
        blob: Vec::new(),
        loader: Loader::new(),
    };
    l.loader.allocate(TABLES_FILE, 64, ZONE_HIGH);
    l.loader.allocate(RSDP_FILE, 16, ZONE_FSEG);

    // FACS first: it needs 64-byte alignment, which the allocation gives offset 0.
    let facs_at = l.place(facs(), 64);
    let dsdt_at = l.place(sdt(b"DSDT", 2, &dsdt_aml(cfg, platform)), 16);
    l.checksum(dsdt_at);
    let mut boot_arch = BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042;
    if !platform.vga {
        boot_arch |= BOOT_ARCH_NO_VGA;
    }
    let blocks = FadtBlocks {
        pm_timer: Some(PM_TIMER),
        gpe0: Some((GPE0_BLK, GPE0_LEN)),
        boot_arch,
    };
    let fadt_at = l.place(fadt_with(0, 0, &blocks), 16);
    l.link(fadt_at, 36, 4, facs_at); // FIRMWARE_CTRL
    l.link(fadt_at, 40, 4, dsdt_at); // DSDT
    l.link(fadt_at, 132, 8, facs_at); // X_FIRMWARE_CTRL
    l.link(fadt_at, 140, 8, dsdt_at); // X_DSDT
    l.checksum(fadt_at);
    let madt_at = l.place(madt(cfg.boot_vcpus, cfg.max_vcpus), 16);
    l.checksum(madt_at);
    let mcfg_at_ = l.place(mcfg_at(platform.ecam_base), 16);
    l.checksum(mcfg_at_);
    let tables = [fadt_at, madt_at, mcfg_at_];
    // An RSDT as well as the XSDT: SeaBIOS looks for the FADT through the RSDT only.
    let rsdt_at = l.place(root_table(b"RSDT", 4, tables.len()), 16);
    for (i, &t) in tables.iter().enumerate() {
        l.link(rsdt_at, 36 + 4 * i as u32, 4, t);
    }
    l.checksum(rsdt_at);
    let xsdt_at = l.place(root_table(b"XSDT", 8, tables.len()), 16);
    for (i, &t) in tables.iter().enumerate() {
        l.link(xsdt_at, 36 + 8 * i as u32, 8, t);
    }
    l.checksum(xsdt_at);

    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[16..20].copy_from_slice(&rsdt_at.to_le_bytes());
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&u64::from(xsdt_at).to_le_bytes());
    l.loader.add_pointer(RSDP_FILE, TABLES_FILE, 16, 4);
    l.loader.add_pointer(RSDP_FILE, TABLES_FILE, 24, 8);
    // The 20-byte checksum first: the extended one covers it.
    l.loader.add_checksum(RSDP_FILE, 8, 0, 20);
    l.loader.add_checksum(RSDP_FILE, 32, 0, 36);
    Ok(FwCfgAcpi {
        tables: l.blob,
        rsdp: r,
        loader: l.loader.into_bytes(),
    })
}
