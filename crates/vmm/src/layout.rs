//! x86_64 guest memory map (see docs/vmm.md and the devices/VMM contract).

/// GDT used for the initial vCPU state.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty) for the initial vCPU state.
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_START_INFO: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map entries.
pub const PVH_MEMMAP: u64 = 0x6100;
/// Linux boot protocol zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Identity page tables for the 64-bit boot protocol.
pub const PML4: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE: u64 = 0xa000;
/// Page directories (4 of them, mapping 4 GiB with 2 MiB pages).
pub const PDE: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line accepted (bytes, with the NUL).
pub const CMDLINE_MAX: usize = 0x10000;
/// End of the usable low memory (EBDA starts here).
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables area (RSDP first).
pub const ACPI_START: u64 = 0xe0000;
/// Start of high memory (kernel loading).
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below 4 GiB ends at most here.
pub const LOW_RAM_END: u64 = 0xc000_0000;
/// RAM above this belongs to the second region.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// 32-bit PCI MMIO window.
pub const PCI_MMIO32: std::ops::Range<u64> = 0xc000_0000..0xe000_0000;
/// PCI ECAM (MMCONFIG) base, 256 buses.
pub const ECAM_BASE: u64 = 0xe000_0000;
/// ECAM size.
pub const ECAM_SIZE: u64 = 0x1000_0000;
/// IOAPIC base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) below the IOAPIC.
pub const TSS_ADDR: u64 = 0xfffb_d000;
/// PCI I/O port window.
pub const PCI_IO: std::ops::Range<u16> = 0xc000..0xf000;

/// I/O ports.
pub mod ports {
    /// COM1.
    pub const COM1: u16 = 0x3f8;
    /// i8042 data.
    pub const I8042_DATA: u16 = 0x60;
    /// i8042 command/status.
    pub const I8042_CMD: u16 = 0x64;
    /// CMOS/RTC index.
    pub const CMOS_INDEX: u16 = 0x70;
    /// CMOS/RTC data.
    pub const CMOS_DATA: u16 = 0x71;
    /// Boot timer: any write logs the time since the VMM started.
    pub const BOOT_TIMER: u16 = 0x440;
    /// ACPI PM1a event block (status 0x600, enable 0x602).
    pub const PM1A_EVT: u16 = 0x600;
    /// ACPI PM1a control block (16 bits).
    pub const PM1A_CNT: u16 = 0x604;
    /// ACPI PM timer (`legacy::pm`, 32-bit reads of a 24-bit counter).
    pub const PM_TMR: u16 = 0x608;
    /// ACPI GPE0 block (`legacy::pm`, 16 bytes: status 0x620–0x627, enable 0x628–0x62F).
    pub const GPE0_BLK: u16 = 0x620;
    /// ICH9 SMI_EN (`legacy::pm`, 32 bits, reads APMC_EN after power-on).
    pub const SMI_EN: u16 = 0x630;
    /// ICH9 SMI_STS (`legacy::pm`, 32 bits).
    pub const SMI_STS: u16 = 0x634;
    /// APM control port (`legacy::pm::Apm`; the FADT's SMI_CMD on QEMU).
    pub const APM_CNT: u16 = 0xb2;
    /// APM status port.
    pub const APM_STS: u16 = 0xb3;
    /// ACPI reset register (the reset control register of the PIIX/ICH, 0xCF9).
    pub const RESET: u16 = 0xcf9;
    /// Reset value written to [`RESET`] by the FADT reset register.
    pub const RESET_VALUE: u8 = 0x06;
    // The hotplug registers (crate::hotplug) share one 32-byte block, 0xCD8–0xCF7, just below
    // the PCI configuration ports. Port I/O like the PM1 block, so no MMIO range has to be
    // carved out of the 32-bit hole. Below 0x1000, so Linux never hands the range to a PCI
    // I/O BAR (it allocates I/O from 0x1000 up) and the VMM's own PCI I/O window
    // (0xC000–0xF000) is far away. 0xCD8 is also where QEMU's q35 puts its CPU hotplug block.
    /// vCPU hotplug controller (`hotplug::cpu`, 12 bytes: 0xCD8–0xCE3).
    pub const CPU_HOTPLUG: u16 = 0xcd8;
    /// GED event selector (`hotplug::ged`, 4 bytes: 0xCE4–0xCE7).
    pub const GED: u16 = 0xce4;
    /// PCI hotplug controller of the root bus (`hotplug::pci`, 16 bytes: 0xCE8–0xCF7).
    pub const PCI_HOTPLUG: u16 = 0xce8;
}

/// GSI of the ACPI Generic Event Device (edge-triggered, active high). Free: GSI 0/2 are the
/// PIT, 4 COM1, 9 the SCI, 1/8/12 are the i8042 and RTC lines and 3/6/7/14/15 the other
/// classic ISA lines (COM2, floppy, LPT, IDE) a future device may want; the DSDT has no `_PRT`
/// (PCI devices use MSI-X), and 16–23 are kept for a future PCI INTx routing. An ISA-range GSI
/// takes the path COM1 already takes (irqfd → PIC + IOAPIC pin, edge, the ISA default
/// polarity, so the MADT needs no override).
pub const GED_GSI: u32 = 5;

/// Size of the 64-bit PCI window.
pub const PCI_MMIO64_SIZE: u64 = 64 << 30;

/// Start of the 64-bit PCI window for a guest with `ram` bytes: after the top of RAM,
/// aligned to 1 GiB.
pub fn pci_mmio64_start(ram: u64) -> u64 {
    let top = if ram > LOW_RAM_END {
        HIGH_RAM_START + (ram - LOW_RAM_END)
    } else {
        HIGH_RAM_START
    };
    top.div_ceil(1 << 30) * (1 << 30)
}

/// Guest RAM regions (start, size) for `ram` bytes (direct kernel boot's layout).
pub fn ram_regions(ram: u64) -> Vec<(u64, u64)> {
    Machine::Direct.ram_regions(ram)
}

/// The two platforms rvirt-vmm builds. Direct kernel boot keeps its own compact layout (the
/// kernel reads it from e820/ACPI); firmware boot gets the addresses Debian's OVMF and SeaBIOS
/// are built for on QEMU's q35, because they program the chipset to those values themselves
/// (PCIEXBAR = 0xB000_0000) and assume RAM below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Machine {
    /// Direct kernel boot: RAM up to 3 GiB, ECAM at 0xE000_0000.
    Direct,
    /// Firmware boot, QEMU q35's map: RAM up to 0xB000_0000 (0x8000_0000 when the VM has at
    /// least that much, as QEMU does, leaving a larger 32-bit hole), ECAM at 0xB000_0000,
    /// 32-bit PCI from 0xC000_0000 to the IOAPIC, KVM's TSS out of the flash window.
    Q35,
}

/// q35's ECAM base (the PCIEXBAR value the firmware programs).
pub const Q35_ECAM_BASE: u64 = 0xb000_0000;
/// q35's 32-bit PCI window: after the ECAM up to the IOAPIC.
pub const Q35_PCI_MMIO32: std::ops::Range<u64> = 0xc000_0000..0xfec0_0000;
/// KVM's TSS (3 pages) and identity map page on q35: below the 16 MiB the firmware image
/// may occupy under 4 GiB, as QEMU places them.
pub const Q35_TSS_ADDR: u64 = 0xfeff_c000;
/// The KVM identity map page on q35 (one page, after the TSS).
pub const Q35_IDENTITY_MAP: u64 = 0xfeff_f000;
/// Largest firmware image (code + variable store) mapped under 4 GiB.
pub const FIRMWARE_MAX: u64 = 16 << 20;
// KVM's TSS and identity map page stay out of the firmware window.
const _: () = assert!(Q35_TSS_ADDR + 0x4000 <= (1u64 << 32) - FIRMWARE_MAX);

impl Machine {
    /// Where RAM below 4 GiB ends for a VM with `ram` bytes.
    pub fn low_ram_end(self, ram: u64) -> u64 {
        let end = match self {
            Machine::Direct => LOW_RAM_END,
            Machine::Q35 if ram >= Q35_ECAM_BASE => 0x8000_0000,
            Machine::Q35 => Q35_ECAM_BASE,
        };
        ram.min(end)
    }

    /// Guest RAM regions (start, size) for `ram` bytes.
    pub fn ram_regions(self, ram: u64) -> Vec<(u64, u64)> {
        let low = self.low_ram_end(ram);
        if ram <= low {
            vec![(0, ram)]
        } else {
            vec![(0, low), (HIGH_RAM_START, ram - low)]
        }
    }

    /// The ECAM base.
    pub fn ecam_base(self) -> u64 {
        match self {
            Machine::Direct => ECAM_BASE,
            Machine::Q35 => Q35_ECAM_BASE,
        }
    }

    /// The 32-bit PCI window.
    pub fn mmio32(self) -> std::ops::Range<u64> {
        match self {
            Machine::Direct => PCI_MMIO32,
            Machine::Q35 => Q35_PCI_MMIO32,
        }
    }

    /// KVM's TSS address.
    pub fn tss_addr(self) -> u64 {
        match self {
            Machine::Direct => TSS_ADDR,
            Machine::Q35 => Q35_TSS_ADDR,
        }
    }

    /// Start of the 64-bit PCI window: after the top of RAM, aligned to 1 GiB.
    pub fn mmio64_start(self, ram: u64) -> u64 {
        let top = match self.ram_regions(ram).as_slice() {
            [_, (s, l)] => s + l,
            _ => HIGH_RAM_START,
        };
        top.div_ceil(1 << 30) * (1 << 30)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_at_3g() {
        assert_eq!(ram_regions(512 << 20), vec![(0, 512 << 20)]);
        assert_eq!(ram_regions(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
        assert_eq!(pci_mmio64_start(512 << 20), 4 << 30);
        assert_eq!(pci_mmio64_start(4 << 30), 5 << 30);
        assert_eq!(Machine::Direct.mmio64_start(4 << 30), 5 << 30);
    }

    #[test]
    fn q35_keeps_ram_below_the_ecam() {
        let q = Machine::Q35;
        assert_eq!(q.ram_regions(512 << 20), vec![(0, 512 << 20)]);
        // Up to 2.75 GiB fits below the ECAM.
        assert_eq!(q.ram_regions(0xb000_0000 - 1).len(), 1);
        // From 2.75 GiB on the split moves to 2 GiB, as QEMU's q35.
        assert_eq!(
            q.ram_regions(3 << 30),
            vec![(0, 2 << 30), (4 << 30, 1 << 30)]
        );
        for ram in [64 << 20, 0xb000_0000, 8 << 30] {
            for (s, l) in q.ram_regions(ram) {
                let r = s..s + l;
                assert!(!r.contains(&Q35_ECAM_BASE) && !r.contains(&Q35_TSS_ADDR));
            }
        }
        assert_eq!(q.mmio64_start(3 << 30), 5 << 30);
    }
}
