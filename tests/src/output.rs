//! The test host's serial output, parsed into results (see `guest/scenario.sh` for the protocol).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::ExitStatus;
use std::time::Duration;

/// What one test host run printed and how it ended.
#[derive(Debug)]
pub struct Output {
    /// The test host's serial console, `\r` removed.
    pub serial: String,
    /// Diagnostics of the fixture scripts (stderr of `guest/testhost`).
    pub log: String,
    /// `guest/testhost`'s status: QEMU's, or 124 on timeout.
    pub status: ExitStatus,
    /// Wall time of the whole run (fixture check, test host boot, scenario).
    pub elapsed: Duration,
    /// `RVIRT-PASS name detail`.
    pub passed: BTreeMap<String, String>,
    /// `RVIRT-FAIL name reason` and `RVIRT-HOST-FAIL reason` (as `host`).
    pub failed: BTreeMap<String, String>,
    /// `RVIRT-TIME name ms`.
    pub times: BTreeMap<String, u64>,
    /// The scenario script's exit status (`RVIRT-HOST-DONE rc=N`), if the test host got that far.
    pub scenario_status: Option<i32>,
}

impl Output {
    pub(crate) fn parse(
        serial: String,
        log: String,
        status: ExitStatus,
        elapsed: Duration,
    ) -> Self {
        let mut out = Output {
            serial,
            log,
            status,
            elapsed,
            passed: BTreeMap::new(),
            failed: BTreeMap::new(),
            times: BTreeMap::new(),
            scenario_status: None,
        };
        for line in out.serial.lines() {
            let mut words = line.splitn(3, ' ');
            let (kind, name, rest) = (
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
            );
            match kind {
                "RVIRT-PASS" => {
                    out.passed.insert(name.to_string(), rest.to_string());
                }
                "RVIRT-FAIL" => {
                    out.failed.insert(name.to_string(), rest.to_string());
                }
                "RVIRT-HOST-FAIL" => {
                    let reason = line.trim_start_matches("RVIRT-HOST-FAIL ").to_string();
                    out.failed.insert("host".into(), reason);
                }
                "RVIRT-TIME" => {
                    if let Ok(ms) = rest.trim().parse() {
                        out.times.insert(name.to_string(), ms);
                    }
                }
                "RVIRT-HOST-DONE" => {
                    out.scenario_status = name.strip_prefix("rc=").and_then(|rc| rc.parse().ok());
                }
                _ => {}
            }
        }
        out
    }

    /// Lines the guest tagged `tag` printed on its console (see `run_guest`).
    pub fn guest_lines<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        let prefix = format!("{tag}| ");
        self.serial
            .lines()
            .filter_map(move |l| l.strip_prefix(prefix.as_str()))
    }

    /// Why the run does not meet `want` (each name passed, nothing failed, the test host ran the
    /// scenario to its end), or `None` if it does.
    pub fn problems(&self, want: &[&str]) -> Option<String> {
        let mut msg = String::new();
        for (name, reason) in &self.failed {
            let _ = writeln!(msg, "FAIL {name}: {reason}");
        }
        for name in want {
            if !self.passed.contains_key(*name) && !self.failed.contains_key(*name) {
                let _ = writeln!(msg, "MISSING {name}: no result line");
            }
        }
        if self.scenario_status.is_none() {
            let _ = writeln!(
                msg,
                "the test host never finished its scenario (guest/testhost status {}, {:.1}s)",
                self.status,
                self.elapsed.as_secs_f64()
            );
        }
        (!msg.is_empty()).then_some(msg)
    }

    /// Panics with every failure, missing result and the whole serial log unless all `want`
    /// results passed and nothing failed.
    #[track_caller]
    pub fn expect_passed(&self, want: &[&str]) {
        if let Some(problems) = self.problems(want) {
            panic!(
                "test host run failed:\n{problems}\n--- test host serial ---\n{}\n--- fixture log ---\n{}",
                self.serial,
                self.log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// A one-line timing summary for the test log.
    pub fn summary(&self) -> String {
        let times: Vec<String> = self
            .times
            .iter()
            .map(|(k, v)| format!("{k}={v}ms"))
            .collect();
        format!(
            "test host run {:.1}s, {} passed, {} failed; {}",
            self.elapsed.as_secs_f64(),
            self.passed.len(),
            self.failed.len(),
            times.join(" ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn parse(serial: &str) -> Output {
        Output::parse(
            serial.to_string(),
            String::new(),
            ExitStatus::from_raw(0),
            Duration::from_secs(1),
        )
    }

    #[test]
    fn parses_results_times_and_guest_lines() {
        let out = parse(
            "RVIRT-HOST-UP uptime=5.1\nvm| RVIRT-PASS cpus 2\nRVIRT-PASS vm.cpus 2\n\
             RVIRT-FAIL vm.net eth0 cannot ping 10.0.0.1\nRVIRT-TIME vm 5100\nRVIRT-HOST-DONE rc=0 uptime=9\n",
        );
        assert_eq!(out.passed.get("vm.cpus").map(String::as_str), Some("2"));
        assert_eq!(
            out.failed.get("vm.net").map(String::as_str),
            Some("eth0 cannot ping 10.0.0.1")
        );
        assert_eq!(out.times.get("vm"), Some(&5100));
        assert_eq!(out.scenario_status, Some(0));
        assert_eq!(
            out.guest_lines("vm").collect::<Vec<_>>(),
            ["RVIRT-PASS cpus 2"]
        );
    }

    #[test]
    fn problems_name_failures_missing_results_and_unfinished_runs() {
        let out = parse("RVIRT-PASS vm.cpus 2\nRVIRT-FAIL vm.mem system-ram=100MiB want=128MiB\n");
        let p = out.problems(&["vm.cpus", "vm.blk"]).unwrap();
        assert!(p.contains("FAIL vm.mem: system-ram=100MiB"), "{p}");
        assert!(p.contains("MISSING vm.blk"), "{p}");
        assert!(p.contains("never finished"), "{p}");
        let ok = parse("RVIRT-PASS vm.cpus 2\nRVIRT-HOST-DONE rc=0\n");
        assert_eq!(ok.problems(&["vm.cpus"]), None);
    }

    #[test]
    fn host_failure_counts_as_a_failure() {
        let out = parse("RVIRT-HOST-FAIL /dev/kvm absent\nRVIRT-HOST-DONE rc=0\n");
        assert!(out
            .problems(&[])
            .unwrap()
            .contains("FAIL host: /dev/kvm absent"));
    }
}
