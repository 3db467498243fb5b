//! The virtio 1.x modern PCI transport (virtio spec 1.2, section 4.1).
//!
//! One 64-bit memory BAR (BAR 0, [`VIRTIO_BAR_SIZE`] bytes) holds every region, each announced
//! by a vendor-specific capability:
//!
//! | offset                 | region                                           |
//! |------------------------|--------------------------------------------------|
//! | [`COMMON_CFG_OFFSET`]  | common configuration (features, status, queues)  |
//! | [`ISR_CFG_OFFSET`]     | ISR status (read clears)                         |
//! | [`DEVICE_CFG_OFFSET`]  | device-specific configuration                    |
//! | [`NOTIFY_CFG_OFFSET`]  | queue notify, queue `q` at `q * NOTIFY_OFF_MULTIPLIER` |
//! | [`MSIX_TABLE_OFFSET`]  | MSI-X table                                      |
//! | [`MSIX_PBA_OFFSET`]    | MSI-X pending bits                               |
//!
//! Queue notifications normally never reach this code: the transport registers each queue's
//! notify address with the VMM's [`IoEventRegistry`] (again whenever the guest moves the BAR),
//! so KVM signals the queue's eventfd directly and the device worker wakes up. A notify write
//! that does arrive here (no ioeventfd) signals the same eventfd.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, error, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::device::{ActivateContext, ActivatedQueue, VirtioDevice, VirtioInterrupt};
use super::{bit, VIRTIO_MSI_NO_VECTOR};
use crate::interrupt::{IoEventRegistry, MsiRouting};
use crate::pci::{
    BarKind, BarSpec, ConfigWriteEffect, MsixState, PciConfigSpace, PciDevice, PciError, PciIds,
};
use crate::GuestMemory;

/// Size of BAR 0.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
/// Offset of the common configuration in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
const COMMON_CFG_LEN: u64 = 0x38;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_CFG_OFFSET: u64 = 0x1000;
const ISR_CFG_LEN: u64 = 4;
/// Offset of the device-specific configuration in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_LEN: u64 = 0x1000;
/// Offset of the notification area in BAR 0.
pub const NOTIFY_CFG_OFFSET: u64 = 0x3000;
const NOTIFY_CFG_LEN: u64 = 0x1000;
/// Bytes between two queues' notify registers.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Offset of the MSI-X PBA in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0x6000;
const MAX_QUEUES: usize = ((MSIX_PBA_OFFSET - MSIX_TABLE_OFFSET) / 16) as usize - 1;

const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
const VIRTIO_PCI_DEVICE_BASE: u16 = 0x1040;
const PCI_CAP_ID_VNDR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
const BAR: u8 = 0;

/// Creating a virtio PCI function failed.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device declares no queue, too many, or a maximum size virtio-queue refuses.
    #[error("virtio {device}: invalid queue layout ({reason})")]
    InvalidQueues {
        device: &'static str,
        reason: String,
    },
    /// An eventfd could not be created.
    #[error("virtio {device}: cannot create a queue notify eventfd: {source}")]
    EventFd {
        device: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// Config space or MSI-X set-up failed.
    #[error("virtio {device}: {source}")]
    Pci {
        device: &'static str,
        #[source]
        source: PciError,
    },
}

/// The driver's view of one queue, as written into the common configuration. Validated only
/// when the driver sets DRIVER_OK, so a bad value makes the device NEEDS_RESET instead of
/// being silently "fixed".
#[derive(Clone, Copy, Debug)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    enabled: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            enabled: false,
            desc: 0,
            avail: 0,
            used: 0,
        }
    }

    /// Builds the virtio-queue `Queue`, checking size, alignment and that the rings lie in
    /// guest memory.
    fn build(&self, mem: &GuestMemory, event_idx: bool) -> Result<Queue, String> {
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|_| {
            format!(
                "size {} is not a power of two in 1..={}",
                self.size, self.max_size
            )
        })?;
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| format!("descriptor table {:#x} is not 16-byte aligned", self.desc))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(|_| format!("available ring {:#x} is not 2-byte aligned", self.avail))?;
        q.try_set_used_ring_address(GuestAddress(self.used))
            .map_err(|_| format!("used ring {:#x} is not 4-byte aligned", self.used))?;
        let n = usize::from(self.size);
        let extra = if event_idx { 2 } else { 0 };
        for (name, addr, len) in [
            ("descriptor table", self.desc, 16 * n),
            ("available ring", self.avail, 4 + 2 * n + extra),
            ("used ring", self.used, 4 + 8 * n + extra),
        ] {
            if !GuestMemoryBackend::check_range(mem, GuestAddress(addr), len) {
                return Err(format!(
                    "{name} {addr:#x}+{len:#x} is not inside guest memory"
                ));
            }
        }
        q.set_event_idx(event_idx);
        q.set_ready(true);
        Ok(q)
    }
}

/// A virtio device on the PCI bus (modern transport only, virtio 1.x).
pub struct VirtioPciDevice {
    config: PciConfigSpace,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    msix: Arc<Mutex<MsixState>>,
    interrupt: Arc<VirtioInterrupt>,
    ioevents: Arc<dyn IoEventRegistry>,
    /// The BAR 0 address at which the notify ioeventfds are registered now.
    registered_base: Option<u64>,
    /// Offset of the VIRTIO_PCI_CAP_PCI_CFG capability in config space.
    pci_cfg_cap: usize,
    notify: Vec<EventFd>,
    queues: Vec<QueueConfig>,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    queue_select: u16,
    activated: bool,
    gate: super::PauseGate,
    /// Set: DRIVER_OK only records a pending activation and calls the hook; the VMM then
    /// activates from its own thread ([`VirtioPciDevice::activate_pending`]).
    activation_hook: Option<ActivationHook>,
    activation_pending: bool,
}

/// Told that a device is ready to start (the driver set DRIVER_OK). Runs on the vCPU thread
/// with the device locked: it must only pass the news on (e.g. send a message), never lock the
/// device.
pub type ActivationHook = Box<dyn Fn() + Send>;

impl std::fmt::Debug for VirtioPciDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("device", &self.device.name())
            .field("status", &self.interrupt.status())
            .field("activated", &self.activated)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn le_value(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn pci_class(device_type: u32) -> u32 {
    match device_type {
        1 => 0x02_0000, // network controller, Ethernet
        2 => 0x01_0000, // mass storage, SCSI (what Linux and QEMU use for virtio-blk)
        _ => 0xff_0000, // unassigned class
    }
}

impl VirtioPciDevice {
    /// Wraps `device` in a PCI function: config space with the virtio capabilities, BAR 0,
    /// MSI-X with one vector per queue plus one for configuration changes (allocated from
    /// `routing`), and one notify eventfd per queue that will be registered through
    /// `ioevents` once the bus assigns BAR 0.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        routing: Arc<dyn MsiRouting>,
        ioevents: Arc<dyn IoEventRegistry>,
    ) -> Result<Self, VirtioPciError> {
        let name = device.name();
        let pci = |source| VirtioPciError::Pci {
            device: name,
            source,
        };
        let max_sizes = device.queue_max_sizes().to_vec();
        if max_sizes.is_empty() || max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::InvalidQueues {
                device: name,
                reason: format!("{} queues, must be 1..={MAX_QUEUES}", max_sizes.len()),
            });
        }
        if let Some(bad) = max_sizes
            .iter()
            .find(|&&s| s == 0 || !s.is_power_of_two() || s > 32768)
        {
            return Err(VirtioPciError::InvalidQueues {
                device: name,
                reason: format!("maximum queue size {bad} is not a power of two <= 32768"),
            });
        }
        let device_type = device.device_type();
        let mut config = PciConfigSpace::new(PciIds {
            vendor: VIRTIO_PCI_VENDOR,
            device: VIRTIO_PCI_DEVICE_BASE + device_type as u16,
            class: pci_class(device_type),
            revision: 1,
            subsystem_vendor: VIRTIO_PCI_VENDOR,
            subsystem: 0x40,
        });
        config
            .add_bar(
                usize::from(BAR),
                BarSpec {
                    kind: BarKind::Mem64 {
                        prefetchable: false,
                    },
                    size: VIRTIO_BAR_SIZE,
                },
            )
            .map_err(pci)?;
        for (kind, offset, len) in [
            (CAP_COMMON, COMMON_CFG_OFFSET, COMMON_CFG_LEN),
            (CAP_ISR, ISR_CFG_OFFSET, ISR_CFG_LEN),
            (CAP_DEVICE, DEVICE_CFG_OFFSET, DEVICE_CFG_LEN),
        ] {
            config
                .add_capability(PCI_CAP_ID_VNDR, &virtio_cap(kind, offset, len, None), &[])
                .map_err(pci)?;
        }
        let notify_cap = virtio_cap(
            CAP_NOTIFY,
            NOTIFY_CFG_OFFSET,
            NOTIFY_CFG_LEN,
            Some(NOTIFY_OFF_MULTIPLIER),
        );
        config
            .add_capability(PCI_CAP_ID_VNDR, &notify_cap, &[])
            .map_err(pci)?;
        // The PCI configuration access capability: a window onto BAR 0 through config space,
        // for firmware that cannot map BARs. bar, offset, length and data are driver-writable.
        let mut pci_cfg = virtio_cap(CAP_PCI_CFG, 0, 0, None);
        pci_cfg[0] = 20;
        pci_cfg.extend_from_slice(&[0; 4]);
        let mut writable = vec![0u8; pci_cfg.len()];
        writable[2] = 0xff;
        writable[6..18].fill(0xff);
        let pci_cfg_cap = config
            .add_capability(PCI_CAP_ID_VNDR, &pci_cfg, &writable)
            .map_err(pci)?;
        let vectors = max_sizes.len() as u16 + 1;
        let msix = MsixState::new(
            vectors,
            routing,
            &mut config,
            BAR,
            MSIX_TABLE_OFFSET as u32,
            MSIX_PBA_OFFSET as u32,
        )
        .map_err(pci)?;
        let msix = Arc::new(Mutex::new(msix));
        let interrupt = Arc::new(VirtioInterrupt::new(msix.clone(), max_sizes.len()));
        let notify = max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| VirtioPciError::EventFd {
                device: name,
                source,
            })?;
        Ok(VirtioPciDevice {
            config,
            device,
            mem,
            msix,
            interrupt,
            ioevents,
            registered_base: None,
            pci_cfg_cap,
            notify,
            queues: max_sizes.iter().map(|&s| QueueConfig::new(s)).collect(),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            queue_select: 0,
            activated: false,
            gate: super::PauseGate::new(),
            activation_hook: None,
            activation_pending: false,
        })
    }

    /// Make this device's workers (started from now on) wait at `gate` while it is closed: the
    /// VMM shares one gate between all devices and closes it when the VM is paused.
    pub fn set_pause_gate(&mut self, gate: super::PauseGate) {
        self.gate = gate;
    }

    /// Defer activation to the VMM: starting workers and TAP set-up then run on the VMM's
    /// thread (with its affinity, outside any vCPU exit) instead of inside the guest's status
    /// write. Without a hook the device activates at once (unit tests, simple embedders).
    pub fn set_activation_hook(&mut self, hook: ActivationHook) {
        self.activation_hook = Some(hook);
    }

    /// Start the device if the driver set DRIVER_OK and it has not been started since (the
    /// guest may have reset it meanwhile). Returns whether it was started now.
    pub fn activate_pending(&mut self) -> bool {
        if !std::mem::take(&mut self.activation_pending) || self.activated {
            return false;
        }
        let dok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        if self.interrupt.status() & dok == 0 {
            return false;
        }
        self.activate();
        self.activated
    }

    /// The wrapped device's short name.
    pub fn name(&self) -> &'static str {
        self.device.name()
    }

    /// The virtio device id (1 net, 2 block, 4 entropy).
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// The device status register (virtio `device_status`).
    pub fn status(&self) -> u8 {
        self.interrupt.status()
    }

    /// Whether the driver set DRIVER_OK and the device's workers run.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// The wrapped device's counters.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.device.counters()
    }

    /// The interrupt state shared with the device workers.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// Each queue's notify address (guest-physical, in BAR 0 as programmed now) and its
    /// eventfd. The transport registers these with the [`IoEventRegistry`] itself (and moves
    /// them when the guest moves the BAR); this is for inspection and for VMMs that want to
    /// signal a queue themselves.
    pub fn notify_ioevents(&self) -> Vec<(u64, &EventFd)> {
        let Some(base) = self.bar_base() else {
            return Vec::new();
        };
        self.notify
            .iter()
            .enumerate()
            .map(|(q, fd)| (notify_addr(base, q), fd))
            .collect()
    }

    fn bar_base(&self) -> Option<u64> {
        self.config
            .decoded_bar(usize::from(BAR))
            .map(|(base, _, _)| base)
    }

    /// Registers the notify ioeventfds at the BAR's current address (unregistering them from
    /// the old one), or only unregisters them while memory decoding is off.
    fn sync_ioevents(&mut self) {
        let now = self.bar_base();
        if now == self.registered_base {
            return;
        }
        if let Some(old) = self.registered_base.take() {
            for (q, fd) in self.notify.iter().enumerate() {
                if let Err(e) = self.ioevents.unregister(notify_addr(old, q), fd) {
                    crate::guest_warn!("virtio {}: queue {q} ioeventfd: {e}", self.device.name());
                }
            }
        }
        if let Some(base) = now {
            for (q, fd) in self.notify.iter().enumerate() {
                if let Err(e) = self.ioevents.register(notify_addr(base, q), fd) {
                    // Notifications still work through MMIO exits, only slower.
                    crate::guest_warn!(
                        "virtio {}: queue {q} ioeventfd at {:#x}: {e}",
                        self.device.name(),
                        notify_addr(base, q)
                    );
                }
            }
            self.registered_base = Some(base);
        }
    }

    /// The BAR access the PCI_CFG capability describes now: (bar, offset, length), if valid.
    fn pci_cfg_access(&self) -> Option<(usize, u64, usize)> {
        let cap = self.pci_cfg_cap;
        let mut b = [0u8; 1];
        self.config.read(cap + 4, &mut b);
        let bar = usize::from(b[0]);
        let offset = u64::from(self.config.read_reg((cap + 8) / 4));
        let len = self.config.read_reg((cap + 12) / 4) as usize;
        (matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64))
            .then_some((bar, offset, len))
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | bit(VIRTIO_F_VERSION_1)
    }

    fn common_snapshot(&self) -> [u8; COMMON_CFG_LEN as usize] {
        let mut b = [0u8; COMMON_CFG_LEN as usize];
        let features = self.offered_features();
        let dfs = self.device_feature_select;
        let device_feature = match dfs {
            0 => features as u32,
            1 => (features >> 32) as u32,
            _ => 0,
        };
        let driver_feature = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        b[0x00..0x04].copy_from_slice(&dfs.to_le_bytes());
        b[0x04..0x08].copy_from_slice(&device_feature.to_le_bytes());
        b[0x08..0x0c].copy_from_slice(&self.driver_feature_select.to_le_bytes());
        b[0x0c..0x10].copy_from_slice(&driver_feature.to_le_bytes());
        b[0x10..0x12].copy_from_slice(&self.interrupt.config_vector().to_le_bytes());
        b[0x12..0x14].copy_from_slice(&(self.queues.len() as u16).to_le_bytes());
        b[0x14] = self.interrupt.status();
        b[0x15] = 0; // config_generation: device configs here never change under the driver.
        b[0x16..0x18].copy_from_slice(&self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            let index = usize::from(self.queue_select);
            b[0x18..0x1a].copy_from_slice(&q.size.to_le_bytes());
            b[0x1a..0x1c].copy_from_slice(&self.interrupt.queue_vector(index).to_le_bytes());
            b[0x1c..0x1e].copy_from_slice(&u16::from(q.enabled).to_le_bytes());
            b[0x1e..0x20].copy_from_slice(&(index as u16).to_le_bytes());
            b[0x20..0x28].copy_from_slice(&q.desc.to_le_bytes());
            b[0x28..0x30].copy_from_slice(&q.avail.to_le_bytes());
            b[0x30..0x38].copy_from_slice(&q.used.to_le_bytes());
        }
        // A non-existent queue reads as size 0, which tells the driver it is absent.
        b
    }

    fn common_read(&self, offset: u64, data: &mut [u8]) {
        let snap = self.common_snapshot();
        for (i, d) in data.iter_mut().enumerate() {
            *d = snap.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn valid_vector(&self, v: u16) -> u16 {
        if usize::from(v) < lock(&self.msix).len() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = le_value(data);
        let len = data.len() as u64;
        let features_locked = self.interrupt.status() & VIRTIO_CONFIG_S_FEATURES_OK as u8 != 0;
        let index = usize::from(self.queue_select);
        // Ring registers are frozen once a queue is enabled or the device runs; the vector
        // may change at any time (workers read it atomically).
        let queue_exists = index < self.queues.len();
        let queue_writable = !self.activated && self.queues.get(index).is_some_and(|q| !q.enabled);
        match (offset, len) {
            (0x00, 4) => self.device_feature_select = value as u32,
            (0x08, 4) => self.driver_feature_select = value as u32,
            (0x0c, 4) if !features_locked => {
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                self.driver_features &= !(0xffff_ffffu64 << shift);
                self.driver_features |= (value & 0xffff_ffff) << shift;
            }
            (0x10, 2) => {
                let v = self.valid_vector(value as u16);
                self.interrupt.set_config_vector(v);
            }
            (0x14, 1) => self.write_status(value as u8),
            (0x16, 2) => self.queue_select = value as u16,
            (0x18, 2) if queue_writable => self.queues[index].size = value as u16,
            (0x1a, 2) if queue_exists => {
                let v = self.valid_vector(value as u16);
                self.interrupt.set_queue_vector(index, v);
            }
            (0x1c, 2) if queue_writable => {
                // Writing 0 is not allowed (queue reset needs VIRTIO_F_RING_RESET, not offered).
                if value == 1 {
                    self.queues[index].enabled = true;
                }
            }
            (0x20..=0x37, 4 | 8) if queue_writable && offset.is_multiple_of(len) => {
                let q = &mut self.queues[index];
                let field = match offset {
                    0x20..=0x27 => &mut q.desc,
                    0x28..=0x2f => &mut q.avail,
                    _ => &mut q.used,
                };
                if len == 8 {
                    *field = value;
                } else if offset.is_multiple_of(8) {
                    *field = (*field & !0xffff_ffff) | value;
                } else {
                    *field = (*field & 0xffff_ffff) | (value << 32);
                }
            }
            _ => crate::guest_warn!(
                "virtio {}: ignored {len}-byte write of {value:#x} to common config offset \
                 {offset:#x}",
                self.device.name()
            ),
        }
    }

    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        let old = self.interrupt.status();
        let needs_reset = old & VIRTIO_CONFIG_S_NEEDS_RESET as u8;
        let old_driver_bits = old & !needs_reset;
        let mut new = value & !(VIRTIO_CONFIG_S_NEEDS_RESET as u8);
        if new & old_driver_bits != old_driver_bits {
            crate::guest_warn!(
                "virtio {}: driver tried to clear status bits ({old:#x} -> {value:#x}) without \
                 a reset; ignored",
                self.device.name()
            );
            return;
        }
        let fok = VIRTIO_CONFIG_S_FEATURES_OK as u8;
        if new & fok != 0 && old & fok == 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK clear tells the driver its feature set is refused.
            new &= !fok;
        }
        let dok = VIRTIO_CONFIG_S_DRIVER_OK as u8;
        let ready = VIRTIO_CONFIG_S_ACKNOWLEDGE as u8 | VIRTIO_CONFIG_S_DRIVER as u8 | fok | dok;
        self.interrupt.set_driver_status(new | needs_reset);
        if new & dok != 0
            && !self.activated
            && needs_reset == 0
            && new & ready == ready
            && new & VIRTIO_CONFIG_S_FAILED as u8 == 0
        {
            match &self.activation_hook {
                Some(hook) => {
                    self.activation_pending = true;
                    hook();
                }
                None => self.activate(),
            }
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.offered_features();
        let extra = self.driver_features & !offered;
        if extra != 0 {
            crate::guest_warn!(
                "virtio {}: driver accepted features {extra:#x} that were not offered; \
                 FEATURES_OK refused",
                self.device.name()
            );
            return false;
        }
        if self.driver_features & bit(VIRTIO_F_VERSION_1) == 0 {
            crate::guest_warn!(
                "virtio {}: driver did not accept VIRTIO_F_VERSION_1 (legacy drivers are not \
                 supported); FEATURES_OK refused",
                self.device.name()
            );
            return false;
        }
        true
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        for (index, qc) in self.queues.iter().enumerate() {
            if !qc.enabled {
                continue;
            }
            let queue = match qc.build(&self.mem, event_idx) {
                Ok(q) => q,
                Err(reason) => {
                    crate::guest_warn!(
                        "virtio {}: queue {index} is invalid: {reason}; device needs reset",
                        self.device.name()
                    );
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            let notify = match self.notify[index].try_clone() {
                Ok(fd) => fd,
                Err(e) => {
                    error!("virtio {}: cannot clone eventfd: {e}", self.device.name());
                    self.interrupt.set_needs_reset();
                    return;
                }
            };
            queues.push(ActivatedQueue {
                index,
                queue,
                notify,
            });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.driver_features,
            queues,
            interrupt: self.interrupt.clone(),
            gate: self.gate.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => {
                self.activated = true;
                // Guests can reset and re-activate at will: keep this out of normal logs.
                debug!(
                    "virtio {}: activated with features {:#x}",
                    self.device.name(),
                    self.driver_features
                );
            }
            Err(e) => {
                crate::guest_warn!("{e}; device needs reset");
                self.interrupt.set_needs_reset();
            }
        }
    }

    /// Device reset (driver wrote 0 to device_status): stops the workers and returns every
    /// register to its initial value.
    fn reset(&mut self) {
        self.device.reset();
        self.activated = false;
        self.activation_pending = false;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        for (i, fd) in self.notify.iter().enumerate() {
            // Drop notifications that arrived for the old rings.
            let _ = fd.read();
            self.interrupt.set_queue_vector(i, VIRTIO_MSI_NO_VECTOR);
        }
        self.interrupt.set_config_vector(VIRTIO_MSI_NO_VECTOR);
        self.interrupt.set_status(0);
        self.interrupt.take_isr();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
    }
}

fn notify_addr(base: u64, queue: usize) -> u64 {
    base + NOTIFY_CFG_OFFSET + queue as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
}

/// The body (after cap id and next pointer) of a `virtio_pci_cap`, with the notify multiplier
/// appended for the notify capability.
fn virtio_cap(cfg_type: u8, offset: u64, len: u64, multiplier: Option<u32>) -> Vec<u8> {
    let cap_len = if multiplier.is_some() { 20 } else { 16 };
    let mut b = vec![cap_len, cfg_type, BAR, 0, 0, 0];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(len as u32).to_le_bytes());
    if let Some(m) = multiplier {
        b.extend_from_slice(&m.to_le_bytes());
    }
    b
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &PciConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfigSpace {
        &mut self.config
    }

    fn read_config_register(&mut self, reg: usize) -> u32 {
        if reg == (self.pci_cfg_cap + 16) / 4 {
            if let Some((bar, offset, len)) = self.pci_cfg_access() {
                let mut buf = [0u8; 4];
                self.bar_read(bar, offset, &mut buf[..len]);
                for (i, b) in buf.iter().enumerate() {
                    self.config.write_byte_raw(self.pci_cfg_cap + 16 + i, *b);
                }
            }
        }
        self.config.read_reg(reg)
    }

    fn write_config_register(
        &mut self,
        reg: usize,
        offset: usize,
        data: &[u8],
    ) -> ConfigWriteEffect {
        let effect = self.config.write_reg(reg, offset, data);
        if reg == (self.pci_cfg_cap + 16) / 4 {
            if let Some((bar, bar_offset, len)) = self.pci_cfg_access() {
                let value = self.config.read_reg(reg).to_le_bytes();
                self.bar_write(bar, bar_offset, &value[..len]);
            }
        }
        lock(&self.msix).config_written(&self.config);
        if effect.bars_changed {
            self.sync_ioevents();
        }
        effect
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != usize::from(BAR) || data.is_empty() {
            return;
        }
        match offset {
            o if o < COMMON_CFG_LEN => self.common_read(o, data),
            ISR_CFG_OFFSET => data[0] = self.interrupt.take_isr(),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).table_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..VIRTIO_BAR_SIZE).contains(&o) => {
                lock(&self.msix).pba_read(o - MSIX_PBA_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != usize::from(BAR) || data.is_empty() {
            return;
        }
        match offset {
            o if o < COMMON_CFG_LEN => self.common_write(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_LEN).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_CFG_OFFSET..NOTIFY_CFG_OFFSET + NOTIFY_CFG_LEN).contains(&o) => {
                let q = ((o - NOTIFY_CFG_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER)) as usize;
                if let Some(fd) = self.notify.get(q) {
                    if let Err(e) = fd.write(1) {
                        warn!("virtio {}: queue {q} notify: {e}", self.device.name());
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.msix).table_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn bars_assigned(&mut self) {
        self.sync_ioevents();
    }
}

impl Drop for VirtioPciDevice {
    fn drop(&mut self) {
        self.device.reset();
        if let Some(base) = self.registered_base.take() {
            for (q, fd) in self.notify.iter().enumerate() {
                let _ = self.ioevents.unregister(notify_addr(base, q), fd);
            }
        }
    }
}
