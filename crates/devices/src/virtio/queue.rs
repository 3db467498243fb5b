//! The queue-serving loop shared by every device, after virtio-queue's canonical pattern:
//! disable notifications → pop chains → add used → notify if needed → re-enable and re-check.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::VirtioInterrupt;
use crate::GuestMemory;

/// What a chain handler did with a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChainOutcome {
    /// The chain is done; `len` bytes were written into its device-writable buffers.
    Used(u32),
    /// The chain cannot be served now (e.g. no frame to receive): put it back and stop.
    Retry,
}

/// The ring itself is corrupt (avail index beyond the queue size, ring outside guest memory):
/// the device must be marked NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
#[error("virtio queue {index}: ring is corrupt: {source}")]
pub(crate) struct RingError {
    pub index: usize,
    #[source]
    pub source: virtio_queue::Error,
}

/// One queue as a worker owns it.
#[derive(Debug)]
pub(crate) struct QueueIo {
    pub index: usize,
    pub queue: Queue,
    pub notify: EventFd,
}

impl QueueIo {
    /// Serves available chains with `handle`, at most one queue size per call so one busy queue
    /// cannot starve the others or the stop request; when the cap is hit the queue's own
    /// eventfd is signalled so the worker comes back to it.
    pub fn drain<F>(
        &mut self,
        mem: &GuestMemory,
        irq: &VirtioInterrupt,
        mut handle: F,
    ) -> Result<(), RingError>
    where
        F: FnMut(DescriptorChain<&GuestMemory>) -> ChainOutcome,
    {
        let index = self.index;
        let err = |source| RingError { index, source };
        let size = self.queue.size();
        let mut served = 0u16;
        let mut used_any = false;
        loop {
            self.queue.disable_notification(mem).map_err(err)?;
            loop {
                if served >= size {
                    self.flush(mem, irq, used_any)?;
                    // Come back later; the kick costs nothing if the worker is idle.
                    let _ = self.notify.write(1);
                    return Ok(());
                }
                let avail = self.queue.avail_idx(mem, Ordering::Acquire).map_err(err)?;
                let pending = avail.0.wrapping_sub(self.queue.next_avail());
                if pending == 0 {
                    break;
                }
                if pending > size {
                    return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
                }
                let Some(chain) = self.queue.iter(mem).map_err(err)?.next() else {
                    return Err(err(virtio_queue::Error::InvalidAvailRingIndex));
                };
                let head = chain.head_index();
                served += 1;
                match handle(chain) {
                    ChainOutcome::Used(len) => {
                        if head >= size {
                            crate::guest_warn!(
                                "virtio queue {index}: avail ring names descriptor {head} \
                                 beyond queue size {size}; entry dropped"
                            );
                            continue;
                        }
                        self.queue.add_used(mem, head, len).map_err(err)?;
                        used_any = true;
                    }
                    ChainOutcome::Retry => {
                        self.queue.go_to_previous_position();
                        self.flush(mem, irq, used_any)?;
                        return Ok(());
                    }
                }
            }
            if !self.queue.enable_notification(mem).map_err(err)? {
                break;
            }
        }
        self.flush(mem, irq, used_any)
    }

    /// Interrupts the driver if buffers were used and it wants to hear about them.
    pub fn flush(
        &mut self,
        mem: &GuestMemory,
        irq: &VirtioInterrupt,
        used: bool,
    ) -> Result<(), RingError> {
        let index = self.index;
        if used
            && self
                .queue
                .needs_notification(mem)
                .map_err(|source| RingError { index, source })?
        {
            irq.signal_queue(index);
        }
        Ok(())
    }
}
