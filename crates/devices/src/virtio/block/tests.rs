//! virtio-blk driven through the PCI transport by the fake driver, on an in-memory disk and on
//! a real raw image file.

use std::sync::{Arc, Mutex};

use rvirt_image::{BlockDevice, BlockStatus, Extent};
use virtio_bindings::virtio_blk::*;
use vm_memory::{Bytes, GuestAddress};

use super::{Block, BlockConfig};
use crate::virtio::testing::*;

const HDR: u64 = DATA;
const STATUS: u64 = DATA + 0x100;
const BUF: u64 = DATA + 0x1000;
const SECTORS: u64 = 2048; // 1 MiB disk

#[derive(Default)]
struct MemDisk {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    discard: bool,
    fail: bool,
    flushes: Mutex<u32>,
    ops: Mutex<Vec<(&'static str, u64, u64, bool)>>,
}

impl MemDisk {
    fn new(read_only: bool, discard: bool) -> Arc<Self> {
        let data = (0..SECTORS * 512).map(|i| (i / 512) as u8).collect();
        Arc::new(MemDisk {
            data: Mutex::new(data),
            read_only,
            discard,
            ..Default::default()
        })
    }

    fn err(&self) -> rvirt_image::Error {
        rvirt_image::Error::io(
            "test",
            std::path::Path::new("mem"),
            std::io::Error::other("injected"),
        )
    }
}

impl BlockDevice for MemDisk {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> rvirt_image::Result<()> {
        if self.fail {
            return Err(self.err());
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> rvirt_image::Result<()> {
        assert!(!self.read_only, "write reached a read-only backend");
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> rvirt_image::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn supports_discard(&self) -> bool {
        self.discard
    }
    fn discard(&self, offset: u64, len: u64) -> rvirt_image::Result<()> {
        self.ops
            .lock()
            .unwrap()
            .push(("discard", offset, len, false));
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> rvirt_image::Result<()> {
        self.ops
            .lock()
            .unwrap()
            .push(("zeroes", offset, len, may_unmap));
        let mut d = self.data.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> rvirt_image::Result<Extent> {
        Ok(Extent {
            start: offset,
            length: len,
            status: BlockStatus {
                data: true,
                zero: false,
                offset: Some(offset),
                depth: 0,
            },
        })
    }
}

struct Blk {
    d: TestDriver,
    q: TestQueue,
    features: u64,
}

fn setup(disk: Arc<dyn BlockDevice>, config: BlockConfig) -> Blk {
    let d = TestDriver::new(Box::new(Block::new(disk, &config)));
    let features = d.negotiate(!0);
    let q = d.setup_queue(0, 16);
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated());
    Blk { d, q, features }
}

impl Blk {
    /// Sends header + `data` + status; returns (status byte, used length).
    fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let mem = &self.d.mem;
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(HDR)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        let mut chain = vec![(HDR, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        self.send(&chain)
    }

    fn send(&mut self, chain: &[(u64, u32, bool)]) -> (u8, u32) {
        let head = self.q.add_chain(&self.d.mem, chain);
        self.d.kick(0);
        let (id, len) = self.q.wait_used(&self.d.mem).expect("request completed");
        assert_eq!(id, u32::from(head));
        (self.d.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    fn fill(&self, addr: u64, len: usize, byte: u8) {
        self.d
            .mem
            .write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn counter(&self, name: &str) -> u64 {
        let c = self.d.dev.lock().unwrap().counters();
        c.iter().find(|c| c.0 == name).unwrap().1
    }
}

const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

#[test]
fn config_space_and_features() {
    let disk = MemDisk::new(false, false);
    let b = setup(disk, BlockConfig::default());
    assert_eq!(b.d.cfg_read32(0) >> 16, 0x1042);
    assert_eq!(b.d.device_cfg(0, 8), SECTORS, "capacity");
    assert_eq!(b.d.device_cfg(12, 4), 254, "seg_max");
    assert_eq!(b.d.device_cfg(20, 4), 512, "blk_size");
    assert_eq!(b.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        b.features & (1 << VIRTIO_BLK_F_DISCARD),
        0,
        "no discard without backend support"
    );
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_FLUSH), 0);
    assert_eq!(b.d.device_cfg(48, 4), u64::from(super::MAX_RANGE_SECTORS));

    let b = setup(MemDisk::new(false, true), BlockConfig::default());
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(b.d.device_cfg(40, 4), 1, "max_discard_seg");

    let b = setup(MemDisk::new(true, true), BlockConfig::default());
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(
        b.features & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)),
        0,
        "read-only disks offer neither discard nor write-zeroes"
    );
}

#[test]
fn write_then_read_back() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk.clone(), BlockConfig::default());
    b.fill(BUF, 512, 0x11);
    b.fill(BUF + 0x1000, 512, 0x22);
    let (s, len) = b.request(
        VIRTIO_BLK_T_OUT,
        10,
        &[(BUF, 512, false), (BUF + 0x1000, 512, false)],
    );
    assert_eq!((s, len), (OK, 1));
    {
        let data = disk.data.lock().unwrap();
        assert!(data[10 * 512..11 * 512].iter().all(|&x| x == 0x11));
        assert!(data[11 * 512..12 * 512].iter().all(|&x| x == 0x22));
        assert_eq!(data[12 * 512], 12, "neighbouring sector untouched");
    }
    b.fill(BUF + 0x2000, 1536, 0);
    let (s, len) = b.request(VIRTIO_BLK_T_IN, 9, &[(BUF + 0x2000, 1536, true)]);
    assert_eq!((s, len), (OK, 1537), "used length counts data and status");
    let got = b.guest(BUF + 0x2000, 1536);
    assert!(got[..512].iter().all(|&x| x == 9));
    assert!(got[512..1024].iter().all(|&x| x == 0x11));
    assert!(got[1024..].iter().all(|&x| x == 0x22));
    assert!(b.d.wait_irq(1) >= 1);
    assert_eq!(b.counter("bytes_written"), 1024);
    assert_eq!(b.counter("bytes_read"), 1536);
}

#[test]
fn large_request_across_many_segments() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk.clone(), BlockConfig::default());
    // 1 MiB read into three uneven segments (chunked through a bounded buffer).
    let segs = [
        (BUF, 512 * 3, true),
        (BUF + 0x10_0000, 600 * 1024 - 512 * 3, true),
        (BUF + 0x20_0000, 424 * 1024, true),
    ];
    let (s, len) = b.request(VIRTIO_BLK_T_IN, 0, &segs);
    assert_eq!((s, len), (OK, (1 << 20) + 1));
    let mut all = Vec::new();
    for (addr, l, _) in segs {
        all.extend(b.guest(addr, l as usize));
    }
    assert_eq!(all, *disk.data.lock().unwrap());
}

#[test]
fn flush_and_get_id() {
    let disk = MemDisk::new(false, false);
    let cfg = BlockConfig {
        id: "rvirt-disk-1".into(),
        read_only: false,
    };
    let mut b = setup(disk.clone(), cfg);
    assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    assert_eq!(*disk.flushes.lock().unwrap(), 1);
    b.fill(BUF, 20, 0xff);
    assert_eq!(
        b.request(VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20, true)]),
        (OK, 21)
    );
    let id = b.guest(BUF, 20);
    assert_eq!(&id[..12], b"rvirt-disk-1");
    assert!(id[12..].iter().all(|&x| x == 0));
}

#[test]
fn read_only_disk_refuses_writes() {
    let disk = MemDisk::new(false, false);
    let cfg = BlockConfig {
        id: String::new(),
        read_only: true,
    };
    let mut b = setup(disk.clone(), cfg);
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_RO), 0);
    b.fill(BUF, 512, 0x77);
    assert_eq!(
        b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, false)]),
        (IOERR, 1)
    );
    assert_eq!(disk.data.lock().unwrap()[0], 0, "disk unchanged");
    // Reads still work.
    assert_eq!(
        b.request(VIRTIO_BLK_T_IN, 3, &[(BUF, 512, true)]),
        (OK, 513)
    );
    assert_eq!(b.guest(BUF, 1)[0], 3);
    // Write-zeroes was not offered: unsupported.
    assert_eq!(
        b.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, false)])
            .0,
        UNSUPP
    );
}

fn range(b: &Blk, sector: u64, count: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&count.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    b.d.mem.write_slice(&r, GuestAddress(BUF)).unwrap();
}

#[test]
fn discard_and_write_zeroes() {
    let disk = MemDisk::new(false, true);
    let mut b = setup(disk.clone(), BlockConfig::default());
    range(&b, 4, 2, 0);
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, false)]),
        (OK, 1)
    );
    range(&b, 8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    assert_eq!(
        b.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, false)]),
        (OK, 1)
    );
    assert_eq!(
        *disk.ops.lock().unwrap(),
        vec![
            ("discard", 4 * 512, 1024, false),
            ("zeroes", 8 * 512, 512, true)
        ]
    );
    assert!(disk.data.lock().unwrap()[8 * 512..9 * 512]
        .iter()
        .all(|&x| x == 0));
    // Discard with the unmap flag, or unknown flags: unsupported.
    range(&b, 4, 2, 1);
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, false)]).0,
        UNSUPP
    );
    range(&b, 4, 2, 0x10);
    assert_eq!(
        b.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(BUF, 16, false)])
            .0,
        UNSUPP
    );
    // A range past the end, and two ranges when one is allowed.
    range(&b, SECTORS - 1, 2, 0);
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, false)]).0,
        IOERR
    );
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 32, false)]).0,
        IOERR
    );
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 12, false)]).0,
        IOERR
    );
    assert_eq!(
        disk.ops.lock().unwrap().len(),
        2,
        "no bad range reached the disk"
    );
}

#[test]
fn discard_unsupported_by_backend_is_refused() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk.clone(), BlockConfig::default());
    range(&b, 0, 1, 0);
    assert_eq!(
        b.request(VIRTIO_BLK_T_DISCARD, 0, &[(BUF, 16, false)]).0,
        UNSUPP
    );
    assert!(disk.ops.lock().unwrap().is_empty());
}

#[test]
fn hostile_requests_get_error_status() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk.clone(), BlockConfig::default());
    let before = disk.data.lock().unwrap().clone();
    type Case = (&'static str, u32, u64, Vec<(u64, u32, bool)>, u8);
    let cases: Vec<Case> = vec![
        (
            "read past the end",
            VIRTIO_BLK_T_IN,
            SECTORS,
            vec![(BUF, 512, true)],
            IOERR,
        ),
        (
            "read straddling the end",
            VIRTIO_BLK_T_IN,
            SECTORS - 1,
            vec![(BUF, 1024, true)],
            IOERR,
        ),
        (
            "sector overflow",
            VIRTIO_BLK_T_OUT,
            u64::MAX,
            vec![(BUF, 512, false)],
            IOERR,
        ),
        (
            "length not a sector multiple",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(BUF, 100, false)],
            IOERR,
        ),
        (
            "read into a device-readable buffer",
            VIRTIO_BLK_T_IN,
            0,
            vec![(BUF, 512, false)],
            IOERR,
        ),
        (
            "write from a device-writable buffer",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(BUF, 512, true)],
            IOERR,
        ),
        (
            "data outside guest memory",
            VIRTIO_BLK_T_OUT,
            0,
            vec![(MEM_SIZE as u64 - 256, 512, false)],
            IOERR,
        ),
        (
            "data address wraps",
            VIRTIO_BLK_T_IN,
            0,
            vec![(u64::MAX - 255, 512, true)],
            IOERR,
        ),
        ("unknown request type", 0x4242, 0, vec![], UNSUPP),
        (
            "get-id into a readable buffer",
            VIRTIO_BLK_T_GET_ID,
            0,
            vec![(BUF, 20, false)],
            IOERR,
        ),
    ];
    for (what, kind, sector, data, want) in cases {
        let (s, _) = b.request(kind, sector, &data);
        assert_eq!(s, want, "{what}");
    }
    assert_eq!(
        *disk.data.lock().unwrap(),
        before,
        "no hostile request changed the disk"
    );

    // Header in a device-writable descriptor.
    let (s, len) = b.send(&[(HDR, 16, true), (STATUS, 1, true)]);
    assert_eq!((s, len), (IOERR, 1));
    // Header shorter than 16 bytes.
    let (s, _) = b.send(&[(HDR, 8, false), (STATUS, 1, true)]);
    assert_eq!(s, IOERR);
    // Header outside guest memory.
    let (s, _) = b.send(&[(MEM_SIZE as u64 - 8, 16, false), (STATUS, 1, true)]);
    assert_eq!(s, IOERR);
    // No status byte (last descriptor device-readable): returned with length 0.
    b.d.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
    let (s, len) = b.send(&[(HDR, 16, false), (STATUS, 1, false)]);
    assert_eq!((s, len), (0xee, 0), "status untouched, nothing written");
    // Status byte outside guest memory.
    let (_, len) = b.send(&[(HDR, 16, false), (MEM_SIZE as u64, 1, true)]);
    assert_eq!(len, 0);
    // A single descriptor.
    let (_, len) = b.send(&[(STATUS, 1, true)]);
    assert_eq!(len, 1);
    assert!(b.counter("bad_chains") >= 2);
    assert_eq!(b.d.status() & 0x40, 0, "device still healthy");

    // Still serving good requests.
    assert_eq!(
        b.request(VIRTIO_BLK_T_IN, 5, &[(BUF, 512, true)]),
        (OK, 513)
    );
}

#[test]
fn descriptor_loop_in_a_block_request() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk, BlockConfig::default());
    let mem = b.d.mem.clone();
    // 0: header → 1: data → 0 again: the chain never reaches a status descriptor.
    b.q.write_desc(&mem, 0, HDR, 16, VRING_DESC_F_NEXT, 1);
    b.q.write_desc(&mem, 1, BUF, 512, VRING_DESC_F_NEXT | VRING_DESC_F_WRITE, 0);
    b.q.push_avail(&mem, 0);
    b.d.kick(0);
    let (id, _) = b.q.wait_used(&mem).expect("looping chain returned");
    assert_eq!(id, 0);
    assert_eq!(b.d.status() & 0x40, 0);
}

#[test]
fn backend_errors_become_ioerr() {
    let disk = Arc::new(MemDisk {
        fail: true,
        ..Default::default()
    });
    disk.data.lock().unwrap().resize(4096, 0);
    let mut b = setup(disk, BlockConfig::default());
    assert_eq!(
        b.request(VIRTIO_BLK_T_IN, 0, &[(BUF, 512, true)]),
        (IOERR, 1)
    );
    assert_eq!(b.counter("errors"), 1);
}

#[test]
fn raw_image_file_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    rvirt_image::RawFile::create(&path, 1 << 20, rvirt_image::Preallocation::Off).unwrap();
    let raw = rvirt_image::RawFile::open(&path, false).unwrap();
    let mut b = setup(Arc::new(raw), BlockConfig::default());
    assert_eq!(b.d.device_cfg(0, 8), 2048);
    b.fill(BUF, 4096, 0x5a);
    assert_eq!(
        b.request(VIRTIO_BLK_T_OUT, 100, &[(BUF, 4096, false)]),
        (OK, 1)
    );
    assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    let file = std::fs::read(&path).unwrap();
    assert!(file[100 * 512..100 * 512 + 4096].iter().all(|&x| x == 0x5a));
    assert!(file[..100 * 512].iter().all(|&x| x == 0));
    b.fill(BUF + 0x2000, 4096, 0);
    assert_eq!(
        b.request(VIRTIO_BLK_T_IN, 100, &[(BUF + 0x2000, 4096, true)]),
        (OK, 4097)
    );
    assert!(b.guest(BUF + 0x2000, 4096).iter().all(|&x| x == 0x5a));
}

#[test]
fn event_idx_suppresses_interrupts_both_ways() {
    let mut b = setup(MemDisk::new(false, false), BlockConfig::default());
    assert_ne!(b.features & (1 << 29), 0, "EVENT_IDX negotiated");
    let used_event = GuestAddress(b.q.avail + 4 + 2 * u64::from(b.q.size));
    let avail_event = GuestAddress(b.q.used + 4 + 8 * u64::from(b.q.size));
    // The driver wants no interrupt before used index 100.
    b.d.mem.write_obj(100u16, used_event).unwrap();
    b.d.irq_count(1);
    assert_eq!(b.request(VIRTIO_BLK_T_IN, 1, &[(BUF, 512, true)]).0, OK);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(b.d.irq_count(1), 0, "interrupt suppressed by used_event");
    // The device asks to be kicked at the next avail index.
    let ae: u16 = b.d.mem.read_obj(avail_event).unwrap();
    assert_eq!(ae, 1, "avail_event published");
    // Now the driver wants an interrupt after the next completion.
    b.d.mem.write_obj(1u16, used_event).unwrap();
    assert_eq!(b.request(VIRTIO_BLK_T_IN, 2, &[(BUF, 512, true)]).0, OK);
    assert!(b.d.wait_irq(1) >= 1);
}

#[test]
fn a_full_descriptor_table_of_requests_in_one_kick() {
    let disk = MemDisk::new(false, false);
    let mut b = setup(disk, BlockConfig::default());
    let mem = b.d.mem.clone();
    // 5 three-descriptor reads (15 of the 16 descriptors), each with its own header/status.
    for i in 0..5u64 {
        let hdr = DATA + 0x8_0000 + i * 0x100;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&(100 + i).to_le_bytes());
        mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        b.q.add_chain(
            &mem,
            &[
                (hdr, 16, false),
                (BUF + i * 0x1000, 512, true),
                (hdr + 16, 1, true),
            ],
        );
    }
    b.d.kick(0);
    let mut seen = Vec::new();
    for _ in 0..5 {
        let (id, len) = b.q.wait_used(&mem).expect("completion");
        assert_eq!(len, 513);
        seen.push(id);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..5).map(|i| i * 3).collect::<Vec<u32>>());
    for i in 0..5u64 {
        let status: u8 = mem
            .read_obj(GuestAddress(DATA + 0x8_0000 + i * 0x100 + 16))
            .unwrap();
        assert_eq!(status, OK);
        assert!(b
            .guest(BUF + i * 0x1000, 512)
            .iter()
            .all(|&x| x == 100 + i as u8));
    }
}

#[test]
fn qcow2_image_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.qcow2");
    let opts = rvirt_image::qcow2::CreateOptions {
        size: 4 << 20,
        ..Default::default()
    };
    rvirt_image::create_image(&path, rvirt_image::Format::Qcow2, &opts).unwrap();
    let write = |pattern: u8| {
        let image =
            rvirt_image::open_image(&path, None, &rvirt_image::OpenOptions::default()).unwrap();
        let mut b = setup(Arc::new(image), BlockConfig::default());
        assert_eq!(b.d.device_cfg(0, 8), 8192, "capacity of a 4 MiB image");
        assert_ne!(
            b.features & (1 << VIRTIO_BLK_F_DISCARD),
            0,
            "qcow2 can discard"
        );
        b.fill(BUF, 8192, pattern);
        assert_eq!(
            b.request(VIRTIO_BLK_T_OUT, 3000, &[(BUF, 8192, false)]),
            (OK, 1)
        );
        assert_eq!(b.request(VIRTIO_BLK_T_FLUSH, 0, &[]), (OK, 1));
    };
    write(0x3c);
    // Reopened read-only by a fresh device: the data is there, and writes are refused.
    let ro = rvirt_image::OpenOptions {
        read_only: true,
        ..Default::default()
    };
    let image = rvirt_image::open_image(&path, None, &ro).unwrap();
    let mut b = setup(Arc::new(image), BlockConfig::default());
    assert_ne!(b.features & (1 << VIRTIO_BLK_F_RO), 0);
    b.fill(BUF + 0x4000, 8192, 0);
    assert_eq!(
        b.request(VIRTIO_BLK_T_IN, 3000, &[(BUF + 0x4000, 8192, true)]),
        (OK, 8193)
    );
    assert!(b.guest(BUF + 0x4000, 8192).iter().all(|&x| x == 0x3c));
    assert_eq!(
        b.request(VIRTIO_BLK_T_OUT, 0, &[(BUF, 512, false)]),
        (IOERR, 1)
    );
}

#[test]
fn multiqueue_serves_each_queue_on_its_own() {
    let disk = MemDisk::new(false, false);
    let blk = Block::new(disk.clone(), &BlockConfig::default()).with_num_queues(2);
    let d = TestDriver::new(Box::new(blk));
    let features = d.negotiate(!0);
    assert_ne!(features & (1 << VIRTIO_BLK_F_MQ), 0);
    assert_eq!(d.common_read(0x12, 2), 2, "two queues");
    assert_eq!(d.device_cfg(34, 2), 2, "config num_queues");
    let mut q0 = d.setup_queue(0, 16);
    let mut q1 = d.setup_queue(1, 16);
    d.driver_ok();
    for (i, q) in [&mut q0, &mut q1].into_iter().enumerate() {
        let i = i as u64;
        let hdr = DATA + 0x8_0000 + i * 0x100;
        let mut h = [0u8; 16];
        h[8..16].copy_from_slice(&(20 + i).to_le_bytes());
        d.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
        q.add_chain(
            &d.mem,
            &[
                (hdr, 16, false),
                (BUF + i * 0x1000, 512, true),
                (hdr + 16, 1, true),
            ],
        );
        d.kick(i as u16);
        assert_eq!(q.wait_used(&d.mem), Some((0, 513)));
        assert!(
            d.wait_irq(i as u16 + 1) >= 1,
            "queue {i} uses its own vector"
        );
        let mut got = [0u8; 512];
        d.mem
            .read_slice(&mut got, GuestAddress(BUF + i * 0x1000))
            .unwrap();
        assert!(got.iter().all(|&x| x == 20 + i as u8));
    }
}

#[test]
fn multiqueue_device_works_with_fewer_queues_enabled() {
    let blk = Block::new(MemDisk::new(false, false), &BlockConfig::default()).with_num_queues(4);
    let d = TestDriver::new(Box::new(blk));
    d.negotiate(!0);
    let mut q0 = d.setup_queue(0, 16);
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated());
    let hdr = DATA + 0x8_0000;
    d.mem.write_slice(&[0u8; 16], GuestAddress(hdr)).unwrap();
    q0.add_chain(
        &d.mem,
        &[(hdr, 16, false), (BUF, 512, true), (hdr + 16, 1, true)],
    );
    d.kick(0);
    assert_eq!(q0.wait_used(&d.mem), Some((0, 513)));
    // A single-queue disk does not offer MQ.
    let d = TestDriver::new(Box::new(Block::new(
        MemDisk::new(false, false),
        &BlockConfig::default(),
    )));
    assert_eq!(d.device_features() & (1 << VIRTIO_BLK_F_MQ), 0);
}
