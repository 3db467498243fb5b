//! Randomised hostile drivers: descriptor tables and available rings full of random (and
//! random-but-plausible) values, on every queue of every device. The device must return every
//! chain whose head is inside the queue, drop the others, never panic (a contained worker panic
//! would show up as NEEDS_RESET) and keep serving after a reset.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::block::{Block, BlockConfig};
use super::net::{Net, NetConfig, PacketSocket};
use super::rng::Rng;
use super::testing::*;
use super::VirtioDevice;
use rvirt_testkit::XorShift as Rand;

/// Deterministic values shaped for a virtio driver's rings.
trait Hostile {
    fn addr(&mut self) -> u64;
    fn len(&mut self) -> u32;
}

impl Hostile for Rand {
    /// Mostly plausible addresses (inside the data area, near the end of memory), sometimes
    /// anything at all.
    fn addr(&mut self) -> u64 {
        match self.below(4) {
            0 => self.next_u64(),
            1 => MEM_SIZE as u64 - self.below(4096),
            _ => DATA + self.below(0x20_0000),
        }
    }

    fn len(&mut self) -> u32 {
        match self.below(4) {
            0 => self.next_u64() as u32,
            1 => 16,
            _ => self.below(8192) as u32,
        }
    }
}

const SIZE: u16 = 16;

fn fuzz(
    name: &str,
    make: &dyn Fn() -> Box<dyn VirtioDevice>,
    queues: u16,
    rounds: u32,
    feed: &dyn Fn(u64),
) {
    let mut r = Rand(0x9e37_79b9_7f4a_7c15 ^ u64::from(rounds));
    let d = TestDriver::new(make());
    // Realistic bytes in the data area, so some requests parse as valid.
    let mut junk = vec![0u8; 0x20_0000];
    for b in junk.iter_mut() {
        *b = r.next_u64() as u8 & 0x0f;
    }
    d.mem.write_slice(&junk, GuestAddress(DATA)).unwrap();
    for round in 0..rounds {
        d.negotiate(!0);
        let mut qs: Vec<TestQueue> = (0..queues).map(|q| d.setup_queue(q, SIZE)).collect();
        d.driver_ok();
        assert!(d.dev.lock().unwrap().is_activated(), "{name} round {round}");
        for (qi, q) in qs.iter_mut().enumerate() {
            for i in 0..SIZE {
                let flags = r.below(8) as u16;
                let next = if r.below(4) == 0 {
                    r.next_u64() as u16
                } else {
                    r.below(u64::from(SIZE)) as u16
                };
                let (addr, len) = if flags & VRING_DESC_F_INDIRECT != 0 && r.below(2) == 0 {
                    (DATA + 16 * r.below(0x1000), 16 * r.below(8) as u32)
                } else {
                    (r.addr(), r.len())
                };
                q.write_desc(&d.mem, i, addr, len, flags, next);
            }
            let entries = r.below(u64::from(SIZE)) as u16 + 1;
            let mut returnable = 0u16;
            for _ in 0..entries {
                let head = if r.below(8) == 0 {
                    r.next_u64() as u16
                } else {
                    r.below(u64::from(SIZE)) as u16
                };
                if head < SIZE {
                    returnable += 1;
                }
                q.push_avail(&d.mem, head);
            }
            d.kick(qi as u16);
            // The receive queue of virtio-net only returns chains when frames arrive: feed it
            // some, of random sizes; how many chains they use is not predictable.
            if name == "net" && qi == 0 {
                feed(r.next_u64());
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while q.used_idx(&d.mem) != returnable {
                assert!(
                    Instant::now() < deadline,
                    "{name} round {round} queue {qi}: {} of {returnable} chains returned",
                    q.used_idx(&d.mem)
                );
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        assert_eq!(
            d.status() & 0x40,
            0,
            "{name} round {round}: NEEDS_RESET (worker panic or ring error)"
        );
    }
}

#[test]
fn random_rings_on_block() {
    let disk: Arc<dyn rvirt_image::BlockDevice> = {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fuzz.raw");
        rvirt_image::RawFile::create(&path, 1 << 20, rvirt_image::Preallocation::Off).unwrap();
        Arc::new(rvirt_image::RawFile::open(&path, false).unwrap())
    };
    let make = move || -> Box<dyn VirtioDevice> {
        Box::new(Block::new(disk.clone(), &BlockConfig::default()))
    };
    fuzz("block", &make, 1, 150, &|_| {});
}

#[test]
fn random_rings_on_rng() {
    fuzz("rng", &|| Box::new(Rng::new().unwrap()), 1, 150, &|_| {});
}

#[test]
fn random_rings_on_net() {
    let (a, b) = UnixDatagram::pair().unwrap();
    let backend = Arc::new(PacketSocket::new(OwnedFd::from(a)).unwrap());
    let make = move || -> Box<dyn VirtioDevice> {
        Box::new(Net::new(
            backend.clone(),
            NetConfig {
                mac: [2, 0, 0, 0, 0, 1],
            },
        ))
    };
    b.set_nonblocking(true).unwrap();
    let feed = |seed: u64| {
        let mut r = Rand(seed | 1);
        for _ in 0..r.below(4) {
            let len = 12 + r.below(9000) as usize;
            let _ = b.send(&vec![0x5a; len]);
        }
        // Drain what the device transmitted so the socket never fills.
        let mut buf = vec![0u8; 70_000];
        while b.recv(&mut buf).is_ok() {}
    };
    fuzz("net", &make, 2, 150, &feed);
}
