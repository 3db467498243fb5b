//! The CMOS RTC at ports 0x70 (index) and 0x71 (data): the current UTC time in BCD, 24-hour
//! mode, no alarms; and the NVRAM bytes PC firmware reads for the memory size and CPU count
//! (SeaBIOS sizes RAM from them when fw_cfg has no e820 table, and counts CPUs from 0x5f),
//! laid out as on QEMU's pc/q35 machines. Other NVRAM bytes read back what the guest wrote
//! (firmware keeps its shutdown status byte there).

use crate::bus::BusDevice;
use crate::layout::ram_regions;

/// First NVRAM byte after the clock registers 0x00-0x0d.
const NVRAM_START: usize = 0x0e;
/// Base memory in KiB (0x15/0x16), extended memory above 1 MiB in KiB (0x17/0x18 and its copy
/// 0x30/0x31), memory above 16 MiB below 4 GiB in 64 KiB units (0x34/0x35), memory above
/// 4 GiB in 64 KiB units (0x5b-0x5d), vCPU count - 1 (0x5f).
const BASE_KIB: usize = 0x15;
const EXT_KIB: usize = 0x17;
const EXT_KIB_COPY: usize = 0x30;
const ABOVE_16M: usize = 0x34;
const ABOVE_4G: usize = 0x5b;
const CPUS_MINUS_1: usize = 0x5f;

/// CMOS index/data pair and its 128 bytes of NVRAM.
pub struct Cmos {
    index: u8,
    nvram: [u8; 128],
}

impl Default for Cmos {
    /// No memory or CPU bytes (tests of the clock).
    fn default() -> Self {
        Cmos {
            index: 0,
            nvram: [0; 128],
        }
    }
}

fn bcd(v: u32) -> u8 {
    (((v / 10) << 4) | (v % 10)) as u8
}

/// Current UTC time as (sec, min, hour, mday, month, year, wday).
fn utc_now() -> (u32, u32, u32, u32, u32, i64, u32) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400) as u32;
    // Civil from days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    let wday = ((days + 4).rem_euclid(7) + 1) as u32;
    (rem % 60, (rem / 60) % 60, rem / 3600, d, m, y, wday)
}

impl Cmos {
    /// CMOS of a VM with `ram` bytes of RAM (split at the PCI hole as [`ram_regions`] does)
    /// and `cpus` boot vCPUs.
    pub fn new(ram: u64, cpus: u32) -> Self {
        let mut c = Cmos::default();
        let regions = ram_regions(ram);
        let below_4g = regions.first().map_or(0, |r| r.1);
        let above_4g: u64 = regions.iter().skip(1).map(|r| r.1).sum();
        let le16 = |v: u64| (v.min(0xffff) as u16).to_le_bytes();
        c.nvram[BASE_KIB..BASE_KIB + 2].copy_from_slice(&le16(640));
        let ext = le16((below_4g / 1024).saturating_sub(1024));
        c.nvram[EXT_KIB..EXT_KIB + 2].copy_from_slice(&ext);
        c.nvram[EXT_KIB_COPY..EXT_KIB_COPY + 2].copy_from_slice(&ext);
        let above_16m = below_4g.saturating_sub(16 << 20) >> 16;
        c.nvram[ABOVE_16M..ABOVE_16M + 2].copy_from_slice(&le16(above_16m));
        let high = (above_4g >> 16).min(0xff_ffff) as u32;
        c.nvram[ABOVE_4G..ABOVE_4G + 3].copy_from_slice(&high.to_le_bytes()[..3]);
        c.nvram[CPUS_MINUS_1] = cpus.saturating_sub(1).min(255) as u8;
        c
    }

    fn data(&self) -> u8 {
        let (s, mi, h, d, mo, y, wd) = utc_now();
        match self.index & 0x7f {
            0x00 => bcd(s),
            0x02 => bcd(mi),
            0x04 => bcd(h),
            0x06 => bcd(wd),
            0x07 => bcd(d),
            0x08 => bcd(mo),
            0x09 => bcd((y % 100) as u32),
            0x32 => bcd((y / 100) as u32),
            0x0a => 0x26, // UIP clear, 32.768 kHz divider
            0x0b => 0x02, // 24 h, BCD
            0x0d => 0x80, // RTC power good
            i if i as usize >= NVRAM_START => self.nvram[i as usize],
            _ => 0,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (1, Some(d)) = (offset, data.first_mut()) {
            *d = self.data();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        match offset {
            0 => self.index = v,
            // The clock and status registers stay as they are (time comes from the host).
            1 if (self.index & 0x7f) as usize >= NVRAM_START => {
                self.nvram[(self.index & 0x7f) as usize] = v
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rtc_is_bcd() {
        let mut c = Cmos::default();
        let mut d = [0u8];
        c.write(0, &[0x0b]);
        c.read(1, &mut d);
        assert_eq!(d[0], 0x02);
        c.write(0, &[0x08]);
        c.read(1, &mut d);
        assert!((0x01..=0x12).contains(&d[0]));
        c.write(0, &[0x04]);
        c.read(1, &mut d);
        assert!(d[0] >> 4 <= 2 && d[0] & 0xf <= 9, "hour {:#x}", d[0]);
    }

    fn byte(c: &mut Cmos, i: u8) -> u8 {
        let mut d = [0u8];
        c.write(0, &[i]);
        c.read(1, &mut d);
        d[0]
    }

    fn word(c: &mut Cmos, i: u8) -> u16 {
        u16::from_le_bytes([byte(c, i), byte(c, i + 1)])
    }

    /// The memory and CPU bytes as PC firmware reads them.
    #[test]
    fn memory_size_and_cpu_count() {
        let mut c = Cmos::new(512 << 20, 2);
        assert_eq!(word(&mut c, 0x15), 640);
        assert_eq!(word(&mut c, 0x17), 0xffff, "511 MiB above 1 MiB is capped");
        assert_eq!(word(&mut c, 0x30), 0xffff);
        assert_eq!(word(&mut c, 0x34), ((512 - 16) << 20 >> 16) as u16);
        assert_eq!(
            (byte(&mut c, 0x5b), byte(&mut c, 0x5c), byte(&mut c, 0x5d)),
            (0, 0, 0)
        );
        assert_eq!(byte(&mut c, 0x5f), 1);

        let mut small = Cmos::new(32 << 20, 1);
        assert_eq!(word(&mut small, 0x17), 31 * 1024);
        assert_eq!(word(&mut small, 0x34), 256);
        assert_eq!(byte(&mut small, 0x5f), 0);

        // 6 GiB: 3 GiB below the PCI hole, 3 GiB above 4 GiB in 64 KiB units.
        let mut big = Cmos::new(6 << 30, 4);
        let high = u32::from_le_bytes([
            byte(&mut big, 0x5b),
            byte(&mut big, 0x5c),
            byte(&mut big, 0x5d),
            0,
        ]);
        assert_eq!(u64::from(high), (3u64 << 30) >> 16);
        assert_eq!(
            word(&mut big, 0x34),
            (((3u64 << 30) - (16 << 20)) >> 16) as u16
        );
        assert_eq!(byte(&mut big, 0x5f), 3);
    }

    /// NVRAM keeps what firmware writes there (its shutdown status byte); the clock does not
    /// take writes; the NMI-disable bit of the index is ignored.
    #[test]
    fn nvram_keeps_writes_the_clock_does_not() {
        let mut c = Cmos::new(64 << 20, 1);
        c.write(0, &[0x0f]);
        c.write(1, &[0x0a]);
        assert_eq!(byte(&mut c, 0x8f), 0x0a);
        c.write(0, &[0x0b]);
        c.write(1, &[0x00]);
        assert_eq!(byte(&mut c, 0x0b), 0x02);
        c.write(1, &[]);
        c.read(1, &mut []);
    }
}
