//! The CMOS RTC at ports 0x70 (index) and 0x71 (data): the current UTC time in BCD, 24-hour
//! mode; no alarms, no NVRAM contents (reads 0).

use crate::bus::BusDevice;

/// CMOS index/data pair.
#[derive(Default)]
pub struct Cmos {
    index: u8,
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
            _ => 0,
        }
    }
}

impl BusDevice for Cmos {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset == 1 {
            data[0] = self.data();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.index = data.first().copied().unwrap_or(0);
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
}
