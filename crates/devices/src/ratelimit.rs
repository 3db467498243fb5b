//! Rate-limited logging for paths a guest can trigger at will (bad descriptors, bad config
//! writes): one message per call site per second, with a count of what was suppressed, so a
//! hostile guest cannot fill the host's logs.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

const INTERVAL_MS: u64 = 1000;

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +INTERVAL so that the very first message of a call site is never suppressed.
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + INTERVAL_MS
}

/// The state of one call site.
#[derive(Debug)]
pub struct RateLimit {
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimit {
    /// A limiter that lets the first message through.
    pub const fn new() -> Self {
        RateLimit {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(number of messages suppressed since the last one)` when a message may be logged
    /// now, `None` when it must be dropped.
    pub fn check(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= INTERVAL_MS
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

/// `log::warn!` limited to one message per second per call site; for guest-triggerable events.
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                log::warn!("{} ({} similar messages suppressed)", format_args!($($arg)*), suppressed);
            } else {
                log::warn!($($arg)*);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn first_message_passes_then_burst_is_suppressed() {
        let l = RateLimit::new();
        assert_eq!(l.check(), Some(0));
        for _ in 0..100 {
            assert_eq!(l.check(), None);
        }
    }
}
