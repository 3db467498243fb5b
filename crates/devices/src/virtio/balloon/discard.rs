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
//! Only whole host pages are freed (4 KiB normally; the huge page size for hugetlbfs regions,
//! read with `fstatfs` on the region's file, or from `MAP_HUGETLB` in its flags):
//! - free page reporting frees the host pages a range covers entirely; the rest is skipped;
//! - inflating remembers the 4 KiB pieces of a larger host page (a bounded bitmap per host
//!   page) and frees the host page once the balloon holds all of it; deflating a piece forgets
//!   it. A host page freed this way and then partly deflated is not tracked again until each
//!   of its pieces is inflated anew.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::GuestMemory;

/// `statfs.f_type` of hugetlbfs (Linux `include/uapi/linux/magic.h`).
const HUGETLBFS_MAGIC: u64 = 0x9584_58f6;
/// The balloon's page size.
const BALLOON_PAGE: u64 = super::BALLOON_PAGE_SIZE;
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
    /// Never give memory back (bookkeeping only): for RAM that must stay populated for the
    /// VM's whole life, e.g. pinned for device assignment. For a while only (a snapshot or a
    /// migration reading RAM) use `BalloonHandle::set_discard_inhibited` instead.
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
    partial: Partial,
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
            partial: Partial::default(),
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

    /// Frees the whole host pages inside guest range `gpa..gpa + len` (free page reporting:
    /// the pieces of host pages it leaves are not remembered, the guest reuses them). Parts
    /// outside guest memory are skipped (callers check ranges first). On a syscall failure the
    /// error is returned and the bytes freed before it go uncounted.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<Discarded, DiscardError> {
        let mut out = Discarded::default();
        self.for_each_piece(gpa, len, &mut out, |r, host_lo, host_hi, out| {
            let ps = r.page_size;
            // Whole host pages only (in host addresses: that is what the kernel checks).
            let a_lo = host_lo.div_ceil(ps) * ps;
            let a_hi = host_hi / ps * ps;
            if a_lo >= a_hi {
                out.skipped += host_hi - host_lo;
                return Ok(());
            }
            out.skipped += (a_lo - host_lo) + (host_hi - a_hi);
            free_host(r, a_lo, a_hi - a_lo, out)
        })?;
        Ok(out)
    }

    /// The balloon took guest range `gpa..gpa + len` (inflate). Where host pages are larger
    /// than the balloon's 4 KiB (hugetlbfs), pieces of a host page are remembered until the
    /// balloon holds all of it, and the host page is freed then.
    pub fn inflate(&mut self, gpa: u64, len: u64) -> Result<Discarded, DiscardError> {
        let mut out = Discarded::default();
        let mut partial = std::mem::take(&mut self.partial);
        let result = self.for_each_piece(gpa, len, &mut out, |r, host_lo, host_hi, out| {
            let ps = r.page_size;
            if ps <= BALLOON_PAGE {
                let a_lo = host_lo.div_ceil(ps) * ps;
                let a_hi = host_hi / ps * ps;
                out.skipped += host_hi - host_lo - a_hi.saturating_sub(a_lo);
                return if a_lo < a_hi {
                    free_host(r, a_lo, a_hi - a_lo, out)
                } else {
                    Ok(())
                };
            }
            // Runs of whole host pages go in one call; pieces are collected.
            let mut run: Option<(u64, u64)> = None;
            let mut cur = host_lo;
            while cur < host_hi {
                let page = cur / ps * ps;
                let piece_end = (page + ps).min(host_hi);
                if cur == page && piece_end == page + ps {
                    partial.forget(page);
                    run = match run {
                        Some((s, e)) if e == page => Some((s, page + ps)),
                        Some((s, e)) => {
                            free_host(r, s, e - s, out)?;
                            Some((page, page + ps))
                        }
                        None => Some((page, page + ps)),
                    };
                } else if partial.add(page, ps, cur - page, piece_end - page) {
                    free_host(r, page, ps, out)?;
                } else {
                    out.skipped += piece_end - cur;
                }
                cur = piece_end;
            }
            match run {
                Some((s, e)) => free_host(r, s, e - s, out),
                None => Ok(()),
            }
        });
        self.partial = partial;
        result.map(|()| out)
    }

    /// The guest took guest range `gpa..gpa + len` back (deflate): pieces of large host pages
    /// in it no longer count towards freeing those pages.
    pub fn deflate(&mut self, gpa: u64, len: u64) {
        if self.partial.pages.is_empty() {
            return;
        }
        let mut partial = std::mem::take(&mut self.partial);
        let mut out = Discarded::default();
        let _ = self.for_each_piece(gpa, len, &mut out, |r, host_lo, host_hi, _| {
            let ps = r.page_size;
            if ps <= BALLOON_PAGE {
                return Ok(());
            }
            let mut cur = host_lo;
            while cur < host_hi {
                let page = cur / ps * ps;
                let piece_end = (page + ps).min(host_hi);
                partial.remove(page, cur - page, piece_end - page);
                cur = piece_end;
            }
            Ok(())
        });
        self.partial = partial;
    }

    /// Calls `f(region, host_lo, host_hi, out)` for each part of `gpa..gpa + len` inside a
    /// region; what lies outside every region is counted as skipped.
    fn for_each_piece<F>(
        &self,
        gpa: u64,
        len: u64,
        out: &mut Discarded,
        mut f: F,
    ) -> Result<(), DiscardError>
    where
        F: FnMut(&RegionPlan, u64, u64, &mut Discarded) -> Result<(), DiscardError>,
    {
        let Some(end) = gpa.checked_add(len) else {
            out.skipped += len;
            return Ok(());
        };
        let mut covered = 0u64;
        for r in &self.regions {
            let lo = gpa.max(r.start);
            let hi = end.min(r.start + r.len);
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            let host = r.host as u64;
            f(r, host + (lo - r.start), host + (hi - r.start), out)?;
        }
        out.skipped += len - covered;
        Ok(())
    }

    /// Tracked pieces of large host pages (tests).
    #[cfg(test)]
    pub fn partial_pages(&self) -> usize {
        self.partial.pages.len()
    }

    /// Pretends every region has host pages of `ps` bytes (tests of the large-page paths on
    /// ordinary memory).
    #[cfg(test)]
    pub fn set_page_size(&mut self, ps: u64) {
        for r in &mut self.regions {
            r.page_size = ps;
        }
    }
}

/// Pieces of host pages larger than 4 KiB that the balloon holds: one bit per 4 KiB, per host
/// page (keyed by host address). Bounded: beyond [`MAX_PARTIAL_WORDS`] bitmap words new pieces
/// are not tracked (their host pages just stay).
#[derive(Debug, Default)]
struct Partial {
    pages: HashMap<u64, Vec<u64>>,
    words: usize,
}

/// At most this many u64 bitmap words (512 KiB) for [`Partial`].
const MAX_PARTIAL_WORDS: usize = 1 << 16;

impl Partial {
    /// Marks the 4 KiB pieces inside `lo..hi` (offsets in the host page at `page` of `ps`
    /// bytes). Returns true when the whole host page is now in the balloon (its entry is
    /// dropped: the caller frees the page).
    fn add(&mut self, page: u64, ps: u64, lo: u64, hi: u64) -> bool {
        let bits = (ps / BALLOON_PAGE) as usize;
        let words = bits.div_ceil(64);
        if !self.pages.contains_key(&page) {
            if self.words + words > MAX_PARTIAL_WORDS {
                return false;
            }
            self.words += words;
            self.pages.insert(page, vec![0; words]);
        }
        let Some(map) = self.pages.get_mut(&page) else {
            return false;
        };
        let (first, last) = (lo.div_ceil(BALLOON_PAGE), hi / BALLOON_PAGE);
        for b in first..last {
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        let full = (0..bits).all(|b| map[b / 64] & (1 << (b % 64)) != 0);
        if full {
            self.forget(page);
        }
        full
    }

    /// Unmarks the 4 KiB pieces touching `lo..hi` of the host page at `page`.
    fn remove(&mut self, page: u64, lo: u64, hi: u64) {
        let Some(map) = self.pages.get_mut(&page) else {
            return;
        };
        let (first, last) = (lo / BALLOON_PAGE, hi.div_ceil(BALLOON_PAGE));
        for b in first..last {
            if let Some(w) = map.get_mut((b / 64) as usize) {
                *w &= !(1 << (b % 64));
            }
        }
        if map.iter().all(|&w| w == 0) {
            self.forget(page);
        }
    }

    fn forget(&mut self, page: u64) {
        if let Some(map) = self.pages.remove(&page) {
            self.words -= map.len();
        }
    }
}

/// Frees host range `host..host + len` (whole host pages of region `r`) and counts it.
fn free_host(r: &RegionPlan, host: u64, len: u64, out: &mut Discarded) -> Result<(), DiscardError> {
    let region_off = host - r.host as u64;
    let gpa = r.start + region_off;
    let err = |op, source| DiscardError {
        op,
        gpa,
        len,
        source,
    };
    match r.method {
        DiscardMethod::Keep => {
            out.skipped += len;
            return Ok(());
        }
        DiscardMethod::DontNeed => {
            madvise(host, len, libc::MADV_DONTNEED).map_err(|e| err("madvise(MADV_DONTNEED)", e))?
        }
        DiscardMethod::Remove => {
            madvise(host, len, libc::MADV_REMOVE).map_err(|e| err("madvise(MADV_REMOVE)", e))?
        }
        DiscardMethod::PunchHole { dontneed } => {
            let Some((file, start)) = &r.file else {
                out.skipped += len;
                return Ok(());
            };
            let off = start + region_off;
            if !off.is_multiple_of(r.page_size) {
                // The region's file offset is not host page aligned: the kernel would refuse
                // (hugetlbfs) or free parts of the neighbouring pages.
                out.skipped += len;
                return Ok(());
            }
            punch_hole(file, off, len).map_err(|e| err("fallocate(PUNCH_HOLE)", e))?;
            if dontneed {
                madvise(host, len, libc::MADV_DONTNEED)
                    .map_err(|e| err("madvise(MADV_DONTNEED)", e))?;
            }
        }
    }
    out.freed += len;
    Ok(())
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
