//! The `log` backend of rvirt-vmm: one line per record on stderr, which rvirtd appends to the
//! domain's log file. `RVIRT_LOG=error|warn|info|debug|trace` sets the level (default info).
//! Lines a guest can trigger at will are rate-limited where they are logged
//! (`rvirt_devices::guest_warn!`), not here.

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata<'_>) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record<'_>) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // One write per line, so lines of different threads do not interleave.
        let line = format!(
            "rvirt-vmm: {}: {}: {}\n",
            r.level().as_str().to_ascii_lowercase(),
            r.target(),
            r.args()
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// The level named by `RVIRT_LOG`; info when unset, with a warning when unknown.
pub fn level_from(value: Option<&str>) -> (LevelFilter, Option<String>) {
    match value.map(str::trim) {
        None | Some("") => (LevelFilter::Info, None),
        Some(v) => match v.parse::<LevelFilter>() {
            Ok(l) => (l, None),
            Err(_) => (
                LevelFilter::Info,
                Some(format!(
                    "RVIRT_LOG={v:?} is not a level; use error, warn, info, debug or trace (using info)"
                )),
            ),
        },
    }
}

/// Installs the logger once (later calls, e.g. from in-process tests, keep the first).
pub fn init() {
    static LOGGER: StderrLogger = StderrLogger;
    let (level, warning) = level_from(std::env::var("RVIRT_LOG").ok().as_deref());
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
        if let Some(w) = warning {
            log::warn!("{w}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_from_the_environment() {
        assert_eq!(level_from(None).0, LevelFilter::Info);
        assert_eq!(level_from(Some("debug")).0, LevelFilter::Debug);
        assert_eq!(level_from(Some("WARN")).0, LevelFilter::Warn);
        let (l, w) = level_from(Some("loud"));
        assert_eq!(l, LevelFilter::Info);
        assert!(w.unwrap().contains("loud"));
    }
}
