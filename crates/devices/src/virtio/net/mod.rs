//! virtio-net (virtio id 1) over a TAP device: queue 0 receives, queue 1 transmits, one worker
//! thread polls both queues' eventfds and the TAP fd.
//!
//! Frames cross the TAP with the 12-byte virtio-net header, so checksum and segmentation
//! offloads pass straight through: the guest's transmit headers go to the kernel as they are,
//! and TUNSETOFFLOAD tells the kernel which offloaded frames (partial checksums, TSO, UFO) the
//! guest accepted on receive. The offloads offered are the ones the TAP accepts. Receive uses
//! mergeable buffers when the driver accepts VIRTIO_NET_F_MRG_RXBUF (Linux does).

mod tap;

use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::DescriptorChain;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

pub use self::tap::{
    NetBackend, PacketSocket, Tap, TapError, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN,
    TUN_F_UFO, VNET_HDR_LEN,
};
use super::queue::{ChainOutcome, QueueIo, RingError};
use super::worker::{ring_result, Worker, WorkerAction, WorkerCtl, WorkerHandler};
use super::{bit, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// The largest frame that crosses the device: a 64 KiB GSO frame, its Ethernet and VLAN
/// headers, and the vnet header.
pub const MAX_FRAME: usize = 65536 + 256 + VNET_HDR_LEN;
const RX: usize = 0;
const TX: usize = 1;
const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const CONFIG_SIZE: usize = 8;

/// How the interface is presented to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: [u8; 6],
}

#[derive(Debug, Default)]
struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
}

/// The virtio network device.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    config: [u8; CONFIG_SIZE],
    features: u64,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("backend", &self.backend)
            .field("running", &self.worker.is_some())
            .finish()
    }
}

/// The TUNSETOFFLOAD flags that match the receive offloads the guest accepted.
pub fn tun_offload_flags(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        // Every receive offload needs the guest to accept partial checksums.
        return 0;
    }
    let mut flags = TUN_F_CSUM;
    for (feature, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
        (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
    ] {
        if has(feature) {
            flags |= flag;
        }
    }
    flags
}

impl Net {
    /// A virtio-net device over `backend` (usually a [`Tap`]). Offloads are offered as far as
    /// the backend accepts them.
    pub fn new(backend: Arc<dyn NetBackend>, config: NetConfig) -> Self {
        let mut features = bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC);
        let accepts = |flags: u32| backend.set_offload(flags).is_ok();
        if accepts(TUN_F_CSUM) {
            // Guest → host offloads: the kernel takes them from the vnet header of each frame.
            features |= bit(VIRTIO_NET_F_CSUM)
                | bit(VIRTIO_NET_F_HOST_TSO4)
                | bit(VIRTIO_NET_F_HOST_TSO6)
                | bit(VIRTIO_NET_F_HOST_ECN)
                | bit(VIRTIO_NET_F_GUEST_CSUM);
            for (flags, feature) in [
                (TUN_F_TSO4, VIRTIO_NET_F_GUEST_TSO4),
                (TUN_F_TSO6, VIRTIO_NET_F_GUEST_TSO6),
                (TUN_F_TSO4 | TUN_F_TSO_ECN, VIRTIO_NET_F_GUEST_ECN),
                (TUN_F_UFO, VIRTIO_NET_F_GUEST_UFO),
            ] {
                if accepts(TUN_F_CSUM | flags) {
                    features |= bit(feature);
                }
            }
            if features & bit(VIRTIO_NET_F_GUEST_UFO) != 0 {
                features |= bit(VIRTIO_NET_F_HOST_UFO);
            }
        }
        if let Err(e) = backend.set_offload(0) {
            warn!("virtio-net: cannot clear TAP offloads: {e}");
        }
        let mut c = [0u8; CONFIG_SIZE];
        c[..6].copy_from_slice(&config.mac);
        c[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
        Net {
            backend,
            config: c,
            features,
            counters: Arc::default(),
            worker: None,
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn name(&self) -> &'static str {
        "net"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let worker_err = |source| ActivateError::Worker {
            device: "net",
            source,
        };
        let mut rx = None;
        let mut tx = None;
        for q in ctx.queues {
            let io = QueueIo {
                index: q.index,
                queue: q.queue,
                notify: q.notify,
            };
            match q.index {
                RX => rx = Some(io),
                TX => tx = Some(io),
                _ => {}
            }
        }
        let missing = |index| ActivateError::MissingQueue {
            device: "net",
            index,
        };
        let rx = rx.ok_or(missing(RX))?;
        let tx = tx.ok_or(missing(TX))?;
        let offload = tun_offload_flags(ctx.acked_features);
        self.backend.set_offload(offload).map_err(|e| {
            worker_err(std::io::Error::new(
                e.kind(),
                format!("TUNSETOFFLOAD {offload:#x}: {e}"),
            ))
        })?;
        let file = self.backend.file().try_clone().map_err(worker_err)?;
        let fds = [
            (rx.notify.as_raw_fd(), TOKEN_RX),
            (tx.notify.as_raw_fd(), TOKEN_TX),
            (file.as_raw_fd(), TOKEN_TAP),
        ];
        let handler = NetHandler {
            mem: ctx.mem,
            irq: ctx.interrupt,
            rx,
            tx,
            tap: file,
            frame: vec![0; MAX_FRAME],
            frame_len: None,
            tx_buf: vec![0; MAX_FRAME],
            tap_watched: true,
            mergeable: ctx.acked_features & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
            parts: Vec::new(),
            segs: Vec::new(),
            counters: self.counters.clone(),
        };
        self.worker = Some(
            Worker::spawn_gated("virtio-net".into(), &fds, handler, ctx.gate.clone())
                .map_err(worker_err)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("rx_frames", get(&c.rx_frames)),
            ("rx_bytes", get(&c.rx_bytes)),
            ("rx_dropped", get(&c.rx_dropped)),
            ("tx_frames", get(&c.tx_frames)),
            ("tx_bytes", get(&c.tx_bytes)),
            ("tx_dropped", get(&c.tx_dropped)),
        ]
    }
}

struct NetHandler {
    mem: GuestMemory,
    irq: Arc<VirtioInterrupt>,
    rx: QueueIo,
    tx: QueueIo,
    tap: std::fs::File,
    /// One frame read from the TAP (with its vnet header) waiting for a receive buffer.
    frame: Vec<u8>,
    frame_len: Option<usize>,
    tx_buf: Vec<u8>,
    tap_watched: bool,
    /// VIRTIO_NET_F_MRG_RXBUF negotiated: a frame may span several receive chains.
    mergeable: bool,
    /// Scratch for mergeable receive: the chains gathered for one frame and their buffers.
    parts: Vec<RxPart>,
    segs: Vec<(u64, u32)>,
    counters: Arc<NetCounters>,
}

/// One receive chain gathered for a frame: its head and its buffers in `segs[start..end]`
/// (`end == start` for a chain that is unusable and will be returned empty).
#[derive(Clone, Copy, Debug)]
struct RxPart {
    head: u16,
    start: usize,
    end: usize,
}

/// Reads one frame (with its vnet header) from the backend into `frame` unless one is already
/// waiting. Returns whether a frame is ready; sets `failed` on EOF or a hard error.
fn fetch_frame(
    tap: &mut std::fs::File,
    frame: &mut [u8],
    frame_len: &mut Option<usize>,
    counters: &NetCounters,
    failed: &mut bool,
) -> bool {
    if frame_len.is_some() {
        return true;
    }
    loop {
        match tap.read(frame) {
            Ok(n) if n >= VNET_HDR_LEN => {
                *frame_len = Some(n);
                return true;
            }
            Ok(0) => {
                crate::guest_warn!("virtio-net: backend closed, receive paused");
                *failed = true;
                return false;
            }
            Ok(_) => {
                counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(e) => {
                crate::guest_warn!("virtio-net: TAP read failed, receive paused: {e}");
                *failed = true;
                return false;
            }
        }
    }
}

impl NetCounters {
    fn count_rx(&self, frame_len: usize) {
        self.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.rx_bytes
            .fetch_add((frame_len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
    }
}

/// Copies `frame` into the chain's device-writable buffers. Returns the bytes written, or
/// `None` when the chain cannot hold the frame.
fn write_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    frame: &[u8],
) -> Option<u32> {
    let mut done = 0usize;
    for desc in chain {
        if done == frame.len() {
            break;
        }
        if !desc.is_write_only() {
            return None;
        }
        let n = (desc.len() as usize).min(frame.len() - done);
        mem.write_slice(&frame[done..done + n], desc.addr()).ok()?;
        done += n;
    }
    (done == frame.len()).then_some(done as u32)
}

/// Gathers a transmit chain's device-readable buffers into `buf`. Returns the frame length,
/// or why the chain is dropped.
fn read_frame(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
    buf: &mut [u8],
) -> Result<usize, &'static str> {
    let mut len = 0usize;
    for desc in chain {
        if desc.is_write_only() {
            return Err("device-writable buffer in a transmit chain");
        }
        let n = desc.len() as usize;
        if n > buf.len() - len {
            return Err("frame larger than 64 KiB");
        }
        mem.read_slice(&mut buf[len..len + n], desc.addr())
            .map_err(|_| "buffer outside guest memory")?;
        len += n;
    }
    if len < VNET_HDR_LEN {
        return Err("frame shorter than the virtio-net header");
    }
    Ok(len)
}

impl NetHandler {
    fn process_rx(&mut self, ctl: &WorkerCtl<'_>) -> WorkerAction {
        // Set when the backend reports EOF or a hard error (e.g. the TAP interface was
        // deleted): it would stay readable-with-error forever, so stop polling it until the
        // guest kicks rx again.
        let mut tap_failed = false;
        let result = if self.mergeable {
            self.rx_mergeable(&mut tap_failed)
        } else {
            self.rx_single(&mut tap_failed)
        };
        let action = ring_result("virtio-net rx", result, &self.irq);
        // A frame still waiting means the guest has no receive buffers: stop polling the TAP
        // until it posts some (its rx notify), so the loop does not spin.
        let want_tap = self.frame_len.is_none() && !tap_failed;
        if want_tap != self.tap_watched {
            ctl.set_interest(self.tap.as_raw_fd(), TOKEN_TAP, want_tap);
            self.tap_watched = want_tap;
        }
        action
    }

    /// Receive without mergeable buffers: each frame fills exactly one chain.
    fn rx_single(&mut self, tap_failed: &mut bool) -> Result<(), RingError> {
        let NetHandler {
            mem,
            irq,
            rx,
            tap,
            frame,
            frame_len,
            counters,
            ..
        } = self;
        if !fetch_frame(tap, frame, frame_len, counters, tap_failed) {
            return Ok(());
        }
        rx.drain(mem, irq, |chain| {
            if !fetch_frame(tap, frame, frame_len, counters, tap_failed) {
                return ChainOutcome::Retry;
            }
            let n = frame_len.take().expect("frame fetched");
            frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            match write_frame(mem, chain, &frame[..n]) {
                Some(len) => {
                    counters.count_rx(n);
                    ChainOutcome::Used(len)
                }
                None => {
                    counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                    crate::guest_warn!(
                        "virtio-net: receive buffer too small or invalid for a {n}-byte frame; \
                         frame dropped"
                    );
                    ChainOutcome::Used(0)
                }
            }
        })
    }

    /// Receive with mergeable buffers: a frame is spread over as many chains as it needs,
    /// `num_buffers` in its header says how many, and their used entries are contiguous.
    /// Chains are only consumed once enough of them are available for the whole frame.
    fn rx_mergeable(&mut self, tap_failed: &mut bool) -> Result<(), RingError> {
        let NetHandler {
            mem,
            irq,
            rx,
            tap,
            frame,
            frame_len,
            parts,
            segs,
            counters,
            ..
        } = self;
        let mem: &GuestMemory = mem;
        let index = rx.index;
        let err = |source| RingError { index, source };
        let size = rx.queue.size();
        let mut popped = 0usize;
        let mut used_any = false;
        rx.queue.disable_notification(mem).map_err(err)?;
        'frames: while fetch_frame(tap, frame, frame_len, counters, tap_failed) {
            if popped >= usize::from(size) {
                // Bounded work per wake-up; come back through our own eventfd.
                let _ = rx.notify.write(1);
                break;
            }
            let n = frame_len.expect("frame fetched");
            parts.clear();
            segs.clear();
            let mut capacity = 0usize;
            while capacity < n {
                let avail = rx.queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
                let pending = avail.0.wrapping_sub(rx.queue.next_avail());
                if pending > size {
                    return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
                }
                if pending == 0 {
                    if rx.queue.enable_notification(mem).map_err(err)? {
                        continue;
                    }
                    // Not enough buffers for this frame: give the chains back and wait for
                    // the guest's next rx kick, keeping the frame — unless a whole ring of
                    // buffers cannot hold it, then it can never be delivered: drop it.
                    for _ in 0..parts.len() {
                        rx.queue.go_to_previous_position();
                    }
                    if parts.len() >= usize::from(size) {
                        counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
                        crate::guest_warn!(
                            "virtio-net: a full ring of receive buffers cannot hold a \
                             {n}-byte frame; frame dropped"
                        );
                        *frame_len = None;
                        continue 'frames;
                    }
                    break 'frames;
                }
                let chain = rx
                    .queue
                    .iter(mem)
                    .map_err(err)?
                    .next()
                    .ok_or(err(virtio_queue::Error::InvalidAvailRingIndex))?;
                popped += 1;
                let head = chain.head_index();
                let start = segs.len();
                let mut ok = head < size;
                for d in chain {
                    if !d.is_write_only() || !mem.check_range(d.addr(), d.len() as usize) {
                        ok = false;
                        break;
                    }
                    segs.push((d.addr().0, d.len()));
                }
                let chain_cap: usize = segs[start..].iter().map(|s| s.1 as usize).sum();
                if !ok || chain_cap == 0 {
                    segs.truncate(start);
                    crate::guest_warn!(
                        "virtio-net: receive chain {head} is unusable (device-readable, outside \
                         guest memory or empty); returned empty"
                    );
                } else {
                    capacity += chain_cap;
                }
                parts.push(RxPart {
                    head,
                    start,
                    end: segs.len(),
                });
            }
            // Unusable chains go back first (empty), then the frame's chains, contiguously.
            let good = parts.iter().filter(|p| p.end > p.start).count();
            frame[10..12].copy_from_slice(&(good as u16).to_le_bytes());
            for p in parts.iter().filter(|p| p.end == p.start && p.head < size) {
                rx.queue.add_used(mem, p.head, 0).map_err(err)?;
            }
            let mut off = 0usize;
            for p in parts.iter().filter(|p| p.end > p.start) {
                let first = off;
                for &(addr, len) in &segs[p.start..p.end] {
                    let k = (len as usize).min(n - off);
                    if k == 0 {
                        break;
                    }
                    // The range was checked when the chain was gathered.
                    let _ = mem.write_slice(&frame[off..off + k], GuestAddress(addr));
                    off += k;
                }
                rx.queue
                    .add_used(mem, p.head, (off - first) as u32)
                    .map_err(err)?;
            }
            used_any = true;
            counters.count_rx(n);
            *frame_len = None;
        }
        rx.flush(mem, irq, used_any)
    }

    fn process_tx(&mut self) -> WorkerAction {
        let NetHandler {
            mem,
            irq,
            tx,
            tap,
            tx_buf,
            counters,
            ..
        } = self;
        let result = tx.drain(mem, irq, |chain| {
            match read_frame(mem, chain, tx_buf) {
                Ok(len) => match tap.write(&tx_buf[..len]) {
                    Ok(_) => {
                        counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                        counters
                            .tx_bytes
                            .fetch_add((len - VNET_HDR_LEN) as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                        crate::guest_warn!("virtio-net: TAP write failed, frame dropped: {e}");
                    }
                },
                Err(why) => {
                    counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
                    crate::guest_warn!("virtio-net: transmit chain dropped: {why}");
                }
            }
            ChainOutcome::Used(0)
        });
        ring_result("virtio-net tx", result, irq)
    }
}

impl WorkerHandler for NetHandler {
    fn broken(&mut self) {
        self.irq.set_needs_reset();
    }

    fn handle_event(&mut self, token: u64, ctl: &WorkerCtl<'_>) -> WorkerAction {
        match token {
            TOKEN_RX => {
                let _ = self.rx.notify.read();
                self.process_rx(ctl)
            }
            TOKEN_TX => {
                let _ = self.tx.notify.read();
                self.process_tx()
            }
            TOKEN_TAP => self.process_rx(ctl),
            _ => WorkerAction::Continue,
        }
    }
}

#[cfg(test)]
mod tests;
