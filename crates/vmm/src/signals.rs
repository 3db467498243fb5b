//! SIGTERM, SIGINT and SIGHUP end the VM like `quit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;

use anyhow::{bail, Result};
use rvirt_api::vmm::ExitReason;

use crate::messages::Mailbox;
use crate::threads;

/// SIGTERM, SIGINT and SIGHUP stop the VM like `quit` (exit 0): they are blocked in every VMM
/// thread and taken by one `signals` thread with sigwait, so the normal exit path (devices
/// stopped, disks flushed, terminal restored) runs. Dropping this stops that thread and restores
/// the signal mask of the calling thread.
pub struct QuitSignals {
    thread: Option<thread::JoinHandle<()>>,
    pthread: libc::pthread_t,
    done: Arc<AtomicBool>,
    old_mask: libc::sigset_t,
}

fn wake_signal() -> libc::c_int {
    libc::SIGRTMIN() + 1
}

fn quit_sigset() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and modify a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, wake_signal()] {
            libc::sigaddset(&mut set, sig);
        }
        set
    }
}

impl QuitSignals {
    /// Block the signals in this thread (threads created later inherit the mask) and start the
    /// thread that waits for them. Call before any other VMM thread is created.
    pub fn start(mailbox: Mailbox) -> Result<Self> {
        let set = quit_sigset();
        // SAFETY: `set` is initialised and `old` is a valid out-pointer.
        let old_mask = unsafe {
            let mut old: libc::sigset_t = std::mem::zeroed();
            let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
            if r != 0 {
                bail!("pthread_sigmask: {}", std::io::Error::from_raw_os_error(r));
            }
            old
        };
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let spawned = threads::spawn("signals", move || {
            // SAFETY: pthread_self has no preconditions.
            let _ = tx.send(unsafe { libc::pthread_self() });
            loop {
                let mut sig = 0;
                // SAFETY: `set` is initialised; `sig` is a valid out-pointer.
                let r = unsafe { libc::sigwait(&set, &mut sig) };
                if d.load(Ordering::SeqCst) {
                    return;
                }
                if r == 0 && sig != wake_signal() {
                    eprintln!("rvirt-vmm: terminating on signal {sig}");
                    mailbox.exit(ExitReason::Quit);
                }
            }
        });
        let restore = |e: std::io::Error| {
            // SAFETY: restoring the mask saved above.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, std::ptr::null_mut()) };
            anyhow::anyhow!("spawning the signal thread: {e}")
        };
        let h = spawned.map_err(restore)?;
        let pthread = rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the signal thread died at start"))?;
        Ok(QuitSignals {
            thread: Some(h),
            pthread,
            done,
            old_mask,
        })
    }
}

impl Drop for QuitSignals {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(h) = self.thread.take() {
            // SAFETY: the thread has not been joined yet (we join it just below), so its
            // pthread id is valid; the wake signal is in the set it waits for.
            unsafe { libc::pthread_kill(self.pthread, wake_signal()) };
            let _ = h.join();
        }
        // SAFETY: restoring the mask saved in `start`.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut()) };
    }
}
