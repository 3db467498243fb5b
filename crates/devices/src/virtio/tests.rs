//! Transport tests: discovery, feature negotiation, queue set-up validation, reset, ioeventfd
//! registration across BAR moves, and the data path through the rng device.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress};

use super::rng::Rng;
use super::testing::*;
use super::*;
use crate::pci::config::capabilities;
use crate::pci::PciDevice;

fn rng_driver() -> TestDriver {
    TestDriver::new(Box::new(Rng::new().unwrap()))
}

#[test]
fn pci_identity_and_virtio_capabilities() {
    let d = rng_driver();
    let id = d.cfg_read32(0);
    assert_eq!(id & 0xffff, 0x1af4);
    assert_eq!(id >> 16, 0x1040 + 4);
    assert_eq!(d.cfg_read32(8) & 0xff, 1, "revision 1 (modern)");
    let caps = capabilities(d.dev.lock().unwrap().config());
    let mut kinds = Vec::new();
    for (off, id) in caps {
        if id == 0x09 {
            let cfg = d.dev.lock().unwrap().config().read_reg(off / 4);
            let cfg_type = (cfg >> 24) as u8;
            let bar = d.dev.lock().unwrap().config().read_reg(off / 4 + 1) as u8;
            assert_eq!(bar, 0);
            let offset = d.dev.lock().unwrap().config().read_reg(off / 4 + 2);
            kinds.push((cfg_type, offset));
        }
    }
    kinds.sort_unstable();
    assert_eq!(
        kinds,
        vec![(1, 0), (2, 0x3000), (3, 0x1000), (4, 0x2000), (5, 0)],
        "common, notify, ISR, device and PCI-config-access caps in BAR 0"
    );
    // BAR 0 is a 64-bit memory BAR.
    assert_eq!(d.cfg_read32(0x10) & 0x7, 0x4);
}

#[test]
fn feature_negotiation_requires_version_1_and_offered_bits() {
    let d = rng_driver();
    let offered = d.device_features();
    assert_ne!(offered & (1 << 32), 0, "VERSION_1 offered");
    d.set_status(1);
    d.set_status(3);
    // A legacy driver (no VERSION_1) is refused.
    d.write_driver_features(0);
    d.set_status(3 | 8);
    assert_eq!(d.status() & 8, 0, "FEATURES_OK refused without VERSION_1");
    // Bits that were not offered are refused.
    d.write_driver_features((1 << 32) | (1 << 63));
    d.set_status(3 | 8);
    assert_eq!(d.status() & 8, 0, "FEATURES_OK refused with unoffered bits");
    d.write_driver_features(1 << 32);
    d.set_status(3 | 8);
    assert_eq!(d.status() & 8, 8);
    // Features cannot change after FEATURES_OK.
    d.write_driver_features(offered);
    d.common_write(0x08, 4, 1);
    assert_eq!(d.common_read(0x0c, 4), 1);
}

#[test]
fn queue_registers_and_msix_vectors_read_back() {
    let d = rng_driver();
    d.negotiate(!0);
    assert_eq!(d.common_read(0x12, 2), 1, "num_queues");
    d.common_write(0x16, 2, 0);
    assert_eq!(
        d.common_read(0x18, 2),
        256,
        "queue_size starts at the maximum"
    );
    let q = d.setup_queue(0, 64);
    assert_eq!(d.common_read(0x18, 2), 64);
    assert_eq!(d.common_read(0x1a, 2), 1);
    assert_eq!(d.common_read(0x1c, 2), 1);
    assert_eq!(d.common_read(0x1e, 2), 0, "queue_notify_off");
    assert_eq!(d.common_read(0x20, 8), q.desc);
    assert_eq!(d.common_read(0x28, 8), q.avail);
    assert_eq!(d.common_read(0x30, 8), q.used);
    // A vector beyond the table reads back as NO_VECTOR.
    d.common_write(0x10, 2, 99);
    assert_eq!(d.common_read(0x10, 2), 0xffff);
    // A queue that does not exist reads as size 0.
    d.common_write(0x16, 2, 5);
    assert_eq!(d.common_read(0x18, 2), 0);
}

#[test]
fn rng_fills_buffers_and_raises_msix() {
    let d = rng_driver();
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 16);
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated());
    d.mem.write_slice(&[0u8; 64], GuestAddress(DATA)).unwrap();
    let head = q.add_chain(&d.mem, &[(DATA, 32, true), (DATA + 32, 32, true)]);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 64)));
    assert!(d.wait_irq(1) >= 1, "queue vector fired");
    let mut buf = [0u8; 64];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert!(
        buf.iter().filter(|&&b| b != 0).count() > 32,
        "random bytes written"
    );
    // ISR has the queue bit; reading clears it.
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), 1);
    assert_eq!(d.read(ISR_CFG_OFFSET, 1), 0);
}

#[test]
fn rng_reads_the_configured_source_and_skips_readable_descriptors() {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&[0xab; 8192]).unwrap();
    let d = TestDriver::new(Box::new(Rng::with_source(f.path()).unwrap()));
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    d.mem.write_slice(&[0u8; 48], GuestAddress(DATA)).unwrap();
    q.add_chain(&d.mem, &[(DATA, 16, false), (DATA + 16, 32, true)]);
    d.kick(0);
    let (_, len) = q.wait_used(&d.mem).unwrap();
    assert_eq!(len, 32);
    let mut buf = [0u8; 48];
    d.mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
    assert_eq!(&buf[..16], &[0; 16], "device-readable buffer untouched");
    assert_eq!(&buf[16..], &[0xab; 32]);
    let counters = d.dev.lock().unwrap().counters();
    assert!(counters.contains(&("bad_descriptors", 1)));
}

#[test]
fn mmio_notify_without_ioeventfd_also_works() {
    let d = rng_driver();
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    // A notify write that reaches the VMM as an MMIO exit.
    d.write(NOTIFY_CFG_OFFSET, 2, 0);
    assert!(q.wait_used(&d.mem).is_some());
}

#[test]
fn ioeventfds_follow_the_bar() {
    let d = rng_driver();
    assert_eq!(d.ioevents.registered(), vec![d.notify_addr(0)]);
    // The guest disables memory decoding to size BARs: notifications are unregistered.
    let cmd = d.cfg_read32(4) & 0xffff;
    d.cfg_write(4, &((cmd & !2) as u16).to_le_bytes());
    assert!(d.ioevents.registered().is_empty());
    // It moves the BAR and re-enables decoding: registered at the new address.
    let new_base = 0x10_0010_0000u64;
    d.cfg_write(0x10, &(new_base as u32).to_le_bytes());
    d.cfg_write(0x14, &((new_base >> 32) as u32).to_le_bytes());
    d.cfg_write(4, &(cmd as u16).to_le_bytes());
    assert_eq!(
        d.ioevents.registered(),
        vec![new_base + NOTIFY_CFG_OFFSET],
        "ioeventfd moved with the BAR"
    );
    assert_eq!(
        d.dev.lock().unwrap().notify_ioevents()[0].0,
        new_base + NOTIFY_CFG_OFFSET
    );
}

#[test]
fn reset_stops_the_device_and_clears_registers() {
    let d = rng_driver();
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    d.kick(0);
    assert!(q.wait_used(&d.mem).is_some());
    d.set_status(0);
    assert_eq!(d.status(), 0);
    assert!(!d.dev.lock().unwrap().is_activated());
    d.common_write(0x16, 2, 0);
    assert_eq!(d.common_read(0x1c, 2), 0, "queue disabled");
    assert_eq!(d.common_read(0x18, 2), 256, "size back to maximum");
    assert_eq!(d.common_read(0x1a, 2), 0xffff, "vector cleared");
    // A kick after reset does nothing (no worker): the used ring stays as it was.
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    d.kick(0);
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(q.used_idx(&d.mem), 1);
    // And the device can be brought up again.
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    d.kick(0);
    assert!(q.wait_used(&d.mem).is_some());
}

#[test]
fn status_bits_cannot_be_cleared_without_reset() {
    let d = rng_driver();
    d.negotiate(!0);
    d.set_status(1);
    assert_eq!(d.status(), 1 | 2 | 8, "clearing write ignored");
}

#[test]
fn queue_size_not_power_of_two_needs_reset() {
    let d = rng_driver();
    d.negotiate(!0);
    let q = d.setup_queue(0, 8);
    d.program_queue(&q, 7);
    // Writes to an enabled queue are ignored, so program a fresh device.
    let d = rng_driver();
    d.negotiate(!0);
    d.program_queue(&q, 7);
    d.common_write(0x1c, 2, 1);
    d.driver_ok();
    assert_eq!(d.status() & 0x40, 0x40, "NEEDS_RESET");
    assert!(!d.dev.lock().unwrap().is_activated());
    assert!(d.wait_irq(0) >= 1, "config interrupt for NEEDS_RESET");
    // A reset recovers.
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    assert_eq!(d.status() & 0x40, 0);
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    d.kick(0);
    assert!(q.wait_used(&d.mem).is_some());
}

#[test]
fn rings_outside_guest_memory_or_misaligned_need_reset() {
    for (desc, avail, used) in [
        (MEM_SIZE as u64 - 16, 0x20_0000, 0x21_0000),
        (0x20_0000, u64::MAX - 1, 0x21_0000),
        (0x20_0008, 0x21_0000, 0x22_0000),
        (0x20_0000, 0x21_0000, 0x22_0002),
    ] {
        let d = rng_driver();
        d.negotiate(!0);
        d.common_write(0x16, 2, 0);
        d.common_write(0x18, 2, 8);
        d.common_write(0x20, 8, desc);
        d.common_write(0x28, 8, avail);
        d.common_write(0x30, 8, used);
        d.common_write(0x1c, 2, 1);
        d.driver_ok();
        assert_eq!(
            d.status() & 0x40,
            0x40,
            "rings {desc:#x}/{avail:#x}/{used:#x} accepted"
        );
    }
}

#[test]
fn garbage_register_accesses_do_not_panic() {
    let d = rng_driver();
    for off in 0..0x8000u64 {
        if (NOTIFY_CFG_OFFSET..NOTIFY_CFG_OFFSET + 0x1000).contains(&off) {
            continue;
        }
        for len in [1usize, 2, 4, 8] {
            let _ = d.read(off, len);
        }
    }
    for off in (0..0x40u64).chain(0x2000..0x2040).chain(0x4000..0x4040) {
        for len in [1usize, 2, 4, 8] {
            d.write(off, len, 0xffff_ffff_ffff_ffff);
        }
    }
}

#[test]
fn hostile_rings_on_rng_never_panic() {
    let d = rng_driver();
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    // A descriptor loop: 0 -> 1 -> 0 ...; served up to the queue size, then returned.
    q.write_desc(
        &d.mem,
        0,
        DATA,
        4,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        1,
    );
    q.write_desc(
        &d.mem,
        1,
        DATA + 4,
        4,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        0,
    );
    q.push_avail(&d.mem, 0);
    d.kick(0);
    let (id, len) = q.wait_used(&d.mem).expect("looping chain returned");
    assert_eq!(id, 0);
    assert!(len <= 8 * 4, "at most queue-size descriptors followed");
    // A buffer outside guest memory: returned with nothing written.
    q.write_desc(&d.mem, 2, MEM_SIZE as u64 - 2, 64, VRING_DESC_F_WRITE, 0);
    q.push_avail(&d.mem, 2);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((2, 0)));
    // An address that wraps around 2^64.
    q.write_desc(&d.mem, 3, u64::MAX - 3, 64, VRING_DESC_F_WRITE, 0);
    q.push_avail(&d.mem, 3);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((3, 0)));
    // A next index beyond the queue size ends the chain.
    q.write_desc(
        &d.mem,
        4,
        DATA,
        8,
        VRING_DESC_F_WRITE | VRING_DESC_F_NEXT,
        200,
    );
    q.push_avail(&d.mem, 4);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((4, 8)));
    // A head index beyond the queue size is dropped (nothing to return it with) ...
    q.push_avail(&d.mem, 300);
    // ... and the next good chain is still served.
    let good = q.add_chain(&d.mem, &[(DATA, 16, true)]);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((u32::from(good), 16)));
    assert_eq!(d.status() & 0x40, 0, "no NEEDS_RESET for bad chains");
    // The avail index jumps more than a queue size ahead: ring corrupt → NEEDS_RESET.
    d.irq_count(0);
    q.set_avail_idx(&d.mem, q.used_idx(&d.mem).wrapping_add(100));
    d.kick(0);
    assert!(d.wait_needs_reset(), "NEEDS_RESET after corrupt avail idx");
    assert!(d.wait_irq(0) >= 1, "config interrupt");
    // The device keeps answering register accesses, and a reset brings it back.
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    q.add_chain(&d.mem, &[(DATA, 8, true)]);
    d.kick(0);
    assert!(q.wait_used(&d.mem).is_some());
}

#[test]
fn indirect_descriptors_are_followed() {
    let d = rng_driver();
    let f = d.negotiate(!0);
    assert_ne!(f & (1 << 28), 0, "INDIRECT_DESC offered");
    let mut q = d.setup_queue(0, 8);
    d.driver_ok();
    // An indirect table of two writable descriptors.
    let table = DATA + 0x1000;
    for (i, (addr, len, flags, next)) in [
        (DATA, 8u32, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1u16),
        (DATA + 8, 8, VRING_DESC_F_WRITE, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&addr.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        d.mem
            .write_slice(&raw, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    q.write_desc(&d.mem, 0, table, 32, VRING_DESC_F_INDIRECT, 0);
    q.push_avail(&d.mem, 0);
    d.kick(0);
    assert_eq!(q.wait_used(&d.mem), Some((0, 16)));
}

#[test]
fn pci_cfg_capability_reaches_bar0() {
    let d = rng_driver();
    let caps = capabilities(d.dev.lock().unwrap().config());
    let cap = caps
        .into_iter()
        .find(|&(off, id)| id == 0x09 && d.cfg_read32(off) >> 24 == 5)
        .expect("PCI_CFG capability")
        .0;
    // Read num_queues (common config offset 0x12, 2 bytes) through the window.
    d.cfg_write(cap + 4, &[0]);
    d.cfg_write(cap + 8, &0x12u32.to_le_bytes());
    d.cfg_write(cap + 12, &2u32.to_le_bytes());
    assert_eq!(d.cfg_read32(cap + 16) & 0xffff, 1);
    // Write device_status (offset 0x14, 1 byte) through it.
    d.cfg_write(cap + 8, &0x14u32.to_le_bytes());
    d.cfg_write(cap + 12, &1u32.to_le_bytes());
    d.cfg_write(cap + 16, &1u32.to_le_bytes());
    assert_eq!(d.status(), 1, "ACKNOWLEDGE written via config space");
    // A misaligned or odd-sized window does nothing.
    d.cfg_write(cap + 12, &3u32.to_le_bytes());
    d.cfg_write(cap + 16, &0u32.to_le_bytes());
    assert_eq!(d.status(), 1);
}

#[test]
fn activation_hook_defers_start_to_the_vmm_thread() {
    let d = rng_driver();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    d.dev.lock().unwrap().set_activation_hook(Box::new(move || {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }));
    d.negotiate(!0);
    let mut q = d.setup_queue(0, 16);
    d.driver_ok();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(
        !d.dev.lock().unwrap().is_activated(),
        "started inside the status write"
    );
    // A notification before the VMM gets to it is kept and served once the worker starts.
    let head = q.add_chain(&d.mem, &[(DATA, 16, true)]);
    d.kick(0);
    assert!(d.dev.lock().unwrap().activate_pending());
    assert!(d.dev.lock().unwrap().is_activated());
    assert_eq!(q.wait_used(&d.mem), Some((u32::from(head), 16)));
    // Nothing pending any more.
    assert!(!d.dev.lock().unwrap().activate_pending());
}

#[test]
fn a_reset_before_the_vmm_activates_cancels_the_activation() {
    let d = rng_driver();
    d.dev.lock().unwrap().set_activation_hook(Box::new(|| {}));
    d.negotiate(!0);
    let _q = d.setup_queue(0, 16);
    d.driver_ok();
    d.set_status(0);
    assert!(!d.dev.lock().unwrap().activate_pending());
    assert!(!d.dev.lock().unwrap().is_activated());
}
