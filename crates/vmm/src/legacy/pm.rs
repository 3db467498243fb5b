//! The ACPI PM I/O block at 0x600, laid out as the ICH9 PMBASE block of QEMU's q35 (where
//! Debian's OVMF and SeaBIOS look for it):
//! - 0x600 PM1a event registers (status 0x600, enable 0x602) and 0x604 the control register:
//!   the power button (PWRBTN_STS/EN, raised on the SCI, GSI 9) and sleep state S5 (poweroff);
//! - 0x608 the ACPI PM timer: a 24-bit counter at 3.579545 MHz, computed from a monotonic clock
//!   on each read (no thread). OVMF's delay loops and Linux's clocksource calibration use it;
//! - 0x620 GPE0: 8 bytes of status (write 1 to clear) then 8 bytes of enable. Nothing raises
//!   a GPE yet, so the status bytes stay 0;
//! - 0x630 SMI_EN, reading 0x20 (APMC_EN) from power-on: there is no SMM, and SeaBIOS skips
//!   its SMI setup when it finds APMC_EN already set; 0x634 SMI_STS (write 1 to clear). Both
//!   are plain registers: nothing here raises an SMI.
//!
//! The FADT points the guest here (see `acpi`). [`Apm`] is the APM control/status latch at
//! 0xB2/0xB3 (the FADT's SMI_CMD on QEMU), again without an SMI behind it.

use std::time::Instant;

use rvirt_api::vmm::ExitReason;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::messages::{Mailbox, VmmMessage};

/// PM1 status: power button pressed.
pub const PM1_PWRBTN_STS: u16 = 1 << 8;
/// PM1 enable: power button.
pub const PM1_PWRBTN_EN: u16 = 1 << 8;
/// Bytes of the block: PM1a event (4) and control (2), the PM timer at 8, GPE0 at 0x20 (16),
/// SMI_EN at 0x30 and SMI_STS at 0x34 (4 each).
pub const PM_BLOCK_LEN: u64 = 0x38;
const CNT_OFFSET: u64 = 4;
const CNT_LEN: u64 = 2;
/// Offset of the PM timer (PMBASE + 8, where OVMF's AcpiTimerLib reads it).
pub const TMR_OFFSET: u64 = 8;
/// Offset of the GPE0 block and its length (status bytes, then as many enable bytes).
pub const GPE0_OFFSET: u64 = 0x20;
/// Bytes of GPE0 (the FADT's GPE0_BLK_LEN).
pub const GPE0_LEN: u64 = 16;
const GPE0_HALF: usize = (GPE0_LEN / 2) as usize;
/// Offsets of SMI_EN and SMI_STS.
pub const SMI_EN_OFFSET: u64 = 0x30;
pub const SMI_STS_OFFSET: u64 = 0x34;
/// SMI_EN's APMC_EN bit, set from power-on (see the module documentation).
pub const SMI_EN_APMC_EN: u32 = 1 << 5;
/// PM timer frequency, Hz.
pub const PM_TIMER_HZ: u64 = 3_579_545;
/// The timer counts in 24 bits (the FADT must not set TMR_VAL_EXT).
const TMR_MASK: u64 = 0xff_ffff;
const SLP_EN: u16 = 1 << 13;
const SLP_TYP_S5: u16 = 5;

/// The PM1a event and control registers.
pub struct Pm {
    sts: u16,
    en: u16,
    cnt: u16,
    /// SCI (GSI 9); `None` in tests that do not look at it.
    sci: Option<EventFd>,
    mailbox: Mailbox,
    gpe_sts: [u8; GPE0_HALF],
    gpe_en: [u8; GPE0_HALF],
    smi_en: u32,
    smi_sts: u32,
    /// Nanoseconds since the timer started (a monotonic clock; tests inject one).
    clock: Box<dyn Fn() -> u64 + Send>,
}

/// Ticks of the PM timer `ns` nanoseconds after it started, in 24 bits.
pub fn pm_timer_ticks(ns: u64) -> u32 {
    // u128: ns * 3579545 overflows u64 after about 85 minutes.
    ((u128::from(ns) * u128::from(PM_TIMER_HZ) / 1_000_000_000) as u64 & TMR_MASK) as u32
}

impl Pm {
    /// SCI_EN set: the guest finds ACPI mode already enabled (there is no SMI_CMD).
    /// The PM timer counts from the call.
    pub fn new(sci: Option<EventFd>, mailbox: Mailbox) -> Self {
        let start = Instant::now();
        Self::with_clock(
            sci,
            mailbox,
            Box::new(move || start.elapsed().as_nanos() as u64),
        )
    }

    /// As [`Pm::new`], with the timer driven by `clock` (nanoseconds since some start,
    /// non-decreasing).
    pub fn with_clock(
        sci: Option<EventFd>,
        mailbox: Mailbox,
        clock: Box<dyn Fn() -> u64 + Send>,
    ) -> Self {
        Pm {
            sts: 0,
            en: 0,
            cnt: 1,
            sci,
            mailbox,
            gpe_sts: [0; GPE0_HALF],
            gpe_en: [0; GPE0_HALF],
            smi_en: SMI_EN_APMC_EN,
            smi_sts: 0,
            clock,
        }
    }

    fn raise_sci(&self) {
        if let Some(sci) = &self.sci {
            let _ = sci.write(1);
        }
    }

    /// Presses the ACPI power button: sets PWRBTN_STS and raises the SCI if enabled.
    pub fn power_button(&mut self) {
        self.sts |= PM1_PWRBTN_STS;
        if self.en & PM1_PWRBTN_EN != 0 {
            self.raise_sci();
        }
    }

    fn write_event(&mut self, offset: u64, data: &[u8]) {
        let mut cur = ((u32::from(self.en) << 16) | u32::from(self.sts)).to_le_bytes();
        let mut wr = [0u8; 4];
        for (i, d) in data.iter().enumerate() {
            let at = offset as usize + i;
            if at < 4 {
                wr[at] = *d;
                if at >= 2 {
                    cur[at] = *d;
                }
            }
        }
        // Status bits are write-1-to-clear.
        let clear = u16::from_le_bytes([wr[0], wr[1]]);
        let acked = self.sts & clear;
        self.sts &= !clear;
        let en = u16::from_le_bytes([cur[2], cur[3]]);
        let newly_enabled = en & !self.en;
        self.en = en;
        // The SCI is level-triggered: enabling an event that is already pending raises it.
        if self.sts & newly_enabled & PM1_PWRBTN_STS != 0 {
            self.raise_sci();
        }
        // Only acknowledging a pending press counts: ACPICA writes every status bit at start-up
        // (and before installing the button handler) to clear stale events.
        if acked & PM1_PWRBTN_STS != 0 {
            self.mailbox.send(VmmMessage::ShuttingDown);
        }
    }

    fn write_control(&mut self, offset: u64, data: &[u8]) {
        let mut b = self.cnt.to_le_bytes();
        for (i, d) in data.iter().enumerate() {
            if let Some(slot) = b.get_mut(offset as usize + i) {
                *slot = *d;
            }
        }
        let v = u16::from_le_bytes(b);
        // SLP_EN is write-only; SCI_EN (bit 0) stays set.
        self.cnt = (v & !SLP_EN) | 1;
        if v & SLP_EN != 0 && (v >> 10) & 7 == SLP_TYP_S5 {
            log::info!("ACPI S5 requested: poweroff");
            self.mailbox.exit(ExitReason::Poweroff);
        }
    }
}

impl Pm {
    /// Byte `at` of the block; `tmr` is the timer value sampled once for the whole access.
    fn reg_byte(&self, at: u64, tmr: u32) -> u8 {
        let byte = |v: u64, i: u64| (v >> (8 * i)) as u8;
        match at {
            0..=3 => byte((u64::from(self.en) << 16) | u64::from(self.sts), at),
            4..=5 => byte(u64::from(self.cnt), at - CNT_OFFSET),
            8..=11 => byte(u64::from(tmr), at - TMR_OFFSET),
            0x20..=0x2f => {
                let i = (at - GPE0_OFFSET) as usize;
                if i < GPE0_HALF {
                    self.gpe_sts[i]
                } else {
                    self.gpe_en[i - GPE0_HALF]
                }
            }
            0x30..=0x33 => byte(u64::from(self.smi_en), at - SMI_EN_OFFSET),
            0x34..=0x37 => byte(u64::from(self.smi_sts), at - SMI_STS_OFFSET),
            _ => 0,
        }
    }

    /// One written byte of GPE0 or the SMI registers.
    fn write_misc(&mut self, at: u64, v: u8) {
        match at {
            0x20..=0x2f => {
                let i = (at - GPE0_OFFSET) as usize;
                if i < GPE0_HALF {
                    self.gpe_sts[i] &= !v;
                } else {
                    self.gpe_en[i - GPE0_HALF] = v;
                }
            }
            0x30..=0x33 => {
                let sh = 8 * (at - SMI_EN_OFFSET);
                self.smi_en = (self.smi_en & !(0xff << sh)) | (u32::from(v) << sh);
            }
            0x34..=0x37 => self.smi_sts &= !(u32::from(v) << (8 * (at - SMI_STS_OFFSET))),
            // The timer is read-only, the rest of the block is reserved.
            _ => {}
        }
    }
}

impl BusDevice for Pm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let tmr = pm_timer_ticks((self.clock)());
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.reg_byte(offset.saturating_add(i as u64), tmr);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < CNT_OFFSET {
            self.write_event(offset, data);
        } else if offset < CNT_OFFSET + CNT_LEN {
            self.write_control(offset - CNT_OFFSET, data);
        } else {
            for (i, v) in data.iter().enumerate() {
                self.write_misc(offset.saturating_add(i as u64), *v);
            }
        }
    }
}

/// The APM control (0xB2) and status (0xB3) ports: two bytes that read back what was
/// written. No SMI is raised (there is no SMM).
#[derive(Default)]
pub struct Apm {
    regs: [u8; 2],
}

/// Ports of [`Apm`], starting at APM_CNT.
pub const APM_LEN: u64 = 2;

impl BusDevice for Apm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| self.regs.get(o.checked_add(i)?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (i, v) in data.iter().enumerate() {
            if let Some(r) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.regs.get_mut(o.checked_add(i)?))
            {
                *r = *v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::mailbox;

    fn read16(pm: &mut Pm, offset: u64) -> u16 {
        let mut d = [0u8; 2];
        pm.read(offset, &mut d);
        u16::from_le_bytes(d)
    }

    #[test]
    fn s5_powers_off_and_other_sleep_types_do_not() {
        let (m, rx) = mailbox();
        let mut pm = Pm::new(None, m);
        pm.write(CNT_OFFSET, &0x1400u16.to_le_bytes());
        assert!(rx.try_recv().is_err());
        pm.write(CNT_OFFSET, &0x3400u16.to_le_bytes());
        assert!(matches!(
            rx.try_recv(),
            Ok(VmmMessage::Exit(ExitReason::Poweroff))
        ));
        assert_eq!(read16(&mut pm, CNT_OFFSET) & 1, 1, "SCI_EN stays set");
        assert_eq!(read16(&mut pm, CNT_OFFSET) & SLP_EN, 0, "SLP_EN reads 0");
    }

    #[test]
    fn pm1_status_is_write_one_to_clear() {
        let (m, _rx) = mailbox();
        let mut pm = Pm::new(None, m);
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        pm.power_button();
        assert_eq!(read16(&mut pm, 0), PM1_PWRBTN_STS);
        pm.write(0, &PM1_PWRBTN_STS.to_le_bytes());
        assert_eq!(read16(&mut pm, 0), 0);
        assert_eq!(read16(&mut pm, 2), PM1_PWRBTN_EN);
    }

    #[test]
    fn only_acknowledging_a_pending_press_means_shutting_down() {
        let (m, rx) = mailbox();
        let mut pm = Pm::new(None, m);
        // Boot-time clearing of every status bit, nothing pending.
        pm.write(0, &0xffffu16.to_le_bytes());
        assert!(rx.try_recv().is_err());
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        pm.power_button();
        pm.write(0, &PM1_PWRBTN_STS.to_le_bytes());
        assert!(matches!(rx.try_recv(), Ok(VmmMessage::ShuttingDown)));
    }

    #[test]
    fn sci_on_press_when_enabled_and_on_enable_when_pending() {
        let (m, _rx) = mailbox();
        let mut pm = Pm::new(Some(EventFd::new(libc::EFD_NONBLOCK).unwrap()), m);
        let fired = |pm: &Pm| pm.sci.as_ref().unwrap().read().is_ok();
        pm.power_button();
        assert!(!fired(&pm), "SCI while the event is disabled");
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        assert!(fired(&pm), "no SCI when enabling a pending press");
        pm.write(0, &PM1_PWRBTN_STS.to_le_bytes());
        pm.power_button();
        assert!(fired(&pm), "no SCI for a press while enabled");
        // Rewriting the same enable bits does not raise it again.
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        assert!(!fired(&pm));
    }

    #[test]
    fn reads_past_the_block_are_zero_and_wide_reads_span_registers() {
        let (m, _rx) = mailbox();
        // The timer (offset 8) reads 0 at time 0, so bytes 5..9 are all zero.
        let mut pm = Pm::with_clock(None, m, Box::new(|| 0));
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        let mut d = [0u8; 4];
        pm.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(PM1_PWRBTN_EN) << 16);
        let mut d = [0xffu8; 4];
        pm.read(5, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
        let mut d = [0xffu8; 4];
        pm.read(PM_BLOCK_LEN - 1, &mut d);
        assert_eq!(d, [0, 0, 0, 0], "SMI_STS's top byte, then past the block");
    }

    fn read32(pm: &mut Pm, offset: u64) -> u32 {
        let mut d = [0u8; 4];
        pm.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn pm_timer_runs_at_3_579545_mhz() {
        let (m, _rx) = mailbox();
        let mut pm = Pm::new(None, m);
        let t0 = std::time::Instant::now();
        let a = read32(&mut pm, TMR_OFFSET);
        std::thread::sleep(std::time::Duration::from_millis(100));
        let b = read32(&mut pm, TMR_OFFSET);
        let elapsed = t0.elapsed().as_nanos() as u64;
        assert_eq!(a >> 24, 0, "24-bit counter");
        let ticks = u64::from(b.wrapping_sub(a) & 0xff_ffff);
        let expect = elapsed * PM_TIMER_HZ / 1_000_000_000;
        // The two reads lie inside the measured interval; allow 20% for a loaded host.
        assert!(ticks <= expect + 10, "{ticks} ticks in {elapsed} ns");
        assert!(ticks * 10 >= expect * 8, "{ticks} ticks in {elapsed} ns");
    }

    #[test]
    fn pm_timer_wraps_at_24_bits_and_reads_in_any_width() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        let (m, _rx) = mailbox();
        let now = Arc::new(AtomicU64::new(0));
        let n = now.clone();
        let mut pm = Pm::with_clock(None, m, Box::new(move || n.load(Ordering::Relaxed)));
        // One second: 3579545 ticks = 0x369e99.
        now.store(1_000_000_000, Ordering::Relaxed);
        assert_eq!(read32(&mut pm, TMR_OFFSET), 0x36_9e99);
        assert_eq!(read16(&mut pm, TMR_OFFSET), 0x9e99);
        assert_eq!(read16(&mut pm, TMR_OFFSET + 2), 0x36);
        let mut b = [0u8];
        pm.read(TMR_OFFSET + 1, &mut b);
        assert_eq!(b[0], 0x9e);
        // 2^24 ticks take 4.687 s: just before and after the wrap.
        let wrap_ns = (1u64 << 24) * 1_000_000_000 / PM_TIMER_HZ;
        now.store(wrap_ns - 1000, Ordering::Relaxed);
        let before = read32(&mut pm, TMR_OFFSET);
        assert!(before > 0xff_f000, "{before:#x}");
        now.store(wrap_ns + 1000, Ordering::Relaxed);
        let after = read32(&mut pm, TMR_OFFSET);
        assert!(after < 0x1000, "{after:#x}");
        // Hours in: still in 24 bits, no overflow of the multiplication.
        now.store(10 * 3600 * 1_000_000_000, Ordering::Relaxed);
        assert_eq!(read32(&mut pm, TMR_OFFSET) >> 24, 0);
        // The timer ignores writes.
        pm.write(TMR_OFFSET, &[0, 0, 0, 0]);
        now.store(1_000_000_000, Ordering::Relaxed);
        assert_eq!(read32(&mut pm, TMR_OFFSET), 0x36_9e99);
    }

    #[test]
    fn gpe0_enable_is_plain_and_status_write_one_to_clear() {
        let (m, _rx) = mailbox();
        let mut pm = Pm::new(None, m);
        pm.gpe_sts = [0xff; GPE0_HALF];
        pm.write(GPE0_OFFSET, &[0x0f]);
        pm.write(GPE0_OFFSET + 1, &0x8001u16.to_le_bytes());
        let mut st = [0u8; 8];
        pm.read(GPE0_OFFSET, &mut st);
        assert_eq!(st, [0xf0, 0xfe, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff]);
        pm.write(GPE0_OFFSET + 8, &0x1234_5678u32.to_le_bytes());
        assert_eq!(read32(&mut pm, GPE0_OFFSET + 8), 0x1234_5678);
        assert_eq!(read32(&mut pm, GPE0_OFFSET + 12), 0);
        // Writing the enables does not touch the status bytes and vice versa.
        pm.write(GPE0_OFFSET, &[0xff; 4]);
        assert_eq!(read32(&mut pm, GPE0_OFFSET + 8), 0x1234_5678);
        assert_eq!(read32(&mut pm, GPE0_OFFSET), 0);
    }

    #[test]
    fn smi_en_reads_apmc_en_from_power_on_and_is_writable() {
        let (m, rx) = mailbox();
        let mut pm = Pm::new(None, m);
        assert_eq!(read32(&mut pm, SMI_EN_OFFSET), SMI_EN_APMC_EN);
        assert_eq!(read32(&mut pm, SMI_EN_OFFSET) & 0x20, 0x20);
        pm.write(SMI_EN_OFFSET, &0x21u32.to_le_bytes());
        assert_eq!(read32(&mut pm, SMI_EN_OFFSET), 0x21);
        pm.write(SMI_EN_OFFSET + 1, &[0x40]);
        assert_eq!(read32(&mut pm, SMI_EN_OFFSET), 0x4021);
        pm.smi_sts = 0xffff_ffff;
        pm.write(SMI_STS_OFFSET, &0x0000_ff01u32.to_le_bytes());
        assert_eq!(read32(&mut pm, SMI_STS_OFFSET), 0xffff_00fe);
        // None of it reaches the PM1 registers or the VMM.
        assert_eq!(read32(&mut pm, 0), 0);
        assert_eq!(read16(&mut pm, CNT_OFFSET), 1);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn apm_ports_latch_their_values() {
        let mut apm = Apm::default();
        apm.write(0, &[0x5a]);
        apm.write(1, &[0x33]);
        let mut d = [0u8; 2];
        apm.read(0, &mut d);
        assert_eq!(d, [0x5a, 0x33]);
        apm.write(1, &[0x44, 0x55]);
        let mut b = [0u8];
        apm.read(1, &mut b);
        assert_eq!(b, [0x44]);
        let mut d = [0xffu8; 4];
        apm.read(1, &mut d);
        assert_eq!(d, [0x44, 0, 0, 0]);
        apm.write(u64::MAX, &[1, 2]);
    }
}
