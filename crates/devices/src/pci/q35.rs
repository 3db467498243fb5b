//! The two chipset functions of QEMU's q35 that firmware looks for before anything else: the
//! MCH host bridge at 00:00.0 (8086:29C0) and the ICH9 LPC bridge at 00:1f.0 (8086:2918).
//!
//! Debian's OVMF picks its whole platform code path from the host bridge's device id (an
//! unknown id makes every timer delay hang), and SeaBIOS only believes it runs on QEMU (and so
//! reads fw_cfg files: ACPI tables, boot order) when the bridge's subsystem is 1af4:1100. The
//! LPC bridge is where both find the ISA devices (PS/2, COM1) and where they program the ACPI
//! PM base. Neither function does more than keep what the firmware writes: rvirt's PM block and
//! ECAM stay at the addresses these firmware images program (0x600, 0xB000_0000), and a
//! different value is reported once, not followed.

use super::{ConfigWriteEffect, PciConfigSpace, PciDevice, PciIds};
use crate::guest_warn;

const VENDOR_INTEL: u16 = 0x8086;
const VENDOR_REDHAT_QUMRANET: u16 = 0x1af4;
/// QEMU's subsystem id for its machines (SeaBIOS's "running on QEMU" test).
const SUBSYSTEM_QEMU: u16 = 0x1100;
/// Q35 MCH (82G33 DRAM controller).
pub const DEVICE_Q35_MCH: u16 = 0x29c0;
/// ICH9 LPC interface controller.
pub const DEVICE_ICH9_LPC: u16 = 0x2918;
/// The LPC bridge's slot: 00:1f.0.
pub const LPC_SLOT: u8 = 0x1f;

/// MCH register PCIEXBAR (64-bit): ECAM base, size and enable.
const MCH_PCIEXBAR: usize = 0x60;
/// LPC register PMBASE: ACPI PM I/O base (bit 0 reads 1: an I/O address).
const LPC_PMBASE: usize = 0x40;
/// LPC register ACPI_CNTL: bit 7 enables the PM I/O decode.
const LPC_ACPI_CNTL: usize = 0x44;
/// The header type byte: bit 7 = multi-function (the ICH9's other functions share slot 31).
const HEADER_TYPE: usize = 0x0e;
const DEVICE_SPECIFIC: usize = 0x40;
const STD_END: usize = 0x100;

/// Device-specific bytes 0x40..0x100 keep what the guest writes (chipset registers the
/// firmware programs and reads back), the standard header is handled by the config space.
fn write_chipset(
    cs: &mut PciConfigSpace,
    reg: usize,
    offset: usize,
    data: &[u8],
) -> ConfigWriteEffect {
    let at = reg * 4 + offset;
    if (DEVICE_SPECIFIC..STD_END).contains(&at) && at + data.len() <= STD_END {
        for (i, b) in data.iter().enumerate() {
            cs.write_byte_raw(at + i, *b);
        }
        ConfigWriteEffect::default()
    } else {
        cs.write_reg(reg, offset, data)
    }
}

fn read_u32(cs: &PciConfigSpace, at: usize) -> u32 {
    let mut b = [0u8; 4];
    cs.read(at, &mut b);
    u32::from_le_bytes(b)
}

/// The q35 MCH host bridge.
#[derive(Debug)]
pub struct Q35Host {
    config: PciConfigSpace,
    ecam_base: u64,
    warned: bool,
}

impl Q35Host {
    /// A host bridge whose ECAM is at `ecam_base` (reported when the firmware programs
    /// PCIEXBAR elsewhere).
    pub fn new(ecam_base: u64) -> Self {
        Q35Host {
            config: PciConfigSpace::new(PciIds {
                vendor: VENDOR_INTEL,
                device: DEVICE_Q35_MCH,
                class: 0x06_00_00,
                revision: 0,
                subsystem_vendor: VENDOR_REDHAT_QUMRANET,
                subsystem: SUBSYSTEM_QEMU,
            }),
            ecam_base,
            warned: false,
        }
    }

    /// The PCIEXBAR value the guest programmed (0 until it does).
    pub fn pciexbar(&self) -> u64 {
        u64::from(read_u32(&self.config, MCH_PCIEXBAR))
            | u64::from(read_u32(&self.config, MCH_PCIEXBAR + 4)) << 32
    }
}

impl PciDevice for Q35Host {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) -> ConfigWriteEffect {
        let e = write_chipset(&mut self.config, reg, offset, data);
        let bar = self.pciexbar();
        // Bit 0 enables the ECAM; bits 35:28 hold the base of the 256 MiB window.
        if bar & 1 != 0 && bar & 0xf_f000_0000 != self.ecam_base && !self.warned {
            self.warned = true;
            guest_warn!(
                "q35: the guest moved PCIEXBAR to {:#x}; the ECAM stays at {:#x}",
                bar & 0xf_f000_0000,
                self.ecam_base
            );
        }
        e
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

/// The ICH9 LPC bridge (an ISA bridge, class 0601).
#[derive(Debug)]
pub struct Ich9Lpc {
    config: PciConfigSpace,
    pm_base: u16,
    warned: bool,
}

impl Ich9Lpc {
    /// An LPC bridge whose ACPI PM block is fixed at `pm_base`.
    pub fn new(pm_base: u16) -> Self {
        let mut config = PciConfigSpace::new(PciIds {
            vendor: VENDOR_INTEL,
            device: DEVICE_ICH9_LPC,
            class: 0x06_01_00,
            revision: 2,
            subsystem_vendor: VENDOR_REDHAT_QUMRANET,
            subsystem: SUBSYSTEM_QEMU,
        });
        config.write_byte_raw(HEADER_TYPE, 0x80);
        // PMBASE's bit 0 is hard-wired to 1 (an I/O base).
        config.write_byte_raw(LPC_PMBASE, 1);
        Ich9Lpc {
            config,
            pm_base,
            warned: false,
        }
    }

    /// The PM base the guest programmed and whether it enabled the decode.
    pub fn pm_decode(&self) -> (u16, bool) {
        let base = (read_u32(&self.config, LPC_PMBASE) & 0xff80) as u16;
        let mut c = [0u8; 1];
        self.config.read(LPC_ACPI_CNTL, &mut c);
        (base, c[0] & 0x80 != 0)
    }
}

impl PciDevice for Ich9Lpc {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }
    fn write_config_register(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) -> ConfigWriteEffect {
        let e = write_chipset(&mut self.config, reg, offset, data);
        let mut b = [0u8; 1];
        self.config.read(LPC_PMBASE, &mut b);
        self.config.write_byte_raw(LPC_PMBASE, b[0] | 1);
        let (base, on) = self.pm_decode();
        if on && base != self.pm_base && !self.warned {
            self.warned = true;
            guest_warn!(
                "ich9-lpc: the guest set PMBASE to {base:#x}; the ACPI PM block stays at {:#x}",
                self.pm_base
            );
        }
        e
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(d: &mut dyn PciDevice, at: usize, len: usize) -> u32 {
        let v = d.read_config_register(at / 4);
        let shift = (at % 4) * 8;
        let mask = if len == 4 {
            u32::MAX
        } else {
            (1 << (len * 8)) - 1
        };
        (v >> shift) & mask
    }

    fn wr(d: &mut dyn PciDevice, at: usize, v: &[u8]) {
        d.write_config_register(at / 4, at % 4, v);
    }

    #[test]
    fn mch_identifies_as_q35_on_qemu() {
        let mut h = Q35Host::new(0xb000_0000);
        assert_eq!(rd(&mut h, 0, 2), 0x8086);
        assert_eq!(rd(&mut h, 2, 2), 0x29c0);
        assert_eq!(rd(&mut h, 0x2c, 2), 0x1af4);
        assert_eq!(rd(&mut h, 0x2e, 2), 0x1100);
        assert_eq!(rd(&mut h, 0x08, 4) >> 8, 0x06_00_00);
        // OVMF's PciExBarInitialization: 0x64 = 0, 0x60 = 0, then base | enable.
        wr(&mut h, 0x64, &0u32.to_le_bytes());
        wr(&mut h, 0x60, &0u32.to_le_bytes());
        wr(&mut h, 0x60, &0xb000_0001u32.to_le_bytes());
        assert_eq!(rd(&mut h, 0x60, 4), 0xb000_0001);
        assert_eq!(h.pciexbar(), 0xb000_0001);
        // PAM registers keep their values (SeaBIOS's shadow RAM unlock reads them back).
        wr(&mut h, 0x90, &[0x30]);
        assert_eq!(rd(&mut h, 0x90, 1), 0x30);
        // Writes crossing the end of the standard space are not taken as chipset bytes.
        wr(&mut h, 0xfe, &[1, 2, 3, 4]);
    }

    #[test]
    fn lpc_is_an_ich9_isa_bridge_with_pm_base() {
        let mut l = Ich9Lpc::new(0x600);
        assert_eq!(rd(&mut l, 2, 2), 0x2918);
        assert_eq!(rd(&mut l, 0x08, 4) >> 8, 0x06_01_00);
        assert_eq!(rd(&mut l, 0x08, 1), 2);
        assert_eq!(rd(&mut l, 0x0e, 1) & 0x80, 0x80, "multi-function header");
        assert_eq!(l.pm_decode(), (0, false));
        // The firmware programs PMBASE and then enables the decode.
        wr(&mut l, 0x40, &0x600u32.to_le_bytes());
        assert_eq!(rd(&mut l, 0x40, 4), 0x601, "bit 0 is hard-wired");
        wr(&mut l, 0x44, &[0x80]);
        assert_eq!(l.pm_decode(), (0x600, true));
        // PIRQ routing and RCBA read back.
        wr(&mut l, 0x60, &[10, 10, 11, 11]);
        assert_eq!(rd(&mut l, 0x60, 4), 0x0b0b_0a0a);
        wr(&mut l, 0xf0, &0xfed1_c001u32.to_le_bytes());
        assert_eq!(rd(&mut l, 0xf0, 4), 0xfed1_c001);
        // Read-only identity is not writable.
        wr(&mut l, 0x00, &[0, 0, 0, 0]);
        assert_eq!(rd(&mut l, 0, 2), 0x8086);
    }
}
