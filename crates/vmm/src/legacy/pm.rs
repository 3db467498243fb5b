//! The ACPI PM1a block at I/O 0x600: event registers (status 0x600, enable 0x602) and the
//! control register (0x604), the power button (PWRBTN_STS/EN, raised on the SCI, GSI 9) and
//! sleep state S5 (poweroff). The FADT points the guest here (see `acpi`).

use rvirt_api::vmm::ExitReason;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::messages::{Mailbox, VmmMessage};

/// PM1 status: power button pressed.
pub const PM1_PWRBTN_STS: u16 = 1 << 8;
/// PM1 enable: power button.
pub const PM1_PWRBTN_EN: u16 = 1 << 8;
/// Bytes of the block: 4 of event registers, 2 of control.
pub const PM_BLOCK_LEN: u64 = 6;
const CNT_OFFSET: u64 = 4;
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
}

impl Pm {
    /// SCI_EN set: the guest finds ACPI mode already enabled (there is no SMI_CMD).
    pub fn new(sci: Option<EventFd>, mailbox: Mailbox) -> Self {
        Pm {
            sts: 0,
            en: 0,
            cnt: 1,
            sci,
            mailbox,
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

impl BusDevice for Pm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let regs = (u64::from(self.cnt) << 32) | (u64::from(self.en) << 16) | u64::from(self.sts);
        let b = regs.to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset as usize + i;
            *d = if at < PM_BLOCK_LEN as usize { b[at] } else { 0 };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < CNT_OFFSET {
            self.write_event(offset, data);
        } else {
            self.write_control(offset - CNT_OFFSET, data);
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
        let mut pm = Pm::new(None, m);
        pm.write(2, &PM1_PWRBTN_EN.to_le_bytes());
        let mut d = [0u8; 4];
        pm.read(0, &mut d);
        assert_eq!(u32::from_le_bytes(d), u32::from(PM1_PWRBTN_EN) << 16);
        let mut d = [0xffu8; 4];
        pm.read(5, &mut d);
        assert_eq!(d, [0, 0, 0, 0]);
    }
}
