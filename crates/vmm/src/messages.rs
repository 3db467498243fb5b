//! Typed messages to the VMM thread, the one owner of the VM's devices and vCPUs.
//!
//! The control socket, the vCPU threads, the platform devices, the signal thread and the
//! console all talk to the VMM thread by sending a [`VmmMessage`] through a [`Mailbox`]; none of
//! them reaches into shared state or calls back into another module.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, Sender};

use rvirt_api::vmm::{ExitReason, Request, Response};

/// What the VMM thread is asked to do or told.
#[derive(Debug)]
pub enum VmmMessage {
    /// A control request; the answer goes back on `reply`.
    Request {
        request: Request,
        reply: Sender<Response>,
    },
    /// A control connection that wants [`rvirt_api::vmm::Event`]s from now on.
    Watch(UnixStream),
    /// Stop the VM for `reason` (the first one wins).
    Exit(ExitReason),
    /// The guest acknowledged a power-button press: it is shutting down.
    ShuttingDown,
    /// The driver of the virtio device in PCI slot `n` set DRIVER_OK: start its workers.
    Activate(u8),
    /// The guest ejected vCPU `n` (after an unplug request).
    VcpuEjected(u32),
    /// The guest ejected the device in PCI slot `n` (after an unplug request).
    SlotEjected(u8),
    /// The guest moved the balloon: guest memory is now this many bytes.
    BalloonChanged(u64),
}

/// The sending side, cheap to clone; sending to a VMM that is gone does nothing.
#[derive(Clone, Debug)]
pub struct Mailbox(Sender<VmmMessage>);

impl Mailbox {
    /// Sends `msg`; a stopped VMM thread drops it.
    pub fn send(&self, msg: VmmMessage) {
        let _ = self.0.send(msg);
    }

    /// Asks the VMM to stop.
    pub fn exit(&self, reason: ExitReason) {
        self.send(VmmMessage::Exit(reason));
    }

    /// Sends a request and waits for its answer; `None` when the VMM thread is gone.
    pub fn call(&self, request: Request) -> Option<Response> {
        let (tx, rx) = mpsc::channel();
        self.send(VmmMessage::Request { request, reply: tx });
        rx.recv().ok()
    }
}

/// A new mailbox and the VMM thread's receiving end.
pub fn mailbox() -> (Mailbox, Receiver<VmmMessage>) {
    let (tx, rx) = mpsc::channel();
    (Mailbox(tx), rx)
}
