//! A transport-independent SCSI command engine: a direct-access disk ([`ScsiDisk`], SBC) and an
//! MMC CD/DVD-ROM drive ([`ScsiCdrom`]) over [`rvirt_image::BlockDevice`]s. virtio-scsi uses it
//! today; an AHCI ATAPI port can hand it its packet commands the same way.
//!
//! A transport calls [`ScsiLun::execute`] with the CDB and two streams: [`DataOut`] (bytes
//! from the initiator, e.g. a WRITE's data) and [`DataIn`] (bytes to it). The engine moves data
//! in chunks of at most [`MAX_CHUNK`] bytes, so no guest-supplied length ever sizes an
//! allocation. Failures come back as CHECK CONDITION with fixed-format sense data; nothing a
//! CDB contains can make it panic.

mod cdrom;
mod disk;
pub mod sense;

use std::sync::Arc;

use rvirt_image::BlockDevice;

pub use self::cdrom::{Locked, ScsiCdrom, CD_BLOCK_SIZE};
pub use self::disk::{ScsiDisk, DISK_BLOCK_SIZE};
use self::sense::Sense;

/// The most bytes the engine moves through its bounce buffer at once.
pub const MAX_CHUNK: usize = 256 << 10;
/// Most blocks one READ/WRITE may move (reported as the block-limits maximum transfer length).
pub const MAX_TRANSFER_BLOCKS: u32 = 0xffff;

/// The initiator's buffer could not be accessed (e.g. guest memory vanished under it).
#[derive(Debug, thiserror::Error)]
#[error("SCSI data buffer is not accessible")]
pub struct TransferError;

/// Data flowing from the initiator to the device (WRITE, MODE SELECT, ...).
pub trait DataOut {
    /// Bytes the initiator still offers.
    fn remaining(&self) -> u64;
    /// Fills all of `buf` with the next bytes; fails if fewer than `buf.len()` remain.
    fn read(&mut self, buf: &mut [u8]) -> Result<(), TransferError>;
}

/// Data flowing from the device to the initiator (READ, INQUIRY, ...).
pub trait DataIn {
    /// Bytes the initiator can still take.
    fn remaining(&self) -> u64;
    /// Appends all of `buf`; fails if fewer than `buf.len()` bytes of room remain.
    fn write(&mut self, buf: &[u8]) -> Result<(), TransferError>;
}

/// An empty data stream (commands without data, or a transport that has none).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoData;

impl DataOut for NoData {
    fn remaining(&self) -> u64 {
        0
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(TransferError)
        }
    }
}

impl DataIn for NoData {
    fn remaining(&self) -> u64 {
        0
    }
    fn write(&mut self, buf: &[u8]) -> Result<(), TransferError> {
        if buf.is_empty() {
            Ok(())
        } else {
            Err(TransferError)
        }
    }
}

/// Data-in collected in memory, up to a fixed capacity (a transport's bounce buffer, tests).
#[derive(Clone, Debug, Default)]
pub struct VecDataIn {
    pub data: Vec<u8>,
    capacity: usize,
}

impl VecDataIn {
    /// Room for `capacity` bytes; memory grows only as data arrives.
    pub fn new(capacity: usize) -> Self {
        VecDataIn {
            data: Vec::new(),
            capacity,
        }
    }
}

impl DataIn for VecDataIn {
    fn remaining(&self) -> u64 {
        (self.capacity - self.data.len()) as u64
    }
    fn write(&mut self, buf: &[u8]) -> Result<(), TransferError> {
        if buf.len() > self.capacity - self.data.len() {
            return Err(TransferError);
        }
        self.data.extend_from_slice(buf);
        Ok(())
    }
}

/// Data-out from a byte slice.
#[derive(Clone, Copy, Debug)]
pub struct SliceDataOut<'a>(pub &'a [u8]);

impl DataOut for SliceDataOut<'_> {
    fn remaining(&self) -> u64 {
        self.0.len() as u64
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<(), TransferError> {
        if buf.len() > self.0.len() {
            return Err(TransferError);
        }
        let (head, tail) = self.0.split_at(buf.len());
        buf.copy_from_slice(head);
        self.0 = tail;
        Ok(())
    }
}

/// How a command ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScsiStatus {
    /// GOOD.
    Good,
    /// CHECK CONDITION with this sense.
    CheckCondition(Sense),
}

impl ScsiStatus {
    /// The SCSI status byte.
    pub fn byte(&self) -> u8 {
        match self {
            ScsiStatus::Good => sense::GOOD,
            ScsiStatus::CheckCondition(_) => sense::CHECK_CONDITION,
        }
    }

    /// Sense data for CHECK CONDITION.
    pub fn sense(&self) -> Option<Sense> {
        match self {
            ScsiStatus::Good => None,
            ScsiStatus::CheckCondition(s) => Some(*s),
        }
    }
}

/// The result of one command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScsiResult {
    pub status: ScsiStatus,
    /// Bytes written to the data-in stream.
    pub data_in: u64,
    /// Bytes consumed from the data-out stream.
    pub data_out: u64,
    /// The transfer (READ/WRITE) needs more bytes than the initiator's buffers hold: nothing was
    /// transferred and the transport reports an overrun (virtio-scsi: VIRTIO_SCSI_S_OVERRUN).
    pub overrun: bool,
}

/// Why a command stopped (internal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fail {
    Check(Sense),
    Overrun,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Self {
        Fail::Check(s)
    }
}

type CmdResult = Result<(), Fail>;

/// A logical unit.
#[allow(clippy::large_enum_variant)]
pub enum ScsiLun {
    Disk(ScsiDisk),
    Cdrom(ScsiCdrom),
}

impl std::fmt::Debug for ScsiLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScsiLun::Disk(d) => f.debug_tuple("Disk").field(d).finish(),
            ScsiLun::Cdrom(c) => f.debug_tuple("Cdrom").field(c).finish(),
        }
    }
}

impl ScsiLun {
    /// A disk over `image`; read-only if asked or if the image is.
    pub fn disk(image: Arc<dyn BlockDevice>, serial: &str, read_only: bool) -> Self {
        ScsiLun::Disk(ScsiDisk::new(image, serial, read_only))
    }

    /// A CD-ROM drive, empty or with a disc.
    pub fn cdrom(media: Option<Arc<dyn BlockDevice>>, serial: &str) -> Self {
        ScsiLun::Cdrom(ScsiCdrom::new(media, serial))
    }

    /// Runs one command. `cdb` is the whole CDB buffer (it may be longer than the opcode needs,
    /// as virtio-scsi's fixed-size field is).
    pub fn execute(
        &mut self,
        cdb: &[u8],
        data_out: &mut dyn DataOut,
        data_in: &mut dyn DataIn,
    ) -> ScsiResult {
        let (in_before, out_before) = (data_in.remaining(), data_out.remaining());
        let result = match cdb_len(cdb) {
            Err(s) => Err(Fail::Check(s)),
            Ok(n) => {
                let cdb = &cdb[..n];
                match self {
                    ScsiLun::Disk(d) => d.execute(cdb, data_out, data_in),
                    ScsiLun::Cdrom(c) => c.execute(cdb, data_out, data_in),
                }
            }
        };
        let (status, overrun) = match result {
            Ok(()) => (ScsiStatus::Good, false),
            Err(Fail::Check(s)) => (ScsiStatus::CheckCondition(s), false),
            Err(Fail::Overrun) => (ScsiStatus::Good, true),
        };
        ScsiResult {
            status,
            data_in: in_before.saturating_sub(data_in.remaining()),
            data_out: out_before.saturating_sub(data_out.remaining()),
            overrun,
        }
    }

    /// The CD-ROM drive, for media changes.
    pub fn as_cdrom_mut(&mut self) -> Option<&mut ScsiCdrom> {
        match self {
            ScsiLun::Cdrom(c) => Some(c),
            ScsiLun::Disk(_) => None,
        }
    }

    /// The SPC peripheral device type (0 disk, 5 CD/DVD).
    pub fn peripheral_type(&self) -> u8 {
        match self {
            ScsiLun::Disk(_) => 0,
            ScsiLun::Cdrom(_) => 5,
        }
    }
}

/// Opcodes (SPC/SBC/MMC) this engine knows.
pub(crate) mod op {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_TOC: u8 = 0x43;
    pub const GET_CONFIGURATION: u8 = 0x46;
    pub const GET_EVENT_STATUS: u8 = 0x4a;
    pub const READ_DISC_INFO: u8 = 0x51;
    pub const READ_TRACK_INFO: u8 = 0x52;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const SET_CD_SPEED: u8 = 0xbb;
    pub const MECHANISM_STATUS: u8 = 0xbd;
    /// SERVICE ACTION IN(16) service action for READ CAPACITY(16).
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
}

/// The CDB length the opcode's group implies; groups 3 (variable length), 6 and 7 (vendor
/// specific) are not supported.
fn cdb_len(cdb: &[u8]) -> Result<usize, Sense> {
    let opcode = *cdb.first().ok_or(sense::INVALID_FIELD)?;
    let need = match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => return Err(sense::INVALID_OPCODE),
    };
    if cdb.len() < need {
        return Err(sense::INVALID_FIELD);
    }
    Ok(need)
}

/// Big-endian field of `n` bytes at `at` (0 when outside the CDB; callers check the length).
fn be(cdb: &[u8], at: usize, n: usize) -> u64 {
    (at..at + n).fold(0u64, |v, i| {
        (v << 8) | u64::from(cdb.get(i).copied().unwrap_or(0))
    })
}

/// Sends `data`, truncated to the allocation length and to the initiator's buffer.
fn respond(din: &mut dyn DataIn, data: &[u8], alloc: u64) -> CmdResult {
    let n = (data.len() as u64).min(alloc).min(din.remaining()) as usize;
    // The buffer was sized by `remaining`: a failure here means the memory vanished.
    din.write(&data[..n])
        .map_err(|_| Fail::Check(sense::READ_ERROR))
}

/// (LBA, blocks) of a READ/WRITE/VERIFY/SYNCHRONIZE CACHE CDB.
fn lba_and_len(cdb: &[u8]) -> (u64, u64) {
    match cdb[0] {
        op::READ_6 | op::WRITE_6 => {
            let lba = be(cdb, 1, 3) & 0x1f_ffff;
            let n = be(cdb, 4, 1);
            // A length of 0 means 256 blocks for the 6-byte commands only.
            (lba, if n == 0 { 256 } else { n })
        }
        op::READ_12 | op::WRITE_12 => (be(cdb, 2, 4), be(cdb, 6, 4)),
        op::READ_16 | op::WRITE_16 | op::VERIFY_16 | op::SYNC_CACHE_16 => {
            (be(cdb, 2, 8), be(cdb, 10, 4))
        }
        _ => (be(cdb, 2, 4), be(cdb, 7, 2)),
    }
}

/// Checks `blocks` from `lba` against a capacity of `capacity` blocks.
fn check_range(lba: u64, blocks: u64, capacity: u64) -> CmdResult {
    match lba.checked_add(blocks) {
        Some(end) if end <= capacity && lba <= capacity => Ok(()),
        _ => Err(sense::LBA_OUT_OF_RANGE.into()),
    }
}

/// Reads `blocks` × `bs` bytes at block `lba` into `din` through `buf`, in bounded chunks.
fn read_blocks(
    image: &dyn BlockDevice,
    buf: &mut Vec<u8>,
    din: &mut dyn DataIn,
    (lba, blocks, bs): (u64, u64, u64),
) -> CmdResult {
    let Some(mut len) = blocks.checked_mul(bs) else {
        return Err(Fail::Overrun);
    };
    if len > din.remaining() {
        return Err(Fail::Overrun);
    }
    let mut offset = lba * bs; // fits: lba + blocks ≤ capacity ≤ size / bs
    while len > 0 {
        let n = len.min(MAX_CHUNK as u64) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let chunk = &mut buf[..n];
        image.read_at(chunk, offset).map_err(|e| {
            crate::guest_warn!("scsi: read of {n} bytes at {offset:#x} failed: {e}");
            Fail::Check(sense::READ_ERROR)
        })?;
        din.write(chunk)
            .map_err(|_| Fail::Check(sense::READ_ERROR))?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Writes `blocks` × `bs` bytes from `dout` at block `lba`, in bounded chunks.
fn write_blocks(
    image: &dyn BlockDevice,
    buf: &mut Vec<u8>,
    dout: &mut dyn DataOut,
    (lba, blocks, bs): (u64, u64, u64),
) -> CmdResult {
    let Some(mut len) = blocks.checked_mul(bs) else {
        return Err(Fail::Overrun);
    };
    if len > dout.remaining() {
        return Err(Fail::Overrun);
    }
    let mut offset = lba * bs;
    while len > 0 {
        let n = len.min(MAX_CHUNK as u64) as usize;
        if buf.len() < n {
            buf.resize(n, 0);
        }
        let chunk = &mut buf[..n];
        dout.read(chunk)
            .map_err(|_| Fail::Check(sense::WRITE_ERROR))?;
        image.write_at(chunk, offset).map_err(|e| {
            crate::guest_warn!("scsi: write of {n} bytes at {offset:#x} failed: {e}");
            Fail::Check(sense::WRITE_ERROR)
        })?;
        offset += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Standard INQUIRY data (36 bytes) for `ptype` with the given product name.
fn standard_inquiry(ptype: u8, removable: bool, product: &[u8; 16]) -> [u8; 36] {
    let mut d = [0u8; 36];
    d[0] = ptype;
    d[1] = if removable { 0x80 } else { 0 };
    d[2] = 0x05; // SPC-3
    d[3] = 0x02; // response data format 2
    d[4] = 36 - 5; // additional length
    d[7] = 0x02; // CmdQue: commands may be queued
    d[8..16].copy_from_slice(b"QEMU    ");
    d[16..32].copy_from_slice(product);
    d[32..36].copy_from_slice(b"2.5+");
    d
}

/// Builds a VPD page: 4-byte header then `body`.
fn vpd_page(ptype: u8, page: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![ptype, page];
    v.extend_from_slice(&(body.len() as u16).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// Unit serial number (0x80) and device identification (0x83) VPD pages.
fn id_vpd(ptype: u8, page: u8, serial: &str) -> Option<Vec<u8>> {
    let id = serial.as_bytes();
    match page {
        0x80 if !id.is_empty() => Some(vpd_page(ptype, 0x80, id)),
        0x83 => {
            let mut body = Vec::new();
            if !id.is_empty() {
                // One vendor-specific, ASCII designator for the logical unit.
                body.extend_from_slice(&[0x02, 0x00, 0x00, id.len() as u8]);
                body.extend_from_slice(id);
            }
            Some(vpd_page(ptype, 0x83, &body))
        }
        _ => None,
    }
}

/// Keeps a serial printable and short enough for one VPD designator.
fn clean_serial(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(SERIAL_MAX)
        .collect()
}

/// Longest serial kept.
pub const SERIAL_MAX: usize = 36;

/// REPORT LUNS: this target has exactly LUN 0.
fn report_luns(cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
    let alloc = be(cdb, 6, 4);
    if alloc < 16 {
        return Err(sense::INVALID_FIELD.into());
    }
    let mut d = [0u8; 16];
    d[0..4].copy_from_slice(&8u32.to_be_bytes());
    respond(din, &d, alloc)
}

/// REQUEST SENSE with `s` as the current condition.
fn request_sense(cdb: &[u8], din: &mut dyn DataIn, s: Sense) -> CmdResult {
    if cdb[1] & 0x01 != 0 {
        // Descriptor-format sense is not supported.
        return Err(sense::INVALID_FIELD.into());
    }
    respond(din, &s.fixed(), be(cdb, 4, 1))
}

/// The parsed MODE SENSE(6/10) CDB: (ten-byte form, page control, page code, allocation).
fn mode_sense_cdb(cdb: &[u8]) -> Result<(bool, u8, u8, u64), Fail> {
    let ten = cdb[0] == op::MODE_SENSE_10;
    let pc = cdb[2] >> 6;
    let page = cdb[2] & 0x3f;
    if pc == 3 {
        return Err(sense::SAVING_NOT_SUPPORTED.into());
    }
    // Only the page itself; subpage 0xff (all subpages) is fine with page 0x3f.
    if cdb[3] != 0 && !(page == 0x3f && cdb[3] == 0xff) {
        return Err(sense::INVALID_FIELD.into());
    }
    let alloc = if ten { be(cdb, 7, 2) } else { be(cdb, 4, 1) };
    Ok((ten, pc, page, alloc))
}

/// Mode parameter header (+ optional block descriptor) followed by `pages`.
fn mode_data(ten: bool, dev_specific: u8, block_desc: &[u8], pages: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + block_desc.len() + pages.len());
    if ten {
        v.extend_from_slice(&[0, 0, 0, dev_specific, 0, 0]);
        v.extend_from_slice(&(block_desc.len() as u16).to_be_bytes());
    } else {
        v.extend_from_slice(&[0, 0, dev_specific, block_desc.len() as u8]);
    }
    v.extend_from_slice(block_desc);
    v.extend_from_slice(pages);
    // The mode data length excludes itself.
    if ten {
        let n = (v.len() - 2) as u16;
        v[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        v[0] = (v.len() - 1) as u8;
    }
    v
}

/// A mode page as reported for page control `pc`: changeable values (pc 1) are all zero
/// because nothing can be changed with MODE SELECT.
fn mode_page(pc: u8, page: &[u8]) -> Vec<u8> {
    let mut p = page.to_vec();
    if pc == 1 {
        p[2..].fill(0);
    }
    p
}

#[cfg(test)]
pub(crate) mod tests;
