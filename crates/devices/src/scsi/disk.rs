//! A SCSI direct-access block device (peripheral type 0, SBC-3) with 512-byte blocks.

use std::sync::Arc;

use rvirt_image::BlockDevice;

use super::sense;
use super::{
    be, check_range, clean_serial, id_vpd, lba_and_len, mode_data, mode_page, mode_sense_cdb, op,
    read_blocks, report_luns, request_sense, respond, standard_inquiry, vpd_page, write_blocks,
    CmdResult, DataIn, DataOut, MAX_TRANSFER_BLOCKS,
};

/// Bytes per logical block of a SCSI disk.
pub const DISK_BLOCK_SIZE: u64 = 512;

/// A disk LUN.
pub struct ScsiDisk {
    image: Arc<dyn BlockDevice>,
    read_only: bool,
    blocks: u64,
    serial: String,
    buf: Vec<u8>,
}

impl std::fmt::Debug for ScsiDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiDisk")
            .field("blocks", &self.blocks)
            .field("read_only", &self.read_only)
            .field("serial", &self.serial)
            .finish()
    }
}

impl ScsiDisk {
    /// A disk over `image` (a partial last block is not visible). `serial` (printable ASCII,
    /// at most [`super::SERIAL_MAX`] bytes kept) is the unit serial number VPD page.
    pub fn new(image: Arc<dyn BlockDevice>, serial: &str, read_only: bool) -> Self {
        ScsiDisk {
            read_only: read_only || image.read_only(),
            blocks: image.size() / DISK_BLOCK_SIZE,
            image,
            serial: clean_serial(serial),
            buf: Vec::new(),
        }
    }

    /// Capacity in 512-byte blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub(super) fn execute(
        &mut self,
        cdb: &[u8],
        dout: &mut dyn DataOut,
        din: &mut dyn DataIn,
    ) -> CmdResult {
        match cdb[0] {
            op::TEST_UNIT_READY | op::START_STOP_UNIT | op::PREVENT_ALLOW => Ok(()),
            op::REQUEST_SENSE => request_sense(cdb, din, sense::NO_SENSE),
            op::INQUIRY => self.inquiry(cdb, din),
            op::REPORT_LUNS => report_luns(cdb, din),
            op::READ_CAPACITY_10 => {
                let last = self.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut d = [0u8; 8];
                d[0..4].copy_from_slice(&last.to_be_bytes());
                d[4..8].copy_from_slice(&(DISK_BLOCK_SIZE as u32).to_be_bytes());
                respond(din, &d, 8)
            }
            op::SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == op::SA_READ_CAPACITY_16 => {
                let mut d = [0u8; 32];
                d[0..8].copy_from_slice(&self.blocks.saturating_sub(1).to_be_bytes());
                d[8..12].copy_from_slice(&(DISK_BLOCK_SIZE as u32).to_be_bytes());
                respond(din, &d, be(cdb, 10, 4))
            }
            op::SERVICE_ACTION_IN_16 => Err(sense::INVALID_FIELD.into()),
            op::READ_6 | op::READ_10 | op::READ_12 | op::READ_16 => {
                let (lba, n) = lba_and_len(cdb);
                check_range(lba, n, self.blocks)?;
                read_blocks(&*self.image, &mut self.buf, din, (lba, n, DISK_BLOCK_SIZE))
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                if self.read_only {
                    return Err(sense::WRITE_PROTECTED.into());
                }
                let (lba, n) = lba_and_len(cdb);
                check_range(lba, n, self.blocks)?;
                write_blocks(&*self.image, &mut self.buf, dout, (lba, n, DISK_BLOCK_SIZE))
            }
            op::VERIFY_10 | op::VERIFY_16 => {
                // BYTCHK would compare data-out with the medium; not supported.
                if cdb[1] & 0x06 != 0 {
                    return Err(sense::INVALID_FIELD.into());
                }
                let (lba, n) = lba_and_len(cdb);
                check_range(lba, n, self.blocks)
            }
            op::SYNC_CACHE_10 | op::SYNC_CACHE_16 => {
                let (lba, n) = lba_and_len(cdb);
                check_range(lba, n, self.blocks)?;
                if self.read_only {
                    return Ok(());
                }
                self.image.flush().map_err(|e| {
                    crate::guest_warn!("scsi: flush failed: {e}");
                    sense::WRITE_ERROR.into()
                })
            }
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb, din),
            _ => Err(sense::INVALID_OPCODE.into()),
        }
    }

    fn inquiry(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        let alloc = be(cdb, 3, 2);
        if cdb[1] & 0x01 == 0 {
            if cdb[2] != 0 {
                return Err(sense::INVALID_FIELD.into());
            }
            return respond(din, &standard_inquiry(0, false, b"QEMU HARDDISK   "), alloc);
        }
        let page = match cdb[2] {
            0x00 => {
                let mut pages = vec![0x00];
                if !self.serial.is_empty() {
                    pages.push(0x80);
                }
                pages.extend_from_slice(&[0x83, 0xb0, 0xb1, 0xb2]);
                vpd_page(0, 0x00, &pages)
            }
            0xb0 => {
                // Block limits: the largest transfer and the preferred one, in blocks.
                let mut b = [0u8; 0x3c];
                b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                b[8..12].copy_from_slice(&(MAX_TRANSFER_BLOCKS & !0xff).to_be_bytes());
                vpd_page(0, 0xb0, &b)
            }
            // Block device characteristics: rotation rate and form factor not reported.
            0xb1 => vpd_page(0, 0xb1, &[0u8; 0x3c]),
            // Logical block provisioning: fully provisioned, no UNMAP.
            0xb2 => vpd_page(0, 0xb2, &[0u8; 4]),
            p => id_vpd(0, p, &self.serial).ok_or(sense::INVALID_FIELD)?,
        };
        respond(din, &page, alloc)
    }

    fn mode_sense(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        let (ten, pc, page, alloc) = mode_sense_cdb(cdb)?;
        let mut caching = [0u8; 20];
        caching[0] = 0x08;
        caching[1] = 18;
        caching[2] = 0x04; // WCE: writes may be cached until SYNCHRONIZE CACHE
        let mut control = [0u8; 12];
        control[0] = 0x0a;
        control[1] = 10;
        let pages = match page {
            0x08 => mode_page(pc, &caching),
            0x0a => mode_page(pc, &control),
            0x3f => [mode_page(pc, &caching), mode_page(pc, &control)].concat(),
            _ => return Err(sense::INVALID_FIELD.into()),
        };
        let dbd = cdb[1] & 0x08 != 0;
        let mut desc = [0u8; 8];
        let blocks = self.blocks.min(0xff_ffff) as u32;
        desc[0..4].copy_from_slice(&blocks.to_be_bytes());
        desc[0] = 0; // density code
        desc[4..8].copy_from_slice(&(DISK_BLOCK_SIZE as u32).to_be_bytes());
        desc[4] = 0;
        let wp = if self.read_only { 0x80 } else { 0 };
        let data = mode_data(ten, wp, if dbd { &[] } else { &desc }, &pages);
        respond(din, &data, alloc)
    }
}
