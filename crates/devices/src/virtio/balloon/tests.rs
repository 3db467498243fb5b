//! virtio-balloon driven like Linux's virtio_balloon driver would, on real guest memory: the
//! host memory really goes away (checked with mincore(2) and the memfd's allocated blocks).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap,
    MmapRegion,
};

use super::discard::{method_for, Discarder};
use super::*;
use crate::virtio::testing::*;
use crate::virtio::{DEVICE_CFG_OFFSET, ISR_CFG_OFFSET};

const MIB: u64 = 1 << 20;
const PAGE: u64 = BALLOON_PAGE_SIZE;
/// Where the tests put PFN arrays and stats buffers (rings are at 1..2 MiB).
const BUFS: u64 = DATA;

const STATS: u64 = 1 << VIRTIO_BALLOON_F_STATS_VQ;
const OOM: u64 = 1 << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
const POISON: u64 = 1 << VIRTIO_BALLOON_F_PAGE_POISON;
const REPORTING: u64 = 1 << VIRTIO_BALLOON_F_REPORTING;

fn counter(h: &BalloonHandle, name: &str) -> u64 {
    h.counters()
        .into_iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("no counter {name}"))
        .1
}

fn anon_memory(size: u64) -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create takes a NUL-terminated name and returns a new fd or -1 (checked).
    let fd = unsafe { libc::memfd_create(c"rvirt-balloon-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).unwrap();
    file
}

fn memfd_memory(size: u64) -> (GuestMemory, File) {
    let file = memfd(size);
    let fo = FileOffset::new(file.try_clone().unwrap(), 0);
    let mem =
        GuestMemoryMmap::from_ranges_with_files(&[(GuestAddress(0), size as usize, Some(fo))])
            .unwrap();
    (mem, file)
}

/// Residency of each 4 KiB page of `gpa..gpa + len` (mincore(2)).
fn resident(mem: &GuestMemory, gpa: u64, len: u64) -> Vec<bool> {
    let host = mem.get_host_address(GuestAddress(gpa)).unwrap();
    let mut v = vec![0u8; (len / PAGE) as usize];
    // SAFETY: `host..host + len` is inside the guest memory mapping (page aligned, since the
    // mapping is and `gpa` is a multiple of 4 KiB), and `v` has one byte per page.
    let rc = unsafe { libc::mincore(host.cast(), len as usize, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
    v.into_iter().map(|b| b & 1 != 0).collect()
}

fn touch(mem: &GuestMemory, gpa: u64, len: u64) {
    mem.write_slice(&vec![0xa5; len as usize], GuestAddress(gpa))
        .unwrap();
}

fn new_balloon(cfg: BalloonConfig, mem: GuestMemory) -> (TestDriver, BalloonHandle) {
    let (b, h) = Balloon::new(cfg).unwrap();
    (TestDriver::with_memory(Box::new(b), mem), h)
}

fn default_balloon() -> (TestDriver, BalloonHandle) {
    new_balloon(
        BalloonConfig::new(MEM_SIZE as u64),
        anon_memory(MEM_SIZE as u64),
    )
}

/// Negotiates `wanted` and enables the queues for it; returns them in index order.
fn bring_up(d: &TestDriver, wanted: u64) -> (u64, Vec<TestQueue>) {
    let f = d.negotiate(wanted);
    let n = 2 + u16::from(f & STATS != 0) + u16::from(f & REPORTING != 0);
    let qs = (0..n).map(|i| d.setup_queue(i, 16)).collect();
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated(), "balloon activated");
    (f, qs)
}

/// Writes `pfns` as le32 at `at`; returns the byte length.
fn write_pfns(mem: &GuestMemory, at: u64, pfns: &[u32]) -> u32 {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(at)).unwrap();
    bytes.len() as u32
}

/// Sends `pfns` in requests of 256 (what Linux does) on `q`, waiting for each.
fn send_pfns(d: &TestDriver, q: &mut TestQueue, pfns: &[u32]) {
    for chunk in pfns.chunks(256) {
        let len = write_pfns(&d.mem, BUFS, chunk);
        let head = q.add_chain(&d.mem, &[(BUFS, len, false)]);
        d.kick(q.index);
        assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 0)));
    }
}

fn pfn(gpa: u64) -> u32 {
    (gpa / PAGE) as u32
}

fn stat(tag: u16, v: u64) -> Vec<u8> {
    let mut b = tag.to_le_bytes().to_vec();
    b.extend_from_slice(&v.to_le_bytes());
    b
}

fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn features_and_queues_follow_the_config() {
    let (d, _h) = default_balloon();
    assert_eq!(d.cfg_read32(0) >> 16, 0x1040 + 5, "PCI device id 1045");
    let f = d.device_features();
    assert_ne!(f & (1 << 32), 0, "VERSION_1");
    assert_ne!(f & STATS, 0);
    assert_ne!(f & POISON, 0);
    assert_ne!(f & (1 << 28), 0, "INDIRECT_DESC");
    assert_ne!(f & (1 << 29), 0, "EVENT_IDX");
    assert_eq!(f & (OOM | REPORTING), 0, "not configured, not offered");
    assert_eq!(
        f & 0b1001,
        0,
        "MUST_TELL_HOST and FREE_PAGE_HINT never offered"
    );
    d.negotiate(!0);
    assert_eq!(d.common_read(0x12, 2), 3, "inflate, deflate, stats");

    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.deflate_on_oom = true;
    cfg.free_page_reporting = true;
    let (d, _h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    let f = d.device_features();
    assert_eq!(f & (OOM | REPORTING), OOM | REPORTING);
    d.negotiate(!0);
    assert_eq!(d.common_read(0x12, 2), 4, "and reporting");
}

#[test]
fn reporting_queue_is_index_2_without_stats_and_3_with_them() {
    for wanted in [!STATS, !0] {
        let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
        cfg.free_page_reporting = true;
        let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
        let (f, mut qs) = bring_up(&d, wanted);
        let rq = if f & STATS != 0 { 3 } else { 2 };
        assert_eq!(qs.len(), rq + 1);
        // A report on the reporting queue frees memory ...
        touch(&d.mem, 8 * MIB, 2 * MIB);
        let q = &mut qs[rq];
        let head = q.add_chain(&d.mem, &[(8 * MIB, (2 * MIB) as u32, true)]);
        d.kick(rq as u16);
        assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 0)));
        assert_eq!(counter(&h, "reported_bytes"), 2 * MIB, "features {f:#x}");
        assert!(resident(&d.mem, 8 * MIB, 2 * MIB).iter().all(|r| !r));
        if f & STATS != 0 {
            // ... and queue 2 is the stats queue: a buffer there is read as statistics.
            let buf = stat(VIRTIO_BALLOON_S_MEMFREE, 42);
            d.mem.write_slice(&buf, GuestAddress(BUFS)).unwrap();
            qs[2].add_chain(&d.mem, &[(BUFS, buf.len() as u32, false)]);
            d.kick(2);
            wait_until("stats read", || h.stats().free_memory == Some(42));
            assert_eq!(counter(&h, "reported_ranges"), 1);
        }
    }
}

#[test]
fn inflate_frees_anonymous_memory_and_deflate_takes_it_back() {
    let size = 64 * MIB;
    let (d, h) = new_balloon(BalloonConfig::new(size), anon_memory(size));
    let actual_seen = Arc::new(AtomicU64::new(0));
    let seen = actual_seen.clone();
    h.on_actual_change(move |bytes| seen.store(bytes, Ordering::SeqCst));
    let (_, mut qs) = bring_up(&d, !0);
    touch(&d.mem, 8 * MIB, 56 * MIB);
    assert!(
        resident(&d.mem, 8 * MIB, 56 * MIB).iter().all(|&r| r),
        "touched pages are resident"
    );
    // Half of 8..40 MiB, every other page (no two adjacent), then all of 40..56 MiB
    // (coalesced into few ranges): 32 MiB in all.
    let mut pfns: Vec<u32> = (pfn(8 * MIB)..pfn(40 * MIB)).step_by(2).collect();
    pfns.extend(pfn(40 * MIB)..pfn(56 * MIB));
    send_pfns(&d, &mut qs[0], &pfns);
    assert_eq!(counter(&h, "inflated_pages"), 8192);
    assert_eq!(counter(&h, "discarded_bytes"), 32 * MIB);
    assert_eq!(counter(&h, "bad_pfns"), 0);
    let r = resident(&d.mem, 8 * MIB, 32 * MIB);
    for (i, &res) in r.iter().enumerate() {
        assert_eq!(res, i % 2 == 1, "page {i} of 8..40 MiB");
    }
    assert!(resident(&d.mem, 40 * MIB, 16 * MIB).iter().all(|&r| !r));
    assert!(resident(&d.mem, 56 * MIB, 8 * MIB).iter().all(|&r| r));
    // Freed pages read back as zeros.
    assert_eq!(d.mem.read_obj::<u64>(GuestAddress(40 * MIB)).unwrap(), 0);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(8 * MIB + PAGE)).unwrap(),
        0xa5
    );
    // The driver says how far it got.
    d.write(DEVICE_CFG_OFFSET + 4, 4, 8192);
    assert_eq!(d.device_cfg(4, 4), 8192);
    assert_eq!(h.actual_pages(), 8192);
    assert_eq!(h.actual_bytes(), 32 * MIB);
    assert_eq!(actual_seen.load(Ordering::SeqCst), 32 * MIB);
    // Deflate (as with DEFLATE_ON_OOM, unasked): bookkeeping only, the guest uses the pages.
    send_pfns(&d, &mut qs[1], &pfns[4096..]);
    assert_eq!(counter(&h, "deflated_pages"), 4096);
    d.write(DEVICE_CFG_OFFSET + 4, 4, 4096);
    assert_eq!(actual_seen.load(Ordering::SeqCst), 48 * MIB);
    touch(&d.mem, 40 * MIB, 16 * MIB);
    assert!(resident(&d.mem, 40 * MIB, 16 * MIB).iter().all(|&r| r));
}

#[test]
fn inflate_punches_holes_in_memfd_memory() {
    let size = 32 * MIB;
    let (mem, file) = memfd_memory(size);
    let (d, h) = new_balloon(BalloonConfig::new(size), mem);
    let (_, mut qs) = bring_up(&d, !0);
    touch(&d.mem, 8 * MIB, 16 * MIB);
    touch(&d.mem, BUFS, PAGE); // where the PFNs go
    let before = file.metadata().unwrap().blocks() * 512;
    assert!(
        before >= 16 * MIB,
        "memfd holds the touched pages ({before})"
    );
    let pfns: Vec<u32> = (pfn(8 * MIB)..pfn(16 * MIB)).collect();
    send_pfns(&d, &mut qs[0], &pfns);
    assert_eq!(counter(&h, "discarded_bytes"), 8 * MIB);
    let after = file.metadata().unwrap().blocks() * 512;
    assert!(
        before - after >= 8 * MIB,
        "memfd blocks {before} -> {after}: not freed"
    );
    // SAFETY: lseek on an fd we own; no memory is touched.
    let data = unsafe { libc::lseek(file.as_raw_fd(), (8 * MIB) as i64, libc::SEEK_DATA) };
    assert_eq!(data as u64, 16 * MIB, "8..16 MiB is a hole");
    assert!(resident(&d.mem, 8 * MIB, 8 * MIB).iter().all(|&r| !r));
    assert_eq!(d.mem.read_obj::<u64>(GuestAddress(8 * MIB)).unwrap(), 0);
    assert_eq!(
        d.mem.read_obj::<u8>(GuestAddress(16 * MIB)).unwrap(),
        0xa5,
        "the rest is untouched"
    );
}

#[test]
fn discard_method_per_mapping() {
    use libc::{MAP_ANONYMOUS, MAP_PRIVATE, MAP_SHARED};
    let pun = DiscardMethod::PunchHole { dontneed: false };
    assert_eq!(
        method_for(MAP_PRIVATE | MAP_ANONYMOUS, false, DiscardMode::Auto),
        DiscardMethod::DontNeed
    );
    assert_eq!(
        method_for(MAP_SHARED | MAP_ANONYMOUS, false, DiscardMode::Auto),
        DiscardMethod::Remove
    );
    assert_eq!(method_for(MAP_SHARED, true, DiscardMode::Auto), pun);
    assert_eq!(
        method_for(MAP_PRIVATE, true, DiscardMode::Auto),
        DiscardMethod::DontNeed,
        "a privately mapped file is never modified"
    );
    assert_eq!(
        method_for(MAP_PRIVATE, true, DiscardMode::AutoOwnedFiles),
        DiscardMethod::PunchHole { dontneed: true }
    );
    assert_eq!(
        method_for(MAP_SHARED, true, DiscardMode::Disabled),
        DiscardMethod::Keep
    );
    // What vm-memory's constructors produce.
    let anon = anon_memory(4 * MIB);
    assert_eq!(
        Discarder::new(&anon, DiscardMode::Auto).plan_at(0),
        Some((DiscardMethod::DontNeed, 4096))
    );
    let (fd_mem, _f) = memfd_memory(4 * MIB);
    assert_eq!(
        Discarder::new(&fd_mem, DiscardMode::Auto).plan_at(0),
        Some((pun, 4096))
    );
}

#[test]
fn shared_anonymous_memory_is_removed_and_ranges_span_regions() {
    // Two regions, 0..4 MiB private and 4..8 MiB shared anonymous.
    let shared = MmapRegion::<()>::build(
        None,
        (4 * MIB) as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .unwrap();
    let private = GuestRegionMmap::from_range(GuestAddress(0), (4 * MIB) as usize, None).unwrap();
    let shared = GuestRegionMmap::new(shared, GuestAddress(4 * MIB)).unwrap();
    let mem = GuestMemoryMmap::from_regions(vec![private, shared]).unwrap();
    let dis = Discarder::new(&mem, DiscardMode::Auto);
    assert_eq!(dis.plan_at(5 * MIB).unwrap().0, DiscardMethod::Remove);
    touch(&mem, 0, 8 * MIB);
    // One range across the boundary, with a ragged start and end: only whole pages go.
    let d = dis.discard(3 * MIB + 100, 2 * MIB).unwrap();
    assert_eq!(d.freed, 2 * MIB - PAGE);
    assert_eq!(d.skipped, PAGE);
    // (mincore per mapping: the two regions are separate mappings.)
    let r = resident(&mem, 3 * MIB, MIB);
    assert!(r[0], "the page holding the ragged start stays");
    assert!(r[1..].iter().all(|&x| !x));
    let r = resident(&mem, 4 * MIB, 2 * MIB);
    assert!(r[..256].iter().all(|&x| !x));
    assert!(r[256], "the page holding the ragged end stays");
    assert!(r[257..].iter().all(|&x| x));
    // MADV_REMOVE really freed the shared pages: they read back as zeros.
    assert_eq!(mem.read_obj::<u64>(GuestAddress(4 * MIB)).unwrap(), 0);
    // Outside memory: skipped, no syscall on foreign addresses.
    let d = dis.discard(8 * MIB, MIB).unwrap();
    assert_eq!((d.freed, d.skipped), (0, MIB));
    let d = dis.discard(u64::MAX - PAGE, 2 * PAGE).unwrap();
    assert_eq!(d.freed, 0);
}

#[test]
fn disabled_discard_keeps_memory_but_counts() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.discard = DiscardMode::Disabled;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    let (_, mut qs) = bring_up(&d, !0);
    touch(&d.mem, 8 * MIB, MIB);
    send_pfns(
        &d,
        &mut qs[0],
        &(pfn(8 * MIB)..pfn(9 * MIB)).collect::<Vec<_>>(),
    );
    assert_eq!(counter(&h, "inflated_pages"), 256);
    assert_eq!(counter(&h, "discarded_bytes"), 0);
    assert_eq!(counter(&h, "discard_skipped_bytes"), MIB);
    assert!(resident(&d.mem, 8 * MIB, MIB).iter().all(|&r| r));
}

#[test]
fn reporting_frees_ranges_unless_the_guest_poisons_free_pages() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.free_page_reporting = true;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    d.negotiate(!0);
    // The driver writes poison_val before DRIVER_OK (Linux: in probe).
    d.write(DEVICE_CFG_OFFSET + 12, 4, 0xaaaa_aaaa);
    assert_eq!(d.device_cfg(12, 4), 0xaaaa_aaaa);
    let mut q = d.setup_queue(3, 16);
    for i in 0..3 {
        d.setup_queue(i, 16);
    }
    d.driver_ok();
    touch(&d.mem, 8 * MIB, 4 * MIB);
    q.add_chain(
        &d.mem,
        &[
            (8 * MIB, (2 * MIB) as u32, true),
            (10 * MIB, MIB as u32, true),
        ],
    );
    d.kick(3);
    assert!(q.wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "reported_ranges"), 2);
    assert_eq!(counter(&h, "reported_bytes"), 3 * MIB);
    assert_eq!(counter(&h, "discarded_bytes"), 0, "poisoned pages are kept");
    assert_eq!(counter(&h, "discard_skipped_bytes"), 3 * MIB);
    assert!(resident(&d.mem, 8 * MIB, 3 * MIB).iter().all(|&r| r));
    // Poison value 0 (init_on_free: free pages are zero anyway): freed.
    d.write(DEVICE_CFG_OFFSET + 12, 4, 0);
    q.add_chain(&d.mem, &[(8 * MIB, (2 * MIB) as u32, true)]);
    d.kick(3);
    assert!(q.wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "discarded_bytes"), 2 * MIB);
    let r = resident(&d.mem, 8 * MIB, 4 * MIB);
    assert!(r[..512].iter().all(|&x| !x));
    assert!(r[512..].iter().all(|&x| x));
}

#[test]
fn poison_value_is_ignored_when_page_poison_is_not_negotiated() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.free_page_reporting = true;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    d.negotiate(!POISON);
    d.write(DEVICE_CFG_OFFSET + 12, 4, 0xaaaa_aaaa);
    let mut qs: Vec<TestQueue> = (0..4).map(|i| d.setup_queue(i, 16)).collect();
    d.driver_ok();
    touch(&d.mem, 8 * MIB, MIB);
    qs[3].add_chain(&d.mem, &[(8 * MIB, MIB as u32, true)]);
    d.kick(3);
    assert!(qs[3].wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "discarded_bytes"), MIB);
}

#[test]
fn stats_are_kept_and_the_buffer_comes_back_every_period() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.stats_period = 1;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    assert_eq!(h.stats(), BalloonStats::default());
    let (_, mut qs) = bring_up(&d, !0);
    let q = &mut qs[2];
    let mut buf = Vec::new();
    for (tag, v) in [
        (VIRTIO_BALLOON_S_SWAP_IN, 1),
        (VIRTIO_BALLOON_S_MEMFREE, 100 * MIB),
        (VIRTIO_BALLOON_S_MEMTOT, 1024 * MIB),
        (13, 5), // DIRECT_SCAN (newer guests): ignored
        (VIRTIO_BALLOON_S_HTLB_PGALLOC, 3),
    ] {
        buf.extend(stat(tag, v));
    }
    d.mem.write_slice(&buf, GuestAddress(BUFS)).unwrap();
    let t0 = Instant::now();
    let head = q.add_chain(&d.mem, &[(BUFS, buf.len() as u32, false)]);
    d.kick(2);
    wait_until("first stats", || h.stats().last_update != 0);
    let s = h.stats();
    assert_eq!(s.swap_in, Some(1));
    assert_eq!(s.free_memory, Some(100 * MIB));
    assert_eq!(s.total_memory, Some(1024 * MIB));
    assert_eq!(s.hugetlb_allocations, Some(3));
    assert_eq!(s.major_faults, None);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(s.last_update <= now && s.last_update + 5 >= now);
    assert_eq!(counter(&h, "stats_unknown_tags"), 1);
    // The device holds the buffer until the period is over, then gives it back.
    assert_eq!(q.used_idx(&d.mem), 0, "held, not returned at once");
    assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 0)));
    assert!(t0.elapsed() >= Duration::from_millis(900));
    // The driver refills it: every stat is replaced (none stale).
    let buf = stat(VIRTIO_BALLOON_S_MAJFLT, 9);
    d.mem.write_slice(&buf, GuestAddress(BUFS)).unwrap();
    q.add_chain(&d.mem, &[(BUFS, buf.len() as u32, false)]);
    d.kick(2);
    wait_until("second stats", || counter(&h, "stats_updates") == 2);
    let s = h.stats();
    assert_eq!(s.major_faults, Some(9));
    assert_eq!(s.free_memory, None, "not reported this time");
    // Polling off: the buffer stays with the device.
    h.set_stats_period(0);
    assert_eq!(h.stats_period(), 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(q.used_idx(&d.mem), 1, "not returned with polling off");
    // And back on at run time.
    h.set_stats_period(1);
    assert!(q.wait_used(&d.mem).is_some(), "returned once polling is on");
}

#[test]
fn truncated_and_odd_stats_buffers_do_not_hurt() {
    let (d, h) = default_balloon();
    let (_, mut qs) = bring_up(&d, !0);
    let q = &mut qs[2];
    let mut buf = stat(VIRTIO_BALLOON_S_CACHES, 77);
    buf.extend_from_slice(&[VIRTIO_BALLOON_S_MEMFREE as u8, 0, 1, 2, 3]); // a cut entry
    d.mem.write_slice(&buf, GuestAddress(BUFS)).unwrap();
    // An odd-length readable part, a device-writable descriptor, one outside guest memory.
    q.add_chain(
        &d.mem,
        &[
            (BUFS, buf.len() as u32, false),
            (BUFS + 0x100, 64, true),
            (MEM_SIZE as u64 - 4, 64, false),
        ],
    );
    d.kick(2);
    wait_until("stats read", || counter(&h, "stats_updates") == 1);
    assert_eq!(h.stats().disk_caches, Some(77));
    assert_eq!(h.stats().free_memory, None);
    assert_eq!(counter(&h, "stats_truncated"), 1);
    assert_eq!(counter(&h, "bad_descriptors"), 2);
    // A second buffer while one is held: the old one is given back, the new one read.
    let buf = stat(VIRTIO_BALLOON_S_AVAIL, 5);
    d.mem.write_slice(&buf, GuestAddress(BUFS)).unwrap();
    // An absurd length: read up to the cap only (the bytes past the entry are zeros = tag 0).
    q.add_chain(&d.mem, &[(BUFS, u32::MAX, false)]);
    d.kick(2);
    assert_eq!(
        q.wait_used(&d.mem),
        Some((0, 0)),
        "the first buffer came back"
    );
    wait_until("second stats", || counter(&h, "stats_updates") == 2);
    assert_eq!(h.stats().available_memory, Some(5));
    assert_eq!(d.status() & 0x40, 0, "no NEEDS_RESET");
}

#[test]
fn targets_set_num_pages_and_raise_config_interrupts() {
    let (d, h) = default_balloon();
    let ram = MEM_SIZE as u64;
    assert_eq!(h.target_bytes(), ram);
    assert_eq!(h.ram_size(), ram);
    // Before the driver is up: stored, no interrupt, visible in config space.
    h.set_target_bytes(ram - 8 * MIB);
    assert_eq!(h.target_pages(), 2048);
    assert_eq!(d.device_cfg(0, 4), 2048);
    assert_eq!(h.target_bytes(), ram - 8 * MIB);
    assert_eq!(
        counter(&h, "config_changes"),
        0,
        "nothing to signal before activation"
    );
    let (_, _qs) = bring_up(&d, !0);
    // Activation tells the driver about the pending target.
    assert!(d.wait_irq(0) >= 1, "config interrupt at activation");
    assert_eq!(d.read(ISR_CFG_OFFSET, 1) & 2, 2, "ISR config bit");
    h.set_target_bytes(ram / 2);
    assert!(d.wait_irq(0) >= 1);
    assert_eq!(d.device_cfg(0, 4), ram / 2 / PAGE);
    // More than the RAM: clamped (an empty balloon).
    h.set_target_bytes(u64::MAX);
    assert!(d.wait_irq(0) >= 1);
    assert_eq!(d.device_cfg(0, 4), 0);
    assert_eq!(h.target_bytes(), ram);
    // 0: everything into the balloon.
    h.set_target_bytes(0);
    assert_eq!(d.device_cfg(0, 4), ram / PAGE);
    assert!(counter(&h, "config_changes") >= 4);
    // The driver cannot change num_pages.
    d.write(DEVICE_CFG_OFFSET, 4, 1);
    assert_eq!(d.device_cfg(0, 4), ram / PAGE);
    // After a reset the target is still there for the next driver.
    d.set_status(0);
    assert_eq!(d.device_cfg(0, 4), ram / PAGE);
}

#[test]
fn actual_writes_reach_the_handle_and_reset_empties_the_balloon() {
    let (d, h) = default_balloon();
    let calls = Arc::new(std::sync::Mutex::new(Vec::new()));
    let c = calls.clone();
    h.on_actual_change(move |b| c.lock().unwrap().push(b));
    let (_, _qs) = bring_up(&d, !0);
    d.write(DEVICE_CFG_OFFSET + 4, 4, 256);
    d.write(DEVICE_CFG_OFFSET + 4, 4, 256); // same value: no event
    assert_eq!(h.actual_bytes(), MEM_SIZE as u64 - MIB);
    // A byte-wise write works too (drivers use 32-bit writes, but nothing forbids it).
    d.write(DEVICE_CFG_OFFSET + 5, 1, 2); // actual = 0x0200 | 0x00 = 512
    assert_eq!(h.actual_pages(), 512);
    // actual beyond the RAM size does not underflow.
    d.write(DEVICE_CFG_OFFSET + 4, 4, u64::from(u32::MAX));
    assert_eq!(h.actual_bytes(), 0);
    d.set_status(0);
    assert_eq!(h.actual_pages(), 0);
    assert_eq!(
        *calls.lock().unwrap(),
        vec![
            MEM_SIZE as u64 - MIB,
            MEM_SIZE as u64 - 2 * MIB,
            0,
            MEM_SIZE as u64
        ]
    );
}

#[test]
fn hostile_inflate_requests_are_counted_and_refused() {
    let (d, h) = default_balloon();
    let (_, mut qs) = bring_up(&d, !0);
    let q = &mut qs[0];
    let end = pfn(MEM_SIZE as u64);
    // PFNs just past the end, far past it, u32::MAX, and one good PFN among them.
    let len = write_pfns(&d.mem, BUFS, &[end, end + 1000, u32::MAX, pfn(8 * MIB)]);
    q.add_chain(&d.mem, &[(BUFS, len, false)]);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((0, 0)));
    assert_eq!(counter(&h, "bad_pfns"), 3);
    assert_eq!(counter(&h, "inflated_pages"), 1);
    // A device-writable inflate descriptor; buffers outside memory or wrapping; a length that
    // is not a multiple of 4 (its one whole PFN is served).
    write_pfns(&d.mem, BUFS, &[pfn(8 * MIB) + 1]);
    for (addr, len, write) in [
        (BUFS, 4, true),
        (MEM_SIZE as u64 - 2, 64, false),
        (u64::MAX - 3, 64, false),
        (BUFS, 6, false),
    ] {
        let head = q.add_chain(&d.mem, &[(addr, len, write)]);
        d.kick(0);
        assert_eq!(
            q.wait_used(&d.mem),
            Some((u32::from(head), 0)),
            "{addr:#x}+{len:#x}"
        );
    }
    assert_eq!(counter(&h, "bad_descriptors"), 4);
    assert_eq!(
        counter(&h, "inflated_pages"),
        2,
        "the 6-byte request held one PFN"
    );
    // An absurd length: capped (and counted), the chain still comes back.
    let head = q.add_chain(&d.mem, &[(BUFS, u32::MAX, false)]);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 0)));
    assert_eq!(
        counter(&h, "bad_descriptors"),
        6,
        "over the cap, and not a multiple of 4"
    );
    // Deflate checks PFNs too.
    let bad_before = counter(&h, "bad_pfns");
    let len = write_pfns(&d.mem, BUFS, &[u32::MAX, pfn(8 * MIB)]);
    qs[1].add_chain(&d.mem, &[(BUFS, len, false)]);
    d.kick(1);
    assert!(qs[1].wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "bad_pfns"), bad_before + 1);
    assert_eq!(counter(&h, "deflated_pages"), 1);
    // The rings still work, and nothing asked for a reset.
    touch(&d.mem, 9 * MIB, PAGE);
    send_pfns(&d, &mut qs[0], &[pfn(9 * MIB)]);
    assert!(!resident(&d.mem, 9 * MIB, PAGE)[0]);
    assert_eq!(d.status() & 0x40, 0);
}

#[test]
fn hostile_reports_are_counted_and_refused() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.free_page_reporting = true;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    let (_, mut qs) = bring_up(&d, !0);
    let q = &mut qs[3];
    let mem_end = MEM_SIZE as u64;
    for (addr, len) in [
        (mem_end - MIB, (2 * MIB) as u32), // overlaps the end of RAM
        (u64::MAX - 4095, 8192),           // wraps around 2^64
        (0, u32::MAX),                     // absurd length
        (mem_end, 4096),                   // just past the end
    ] {
        let head = q.add_chain(&d.mem, &[(addr, len, true)]);
        d.kick(3);
        assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 0)));
    }
    assert_eq!(counter(&h, "bad_reports"), 4);
    assert_eq!(counter(&h, "reported_bytes"), 0);
    assert_eq!(counter(&h, "discarded_bytes"), 0);
    // Ragged ranges free only their whole pages; zero-length ones are ignored.
    touch(&d.mem, 8 * MIB, 4 * PAGE);
    q.add_chain(
        &d.mem,
        &[(8 * MIB + 1, (3 * PAGE) as u32, false), (8 * MIB, 0, true)],
    );
    d.kick(3);
    assert!(q.wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "discarded_bytes"), 2 * PAGE);
    assert_eq!(
        resident(&d.mem, 8 * MIB, 4 * PAGE),
        vec![true, false, false, true]
    );
    assert_eq!(d.status() & 0x40, 0);
}

#[test]
fn a_driver_without_the_pfn_queues_gets_needs_reset() {
    let (d, _h) = default_balloon();
    d.negotiate(!0);
    d.setup_queue(0, 16); // no deflateq
    d.driver_ok();
    assert!(!d.dev.lock().unwrap().is_activated());
    assert_eq!(d.status() & 0x40, 0x40);
    // A proper bring-up after reset works.
    let (_, mut qs) = bring_up(&d, !0);
    send_pfns(&d, &mut qs[0], &[pfn(8 * MIB)]);
}

#[test]
fn random_rings_never_panic() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.free_page_reporting = true;
    cfg.stats_period = 1;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    let (_, mut qs) = bring_up(&d, !0);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    // Random PFN arrays in the buffer area.
    let junk: Vec<u8> = (0..0x4000).map(|_| rnd() as u8).collect();
    d.mem.write_slice(&junk, GuestAddress(BUFS)).unwrap();
    for round in 0..200u32 {
        let qi = (rnd() % 4) as usize;
        let addr = match rnd() % 3 {
            0 => rnd(),
            1 => MEM_SIZE as u64 - rnd() % 8192,
            _ => BUFS + rnd() % 0x3000,
        };
        let len = match rnd() % 3 {
            0 => rnd() as u32,
            _ => (rnd() % 4096) as u32,
        };
        let write = rnd() % 2 == 0;
        let q = &mut qs[qi];
        let head = q.add_chain(&d.mem, &[(addr, len, write)]);
        d.kick(qi as u16);
        if qi != 2 {
            assert_eq!(
                q.wait_used(&d.mem),
                Some((u32::from(head), 0)),
                "round {round}"
            );
        }
    }
    assert_eq!(d.status() & 0x40, 0, "no NEEDS_RESET, no worker panic");
    // Still serving.
    send_pfns(&d, &mut qs[0], &[pfn(8 * MIB)]);
    assert!(counter(&h, "inflated_pages") >= 1);
}

#[test]
fn pieces_of_large_host_pages_are_freed_once_the_whole_page_is_ballooned() {
    // Ordinary memory, treated as if host pages were 16 KiB (as hugetlbfs pages are larger
    // than the balloon's 4 KiB): the same code path, checkable with mincore.
    const HP: u64 = 4 * PAGE;
    let mem = anon_memory(4 * MIB);
    let mut dis = Discarder::new(&mem, DiscardMode::Auto);
    dis.set_page_size(HP);
    touch(&mem, 0, 4 * MIB);
    // Three quarters of a host page: nothing freed yet, but remembered.
    let d = dis.inflate(MIB, PAGE).unwrap();
    assert_eq!((d.freed, d.skipped), (0, PAGE));
    assert_eq!(dis.inflate(MIB + PAGE, 2 * PAGE).unwrap().freed, 0);
    assert_eq!(dis.partial_pages(), 1);
    assert!(resident(&mem, MIB, HP).iter().all(|&r| r));
    // The last quarter, in another request: the host page goes.
    assert_eq!(dis.inflate(MIB + 3 * PAGE, PAGE).unwrap().freed, HP);
    assert_eq!(dis.partial_pages(), 0);
    assert!(resident(&mem, MIB, HP).iter().all(|&r| !r));
    // A ragged range: its whole host page is freed at once, its piece waits.
    let d = dis.inflate(2 * MIB + 2 * PAGE, 6 * PAGE).unwrap();
    assert_eq!(d.freed, HP);
    assert_eq!(dis.partial_pages(), 1);
    assert_eq!(
        resident(&mem, 2 * MIB, 2 * HP),
        [[true; 4], [false; 4]].concat()
    );
    // A piece deflated before its page is complete no longer counts.
    dis.deflate(2 * MIB + 2 * PAGE, PAGE);
    assert_eq!(
        dis.inflate(2 * MIB, 2 * PAGE).unwrap().freed,
        0,
        "piece 2 is back"
    );
    assert_eq!(dis.inflate(2 * MIB + 2 * PAGE, PAGE).unwrap().freed, HP);
    assert!(resident(&mem, 2 * MIB, HP).iter().all(|&r| !r));
    // Deflating every piece drops the entry.
    dis.inflate(3 * MIB, PAGE).unwrap();
    assert_eq!(dis.partial_pages(), 1);
    dis.deflate(3 * MIB, PAGE);
    assert_eq!(dis.partial_pages(), 0);
    // Free page reporting frees whole host pages only and remembers nothing.
    let d = dis.discard(3 * MIB + PAGE, HP + 3 * PAGE).unwrap();
    assert_eq!((d.freed, d.skipped), (HP, 3 * PAGE));
    assert_eq!(dis.partial_pages(), 0);
}

#[test]
fn inhibited_discard_keeps_memory_until_lifted() {
    let mut cfg = BalloonConfig::new(MEM_SIZE as u64);
    cfg.free_page_reporting = true;
    let (d, h) = new_balloon(cfg, anon_memory(MEM_SIZE as u64));
    let (_, mut qs) = bring_up(&d, !0);
    touch(&d.mem, 8 * MIB, 2 * MIB);
    h.set_discard_inhibited(true);
    assert!(h.discard_inhibited());
    send_pfns(
        &d,
        &mut qs[0],
        &(pfn(8 * MIB)..pfn(9 * MIB)).collect::<Vec<_>>(),
    );
    qs[3].add_chain(&d.mem, &[(9 * MIB, MIB as u32, true)]);
    d.kick(3);
    assert!(qs[3].wait_used(&d.mem).is_some());
    assert_eq!(counter(&h, "inflated_pages"), 256);
    assert_eq!(counter(&h, "reported_bytes"), MIB);
    assert_eq!(counter(&h, "discarded_bytes"), 0);
    assert_eq!(counter(&h, "discard_skipped_bytes"), 2 * MIB);
    assert!(resident(&d.mem, 8 * MIB, 2 * MIB).iter().all(|&r| r));
    h.set_discard_inhibited(false);
    send_pfns(
        &d,
        &mut qs[0],
        &(pfn(8 * MIB)..pfn(9 * MIB)).collect::<Vec<_>>(),
    );
    assert_eq!(counter(&h, "discarded_bytes"), MIB);
    assert!(resident(&d.mem, 8 * MIB, MIB).iter().all(|&r| !r));
}

#[test]
fn privately_mapped_memfd_is_only_punched_when_owned() {
    let size = 4 * MIB;
    for (mode, file_freed) in [
        (DiscardMode::Auto, false),
        (DiscardMode::AutoOwnedFiles, true),
    ] {
        let file = memfd(size);
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(file.try_clone().unwrap(), 0)),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .unwrap();
        let mem =
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(region, GuestAddress(0)).unwrap()
            ])
            .unwrap();
        // Read first (the memfd gets the pages), then write (private copies).
        let mut buf = vec![0u8; (2 * MIB) as usize];
        mem.read_slice(&mut buf, GuestAddress(MIB)).unwrap();
        touch(&mem, MIB, 2 * MIB);
        let before = file.metadata().unwrap().blocks() * 512;
        assert!(before >= 2 * MIB, "{mode:?}: memfd holds {before}");
        let dis = Discarder::new(&mem, mode);
        assert_eq!(dis.discard(MIB, 2 * MIB).unwrap().freed, 2 * MIB);
        // mincore on a file mapping sees the file's cached pages: with Auto they stay (only
        // the private copies went), with AutoOwnedFiles they are gone too.
        assert!(
            resident(&mem, MIB, 2 * MIB)
                .iter()
                .all(|&r| r != file_freed),
            "{mode:?}"
        );
        let after = file.metadata().unwrap().blocks() * 512;
        assert_eq!(
            after + 2 * MIB <= before,
            file_freed,
            "{mode:?}: {before} -> {after}"
        );
        // Either way the guest reads zeros (the file was never written through this mapping).
        assert_eq!(mem.read_obj::<u64>(GuestAddress(MIB)).unwrap(), 0);
    }
}
