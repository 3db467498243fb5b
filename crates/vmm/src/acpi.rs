//! ACPI tables: RSDP, XSDT, FADT (+FACS), MADT, DSDT, MCFG, written at 0xE0000.
//!
//! The fixed hardware is the PM1a block at I/O 0x600 (event, 4 bytes) and 0x604 (control,
//! 2 bytes), SCI on IRQ 9, and the reset register at I/O 0xCF9 (value 6). See docs/vmm.md.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Package, ResourceTemplate,
    Scope, IO,
};
use acpi_tables::Aml;
use anyhow::Result;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::GuestMem;
use crate::layout::*;

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

fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
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
    put(&mut b, 109, &(1u16 << 2).to_le_bytes()); // IAPC_BOOT_ARCH: no VGA
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

fn madt(cpus: u32) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    b.extend_from_slice(&1u32.to_le_bytes()); // PCAT_COMPAT: 8259s present
    for i in 0..cpus {
        b.extend_from_slice(&[0, 8, i as u8, i as u8]);
        b.extend_from_slice(&1u32.to_le_bytes()); // enabled
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
    sdt(b"APIC", 5, &b)
}

fn mcfg() -> Vec<u8> {
    let mut b = vec![0u8; 8];
    b.extend_from_slice(&ECAM_BASE.to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes()); // segment
    b.push(0); // start bus
    b.push(((ECAM_SIZE >> 20) - 1) as u8); // end bus
    b.extend_from_slice(&[0; 4]);
    sdt(b"MCFG", 1, &b)
}

/// The DSDT's AML.
pub fn dsdt_aml(mmio64: std::ops::Range<u64>) -> Vec<u8> {
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
    let pci_hid = EISAName::new("PNP0A08");
    let pci_cid = EISAName::new("PNP0A03");
    let zero = aml::ZERO;
    let n_hid = Name::new("_HID".into(), &pci_hid);
    let n_cid = Name::new("_CID".into(), &pci_cid);
    let n_adr = Name::new("_ADR".into(), &zero);
    let n_seg = Name::new("_SEG".into(), &zero);
    let n_uid = Name::new("_UID".into(), &zero);
    let n_bbn = Name::new("_BBN".into(), &zero);
    let n_crs = Name::new("_CRS".into(), &crs);
    let pci = Device::new(
        "PCI0".into(),
        vec![&n_hid, &n_cid, &n_adr, &n_seg, &n_uid, &n_bbn, &n_crs],
    );
    let com_hid = EISAName::new("PNP0501");
    let com_io = IO::new(0x3f8, 0x3f8, 0, 8);
    let com_irq = aml::Interrupt::new(true, true, false, false, 4);
    let com_crs = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let c_hid = Name::new("_HID".into(), &com_hid);
    let c_uid = Name::new("_UID".into(), &zero);
    let c_crs = Name::new("_CRS".into(), &com_crs);
    let com = Device::new("COM1".into(), vec![&c_hid, &c_uid, &c_crs]);
    Scope::new("\\_SB_".into(), vec![&pci, &com]).to_aml_bytes(&mut out);
    let five: u8 = 5;
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&five, &five, &zero, &zero]),
    )
    .to_aml_bytes(&mut out);
    out
}

fn align(a: u64, n: u64) -> u64 {
    a.div_ceil(n) * n
}

/// Write all tables into guest memory; returns the RSDP address.
pub fn write_tables(mem: &GuestMem, cpus: u32, ram: u64) -> Result<u64> {
    let rsdp_addr = ACPI_START;
    let mut cur = ACPI_START + 0x40;
    let mut place = |data: &[u8], al: u64| -> Result<u64> {
        cur = align(cur, al);
        let at = cur;
        mem.write_slice(data, GuestAddress(at))?;
        cur += data.len() as u64;
        Ok(at)
    };
    let m64 = pci_mmio64_start(ram);
    let dsdt = sdt(b"DSDT", 2, &dsdt_aml(m64..m64 + PCI_MMIO64_SIZE));
    let dsdt_addr = place(&dsdt, 16)?;
    let facs_addr = place(&facs(), 64)?;
    let fadt_addr = place(&fadt(dsdt_addr, facs_addr), 16)?;
    let madt_addr = place(&madt(cpus), 16)?;
    let mcfg_addr = place(&mcfg(), 16)?;
    let mut xb = Vec::new();
    for a in [fadt_addr, madt_addr, mcfg_addr] {
        xb.extend_from_slice(&a.to_le_bytes());
    }
    let xsdt_addr = place(&sdt(b"XSDT", 1, &xb), 16)?;
    let mut r = vec![0u8; 36];
    r[0..8].copy_from_slice(b"RSD PTR ");
    r[9..15].copy_from_slice(&OEM_ID);
    r[15] = 2;
    r[20..24].copy_from_slice(&36u32.to_le_bytes());
    r[24..32].copy_from_slice(&xsdt_addr.to_le_bytes());
    r[8] = checksum(&r[..20]);
    r[32] = checksum(&r);
    mem.write_slice(&r, GuestAddress(rsdp_addr))?;
    if cur > 0x10_0000 {
        anyhow::bail!("ACPI tables overflow the 0xE0000 area");
    }
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(d: &[u8]) -> u8 {
        d.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero() {
        assert_eq!(sum(&fadt(0x1000, 0x2000)), 0);
        assert_eq!(fadt(0x1000, 0x2000).len(), 276);
        assert_eq!(sum(&madt(4)), 0);
        assert_eq!(madt(2).len(), 44 + 2 * 8 + 12 + 10 + 10 + 6);
        assert_eq!(sum(&mcfg()), 0);
        assert_eq!(mcfg().len(), 60);
    }

    #[test]
    fn rsdp_and_xsdt_in_memory() {
        let mem = crate::boot::create_memory(64 << 20).unwrap();
        let at = write_tables(&mem, 2, 64 << 20).unwrap();
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(at)).unwrap();
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0);
        assert_eq!(sum(&r), 0);
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&sig, b"XSDT");
    }

    #[test]
    fn dsdt_has_s5_and_pci() {
        let a = dsdt_aml(0x1_0000_0000..0x2_0000_0000);
        let has = |n: &[u8]| a.windows(n.len()).any(|w| w == n);
        assert!(has(b"_S5_"));
        assert!(has(b"PCI0"));
        assert!(has(b"COM1"));
    }
}
