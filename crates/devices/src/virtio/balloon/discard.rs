//! Giving guest memory back to the host.
//!
//! How a range is freed depends on how its region is mapped, which is read from the
//! `GuestRegionMmap` (its mmap flags and file offset) once, when the device is activated:
//!
//! | mapping                          | method                                              |
//! |----------------------------------|-----------------------------------------------------|
//! | private anonymous                | `madvise(MADV_DONTNEED)`                            |
//! | shared anonymous                 | `madvise(MADV_REMOVE)`                              |
//! | shared file / memfd              | `fallocate(PUNCH_HOLE \| KEEP_SIZE)` at the file offset |
//! | private file / memfd             | `madvise(MADV_DONTNEED)` only; with [`DiscardMode::AutoOwnedFiles`] the hole is punched first |
//!
//! Only whole host pages are freed: a range is shrunk to the host pages it covers entirely
//! (4 KiB normally, the huge page size for hugetlbfs regions), the rest is counted as skipped.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

/// `statfs.f_type` of hugetlbfs (Linux `include/uapi/linux/magic.h`).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// Huge page size assumed when the kernel does not say (x86-64's PMD size).
const DEFAULT_HUGE_PAGE: u64 = 2 << 20;

/// How the balloon returns memory to the host, chosen by the VMM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DiscardMode {
    /// Per region, from its mapping (see the module table). Files mapped `MAP_PRIVATE` are never
    /// modified: such a file may be shared with others (a snapshot image), so only the private
    /// copies are dropped.
    #[default]
    Auto,
    /// Like [`DiscardMode::Auto`], and also punch holes in files mapped `MAP_PRIVATE`. Only for
    /// files the VMM owns alone (its own memfd mapped private), since the file is modified.
    AutoOwnedFiles,
    /// Never give memory back (bookkeeping only): for RAM that must stay populated, e.g. pinned
    /// for device assignment, or while a snapshot or migration reads it.
    Disabled,
}

/// What is done to free one region's pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscardMethod {
    /// `madvise(MADV_DONTNEED)`: private anonymous memory (and private copies of file pages).
    DontNeed,
    /// `madvise(MADV_REMOVE)`: shared anonymous memory.
    Remove,
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)` on the region's file, then
    /// `MADV_DONTNEED` on the range if `dontneed` (a private mapping's copies).
    PunchHole { dontneed: bool },
    /// Nothing is freed ([`DiscardMode::Disabled`]).
    Keep,
}

/// A syscall that frees memory failed.
#[derive(Debug, thiserror::Error)]
#[error("virtio-balloon: {op} of {len:#x} bytes at guest {gpa:#x} failed: {source}")]
pub struct DiscardError {
    op: &'static str,
    gpa: u64,
    len: u64,
    #[source]
    source: io::Error,
}

/// Bytes freed and bytes that could not be (not whole host pages, or discard disabled).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Discarded {
    pub freed: u64,
    pub skipped: u64,
}

#[derive(Debug)]
struct RegionPlan {
    /// Guest-physical start and length.
    start: u64,
    len: u64,
    /// Host virtual address of the region's first byte.
    host: usize,
    /// Host page size behind the region.
    page_size: u64,
    method: DiscardMethod,
    /// The backing file and the file offset of the region's first byte.
    file: Option<(Arc<File>, u64)>,
}

/// Frees guest ranges; built at activation from the guest memory it keeps alive.
#[derive(Debug)]
pub(crate) struct Discarder {
    /// Holds the mappings the host addresses in `regions` point into.
    _mem: GuestMemory,
    regions: Vec<RegionPlan>,
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant; the result is checked.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// The default huge page size from /proc/meminfo ("Hugepagesize:  2048 kB").
fn default_huge_page() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Hugepagesize:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(DEFAULT_HUGE_PAGE, |kib| kib << 10)
}

/// The page size of a file: its block size on hugetlbfs, the host page size elsewhere.
fn file_page_size(file: &File) -> u64 {
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (borrowed from `file`) and `st` is a valid, writable statfs.
    let rc = unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) };
    if rc == 0 && (st.f_type as u64 & 0xffff_ffff) == HUGETLBFS_MAGIC && st.f_bsize > 0 {
        st.f_bsize as u64
    } else {
        host_page_size()
    }
}

/// The method for a mapping with these mmap `flags`, with or without a file, under `mode`.
pub(crate) fn method_for(flags: i32, has_file: bool, mode: DiscardMode) -> DiscardMethod {
    let shared = flags & libc::MAP_SHARED != 0;
    match (mode, has_file, shared) {
        (DiscardMode::Disabled, _, _) => DiscardMethod::Keep,
        (_, true, true) => DiscardMethod::PunchHole { dontneed: false },
        (DiscardMode::AutoOwnedFiles, true, false) => DiscardMethod::PunchHole { dontneed: true },
        (_, true, false) => DiscardMethod::DontNeed,
        (_, false, true) => DiscardMethod::Remove,
        (_, false, false) => DiscardMethod::DontNeed,
    }
}

impl Discarder {
    /// Plans how to free each region of `mem`.
    pub fn new(mem: &GuestMemory, mode: DiscardMode) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let file = r.file_offset().map(|fo| (fo.arc().clone(), fo.start()));
                let flags = r.flags();
                let page_size = match &file {
                    Some((f, _)) => file_page_size(f),
                    None if flags & libc::MAP_HUGETLB != 0 => {
                        let log2 = (flags >> libc::MAP_HUGE_SHIFT) & libc::MAP_HUGE_MASK;
                        if log2 == 0 {
                            default_huge_page()
                        } else {
                            1u64 << log2
                        }
                    }
                    None if r.is_hugetlbfs() == Some(true) => default_huge_page(),
                    None => host_page_size(),
                };
                RegionPlan {
                    start: r.start_addr().0,
                    len: r.len(),
                    host: r.as_ptr() as usize,
                    page_size,
                    method: method_for(flags, file.is_some(), mode),
                    file,
                }
            })
            .collect();
        Discarder {
            _mem: mem.clone(),
            regions,
        }
    }

    /// The method and host page size for the region holding guest address `gpa`.
    #[cfg(test)]
    pub fn plan_at(&self, gpa: u64) -> Option<(DiscardMethod, u64)> {
        self.regions
            .iter()
            .find(|r| gpa >= r.start && gpa - r.start < r.len)
            .map(|r| (r.method, r.page_size))
    }

    /// Frees the whole host pages inside guest range `gpa..gpa + len`. Parts outside guest
    /// memory are skipped (callers check ranges first). On a syscall failure the bytes freed so
    /// far are lost to the count and the error is returned.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<Discarded, DiscardError> {
        let mut out = Discarded::default();
        let Some(end) = gpa.checked_add(len) else {
            out.skipped = len;
            return Ok(out);
        };
        let mut covered = 0u64;
        for r in &self.regions {
            let r_end = r.start + r.len;
            let lo = gpa.max(r.start);
            let hi = end.min(r_end);
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            out.freed += self.discard_in(r, lo, hi, &mut out.skipped)?;
        }
        out.skipped += len - covered;
        Ok(out)
    }

    /// Frees the whole host pages of `lo..hi` (inside region `r`); returns the bytes freed.
    fn discard_in(
        &self,
        r: &RegionPlan,
        lo: u64,
        hi: u64,
        skipped: &mut u64,
    ) -> Result<u64, DiscardError> {
        let ps = r.page_size;
        let host_lo = r.host as u64 + (lo - r.start);
        let host_hi = r.host as u64 + (hi - r.start);
        // Whole host pages only (in host addresses: that is what the kernel checks).
        let a_lo = host_lo.div_ceil(ps) * ps;
        let a_hi = host_hi / ps * ps;
        if a_lo >= a_hi {
            *skipped += hi - lo;
            return Ok(0);
        }
        *skipped += (a_lo - host_lo) + (host_hi - a_hi);
        let len = a_hi - a_lo;
        let region_off = a_lo - r.host as u64;
        let gpa = r.start + region_off;
        let err = |op, source| DiscardError {
            op,
            gpa,
            len,
            source,
        };
        match r.method {
            DiscardMethod::Keep => {
                *skipped += len;
                return Ok(0);
            }
            DiscardMethod::DontNeed => madvise(a_lo, len, libc::MADV_DONTNEED)
                .map_err(|e| err("madvise(MADV_DONTNEED)", e))?,
            DiscardMethod::Remove => {
                madvise(a_lo, len, libc::MADV_REMOVE).map_err(|e| err("madvise(MADV_REMOVE)", e))?
            }
            DiscardMethod::PunchHole { dontneed } => {
                let Some((file, start)) = &r.file else {
                    *skipped += len;
                    return Ok(0);
                };
                let off = start + region_off;
                if !off.is_multiple_of(ps) {
                    // The file offset of the region is not page aligned: the kernel would
                    // refuse (hugetlbfs) or free the wrong pages' neighbours.
                    *skipped += len;
                    return Ok(0);
                }
                punch_hole(file, off, len).map_err(|e| err("fallocate(PUNCH_HOLE)", e))?;
                if dontneed {
                    madvise(a_lo, len, libc::MADV_DONTNEED)
                        .map_err(|e| err("madvise(MADV_DONTNEED)", e))?;
                }
            }
        }
        Ok(len)
    }
}

fn madvise(addr: u64, len: u64, advice: i32) -> io::Result<()> {
    // SAFETY: `addr..addr + len` lies inside one guest memory mapping (the callers clip the
    // range to a region and align it inward to host pages), and the `GuestMemory` held by the
    // `Discarder` keeps that mapping alive. DONTNEED/REMOVE only replace the pages' contents
    // with zeros (or the file's); the mapping stays valid, and guest memory is only ever
    // accessed through volatile slices, never through Rust references, so no aliasing
    // assumption is broken.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len as usize, advice) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on an fd we hold open (borrowed from `file`) touches no memory of this
    // process; the range is the file backing of guest pages the guest gave up.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            l,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
