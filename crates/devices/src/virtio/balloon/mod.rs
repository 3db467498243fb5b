//! virtio-balloon (memory balloon, virtio id 5; virtio spec 1.2, section 5.5).
//!
//! The host sets a target (`num_pages`, in 4 KiB balloon pages) through the
//! [`BalloonHandle`]; the driver inflates (gives page frame numbers to the host, which frees
//! them) or deflates (takes them back) until the balloon has that size, and writes how far it
//! got into `actual`. With `VIRTIO_BALLOON_F_REPORTING` the driver also reports ranges of free
//! memory, which are freed the same way; with `VIRTIO_BALLOON_F_STATS_VQ` it posts memory
//! statistics, returned to it every `stats_period` seconds so it sends fresh ones.
//!
//! Queues (numbered contiguously over the *negotiated* features, spec 5.5.2): 0 inflateq,
//! 1 deflateq, then statsq if STATS_VQ, then reporting_vq if REPORTING. The transport offers
//! 3 queues (4 with reporting configured); a driver without STATS_VQ puts reporting_vq at 2.
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use rvirt_devices::{virtio::*, virtio::balloon::*, GuestMemory, MsiRouting, IoEventRegistry};
//! # fn wire(mem: GuestMemory, routing: Arc<dyn MsiRouting>, ioevents: Arc<dyn IoEventRegistry>,
//! #         bus: &rvirt_devices::pci::PciBus) -> Result<(), Box<dyn std::error::Error>> {
//! let mut cfg = BalloonConfig::new(1 << 30); // guest RAM in bytes
//! cfg.stats_period = 10;
//! let (balloon, handle) = Balloon::new(cfg)?;
//! handle.on_actual_change(|actual_bytes| println!("BALLOON_CHANGE {actual_bytes}"));
//! handle.set_target_bytes(512 << 20); // applies when the driver comes up
//! let dev = VirtioPciDevice::new(Box::new(balloon), mem, routing, ioevents)?;
//! bus.add_device(Arc::new(Mutex::new(dev)))?;
//! # Ok(()) }
//! ```

mod discard;
mod stats;
#[cfg(test)]
mod tests;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::warn;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

pub use discard::{DiscardError, DiscardMethod, DiscardMode};
pub use stats::{
    BalloonStats, VIRTIO_BALLOON_S_AVAIL, VIRTIO_BALLOON_S_CACHES, VIRTIO_BALLOON_S_HTLB_PGALLOC,
    VIRTIO_BALLOON_S_HTLB_PGFAIL, VIRTIO_BALLOON_S_MAJFLT, VIRTIO_BALLOON_S_MEMFREE,
    VIRTIO_BALLOON_S_MEMTOT, VIRTIO_BALLOON_S_MINFLT, VIRTIO_BALLOON_S_SWAP_IN,
    VIRTIO_BALLOON_S_SWAP_OUT,
};

use self::discard::Discarder;
use super::queue::{ChainOutcome, QueueIo, RingError};
use super::worker::{Worker, WorkerAction, WorkerCtl, WorkerHandler};
use super::{bit, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// The virtio device id of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Host must be told before pages are used again (not offered).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u32 = 0;
/// A statistics queue exists.
pub const VIRTIO_BALLOON_F_STATS_VQ: u32 = 1;
/// The guest deflates on out-of-memory without being asked.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u32 = 2;
/// Free page hinting (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u32 = 3;
/// `poison_val` is valid: the guest fills free pages with it.
pub const VIRTIO_BALLOON_F_PAGE_POISON: u32 = 4;
/// A free page reporting queue exists.
pub const VIRTIO_BALLOON_F_REPORTING: u32 = 5;

/// The balloon's page size: PFNs are in units of 4 KiB whatever the host page size.
pub const BALLOON_PAGE_SIZE: u64 = 1 << BALLOON_PFN_SHIFT;
/// log2 of [`BALLOON_PAGE_SIZE`].
pub const BALLOON_PFN_SHIFT: u32 = 12;

/// Config space: num_pages, actual, free_page_hint_cmd_id, poison_val (all le32).
const CONFIG_SIZE: usize = 16;
const OFF_NUM_PAGES: usize = 0;
const OFF_ACTUAL: usize = 4;
const OFF_POISON: usize = 12;

const QUEUE_SIZE: u16 = 128;
/// PFNs read and freed in one go (Linux sends at most 256 per request).
const PFN_CHUNK: usize = 512;
/// At most this many PFNs per chain (256 MiB): a descriptor of absurd length cannot keep the
/// worker busy for long; the rest of it is ignored.
const MAX_PFNS_PER_CHAIN: usize = 1 << 16;
/// At most this many stats bytes per buffer (64 entries; Linux sends 16 at most).
const MAX_STATS_BYTES: usize = 64 * stats::STAT_SIZE;

const TOKEN_INFLATE: u64 = 0;
const TOKEN_DEFLATE: u64 = 1;
const TOKEN_STATS: u64 = 2;
const TOKEN_REPORTING: u64 = 3;
const TOKEN_TIMER: u64 = 4;
const TOKEN_WAKE: u64 = 5;

/// How the balloon is set up.
#[derive(Clone, Debug)]
pub struct BalloonConfig {
    /// Guest RAM in bytes (the memory map's RAM, the most `actual` can be): targets are
    /// converted with it, QEMU style (`num_pages = (ram_size - target) / 4096`).
    pub ram_size: u64,
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM (libvirt `autodeflate='on'`).
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_REPORTING (libvirt `freePageReporting='on'`).
    pub free_page_reporting: bool,
    /// Seconds between statistics refreshes; 0 = off (changeable with
    /// [`BalloonHandle::set_stats_period`]).
    pub stats_period: u32,
    /// How freed pages are given back to the host.
    pub discard: DiscardMode,
}

impl BalloonConfig {
    /// A balloon for `ram_size` bytes of guest RAM: no deflate-on-OOM, no reporting, no stats
    /// polling, memory returned per region ([`DiscardMode::Auto`]).
    pub fn new(ram_size: u64) -> Self {
        BalloonConfig {
            ram_size,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_period: 0,
            discard: DiscardMode::Auto,
        }
    }
}

/// Creating the balloon failed.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The worker's wake-up eventfd could not be created.
    #[error("virtio-balloon: cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

#[derive(Debug, Default)]
struct Counters {
    inflated_pages: AtomicU64,
    deflated_pages: AtomicU64,
    bad_pfns: AtomicU64,
    bad_descriptors: AtomicU64,
    reported_ranges: AtomicU64,
    reported_bytes: AtomicU64,
    bad_reports: AtomicU64,
    discarded_bytes: AtomicU64,
    discard_skipped_bytes: AtomicU64,
    discard_errors: AtomicU64,
    stats_updates: AtomicU64,
    stats_unknown_tags: AtomicU64,
    stats_truncated: AtomicU64,
    config_changes: AtomicU64,
}

impl Counters {
    fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("inflated_pages", l(&self.inflated_pages)),
            ("deflated_pages", l(&self.deflated_pages)),
            ("bad_pfns", l(&self.bad_pfns)),
            ("bad_descriptors", l(&self.bad_descriptors)),
            ("reported_ranges", l(&self.reported_ranges)),
            ("reported_bytes", l(&self.reported_bytes)),
            ("bad_reports", l(&self.bad_reports)),
            ("discarded_bytes", l(&self.discarded_bytes)),
            ("discard_skipped_bytes", l(&self.discard_skipped_bytes)),
            ("discard_errors", l(&self.discard_errors)),
            ("stats_updates", l(&self.stats_updates)),
            ("stats_unknown_tags", l(&self.stats_unknown_tags)),
            ("stats_truncated", l(&self.stats_truncated)),
            ("config_changes", l(&self.config_changes)),
        ]
    }
}

type ActualCallback = Arc<dyn Fn(u64) + Send + Sync>;

/// State shared by the device, its worker and the VMM's handles.
struct Shared {
    ram_size: u64,
    /// The host's target in bytes (what the guest should keep), clamped to `ram_size`.
    target: AtomicU64,
    num_pages: AtomicU32,
    actual: AtomicU32,
    poison_val: AtomicU32,
    stats_period: AtomicU32,
    /// While set, nothing is given back to the host (bookkeeping goes on).
    inhibited: AtomicBool,
    stats: Mutex<BalloonStats>,
    /// Set while the device is activated: where config-change interrupts go.
    interrupt: Mutex<Option<Arc<VirtioInterrupt>>>,
    on_actual: Mutex<Option<ActualCallback>>,
    /// Tells the worker to re-read `stats_period`.
    wake: EventFd,
    counters: Counters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn actual_bytes(&self) -> u64 {
        let pages = u64::from(self.actual.load(Ordering::Acquire));
        self.ram_size.saturating_sub(pages << BALLOON_PFN_SHIFT)
    }

    fn notify_actual(&self) {
        let cb = lock(&self.on_actual).clone();
        if let Some(cb) = cb {
            cb(self.actual_bytes());
        }
    }

    fn signal_config(&self) {
        if let Some(irq) = lock(&self.interrupt).as_ref() {
            self.counters.config_changes.fetch_add(1, Ordering::Relaxed);
            irq.signal_config();
        }
    }
}

/// The VMM's side of a balloon: cheap to clone, usable from any thread, valid for the device's
/// whole life (across driver resets).
#[derive(Clone)]
pub struct BalloonHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for BalloonHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BalloonHandle")
            .field("target_bytes", &self.target_bytes())
            .field("actual_bytes", &self.actual_bytes())
            .finish()
    }
}

impl BalloonHandle {
    /// Asks the guest to keep `target` bytes of RAM (QEMU's `balloon`, libvirt's `setmem`):
    /// `num_pages = (ram_size - target) / 4096`, `target` clamped to the RAM size. When the
    /// driver is up it gets a config-change interrupt; before that the value waits in the
    /// config space, where the driver reads it when it starts.
    pub fn set_target_bytes(&self, target: u64) {
        let s = &self.shared;
        let target = target.min(s.ram_size);
        let pages = ((s.ram_size - target) >> BALLOON_PFN_SHIFT).min(u64::from(u32::MAX));
        s.target.store(target, Ordering::Release);
        s.num_pages.store(pages as u32, Ordering::Release);
        s.signal_config();
    }

    /// The target set last (bytes the guest should keep); the RAM size until one is set.
    pub fn target_bytes(&self) -> u64 {
        self.shared.target.load(Ordering::Acquire)
    }

    /// The balloon size the host asks for, in 4 KiB pages (config `num_pages`).
    pub fn target_pages(&self) -> u32 {
        self.shared.num_pages.load(Ordering::Acquire)
    }

    /// Guest RAM not in the balloon as the driver last reported it: `ram_size - actual * 4096`
    /// (QEMU's `actual`).
    pub fn actual_bytes(&self) -> u64 {
        self.shared.actual_bytes()
    }

    /// The balloon size the driver reports, in 4 KiB pages (config `actual`).
    pub fn actual_pages(&self) -> u32 {
        self.shared.actual.load(Ordering::Acquire)
    }

    /// Guest RAM size given at construction.
    pub fn ram_size(&self) -> u64 {
        self.shared.ram_size
    }

    /// The guest's latest statistics (all `None`, `last_update` 0, before the first report).
    pub fn stats(&self) -> BalloonStats {
        *lock(&self.shared.stats)
    }

    /// Refresh statistics every `secs` seconds (0 = stop); takes effect at once if the driver
    /// is up.
    pub fn set_stats_period(&self, secs: u32) {
        self.shared.stats_period.store(secs, Ordering::Release);
        if let Err(e) = self.shared.wake.write(1) {
            warn!("virtio-balloon: cannot wake the worker: {e}");
        }
    }

    /// The statistics period in seconds (0 = off).
    pub fn stats_period(&self) -> u32 {
        self.shared.stats_period.load(Ordering::Acquire)
    }

    /// Calls `f(actual_bytes)` whenever the driver writes a new `actual` (and when a device
    /// reset empties the balloon): the VMM turns it into its BALLOON_CHANGE event (QEMU
    /// throttles that event to one per second; that is the VMM's business). `f` runs on a vCPU
    /// thread while the PCI device's lock is held: it must be quick and must not touch that
    /// device. It may call this handle's getters. Replaces any earlier callback.
    pub fn on_actual_change(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        *lock(&self.shared.on_actual) = Some(Arc::new(f));
    }

    /// Stop (`true`) or resume (`false`) giving memory back to the host, for as long as RAM
    /// must stay populated (a snapshot or migration reading it, QEMU's "balloon inhibited").
    /// Inflate, deflate and reports are still served and counted; what is not freed meanwhile
    /// is counted in `discard_skipped_bytes` and stays with the VM until the guest gives it
    /// again. Applies to requests the worker starts after the call; to be sure none is being
    /// served at that moment, close the VM's `PauseGate` after setting it (`pause` waits for
    /// the event in hand).
    pub fn set_discard_inhibited(&self, inhibited: bool) {
        self.shared.inhibited.store(inhibited, Ordering::Release);
    }

    /// Whether giving memory back is inhibited ([`BalloonHandle::set_discard_inhibited`]).
    pub fn discard_inhibited(&self) -> bool {
        self.shared.inhibited.load(Ordering::Acquire)
    }

    /// The device's counters (the same as [`VirtioDevice::counters`]).
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.shared.counters.snapshot()
    }
}

/// The virtio memory balloon device.
pub struct Balloon {
    cfg: BalloonConfig,
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("cfg", &self.cfg)
            .field("running", &self.worker.is_some())
            .finish()
    }
}

impl Balloon {
    /// A balloon device and the handle the VMM keeps (the device itself goes into a
    /// `VirtioPciDevice`). The target starts at the RAM size (an empty balloon).
    pub fn new(cfg: BalloonConfig) -> Result<(Balloon, BalloonHandle), BalloonError> {
        let shared = Arc::new(Shared {
            ram_size: cfg.ram_size,
            target: AtomicU64::new(cfg.ram_size),
            num_pages: AtomicU32::new(0),
            actual: AtomicU32::new(0),
            poison_val: AtomicU32::new(0),
            stats_period: AtomicU32::new(cfg.stats_period),
            inhibited: AtomicBool::new(false),
            stats: Mutex::default(),
            interrupt: Mutex::new(None),
            on_actual: Mutex::new(None),
            wake: EventFd::new(EFD_NONBLOCK).map_err(BalloonError::EventFd)?,
            counters: Counters::default(),
        });
        let queues = if cfg.free_page_reporting { 4 } else { 3 };
        let balloon = Balloon {
            cfg,
            shared: shared.clone(),
            queue_sizes: vec![QUEUE_SIZE; queues],
            worker: None,
        };
        Ok((balloon, BalloonHandle { shared }))
    }

    /// Another handle on this device.
    pub fn handle(&self) -> BalloonHandle {
        BalloonHandle {
            shared: self.shared.clone(),
        }
    }

    fn config_bytes(&self) -> [u8; CONFIG_SIZE] {
        let s = &self.shared;
        let mut b = [0u8; CONFIG_SIZE];
        b[OFF_NUM_PAGES..OFF_NUM_PAGES + 4]
            .copy_from_slice(&s.num_pages.load(Ordering::Acquire).to_le_bytes());
        b[OFF_ACTUAL..OFF_ACTUAL + 4]
            .copy_from_slice(&s.actual.load(Ordering::Acquire).to_le_bytes());
        // free_page_hint_cmd_id (8..12) stays 0: hinting is not offered.
        b[OFF_POISON..OFF_POISON + 4]
            .copy_from_slice(&s.poison_val.load(Ordering::Acquire).to_le_bytes());
        b
    }
}

/// What each queue the driver enabled is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

/// Queue roles by queue index for the negotiated `features` (spec 5.5.2: contiguous, absent
/// queues take no index).
fn queue_roles(features: u64) -> Vec<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if features & bit(VIRTIO_BALLOON_F_STATS_VQ) != 0 {
        roles.push(Role::Stats);
    }
    if features & bit(VIRTIO_BALLOON_F_REPORTING) != 0 {
        roles.push(Role::Reporting);
    }
    roles
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn name(&self) -> &'static str {
        "balloon"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = bit(VIRTIO_F_VERSION_1)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC)
            | bit(VIRTIO_BALLOON_F_STATS_VQ)
            | bit(VIRTIO_BALLOON_F_PAGE_POISON);
        if self.cfg.deflate_on_oom {
            f |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
        }
        if self.cfg.free_page_reporting {
            f |= bit(VIRTIO_BALLOON_F_REPORTING);
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let cfg = self.config_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| cfg.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    /// The driver writes `actual` (and `poison_val`); `num_pages` and the hint command id are
    /// the device's and stay as they are.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut cfg = self.config_bytes();
        let mut ignored = false;
        for (i, &b) in data.iter().enumerate() {
            match usize::try_from(offset).ok().and_then(|o| o.checked_add(i)) {
                Some(o @ (4..8 | 12..16)) => cfg[o] = b,
                _ => ignored = true,
            }
        }
        if ignored {
            crate::guest_warn!(
                "virtio-balloon: driver wrote {} bytes at read-only config offset {offset:#x}; \
                 ignored",
                data.len()
            );
        }
        let word = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
        let s = &self.shared;
        s.poison_val.store(word(OFF_POISON), Ordering::Release);
        let actual = word(OFF_ACTUAL);
        if s.actual.swap(actual, Ordering::AcqRel) != actual {
            s.notify_actual();
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let worker_err = |source| ActivateError::Worker {
            device: "balloon",
            source,
        };
        let roles = queue_roles(ctx.acked_features);
        let mut queues: [Option<QueueIo>; 4] = Default::default();
        for q in ctx.queues {
            let Some(&role) = roles.get(q.index) else {
                crate::guest_warn!(
                    "virtio-balloon: queue {} enabled but not part of the negotiated features; \
                     ignored",
                    q.index
                );
                continue;
            };
            queues[role as usize] = Some(QueueIo {
                index: q.index,
                queue: q.queue,
                notify: q.notify,
            });
        }
        let [inflate, deflate, stats, reporting] = queues;
        let inflate = inflate.ok_or(ActivateError::MissingQueue {
            device: "balloon",
            index: 0,
        })?;
        let deflate = deflate.ok_or(ActivateError::MissingQueue {
            device: "balloon",
            index: 1,
        })?;
        let mut timer = TimerFd::new()
            .map_err(std::io::Error::from)
            .map_err(worker_err)?;
        set_nonblocking(&timer).map_err(worker_err)?;
        let wake = self.shared.wake.try_clone().map_err(worker_err)?;
        // Drop a stale wake-up from before this activation.
        let _ = wake.read();
        let mut fds = vec![
            (inflate.notify.as_raw_fd(), TOKEN_INFLATE),
            (deflate.notify.as_raw_fd(), TOKEN_DEFLATE),
            (timer.as_raw_fd(), TOKEN_TIMER),
            (wake.as_raw_fd(), TOKEN_WAKE),
        ];
        if let Some(q) = &stats {
            fds.push((q.notify.as_raw_fd(), TOKEN_STATS));
        }
        if let Some(q) = &reporting {
            fds.push((q.notify.as_raw_fd(), TOKEN_REPORTING));
        }
        let period = self.shared.stats_period.load(Ordering::Acquire);
        if stats.is_some() {
            arm(&mut timer, period).map_err(worker_err)?;
        }
        let handler = BalloonWorker {
            discarder: Discarder::new(&ctx.mem, self.cfg.discard),
            mem: ctx.mem,
            irq: ctx.interrupt.clone(),
            shared: self.shared.clone(),
            poison_negotiated: ctx.acked_features & bit(VIRTIO_BALLOON_F_PAGE_POISON) != 0,
            inflate,
            deflate,
            stats: stats.map(|io| StatsQueue { io, held: None }),
            reporting,
            timer,
            armed_period: period,
            wake,
            pfn_bytes: vec![0; PFN_CHUNK * 4],
            pfns: Vec::with_capacity(PFN_CHUNK),
        };
        self.worker = Some(
            Worker::spawn_gated("virtio-balloon".into(), &fds, handler, ctx.gate.clone())
                .map_err(worker_err)?,
        );
        *lock(&self.shared.interrupt) = Some(ctx.interrupt);
        // A target set before the driver came up: the driver reads num_pages when it starts,
        // but tell it anyway (harmless if it already knows).
        if self.shared.num_pages.load(Ordering::Acquire) != 0 {
            self.shared.signal_config();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
        let s = &self.shared;
        *lock(&s.interrupt) = None;
        s.poison_val.store(0, Ordering::Release);
        // A reset driver has an empty balloon: every page is the guest's again.
        if s.actual.swap(0, Ordering::AcqRel) != 0 {
            s.notify_actual();
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        self.shared.counters.snapshot()
    }
}

fn set_nonblocking(timer: &TimerFd) -> std::io::Result<()> {
    let fd = timer.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on an fd owned by `timer` change only its file status flags.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Arms `timer` to fire every `period` seconds, or disarms it for 0.
fn arm(timer: &mut TimerFd, period: u32) -> std::io::Result<()> {
    let result = if period == 0 {
        timer.clear()
    } else {
        let d = Duration::from_secs(u64::from(period));
        timer.reset(d, Some(d))
    };
    result.map_err(std::io::Error::from)
}

/// The stats queue and the buffer the device holds until the next refresh.
struct StatsQueue {
    io: QueueIo,
    held: Option<u16>,
}

struct BalloonWorker {
    mem: GuestMemory,
    irq: Arc<VirtioInterrupt>,
    shared: Arc<Shared>,
    discarder: Discarder,
    poison_negotiated: bool,
    inflate: QueueIo,
    deflate: QueueIo,
    stats: Option<StatsQueue>,
    reporting: Option<QueueIo>,
    timer: TimerFd,
    armed_period: u32,
    wake: EventFd,
    pfn_bytes: Vec<u8>,
    pfns: Vec<u64>,
}

/// What to do with the pages of an inflate or deflate request.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Inflate,
    Deflate,
}

impl Direction {
    fn name(self) -> &'static str {
        match self {
            Direction::Inflate => "inflate",
            Direction::Deflate => "deflate",
        }
    }
}

/// Counts the outcome of a discard.
fn count_discard(c: &Counters, result: Result<discard::Discarded, DiscardError>) {
    match result {
        Ok(d) => {
            Counters::add(&c.discarded_bytes, d.freed);
            Counters::add(&c.discard_skipped_bytes, d.skipped);
        }
        Err(e) => {
            Counters::add(&c.discard_errors, 1);
            crate::guest_warn!("{e}");
        }
    }
}

/// Sorts the valid PFNs of one chunk, drops duplicates, and hands them to the discarder as runs
/// of contiguous pages: one syscall per run.
fn apply_pfns(pfns: &mut Vec<u64>, dir: Direction, discarder: &mut Discarder, shared: &Shared) {
    let c = &shared.counters;
    let inhibited = shared.inhibited.load(Ordering::Acquire);
    pfns.sort_unstable();
    pfns.dedup();
    let pages = pfns.len() as u64;
    match dir {
        Direction::Inflate => Counters::add(&c.inflated_pages, pages),
        Direction::Deflate => Counters::add(&c.deflated_pages, pages),
    }
    let mut i = 0;
    while i < pfns.len() {
        let start = pfns[i];
        let mut n = 1;
        while i + n < pfns.len() && pfns[i + n] == start + n as u64 {
            n += 1;
        }
        let (gpa, len) = (start << BALLOON_PFN_SHIFT, (n as u64) << BALLOON_PFN_SHIFT);
        match dir {
            Direction::Inflate if inhibited => Counters::add(&c.discard_skipped_bytes, len),
            Direction::Inflate => count_discard(c, discarder.inflate(gpa, len)),
            // Nothing to do for the memory itself: a page the guest touches again is faulted
            // in by the host (zeroed, or from the file). Only pieces of large host pages that
            // were waiting for the rest of their page are forgotten.
            Direction::Deflate => discarder.deflate(gpa, len),
        }
        i += n;
    }
    pfns.clear();
}

impl BalloonWorker {
    /// Serves one inflate or deflate chain: device-readable buffers of le32 PFNs.
    fn pfn_chain(
        mem: &GuestMemory,
        discarder: &mut Discarder,
        shared: &Shared,
        bytes: &mut [u8],
        pfns: &mut Vec<u64>,
        dir: Direction,
        chain: DescriptorChain<&GuestMemory>,
    ) {
        let c = &shared.counters;
        let mut total = 0usize;
        for desc in chain {
            if desc.is_write_only() {
                Counters::add(&c.bad_descriptors, 1);
                crate::guest_warn!(
                    "virtio-balloon: device-writable descriptor in an {} request; skipped",
                    dir.name()
                );
                continue;
            }
            let len = desc.len() as usize;
            if !len.is_multiple_of(4) {
                Counters::add(&c.bad_descriptors, 1);
                crate::guest_warn!(
                    "virtio-balloon: {} descriptor of {len} bytes is not a whole number of \
                     PFNs; the rest is ignored",
                    dir.name()
                );
            }
            let mut left = len / 4;
            if total + left > MAX_PFNS_PER_CHAIN {
                Counters::add(&c.bad_descriptors, 1);
                crate::guest_warn!(
                    "virtio-balloon: {} request of more than {MAX_PFNS_PER_CHAIN} PFNs; the \
                     rest is ignored",
                    dir.name()
                );
                left = MAX_PFNS_PER_CHAIN - total;
            }
            let mut addr = desc.addr();
            while left > 0 {
                let n = left.min(PFN_CHUNK);
                let buf = &mut bytes[..n * 4];
                if mem.read_slice(buf, addr).is_err() {
                    Counters::add(&c.bad_descriptors, 1);
                    crate::guest_warn!(
                        "virtio-balloon: {} buffer {:#x}+{:#x} is outside guest memory",
                        dir.name(),
                        addr.0,
                        n * 4
                    );
                    break;
                }
                for raw in buf.chunks_exact(4) {
                    let pfn = u64::from(u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]));
                    let gpa = pfn << BALLOON_PFN_SHIFT;
                    if mem.check_range(GuestAddress(gpa), BALLOON_PAGE_SIZE as usize) {
                        pfns.push(pfn);
                    } else {
                        Counters::add(&c.bad_pfns, 1);
                        crate::guest_warn!(
                            "virtio-balloon: {} of PFN {pfn:#x} (guest {gpa:#x}) outside guest \
                             memory; ignored",
                            dir.name()
                        );
                    }
                }
                apply_pfns(pfns, dir, discarder, shared);
                total += n;
                left -= n;
                addr = GuestAddress(addr.0.wrapping_add((n * 4) as u64));
            }
        }
    }

    fn serve_pfns(&mut self, dir: Direction) -> WorkerAction {
        let BalloonWorker {
            mem,
            irq,
            shared,
            discarder,
            inflate,
            deflate,
            pfn_bytes,
            pfns,
            ..
        } = self;
        let q = match dir {
            Direction::Inflate => inflate,
            Direction::Deflate => deflate,
        };
        let _ = q.notify.read();
        let result = q.drain(mem, irq, |chain| {
            Self::pfn_chain(mem, discarder, shared, pfn_bytes, pfns, dir, chain);
            ChainOutcome::Used(0)
        });
        super::worker::ring_result("virtio-balloon", result, irq)
    }

    /// Serves reporting chains: each descriptor is a range of free guest memory to free.
    fn serve_reports(&mut self) -> WorkerAction {
        let BalloonWorker {
            mem,
            irq,
            shared,
            discarder,
            reporting,
            poison_negotiated,
            ..
        } = self;
        let Some(q) = reporting else {
            return WorkerAction::Continue;
        };
        let _ = q.notify.read();
        let c = &shared.counters;
        // A guest that fills free pages with a non-zero pattern would find zeros in a freed
        // page and take it for corruption: keep its pages (QEMU does the same). Inflated pages
        // are still freed: the driver writes a page before it uses it again after a deflate.
        let keep = (*poison_negotiated && shared.poison_val.load(Ordering::Acquire) != 0)
            || shared.inhibited.load(Ordering::Acquire);
        let result = q.drain(mem, irq, |chain| {
            for desc in chain {
                let (addr, len) = (desc.addr().0, u64::from(desc.len()));
                if len == 0 {
                    continue;
                }
                let inside = addr.checked_add(len).is_some()
                    && mem.check_range(desc.addr(), desc.len() as usize);
                if !inside {
                    Counters::add(&c.bad_reports, 1);
                    crate::guest_warn!(
                        "virtio-balloon: reported range {addr:#x}+{len:#x} is not inside guest \
                         memory; ignored"
                    );
                    continue;
                }
                Counters::add(&c.reported_ranges, 1);
                Counters::add(&c.reported_bytes, len);
                if keep {
                    Counters::add(&c.discard_skipped_bytes, len);
                } else {
                    count_discard(c, discarder.discard(addr, len));
                }
            }
            ChainOutcome::Used(0)
        });
        super::worker::ring_result("virtio-balloon", result, irq)
    }

    /// Reads the stats buffers the driver posted; keeps the newest one to give back on the
    /// next refresh.
    fn serve_stats(&mut self) -> WorkerAction {
        let BalloonWorker {
            mem,
            irq,
            shared,
            stats,
            ..
        } = self;
        let Some(sq) = stats else {
            return WorkerAction::Continue;
        };
        let _ = sq.io.notify.read();
        let result = Self::take_stats(mem, irq, shared, sq);
        super::worker::ring_result("virtio-balloon", result, irq)
    }

    fn take_stats(
        mem: &GuestMemory,
        irq: &VirtioInterrupt,
        shared: &Shared,
        sq: &mut StatsQueue,
    ) -> Result<(), RingError> {
        let index = sq.io.index;
        let err = |source| RingError { index, source };
        let size = sq.io.queue.size();
        let mut used_any = false;
        let mut served = 0u16;
        loop {
            sq.io.queue.disable_notification(mem).map_err(err)?;
            loop {
                if served >= size {
                    // Enough for one round; come back to the rest (as QueueIo::drain does).
                    sq.io.flush(mem, irq, used_any)?;
                    let _ = sq.io.notify.write(1);
                    return Ok(());
                }
                let q = &mut sq.io.queue;
                let avail = q.avail_idx(mem, Ordering::Acquire).map_err(err)?;
                let pending = avail.0.wrapping_sub(q.next_avail());
                if pending == 0 {
                    break;
                }
                if pending > size {
                    return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
                }
                let Some(chain) = q.iter(mem).map_err(err)?.next() else {
                    return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
                };
                served += 1;
                let head = chain.head_index();
                Self::read_stats(mem, shared, chain);
                if head >= size {
                    crate::guest_warn!(
                        "virtio-balloon: stats buffer head {head} beyond queue size {size}; \
                         dropped"
                    );
                    continue;
                }
                // A driver posts one buffer at a time; if it posts another, give the older one
                // back rather than lose it.
                if let Some(old) = sq.held.replace(head) {
                    sq.io.queue.add_used(mem, old, 0).map_err(err)?;
                    used_any = true;
                }
            }
            if !sq.io.queue.enable_notification(mem).map_err(err)? {
                break;
            }
        }
        sq.io.flush(mem, irq, used_any)
    }

    /// Parses one stats buffer into the shared statistics.
    fn read_stats(mem: &GuestMemory, shared: &Shared, chain: DescriptorChain<&GuestMemory>) {
        let c = &shared.counters;
        let mut buf = Vec::with_capacity(MAX_STATS_BYTES);
        let mut truncated = false;
        for desc in chain {
            if desc.is_write_only() {
                Counters::add(&c.bad_descriptors, 1);
                crate::guest_warn!("virtio-balloon: device-writable stats descriptor; skipped");
                continue;
            }
            let room = MAX_STATS_BYTES - buf.len();
            let len = (desc.len() as usize).min(room);
            if len < desc.len() as usize {
                truncated = true;
            }
            let at = buf.len();
            buf.resize(at + len, 0);
            if mem.read_slice(&mut buf[at..], desc.addr()).is_err() {
                Counters::add(&c.bad_descriptors, 1);
                crate::guest_warn!(
                    "virtio-balloon: stats buffer {:#x}+{len:#x} is outside guest memory",
                    desc.addr().0
                );
                buf.truncate(at);
                truncated = true;
                break;
            }
        }
        let parsed = stats::parse(&buf, now_secs());
        if truncated || parsed.trailing_bytes != 0 {
            Counters::add(&c.stats_truncated, 1);
            crate::guest_warn!(
                "virtio-balloon: stats buffer cut or not a whole number of entries ({} bytes \
                 used)",
                buf.len() - parsed.trailing_bytes
            );
        }
        Counters::add(&c.stats_unknown_tags, u64::from(parsed.unknown_tags));
        Counters::add(&c.stats_updates, 1);
        *lock(&shared.stats) = parsed.stats;
    }

    /// The refresh timer fired: give the held stats buffer back so the driver sends new stats.
    fn refresh_stats(&mut self) -> WorkerAction {
        // Non-blocking: EAGAIN when the timer was re-armed after epoll reported it.
        if self.timer.wait().is_err() {
            return WorkerAction::Continue;
        }
        let BalloonWorker {
            mem, irq, stats, ..
        } = self;
        let Some(sq) = stats else {
            return WorkerAction::Continue;
        };
        let Some(head) = sq.held.take() else {
            return WorkerAction::Continue;
        };
        let index = sq.io.index;
        let result = sq
            .io
            .queue
            .add_used(mem, head, 0)
            .map_err(|source| RingError { index, source })
            .and_then(|()| sq.io.flush(mem, irq, true));
        super::worker::ring_result("virtio-balloon", result, irq)
    }

    /// The VMM changed the statistics period.
    fn rearm(&mut self) -> WorkerAction {
        let _ = self.wake.read();
        let period = self.shared.stats_period.load(Ordering::Acquire);
        if self.stats.is_none() || period == self.armed_period {
            return WorkerAction::Continue;
        }
        match arm(&mut self.timer, period) {
            Ok(()) => self.armed_period = period,
            Err(e) => warn!("virtio-balloon: cannot set the stats timer to {period} s: {e}"),
        }
        WorkerAction::Continue
    }
}

impl WorkerHandler for BalloonWorker {
    fn broken(&mut self) {
        self.irq.set_needs_reset();
    }

    fn handle_event(&mut self, token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
        match token {
            TOKEN_INFLATE => self.serve_pfns(Direction::Inflate),
            TOKEN_DEFLATE => self.serve_pfns(Direction::Deflate),
            TOKEN_STATS => self.serve_stats(),
            TOKEN_REPORTING => self.serve_reports(),
            TOKEN_TIMER => self.refresh_stats(),
            TOKEN_WAKE => self.rearm(),
            _ => WorkerAction::Continue,
        }
    }
}
