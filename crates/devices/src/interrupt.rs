//! What the VMM provides to devices: MSI routing (irqfd + GSI) and ioeventfd registration.
//!
//! Both traits are implemented by `rvirt-vmm` on top of KVM; unit tests implement them with
//! stubs that record calls and count eventfd writes, so no device code needs `/dev/kvm`.

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programmed it into an MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low and high dword combined).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// One MSI-X vector's interrupt line: a GSI routed to an MSI message, raised by writing `eventfd`
/// (registered by the VMM as a KVM irqfd).
#[derive(Debug)]
pub struct MsiVector {
    /// The global system interrupt number the VMM routes.
    pub gsi: u32,
    /// Writing 1 to it raises the interrupt (irqfd).
    pub eventfd: EventFd,
}

/// A routing or registration request the VMM could not carry out.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// No GSI is left for a new vector.
    #[error("no free GSI left for an MSI-X vector: reduce the number of devices or queues")]
    NoFreeGsi,
    /// The hypervisor refused a request.
    #[error("{op} failed: {source}")]
    Hypervisor {
        /// What was attempted, e.g. "KVM_IRQFD on GSI 24".
        op: String,
        #[source]
        source: std::io::Error,
    },
}

/// MSI routing, implemented by the VMM (KVM GSI routing + irqfd).
pub trait MsiRouting: Send + Sync {
    /// Allocates a GSI + irqfd for one MSI-X vector; the returned EventFd raises it.
    fn alloc_vector(&self) -> Result<MsiVector, InterruptError>;
    /// Points the GSI at an MSI message, or masks it.
    fn update_route(&self, gsi: u32, msg: MsiMessage, masked: bool) -> Result<(), InterruptError>;
    /// Releases a vector allocated with [`MsiRouting::alloc_vector`].
    fn free_vector(&self, v: MsiVector);
}

/// ioeventfd registration, implemented by the VMM (KVM_IOEVENTFD, MMIO, any length, no
/// datamatch).
pub trait IoEventRegistry: Send + Sync {
    /// Makes guest writes to the guest-physical MMIO address `addr` signal `fd`.
    fn register(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError>;
    /// Undoes [`IoEventRegistry::register`].
    fn unregister(&self, addr: u64, fd: &EventFd) -> Result<(), InterruptError>;
}
