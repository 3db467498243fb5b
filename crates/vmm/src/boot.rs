//! Guest memory, kernel/initrd loading and the boot information the kernel reads.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use anyhow::{bail, Context, Result};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryMmap};

use crate::cli::VmConfig;
use crate::layout::*;

/// Guest memory type.
pub type GuestMem = GuestMemoryMmap<()>;

/// How the vCPU must be started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootEntry {
    /// PVH: 32-bit protected flat mode, EBX = start_info.
    Pvh { entry: u64 },
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { entry: u64 },
    /// Firmware: KVM's reset state (real mode, CS base 0xFFFF_0000, IP 0xFFF0: the reset
    /// vector at the top of the firmware image), MTRRs off as after a power-on.
    Firmware,
}

/// Create guest RAM.
pub fn create_memory(ram: u64) -> Result<GuestMem> {
    let ranges: Vec<(GuestAddress, usize)> = ram_regions(ram)
        .into_iter()
        .map(|(s, l)| (GuestAddress(s), l as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges)
        .with_context(|| format!("cannot allocate {} MiB of guest memory", ram >> 20))
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The e820 map the guest sees.
pub fn e820_map(ram: u64) -> Vec<(u64, u64, u32)> {
    let mut v = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
        (0xe0000, 0x20000, E820_RESERVED),
    ];
    for (s, l) in ram_regions(ram) {
        if s == 0 {
            v.push((HIMEM_START, l - HIMEM_START, E820_RAM));
        } else {
            v.push((s, l, E820_RAM));
        }
    }
    v.push((ECAM_BASE, ECAM_SIZE, E820_RESERVED));
    v
}

fn low_ram_top(ram: u64) -> u64 {
    ram.min(LOW_RAM_END)
}

fn is_elf(f: &mut File) -> Result<bool> {
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0))?;
    let n = f.read(&mut magic)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(n == 4 && magic == *b"\x7fELF")
}

/// Load the kernel, initrd, command line and boot information. `rsdp` is the ACPI RSDP address
/// if tables were written.
pub fn load(cfg: &VmConfig, mem: &GuestMem, rsdp: Option<u64>) -> Result<BootEntry> {
    let crate::cli::BootConfig::Kernel {
        kernel: kpath,
        initrd: initrd_path,
        cmdline,
    } = &cfg.boot
    else {
        bail!("a firmware boot has no kernel to load");
    };
    let mut f = File::open(kpath).with_context(|| {
        format!(
            "--kernel {}: cannot open; check the path and permissions",
            kpath.display()
        )
    })?;
    let elf = is_elf(&mut f)?;
    let res = if elf {
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            anyhow::anyhow!(
                "--kernel {}: cannot load this ELF ({e}); give an x86_64 vmlinux",
                kpath.display()
            )
        })?
    } else {
        BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|e| {
            anyhow::anyhow!(
                "--kernel {}: not a kernel: neither an ELF vmlinux nor a bzImage ({e})",
                kpath.display()
            )
        })?
    };
    // Both loaders report the end as an absolute guest address.
    let kernel_end = res.kernel_end;

    // Command line.
    let mut cmd = cmdline.clone().into_bytes();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE))
        .context("cannot write the command line to guest memory")?;

    // Initrd: as high as possible below min(low RAM top, initrd_addr_max).
    let mut initrd: Option<(u64, u64)> = None;
    if let Some(ipath) = initrd_path {
        let data = std::fs::read(ipath)
            .with_context(|| format!("--initrd {}: cannot read", ipath.display()))?;
        let mut max = low_ram_top(cfg.memory.size);
        if let Some(h) = &res.setup_header {
            if h.initrd_addr_max != 0 {
                max = max.min(u64::from(h.initrd_addr_max) + 1);
            }
        }
        let size = data.len() as u64;
        let addr = max.checked_sub(size).map(|a| a & !0xfff).unwrap_or(0);
        if addr < kernel_end.max(HIMEM_START) {
            bail!(
                "--initrd {} ({} MiB) does not fit in guest memory above the kernel; give more --memory",
                ipath.display(),
                size >> 20
            );
        }
        mem.write_slice(&data, GuestAddress(addr))
            .context("cannot write the initrd to guest memory")?;
        initrd = Some((addr, size));
    }

    let e820 = e820_map(cfg.memory.size);
    match res.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) if elf => {
            let mut si = hvm_start_info {
                magic: 0x336e_c578,
                version: 1,
                cmdline_paddr: CMDLINE,
                rsdp_paddr: rsdp.unwrap_or(0),
                memmap_paddr: PVH_MEMMAP,
                memmap_entries: e820.len() as u32,
                ..Default::default()
            };
            if let Some((a, s)) = initrd {
                let m = hvm_modlist_entry {
                    paddr: a,
                    size: s,
                    ..Default::default()
                };
                mem.write_obj(m, GuestAddress(PVH_MODLIST))?;
                si.nr_modules = 1;
                si.modlist_paddr = PVH_MODLIST;
            }
            for (i, (addr, size, ty)) in e820.iter().enumerate() {
                let e = hvm_memmap_table_entry {
                    addr: *addr,
                    size: *size,
                    type_: *ty,
                    reserved: 0,
                };
                mem.write_obj(
                    e,
                    GuestAddress(
                        PVH_MEMMAP + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64,
                    ),
                )?;
            }
            mem.write_obj(si, GuestAddress(PVH_START_INFO))?;
            Ok(BootEntry::Pvh { entry: entry.0 })
        }
        _ => {
            let mut bp = boot_params::default();
            if let Some(h) = res.setup_header {
                bp.hdr = h;
            } else {
                bp.hdr.boot_flag = 0xaa55;
                bp.hdr.header = 0x5372_6448;
                bp.hdr.kernel_alignment = 0x0100_0000;
            }
            bp.hdr.type_of_loader = 0xff;
            bp.hdr.cmd_line_ptr = CMDLINE as u32;
            bp.hdr.cmdline_size = cmd.len() as u32;
            bp.hdr.loadflags |= 0x80; // CAN_USE_HEAP
            bp.hdr.heap_end_ptr = 0xfe00;
            if let Some((a, s)) = initrd {
                bp.hdr.ramdisk_image = a as u32;
                bp.hdr.ramdisk_size = s as u32;
            }
            if let Some(r) = rsdp {
                bp.acpi_rsdp_addr = r;
            }
            for (i, (addr, size, ty)) in e820.iter().enumerate() {
                bp.e820_table[i] = boot_e820_entry {
                    addr: *addr,
                    size: *size,
                    r#type: *ty,
                };
            }
            bp.e820_entries = e820.len() as u8;
            mem.write_obj(bp, GuestAddress(ZERO_PAGE))?;
            let entry = if elf {
                res.kernel_load.0
            } else {
                res.kernel_load.0 + 0x200
            };
            Ok(BootEntry::Linux64 { entry })
        }
    }
}

/// Write the GDT and the identity page tables used by the initial vCPU state.
pub fn write_boot_structures(mem: &GuestMem) -> Result<()> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    // PML4[0] -> PDPT; PDPT[0..4] -> 4 PDs; PDs map 4 GiB with 2 MiB pages.
    mem.write_obj(PDPTE | 0x3, GuestAddress(PML4))?;
    for i in 0..4u64 {
        mem.write_obj((PDE + i * 0x1000) | 0x3, GuestAddress(PDPTE + i * 8))?;
    }
    for i in 0..(4 * 512u64) {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE + i * 8))?;
    }
    debug_assert!(mem.address_in_range(GuestAddress(PDE + 4 * 0x1000 - 1)));
    Ok(())
}

/// GDT: null, 64-bit code (0x8), 32-bit code (0x10), data (0x18), TSS (0x20).
pub const GDT: [u64; 5] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0080_8b00_0000_0000,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_reserves_ecam() {
        let m = e820_map(4 << 30);
        let ram: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(ram, (4 << 30) - (HIMEM_START - EBDA_START));
        assert!(m.iter().any(|e| e.0 == ECAM_BASE && e.2 == E820_RESERVED));
    }
}
