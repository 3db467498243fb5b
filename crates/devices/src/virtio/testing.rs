//! A fake virtio driver for unit tests: it puts a device on a real [`PciBus`], programs it
//! through MMIO and ECAM exactly as Linux's virtio_pci_modern does, lays out split rings in a
//! `GuestMemoryMmap`, kicks queues through the ioeventfd the transport registered, and waits
//! for used-ring entries and MSI-X interrupts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_F_VERSION_1,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    VirtioDevice, VirtioPciDevice, COMMON_CFG_OFFSET, DEVICE_CFG_OFFSET, MSIX_TABLE_OFFSET,
    NOTIFY_CFG_OFFSET, NOTIFY_OFF_MULTIPLIER,
};
use crate::pci::{PciBus, PciDevice, PciWindows};
use crate::test_utils::{StubIoEvents, StubRouting};
use crate::GuestMemory;

pub const MEM_SIZE: usize = 32 << 20;
/// Where test buffers go.
pub const DATA: u64 = 0x40_0000;
pub const TIMEOUT: Duration = Duration::from_secs(5);

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;
pub const VRING_DESC_F_INDIRECT: u16 = 4;

pub fn guest_memory() -> GuestMemory {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn windows() -> PciWindows {
    PciWindows {
        mmio32: 0xc000_0000..0xe000_0000,
        mmio64: 0x10_0000_0000..0x20_0000_0000,
        io: 0xc000..0xd000,
    }
}

/// A split ring as the driver sees it.
#[derive(Debug)]
pub struct TestQueue {
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl TestQueue {
    /// Writes descriptor `i` raw.
    pub fn write_desc(
        &self,
        mem: &GuestMemory,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        mem.write_slice(&raw, at).unwrap();
    }

    /// Puts `head` in the available ring and publishes it.
    pub fn push_avail(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(mem, self.avail_idx);
    }

    /// Writes the avail ring's idx field raw (hostile tests use any value).
    pub fn set_avail_idx(&self, mem: &GuestMemory, idx: u16) {
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(idx, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a chain of (addr, len, device-writable) buffers; returns its head index.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.write_desc(mem, idx, addr, len, flags, (idx + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        self.push_avail(mem, head);
        head
    }

    /// The used ring's idx field.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Waits for the next used entry: (descriptor id, bytes written).
    pub fn wait_used(&mut self, mem: &GuestMemory) -> Option<(u32, u32)> {
        let deadline = Instant::now() + TIMEOUT;
        let mut spins = 0u32;
        while self.used_idx(mem) == self.used_seen {
            if Instant::now() > deadline {
                return None;
            }
            // Spin briefly (completions usually take microseconds), then back off.
            spins += 1;
            if spins < 2000 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(500));
            }
        }
        let slot = u64::from(self.used_seen % self.size);
        let at = self.used + 4 + 8 * slot;
        let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
        self.used_seen = self.used_seen.wrapping_add(1);
        Some((id, len))
    }
}

/// A device on a bus, driven like a guest driver would.
pub struct TestDriver {
    pub bus: PciBus,
    pub dev: Arc<Mutex<VirtioPciDevice>>,
    pub routing: Arc<StubRouting>,
    pub ioevents: Arc<StubIoEvents>,
    pub mem: GuestMemory,
    pub base: u64,
    slot: u8,
}

impl TestDriver {
    pub fn new(device: Box<dyn VirtioDevice>) -> Self {
        Self::with_memory(device, guest_memory())
    }

    /// Like [`TestDriver::new`], on the given guest memory (at least 8 MiB from address 0).
    pub fn with_memory(device: Box<dyn VirtioDevice>, mem: GuestMemory) -> Self {
        let routing = Arc::new(StubRouting::default());
        let ioevents = Arc::new(StubIoEvents::default());
        let dev = VirtioPciDevice::new(device, mem.clone(), routing.clone(), ioevents.clone())
            .expect("virtio PCI device");
        let dev = Arc::new(Mutex::new(dev));
        let bus = PciBus::new(windows());
        let addr = bus.add_device(dev.clone()).unwrap();
        let mut d = TestDriver {
            bus,
            dev,
            routing,
            ioevents,
            mem,
            base: 0,
            slot: addr.device,
        };
        let lo = d.cfg_read32(0x10) & !0xf;
        let hi = d.cfg_read32(0x14);
        d.base = u64::from(lo) | (u64::from(hi) << 32);
        d
    }

    fn ecam(&self, reg: usize) -> u64 {
        (u64::from(self.slot) << 15) | reg as u64
    }

    pub fn cfg_read32(&self, reg: usize) -> u32 {
        let mut b = [0u8; 4];
        self.bus.ecam_read(self.ecam(reg), &mut b);
        u32::from_le_bytes(b)
    }

    pub fn cfg_write(&self, reg: usize, data: &[u8]) {
        self.bus.ecam_write(self.ecam(reg), data);
    }

    pub fn read(&self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        assert!(self.bus.mmio_read(self.base + offset, &mut b[..len]));
        u64::from_le_bytes(b)
    }

    pub fn write(&self, offset: u64, len: usize, value: u64) {
        assert!(self
            .bus
            .mmio_write(self.base + offset, &value.to_le_bytes()[..len]));
    }

    pub fn common_read(&self, offset: u64, len: usize) -> u64 {
        self.read(COMMON_CFG_OFFSET + offset, len)
    }

    pub fn common_write(&self, offset: u64, len: usize, value: u64) {
        self.write(COMMON_CFG_OFFSET + offset, len, value)
    }

    pub fn status(&self) -> u8 {
        self.common_read(0x14, 1) as u8
    }

    pub fn set_status(&self, s: u32) {
        self.common_write(0x14, 1, u64::from(s));
    }

    pub fn device_features(&self) -> u64 {
        self.common_write(0x00, 4, 0);
        let lo = self.common_read(0x04, 4);
        self.common_write(0x00, 4, 1);
        let hi = self.common_read(0x04, 4);
        lo | (hi << 32)
    }

    pub fn write_driver_features(&self, f: u64) {
        self.common_write(0x08, 4, 0);
        self.common_write(0x0c, 4, f & 0xffff_ffff);
        self.common_write(0x08, 4, 1);
        self.common_write(0x0c, 4, f >> 32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, feature negotiation (offered ∩ `wanted`, plus VERSION_1),
    /// FEATURES_OK, MSI-X enabled with every vector unmasked. Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> u64 {
        self.set_status(0);
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.set_status(VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        let features = (self.device_features() & wanted) | (1 << VIRTIO_F_VERSION_1);
        self.write_driver_features(features);
        self.set_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_ne!(
            self.status() & VIRTIO_CONFIG_S_FEATURES_OK as u8,
            0,
            "device refused features {features:#x}"
        );
        self.enable_msix();
        self.common_write(0x10, 2, 0); // config changes on vector 0
        features
    }

    fn enable_msix(&self) {
        let cap = crate::pci::config::capabilities(self.dev.lock().unwrap().config())
            .into_iter()
            .find(|c| c.1 == crate::pci::msix::MSIX_CAP_ID)
            .unwrap()
            .0;
        let vectors = self.dev.lock().unwrap().config().read_u16(cap + 2) as u64 & 0x7ff;
        for v in 0..=vectors {
            let e = MSIX_TABLE_OFFSET + 16 * v;
            self.write(e, 4, 0xfee0_0000);
            self.write(e + 4, 4, 0);
            self.write(e + 8, 4, 0x30 + v);
            self.write(e + 12, 4, 0); // unmask
        }
        self.cfg_write(cap + 2, &(1u16 << 15).to_le_bytes());
    }

    /// Programs queue `index` with `size` entries at a fixed spot, vector `index + 1`,
    /// and enables it.
    pub fn setup_queue(&self, index: u16, size: u16) -> TestQueue {
        let base = 0x10_0000 + u64::from(index) * 0x4_0000;
        let q = TestQueue {
            index,
            size,
            desc: base,
            avail: base + 0x1_0000,
            used: base + 0x2_0000,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        };
        // Fresh, zeroed rings, as a driver allocates them.
        self.mem
            .write_slice(&vec![0u8; 0x3_0000], GuestAddress(base))
            .unwrap();
        self.program_queue(&q, size);
        self.common_write(0x1c, 2, 1);
        q
    }

    /// Writes a queue's registers without enabling it.
    pub fn program_queue(&self, q: &TestQueue, size: u16) {
        self.common_write(0x16, 2, u64::from(q.index));
        self.common_write(0x18, 2, u64::from(size));
        self.common_write(0x1a, 2, u64::from(q.index) + 1);
        self.common_write(0x20, 4, q.desc & 0xffff_ffff);
        self.common_write(0x24, 4, q.desc >> 32);
        self.common_write(0x28, 8, q.avail);
        self.common_write(0x30, 8, q.used);
    }

    pub fn driver_ok(&self) {
        self.set_status(
            VIRTIO_CONFIG_S_ACKNOWLEDGE
                | VIRTIO_CONFIG_S_DRIVER
                | VIRTIO_CONFIG_S_FEATURES_OK
                | VIRTIO_CONFIG_S_DRIVER_OK,
        );
    }

    pub fn notify_addr(&self, q: u16) -> u64 {
        self.base + NOTIFY_CFG_OFFSET + u64::from(q) * u64::from(NOTIFY_OFF_MULTIPLIER)
    }

    /// Kicks queue `q` the way KVM does for a guest write: through its ioeventfd.
    pub fn kick(&self, q: u16) {
        assert!(
            self.ioevents.signal(self.notify_addr(q)),
            "no ioeventfd registered for queue {q}"
        );
    }

    #[allow(dead_code)] // used by block and net tests
    pub fn device_cfg(&self, offset: u64, len: usize) -> u64 {
        self.read(DEVICE_CFG_OFFSET + offset, len)
    }

    fn gsi(&self, vector: u16) -> u32 {
        self.dev
            .lock()
            .unwrap()
            .interrupt()
            .msix_gsi(vector)
            .expect("vector exists")
    }

    /// Waits until MSI-X `vector` fired at least once; returns how many times it fired.
    pub fn wait_irq(&self, vector: u16) -> u64 {
        let gsi = self.gsi(vector);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let n = self.routing.take_count(gsi);
            if n > 0 {
                return n;
            }
            assert!(Instant::now() < deadline, "no interrupt on vector {vector}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Interrupts on `vector` since the last look, without waiting.
    pub fn irq_count(&self, vector: u16) -> u64 {
        self.routing.take_count(self.gsi(vector))
    }

    /// Waits until the device status has NEEDS_RESET.
    pub fn wait_needs_reset(&self) -> bool {
        let deadline = Instant::now() + TIMEOUT;
        while self.status() & 0x40 == 0 {
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}
