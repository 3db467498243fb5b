//! SCSI status codes and fixed-format sense data (SPC-4 4.5.3).

/// Status byte: the command completed.
pub const GOOD: u8 = 0x00;
/// Status byte: sense data describes why the command failed.
pub const CHECK_CONDITION: u8 = 0x02;

/// Length of the fixed-format sense data this engine produces.
pub const FIXED_SENSE_LEN: usize = 18;

/// A sense key with its additional sense code and qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Sense { key, asc, ascq }
    }

    /// Fixed-format (response code 0x70, current error) sense data.
    pub fn fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut s = [0u8; FIXED_SENSE_LEN];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = (FIXED_SENSE_LEN - 8) as u8; // additional sense length
        s[12] = self.asc;
        s[13] = self.ascq;
        s
    }
}

pub const KEY_NO_SENSE: u8 = 0x0;
pub const KEY_NOT_READY: u8 = 0x2;
pub const KEY_MEDIUM_ERROR: u8 = 0x3;
pub const KEY_ILLEGAL_REQUEST: u8 = 0x5;
pub const KEY_UNIT_ATTENTION: u8 = 0x6;
pub const KEY_DATA_PROTECT: u8 = 0x7;

/// Nothing to report (REQUEST SENSE without a pending condition).
pub const NO_SENSE: Sense = Sense::new(KEY_NO_SENSE, 0x00, 0x00);
/// Opcode unknown, reserved or not supported by this device type.
pub const INVALID_OPCODE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x20, 0x00);
/// LBA or LBA + length beyond the last block.
pub const LBA_OUT_OF_RANGE: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x21, 0x00);
/// A CDB field has a value this device does not accept (also a CDB too short for its opcode).
pub const INVALID_FIELD: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x24, 0x00);
/// MODE SENSE asked for saved values, which this device has none of.
pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x39, 0x00);
/// Eject refused: the guest locked the tray with PREVENT ALLOW MEDIUM REMOVAL.
pub const REMOVAL_PREVENTED: Sense = Sense::new(KEY_ILLEGAL_REQUEST, 0x53, 0x02);
/// No disc in the drive.
pub const MEDIUM_NOT_PRESENT: Sense = Sense::new(KEY_NOT_READY, 0x3a, 0x00);
/// A disc was inserted since the guest last looked.
pub const MEDIUM_CHANGED: Sense = Sense::new(KEY_UNIT_ATTENTION, 0x28, 0x00);
/// Write to a read-only disk or to a CD.
pub const WRITE_PROTECTED: Sense = Sense::new(KEY_DATA_PROTECT, 0x27, 0x00);
/// The backend failed a read.
pub const READ_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x11, 0x00);
/// The backend failed a write or a flush.
pub const WRITE_ERROR: Sense = Sense::new(KEY_MEDIUM_ERROR, 0x0c, 0x00);
