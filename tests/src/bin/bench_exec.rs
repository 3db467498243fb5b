//! rvirt-bench-exec: runs a VMM and measures it for bench/vmm (P1 boot time, P2 memory overhead).
//!
//! `rvirt-bench-exec [--marker TEXT]... [--rss-at TEXT] [--guest-mib N] [--timeout SECS] -- CMD...`
//!
//! Starts CMD with its stdout (the guest's serial console) on a pipe and prints one line:
//! `exec_to_exit_ms=… status=… user_ms=… sys_ms=…`, plus `marker[TEXT]_ms=…` for each marker
//! (wall time from just before exec to the first console line containing TEXT) and, with
//! `--rss-at`, `rss_kib=… guest_ram_kib=… overhead_kib=…` sampled from /proc/PID/smaps when that
//! text appears: guest RAM is the resident part of the mappings of at least half of `--guest-mib`,
//! the overhead is everything else the VMM has resident. Console lines are echoed to stderr.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

struct Args {
    markers: Vec<String>,
    rss_at: Option<String>,
    guest_mib: u64,
    timeout: Duration,
    cmd: Vec<String>,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        markers: Vec::new(),
        rss_at: None,
        guest_mib: 128,
        timeout: Duration::from_secs(300),
        cmd: Vec::new(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--marker" => a.markers.push(value("--marker")?),
            "--rss-at" => a.rss_at = Some(value("--rss-at")?),
            "--guest-mib" => a.guest_mib = value("--guest-mib")?.parse()?,
            "--timeout" => a.timeout = Duration::from_secs(value("--timeout")?.parse()?),
            "--" => {
                a.cmd = it.collect();
                break;
            }
            other => bail!("unknown option '{other}' (usage: see the top of bench_exec.rs)"),
        }
    }
    if a.cmd.is_empty() {
        bail!("no command after --");
    }
    Ok(a)
}

/// (total resident KiB, resident KiB of mappings of at least `big_kib`).
fn smaps_rss(pid: u32, big_kib: u64) -> Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let (mut total, mut big, mut size) = (0, 0, 0);
    for line in smaps.lines() {
        let kib = |l: &str| {
            l.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        if line.starts_with("Size:") {
            size = kib(line);
        } else if line.starts_with("Rss:") {
            total += kib(line);
            if size >= big_kib {
                big += kib(line);
            }
        }
    }
    Ok((total, big))
}

fn run(a: &Args) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let start = Instant::now();
    let mut child = Command::new(&a.cmd[0])
        .args(&a.cmd[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", a.cmd[0]))?;
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout is piped");
    let deadline = a.timeout;
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        // SAFETY: kill(2) on our own child's pid; at worst the pid is already reaped and the
        // signal goes nowhere (it cannot be reused before we reap it below).
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    });
    let mut pending: Vec<&String> = a.markers.iter().collect();
    let mut rss_at = a.rss_at.as_ref();
    let mut err = std::io::stderr().lock();
    for line in BufReader::new(stdout).split(b'\n') {
        let line = String::from_utf8_lossy(&line?).replace('\r', "");
        let _ = writeln!(err, "{line}");
        let t = start.elapsed();
        pending.retain(|m| {
            if line.contains(m.as_str()) {
                out.insert(
                    format!("marker[{m}]_ms"),
                    format!("{:.1}", t.as_secs_f64() * 1e3),
                );
                false
            } else {
                true
            }
        });
        if rss_at.is_some_and(|m| line.contains(m.as_str())) {
            rss_at = None;
            let (total, guest) = smaps_rss(pid, a.guest_mib * 1024 / 2)?;
            out.insert("rss_kib".into(), total.to_string());
            out.insert("guest_ram_kib".into(), guest.to_string());
            out.insert("overhead_kib".into(), (total - guest).to_string());
        }
    }
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child, with valid pointers to locals.
    let r = unsafe { libc::wait4(pid as i32, &mut status, 0, &mut usage) };
    let t = start.elapsed();
    std::mem::forget(child);
    if r < 0 {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let ms = |tv: libc::timeval| tv.tv_sec as f64 * 1e3 + tv.tv_usec as f64 / 1e3;
    out.insert(
        "exec_to_exit_ms".into(),
        format!("{:.1}", t.as_secs_f64() * 1e3),
    );
    let status = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status).to_string()
    } else {
        format!("signal{}", libc::WTERMSIG(status))
    };
    out.insert("status".into(), status);
    out.insert("user_ms".into(), format!("{:.1}", ms(usage.ru_utime)));
    out.insert("sys_ms".into(), format!("{:.1}", ms(usage.ru_stime)));
    for m in pending {
        out.insert(format!("marker[{m}]_ms"), "none".into());
    }
    Ok(out)
}

fn main() -> ExitCode {
    let result = parse_args().and_then(|a| run(&a));
    match result {
        Ok(out) => {
            let fields: Vec<String> = out.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("{}", fields.join(" "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rvirt-bench-exec: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
