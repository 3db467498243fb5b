//! virtio-rng (entropy device, virtio id 4): one request queue whose device-writable buffers
//! are filled from the host's `/dev/urandom`.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use log::warn;
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use super::queue::{ChainOutcome, QueueIo};
use super::worker::{Worker, WorkerAction, WorkerCtl, WorkerHandler};
use super::{bit, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::GuestMemory;

const QUEUE_SIZE: u16 = 256;
/// At most this many bytes per request, so one request cannot keep the worker busy for long.
const MAX_REQUEST: usize = 1 << 20;

/// Opening the entropy source failed.
#[derive(Debug, thiserror::Error)]
#[error("virtio-rng: cannot open entropy source {path}: {source}")]
pub struct RngError {
    path: String,
    #[source]
    source: std::io::Error,
}

#[derive(Debug, Default)]
struct RngCounters {
    requests: AtomicU64,
    bytes: AtomicU64,
    bad_descriptors: AtomicU64,
}

/// The virtio entropy device.
pub struct Rng {
    source: File,
    counters: Arc<RngCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("running", &self.worker.is_some())
            .finish()
    }
}

impl Rng {
    /// An entropy device reading `/dev/urandom`.
    pub fn new() -> Result<Self, RngError> {
        Self::with_source(Path::new("/dev/urandom"))
    }

    /// An entropy device reading `path` (any readable file or character device).
    pub fn with_source(path: &Path) -> Result<Self, RngError> {
        let source = File::open(path).map_err(|source| RngError {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Rng {
            source,
            counters: Arc::default(),
            worker: None,
        })
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn name(&self) -> &'static str {
        "rng"
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC)
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let worker_err = |source| ActivateError::Worker {
            device: "rng",
            source,
        };
        let mut queues = ctx.queues.into_iter();
        let q = queues.next().ok_or(ActivateError::MissingQueue {
            device: "rng",
            index: 0,
        })?;
        let fds = [(q.notify.as_raw_fd(), 0)];
        let handler = RngHandler {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queue: QueueIo {
                index: q.index,
                queue: q.queue,
                notify: q.notify,
            },
            source: self.source.try_clone().map_err(worker_err)?,
            buf: vec![0; 4096],
            counters: self.counters.clone(),
        };
        self.worker = Some(
            Worker::spawn_gated("virtio-rng".into(), &fds, handler, ctx.gate.clone())
                .map_err(worker_err)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.worker = None;
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        vec![
            ("requests", c.requests.load(Ordering::Relaxed)),
            ("bytes", c.bytes.load(Ordering::Relaxed)),
            ("bad_descriptors", c.bad_descriptors.load(Ordering::Relaxed)),
        ]
    }
}

struct RngHandler {
    mem: GuestMemory,
    irq: Arc<VirtioInterrupt>,
    queue: QueueIo,
    source: File,
    buf: Vec<u8>,
    counters: Arc<RngCounters>,
}

impl RngHandler {
    /// Fills the chain's writable buffers; returns the number of bytes written.
    fn serve(
        mem: &GuestMemory,
        source: &mut File,
        buf: &mut [u8],
        counters: &RngCounters,
        chain: DescriptorChain<&GuestMemory>,
    ) -> u32 {
        let mut written = 0usize;
        for desc in chain {
            if !desc.is_write_only() {
                counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!("virtio-rng: read-only descriptor in a request; skipped");
                continue;
            }
            let mut left = (desc.len() as usize).min(MAX_REQUEST - written);
            let mut addr = desc.addr();
            while left > 0 {
                let n = left.min(buf.len());
                if let Err(e) = source.read_exact(&mut buf[..n]) {
                    warn!("virtio-rng: entropy source read failed: {e}");
                    return written as u32;
                }
                if mem.write_slice(&buf[..n], addr).is_err() {
                    counters.bad_descriptors.fetch_add(1, Ordering::Relaxed);
                    crate::guest_warn!(
                        "virtio-rng: buffer {:#x}+{n:#x} is outside guest memory; request cut",
                        addr.0
                    );
                    return written as u32;
                }
                written += n;
                left -= n;
                addr = GuestAddress(addr.0.wrapping_add(n as u64));
            }
            if written >= MAX_REQUEST {
                break;
            }
        }
        counters.bytes.fetch_add(written as u64, Ordering::Relaxed);
        written as u32
    }
}

impl WorkerHandler for RngHandler {
    fn broken(&mut self) {
        self.irq.set_needs_reset();
    }

    fn handle_event(&mut self, _token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
        let _ = self.queue.notify.read();
        let RngHandler {
            mem,
            irq,
            queue,
            source,
            buf,
            counters,
        } = self;
        let result = queue.drain(mem, irq, |chain| {
            counters.requests.fetch_add(1, Ordering::Relaxed);
            ChainOutcome::Used(Self::serve(mem, source, buf, counters, chain))
        });
        super::worker::ring_result("virtio-rng", result, irq)
    }
}
