//! Ways the guest resets the machine: the reset control register at 0xCF9 (bit 2, the FADT's
//! reset register) and the i8042 keyboard controller's reset line (command 0xFE on port 0x64).
//! Both ask the VMM for a reboot; the i8042 otherwise answers like a controller with no keys.

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

/// One port of the i8042 (data 0x60 or command 0x64).
pub struct I8042 {
    /// Set on the command port: the reset pulse goes here.
    mailbox: Option<Mailbox>,
}

impl I8042 {
    /// The data port: reads 0, writes ignored.
    pub fn data_port() -> Self {
        I8042 { mailbox: None }
    }

    /// The command/status port: 0xFE pulses the reset line.
    pub fn command_port(mailbox: Mailbox) -> Self {
        I8042 {
            mailbox: Some(mailbox),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let (Some(m), Some(0xfe)) = (&self.mailbox, data.first()) {
            log::info!("i8042 reset line pulsed: reboot");
            m.exit(ExitReason::Reboot);
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
    fn reset_register_and_i8042_pulse_reboot() {
        let (m, rx) = mailbox();
        let mut r = ResetControl::new(m.clone());
        r.write(0, &[0x02]);
        assert_eq!(exit_of(&rx), None);
        r.write(0, &[0x06]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
        let mut cmd = I8042::command_port(m);
        cmd.write(0, &[0xd1]);
        assert_eq!(exit_of(&rx), None);
        cmd.write(0, &[0xfe]);
        assert_eq!(exit_of(&rx), Some(ExitReason::Reboot));
        let mut data = I8042::data_port();
        data.write(0, &[0xfe]);
        let mut d = [0xffu8];
        data.read(0, &mut d);
        assert_eq!(exit_of(&rx), None);
    }
}
