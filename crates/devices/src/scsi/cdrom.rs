//! An MMC CD/DVD-ROM drive (peripheral type 5, removable, read-only) with 2048-byte blocks.
//!
//! The disc is one data track (track 1 from LBA 0, lead-out 0xAA at the capacity) in one
//! closed session, as an ISO image is. Media changes are reported the way MMC drivers expect:
//! a UNIT ATTENTION (MEDIUM MAY HAVE CHANGED) once after an insert, and media events through
//! polled GET EVENT STATUS NOTIFICATION (Linux's sr polls it for disk events).

use std::sync::Arc;

use rvirt_image::BlockDevice;

use super::sense::{self, Sense};
use super::{
    be, check_range, clean_serial, id_vpd, lba_and_len, mode_data, mode_page, mode_sense_cdb, op,
    read_blocks, report_luns, request_sense, respond, standard_inquiry, vpd_page, CmdResult,
    DataIn, DataOut, Fail,
};

/// Bytes per logical block of a CD/DVD.
pub const CD_BLOCK_SIZE: u64 = 2048;
/// The largest CD (80 minutes of 75 sectors a second); bigger media are reported as DVD-ROM.
const CD_MAX_BLOCKS: u64 = 80 * 60 * 75;
const PROFILE_CD_ROM: u16 = 0x0008;
const PROFILE_DVD_ROM: u16 = 0x0010;

/// The guest locked the tray (PREVENT ALLOW MEDIUM REMOVAL): the disc cannot be removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the guest has locked the CD-ROM tray")]
pub struct Locked;

/// The media event GET EVENT STATUS NOTIFICATION reports next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MediaEvent {
    None = 0,
    EjectRequest = 1,
    NewMedia = 2,
    MediaRemoval = 3,
}

/// A CD-ROM LUN.
pub struct ScsiCdrom {
    media: Option<Arc<dyn BlockDevice>>,
    blocks: u64,
    locked: bool,
    /// Reported once, on the next command that is not exempt from unit attentions.
    unit_attention: Option<Sense>,
    event: MediaEvent,
    serial: String,
    buf: Vec<u8>,
}

impl std::fmt::Debug for ScsiCdrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScsiCdrom")
            .field("media", &self.media.is_some())
            .field("blocks", &self.blocks)
            .field("locked", &self.locked)
            .finish()
    }
}

impl ScsiCdrom {
    /// A drive, empty or with `media` (a disc present from power-on raises no unit attention).
    pub fn new(media: Option<Arc<dyn BlockDevice>>, serial: &str) -> Self {
        let mut c = ScsiCdrom {
            media: None,
            blocks: 0,
            locked: false,
            unit_attention: None,
            event: MediaEvent::None,
            serial: clean_serial(serial),
            buf: Vec::new(),
        };
        if let Some(m) = media {
            c.set_media(m);
        }
        c
    }

    fn set_media(&mut self, m: Arc<dyn BlockDevice>) {
        self.blocks = m.size() / CD_BLOCK_SIZE;
        self.media = Some(m);
    }

    /// Inserts a disc, replacing the current one. Refused while the guest locks the tray and a
    /// disc is in (the guest is then told an eject was requested).
    pub fn insert(&mut self, media: Arc<dyn BlockDevice>) -> Result<(), Locked> {
        if self.media.is_some() && self.locked {
            self.event = MediaEvent::EjectRequest;
            return Err(Locked);
        }
        self.set_media(media);
        self.unit_attention = Some(sense::MEDIUM_CHANGED);
        self.event = MediaEvent::NewMedia;
        Ok(())
    }

    /// Removes the disc. Refused while the tray is locked unless `force` (the guest then sees an
    /// eject request event, as when the eject button of a locked drive is pressed).
    pub fn eject(&mut self, force: bool) -> Result<(), Locked> {
        if self.locked && !force {
            self.event = MediaEvent::EjectRequest;
            return Err(Locked);
        }
        if self.media.take().is_some() {
            self.event = MediaEvent::MediaRemoval;
        }
        self.blocks = 0;
        self.unit_attention = None;
        Ok(())
    }

    /// Whether the guest has locked the tray.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Whether a disc is in.
    pub fn has_media(&self) -> bool {
        self.media.is_some()
    }

    /// Capacity of the disc in 2048-byte blocks (0 when empty).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    fn media(&self) -> Result<&Arc<dyn BlockDevice>, Fail> {
        self.media
            .as_ref()
            .ok_or(Fail::Check(sense::MEDIUM_NOT_PRESENT))
    }

    fn profile(&self) -> u16 {
        match self.media {
            None => 0,
            Some(_) if self.blocks > CD_MAX_BLOCKS => PROFILE_DVD_ROM,
            Some(_) => PROFILE_CD_ROM,
        }
    }

    pub(super) fn execute(
        &mut self,
        cdb: &[u8],
        _dout: &mut dyn DataOut,
        din: &mut dyn DataIn,
    ) -> CmdResult {
        // SPC: these report data even with a unit attention pending; MMC adds GET
        // CONFIGURATION and GET EVENT STATUS NOTIFICATION, which drivers poll.
        let exempt = matches!(
            cdb[0],
            op::INQUIRY
                | op::REQUEST_SENSE
                | op::REPORT_LUNS
                | op::GET_CONFIGURATION
                | op::GET_EVENT_STATUS
        );
        if !exempt {
            if let Some(ua) = self.unit_attention.take() {
                return Err(ua.into());
            }
        }
        match cdb[0] {
            op::TEST_UNIT_READY => self.media().map(|_| ()),
            op::REQUEST_SENSE => {
                let s = match (self.unit_attention.take(), &self.media) {
                    (Some(ua), _) => ua,
                    (None, None) => sense::MEDIUM_NOT_PRESENT,
                    (None, Some(_)) => sense::NO_SENSE,
                };
                request_sense(cdb, din, s)
            }
            op::INQUIRY => self.inquiry(cdb, din),
            op::REPORT_LUNS => report_luns(cdb, din),
            op::READ_CAPACITY_10 => {
                self.media()?;
                let last = self.blocks.saturating_sub(1).min(u64::from(u32::MAX)) as u32;
                let mut d = [0u8; 8];
                d[0..4].copy_from_slice(&last.to_be_bytes());
                d[4..8].copy_from_slice(&(CD_BLOCK_SIZE as u32).to_be_bytes());
                respond(din, &d, 8)
            }
            op::READ_10 | op::READ_12 => {
                let (lba, n) = lba_and_len(cdb);
                let media = self.media()?.clone();
                check_range(lba, n, self.blocks)?;
                read_blocks(&*media, &mut self.buf, din, (lba, n, CD_BLOCK_SIZE))
            }
            op::WRITE_6 | op::WRITE_10 | op::WRITE_12 | op::WRITE_16 => {
                Err(sense::WRITE_PROTECTED.into())
            }
            op::READ_TOC => self.read_toc(cdb, din),
            op::GET_CONFIGURATION => self.get_configuration(cdb, din),
            op::GET_EVENT_STATUS => self.event_status(cdb, din),
            op::MODE_SENSE_6 | op::MODE_SENSE_10 => self.mode_sense(cdb, din),
            op::READ_DISC_INFO => self.disc_info(cdb, din),
            op::READ_TRACK_INFO => self.track_info(cdb, din),
            op::START_STOP_UNIT => self.start_stop(cdb),
            op::PREVENT_ALLOW => {
                self.locked = cdb[4] & 0x03 != 0;
                Ok(())
            }
            op::MECHANISM_STATUS => {
                let mut d = [0u8; 8];
                if self.media.is_none() {
                    d[1] = 0x10; // door open: the tray is out while no disc is in
                }
                respond(din, &d, be(cdb, 8, 2))
            }
            op::SET_CD_SPEED => Ok(()),
            _ => Err(sense::INVALID_OPCODE.into()),
        }
    }

    fn inquiry(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        let alloc = be(cdb, 3, 2);
        if cdb[1] & 0x01 == 0 {
            if cdb[2] != 0 {
                return Err(sense::INVALID_FIELD.into());
            }
            return respond(din, &standard_inquiry(5, true, b"QEMU CD-ROM     "), alloc);
        }
        let page = match cdb[2] {
            0x00 => {
                let mut pages = vec![0x00];
                if !self.serial.is_empty() {
                    pages.push(0x80);
                }
                pages.push(0x83);
                vpd_page(5, 0x00, &pages)
            }
            p => id_vpd(5, p, &self.serial).ok_or(sense::INVALID_FIELD)?,
        };
        respond(din, &page, alloc)
    }

    fn start_stop(&mut self, cdb: &[u8]) -> CmdResult {
        let (start, loej, power) = (cdb[4] & 0x01 != 0, cdb[4] & 0x02 != 0, cdb[4] >> 4);
        // A power condition makes the drive ignore START and LOEJ.
        if power != 0 || !loej || start {
            return Ok(());
        }
        if self.locked {
            return Err(sense::REMOVAL_PREVENTED.into());
        }
        // Unlocked by the check above, so this cannot fail.
        let _ = self.eject(false);
        Ok(())
    }

    /// An address as 4 bytes: LBA, or (0, minute, second, frame) with the 2-second pregap.
    fn address(lba: u64, msf: bool) -> [u8; 4] {
        if msf {
            let f = lba + 150;
            [
                0,
                (f / (75 * 60)).min(255) as u8,
                ((f / 75) % 60) as u8,
                (f % 75) as u8,
            ]
        } else {
            (lba.min(u64::from(u32::MAX)) as u32).to_be_bytes()
        }
    }

    fn read_toc(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        self.media()?;
        let msf = cdb[1] & 0x02 != 0;
        let format = cdb[2] & 0x0f;
        let track = cdb[6];
        let alloc = be(cdb, 7, 2);
        let mut d = vec![0, 0, 1, 1]; // length, first track, last track
        let descriptor = |number: u8, lba: u64| {
            let mut t = vec![0, 0x14, number, 0]; // ADR 1, data track
            t.extend_from_slice(&Self::address(lba, msf));
            t
        };
        match format {
            0 => match track {
                0 | 1 => {
                    d.extend(descriptor(1, 0));
                    d.extend(descriptor(0xaa, self.blocks));
                }
                0xaa => d.extend(descriptor(0xaa, self.blocks)),
                _ => return Err(sense::INVALID_FIELD.into()),
            },
            // Session info: one complete session, starting with track 1.
            1 => d.extend(descriptor(1, 0)),
            _ => return Err(sense::INVALID_FIELD.into()),
        }
        let n = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&n.to_be_bytes());
        respond(din, &d, alloc)
    }

    fn features(&self) -> Vec<(u16, Vec<u8>)> {
        let current = self.profile();
        let mut profiles = Vec::new();
        for p in [PROFILE_DVD_ROM, PROFILE_CD_ROM] {
            profiles.extend_from_slice(&p.to_be_bytes());
            profiles.extend_from_slice(&[u8::from(p == current), 0]);
        }
        let mut removable = 0x20 | 0x08 | 0x01; // tray, eject, lock
        if self.locked {
            removable |= 0x04;
        }
        let feature = |code: u16, flags: u8, body: &[u8]| {
            let mut f = code.to_be_bytes().to_vec();
            f.extend_from_slice(&[flags, body.len() as u8]);
            f.extend_from_slice(body);
            (code, f)
        };
        // flags: version << 2 | persistent (0x02) | current (0x01).
        vec![
            feature(0x0000, 0x03, &profiles),
            feature(0x0001, 0x0b, &[0, 0, 0, 1, 0x01, 0, 0, 0]), // core: SCSI, DBE
            feature(0x0002, 0x07, &[0x02, 0, 0, 0]),             // morphing: OCEvent
            feature(0x0003, 0x03, &[removable, 0, 0, 0]),        // removable medium
        ]
    }

    fn get_configuration(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        let rt = cdb[1] & 0x03;
        let start = be(cdb, 2, 2) as u16;
        let alloc = be(cdb, 7, 2);
        let mut d = vec![0u8; 8];
        d[6..8].copy_from_slice(&self.profile().to_be_bytes());
        for (code, f) in self.features() {
            let take = match rt {
                0 => code >= start,
                // Every feature listed here is current, except when the drive is empty.
                1 => code >= start && f[2] & 0x01 != 0,
                2 => code == start,
                _ => return Err(sense::INVALID_FIELD.into()),
            };
            if take {
                d.extend_from_slice(&f);
            }
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        respond(din, &d, alloc)
    }

    fn event_status(&mut self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        // Only polled operation: asynchronous notification is not offered.
        if cdb[1] & 0x01 == 0 {
            return Err(sense::INVALID_FIELD.into());
        }
        let alloc = be(cdb, 7, 2);
        const MEDIA_CLASS: u8 = 0x10;
        if cdb[4] & MEDIA_CLASS == 0 {
            // No supported class requested: NEA with just the header.
            return respond(din, &[0, 2, 0x80, MEDIA_CLASS], alloc);
        }
        let status = if self.media.is_some() { 0x02 } else { 0x00 };
        let event = std::mem::replace(&mut self.event, MediaEvent::None);
        let d = [0, 6, 0x04, MEDIA_CLASS, event as u8, status, 0, 0];
        respond(din, &d, alloc)
    }

    fn mode_sense(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        let (ten, pc, page, alloc) = mode_sense_cdb(cdb)?;
        let mut caps = [0u8; 22];
        caps[0] = 0x2a;
        caps[1] = 20;
        caps[2] = 0x3b; // reads CD-R, CD-RW, method 2, DVD-ROM, DVD-R
        caps[4] = 0x71; // audio play, mode 2 form 1/2, multi-session
        caps[5] = 0xff; // CD-DA commands, accurate stream, R-W subchannel...
        caps[6] = 0x29 | if self.locked { 0x02 } else { 0 }; // tray, eject, lock (+ state)
        caps[8..10].copy_from_slice(&(16u16 * 176).to_be_bytes()); // 16x, in kB/s
        caps[10..12].copy_from_slice(&256u16.to_be_bytes()); // volume levels
        caps[12..14].copy_from_slice(&2048u16.to_be_bytes()); // buffer size, KiB
        caps[14..16].copy_from_slice(&(16u16 * 176).to_be_bytes());
        let pages = match page {
            0x2a | 0x3f => mode_page(pc, &caps),
            _ => return Err(sense::INVALID_FIELD.into()),
        };
        respond(din, &mode_data(ten, 0, &[], &pages), alloc)
    }

    fn disc_info(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        if cdb[1] & 0x07 != 0 {
            return Err(sense::INVALID_FIELD.into());
        }
        self.media()?;
        let mut d = [0u8; 34];
        d[0..2].copy_from_slice(&32u16.to_be_bytes());
        d[2] = 0x0e; // last session complete, disc complete (finalised)
        d[3] = 1; // first track
        d[4] = 1; // sessions
        d[5] = 1; // first track in last session
        d[6] = 1; // last track in last session
        d[7] = 0x20; // unrestricted use
        d[16..24].fill(0xff); // lead-in / last lead-out start: not applicable
        respond(din, &d, be(cdb, 7, 2))
    }

    fn track_info(&self, cdb: &[u8], din: &mut dyn DataIn) -> CmdResult {
        self.media()?;
        let number = be(cdb, 2, 4);
        let is_track1 = match cdb[1] & 0x03 {
            0 => number < self.blocks, // LBA inside the only track
            1 => number == 1,          // track number
            _ => false,                // session numbers are not supported
        };
        if !is_track1 {
            return Err(sense::INVALID_FIELD.into());
        }
        let mut d = [0u8; 36];
        d[0..2].copy_from_slice(&34u16.to_be_bytes());
        d[2] = 1; // track number
        d[3] = 1; // session
        d[5] = 0x04; // data track, recorded uninterrupted
        d[6] = 0x01; // data mode 1
        d[24..28].copy_from_slice(&(self.blocks.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        respond(din, &d, be(cdb, 7, 2))
    }
}
