//! `--serial stdio` on a terminal: the VMM runs with stdin on a pty the test owns, checks the
//! pty is in raw mode while the VM runs (Ctrl-C reaches the guest) and restored on each way out:
//! guest poweroff, SIGTERM, the Ctrl-A x escape, and a VMM error after the console was set up.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_rvirt-vmm");

fn pty() -> (std::fs::File, OwnedFd) {
    let (mut m, mut s) = (-1, -1);
    // SAFETY: out-pointers to two ints; null name/termios/winsize are allowed.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty returned two fresh descriptors nobody else owns.
    unsafe { (std::fs::File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
}

fn attrs(fd: &OwnedFd) -> libc::termios {
    // SAFETY: termios is plain data filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        assert_eq!(libc::tcgetattr(fd.as_raw_fd(), &mut t), 0);
        t
    }
}

fn same(a: &libc::termios, b: &libc::termios) -> bool {
    a.c_iflag == b.c_iflag
        && a.c_oflag == b.c_oflag
        && a.c_cflag == b.c_cflag
        && a.c_lflag == b.c_lflag
        && a.c_cc == b.c_cc
}

struct Run {
    child: Child,
    master: std::fs::File,
    slave: OwnedFd,
    before: libc::termios,
    _img: rvirt_testkit::GuestImage,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(img: rvirt_testkit::GuestImage, extra: &[&str]) -> Option<Run> {
    if let Some(why) = rvirt_testkit::kvm_unavailable() {
        eprintln!("skipped: {why}");
        return None;
    }
    let (master, slave) = pty();
    let before = attrs(&slave);
    assert_ne!(before.c_lflag & libc::ICANON, 0, "a new pty starts cooked");
    let child = Command::new(VMM)
        .arg("--kernel")
        .arg(img.path())
        .args(["--memory", "64M", "--serial", "stdio"])
        .args(extra)
        .stdin(Stdio::from(slave.as_fd().try_clone_to_owned().unwrap()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    Some(Run {
        child,
        master,
        slave,
        before,
        _img: img,
    })
}

impl Run {
    /// Wait until the VMM has put the pty into raw mode.
    fn wait_raw(&self) {
        let t = Instant::now();
        loop {
            let a = attrs(&self.slave);
            if a.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG) == 0 {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "the VMM never put its stdin terminal into raw mode"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Wait for exit (20 s at most); returns (status, stdout, stderr) and checks the terminal
    /// settings are back.
    fn finish(mut self) -> (Option<i32>, String, String) {
        let t = Instant::now();
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the VMM did not exit"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let mut so = String::new();
        let mut se = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut so)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut se)
            .unwrap();
        assert!(
            same(&attrs(&self.slave), &self.before),
            "terminal settings not restored (status {st:?}, stderr {se})"
        );
        (st.code(), so, se)
    }
}

#[test]
fn ctrl_c_reaches_the_guest_and_poweroff_restores_the_terminal() {
    let Some(mut r) = start(rvirt_testkit::serial_echo().unwrap(), &[]) else {
        return;
    };
    r.wait_raw();
    // Ctrl-C and a bare CR must reach the guest unchanged; `q` makes it power off.
    r.master.write_all(b"\x03a\rq").unwrap();
    let (code, so, se) = r.finish();
    assert_eq!(code, Some(0), "{se}");
    assert_eq!(so, "\x03a\rq", "{se}");
}

#[test]
fn sigterm_stops_the_vm_cleanly_and_restores_the_terminal() {
    let Some(r) = start(rvirt_testkit::idle().unwrap(), &["--cpus", "2"]) else {
        return;
    };
    r.wait_raw();
    // SAFETY: kill on our own child's pid, still running (not reaped).
    assert_eq!(unsafe { libc::kill(r.child.id() as i32, libc::SIGTERM) }, 0);
    let (code, _, se) = r.finish();
    assert_eq!(code, Some(0), "{se}");
    assert!(se.contains("terminating on signal 15"), "{se}");
}

#[test]
fn ctrl_a_x_quits_and_restores_the_terminal() {
    let Some(mut r) = start(rvirt_testkit::idle().unwrap(), &[]) else {
        return;
    };
    r.wait_raw();
    r.master.write_all(b"\x01x").unwrap();
    let (code, _, se) = r.finish();
    assert_eq!(code, Some(0), "{se}");
    assert!(se.contains("Ctrl-A x"), "{se}");
}

#[test]
fn vmm_error_after_console_setup_restores_the_terminal() {
    // The control socket is set up after the console: a path in a missing directory fails
    // there, with the terminal already raw.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("missing").join("api.sock");
    let bad = bad.to_str().unwrap().to_string();
    let Some(r) = start(rvirt_testkit::idle().unwrap(), &["--api-socket", &bad]) else {
        return;
    };
    let (code, _, se) = r.finish();
    assert_eq!(code, Some(1), "{se}");
    assert!(se.contains("--api-socket"), "{se}");
}
