//! The SCSI engine on in-memory images: every command, allocation lengths, media changes and
//! hostile CDBs.

use std::sync::{Arc, Mutex};

use rvirt_image::{BlockDevice, BlockStatus, Extent};
use rvirt_testkit::XorShift;

use super::sense::{self, Sense};
use super::*;

/// An image whose byte `i` is `(i / 512) as u8 ^ (i as u8)`, so every block differs.
#[derive(Default)]
pub(crate) struct MemImage {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    fail: bool,
    flushes: Mutex<u32>,
}

impl MemImage {
    pub(crate) fn new(len: usize, read_only: bool) -> Arc<Self> {
        Arc::new(MemImage {
            data: Mutex::new((0..len).map(|i| (i / 512) as u8 ^ i as u8).collect()),
            read_only,
            ..Default::default()
        })
    }

    pub(crate) fn failing(len: usize) -> Arc<Self> {
        Arc::new(MemImage {
            data: Mutex::new(vec![0; len]),
            fail: true,
            ..Default::default()
        })
    }

    pub(crate) fn bytes(&self, at: usize, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[at..at + len].to_vec()
    }

    fn err() -> rvirt_image::Error {
        rvirt_image::Error::io(
            "test",
            std::path::Path::new("mem"),
            std::io::Error::other("injected"),
        )
    }
}

impl BlockDevice for MemImage {
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> rvirt_image::Result<()> {
        if self.fail {
            return Err(Self::err());
        }
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> rvirt_image::Result<()> {
        assert!(!self.read_only, "write reached a read-only image");
        if self.fail {
            return Err(Self::err());
        }
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> rvirt_image::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        if self.fail {
            return Err(Self::err());
        }
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn discard(&self, _: u64, _: u64) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> rvirt_image::Result<Extent> {
        Ok(Extent {
            start: offset,
            length: len,
            status: BlockStatus {
                data: true,
                zero: false,
                offset: None,
                depth: 0,
            },
        })
    }
}

/// A zero-filled image of any size, holding no memory.
pub(crate) struct Huge(pub u64);

impl BlockDevice for Huge {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> rvirt_image::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn flush(&self) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        false
    }
    fn discard(&self, _: u64, _: u64) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> rvirt_image::Result<()> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> rvirt_image::Result<Extent> {
        MemImage::default().block_status(offset, len)
    }
}

const DISK_LEN: usize = 1 << 20; // 2048 blocks of 512
const CD_LEN: usize = 64 * 2048;

fn disk(read_only: bool) -> (ScsiLun, Arc<MemImage>) {
    let img = MemImage::new(DISK_LEN, read_only);
    (ScsiLun::disk(img.clone(), "SER123", false), img)
}

fn cd() -> (ScsiLun, Arc<MemImage>) {
    let img = MemImage::new(CD_LEN, true);
    (ScsiLun::cdrom(Some(img.clone()), "CD1"), img)
}

/// Runs `cdb` with `out` as data-out and room for `cap` bytes of data-in.
fn run_with(lun: &mut ScsiLun, cdb: &[u8], out: &[u8], cap: usize) -> (ScsiResult, Vec<u8>) {
    let mut din = VecDataIn::new(cap);
    let r = lun.execute(cdb, &mut SliceDataOut(out), &mut din);
    assert_eq!(r.data_in, din.data.len() as u64);
    assert!(r.data_in <= cap as u64);
    (r, din.data)
}

fn run(lun: &mut ScsiLun, cdb: &[u8], cap: usize) -> (ScsiResult, Vec<u8>) {
    run_with(lun, cdb, &[], cap)
}

fn good(lun: &mut ScsiLun, cdb: &[u8], cap: usize) -> Vec<u8> {
    let (r, d) = run(lun, cdb, cap);
    assert_eq!(r.status, ScsiStatus::Good, "cdb {cdb:02x?}");
    assert!(!r.overrun);
    d
}

fn check(lun: &mut ScsiLun, cdb: &[u8], want: Sense) {
    let (r, d) = run(lun, cdb, 4096);
    assert_eq!(r.status, ScsiStatus::CheckCondition(want), "cdb {cdb:02x?}");
    assert_eq!(r.status.byte(), sense::CHECK_CONDITION);
    assert!(d.is_empty(), "no data with CHECK CONDITION");
}

fn rw10(opcode: u8, lba: u32, n: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = opcode;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&n.to_be_bytes());
    c
}

fn rw16(opcode: u8, lba: u64, n: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&n.to_be_bytes());
    c
}

fn inquiry(evpd: bool, page: u8, alloc: u16) -> [u8; 6] {
    let a = alloc.to_be_bytes();
    [0x12, u8::from(evpd), page, a[0], a[1], 0]
}

#[test]
fn sense_data_is_fixed_format() {
    let s = sense::LBA_OUT_OF_RANGE.fixed();
    assert_eq!(s[0], 0x70);
    assert_eq!(s[2], 0x05);
    assert_eq!(s[7], 10);
    assert_eq!((s[12], s[13]), (0x21, 0x00));
}

#[test]
fn disk_standard_inquiry_and_allocation_length() {
    let (mut d, _) = disk(false);
    let data = good(&mut d, &inquiry(false, 0, 255), 4096);
    assert_eq!(data.len(), 36);
    assert_eq!(data[0], 0, "direct-access device");
    assert_eq!(data[1] & 0x80, 0, "not removable");
    assert_eq!(&data[8..16], b"QEMU    ");
    assert_eq!(&data[16..32], b"QEMU HARDDISK   ");
    assert_eq!(data[4] as usize + 5, 36);
    // Truncated to the allocation length, then to the buffer.
    assert_eq!(good(&mut d, &inquiry(false, 0, 5), 4096), data[..5]);
    assert_eq!(good(&mut d, &inquiry(false, 0, 255), 3), data[..3]);
    assert!(good(&mut d, &inquiry(false, 0, 0), 4096).is_empty());
    // A page code without EVPD is invalid.
    check(&mut d, &inquiry(false, 0x80, 255), sense::INVALID_FIELD);
}

#[test]
fn disk_vpd_pages() {
    let (mut d, _) = disk(false);
    let list = good(&mut d, &inquiry(true, 0, 255), 4096);
    assert_eq!(&list[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    assert_eq!(list[3] as usize, list.len() - 4);
    let serial = good(&mut d, &inquiry(true, 0x80, 255), 4096);
    assert_eq!((serial[1], &serial[4..]), (0x80, &b"SER123"[..]));
    let id = good(&mut d, &inquiry(true, 0x83, 255), 4096);
    assert_eq!(&id[4..8], &[0x02, 0x00, 0x00, 6]);
    assert_eq!(&id[8..], b"SER123");
    let limits = good(&mut d, &inquiry(true, 0xb0, 255), 4096);
    assert_eq!(limits.len(), 64);
    assert_eq!(limits[8..12], MAX_TRANSFER_BLOCKS.to_be_bytes());
    assert_eq!(good(&mut d, &inquiry(true, 0xb1, 255), 4096).len(), 64);
    assert_eq!(good(&mut d, &inquiry(true, 0xb2, 255), 4096).len(), 8);
    check(&mut d, &inquiry(true, 0x99, 255), sense::INVALID_FIELD);
    // Without a serial there is no page 0x80.
    let mut d = ScsiLun::disk(MemImage::new(4096, false), "", false);
    assert_eq!(
        &good(&mut d, &inquiry(true, 0, 255), 4096)[4..],
        &[0x00, 0x83, 0xb0, 0xb1, 0xb2]
    );
    check(&mut d, &inquiry(true, 0x80, 255), sense::INVALID_FIELD);
}

#[test]
fn disk_read_capacity() {
    let (mut d, _) = disk(false);
    let c = good(&mut d, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 4096);
    assert_eq!(c, [0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let mut c16 = [0u8; 16];
    c16[0] = 0x9e;
    c16[1] = 0x10;
    c16[13] = 32;
    let c = good(&mut d, &c16, 4096);
    assert_eq!(c.len(), 32);
    assert_eq!(c[0..8], 2047u64.to_be_bytes());
    assert_eq!(c[8..12], 512u32.to_be_bytes());
    c16[13] = 12;
    assert_eq!(good(&mut d, &c16, 4096).len(), 12, "allocation length");
    c16[1] = 0x11;
    check(&mut d, &c16, sense::INVALID_FIELD);
}

#[test]
fn disk_reads_match_the_image() {
    let (mut d, img) = disk(false);
    let want = img.bytes(5 * 512, 3 * 512);
    assert_eq!(good(&mut d, &[0x08, 0, 0, 5, 3, 0], 4096), want, "READ(6)");
    assert_eq!(good(&mut d, &rw10(0x28, 5, 3), 4096), want, "READ(10)");
    let mut c12 = [0u8; 12];
    c12[0] = 0xa8;
    c12[5] = 5;
    c12[9] = 3;
    assert_eq!(good(&mut d, &c12, 4096), want, "READ(12)");
    assert_eq!(good(&mut d, &rw16(0x88, 5, 3), 4096), want, "READ(16)");
    // A whole-disk read crosses several bounce-buffer chunks.
    let all = good(&mut d, &rw10(0x28, 0, 2048), DISK_LEN);
    assert_eq!(all, img.bytes(0, DISK_LEN));
    // READ(6) length 0 means 256 blocks; READ(10) length 0 moves nothing.
    assert_eq!(
        good(&mut d, &[0x08, 0, 0, 0, 0, 0], DISK_LEN).len(),
        256 * 512
    );
    assert!(good(&mut d, &rw10(0x28, 0, 0), 4096).is_empty());
}

#[test]
fn disk_write_then_read_back() {
    let (mut d, img) = disk(false);
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7) as u8).collect();
    let (r, _) = run_with(&mut d, &rw10(0x2a, 10, 2), &data, 0);
    assert_eq!((r.status, r.data_out), (ScsiStatus::Good, 1024));
    assert_eq!(img.bytes(10 * 512, 1024), data);
    assert_eq!(good(&mut d, &rw10(0x28, 10, 2), 4096), data);
    let (r, _) = run_with(&mut d, &rw16(0x8a, 2047, 1), &data[..512], 0);
    assert_eq!(r.status, ScsiStatus::Good);
    assert_eq!(img.bytes(2047 * 512, 512), data[..512]);
    let (r, _) = run_with(&mut d, &[0x0a, 0, 0, 1, 1, 0], &data[512..], 0);
    assert_eq!(r.status, ScsiStatus::Good, "WRITE(6)");
    assert_eq!(img.bytes(512, 512), data[512..]);
    // Too little data-out for the transfer length: an overrun, nothing written.
    let before = img.bytes(20 * 512, 1024);
    let (r, _) = run_with(&mut d, &rw10(0x2a, 20, 2), &data[..700], 0);
    assert!(r.overrun);
    assert_eq!(r.data_out, 0);
    assert_eq!(img.bytes(20 * 512, 1024), before);
}

#[test]
fn read_only_disk_refuses_writes() {
    let (mut d, _) = disk(true);
    let data = vec![0u8; 512];
    for cdb in [
        &rw10(0x2a, 0, 1)[..],
        &rw16(0x8a, 0, 1),
        &[0x0a, 0, 0, 0, 1, 0],
    ] {
        let (r, _) = run_with(&mut d, cdb, &data, 0);
        assert_eq!(r.status, ScsiStatus::CheckCondition(sense::WRITE_PROTECTED));
        assert_eq!(r.data_out, 0);
    }
    // The image's assert_write would have panicked if a write reached it. MODE SENSE says WP.
    let m = good(&mut d, &[0x1a, 0, 0x3f, 0, 255, 0], 4096);
    assert_eq!(m[2] & 0x80, 0x80);
    let mut rw = ScsiLun::disk(MemImage::new(4096, false), "", true);
    let (r, _) = run_with(&mut rw, &rw10(0x2a, 0, 1), &data, 0);
    assert_eq!(r.status, ScsiStatus::CheckCondition(sense::WRITE_PROTECTED));
}

#[test]
fn out_of_range_and_overrun() {
    let (mut d, _) = disk(false);
    check(&mut d, &rw10(0x28, 2048, 1), sense::LBA_OUT_OF_RANGE);
    check(&mut d, &rw10(0x28, 2047, 2), sense::LBA_OUT_OF_RANGE);
    check(
        &mut d,
        &rw10(0x28, u32::MAX, 0xffff),
        sense::LBA_OUT_OF_RANGE,
    );
    check(
        &mut d,
        &rw16(0x88, u64::MAX, u32::MAX),
        sense::LBA_OUT_OF_RANGE,
    );
    check(&mut d, &rw16(0x88, 0, u32::MAX), sense::LBA_OUT_OF_RANGE);
    check(
        &mut d,
        &rw16(0x8a, u64::MAX - 1, 2),
        sense::LBA_OUT_OF_RANGE,
    );
    check(&mut d, &rw10(0x2f, 2040, 9), sense::LBA_OUT_OF_RANGE);
    check(&mut d, &rw10(0x35, 4000, 1), sense::LBA_OUT_OF_RANGE);
    // In range but the buffer is too small: nothing is transferred.
    let (r, data) = run(&mut d, &rw10(0x28, 0, 4), 1024);
    assert!(r.overrun);
    assert!(data.is_empty());
}

#[test]
fn disk_misc_commands() {
    let (mut d, img) = disk(false);
    assert!(good(&mut d, &[0; 6], 0).is_empty(), "TEST UNIT READY");
    good(&mut d, &rw10(0x35, 0, 0), 0);
    good(&mut d, &rw16(0x91, 0, 0), 0);
    assert_eq!(*img.flushes.lock().unwrap(), 2, "SYNCHRONIZE CACHE flushes");
    good(&mut d, &rw10(0x2f, 0, 16), 0);
    check(
        &mut d,
        &[0x2f, 0x02, 0, 0, 0, 0, 0, 0, 1, 0],
        sense::INVALID_FIELD,
    );
    good(&mut d, &[0x1b, 0, 0, 0, 0x01, 0], 0);
    good(&mut d, &[0x1e, 0, 0, 0, 0x01, 0], 0);
    let s = good(&mut d, &[0x03, 0, 0, 0, 252, 0], 4096);
    assert_eq!(s, sense::NO_SENSE.fixed());
    check(&mut d, &[0x03, 0x01, 0, 0, 252, 0], sense::INVALID_FIELD);
    let mut rl = [0u8; 12];
    rl[0] = 0xa0;
    rl[9] = 16;
    assert_eq!(
        good(&mut d, &rl, 4096),
        [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    rl[9] = 15;
    check(&mut d, &rl, sense::INVALID_FIELD);
}

#[test]
fn disk_mode_sense() {
    let (mut d, _) = disk(false);
    let m = good(&mut d, &[0x1a, 0, 0x08, 0, 255, 0], 4096);
    assert_eq!(m.len(), 4 + 8 + 20);
    assert_eq!(m[0] as usize, m.len() - 1);
    assert_eq!((m[2], m[3]), (0, 8), "writable, one block descriptor");
    assert_eq!(m[10..12], [2, 0], "512-byte blocks");
    assert_eq!(
        (m[12], m[13], m[14] & 0x04),
        (0x08, 18, 0x04),
        "caching page, WCE"
    );
    let m = good(&mut d, &[0x1a, 0x08, 0x0a, 0, 255, 0], 4096);
    assert_eq!(m.len(), 4 + 12, "DBD drops the block descriptor");
    assert_eq!(m[4], 0x0a);
    let m = good(&mut d, &[0x5a, 0, 0x3f, 0, 0, 0, 0, 0x10, 0, 0], 4096);
    assert_eq!(m.len(), 8 + 8 + 20 + 12);
    assert_eq!(u16::from_be_bytes([m[0], m[1]]) as usize, m.len() - 2);
    assert_eq!(m[7], 8);
    assert_eq!(good(&mut d, &[0x1a, 0, 0x3f, 0, 7, 0], 4096).len(), 7);
    // Changeable values: all zero.
    let m = good(&mut d, &[0x1a, 0x08, 0x48, 0, 255, 0], 4096);
    assert_eq!(m[4..6], [0x08, 18]);
    assert!(m[6..].iter().all(|&b| b == 0));
    check(
        &mut d,
        &[0x1a, 0, 0xc8, 0, 255, 0],
        sense::SAVING_NOT_SUPPORTED,
    );
    check(&mut d, &[0x1a, 0, 0x2a, 0, 255, 0], sense::INVALID_FIELD);
    check(&mut d, &[0x1a, 0, 0x08, 1, 255, 0], sense::INVALID_FIELD);
}

#[test]
fn bad_opcodes_and_short_cdbs() {
    let (mut d, _) = disk(false);
    let (mut c, _) = cd();
    for lun in [&mut d, &mut c] {
        check(lun, &[0x02, 0, 0, 0, 0, 0], sense::INVALID_OPCODE);
        check(lun, &[0xc0; 16], sense::INVALID_OPCODE);
        check(lun, &[0x7f; 16], sense::INVALID_OPCODE);
        check(lun, &[0x28, 0, 0, 0], sense::INVALID_FIELD);
        check(lun, &[0x88; 12], sense::INVALID_FIELD);
        check(lun, &[], sense::INVALID_FIELD);
    }
    check(&mut d, &rw10(0x43, 0, 0), sense::INVALID_OPCODE);
}

#[test]
fn io_errors_are_medium_errors() {
    let img = MemImage::failing(DISK_LEN);
    let mut d = ScsiLun::disk(img, "", false);
    check(&mut d, &rw10(0x28, 0, 1), sense::READ_ERROR);
    let (r, _) = run_with(&mut d, &rw10(0x2a, 0, 1), &[0; 512], 0);
    assert_eq!(r.status, ScsiStatus::CheckCondition(sense::WRITE_ERROR));
    check(&mut d, &rw10(0x35, 0, 0), sense::WRITE_ERROR);
}

fn toc(msf: bool, format: u8, track: u8) -> [u8; 10] {
    [
        0x43,
        if msf { 2 } else { 0 },
        format,
        0,
        0,
        0,
        track,
        0,
        255,
        0,
    ]
}

#[test]
fn cdrom_identity_capacity_and_reads() {
    let (mut c, img) = cd();
    let inq = good(&mut c, &inquiry(false, 0, 96), 4096);
    assert_eq!((inq[0], inq[1]), (5, 0x80), "CD/DVD, removable");
    assert_eq!(&inq[16..32], b"QEMU CD-ROM     ");
    assert_eq!(
        &good(&mut c, &inquiry(true, 0, 255), 4096)[4..],
        &[0, 0x80, 0x83]
    );
    check(&mut c, &inquiry(true, 0xb0, 255), sense::INVALID_FIELD);
    good(&mut c, &[0; 6], 0);
    let cap = good(&mut c, &rw10(0x25, 0, 0), 4096);
    assert_eq!(cap, [0, 0, 0, 63, 0, 0, 8, 0]);
    assert_eq!(
        good(&mut c, &rw10(0x28, 3, 2), 8192),
        img.bytes(3 * 2048, 4096)
    );
    let mut c12 = [0u8; 12];
    c12[0] = 0xa8;
    c12[5] = 63;
    c12[9] = 1;
    assert_eq!(good(&mut c, &c12, 8192), img.bytes(63 * 2048, 2048));
    check(&mut c, &rw10(0x28, 63, 2), sense::LBA_OUT_OF_RANGE);
    check(&mut c, &rw10(0x2a, 0, 1), sense::WRITE_PROTECTED);
    check(&mut c, &rw16(0x88, 0, 1), sense::INVALID_OPCODE);
    good(&mut c, &[0xbb, 0, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0], 0);
}

#[test]
fn cdrom_toc() {
    let (mut c, _) = cd();
    let t = good(&mut c, &toc(false, 0, 0), 4096);
    assert_eq!(t.len(), 4 + 16);
    assert_eq!(u16::from_be_bytes([t[0], t[1]]), 18);
    assert_eq!(t[2..4], [1, 1]);
    assert_eq!(t[4..12], [0, 0x14, 1, 0, 0, 0, 0, 0]);
    assert_eq!(
        t[12..20],
        [0, 0x14, 0xaa, 0, 0, 0, 0, 64],
        "lead-out at the capacity"
    );
    let t = good(&mut c, &toc(true, 0, 1), 4096);
    assert_eq!(t[8..12], [0, 0, 2, 0], "track 1 at 00:02:00");
    assert_eq!(t[16..20], [0, 0, 2, 64], "lead-out at 150 + 64 frames");
    let t = good(&mut c, &toc(false, 0, 0xaa), 4096);
    assert_eq!((t.len(), t[6]), (12, 0xaa));
    check(&mut c, &toc(false, 0, 2), sense::INVALID_FIELD);
    let t = good(&mut c, &toc(false, 1, 0), 4096);
    assert_eq!(t, [0, 10, 1, 1, 0, 0x14, 1, 0, 0, 0, 0, 0]);
    check(&mut c, &toc(false, 2, 0), sense::INVALID_FIELD);
    let mut short = toc(false, 0, 0);
    short[8] = 4;
    assert_eq!(good(&mut c, &short, 4096).len(), 4);
}

fn get_config(rt: u8, start: u16, alloc: u16) -> [u8; 10] {
    let s = start.to_be_bytes();
    let a = alloc.to_be_bytes();
    [0x46, rt, s[0], s[1], 0, 0, 0, a[0], a[1], 0]
}

#[test]
fn cdrom_get_configuration_profiles() {
    let (mut c, _) = cd();
    let g = good(&mut c, &get_config(0, 0, 1024), 4096);
    assert_eq!(
        u32::from_be_bytes([g[0], g[1], g[2], g[3]]) as usize,
        g.len() - 4
    );
    assert_eq!(g[6..8], [0, 0x08], "current profile CD-ROM");
    // Profile list: DVD-ROM not current, CD-ROM current.
    assert_eq!(g[8..12], [0, 0, 0x03, 8]);
    assert_eq!(g[12..20], [0, 0x10, 0, 0, 0, 0x08, 1, 0]);
    let codes: Vec<u16> = {
        let mut v = Vec::new();
        let mut at = 8;
        while at + 4 <= g.len() {
            v.push(u16::from_be_bytes([g[at], g[at + 1]]));
            at += 4 + g[at + 3] as usize;
        }
        v
    };
    assert_eq!(codes, [0, 1, 2, 3]);
    let one = good(&mut c, &get_config(2, 3, 1024), 4096);
    assert_eq!((one.len(), one[9]), (8 + 8, 3));
    assert_eq!(good(&mut c, &get_config(0, 0, 8), 4096).len(), 8);
    check(&mut c, &get_config(3, 0, 8), sense::INVALID_FIELD);
    // A DVD-sized image is a DVD-ROM; an empty drive has no current profile.
    let mut dvd = ScsiLun::cdrom(Some(Arc::new(Huge(400_000 * 2048))), "");
    assert_eq!(good(&mut dvd, &get_config(0, 0, 8), 4096)[6..8], [0, 0x10]);
    let mut empty = ScsiLun::cdrom(None, "");
    let g = good(&mut empty, &get_config(1, 0, 1024), 4096);
    assert_eq!(g[6..8], [0, 0]);
    assert_eq!(g[12..20], [0, 0x10, 0, 0, 0, 0x08, 0, 0]);
}

fn gesn(alloc: u16) -> [u8; 10] {
    let a = alloc.to_be_bytes();
    [0x4a, 1, 0, 0, 0x10, 0, 0, a[0], a[1], 0]
}

#[test]
fn cdrom_media_change_cycle() {
    let mut c = ScsiLun::cdrom(None, "");
    check(&mut c, &[0; 6], sense::MEDIUM_NOT_PRESENT);
    check(&mut c, &rw10(0x25, 0, 0), sense::MEDIUM_NOT_PRESENT);
    check(&mut c, &rw10(0x28, 0, 1), sense::MEDIUM_NOT_PRESENT);
    check(&mut c, &toc(false, 0, 0), sense::MEDIUM_NOT_PRESENT);
    check(
        &mut c,
        &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0],
        sense::MEDIUM_NOT_PRESENT,
    );
    let s = good(&mut c, &[0x03, 0, 0, 0, 18, 0], 4096);
    assert_eq!(
        (s[2], s[12]),
        (0x02, 0x3a),
        "REQUEST SENSE reports no medium"
    );
    assert_eq!(
        good(&mut c, &gesn(8), 4096)[4..6],
        [0, 0],
        "no event, no media"
    );
    let mech = good(&mut c, &[0xbd, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0, 0], 4096);
    assert_eq!(mech[1] & 0x10, 0x10, "door open");

    let img = MemImage::new(CD_LEN, true);
    let cdrom = c.as_cdrom_mut().unwrap();
    cdrom.insert(img.clone()).unwrap();
    assert!(cdrom.has_media());
    // GESN is exempt from the unit attention and reports the new disc once.
    assert_eq!(good(&mut c, &gesn(8), 4096), [0, 6, 4, 0x10, 2, 2, 0, 0]);
    assert_eq!(good(&mut c, &gesn(8), 4096)[4..6], [0, 2]);
    good(&mut c, &inquiry(false, 0, 36), 4096);
    check(&mut c, &[0; 6], sense::MEDIUM_CHANGED);
    good(&mut c, &[0; 6], 0);
    assert_eq!(good(&mut c, &rw10(0x28, 1, 1), 2048), img.bytes(2048, 2048));

    // Locked: START STOP UNIT eject and the VMM's eject are refused; force works.
    good(&mut c, &[0x1e, 0, 0, 0, 1, 0], 0);
    assert!(c.as_cdrom_mut().unwrap().is_locked());
    check(&mut c, &[0x1b, 0, 0, 0, 0x02, 0], sense::REMOVAL_PREVENTED);
    assert_eq!(c.as_cdrom_mut().unwrap().eject(false), Err(Locked));
    assert_eq!(good(&mut c, &gesn(8), 4096)[4], 1, "eject request event");
    assert_eq!(c.as_cdrom_mut().unwrap().insert(img.clone()), Err(Locked));
    let m = good(&mut c, &[0x1a, 0, 0x2a, 0, 255, 0], 4096);
    assert_eq!(m[4 + 6] & 0x02, 0x02, "capabilities page shows the lock");
    good(&mut c, &[0x1e, 0, 0, 0, 0, 0], 0);
    // Unlocked: the guest ejects.
    good(&mut c, &[0x1b, 0, 0, 0, 0x02, 0], 0);
    assert!(!c.as_cdrom_mut().unwrap().has_media());
    assert_eq!(good(&mut c, &gesn(8), 4096)[4..6], [3, 0], "media removal");
    check(&mut c, &[0; 6], sense::MEDIUM_NOT_PRESENT);
    // Force eject of a locked drive.
    c.as_cdrom_mut().unwrap().insert(img).unwrap();
    check(&mut c, &[0x1e, 0, 0, 0, 1, 0], sense::MEDIUM_CHANGED);
    good(&mut c, &[0x1e, 0, 0, 0, 1, 0], 4096);
    let cd = c.as_cdrom_mut().unwrap();
    assert_eq!(cd.eject(true), Ok(()));
    assert!(!cd.has_media());
}

#[test]
fn cdrom_gesn_needs_polling_and_nea() {
    let (mut c, _) = cd();
    check(
        &mut c,
        &[0x4a, 0, 0, 0, 0x10, 0, 0, 0, 8, 0],
        sense::INVALID_FIELD,
    );
    let g = good(&mut c, &[0x4a, 1, 0, 0, 0x02, 0, 0, 0, 8, 0], 4096);
    assert_eq!(g, [0, 2, 0x80, 0x10], "no supported class requested: NEA");
}

#[test]
fn cdrom_mode_sense_disc_and_track_info() {
    let (mut c, _) = cd();
    let m = good(&mut c, &[0x5a, 0, 0x2a, 0, 0, 0, 0, 0, 255, 0], 4096);
    assert_eq!(m.len(), 8 + 22);
    assert_eq!(m[6..8], [0, 0], "no block descriptors");
    assert_eq!((m[8], m[9]), (0x2a, 20));
    assert_eq!(m[8 + 6] & 0x29, 0x29, "tray, eject, lock");
    check(&mut c, &[0x1a, 0, 0x08, 0, 255, 0], sense::INVALID_FIELD);
    let di = good(&mut c, &[0x51, 0, 0, 0, 0, 0, 0, 0, 34, 0], 4096);
    assert_eq!((di.len(), di[2] & 0x03, di[3], di[4]), (34, 2, 1, 1));
    check(
        &mut c,
        &[0x51, 1, 0, 0, 0, 0, 0, 0, 34, 0],
        sense::INVALID_FIELD,
    );
    let ti = good(&mut c, &[0x52, 1, 0, 0, 0, 1, 0, 0, 36, 0], 4096);
    assert_eq!(
        (ti.len(), ti[2], ti[24..28].to_vec()),
        (36, 1, vec![0, 0, 0, 64])
    );
    good(&mut c, &[0x52, 0, 0, 0, 0, 63, 0, 0, 36, 0], 4096);
    check(
        &mut c,
        &[0x52, 0, 0, 0, 0, 64, 0, 0, 36, 0],
        sense::INVALID_FIELD,
    );
    check(
        &mut c,
        &[0x52, 1, 0, 0, 0, 2, 0, 0, 36, 0],
        sense::INVALID_FIELD,
    );
}

#[test]
fn random_cdbs_never_panic() {
    let mut r = XorShift(0x5c51_d15c_0ffe_e123);
    let (mut d, _) = disk(false);
    let (mut c, _) = cd();
    let mut empty = ScsiLun::cdrom(None, "x");
    let ops = [
        0x00, 0x03, 0x08, 0x0a, 0x12, 0x1a, 0x1b, 0x1e, 0x25, 0x28, 0x2a, 0x2f, 0x35, 0x43, 0x46,
        0x4a, 0x51, 0x52, 0x5a, 0x88, 0x8a, 0x8f, 0x91, 0x9e, 0xa0, 0xa8, 0xaa, 0xbb, 0xbd,
    ];
    let out = vec![0x5au8; 8192];
    for i in 0..30_000u32 {
        let len = r.below(20) as usize;
        let mut cdb: Vec<u8> = (0..len).map(|_| r.next_u64() as u8).collect();
        if let Some(b) = cdb.first_mut() {
            if r.below(4) > 0 {
                *b = ops[r.below(ops.len() as u64) as usize];
            }
        }
        // Small lengths and LBAs now and then, so some commands get past the range checks.
        if cdb.len() >= 10 && r.below(2) == 0 {
            cdb[2..6].fill(0);
            cdb[7] = 0;
        }
        let cap = r.below(9000) as usize;
        let out_len = r.below(8193) as usize;
        let lun = match i % 3 {
            0 => &mut d,
            1 => &mut c,
            _ => &mut empty,
        };
        let (res, _) = run_with(lun, &cdb, &out[..out_len], cap);
        assert!(res.data_out <= out_len as u64);
        if let ScsiStatus::CheckCondition(s) = res.status {
            assert_ne!(s.key, 0, "CHECK CONDITION without a sense key");
            assert_eq!(res.data_in, 0);
        }
        if i % 1000 == 0 {
            // Media operations in between must not upset anything either.
            let cd = c.as_cdrom_mut().unwrap();
            if cd.eject(r.below(2) == 0).is_ok() {
                let _ = cd.insert(MemImage::new(CD_LEN, true));
            }
        }
    }
}

#[test]
fn disks_beyond_two_terabytes_need_read_capacity_16() {
    let blocks = (3u64 << 40) / 512;
    let mut d = ScsiLun::disk(Arc::new(Huge(blocks * 512)), "", false);
    let c = good(&mut d, &rw10(0x25, 0, 0), 8);
    assert_eq!(
        c[0..4],
        [0xff; 4],
        "RC(10) saturates: the driver must use RC(16)"
    );
    let mut c16 = [0u8; 16];
    c16[0] = 0x9e;
    c16[1] = 0x10;
    c16[13] = 32;
    assert_eq!(good(&mut d, &c16, 32)[0..8], (blocks - 1).to_be_bytes());
    // A read near the end of a huge disk works; a 4 GiB transfer into a small buffer does not
    // allocate anything: it is an overrun.
    assert_eq!(
        good(&mut d, &rw16(0x88, blocks - 2, 2), 1024),
        vec![0; 1024]
    );
    let (r, data) = run(&mut d, &rw16(0x88, 0, u32::MAX), 4096);
    assert!(r.overrun && data.is_empty());
}
