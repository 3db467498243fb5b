//! virtio-blk (virtio id 2) over an [`rvirt_image::BlockDevice`]: one request queue served by
//! one worker thread doing positioned I/O on the image.
//!
//! Offered features: FLUSH, SEG_MAX, BLK_SIZE, RO for read-only disks, DISCARD only when the
//! backend can release space, WRITE_ZEROES on writable disks, EVENT_IDX and INDIRECT_DESC.

mod request;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rvirt_image::BlockDevice;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use self::request::{DiskProps, Request};
pub use self::request::{ID_BYTES, MAX_RANGES, MAX_RANGE_SECTORS, SECTOR_SIZE};
use super::queue::{ChainOutcome, QueueIo};
use super::worker::{ring_result, Worker, WorkerAction, WorkerCtl, WorkerHandler};
use super::{bit, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the device configuration (struct virtio_blk_config up to write_zeroes_may_unmap).
const CONFIG_SIZE: usize = 60;

/// How a disk is presented to the guest.
#[derive(Clone, Debug, Default)]
pub struct BlockConfig {
    /// Serial number returned by GET_ID (`/sys/block/vdX/serial`); at most 20 bytes are used.
    pub id: String,
    /// Present the disk read-only even if the backend is writable.
    pub read_only: bool,
}

#[derive(Debug, Default)]
struct BlockCounters {
    read_requests: AtomicU64,
    write_requests: AtomicU64,
    flush_requests: AtomicU64,
    discard_requests: AtomicU64,
    write_zeroes_requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    bad_chains: AtomicU64,
}

/// The virtio block device.
pub struct Block {
    disk: Arc<dyn BlockDevice>,
    props: DiskProps,
    features: u64,
    config: [u8; CONFIG_SIZE],
    queue_sizes: Vec<u16>,
    counters: Arc<BlockCounters>,
    /// One worker per enabled request queue.
    workers: Vec<Worker>,
}

/// The most request queues a disk offers.
pub const MAX_QUEUES: u16 = 16;

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("props", &self.props)
            .field("queues", &self.queue_sizes.len())
            .field("running", &!self.workers.is_empty())
            .finish()
    }
}

impl Block {
    /// A virtio-blk device over `disk`. Its capacity is the disk size in 512-byte sectors
    /// (a partial last sector is not visible to the guest).
    pub fn new(disk: Arc<dyn BlockDevice>, config: &BlockConfig) -> Self {
        let read_only = config.read_only || disk.read_only();
        let mut id = [0u8; ID_BYTES];
        let n = config.id.len().min(ID_BYTES);
        id[..n].copy_from_slice(&config.id.as_bytes()[..n]);
        let props = DiskProps {
            capacity_sectors: disk.size() / SECTOR_SIZE,
            read_only,
            discard: !read_only && disk.supports_discard(),
            write_zeroes: !read_only,
            id,
        };
        let mut features = bit(VIRTIO_BLK_F_FLUSH)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_RING_F_EVENT_IDX)
            | bit(VIRTIO_RING_F_INDIRECT_DESC);
        if read_only {
            features |= bit(VIRTIO_BLK_F_RO);
        }
        if props.discard {
            features |= bit(VIRTIO_BLK_F_DISCARD);
        }
        if props.write_zeroes {
            features |= bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &props.capacity_sectors.to_le_bytes());
        put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(20, &(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        put(34, &1u16.to_le_bytes()); // num_queues
        if props.discard {
            put(36, &MAX_RANGE_SECTORS.to_le_bytes());
            put(40, &MAX_RANGES.to_le_bytes());
            put(44, &1u32.to_le_bytes()); // discard_sector_alignment
        }
        if props.write_zeroes {
            put(48, &MAX_RANGE_SECTORS.to_le_bytes());
            put(52, &MAX_RANGES.to_le_bytes());
            put(56, &[u8::from(props.discard)]); // write_zeroes_may_unmap
        }
        Block {
            disk,
            props,
            features,
            config: c,
            queue_sizes: vec![QUEUE_SIZE],
            counters: Arc::default(),
            workers: Vec::new(),
        }
    }

    /// Offers `n` request queues (`VIRTIO_BLK_F_MQ`, clamped to 1..=[`MAX_QUEUES`]), each
    /// served by its own worker thread so requests from different vCPUs run in parallel.
    /// QEMU's default is one queue per vCPU.
    pub fn with_num_queues(mut self, n: u16) -> Self {
        let n = n.clamp(1, MAX_QUEUES);
        self.queue_sizes = vec![QUEUE_SIZE; usize::from(n)];
        self.config[34..36].copy_from_slice(&n.to_le_bytes());
        if n > 1 {
            self.features |= bit(VIRTIO_BLK_F_MQ);
        } else {
            self.features &= !bit(VIRTIO_BLK_F_MQ);
        }
        self
    }

    /// The capacity the guest sees, in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.props.capacity_sectors
    }

    /// Whether the guest sees the disk read-only.
    pub fn read_only(&self) -> bool {
        self.props.read_only
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn name(&self) -> &'static str {
        "block"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::device::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        // Drivers may use fewer queues than offered (Linux: at most one per CPU); serve the
        // ones they enabled.
        if ctx.queues.is_empty() {
            return Err(ActivateError::MissingQueue {
                device: "block",
                index: 0,
            });
        }
        let mut workers = Vec::with_capacity(ctx.queues.len());
        for q in ctx.queues {
            let fds = [(q.notify.as_raw_fd(), 0)];
            let handler = BlockHandler {
                mem: ctx.mem.clone(),
                irq: ctx.interrupt.clone(),
                queue: QueueIo {
                    index: q.index,
                    queue: q.queue,
                    notify: q.notify,
                },
                disk: self.disk.clone(),
                props: self.props.clone(),
                buf: Vec::new(),
                counters: self.counters.clone(),
            };
            let worker = Worker::spawn_gated("virtio-blk".into(), &fds, handler, ctx.gate.clone())
                .map_err(|source| ActivateError::Worker {
                    device: "block",
                    source,
                })?;
            workers.push(worker);
        }
        self.workers = workers;
        Ok(())
    }

    fn reset(&mut self) {
        // Joins the workers: every request they started has completed.
        self.workers.clear();
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("read_requests", get(&c.read_requests)),
            ("write_requests", get(&c.write_requests)),
            ("flush_requests", get(&c.flush_requests)),
            ("discard_requests", get(&c.discard_requests)),
            ("write_zeroes_requests", get(&c.write_zeroes_requests)),
            ("bytes_read", get(&c.bytes_read)),
            ("bytes_written", get(&c.bytes_written)),
            ("errors", get(&c.errors)),
            ("bad_chains", get(&c.bad_chains)),
        ]
    }
}

struct BlockHandler {
    mem: GuestMemory,
    irq: Arc<VirtioInterrupt>,
    queue: QueueIo,
    disk: Arc<dyn BlockDevice>,
    props: DiskProps,
    buf: Vec<u8>,
    counters: Arc<BlockCounters>,
}

impl BlockCounters {
    fn record(&self, done: &request::Done) {
        let add = |a: &AtomicU64, n| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        if !done.ok {
            add(&self.errors, 1);
            return;
        }
        match done.kind {
            VIRTIO_BLK_T_IN => {
                add(&self.read_requests, 1);
                add(&self.bytes_read, done.bytes);
            }
            VIRTIO_BLK_T_OUT => {
                add(&self.write_requests, 1);
                add(&self.bytes_written, done.bytes);
            }
            VIRTIO_BLK_T_FLUSH => add(&self.flush_requests, 1),
            VIRTIO_BLK_T_DISCARD => add(&self.discard_requests, 1),
            VIRTIO_BLK_T_WRITE_ZEROES => add(&self.write_zeroes_requests, 1),
            _ => {}
        }
    }
}

impl WorkerHandler for BlockHandler {
    fn broken(&mut self) {
        self.irq.set_needs_reset();
    }

    fn handle_event(&mut self, _token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
        let _ = self.queue.notify.read();
        let BlockHandler {
            mem,
            irq,
            queue,
            disk,
            props,
            buf,
            counters,
        } = self;
        let result = queue.drain(mem, irq, |chain| match Request::parse(mem, chain) {
            Ok(req) => {
                let (done, err) = req.execute(mem, disk, props, buf);
                counters.record(&done);
                if let Some(e) = err {
                    crate::guest_warn!("virtio-blk: request failed: {e}");
                }
                ChainOutcome::Used(done.used_len)
            }
            Err(e) => {
                counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!("virtio-blk: chain returned unanswered: {e}");
                ChainOutcome::Used(0)
            }
        });
        ring_result("virtio-blk", result, irq)
    }
}

#[cfg(test)]
mod tests;
