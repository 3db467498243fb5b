//! The reset control register at 0xCF9 (bit 2, the FADT's reset register): a write asks the
//! VMM for a reboot. The i8042's reset line (command 0xFE on port 0x64) does the same from
//! [`super::i8042`].

use rvirt_api::vmm::ExitReason;

use crate::bus::BusDevice;
use crate::messages::Mailbox;

/// The reset control register (0xCF9).
pub struct ResetControl {
    mailbox: Mailbox,
}

impl ResetControl {
    pub fn new(mailbox: Mailbox) -> Self {
        ResetControl { mailbox }
    }
}

impl BusDevice for ResetControl {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first().is_some_and(|v| v & 0x04 != 0) {
            log::info!("reset register written: reboot");
            self.mailbox.exit(ExitReason::Reboot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{mailbox, VmmMessage};

    fn exit_of(rx: &std::sync::mpsc::Receiver<VmmMessage>) -> Option<ExitReason> {
        match rx.try_recv() {
            Ok(VmmMessage::Exit(r)) => Some(r),
            _ => None,
        }
    }

    #[test]
    fn reset_register_reboots_on_bit_2() {
        let (m, rx) = mailbox();
        let mut r = ResetControl::new(m);
        r.write(0, &[0x02]);
        assert_eq!(exit_of(&rx), None);
        r.write(0, &[0x06]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
    }
}
