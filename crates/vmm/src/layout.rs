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
    /// ACPI reset register (the reset control register of the PIIX/ICH, 0xCF9).
    pub const RESET: u16 = 0xcf9;
    /// Reset value written to [`RESET`] by the FADT reset register.
    pub const RESET_VALUE: u8 = 0x06;
}

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

/// Guest RAM regions (start, size) for `ram` bytes.
pub fn ram_regions(ram: u64) -> Vec<(u64, u64)> {
    if ram <= LOW_RAM_END {
        vec![(0, ram)]
    } else {
        vec![(0, LOW_RAM_END), (HIGH_RAM_START, ram - LOW_RAM_END)]
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
    }
}
