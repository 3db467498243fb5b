//! What a virtio device implements, and the handles the transport gives it at activation.

use std::sync::atomic::{AtomicU16, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_NEEDS_RESET;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::pci::MsixState;
use crate::GuestMemory;

/// The MSI-X "no vector" value of the virtio PCI common configuration.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// ISR bit for a used-buffer notification.
pub const ISR_QUEUE: u8 = 1;
/// ISR bit for a configuration change.
pub const ISR_CONFIG: u8 = 2;

/// One queue handed to a device at activation.
#[derive(Debug)]
pub struct ActivatedQueue {
    /// The queue index in the device's numbering (0 = requestq for blk, 0/1 = rx/tx for net).
    pub index: usize,
    /// The ring, configured and ready.
    pub queue: Queue,
    /// Signalled when the guest notifies the queue (the ioeventfd, or written by the transport
    /// on an MMIO notify exit).
    pub notify: EventFd,
}

/// Everything a device needs to start its workers.
pub struct ActivateContext {
    /// Guest memory (a cheap clone).
    pub mem: GuestMemory,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// The queues the driver enabled, in index order.
    pub queues: Vec<ActivatedQueue>,
    /// How workers interrupt the guest.
    pub interrupt: Arc<VirtioInterrupt>,
    /// The VM's pause gate: start workers with `Worker::spawn_gated(.., gate.clone())`.
    pub gate: super::PauseGate,
}

/// A device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// A queue the device needs was not enabled by the driver.
    #[error("virtio {device}: queue {index} was not set up by the driver")]
    MissingQueue { device: &'static str, index: usize },
    /// The worker thread could not be created.
    #[error("virtio {device}: cannot start worker thread: {source}")]
    Worker {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Copies the device configuration bytes at `offset` into `data`; bytes past the end of
/// `config` (or an offset that does not fit a `usize`) read as 0, as
/// [`VirtioDevice::read_config`] promises.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| config.get(o.checked_add(i)?))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device behind a transport (object safe).
pub trait VirtioDevice: Send {
    /// The virtio device id (1 = net, 2 = block, 4 = entropy).
    fn device_type(&self) -> u32;
    /// A short name for logs ("block", "net", "rng").
    fn name(&self) -> &'static str;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Offered feature bits, VIRTIO_F_VERSION_1 included.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration (ignored by default: read-only config).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device's workers on the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the workers and returns the device to its initial state.
    fn reset(&mut self);
    /// Named counters for statistics (requests, bytes, errors, ...).
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// The interrupt side of the transport, shared with device workers.
///
/// Queue and config notifications go to the MSI-X vector the driver chose for them; masked
/// vectors end up in the PBA, and `VIRTIO_MSI_NO_VECTOR` sends nothing (only the ISR bit is
/// set, which a driver without MSI-X would poll).
pub struct VirtioInterrupt {
    msix: Arc<Mutex<MsixState>>,
    isr: AtomicU8,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
    status: AtomicU8,
    raised: AtomicU64,
}

impl std::fmt::Debug for VirtioInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioInterrupt")
            .field("isr", &self.isr)
            .field("status", &self.status)
            .finish()
    }
}

impl VirtioInterrupt {
    pub(crate) fn new(msix: Arc<Mutex<MsixState>>, num_queues: usize) -> Self {
        VirtioInterrupt {
            msix,
            isr: AtomicU8::new(0),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..num_queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            status: AtomicU8::new(0),
            raised: AtomicU64::new(0),
        }
    }

    fn raise(&self, vector: u16, isr: u8) {
        self.isr.fetch_or(isr, Ordering::AcqRel);
        if vector == VIRTIO_MSI_NO_VECTOR {
            return;
        }
        let mut msix = self.msix.lock().unwrap_or_else(|e| e.into_inner());
        msix.trigger(vector);
        self.raised.fetch_add(1, Ordering::Relaxed);
    }

    /// Tells the driver that queue `index` has new used buffers.
    pub fn signal_queue(&self, index: usize) {
        match self.queue_vectors.get(index) {
            Some(v) => self.raise(v.load(Ordering::Acquire), ISR_QUEUE),
            None => crate::guest_warn!("virtio: interrupt for unknown queue {index}"),
        }
    }

    /// Tells the driver that the device configuration changed.
    pub fn signal_config(&self) {
        self.raise(self.config_vector.load(Ordering::Acquire), ISR_CONFIG);
    }

    /// Marks the device as broken (ring corruption): sets DEVICE_NEEDS_RESET and raises a
    /// config interrupt, as the virtio spec asks; the driver then resets the device.
    pub fn set_needs_reset(&self) {
        let before = self
            .status
            .fetch_or(VIRTIO_CONFIG_S_NEEDS_RESET as u8, Ordering::AcqRel);
        if before & VIRTIO_CONFIG_S_NEEDS_RESET as u8 == 0 {
            self.signal_config();
        }
    }

    /// Number of interrupts sent to an MSI-X vector so far.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    pub(crate) fn status(&self) -> u8 {
        self.status.load(Ordering::Acquire)
    }

    pub(crate) fn set_status(&self, s: u8) {
        self.status.store(s, Ordering::Release);
    }

    /// Stores a driver-written status, keeping NEEDS_RESET if a worker set it meanwhile.
    pub(crate) fn set_driver_status(&self, s: u8) {
        let keep = VIRTIO_CONFIG_S_NEEDS_RESET as u8;
        let _ = self
            .status
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some(s | (old & keep))
            });
    }

    pub(crate) fn take_isr(&self) -> u8 {
        self.isr.swap(0, Ordering::AcqRel)
    }

    pub(crate) fn queue_vector(&self, index: usize) -> u16 {
        self.queue_vectors
            .get(index)
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_queue_vector(&self, index: usize, v: u16) {
        if let Some(slot) = self.queue_vectors.get(index) {
            slot.store(v, Ordering::Release);
        }
    }

    /// The GSI behind MSI-X vector `v`.
    pub fn msix_gsi(&self, v: u16) -> Option<u32> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner()).gsi(v)
    }

    pub(crate) fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    pub(crate) fn set_config_vector(&self, v: u16) {
        self.config_vector.store(v, Ordering::Release);
    }
}
