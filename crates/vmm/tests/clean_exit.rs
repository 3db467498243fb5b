//! The VMM's exit path, run in this process through `rvirt_vmm::vmm::run` so the test can see
//! what it leaves behind: after `run` returns, every thread it started (vCPUs, device workers,
//! control socket, signal thread) is gone, every descriptor it opened (/dev/kvm, VM, vCPUs,
//! eventfds, disk images, sockets) is closed, and the guest's writes are in the file.
//!
//! One test function on purpose: the thread and descriptor counts are those of the whole test
//! process, so nothing else may run beside it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use clap::Parser;
use rvirt_api::vmm::ExitReason;
use rvirt_vmm::cli::{from_args, Args, VmConfig};

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// Where each open descriptor points (for failure messages).
fn fds() -> Vec<String> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .map(|e| {
            let t = std::fs::read_link(e.path()).unwrap_or_default();
            format!("{} -> {}", e.file_name().to_string_lossy(), t.display())
        })
        .collect()
}

fn config(args: &[&str]) -> VmConfig {
    let mut a = vec!["rvirt-vmm"];
    a.extend_from_slice(args);
    from_args(&Args::try_parse_from(a).unwrap()).unwrap()
}

/// Wait until /proc/self/task has `want` entries (threads that returned may take a moment to
/// disappear after being joined); returns the last count.
fn settle_threads(want: usize) -> usize {
    let t = Instant::now();
    loop {
        let n = count("/proc/self/task");
        if n == want || t.elapsed() > Duration::from_secs(2) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Watch, pause (the watcher's `paused` event proves it is registered), then quit. Returns the
/// watch lines up to end of file and the reply to quit.
fn quit_client(sock: &std::path::Path) -> Result<(Vec<String>, String), String> {
    let e = |what: &str, err: std::io::Error| format!("{what}: {err}");
    let t = Instant::now();
    let watch = loop {
        if let Ok(s) = UnixStream::connect(sock) {
            break s;
        }
        if t.elapsed() > Duration::from_secs(15) {
            return Err("no control socket".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let timeout = Some(Duration::from_secs(20));
    watch
        .set_read_timeout(timeout)
        .map_err(|x| e("timeout", x))?;
    (&watch)
        .write_all(b"{\"request\":\"watch\"}\n")
        .map_err(|x| e("watch", x))?;
    let mut w = BufReader::new(watch);
    let c = UnixStream::connect(sock).map_err(|x| e("connect", x))?;
    c.set_read_timeout(timeout).map_err(|x| e("timeout", x))?;
    let mut cr = BufReader::new(c.try_clone().map_err(|x| e("clone", x))?);
    let mut lines = Vec::new();
    // Pause until the watcher reports it (the watch request may be served after the first pause).
    loop {
        (&c).write_all(b"{\"request\":\"pause\"}\n")
            .map_err(|x| e("pause", x))?;
        let mut l = String::new();
        cr.read_line(&mut l).map_err(|x| e("pause reply", x))?;
        w.get_ref()
            .set_read_timeout(Some(Duration::from_millis(200)))
            .map_err(|x| e("timeout", x))?;
        let mut ev = String::new();
        if w.read_line(&mut ev).is_ok() && !ev.is_empty() {
            lines.push(ev);
            break;
        }
        (&c).write_all(b"{\"request\":\"resume\"}\n")
            .map_err(|x| e("resume", x))?;
        cr.read_line(&mut String::new())
            .map_err(|x| e("resume reply", x))?;
        if t.elapsed() > Duration::from_secs(15) {
            return Err("the watcher never saw an event".into());
        }
    }
    w.get_ref()
        .set_read_timeout(timeout)
        .map_err(|x| e("timeout", x))?;
    (&c).write_all(b"{\"request\":\"quit\"}\n")
        .map_err(|x| e("quit", x))?;
    let mut reply = String::new();
    cr.read_line(&mut reply).map_err(|x| e("quit reply", x))?;
    loop {
        let mut l = String::new();
        match w.read_line(&mut l) {
            Ok(0) => break,
            Ok(_) => lines.push(l),
            Err(x) => return Err(format!("watch stream: {x} after {lines:?}")),
        }
    }
    // The VMM closes the quit connection too.
    let mut more = String::new();
    match cr.read_line(&mut more) {
        Ok(0) => Ok((lines, reply)),
        other => Err(format!("quit connection left open: {other:?} {more:?}")),
    }
}

#[test]
fn run_returns_with_threads_joined_descriptors_closed_and_data_on_disk() {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return;
    }
    // 1. Guest poweroff with 2 vCPUs (vcpu1 never gets a SIPI, so it sits in KVM_RUN and must
    //    be kicked out) and a virtio-blk disk the guest writes through its own driver.
    let disk = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(disk.path(), vec![0u8; 1 << 20]).unwrap();
    let img = rvirt_testkit::virtio_blk_rw(&[0; 512], 2).unwrap();
    let kernel = img.path().to_str().unwrap().to_string();
    let spec = format!("path={},format=raw", disk.path().display());
    let idle = rvirt_testkit::idle().unwrap();
    let threads0 = count("/proc/self/task");
    let fds0 = count("/proc/self/fd");
    let cfg = config(&[
        "--kernel", &kernel, "--memory", "64M", "--cpus", "2", "--serial", "none", "--disk", &spec,
    ]);
    let reason = rvirt_vmm::vmm::run(cfg).expect("run");
    assert_eq!(reason, ExitReason::Poweroff);
    assert_eq!(
        settle_threads(threads0),
        threads0,
        "threads left after poweroff"
    );
    assert_eq!(
        count("/proc/self/fd"),
        fds0,
        "descriptors left after poweroff: {:?}",
        fds()
    );
    let bytes = std::fs::read(disk.path()).unwrap();
    assert_eq!(&bytes[1024..1536], &rvirt_testkit::blk_guest_sector()[..]);

    // 2. `quit` through the control socket while the 2 vCPUs are paused (parked), with a
    //    watcher: the watcher sees `exited` then end of file, the socket file is removed.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let kernel = idle.path().to_str().unwrap().to_string();
    let sock_s = sock.to_str().unwrap().to_string();
    let cfg = config(&[
        "--kernel",
        &kernel,
        "--memory",
        "64M",
        "--cpus",
        "2",
        "--serial",
        "none",
        "--api-socket",
        &sock_s,
    ]);
    let client = std::thread::spawn(move || {
        let r = quit_client(&sock);
        if r.is_err() {
            // Never leave `run` waiting: stop the VM whatever went wrong.
            if let Ok(mut s) = UnixStream::connect(&sock) {
                let _ = s.write_all(b"{\"request\":\"quit\"}\n");
            }
        }
        (r, sock)
    });
    let reason = rvirt_vmm::vmm::run(cfg).expect("run");
    assert_eq!(reason, ExitReason::Quit);
    let (r, sock) = client.join().unwrap();
    let (lines, quit_reply) = r.unwrap();
    assert!(quit_reply.contains("ok"), "{quit_reply}");
    assert!(
        lines.last().is_some_and(|l| l.contains("exited")),
        "watch lines: {lines:?}"
    );
    assert!(!sock.exists(), "control socket left behind");
    assert_eq!(
        settle_threads(threads0),
        threads0,
        "threads left after quit"
    );
    assert_eq!(
        count("/proc/self/fd"),
        fds0,
        "descriptors left after quit: {:?}",
        fds()
    );
}
