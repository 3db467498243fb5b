//! Legacy devices emulated on vCPU exits: COM1, i8042 (reset only), CMOS RTC, ACPI PM block,
//! reset register, boot-timer port. PCI is forwarded to `rvirt_devices::pci::PciBus`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use rvirt_api::vmm::ExitReason;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::ports;

/// An interrupt line backed by an irqfd.
pub struct IrqLine(pub EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Where guest serial output goes; `None` output drops bytes.
pub struct SerialOut {
    /// stdout, a pty master, or the connected console client.
    pub sink: Arc<Mutex<Option<Box<dyn Write + Send>>>>,
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut g = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = g.as_mut() {
            if w.write_all(buf).and_then(|_| w.flush()).is_err() {
                // A console client went away: drop output until the next one connects.
                *g = None;
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// COM1 as seen by the vCPUs.
pub type Com1 = Serial<IrqLine, vm_superio::serial::NoEvents, SerialOut>;

/// ACPI PM1 status bits.
pub const PM1_PWRBTN_STS: u16 = 1 << 8;
/// ACPI PM1 enable: power button.
pub const PM1_PWRBTN_EN: u16 = 1 << 8;

/// State of the PM1a block.
#[derive(Default)]
pub struct Pm {
    pub sts: u16,
    pub en: u16,
    pub cnt: u16,
}

/// Callback run on PM1 events.
pub type PmHook = Box<dyn Fn(&Pm) + Send + Sync>;

/// What a port write asked for.
pub type PioOutcome = Option<ExitReason>;

/// Legacy devices shared by all vCPUs.
pub struct Legacy {
    pub com1: Arc<Mutex<Com1>>,
    pub cmos_index: Mutex<u8>,
    pub pm: Arc<Mutex<Pm>>,
    /// SCI (GSI 9) line for the power button.
    pub sci: Option<EventFd>,
    /// Called when the guest acknowledges a power-button press (clears PWRBTN_STS).
    pub on_pm_write: Option<PmHook>,
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

impl Legacy {
    fn cmos_read(&self) -> u8 {
        let idx = *self.cmos_index.lock().unwrap_or_else(|e| e.into_inner()) & 0x7f;
        let (s, mi, h, d, mo, y, wd) = utc_now();
        match idx {
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

    /// Port read. Returns false if no device decodes `port`.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        data.fill(0);
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                data[0] = self
                    .com1
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read((p - ports::COM1) as u8);
            }
            ports::I8042_DATA | ports::I8042_CMD => {}
            ports::CMOS_INDEX => {}
            ports::CMOS_DATA => data[0] = self.cmos_read(),
            p if (ports::PM1A_EVT..ports::PM1A_EVT + 4).contains(&p) => {
                let pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
                let v = (u32::from(pm.en) << 16) | u32::from(pm.sts);
                let b = v.to_le_bytes();
                let off = (p - ports::PM1A_EVT) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = b.get(off + i).copied().unwrap_or(0);
                }
            }
            p if (ports::PM1A_CNT..ports::PM1A_CNT + 2).contains(&p) => {
                let pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
                let b = pm.cnt.to_le_bytes();
                let off = (p - ports::PM1A_CNT) as usize;
                for (i, d) in data.iter_mut().enumerate() {
                    *d = b.get(off + i).copied().unwrap_or(0);
                }
            }
            ports::RESET => {}
            ports::BOOT_TIMER => {}
            _ => return false,
        }
        true
    }

    /// Port write. Returns `(decoded, exit request)`.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> (bool, PioOutcome) {
        let v8 = data.first().copied().unwrap_or(0);
        match port {
            p if (ports::COM1..ports::COM1 + 8).contains(&p) => {
                let _ = self
                    .com1
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write((p - ports::COM1) as u8, v8);
            }
            ports::I8042_CMD if v8 == 0xfe => {
                log::info!("i8042 reset line pulsed: reboot");
                return (true, Some(ExitReason::Reboot));
            }
            ports::I8042_DATA | ports::I8042_CMD => {}
            ports::CMOS_INDEX => *self.cmos_index.lock().unwrap_or_else(|e| e.into_inner()) = v8,
            ports::CMOS_DATA => {}
            p if (ports::PM1A_EVT..ports::PM1A_EVT + 4).contains(&p) => {
                let mut pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
                let mut cur = ((u32::from(pm.en) << 16) | u32::from(pm.sts)).to_le_bytes();
                let off = (p - ports::PM1A_EVT) as usize;
                let mut wr = [0u8; 4];
                for (i, d) in data.iter().enumerate() {
                    if off + i < 4 {
                        wr[off + i] = *d;
                        if off + i >= 2 {
                            cur[off + i] = *d;
                        }
                    }
                }
                // Status bits are write-1-to-clear.
                let clear = u16::from_le_bytes([wr[0], wr[1]]);
                let acked = pm.sts & clear;
                pm.sts &= !clear;
                let newly_enabled = u16::from_le_bytes([cur[2], cur[3]]) & !pm.en;
                pm.en = u16::from_le_bytes([cur[2], cur[3]]);
                // The SCI is level-triggered: enabling an event that is already pending raises it.
                if pm.sts & newly_enabled & PM1_PWRBTN_STS != 0 {
                    if let Some(sci) = &self.sci {
                        let _ = sci.write(1);
                    }
                }
                // Only acknowledging a pending press counts: ACPICA writes every status bit at
                // start-up (and before installing the button handler) to clear stale events.
                if acked & PM1_PWRBTN_STS != 0 {
                    if let Some(cb) = &self.on_pm_write {
                        cb(&pm);
                    }
                }
            }
            p if (ports::PM1A_CNT..ports::PM1A_CNT + 2).contains(&p) => {
                let mut pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
                let mut b = pm.cnt.to_le_bytes();
                let off = (p - ports::PM1A_CNT) as usize;
                for (i, d) in data.iter().enumerate() {
                    if off + i < 2 {
                        b[off + i] = *d;
                    }
                }
                let v = u16::from_le_bytes(b);
                // SLP_EN is write-only; SCI_EN (bit 0) stays set.
                pm.cnt = (v & !(1 << 13)) | 1;
                let slp_typ = (v >> 10) & 7;
                if v & (1 << 13) != 0 && slp_typ == 5 {
                    log::info!("ACPI S5 requested: poweroff");
                    return (true, Some(ExitReason::Poweroff));
                }
            }
            ports::RESET => {
                if v8 & 0x04 != 0 {
                    log::info!("reset register written: reboot");
                    return (true, Some(ExitReason::Reboot));
                }
            }
            ports::BOOT_TIMER => {
                let ms = crate::start_instant().elapsed().as_secs_f64() * 1000.0;
                eprintln!("boot-timer: {ms:.1} ms since exec");
            }
            _ => return (false, None),
        }
        (true, None)
    }

    /// Press the ACPI power button: set PWRBTN_STS and raise the SCI if enabled.
    pub fn power_button(&self) {
        let mut pm = self.pm.lock().unwrap_or_else(|e| e.into_inner());
        pm.sts |= PM1_PWRBTN_STS;
        if pm.en & PM1_PWRBTN_EN != 0 {
            if let Some(sci) = &self.sci {
                let _ = sci.write(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy() -> Legacy {
        let out = SerialOut {
            sink: Arc::new(Mutex::new(None)),
        };
        Legacy {
            com1: Arc::new(Mutex::new(Serial::new(
                IrqLine(EventFd::new(0).unwrap()),
                out,
            ))),
            cmos_index: Mutex::new(0),
            pm: Arc::new(Mutex::new(Pm::default())),
            sci: None,
            on_pm_write: None,
        }
    }

    #[test]
    fn s5_and_resets() {
        let l = legacy();
        assert_eq!(
            l.pio_write(ports::PM1A_CNT, &0x3400u16.to_le_bytes()),
            (true, Some(ExitReason::Poweroff))
        );
        assert_eq!(
            l.pio_write(ports::PM1A_CNT, &0x1400u16.to_le_bytes()),
            (true, None)
        );
        assert_eq!(
            l.pio_write(ports::I8042_CMD, &[0xfe]),
            (true, Some(ExitReason::Reboot))
        );
        assert_eq!(
            l.pio_write(ports::RESET, &[0x06]),
            (true, Some(ExitReason::Reboot))
        );
        assert_eq!(l.pio_write(0x1234, &[1]), (false, None));
    }

    #[test]
    fn pm1_status_is_write_one_to_clear() {
        let l = legacy();
        l.pio_write(ports::PM1A_EVT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        l.power_button();
        let mut d = [0u8; 2];
        l.pio_read(ports::PM1A_EVT, &mut d);
        assert_eq!(u16::from_le_bytes(d), PM1_PWRBTN_STS);
        l.pio_write(ports::PM1A_EVT, &PM1_PWRBTN_STS.to_le_bytes());
        l.pio_read(ports::PM1A_EVT, &mut d);
        assert_eq!(u16::from_le_bytes(d), 0);
        l.pio_read(ports::PM1A_EVT + 2, &mut d);
        assert_eq!(u16::from_le_bytes(d), PM1_PWRBTN_EN);
    }

    #[test]
    fn only_acknowledging_a_pending_press_runs_the_hook() {
        let mut l = legacy();
        let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let c = n.clone();
        l.on_pm_write = Some(Box::new(move |_| {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
        // Boot-time clearing of every status bit, nothing pending.
        l.pio_write(ports::PM1A_EVT, &0xffffu16.to_le_bytes());
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 0);
        l.pio_write(ports::PM1A_EVT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        l.power_button();
        l.pio_write(ports::PM1A_EVT, &PM1_PWRBTN_STS.to_le_bytes());
        assert_eq!(n.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn sci_on_press_when_enabled_and_on_enable_when_pending() {
        let mut l = legacy();
        l.sci = Some(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let fired = |l: &Legacy| l.sci.as_ref().unwrap().read().is_ok();
        l.power_button();
        assert!(!fired(&l), "SCI while the event is disabled");
        l.pio_write(ports::PM1A_EVT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        assert!(fired(&l), "no SCI when enabling a pending press");
        l.pio_write(ports::PM1A_EVT, &PM1_PWRBTN_STS.to_le_bytes());
        l.power_button();
        assert!(fired(&l), "no SCI for a press while enabled");
        // Rewriting the same enable bits does not raise it again.
        l.pio_write(ports::PM1A_EVT + 2, &PM1_PWRBTN_EN.to_le_bytes());
        assert!(!fired(&l));
    }

    #[test]
    fn rtc_is_bcd() {
        let l = legacy();
        l.pio_write(ports::CMOS_INDEX, &[0x0b]);
        let mut d = [0u8];
        l.pio_read(ports::CMOS_DATA, &mut d);
        assert_eq!(d[0], 0x02);
        l.pio_write(ports::CMOS_INDEX, &[0x08]);
        l.pio_read(ports::CMOS_DATA, &mut d);
        assert!((0x01..=0x12).contains(&d[0]));
    }
}
