//! The UEFI variable store as a CFI parallel flash on the MMIO bus: a byte-wide Intel/Sharp
//! command-set device with 4 KiB blocks, as QEMU's q35 puts below the OVMF code (so Debian's
//! OVMF, whose QemuFlashFvbServicesRuntimeDxe probes for and drives exactly that, keeps its
//! variables in it). The contents are a file, the VM's own copy of `OVMF_VARS_4M.fd`: every
//! program or erase is written to it, so variables (the boot entries an installer creates)
//! survive a power-off.
//!
//! Commands (the low byte of a write; the device is 8 bits wide):
//! - 0xFF read array: reads return the image;
//! - 0x70 read status: reads return the status register (bit 7 ready, bit 5 erase error,
//!   bit 4 program error, bit 1 block locked);
//! - 0x50 clear status: the whole register becomes 0 and reads return the image again.
//!   OVMF's probe relies on that: 0x50, then 0x70 must read 0x00, otherwise it treats the
//!   range as RAM or ROM and falls back to variables kept in RAM;
//! - 0x10 or 0x40, then a write: programs the written bytes. A plain write, as QEMU's device
//!   does, not the AND of real flash: OVMF only ever clears bits of programmed bytes (it
//!   erases first), so both give the same result for it, and the plain write is the one the
//!   firmware is tested against;
//! - 0x20, then 0xD0 at an address in the block: erases that 4 KiB block to 0xFF; anything
//!   other than 0xD0 is a sequence error (bits 4 and 5);
//! - 0x90 read identifier (manufacturer 0x89 at 0, device 0x18 at 1, lock state at 2 of each
//!   block), 0x98 CFI query (a minimal table: "QRY", the Intel command set, one region of
//!   4 KiB blocks);
//! - anything else: back to read array, with a rate-limited warning.
//!
//! After a program or an erase, reads return the status until 0xFF, as on the real part.
//! Writes go to the file at once (`pwrite` of the changed bytes); `fdatasync` follows when the
//! guest goes back to read-array mode after changing something (OVMF ends every program
//! burst and erase with 0xFF) and on [`Pflash::flush`]. A read-only store (a read-only nvram)
//! fails every program and erase with the error and lock bits and changes nothing.
//!
//! Not wired yet: the firmware boot mode puts it on the MMIO bus (below the code image, which
//! is a read-only memslot) and calls [`Pflash::reset`] on platform reset and
//! [`Pflash::flush`] at exit.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rvirt_devices::guest_warn;

use crate::bus::BusDevice;

/// Erase block size.
pub const BLOCK_SIZE: u64 = 4096;
/// Largest image accepted: flash lives below 4 GiB next to the code, 16 MiB is plenty.
pub const MAX_SIZE: u64 = 16 << 20;

/// Status register bits.
pub mod status {
    /// The write state machine is ready.
    pub const READY: u8 = 1 << 7;
    /// Erase failed (with [`PROGRAM_ERROR`]: bad command sequence).
    pub const ERASE_ERROR: u8 = 1 << 5;
    /// Program failed.
    pub const PROGRAM_ERROR: u8 = 1 << 4;
    /// The operation hit a locked block (the store is read-only).
    pub const LOCKED: u8 = 1 << 1;
}

const MANUFACTURER_INTEL: u8 = 0x89;
const DEVICE_ID: u8 = 0x18;

/// Why a flash image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PflashError {
    #[error("flash image {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "flash image {path}: size {size} is not a non-zero multiple of {BLOCK_SIZE} up to \
         {MAX_SIZE} bytes"
    )]
    BadSize { path: PathBuf, size: u64 },
}

/// What reads return and what the next write means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    ReadArray,
    ReadStatus,
    ReadId,
    Cfi,
    /// The next write is the data of a program command.
    Program,
    /// The next write must be the erase confirmation.
    EraseSetup,
}

/// A CFI flash over a file-backed image.
pub struct Pflash {
    image: Vec<u8>,
    file: File,
    path: PathBuf,
    read_only: bool,
    mode: Mode,
    status: u8,
    /// Bytes were written to the file since the last `fdatasync`.
    dirty: bool,
}

impl Pflash {
    /// Opens `path` (read-write unless `read_only`) and loads it.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, PflashError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| PflashError::Io {
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// A flash over `file` (named `path` in errors and logs). Its size must be a non-zero
    /// multiple of [`BLOCK_SIZE`], at most [`MAX_SIZE`]; unless `read_only` it must be open
    /// for writing.
    pub fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, PflashError> {
        let io = |source| PflashError::Io {
            path: path.to_owned(),
            source,
        };
        let size = file.metadata().map_err(io)?.len();
        if size == 0 || !size.is_multiple_of(BLOCK_SIZE) || size > MAX_SIZE {
            return Err(PflashError::BadSize {
                path: path.to_owned(),
                size,
            });
        }
        let mut image = vec![0u8; size as usize];
        file.read_exact_at(&mut image, 0).map_err(io)?;
        Ok(Pflash {
            image,
            file,
            path: path.to_owned(),
            read_only,
            mode: Mode::ReadArray,
            status: status::READY,
            dirty: false,
        })
    }

    /// Bytes of the image (the length of the MMIO range).
    pub fn size(&self) -> u64 {
        self.image.len() as u64
    }

    /// The current contents.
    pub fn image(&self) -> &[u8] {
        &self.image
    }

    /// Power-on state: read-array mode, status ready. Pending writes are synced first.
    pub fn reset(&mut self) {
        if let Err(e) = self.flush() {
            log::warn!("{e}");
        }
        self.mode = Mode::ReadArray;
        self.status = status::READY;
    }

    /// `fdatasync`s the file if anything was written since the last sync.
    pub fn flush(&mut self) -> Result<(), PflashError> {
        if self.dirty {
            self.file.sync_data().map_err(|source| PflashError::Io {
                path: self.path.clone(),
                source,
            })?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Writes `image[start..start + len]` to the file; false on failure.
    fn persist(&mut self, start: usize, len: usize) -> bool {
        let Some(bytes) = self.image.get(start..start.saturating_add(len)) else {
            return false;
        };
        match self.file.write_all_at(bytes, start as u64) {
            Ok(()) => {
                self.dirty = true;
                true
            }
            Err(e) => {
                guest_warn!("flash image {}: write failed: {e}", self.path.display());
                false
            }
        }
    }

    fn program(&mut self, offset: u64, data: &[u8]) {
        self.mode = Mode::ReadStatus;
        if self.read_only {
            self.status |= status::READY | status::PROGRAM_ERROR | status::LOCKED;
            return;
        }
        // Only the bytes inside the image: an access straddling its end is cut short.
        let Ok(start) = usize::try_from(offset) else {
            return;
        };
        let n = data.len().min(self.image.len().saturating_sub(start));
        if n == 0 {
            self.status |= status::READY | status::PROGRAM_ERROR;
            return;
        }
        self.image[start..start + n].copy_from_slice(&data[..n]);
        self.status |= status::READY;
        if !self.persist(start, n) {
            self.status |= status::PROGRAM_ERROR;
        }
    }

    fn erase(&mut self, offset: u64) {
        self.mode = Mode::ReadStatus;
        if self.read_only {
            self.status |= status::READY | status::ERASE_ERROR | status::LOCKED;
            return;
        }
        let start = offset & !(BLOCK_SIZE - 1);
        let range = usize::try_from(start)
            .ok()
            .and_then(|s| Some(s..s.checked_add(BLOCK_SIZE as usize)?));
        let Some(block) = range.clone().and_then(|r| self.image.get_mut(r)) else {
            self.status |= status::READY | status::ERASE_ERROR;
            return;
        };
        block.fill(0xff);
        self.status |= status::READY;
        if !self.persist(start as usize, BLOCK_SIZE as usize) {
            self.status |= status::ERASE_ERROR;
        }
    }

    fn command(&mut self, cmd: u8) {
        self.mode = match cmd {
            0xff => {
                // The end of a program/erase burst: make it durable.
                if let Err(e) = self.flush() {
                    guest_warn!("{e}");
                }
                Mode::ReadArray
            }
            0x70 => Mode::ReadStatus,
            0x50 => {
                self.status = 0;
                Mode::ReadArray
            }
            0x10 | 0x40 => Mode::Program,
            0x20 => Mode::EraseSetup,
            0x90 => Mode::ReadId,
            0x98 => Mode::Cfi,
            _ => {
                guest_warn!("pflash: unknown command {cmd:#04x}, back to read array");
                Mode::ReadArray
            }
        };
    }

    /// The identifier-mode byte at `at`.
    fn id_byte(&self, at: u64) -> u8 {
        match at {
            0 => MANUFACTURER_INTEL,
            1 => DEVICE_ID,
            _ if at % BLOCK_SIZE == 2 => u8::from(self.read_only),
            _ => 0,
        }
    }

    /// The CFI query byte at `at` (byte addresses of an x8 device).
    fn cfi_byte(&self, at: u64) -> u8 {
        let blocks = (self.size() / BLOCK_SIZE).saturating_sub(1);
        let size_log2 = self.size().next_power_of_two().trailing_zeros() as u8;
        match at {
            0x10 => b'Q',
            0x11 => b'R',
            0x12 => b'Y',
            // Primary command set 0x0001 (Intel/Sharp extended), its table at 0x31.
            0x13 => 0x01,
            0x15 => 0x31,
            // Vcc 2.7–3.6 V, no Vpp.
            0x1b => 0x27,
            0x1c => 0x36,
            // Typical/maximum times: program 2^4 us, erase 2^10 ms (log2 units).
            0x1f => 0x04,
            0x21 => 0x0a,
            0x23 => 0x04,
            0x25 => 0x04,
            0x27 => size_log2,
            // x8 interface, no write buffer, one erase region.
            0x2c => 1,
            0x2d => blocks as u8,
            0x2e => (blocks >> 8) as u8,
            0x2f => (BLOCK_SIZE / 256) as u8,
            0x30 => ((BLOCK_SIZE / 256) >> 8) as u8,
            0x31 => b'P',
            0x32 => b'R',
            0x33 => b'I',
            0x34 => b'1',
            0x35 => b'0',
            _ => 0,
        }
    }
}

impl BusDevice for Pflash {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset.saturating_add(i as u64);
            *d = match self.mode {
                Mode::ReadArray => usize::try_from(at)
                    .ok()
                    .and_then(|a| self.image.get(a))
                    .copied()
                    // Past the end of the image: an unassigned read.
                    .unwrap_or(0xff),
                // Every byte of a wider read is the status, as a byte-wide part gives it on
                // each cycle; also while a program or erase waits for its second write.
                Mode::ReadStatus | Mode::Program | Mode::EraseSetup => self.status,
                Mode::ReadId => self.id_byte(at),
                Mode::Cfi => self.cfi_byte(at),
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else {
            return;
        };
        match self.mode {
            Mode::Program => self.program(offset, data),
            Mode::EraseSetup => {
                if v == 0xd0 {
                    self.erase(offset);
                } else {
                    self.status |= status::PROGRAM_ERROR | status::ERASE_ERROR;
                    self.mode = Mode::ReadStatus;
                }
            }
            _ => self.command(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};

    const SIZE: usize = 0x84000;

    /// A flash over a temporary file filled like an erased store, with byte 0 = `first`.
    fn flash(first: u8, read_only: bool) -> (Pflash, tempfile::NamedTempFile) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let mut img = vec![0xffu8; SIZE];
        img[0] = first;
        img[1] = 0x11;
        f.write_all(&img).unwrap();
        f.flush().unwrap();
        let p = Pflash::open(f.path(), read_only).unwrap();
        (p, f)
    }

    fn rd(p: &mut Pflash, at: u64) -> u8 {
        let mut d = [0u8];
        p.read(at, &mut d);
        d[0]
    }

    fn file_bytes(f: &mut tempfile::NamedTempFile) -> Vec<u8> {
        let mut v = Vec::new();
        let file = f.as_file_mut();
        file.seek(SeekFrom::Start(0)).unwrap();
        file.read_to_end(&mut v).unwrap();
        v
    }

    /// OVMF's QemuFlashDetected: remember byte 0, write 0x50, read (must still be the array
    /// byte, or it is RAM), write 0x70, read (0x00 means flash, 0x50 RAM, anything else ROM),
    /// then 0xFF.
    fn ovmf_probe(p: &mut Pflash) -> &'static str {
        let original = rd(p, 0);
        p.write(0, &[0x50]);
        let probe = rd(p, 0);
        if original != 0x00 && probe == 0x00 {
            return "RAM";
        }
        p.write(0, &[0x70]);
        let probe = rd(p, 0);
        let verdict = match probe {
            0x50 => "RAM",
            0x00 => "FLASH",
            _ => "ROM",
        };
        p.write(0, &[0xff]);
        verdict
    }

    #[test]
    fn ovmf_probe_finds_flash() {
        // The real VARS image starts with the FV header's zero vector; try a non-zero byte
        // too, which takes the probe's other branch.
        for first in [0x00, 0xab] {
            let (mut p, _f) = flash(first, false);
            assert_eq!(ovmf_probe(&mut p), "FLASH", "byte 0 = {first:#x}");
            assert_eq!(rd(&mut p, 0), first, "back in read-array mode");
            // The exact reads: after 0x50 the array byte, after 0x70 the cleared status.
            p.write(0, &[0x50]);
            assert_eq!(rd(&mut p, 0), first);
            p.write(0, &[0x70]);
            assert_eq!(rd(&mut p, 0), 0x00);
            p.write(0, &[0xff]);
        }
    }

    #[test]
    fn program_and_read_back_in_every_width() {
        let (mut p, mut f) = flash(0, false);
        for (i, b) in [0x12u8, 0x34, 0x56, 0x78, 0x9a, 0xbc, 0xde, 0xf0]
            .iter()
            .enumerate()
        {
            p.write(0x1000 + i as u64, &[0x10]);
            p.write(0x1000 + i as u64, &[*b]);
            assert_eq!(rd(&mut p, 0x1000), status::READY, "status after a program");
        }
        p.write(0x1000, &[0xff]);
        let mut d = [0u8; 8];
        p.read(0x1000, &mut d);
        assert_eq!(u64::from_le_bytes(d), 0xf0de_bc9a_7856_3412);
        let mut d = [0u8; 4];
        p.read(0x1002, &mut d);
        assert_eq!(u32::from_le_bytes(d), 0xbc9a_7856);
        let mut d = [0u8; 2];
        p.read(0x1006, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0xf0de);
        // Plain write: bits can be set again without an erase.
        p.write(0x1000, &[0x40]);
        p.write(0x1000, &[0xff]);
        p.write(0, &[0xff]);
        assert_eq!(rd(&mut p, 0x1000), 0xff);
        // A wider program writes all its bytes.
        p.write(0x2000, &[0x10]);
        p.write(0x2000, &0xa1b2_c3d4u32.to_le_bytes());
        p.write(0, &[0xff]);
        assert_eq!(&p.image()[0x2000..0x2004], &[0xd4, 0xc3, 0xb2, 0xa1]);
        assert_eq!(
            &file_bytes(&mut f)[0x1001..0x1008],
            &p.image()[0x1001..0x1008]
        );
    }

    #[test]
    fn block_erase_fills_one_block() {
        let (mut p, mut f) = flash(0, false);
        for at in [0x2fff, 0x3000, 0x3fff, 0x4000] {
            p.write(at, &[0x10]);
            p.write(at, &[0x00]);
        }
        p.write(0x3123, &[0x20]);
        p.write(0x3456, &[0xd0]);
        assert_eq!(rd(&mut p, 0), status::READY);
        p.write(0, &[0xff]);
        assert_eq!(rd(&mut p, 0x2fff), 0x00);
        assert!(p.image()[0x3000..0x4000].iter().all(|b| *b == 0xff));
        assert_eq!(rd(&mut p, 0x4000), 0x00);
        assert_eq!(file_bytes(&mut f), p.image());
        // A broken sequence: error bits, nothing erased.
        p.write(0x4000, &[0x20]);
        p.write(0x4000, &[0xff]);
        assert_eq!(
            rd(&mut p, 0x4000),
            status::READY | status::PROGRAM_ERROR | status::ERASE_ERROR
        );
        p.write(0, &[0x50]);
        p.write(0, &[0x70]);
        assert_eq!(rd(&mut p, 0), 0);
        p.write(0, &[0xff]);
        assert_eq!(rd(&mut p, 0x4000), 0x00);
    }

    #[test]
    fn writes_survive_reopening_the_file() {
        let (mut p, f) = flash(0, false);
        p.write(0x10, &[0x10]);
        p.write(0x10, &[0x5a]);
        p.write(0x8000, &[0x20]);
        p.write(0x8000, &[0xd0]);
        p.write(0, &[0xff]);
        assert!(!p.dirty, "read array after writes syncs");
        p.flush().unwrap();
        drop(p);
        let mut q = Pflash::open(f.path(), false).unwrap();
        assert_eq!(rd(&mut q, 0x10), 0x5a);
        assert_eq!(rd(&mut q, 0x8000), 0xff);
        assert_eq!(rd(&mut q, 1), 0x11);
    }

    #[test]
    fn read_only_store_refuses_programs_and_erases() {
        let (mut p, mut f) = flash(0, true);
        p.write(0x10, &[0x10]);
        p.write(0x10, &[0x5a]);
        assert_eq!(
            rd(&mut p, 0),
            status::READY | status::PROGRAM_ERROR | status::LOCKED
        );
        p.write(0, &[0x50]);
        p.write(0x1000, &[0x20]);
        p.write(0x1000, &[0xd0]);
        assert_eq!(
            rd(&mut p, 0),
            status::READY | status::ERASE_ERROR | status::LOCKED
        );
        p.write(0, &[0xff]);
        assert_eq!(rd(&mut p, 0x10), 0xff);
        assert_eq!(rd(&mut p, 0x1000), 0xff);
        let mut expect = vec![0xffu8; SIZE];
        expect[0] = 0;
        expect[1] = 0x11;
        assert_eq!(file_bytes(&mut f), expect);
        // The identifier mode shows the blocks locked.
        p.write(0, &[0x90]);
        assert_eq!(rd(&mut p, 0x1002), 1);
    }

    #[test]
    fn identifier_and_cfi_query() {
        let (mut p, _f) = flash(0, false);
        p.write(0, &[0x90]);
        assert_eq!(
            [rd(&mut p, 0), rd(&mut p, 1), rd(&mut p, 2)],
            [0x89, 0x18, 0]
        );
        p.write(0, &[0x98]);
        assert_eq!(
            [rd(&mut p, 0x10), rd(&mut p, 0x11), rd(&mut p, 0x12)],
            *b"QRY"
        );
        assert_eq!(rd(&mut p, 0x13), 1);
        let blocks = u16::from_le_bytes([rd(&mut p, 0x2d), rd(&mut p, 0x2e)]);
        assert_eq!(u64::from(blocks) + 1, SIZE as u64 / BLOCK_SIZE);
        let bsize = u16::from_le_bytes([rd(&mut p, 0x2f), rd(&mut p, 0x30)]);
        assert_eq!(u64::from(bsize) * 256, BLOCK_SIZE);
        assert!(1u64 << rd(&mut p, 0x27) >= SIZE as u64);
        p.write(0, &[0xff]);
        assert_eq!(rd(&mut p, 0x10), 0xff);
        // Unknown command: read array.
        p.write(0, &[0x70]);
        p.write(0, &[0x42]);
        assert_eq!(rd(&mut p, 1), 0x11);
        // reset(): read array, ready.
        p.write(0, &[0x50]);
        p.write(0, &[0x70]);
        p.reset();
        assert_eq!(rd(&mut p, 1), 0x11);
        p.write(0, &[0x70]);
        assert_eq!(rd(&mut p, 0), status::READY);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_file_name() {
        for size in [0usize, 4095, 4097, 0x84001] {
            let f = tempfile::NamedTempFile::new().unwrap();
            f.as_file().set_len(size as u64).unwrap();
            let e = Pflash::open(f.path(), false).err().unwrap();
            assert!(matches!(e, PflashError::BadSize { .. }), "{e}");
            assert!(e.to_string().contains(&f.path().display().to_string()));
        }
        let e = Pflash::open(Path::new("/nonexistent/vars.fd"), true)
            .err()
            .unwrap();
        assert!(matches!(e, PflashError::Io { .. }));
        assert!(e.to_string().contains("/nonexistent/vars.fd"));
    }

    #[test]
    fn random_accesses_never_panic_or_grow_the_image() {
        let (mut p, mut f) = flash(0, false);
        let mut r = rvirt_testkit::XorShift(0xf1a5_0001);
        for _ in 0..50_000 {
            let x = r.next_u64();
            // Mostly in range, sometimes at the very end or far past it.
            let at = match x % 8 {
                0 => u64::MAX - (x >> 60),
                1 => SIZE as u64 - 1 - (x >> 61),
                _ => (x >> 16) % SIZE as u64,
            };
            let len = [1usize, 2, 4, 8][((x >> 8) % 4) as usize];
            let cmd =
                [0x10, 0x40, 0x20, 0xd0, 0x50, 0x70, 0x90, 0x98, 0xff][(x >> 40) as usize % 9];
            if x & 0x10 != 0 {
                let mut d = [0u8; 8];
                p.read(at, &mut d[..len]);
            } else if x & 0x20 != 0 {
                p.write(at, &(x >> 24).to_le_bytes()[..len]);
            } else {
                p.write(at, &[cmd]);
            }
            assert_eq!(p.image().len(), SIZE);
        }
        p.write(0, &[0xff]);
        p.flush().unwrap();
        assert_eq!(
            file_bytes(&mut f).len(),
            SIZE,
            "nothing written past the image"
        );
        assert_eq!(file_bytes(&mut f), p.image());
    }
}
