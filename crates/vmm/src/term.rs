//! The host terminal behind `--serial stdio`.
//!
//! When stdin is a terminal, it is switched to raw mode for the guest's console, as
//! `qemu -nographic` does: no echo, no line editing, no signals from Ctrl-C/Ctrl-Z/Ctrl-\ (those
//! bytes go to the guest), no input translation; output post-processing stays on. The
//! [`RawTerminal`] guard restores the saved settings when dropped, which `vm::run` does on every
//! way out (guest exit, VMM error, SIGTERM/SIGINT/SIGHUP, `quit`).
//!
//! In raw mode the VMM keeps one escape, like QEMU's: **Ctrl-A x** stops the VM (exit status 0,
//! as `quit`), **Ctrl-A Ctrl-A** sends one Ctrl-A to the guest; Ctrl-A followed by anything else
//! sends both bytes.

use std::io;
use std::os::fd::RawFd;

/// The escape byte (Ctrl-A).
pub const ESCAPE: u8 = 0x01;

/// Saved terminal settings, restored on drop.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

/// Raw-mode settings derived from `t`: what the guest console needs.
pub fn raw_attrs(t: &libc::termios) -> libc::termios {
    let mut r = *t;
    r.c_iflag &= !(libc::IGNBRK
        | libc::BRKINT
        | libc::PARMRK
        | libc::ISTRIP
        | libc::INLCR
        | libc::IGNCR
        | libc::ICRNL
        | libc::IXON);
    r.c_oflag |= libc::OPOST;
    r.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::ISIG | libc::IEXTEN);
    r.c_cflag &= !(libc::CSIZE | libc::PARENB);
    r.c_cflag |= libc::CS8;
    r.c_cc[libc::VMIN] = 1;
    r.c_cc[libc::VTIME] = 0;
    r
}

fn get_attrs(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails without touching memory
    // beyond the struct.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(t)
    }
}

fn set_attrs(fd: RawFd, t: &libc::termios) -> io::Result<()> {
    // SAFETY: `t` is a valid termios; tcsetattr only reads it.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

impl RawTerminal {
    /// If `fd` is a terminal, save its settings and switch it to raw mode; `Ok(None)` if it
    /// is not a terminal (pipe, file, /dev/null).
    pub fn enter(fd: RawFd) -> io::Result<Option<RawTerminal>> {
        if !is_tty(fd) {
            return Ok(None);
        }
        let saved = get_attrs(fd)?;
        set_attrs(fd, &raw_attrs(&saved))?;
        Ok(Some(RawTerminal { fd, saved }))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        if let Err(e) = set_attrs(self.fd, &self.saved) {
            eprintln!(
                "rvirt-vmm: cannot restore the terminal settings of stdin: {e}; run `stty sane`"
            );
        }
    }
}

/// The Ctrl-A escape state of a raw console.
#[derive(Default)]
pub struct Escape {
    pending: bool,
}

impl Escape {
    /// Pass `input` through the escape; appends the bytes for the guest to `out`. Returns true
    /// when the user asked to quit (Ctrl-A x); bytes after it are dropped.
    pub fn filter(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        for &b in input {
            if self.pending {
                self.pending = false;
                match b {
                    b'x' | b'X' => return true,
                    ESCAPE => out.push(ESCAPE),
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if b == ESCAPE {
                self.pending = true;
            } else {
                out.push(b);
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    /// A pty pair (master, slave), both owned.
    fn pty() -> (OwnedFd, OwnedFd) {
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
        assert_eq!(r, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: openpty returned two fresh descriptors that nothing else owns.
        unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) }
    }

    fn same(a: &libc::termios, b: &libc::termios) -> bool {
        a.c_iflag == b.c_iflag
            && a.c_oflag == b.c_oflag
            && a.c_cflag == b.c_cflag
            && a.c_lflag == b.c_lflag
            && a.c_cc == b.c_cc
    }

    #[test]
    fn raw_mode_on_a_pty_and_restored_on_drop() {
        let (_m, s) = pty();
        let fd = s.as_raw_fd();
        let before = get_attrs(fd).unwrap();
        assert!(
            before.c_lflag & libc::ICANON != 0,
            "a new pty starts cooked"
        );
        {
            let g = RawTerminal::enter(fd).unwrap().expect("a pty is a tty");
            let now = get_attrs(fd).unwrap();
            assert_eq!(now.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG), 0);
            assert_eq!(now.c_iflag & (libc::ICRNL | libc::IXON), 0);
            assert_ne!(now.c_oflag & libc::OPOST, 0);
            assert_eq!(now.c_cc[libc::VMIN], 1);
            drop(g);
        }
        assert!(
            same(&get_attrs(fd).unwrap(), &before),
            "settings not restored"
        );
    }

    #[test]
    fn not_a_tty_is_left_alone() {
        let f = tempfile::tempfile().unwrap();
        assert!(RawTerminal::enter(f.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn escape_sequences() {
        let mut e = Escape::default();
        let mut out = Vec::new();
        assert!(!e.filter(b"ab\x03", &mut out));
        assert_eq!(out, b"ab\x03");
        out.clear();
        assert!(!e.filter(b"\x01\x01z\x01q", &mut out));
        assert_eq!(out, b"\x01z\x01q");
        out.clear();
        // Split across reads.
        assert!(!e.filter(b"k\x01", &mut out));
        assert!(e.filter(b"xrest", &mut out));
        assert_eq!(out, b"k");
    }
}
