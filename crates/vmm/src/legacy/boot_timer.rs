//! rvirt's boot-timer port (0x440): a guest write logs the time since the VMM process
//! started, so the boot time up to any point the guest chooses (e.g. its /init) can be read
//! from the VMM's log. A guest writing it in a loop gets one line per second at most.

use rvirt_devices::ratelimit::RateLimit;

use crate::bus::BusDevice;

#[derive(Default)]
pub struct BootTimer {
    limit: RateLimit,
}

impl BootTimer {
    /// The line for a write now, or `None` while rate-limited.
    fn line(&self) -> Option<String> {
        let suppressed = self.limit.check()?;
        let ms = crate::start_instant().elapsed().as_secs_f64() * 1000.0;
        Some(if suppressed == 0 {
            format!("boot-timer: {ms:.1} ms since exec")
        } else {
            format!("boot-timer: {ms:.1} ms since exec ({suppressed} earlier writes not logged)")
        })
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, _data: &mut [u8]) {}

    fn write(&mut self, _offset: u64, _data: &[u8]) {
        if let Some(l) = self.line() {
            // On stderr as before: benchmarks and tests read this exact line.
            eprintln!("{l}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_flood_logs_once_per_second() {
        let t = BootTimer::default();
        assert!(t.line().unwrap().starts_with("boot-timer: "));
        let logged = (0..10_000).filter(|_| t.line().is_some()).count();
        assert_eq!(
            logged, 0,
            "a flood right after the first write is not logged"
        );
    }
}
