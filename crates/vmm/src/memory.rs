//! Guest RAM and what backs it (libvirt's `<memoryBacking>`): anonymous private memory by
//! default, a memfd (`<source type='memfd'/>`), huge pages (`<hugepages/>`, a hugetlb memfd),
//! shared mappings (`<access mode='shared'/>`). RAM is offered to KSM (`MADV_MERGEABLE`, as
//! QEMU does) unless `<nosharepages/>`, and to transparent huge pages when not on hugetlb.

use std::fs::File;
use std::os::fd::FromRawFd;

use anyhow::{bail, Context, Result};
use rvirt_api::vmm_config::MemoryBacking;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::boot::GuestMem;
use crate::layout::Machine;

/// Size of the huge pages `<hugepages/>` uses (the x86 default).
const HUGE_PAGE: u64 = 2 << 20;

/// What was applied (the control socket's `info` reports it; rvirtd's dominfo shows it).
pub type Applied = rvirt_api::vmm::MemoryBackingInfo;

/// Huge pages free now, from /proc/meminfo (`HugePages_Free` of the default size, 2 MiB).
fn free_huge_pages(meminfo: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        meminfo
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some((field("HugePages_Free:")?, field("Hugepagesize:")? << 10))
}

fn memfd(size: u64, huge: bool) -> Result<File> {
    let mut flags = libc::MFD_CLOEXEC;
    if huge {
        flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
    }
    // SAFETY: the name is a NUL-terminated literal; memfd_create returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"rvirt-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        bail!("memfd_create for guest RAM: {e}");
    }
    // SAFETY: `fd` is a fresh fd that nothing else owns.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size)
        .with_context(|| format!("sizing the guest RAM memfd to {} MiB", size >> 20))?;
    Ok(f)
}

/// Creates `ram` bytes of guest memory, laid out for `machine`, backed as `backing` asks.
pub fn create(machine: Machine, ram: u64, backing: &MemoryBacking) -> Result<(GuestMem, Applied)> {
    if backing.hugepages {
        if !ram.is_multiple_of(HUGE_PAGE) {
            bail!(
                "<hugepages/>: guest memory ({} KiB) is not a multiple of the 2 MiB huge page size; round <memory> up",
                ram >> 10
            );
        }
        let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (free, size) = free_huge_pages(&info).unwrap_or((0, HUGE_PAGE));
        let need = ram.div_ceil(size.max(1));
        if free < need {
            bail!(
                "<hugepages/>: the guest needs {need} huge pages of {} KiB but the host has {free} free; reserve them (e.g. sysctl vm.nr_hugepages={need}) or remove <hugepages/>",
                size >> 10
            );
        }
    }
    let file = if backing.hugepages || backing.memfd {
        Some(memfd(ram, backing.hugepages)?)
    } else {
        None
    };
    let shared = backing.shared || file.is_some() && backing.hugepages;
    let mut flags = if shared {
        libc::MAP_SHARED
    } else {
        libc::MAP_PRIVATE
    };
    if file.is_none() {
        flags |= libc::MAP_ANONYMOUS;
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    let (mut ksm_all, mut thp_all) = (true, true);
    for (start, len) in machine.ram_regions(ram) {
        let mut b = MmapRegionBuilder::new(len as usize)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(flags)
            .with_hugetlbfs(backing.hugepages);
        if let Some(f) = &file {
            let f = f.try_clone().context("dup of the guest RAM memfd")?;
            b = b.with_file_offset(FileOffset::new(f, offset));
        }
        let region = b
            .build()
            .with_context(|| format!("cannot map {} MiB of guest memory", len >> 20))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .context("guest memory region overflows the address space")?;
        let (ksm, thp) = advise(&region, backing);
        ksm_all &= ksm;
        thp_all &= thp;
        regions.push(region);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).context("guest memory layout")?;
    let applied = Applied {
        source: if backing.hugepages {
            "hugepages"
        } else if backing.memfd {
            "memfd"
        } else {
            "anonymous"
        }
        .to_string(),
        shared,
        ksm: ksm_all,
        thp: thp_all,
    };
    Ok((mem, applied))
}

/// KSM and THP hints; their failure costs only memory savings, so it is logged, not fatal.
/// Returns whether each was applied (KSM, THP).
fn advise(region: &GuestRegionMmap<()>, backing: &MemoryBacking) -> (bool, bool) {
    use vm_memory::GuestMemoryRegion;
    let (addr, len) = (region.as_ptr() as *mut libc::c_void, region.len() as usize);
    let hint = |wanted: bool, advice: i32, name: &str| {
        if !wanted {
            return false;
        }
        // SAFETY: `addr..addr+len` is exactly the live mapping owned by `region`; madvise
        // hints do not change its contents.
        if unsafe { libc::madvise(addr, len, advice) } != 0 {
            log::info!(
                "guest RAM: {name} not applied: {}",
                std::io::Error::last_os_error()
            );
            return false;
        }
        true
    };
    (
        hint(
            !backing.nosharepages,
            libc::MADV_MERGEABLE,
            "MADV_MERGEABLE (KSM)",
        ),
        hint(
            !backing.hugepages,
            libc::MADV_HUGEPAGE,
            "MADV_HUGEPAGE (THP)",
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    /// The VmFlags line of the mapping that starts at `addr` in /proc/self/smaps.
    fn vm_flags(addr: u64) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in smaps.lines() {
            // A mapping's header: "start-end perms offset dev inode [path]".
            let header = l
                .split_once(' ')
                .and_then(|(range, _)| range.split_once('-'))
                .and_then(|(start, _)| u64::from_str_radix(start, 16).ok());
            if let Some(start) = header {
                inside = start == addr;
            } else if inside && l.starts_with("VmFlags:") {
                return l.to_string();
            }
        }
        String::new()
    }

    #[test]
    fn anonymous_ram_is_private_and_offered_to_ksm() {
        let (mem, a) = create(Machine::Direct, 32 << 20, &MemoryBacking::default()).unwrap();
        assert_eq!(a.source, "anonymous");
        assert!(!a.shared && a.ksm);
        let r = mem.iter().next().unwrap();
        assert!(r.file_offset().is_none());
        let flags = vm_flags(r.as_ptr() as u64);
        assert!(flags.contains(" mg"), "no KSM flag in {flags:?}");
        // THP is reported as applied exactly when the kernel took the hint.
        assert_eq!(a.thp, flags.contains(" hg"), "{flags:?}");
        assert!(
            a.describe().starts_with("anonymous, private, KSM"),
            "{}",
            a.describe()
        );
        mem.write_obj(0x1234u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0x1234);
    }

    #[test]
    fn nosharepages_keeps_ksm_away() {
        let b = MemoryBacking {
            nosharepages: true,
            ..Default::default()
        };
        let (mem, a) = create(Machine::Direct, 16 << 20, &b).unwrap();
        assert!(!a.ksm);
        let flags = vm_flags(mem.iter().next().unwrap().as_ptr() as u64);
        assert!(!flags.contains(" mg"), "KSM flag in {flags:?}");
    }

    #[test]
    fn memfd_shared_ram_is_one_file_seen_through_both_regions() {
        let b = MemoryBacking {
            memfd: true,
            shared: true,
            ..Default::default()
        };
        // Over 3 GiB: two regions at different offsets of the same memfd; nothing is touched,
        // so no memory is used.
        let (mem, a) = create(Machine::Direct, (3 << 30) + (64 << 20), &b).unwrap();
        assert_eq!((a.source.as_str(), a.shared), ("memfd", true));
        let regions: Vec<_> = mem.iter().collect();
        assert_eq!(regions.len(), 2);
        let offs: Vec<u64> = regions
            .iter()
            .map(|r| r.file_offset().unwrap().start())
            .collect();
        assert_eq!(offs, vec![0, 3 << 30]);
        mem.write_obj(0xabcdu16, GuestAddress(4 << 30)).unwrap();
        let f = regions[1].file_offset().unwrap().file();
        let mut b = [0u8; 2];
        std::os::unix::fs::FileExt::read_exact_at(f, &mut b, 3 << 30).unwrap();
        assert_eq!(
            u16::from_le_bytes(b),
            0xabcd,
            "shared writes reach the memfd"
        );
    }

    #[test]
    fn hugepages_without_reserved_pages_is_a_clear_error() {
        let info =
            "HugePages_Total:       0\nHugePages_Free:        0\nHugepagesize:       2048 kB\n";
        assert_eq!(free_huge_pages(info), Some((0, 2 << 20)));
        let b = MemoryBacking {
            hugepages: true,
            ..Default::default()
        };
        let free =
            free_huge_pages(&std::fs::read_to_string("/proc/meminfo").unwrap()).map_or(0, |f| f.0);
        if free >= 8 {
            eprintln!("skipped: this host has huge pages reserved");
            return;
        }
        let e = create(Machine::Direct, 16 << 20, &b)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("huge pages") && e.contains("nr_hugepages"),
            "{e}"
        );
        let e = create(Machine::Direct, (16 << 20) + 4096, &b)
            .unwrap_err()
            .to_string();
        assert!(e.contains("multiple of the 2 MiB"), "{e}");
    }
}
