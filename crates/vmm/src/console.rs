//! The serial console (COM1): where its output goes (stdout, a pty, a socket client, nowhere)
//! and the threads that feed input to it. On a terminal, stdin is put in raw mode for the
//! lifetime of the console and Ctrl-A x stops the VM (see `term`).

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rvirt_api::vmm::ExitReason;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::cli::SerialConfig as SerialMode;
use crate::legacy::serial::{Com1, IrqLine, SerialOut, Sink};
use crate::messages::Mailbox;
use crate::threads;

/// COM1 and its host side; dropping it restores the terminal and removes the socket file.
pub struct Console {
    pub com1: Arc<Mutex<Com1>>,
    raw_term: Option<crate::term::RawTerminal>,
    socket: Option<PathBuf>,
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
        // `raw_term` restores the terminal when dropped, after this.
        let _ = self.raw_term.take();
    }
}

impl Console {
    /// Creates COM1 raising `irq`, its output and its input thread for `mode`.
    pub fn open(mode: &SerialMode, irq: EventFd, mailbox: &Mailbox) -> Result<Self> {
        let (sink, pty_master) = open_serial_output(mode)?;
        let sink: Sink = Arc::new(Mutex::new(sink));
        let com1 = Arc::new(Mutex::new(Serial::new(
            IrqLine(irq),
            SerialOut { sink: sink.clone() },
        )));
        let mut console = Console {
            com1: com1.clone(),
            raw_term: None,
            socket: None,
        };
        match mode {
            SerialMode::Stdio => {
                console.raw_term = crate::term::RawTerminal::enter(libc::STDIN_FILENO)
                    .context("--serial stdio: cannot put the stdin terminal into raw mode")?;
                let escape = console.raw_term.is_some().then(|| mailbox.clone());
                if escape.is_some() {
                    eprintln!("rvirt-vmm: console on this terminal in raw mode; Ctrl-A x quits");
                }
                threads::spawn("serial-in", move || match escape {
                    Some(m) => feed_console(&com1, std::io::stdin(), &m),
                    None => feed_serial(&com1, std::io::stdin()),
                })?;
            }
            SerialMode::Pty => {
                if let Some(m) = pty_master {
                    threads::spawn("serial-in", move || feed_serial(&com1, m))?;
                }
            }
            SerialMode::Socket(path) => {
                let _ = std::fs::remove_file(path);
                let l = UnixListener::bind(path).with_context(|| {
                    format!(
                        "--serial socket={}: cannot listen; check the directory exists and is writable",
                        path.display()
                    )
                })?;
                console.socket = Some(path.clone());
                threads::spawn("serial-sock", move || {
                    for s in l.incoming().flatten() {
                        if let Ok(w) = s.try_clone() {
                            *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(w));
                        }
                        feed_serial(&com1, s);
                        *sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                })?;
            }
            SerialMode::None => {}
        }
        Ok(console)
    }
}

type SerialSink = Box<dyn std::io::Write + Send>;

fn open_serial_output(mode: &SerialMode) -> Result<(Option<SerialSink>, Option<std::fs::File>)> {
    match mode {
        SerialMode::Stdio => Ok((Some(Box::new(std::io::stdout())), None)),
        SerialMode::None | SerialMode::Socket(_) => Ok((None, None)),
        SerialMode::Pty => {
            // SAFETY: posix_openpt returns a new fd or -1; the fd is owned by the File below.
            let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
            if fd < 0 {
                bail!(
                    "--serial pty: posix_openpt: {}",
                    std::io::Error::last_os_error()
                );
            }
            // SAFETY: `fd` is a valid, freshly opened fd we own.
            let master = unsafe { std::fs::File::from_raw_fd(fd) };
            let mut name = [0 as libc::c_char; 128];
            // SAFETY: `fd` is a pty master; `name` is a writable buffer of the given length;
            // termios is fully initialised by tcgetattr before use.
            unsafe {
                if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
                    bail!(
                        "--serial pty: grantpt/unlockpt: {}",
                        std::io::Error::last_os_error()
                    );
                }
                if libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0 {
                    bail!("--serial pty: ptsname: {}", std::io::Error::last_os_error());
                }
                let mut t: libc::termios = std::mem::zeroed();
                if libc::tcgetattr(fd, &mut t) == 0 {
                    libc::cfmakeraw(&mut t);
                    libc::tcsetattr(fd, libc::TCSANOW, &t);
                }
            }
            // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
            let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
            eprintln!(
                "rvirt-vmm: serial console on pty {}",
                path.to_string_lossy()
            );
            let out = master.try_clone().context("--serial pty: dup")?;
            Ok((Some(Box::new(out)), Some(master)))
        }
    }
}

fn feed_serial(com1: &Arc<Mutex<Com1>>, mut input: impl Read) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        enqueue(com1, &buf[..n]);
    }
}

fn enqueue(com1: &Arc<Mutex<Com1>>, bytes: &[u8]) {
    let mut off = 0;
    while off < bytes.len() {
        let took = com1
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .enqueue_raw_bytes(&bytes[off..])
            .unwrap_or(0);
        off += took;
        if off < bytes.len() {
            thread::sleep(Duration::from_millis(2));
        }
    }
}

/// Like [`feed_serial`] for a raw terminal: Ctrl-A x stops the VM (see `term`).
fn feed_console(com1: &Arc<Mutex<Com1>>, mut input: impl Read, mailbox: &Mailbox) {
    let mut buf = [0u8; 64];
    let mut esc = crate::term::Escape::default();
    let mut out = Vec::with_capacity(128);
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        out.clear();
        let quit = esc.filter(&buf[..n], &mut out);
        enqueue(com1, &out);
        if quit {
            eprintln!("\r\nrvirt-vmm: Ctrl-A x: stopping the VM\r");
            mailbox.exit(ExitReason::Quit);
            return;
        }
    }
}
