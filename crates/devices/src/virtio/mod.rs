//! virtio 1.x over PCI: the modern transport, the device trait, worker threads and the
//! block, net, rng and balloon devices.
//!
//! Data flow: the guest writes a queue's notify register → KVM signals that queue's ioeventfd
//! (registered by the transport through [`crate::IoEventRegistry`]) → the device's worker
//! thread (epoll) pops descriptor chains with `virtio-queue`, does the I/O, fills the used ring
//! → the worker raises the queue's MSI-X vector (an irqfd) → the guest.

pub mod balloon;
pub mod block;
mod device;
pub mod net;
mod queue;
pub mod rng;
pub mod scsi;
mod transport;
mod worker;

#[cfg(test)]
mod hostile_tests;
#[cfg(test)]
mod testing;
#[cfg(test)]
mod tests;

pub use device::{
    ActivateContext, ActivateError, ActivatedQueue, VirtioDevice, VirtioInterrupt, ISR_CONFIG,
    ISR_QUEUE, VIRTIO_MSI_NO_VECTOR,
};
pub use transport::{
    ActivationHook, VirtioPciDevice, VirtioPciError, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET,
    ISR_CFG_OFFSET, MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER,
    VIRTIO_BAR_SIZE,
};
pub use worker::{PauseGate, Worker, WorkerAction, WorkerCtl, WorkerHandler};

/// Bit `n` of a feature word.
pub(crate) const fn bit(n: u32) -> u64 {
    1u64 << n
}
