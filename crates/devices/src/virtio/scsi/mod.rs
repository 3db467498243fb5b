//! virtio-scsi (virtio id 8): a host adapter with one channel and up to 256 targets, each with
//! a single LUN 0 served by the SCSI engine ([`crate::scsi`]): disks and CD-ROM drives.
//!
//! Queues: 0 control (task management, asynchronous notification), 1 event, then
//! `num_queues` request queues. One worker thread serves the control and request queues.
//! Task management functions complete at once (commands never outlive their request); no
//! asynchronous notification events are supported. Neither HOTPLUG nor CHANGE is offered and
//! the event queue is never used: CD media changes reach the guest through the drive itself
//! (UNIT ATTENTION and polled GET EVENT STATUS NOTIFICATION, which Linux's sr polls).
//!
//! Offered features: EVENT_IDX and INDIRECT_DESC.

mod request;

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_SCSI;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_bindings::virtio_scsi::{VIRTIO_SCSI_CDB_DEFAULT_SIZE, VIRTIO_SCSI_SENSE_DEFAULT_SIZE};

use self::request::{Chain, Targets};
use super::queue::{ChainOutcome, QueueIo};
use super::worker::{ring_result, Worker, WorkerAction, WorkerCtl, WorkerHandler};
use super::{bit, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt};
use crate::scsi::{Locked, ScsiLun, MAX_TRANSFER_BLOCKS};
use crate::GuestMemory;
use rvirt_image::BlockDevice;

/// Entries of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most request queues offered.
pub const MAX_QUEUES: u16 = 16;
/// Size of struct virtio_scsi_config.
const CONFIG_SIZE: usize = 36;
/// Largest CDB and sense sizes a driver may configure (bounds the per-request buffers).
const MAX_CDB_SIZE: u32 = 256;
const MAX_SENSE_SIZE: u32 = 256;
const CONTROL_QUEUE: usize = 0;
const EVENT_QUEUE: usize = 1;

/// How the adapter is built.
#[derive(Debug, Default)]
pub struct ScsiConfig {
    /// Names the device in logs.
    pub id: String,
    /// (target id, LUN 0 of that target); target ids must be unique and at most 255.
    pub targets: Vec<(u16, ScsiLun)>,
    /// Request queues (0 is taken as 1; clamped to [`MAX_QUEUES`]).
    pub num_queues: u16,
}

/// A configuration the adapter cannot present.
#[derive(Debug, thiserror::Error)]
pub enum ScsiConfigError {
    #[error("virtio-scsi {id}: target {target} given twice")]
    DuplicateTarget { id: String, target: u16 },
    #[error("virtio-scsi {id}: target {target} is beyond 255")]
    TargetOutOfRange { id: String, target: u16 },
}

/// Changes the disc of a CD-ROM drive on a running device (e.g. `rvirt change-media`).
#[derive(Clone, Debug)]
pub struct CdromHandle(Arc<Mutex<ScsiLun>>);

impl CdromHandle {
    fn with<T>(&self, f: impl FnOnce(&mut crate::scsi::ScsiCdrom) -> T) -> T {
        let mut lun = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Handles are only made for CD-ROM LUNs.
        match lun.as_cdrom_mut() {
            Some(c) => f(c),
            None => unreachable!("CdromHandle over a disk"),
        }
    }

    /// Inserts (or replaces) the disc; refused while the guest locks the tray.
    pub fn insert(&self, media: Arc<dyn BlockDevice>) -> Result<(), Locked> {
        self.with(|c| c.insert(media))
    }

    /// Removes the disc; refused while the guest locks the tray unless `force`.
    pub fn eject(&self, force: bool) -> Result<(), Locked> {
        self.with(|c| c.eject(force))
    }

    /// Whether the guest locks the tray.
    pub fn is_locked(&self) -> bool {
        self.with(|c| c.is_locked())
    }

    /// Whether a disc is in.
    pub fn has_media(&self) -> bool {
        self.with(|c| c.has_media())
    }
}

#[derive(Debug, Default)]
struct ScsiCounters {
    commands: AtomicU64,
    check_conditions: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    overruns: AtomicU64,
    bad_target: AtomicU64,
    control_requests: AtomicU64,
    bad_chains: AtomicU64,
}

/// The virtio-scsi host adapter.
pub struct Scsi {
    id: String,
    targets: Targets,
    features: u64,
    config: [u8; CONFIG_SIZE],
    queue_sizes: Vec<u16>,
    counters: Arc<ScsiCounters>,
    worker: Option<Worker>,
}

impl std::fmt::Debug for Scsi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scsi")
            .field("id", &self.id)
            .field("targets", &self.targets.keys().collect::<Vec<_>>())
            .field("running", &self.worker.is_some())
            .finish()
    }
}

impl Scsi {
    /// An adapter with `config.targets`.
    pub fn new(config: ScsiConfig) -> Result<Self, ScsiConfigError> {
        let mut targets = BTreeMap::new();
        for (t, lun) in config.targets {
            let id = config.id.clone();
            let t8 =
                u8::try_from(t).map_err(|_| ScsiConfigError::TargetOutOfRange { id, target: t })?;
            if targets.insert(t8, Arc::new(Mutex::new(lun))).is_some() {
                return Err(ScsiConfigError::DuplicateTarget {
                    id: config.id,
                    target: t,
                });
            }
        }
        let n = config.num_queues.clamp(1, MAX_QUEUES);
        let max_target = targets.keys().next_back().copied().unwrap_or(0);
        let mut c = [0u8; CONFIG_SIZE];
        let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
        put(0, &u32::from(n).to_le_bytes()); // num_queues
        put(4, &u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        put(8, &MAX_TRANSFER_BLOCKS.to_le_bytes()); // max_sectors
        put(12, &128u32.to_le_bytes()); // cmd_per_lun
        put(16, &16u32.to_le_bytes()); // event_info_size
        put(20, &VIRTIO_SCSI_SENSE_DEFAULT_SIZE.to_le_bytes());
        put(24, &VIRTIO_SCSI_CDB_DEFAULT_SIZE.to_le_bytes());
        put(28, &0u16.to_le_bytes()); // max_channel
        put(30, &u16::from(max_target).to_le_bytes());
        put(32, &0u32.to_le_bytes()); // max_lun: LUN 0 only
        Ok(Scsi {
            id: config.id,
            targets: Arc::new(targets),
            features: bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_RING_F_INDIRECT_DESC),
            config: c,
            queue_sizes: vec![QUEUE_SIZE; 2 + usize::from(n)],
            counters: Arc::default(),
            worker: None,
        })
    }

    /// The media handle of the CD-ROM drive at `target` (None: no such target, or a disk).
    pub fn cdrom(&self, target: u16) -> Option<CdromHandle> {
        let lun = self.targets.get(&u8::try_from(target).ok()?)?;
        let is_cd = lun
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_cdrom_mut()
            .is_some();
        is_cd.then(|| CdromHandle(lun.clone()))
    }

    fn config_u32(&self, at: usize) -> u32 {
        u32::from_le_bytes([
            self.config[at],
            self.config[at + 1],
            self.config[at + 2],
            self.config[at + 3],
        ])
    }
}

impl VirtioDevice for Scsi {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_SCSI
    }

    fn name(&self) -> &'static str {
        "scsi"
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

    /// The driver may set sense_size (offset 20) and cdb_size (24); other fields are read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let (20 | 24) = offset else { return };
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let max = if offset == 20 {
            MAX_SENSE_SIZE
        } else {
            MAX_CDB_SIZE
        };
        let v = u32::from_le_bytes(raw).min(max);
        let at = offset as usize;
        self.config[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let mut queues = Vec::new();
        for q in ctx.queues {
            // The event queue is never used (no events are offered).
            if q.index != EVENT_QUEUE {
                queues.push(QueueIo {
                    index: q.index,
                    queue: q.queue,
                    notify: q.notify,
                });
            }
        }
        if !queues.iter().any(|q| q.index > EVENT_QUEUE) {
            return Err(ActivateError::MissingQueue {
                device: "scsi",
                index: 2,
            });
        }
        let fds: Vec<_> = queues
            .iter()
            .enumerate()
            .map(|(i, q)| (q.notify.as_raw_fd(), i as u64))
            .collect();
        let handler = ScsiHandler {
            mem: ctx.mem,
            irq: ctx.interrupt,
            queues,
            targets: self.targets.clone(),
            sizes: (self.config_u32(24) as usize, self.config_u32(20) as usize),
            counters: self.counters.clone(),
        };
        let worker = Worker::spawn_gated("virtio-scsi".into(), &fds, handler, ctx.gate).map_err(
            |source| ActivateError::Worker {
                device: "scsi",
                source,
            },
        )?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        // Joins the worker: every command it started has completed.
        self.worker = None;
        self.config[20..24].copy_from_slice(&VIRTIO_SCSI_SENSE_DEFAULT_SIZE.to_le_bytes());
        self.config[24..28].copy_from_slice(&VIRTIO_SCSI_CDB_DEFAULT_SIZE.to_le_bytes());
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        vec![
            ("commands", get(&c.commands)),
            ("check_conditions", get(&c.check_conditions)),
            ("bytes_in", get(&c.bytes_in)),
            ("bytes_out", get(&c.bytes_out)),
            ("overruns", get(&c.overruns)),
            ("bad_target", get(&c.bad_target)),
            ("control_requests", get(&c.control_requests)),
            ("bad_chains", get(&c.bad_chains)),
        ]
    }
}

struct ScsiHandler {
    mem: GuestMemory,
    irq: Arc<VirtioInterrupt>,
    /// Control and request queues; epoll tokens index this.
    queues: Vec<QueueIo>,
    targets: Targets,
    /// (cdb_size, sense_size) as the driver configured them before DRIVER_OK.
    sizes: (usize, usize),
    counters: Arc<ScsiCounters>,
}

impl ScsiCounters {
    fn record(&self, done: &request::CmdDone) {
        let add = |a: &AtomicU64, n| {
            a.fetch_add(n, Ordering::Relaxed);
        };
        add(&self.commands, 1);
        if done.bad_target {
            add(&self.bad_target, 1);
        }
        if let Some(r) = &done.result {
            add(&self.bytes_in, r.data_in);
            add(&self.bytes_out, r.data_out);
            if r.overrun {
                add(&self.overruns, 1);
            }
            if r.status.sense().is_some() {
                add(&self.check_conditions, 1);
            }
        }
    }
}

impl WorkerHandler for ScsiHandler {
    fn broken(&mut self) {
        self.irq.set_needs_reset();
    }

    fn handle_event(&mut self, token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
        let ScsiHandler {
            mem,
            irq,
            queues,
            targets,
            sizes,
            counters,
        } = self;
        let Some(queue) = usize::try_from(token).ok().and_then(|t| queues.get_mut(t)) else {
            return WorkerAction::Continue;
        };
        let _ = queue.notify.read();
        let control = queue.index == CONTROL_QUEUE;
        let result = queue.drain(mem, irq, |chain| match Chain::parse(mem, chain) {
            Ok(chain) if control => {
                counters.control_requests.fetch_add(1, Ordering::Relaxed);
                ChainOutcome::Used(request::control(chain, targets))
            }
            Ok(chain) => {
                let done = request::command(chain, targets, *sizes);
                counters.record(&done);
                ChainOutcome::Used(done.used_len)
            }
            Err(e) => {
                counters.bad_chains.fetch_add(1, Ordering::Relaxed);
                crate::guest_warn!("virtio-scsi: chain returned unanswered: {e}");
                ChainOutcome::Used(0)
            }
        });
        ring_result("virtio-scsi", result, irq)
    }
}

#[cfg(test)]
mod tests;
