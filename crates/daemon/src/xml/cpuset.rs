//! libvirt's cpuset syntax: `0-3,^2,6` (ranges, single CPUs, `^` exclusions).

use std::collections::BTreeSet;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CpuSet(pub BTreeSet<usize>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cpuset '{text}': {reason}")]
pub struct CpuSetError {
    pub text: String,
    pub reason: String,
}

/// Upper bound on CPU numbers accepted in a cpuset (the kernel's CPU_SETSIZE).
pub const MAX_CPUS: usize = 1024;

impl CpuSet {
    pub fn parse(text: &str) -> Result<CpuSet, CpuSetError> {
        let fail = |reason: &str| CpuSetError {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let mut set = BTreeSet::new();
        let mut excluded = BTreeSet::new();
        for part in text.split(',').map(str::trim) {
            if part.is_empty() {
                return Err(fail("empty element (expected e.g. 0-3,^2,6)"));
            }
            let (negated, body) = match part.strip_prefix('^') {
                Some(rest) => (true, rest),
                None => (false, part),
            };
            let num = |s: &str| -> Result<usize, CpuSetError> {
                let n: usize = s
                    .trim()
                    .parse()
                    .map_err(|_| fail(&format!("'{s}' is not a CPU number")))?;
                if n >= MAX_CPUS {
                    return Err(fail(&format!("CPU {n} is beyond {}", MAX_CPUS - 1)));
                }
                Ok(n)
            };
            let range = match body.split_once('-') {
                Some((a, b)) if !negated => {
                    let (a, b) = (num(a)?, num(b)?);
                    if a > b {
                        return Err(fail(&format!("range {a}-{b} is reversed")));
                    }
                    a..=b
                }
                Some(_) => return Err(fail("a '^' exclusion takes a single CPU")),
                None => {
                    let n = num(body)?;
                    n..=n
                }
            };
            if negated {
                excluded.extend(range);
            } else {
                set.extend(range);
            }
        }
        set.retain(|c| !excluded.contains(c));
        if set.is_empty() {
            return Err(fail("no CPU left in the set"));
        }
        Ok(CpuSet(set))
    }

    /// Fails unless every CPU of the set exists on this host (`host_cpus` CPUs numbered from 0).
    pub fn check_host(&self, host_cpus: usize) -> Result<(), CpuSetError> {
        match self.0.iter().find(|&&c| c >= host_cpus) {
            Some(c) => Err(CpuSetError {
                text: self.to_string(),
                reason: format!(
                    "CPU {c} does not exist on this host (it has CPUs 0-{})",
                    host_cpus - 1
                ),
            }),
            None => Ok(()),
        }
    }

    pub fn all(host_cpus: usize) -> CpuSet {
        CpuSet((0..host_cpus).collect())
    }

    /// virsh's `y`/`-` map over the host CPUs (vcpuinfo's "CPU Affinity").
    pub fn map_string(&self, host_cpus: usize) -> String {
        (0..host_cpus)
            .map(|c| if self.0.contains(&c) { 'y' } else { '-' })
            .collect()
    }
}

impl fmt::Display for CpuSet {
    /// Compact range form, e.g. `0-2,5`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cpus: Vec<usize> = self.0.iter().copied().collect();
        let mut parts = Vec::new();
        let mut i = 0;
        while i < cpus.len() {
            let start = cpus[i];
            let mut end = start;
            while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
                i += 1;
                end = cpus[i];
            }
            parts.push(if start == end {
                start.to_string()
            } else {
                format!("{start}-{end}")
            });
            i += 1;
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libvirt_syntax() {
        let s = CpuSet::parse("0-3,^2,6").unwrap();
        assert_eq!(s.0.iter().copied().collect::<Vec<_>>(), vec![0, 1, 3, 6]);
        assert_eq!(s.to_string(), "0-1,3,6");
        assert_eq!(s.map_string(8), "yy-y--y-");
    }

    #[test]
    fn rejects_bad_sets() {
        for bad in ["", "a", "3-1", "1,,2", "^1", "0,^0", "5000", "1-^2"] {
            assert!(CpuSet::parse(bad).is_err(), "{bad} accepted");
        }
        let err = CpuSet::parse("0,7").unwrap().check_host(2).unwrap_err();
        assert!(err.to_string().contains("CPU 7 does not exist"), "{err}");
    }
}
