//! virtio-scsi driven through the PCI transport by the fake driver: config space, command
//! requests against disk and CD-ROM LUNs, responses and residuals, control requests, media
//! changes on a running device, and hostile chains.

use std::sync::Arc;

use rvirt_testkit::XorShift;
use virtio_bindings::virtio_scsi::*;
use vm_memory::{Bytes, GuestAddress};

use super::{Scsi, ScsiConfig, ScsiConfigError};
use crate::scsi::tests::MemImage;
use crate::scsi::{sense, ScsiLun};
use crate::virtio::testing::*;

const REQ: u64 = DATA;
const OUT: u64 = DATA + 0x1000;
const RESP: u64 = DATA + 0x10_0000;
const IN: u64 = DATA + 0x11_0000;
const REQ_LEN: u32 = 19 + 32;
const RESP_LEN: u32 = 12 + 96;
const DISK_LEN: usize = 1 << 20;
const CD_LEN: usize = 32 * 2048;

#[derive(Debug)]
struct Resp {
    sense_len: u32,
    resid: u32,
    status: u8,
    response: u8,
    sense: Vec<u8>,
    used: u32,
}

struct Hba {
    d: TestDriver,
    ctl: TestQueue,
    req: TestQueue,
}

fn luns() -> (Vec<(u16, ScsiLun)>, Arc<MemImage>, Arc<MemImage>) {
    let disk = MemImage::new(DISK_LEN, false);
    let cd = MemImage::new(CD_LEN, true);
    let ro = MemImage::new(4096, true);
    let targets = vec![
        (0, ScsiLun::disk(disk.clone(), "disk0", false)),
        (1, ScsiLun::cdrom(Some(cd.clone()), "cd0")),
        (3, ScsiLun::disk(ro, "ro", false)),
    ];
    (targets, disk, cd)
}

fn setup(scsi: Scsi) -> Hba {
    let d = TestDriver::new(Box::new(scsi));
    d.negotiate(!0);
    let ctl = d.setup_queue(0, 16);
    let _event = d.setup_queue(1, 16);
    let req = d.setup_queue(2, 16);
    d.driver_ok();
    assert!(d.dev.lock().unwrap().is_activated());
    Hba { d, ctl, req }
}

fn lun(target: u8) -> [u8; 8] {
    [1, target, 0x40, 0, 0, 0, 0, 0]
}

impl Hba {
    fn write(&self, addr: u64, bytes: &[u8]) {
        self.d.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
    }

    fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.d.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn header(&self, lun: [u8; 8], cdb: &[u8]) {
        let mut h = [0u8; REQ_LEN as usize];
        h[0..8].copy_from_slice(&lun);
        h[8..16].copy_from_slice(&0x1234u64.to_le_bytes());
        h[19..19 + cdb.len()].copy_from_slice(cdb);
        self.write(REQ, &h);
    }

    /// Sends `chain` on the request queue; returns the used length.
    fn send(&mut self, chain: &[(u64, u32, bool)]) -> u32 {
        self.write(RESP, &[0xee; RESP_LEN as usize]);
        let head = self.req.add_chain(&self.d.mem, chain);
        self.d.kick(2);
        let (id, len) = self.req.wait_used(&self.d.mem).expect("request completed");
        assert_eq!(id, u32::from(head));
        len
    }

    fn resp(&self, used: u32) -> Resp {
        let r = self.guest(RESP, RESP_LEN as usize);
        let sense_len = u32::from_le_bytes(r[0..4].try_into().unwrap());
        Resp {
            sense_len,
            resid: u32::from_le_bytes(r[4..8].try_into().unwrap()),
            status: r[10],
            response: r[11],
            sense: r[12..12 + (sense_len as usize).min(96)].to_vec(),
            used,
        }
    }

    /// A command to `target` with `out` as data-out and `in_len` bytes of data-in room.
    fn cmd(&mut self, lun: [u8; 8], cdb: &[u8], out: &[u8], in_len: u32) -> (Resp, Vec<u8>) {
        self.header(lun, cdb);
        let mut chain = vec![(REQ, REQ_LEN, false)];
        if !out.is_empty() {
            self.write(OUT, out);
            chain.push((OUT, out.len() as u32, false));
        }
        chain.push((RESP, RESP_LEN, true));
        if in_len > 0 {
            chain.push((IN, in_len, true));
        }
        let used = self.send(&chain);
        let r = self.resp(used);
        let data = self.guest(IN, in_len as usize);
        (r, data)
    }

    fn control(&mut self, req: &[u8], resp_len: u32) -> (Vec<u8>, u32) {
        self.write(REQ, req);
        self.write(RESP, &[0xee; 8]);
        let head = self.ctl.add_chain(
            &self.d.mem,
            &[(REQ, req.len() as u32, false), (RESP, resp_len, true)],
        );
        self.d.kick(0);
        let (id, len) = self.ctl.wait_used(&self.d.mem).expect("control completed");
        assert_eq!(id, u32::from(head));
        (self.guest(RESP, resp_len as usize), len)
    }

    fn counter(&self, name: &str) -> u64 {
        let c = self.d.dev.lock().unwrap().counters();
        c.iter().find(|c| c.0 == name).unwrap().1
    }
}

fn rw10(opcode: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

const INQUIRY: [u8; 6] = [0x12, 0, 0, 0, 96, 0];
const OK: u8 = VIRTIO_SCSI_S_OK as u8;

#[test]
fn config_space_and_queues() {
    let (targets, _, _) = luns();
    let h = setup(
        Scsi::new(ScsiConfig {
            id: "scsi0".into(),
            targets,
            num_queues: 1,
        })
        .unwrap(),
    );
    assert_eq!(h.d.cfg_read32(0) >> 16, 0x1048, "virtio-scsi PCI device id");
    let cfg = |off, len| h.d.device_cfg(off, len);
    assert_eq!(cfg(0, 4), 1, "num_queues");
    assert_eq!(cfg(4, 4), 254, "seg_max");
    assert_eq!(cfg(8, 4), 0xffff, "max_sectors");
    assert_eq!(cfg(20, 4), 96, "sense_size");
    assert_eq!(cfg(24, 4), 32, "cdb_size");
    assert_eq!(cfg(28, 2), 0, "max_channel");
    assert_eq!(cfg(30, 2), 3, "max_target");
    assert_eq!(cfg(32, 4), 0, "max_lun");

    let s = Scsi::new(ScsiConfig {
        num_queues: 4,
        ..Default::default()
    })
    .unwrap();
    use crate::virtio::VirtioDevice;
    assert_eq!(s.queue_max_sizes().len(), 6, "control, event, 4 requests");
    assert_eq!(s.device_type(), 8);
    let dup = Scsi::new(ScsiConfig {
        targets: vec![(2, ScsiLun::cdrom(None, "")), (2, ScsiLun::cdrom(None, ""))],
        ..Default::default()
    });
    assert!(matches!(
        dup,
        Err(ScsiConfigError::DuplicateTarget { target: 2, .. })
    ));
    let big = Scsi::new(ScsiConfig {
        targets: vec![(256, ScsiLun::cdrom(None, ""))],
        ..Default::default()
    });
    assert!(matches!(big, Err(ScsiConfigError::TargetOutOfRange { .. })));
}

fn hba() -> (Hba, Arc<MemImage>, Arc<MemImage>) {
    let (targets, disk, cd) = luns();
    let scsi = Scsi::new(ScsiConfig {
        id: "scsi0".into(),
        targets,
        num_queues: 1,
    })
    .unwrap();
    (setup(scsi), disk, cd)
}

#[test]
fn inquiry_on_each_target_with_residual() {
    let (mut h, _, _) = hba();
    let (r, data) = h.cmd(lun(0), &INQUIRY, &[], 200);
    assert_eq!((r.response, r.status, r.sense_len), (OK, 0, 0));
    assert_eq!(r.resid, 200 - 36);
    assert_eq!(r.used, RESP_LEN + 36);
    assert_eq!(&data[16..32], b"QEMU HARDDISK   ");
    let (r, data) = h.cmd(lun(1), &INQUIRY, &[], 200);
    assert_eq!((r.response, data[0], data[1]), (OK, 5, 0x80));
    // Peripheral-addressing LUN 0 works too.
    let (r, _) = h.cmd([1, 1, 0, 0, 0, 0, 0, 0], &INQUIRY, &[], 64);
    assert_eq!(r.response, OK);
    // A data-in buffer shorter than the allocation length: truncated, no residual.
    let (r, data) = h.cmd(lun(0), &INQUIRY, &[], 16);
    assert_eq!((r.response, r.resid, r.used), (OK, 0, RESP_LEN + 16));
    assert_eq!(&data[8..16], b"QEMU    ");
}

#[test]
fn read_write_through_the_queue() {
    let (mut h, disk, cd) = hba();
    let (r, data) = h.cmd(lun(0), &rw10(0x28, 7, 4), &[], 2048);
    assert_eq!((r.response, r.status, r.resid), (OK, 0, 0));
    assert_eq!(data, disk.bytes(7 * 512, 2048));
    let payload: Vec<u8> = (0..1024u32).map(|i| (i * 13 + 5) as u8).collect();
    let (r, _) = h.cmd(lun(0), &rw10(0x2a, 100, 2), &payload, 0);
    assert_eq!(
        (r.response, r.status, r.resid, r.used),
        (OK, 0, 0, RESP_LEN)
    );
    assert_eq!(disk.bytes(100 * 512, 1024), payload);
    let (_, back) = h.cmd(lun(0), &rw10(0x28, 100, 2), &[], 1024);
    assert_eq!(back, payload);
    let (r, data) = h.cmd(lun(1), &rw10(0x28, 2, 1), &[], 2048);
    assert_eq!((r.response, r.status), (OK, 0));
    assert_eq!(data, cd.bytes(4096, 2048));
    assert_eq!(h.counter("bytes_in"), 2048 + 1024 + 2048);
    assert_eq!(h.counter("bytes_out"), 1024);
    // Data-in and response split over several descriptors each.
    h.header(lun(0), &rw10(0x28, 7, 2));
    let used = h.send(&[
        (REQ, 10, false),
        (REQ + 10, REQ_LEN - 10, false),
        (RESP, 50, true),
        (RESP + 50, RESP_LEN - 50, true),
        (IN, 300, true),
        (IN + 300, 724, true),
    ]);
    assert_eq!(used, RESP_LEN + 1024);
    assert_eq!(h.resp(used).response, OK);
    assert_eq!(h.guest(IN, 1024), disk.bytes(7 * 512, 1024));
}

#[test]
fn check_conditions_carry_sense() {
    let (mut h, _, _) = hba();
    let (r, _) = h.cmd(lun(3), &rw10(0x2a, 0, 1), &[0; 512], 0);
    assert_eq!((r.response, r.status, r.sense_len), (OK, 2, 18));
    assert_eq!(r.sense, sense::WRITE_PROTECTED.fixed());
    let (r, _) = h.cmd(lun(0), &rw10(0x28, 5000, 1), &[], 512);
    assert_eq!((r.status, r.sense[12]), (2, 0x21));
    let (r, _) = h.cmd(lun(0), &[0xc7; 16], &[], 512);
    assert_eq!((r.status, r.sense[12]), (2, 0x20));
    assert_eq!(r.resid, 512, "nothing transferred");
    assert_eq!(h.counter("check_conditions"), 3);
}

#[test]
fn overrun_when_the_buffer_is_too_short_for_the_transfer() {
    let (mut h, _, _) = hba();
    h.write(IN, &[0xcc; 1024]);
    let (r, data) = h.cmd(lun(0), &rw10(0x28, 0, 4), &[], 1024);
    assert_eq!(r.response, VIRTIO_SCSI_S_OVERRUN as u8);
    assert_eq!((r.resid, r.used), (1024, RESP_LEN));
    assert!(data.iter().all(|&b| b == 0xcc), "nothing was written");
    let (r, _) = h.cmd(lun(0), &rw10(0x2a, 0, 4), &[1; 512], 0);
    assert_eq!((r.response, r.resid), (VIRTIO_SCSI_S_OVERRUN as u8, 512));
    assert_eq!(h.counter("overruns"), 2);
}

#[test]
fn missing_targets_and_luns_are_bad_target() {
    let (mut h, _, _) = hba();
    for l in [
        lun(2),
        lun(200),
        [1, 0, 0x40, 1, 0, 0, 0, 0], // LUN 1
        [0, 0, 0x40, 0, 0, 0, 0, 0], // byte 0 is not 1
        [1, 0, 0x80, 0, 0, 0, 0, 0], // another addressing method
    ] {
        let (r, _) = h.cmd(l, &INQUIRY, &[], 96);
        assert_eq!(r.response, VIRTIO_SCSI_S_BAD_TARGET as u8, "lun {l:?}");
        assert_eq!(r.used, RESP_LEN);
    }
    assert_eq!(h.counter("bad_target"), 5);
}

#[test]
fn short_and_malformed_chains() {
    let (mut h, _, _) = hba();
    h.header(lun(0), &INQUIRY);
    // Header shorter than lun + id + attributes + CDB: FAILURE.
    let used = h.send(&[(REQ, 20, false), (RESP, RESP_LEN, true), (IN, 96, true)]);
    assert_eq!(used, RESP_LEN);
    assert_eq!(h.resp(used).response, VIRTIO_SCSI_S_FAILURE as u8);
    // Writable part too short for the response: as much as fits, no command run.
    let used = h.send(&[(REQ, REQ_LEN, false), (RESP, 11, true)]);
    assert_eq!(used, 11);
    // Only a header, nothing writable: returned with nothing written.
    assert_eq!(h.send(&[(REQ, REQ_LEN, false)]), 0);
    // A readable descriptor after a writable one, and a buffer outside guest memory.
    assert_eq!(h.send(&[(RESP, RESP_LEN, true), (REQ, REQ_LEN, false)]), 0);
    let far = MEM_SIZE as u64 - 8;
    assert_eq!(h.send(&[(REQ, REQ_LEN, false), (far, RESP_LEN, true)]), 0);
    assert_eq!(h.counter("bad_chains"), 2);
    // The device still serves well-formed requests.
    let (r, _) = h.cmd(lun(0), &INQUIRY, &[], 96);
    assert_eq!(r.response, OK);
}

#[test]
fn control_queue_tmf_and_an() {
    let (mut h, _, _) = hba();
    let tmf = |subtype: u32, l: [u8; 8]| {
        let mut r = vec![0u8; 24];
        r[0..4].copy_from_slice(&VIRTIO_SCSI_T_TMF.to_le_bytes());
        r[4..8].copy_from_slice(&subtype.to_le_bytes());
        r[8..16].copy_from_slice(&l);
        r
    };
    let (r, n) = h.control(&tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lun(0)), 1);
    assert_eq!((r[0], n), (OK, 1));
    let (r, _) = h.control(&tmf(VIRTIO_SCSI_T_TMF_LOGICAL_UNIT_RESET, lun(1)), 1);
    assert_eq!(r[0], OK);
    let (r, _) = h.control(&tmf(VIRTIO_SCSI_T_TMF_ABORT_TASK, lun(9)), 1);
    assert_eq!(r[0], VIRTIO_SCSI_S_BAD_TARGET as u8);
    let (r, _) = h.control(&tmf(77, lun(0)), 1);
    assert_eq!(r[0], VIRTIO_SCSI_S_FUNCTION_REJECTED as u8);
    let (r, _) = h.control(&tmf(0, lun(0))[..10], 1);
    assert_eq!(r[0], VIRTIO_SCSI_S_FAILURE as u8, "truncated TMF");
    let mut an = vec![0u8; 16];
    an[0..4].copy_from_slice(&VIRTIO_SCSI_T_AN_QUERY.to_le_bytes());
    an[4..12].copy_from_slice(&lun(1));
    an[12..16].copy_from_slice(&0xffu32.to_le_bytes());
    h.write(RESP, &[0xee; 8]);
    let (r, n) = h.control(&an, 5);
    assert_eq!(
        (&r[..], n),
        (&[0, 0, 0, 0, OK][..], 5),
        "no events supported"
    );
    let (_, n) = h.control(&[9, 0, 0, 0], 5);
    assert_eq!(n, 0, "unknown control type");
    assert_eq!(h.counter("control_requests"), 7);
}

#[test]
fn driver_sizes_cdb_and_sense() {
    let (targets, _, _) = luns();
    let scsi = Scsi::new(ScsiConfig {
        targets,
        ..Default::default()
    })
    .unwrap();
    let d = TestDriver::new(Box::new(scsi));
    d.negotiate(!0);
    // A 16-byte CDB and 18 bytes of sense, set before DRIVER_OK; huge values are capped.
    d.write(crate::virtio::DEVICE_CFG_OFFSET + 24, 4, 16);
    d.write(crate::virtio::DEVICE_CFG_OFFSET + 20, 4, 18);
    d.write(crate::virtio::DEVICE_CFG_OFFSET + 8, 4, 1);
    assert_eq!(d.device_cfg(24, 4), 16);
    assert_eq!(d.device_cfg(8, 4), 0xffff, "max_sectors is read-only");
    let ctl = d.setup_queue(0, 16);
    let _event = d.setup_queue(1, 16);
    let req = d.setup_queue(2, 16);
    d.driver_ok();
    let mut h = Hba { d, ctl, req };
    let (req_len, resp_len) = (19 + 16, 12 + 18);
    h.header(lun(0), &rw10(0x28, 9000, 1));
    let used = h.send(&[
        (REQ, req_len, false),
        (RESP, resp_len, true),
        (IN, 512, true),
    ]);
    assert_eq!(used, resp_len);
    let r = h.guest(RESP, resp_len as usize);
    assert_eq!((r[0], r[10], r[11]), (18, 2, OK));
    assert_eq!(
        (r[12], r[12 + 12]),
        (0x70, 0x21),
        "sense right after the 12-byte header"
    );
    h.d.write(
        crate::virtio::DEVICE_CFG_OFFSET + 24,
        4,
        u64::from(u32::MAX),
    );
    assert_eq!(h.d.device_cfg(24, 4), 256);
}

#[test]
fn media_change_on_a_running_device() {
    let (targets, _, _) = luns();
    let scsi = Scsi::new(ScsiConfig {
        id: "s".into(),
        targets,
        num_queues: 1,
    })
    .unwrap();
    assert!(scsi.cdrom(0).is_none(), "target 0 is a disk");
    assert!(scsi.cdrom(7).is_none());
    let cd = scsi.cdrom(1).unwrap();
    let mut h = setup(scsi);
    assert!(cd.has_media());
    cd.eject(false).unwrap();
    let (r, _) = h.cmd(lun(1), &[0; 6], &[], 0);
    assert_eq!((r.status, r.sense[2], r.sense[12]), (2, 0x02, 0x3a));
    let new = MemImage::new(4 * 2048, true);
    cd.insert(new.clone()).unwrap();
    let (r, _) = h.cmd(lun(1), &[0; 6], &[], 0);
    assert_eq!((r.status, r.sense[2], r.sense[12]), (2, 0x06, 0x28));
    let (r, _) = h.cmd(lun(1), &[0; 6], &[], 0);
    assert_eq!(r.status, 0);
    let (_, cap) = h.cmd(lun(1), &rw10(0x25, 0, 0), &[], 8);
    assert_eq!(cap, [0, 0, 0, 3, 0, 0, 8, 0]);
    // The guest locks the tray: the VMM's eject is refused.
    let (r, _) = h.cmd(lun(1), &[0x1e, 0, 0, 0, 1, 0], &[], 0);
    assert_eq!(r.status, 0);
    assert!(cd.is_locked());
    assert!(cd.eject(false).is_err());
    assert!(cd.eject(true).is_ok());
}

#[test]
fn random_requests_never_break_the_device() {
    let (mut h, _, _) = hba();
    let mut r = XorShift(0xdead_beef_1234_5678);
    let ops = [
        0x00u8, 0x03, 0x12, 0x1a, 0x25, 0x28, 0x2a, 0x43, 0x46, 0x4a, 0x5a, 0x9e, 0xa0,
    ];
    for _ in 0..400 {
        let mut cdb = [0u8; 32];
        for b in cdb.iter_mut() {
            *b = r.next_u64() as u8;
        }
        cdb[0] = ops[r.below(ops.len() as u64) as usize];
        if r.below(2) == 0 {
            cdb[2..6].fill(0);
            cdb[7] = 0;
        }
        let mut l = lun(r.below(4) as u8);
        if r.below(8) == 0 {
            l[2] = r.next_u64() as u8;
        }
        h.header(l, &cdb[..32]);
        let req_len = [REQ_LEN, r.below(u64::from(REQ_LEN) + 1) as u32][r.below(2) as usize];
        let resp_len = [RESP_LEN, r.below(200) as u32][r.below(2) as usize];
        let out_len = r.below(3000) as u32;
        let in_len = r.below(9000) as u32;
        let mut chain = vec![(REQ, req_len, false)];
        if out_len > 0 {
            chain.push((OUT, out_len, false));
        }
        chain.push((RESP, resp_len, true));
        if in_len > 0 {
            chain.push((IN, in_len, true));
        }
        let used = h.send(&chain);
        let writable = resp_len + in_len;
        assert!(used <= writable, "used {used} > writable {writable}");
    }
    assert_eq!(h.d.status() & 0x40, 0, "no NEEDS_RESET");
    let (resp, _) = h.cmd(lun(0), &INQUIRY, &[], 96);
    assert_eq!(resp.response, OK);
}
