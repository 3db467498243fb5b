//! Firmware boot: the code image (SeaBIOS `bios-256k.bin`, OVMF `OVMF_CODE_4M.fd`) as a
//! read-only KVM memory slot ending at 4 GiB, where the vCPU's reset state (CS base
//! 0xFFFF_0000, IP 0xFFF0) starts it, and its last 128 KiB copied to 0xE0000 in RAM, where
//! a PC's BIOS area aliases the top of the flash (SeaBIOS jumps there from the reset vector and
//! then makes it writable to shadow itself; OVMF never looks). Code cannot execute from MMIO,
//! so the image must be a memslot; read-only, so guest writes to it exit to the VMM (and are
//! ignored) instead of changing the firmware.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{Bytes, GuestAddress, MmapRegion};

use crate::boot::GuestMem;
use crate::layout::{ports, Machine, FIRMWARE_MAX, Q35_TSS_ADDR};
use crate::legacy::fw_cfg::{self, FwCfg};

/// KVM slot of the firmware code (RAM takes slots from 0; two regions at most).
const CODE_SLOT: u32 = 16;
/// The legacy BIOS area below 1 MiB that mirrors the top of the firmware image.
const BIOS_AREA: u64 = 0xe0000;
const BIOS_AREA_LEN: u64 = 0x20000;
const FOUR_GIB: u64 = 1 << 32;
const BLOCK: u64 = 4096;

/// Where Debian keeps the images, for the error messages.
const HINT: &str = "Debian's seabios package has /usr/share/seabios/bios-256k.bin, its ovmf package /usr/share/OVMF/OVMF_CODE_4M.fd (with OVMF_VARS_4M.fd as the template of --nvram)";

fn image_len(path: &Path, what: &str) -> Result<u64> {
    let md = std::fs::metadata(path)
        .with_context(|| format!("{what} {}: cannot read the file; {HINT}", path.display()))?;
    if !md.is_file() {
        bail!("{what} {}: not a regular file; {HINT}", path.display());
    }
    let len = md.len();
    if len == 0 || !len.is_multiple_of(BLOCK) {
        bail!(
            "{what} {}: {len} bytes is not a firmware image (a non-empty multiple of 4 KiB); {HINT}",
            path.display()
        );
    }
    Ok(len)
}

/// Checks the images of a firmware boot: both exist, are whole 4 KiB blocks and fit the
/// 16 MiB under 4 GiB that is kept free for them.
pub fn check_images(firmware: &Path, nvram: Option<&Path>) -> Result<()> {
    let code = image_len(firmware, "firmware (boot.firmware, --firmware)")?;
    let vars = match nvram {
        Some(n) => image_len(n, "variable store (boot.nvram, --nvram)")?,
        None => 0,
    };
    if code + vars > FIRMWARE_MAX {
        bail!(
            "firmware {} ({code} bytes) and its variable store ({vars} bytes) exceed the {} MiB mapped below 4 GiB; use OVMF_CODE_4M.fd / bios-256k.bin",
            firmware.display(),
            FIRMWARE_MAX >> 20
        );
    }
    Ok(())
}

/// The firmware code mapped into the VM. Keeps the host mapping alive as long as the VM.
pub struct FirmwareImage {
    _region: MmapRegion,
    /// Guest address of the first byte (4 GiB - size).
    pub base: u64,
    pub size: u64,
    pub path: PathBuf,
}

/// Reads `path` into a new anonymous mapping, registers it read-only so that it ends at
/// 4 GiB, and copies its top 128 KiB to the BIOS area of `mem`.
pub fn map_code(vm: &VmFd, mem: &GuestMem, path: &Path) -> Result<FirmwareImage> {
    let size = image_len(path, "firmware (boot.firmware, --firmware)")?;
    if size > FIRMWARE_MAX {
        bail!(
            "firmware {}: {size} bytes is more than the {} MiB mapped below 4 GiB",
            path.display(),
            FIRMWARE_MAX >> 20
        );
    }
    let region = MmapRegion::new(size as usize).context("mapping the firmware image")?;
    let mut f =
        File::open(path).with_context(|| format!("firmware {}: cannot open", path.display()))?;
    // SAFETY: the mapping is private to this function until it is registered below, `size`
    // bytes long, and no other reference to its memory exists while the slice lives.
    let buf = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), size as usize) };
    f.read_exact(buf)
        .with_context(|| format!("firmware {}: cannot read", path.display()))?;
    let top = &buf[buf.len().saturating_sub(BIOS_AREA_LEN as usize)..];
    let at = BIOS_AREA + BIOS_AREA_LEN - top.len() as u64;
    mem.write_slice(top, GuestAddress(at))
        .context("copying the firmware's top 128 KiB to the BIOS area (guest RAM too small?)")?;
    let base = FOUR_GIB - size;
    let r = kvm_userspace_memory_region {
        slot: CODE_SLOT,
        guest_phys_addr: base,
        memory_size: size,
        userspace_addr: region.as_ptr() as u64,
        flags: KVM_MEM_READONLY,
    };
    // SAFETY: the mapping is `size` bytes long and lives in the returned `FirmwareImage`,
    // which the VMM keeps for as long as the VM fd exists.
    unsafe { vm.set_user_memory_region(r) }.with_context(|| {
        format!(
            "mapping firmware {} read-only at {base:#x} (KVM_SET_USER_MEMORY_REGION with KVM_MEM_READONLY; the host's KVM must support read-only memory)",
            path.display()
        )
    })?;
    Ok(FirmwareImage {
        _region: region,
        base,
        size,
        path: path.to_path_buf(),
    })
}

/// The e820 map handed to firmware over fw_cfg (`etc/e820`), as QEMU's: the RAM regions of
/// the q35 layout and KVM's identity map + TSS pages reserved. The firmware carves the legacy
/// holes (640 KiB–1 MiB) and its own reservations out itself.
pub fn e820(ram: u64) -> Vec<(u64, u64, u32)> {
    let mut v: Vec<_> = Machine::Q35
        .ram_regions(ram)
        .into_iter()
        .map(|(s, l)| (s, l, fw_cfg::E820_RAM))
        .collect();
    v.push((Q35_TSS_ADDR, 0x4000, fw_cfg::E820_RESERVED));
    v
}

/// The fw_cfg device of a firmware boot: signature, CPU counts, RAM size, the e820 map, rvirt's
/// ACPI tables through the linker/loader (the firmware installs them; without them OVMF
/// would boot an OS with no ACPI at all), and a serial console for SeaBIOS
/// (`etc/sercon-port`: there is no display yet, so its menus and messages go to COM1, as
/// `-nographic` users of QEMU see them).
pub fn fw_cfg(
    mem: &GuestMem,
    ram: u64,
    (boot, max): (u32, u32),
    boot_order: &[String],
    boot_menu_ms: Option<u16>,
) -> Result<FwCfg> {
    let mut f = FwCfg::new().with_memory(mem.clone());
    let m64 = Machine::Q35.mmio64_start(ram);
    let acpi = crate::acpi::firmware_blobs(
        &crate::acpi::AcpiConfig {
            boot_vcpus: boot,
            max_vcpus: max,
            ram,
            pci_hotplug: true,
        },
        &crate::acpi::FirmwarePlatform::q35(m64..m64 + crate::layout::PCI_MMIO64_SIZE, false),
    )
    .context("building the ACPI tables for the firmware")?;
    for (name, bytes) in acpi.files() {
        f.add_file(name, bytes.to_vec())
            .with_context(|| format!("fw_cfg {name}"))?;
    }
    f.set_cpus(boot as u16, max as u16);
    f.set_ram_size(ram);
    f.set_nographic(true);
    f.add_e820(&e820(ram)).context("fw_cfg etc/e820")?;
    f.add_file("etc/sercon-port", ports::COM1.to_le_bytes().to_vec())
        .context("fw_cfg etc/sercon-port")?;
    // Without a list the firmware picks (and OVMF connects every device); with one, OVMF
    // connects only the listed devices, as with QEMU's bootindex.
    if !boot_order.is_empty() {
        f.add_bootorder(boot_order).context("fw_cfg bootorder")?;
    }
    if let Some(ms) = boot_menu_ms {
        f.set_boot_menu(true);
        f.add_boot_menu_wait(ms)
            .context("fw_cfg etc/boot-menu-wait")?;
    }
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_keeps_ram_below_the_ecam_and_reserves_the_tss() {
        let m = e820(512 << 20);
        assert_eq!(m[0], (0, 512 << 20, fw_cfg::E820_RAM));
        assert!(m.contains(&(Q35_TSS_ADDR, 0x4000, fw_cfg::E820_RESERVED)));
        let m = e820(4 << 30);
        assert_eq!(m[0], (0, 2 << 30, fw_cfg::E820_RAM));
        assert_eq!(m[1], (4 << 30, 2 << 30, fw_cfg::E820_RAM));
    }

    #[test]
    fn images_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("bios.bin");
        std::fs::write(&good, vec![0u8; 256 << 10]).unwrap();
        check_images(&good, None).unwrap();
        let odd = dir.path().join("odd.bin");
        std::fs::write(&odd, vec![0u8; 1000]).unwrap();
        let e = format!("{:#}", check_images(&odd, None).unwrap_err());
        assert!(e.contains("--firmware") && e.contains("4 KiB"), "{e}");
        let e = format!(
            "{:#}",
            check_images(&dir.path().join("missing.fd"), None).unwrap_err()
        );
        assert!(e.contains("seabios") && e.contains("ovmf"), "{e}");
        let e = format!("{:#}", check_images(&good, Some(&odd)).unwrap_err());
        assert!(e.contains("--nvram"), "{e}");
        let big = dir.path().join("big.fd");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(FIRMWARE_MAX)
            .unwrap();
        let e = format!("{:#}", check_images(&big, Some(&good)).unwrap_err());
        assert!(e.contains("16 MiB"), "{e}");
    }
}
