//! The firmware debug console at I/O 0x402 (QEMU's `debugcon`): SeaBIOS writes its log there
//! once a read of the port returns 0xE9. Lines go to rvirt-vmm's log at debug level
//! (`RVIRT_LOG=debug`), each cut at 200 bytes, so a chatty or hostile guest costs nothing
//! unless asked for and cannot grow memory.

use crate::bus::BusDevice;

/// The port SeaBIOS and OVMF debug builds write to.
pub const PORT: u16 = 0x402;
/// What a read returns: the presence signature firmware checks.
const SIGNATURE: u8 = 0xe9;
const MAX_LINE: usize = 200;

/// Collects bytes into lines for the log.
#[derive(Default)]
pub struct DebugCon {
    line: Vec<u8>,
}

impl DebugCon {
    fn push(&mut self, b: u8) -> Option<String> {
        if b == b'\n' || self.line.len() >= MAX_LINE {
            let l = String::from_utf8_lossy(&self.line).trim_end().to_string();
            self.line.clear();
            if b != b'\n' {
                self.line.push(b);
            }
            return Some(l);
        }
        self.line.push(b);
        None
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(SIGNATURE);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if !log::log_enabled!(log::Level::Debug) {
            return;
        }
        for b in data {
            if let Some(l) = self.push(*b) {
                log::debug!("firmware: {l}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_capped() {
        let mut d = DebugCon::default();
        let mut r = [0u8; 1];
        d.read(0, &mut r);
        assert_eq!(r[0], 0xe9);
        let got: Vec<_> = b"ab\ncd\n".iter().filter_map(|b| d.push(*b)).collect();
        assert_eq!(got, ["ab", "cd"]);
        let long: Vec<_> = std::iter::repeat_n(b'x', 450)
            .filter_map(|b| d.push(b))
            .collect();
        assert_eq!(long.len(), 2);
        assert!(long.iter().all(|l| l.len() == MAX_LINE));
        assert!(d.line.len() <= MAX_LINE);
    }
}
