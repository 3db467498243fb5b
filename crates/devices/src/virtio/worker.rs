//! Device worker threads: one epoll loop per device over its queue eventfds, its backend fds
//! and a kill eventfd. Device I/O never runs on a vCPU thread.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const KILL_TOKEN: u64 = u64::MAX;

/// Lets a handler turn readiness interest in one of its fds on or off (e.g. virtio-net stops
/// watching the TAP while the guest has no receive buffers, so the loop never spins).
pub struct WorkerCtl<'a> {
    epoll: &'a Epoll,
}

impl WorkerCtl<'_> {
    /// Watches (`on`) or ignores `fd` for input readiness, reported with `token`. Ignoring
    /// removes the fd from the epoll set: a mere empty interest mask would still report
    /// EPOLLHUP/EPOLLERR and spin the loop on a dead backend.
    pub fn set_interest(&self, fd: RawFd, token: u64, on: bool) {
        let result = if on {
            let ev = EpollEvent::new(EventSet::IN, token);
            match self.epoll.ctl(ControlOperation::Add, fd, ev) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    self.epoll.ctl(ControlOperation::Modify, fd, ev)
                }
                other => other,
            }
        } else {
            match self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default())
            {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
                other => other,
            }
        };
        if let Err(e) = result {
            warn!("worker: cannot change interest of fd {fd}: {e}");
        }
    }
}

/// What the loop does after an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerAction {
    /// Keep serving.
    Continue,
    /// The device is broken (NEEDS_RESET was set): stop serving until reset.
    Stop,
}

/// The per-device event handler run by a worker thread.
pub trait WorkerHandler: Send + 'static {
    /// Handles readiness of the fd registered with `token`.
    fn handle_event(&mut self, token: u64, ctl: &WorkerCtl<'_>) -> WorkerAction;

    /// Called when the loop cannot go on (a handler panicked, epoll failed): the device
    /// should mark itself NEEDS_RESET so the driver notices.
    fn broken(&mut self) {}
}

#[derive(Debug, Default)]
struct GateState {
    paused: bool,
    busy: usize,
}

/// Holds device workers off guest memory while a VM is paused. Shared by every worker of a
/// VM (see `VirtioPciDevice::set_pause_gate`): a worker handles an event only while the gate is
/// open, and [`PauseGate::pause`] waits until no worker is in the middle of one. Events that
/// arrive meanwhile (queue notifications, TAP packets) stay pending until [`PauseGate::resume`].
#[derive(Clone, Debug, Default)]
pub struct PauseGate(Arc<(Mutex<GateState>, Condvar)>);

impl PauseGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.0 .0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Close the gate and wait up to `timeout` until no worker is handling an event. Returns
    /// whether every worker is idle (the gate stays closed either way).
    pub fn pause(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.state();
        st.paused = true;
        while st.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .0
                 .1
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Open the gate: waiting workers go on.
    pub fn resume(&self) {
        self.state().paused = false;
        self.0 .1.notify_all();
    }

    /// Whether the gate is closed.
    pub fn is_paused(&self) -> bool {
        self.state().paused
    }

    /// Wait until the gate is open (or `stop` is set: then `false`), and count the caller busy
    /// until [`PauseGate::leave`].
    fn enter(&self, stop: &AtomicBool) -> bool {
        let mut st = self.state();
        while st.paused && !stop.load(Ordering::SeqCst) {
            st = self.0 .1.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        st.busy += 1;
        true
    }

    fn leave(&self) {
        let mut st = self.state();
        st.busy = st.busy.saturating_sub(1);
        drop(st);
        self.0 .1.notify_all();
    }

    /// Wake every waiter (a worker being stopped while the gate is closed).
    fn wake(&self) {
        let _st = self.state();
        self.0 .1.notify_all();
    }
}

/// A running worker; dropping it (or [`Worker::stop`]) stops and joins the thread.
#[derive(Debug)]
pub struct Worker {
    kill: EventFd,
    stop: Arc<AtomicBool>,
    gate: PauseGate,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` watching `fds` as (fd, token) pairs for input, never paused.
    pub fn spawn<H: WorkerHandler>(
        name: String,
        fds: &[(RawFd, u64)],
        handler: H,
    ) -> io::Result<Worker> {
        Self::spawn_gated(name, fds, handler, PauseGate::new())
    }

    /// Like [`Worker::spawn`], handling events only while `gate` is open.
    pub fn spawn_gated<H: WorkerHandler>(
        name: String,
        fds: &[(RawFd, u64)],
        mut handler: H,
        gate: PauseGate,
    ) -> io::Result<Worker> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            kill.as_raw_fd(),
            EpollEvent::new(EventSet::IN, KILL_TOKEN),
        )?;
        for &(fd, token) in fds {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let fds = fds.to_vec();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, g) = (stop.clone(), gate.clone());
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || run(&name, &epoll, &fds, &mut handler, &g, &st))?;
        Ok(Worker {
            kill,
            stop,
            gate,
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            self.gate.wake();
            if let Err(e) = self.kill.write(1) {
                error!("worker: cannot signal stop: {e}");
            }
            if t.join().is_err() {
                error!("worker thread panicked");
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<H: WorkerHandler>(
    name: &str,
    epoll: &Epoll,
    fds: &[(RawFd, u64)],
    handler: &mut H,
    gate: &PauseGate,
    stop: &AtomicBool,
) {
    let mut events = [EpollEvent::default(); 16];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("{name}: epoll_wait failed, worker stops: {e}");
                handler.broken();
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == KILL_TOKEN {
                return;
            }
            if !gate.enter(stop) {
                return;
            }
            let ctl = WorkerCtl { epoll };
            // A bug in a device must not take the VMM down with it: contain the panic, mark
            // the device broken, and wait for the reset.
            let action = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handler.handle_event(token, &ctl)
            }))
            .unwrap_or_else(|_| {
                error!("{name}: device worker panicked; device needs reset");
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.broken()));
                WorkerAction::Stop
            });
            gate.leave();
            if action == WorkerAction::Stop {
                // A broken device serves nothing until the driver resets it (which kills this
                // thread): stop watching everything but the kill eventfd, so it costs no CPU.
                for &(fd, token) in fds {
                    ctl.set_interest(fd, token, false);
                }
                wait_for_kill(name, epoll);
                return;
            }
        }
    }
}

fn wait_for_kill(name: &str, epoll: &Epoll) {
    let mut events = [EpollEvent::default(); 4];
    loop {
        match epoll.wait(-1, &mut events) {
            Ok(n) if events[..n].iter().any(|e| e.data() == KILL_TOKEN) => return,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                error!("{name}: epoll_wait failed: {e}");
                return;
            }
        }
    }
}

/// Turns the outcome of a queue drain into the loop's next step: a corrupt ring marks the
/// device NEEDS_RESET (the driver then resets it, which stops this worker) instead of
/// panicking or spinning.
pub(crate) fn ring_result(
    device: &str,
    result: Result<(), super::queue::RingError>,
    irq: &super::VirtioInterrupt,
) -> WorkerAction {
    match result {
        Ok(()) => WorkerAction::Continue,
        Err(e) => {
            crate::guest_warn!("{device}: {e}; device needs reset");
            irq.set_needs_reset();
            WorkerAction::Stop
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::*;

    struct Panicky {
        calls: Arc<AtomicU32>,
        broken: Arc<AtomicU32>,
    }

    impl WorkerHandler for Panicky {
        fn handle_event(&mut self, _token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
            self.calls.fetch_add(1, Ordering::SeqCst);
            panic!("device bug");
        }
        fn broken(&mut self) {
            self.broken.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Counter(Arc<AtomicU32>, EventFd);

    impl WorkerHandler for Counter {
        fn handle_event(&mut self, _token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
            let _ = self.1.read();
            self.0.fetch_add(1, Ordering::SeqCst);
            WorkerAction::Continue
        }
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline, "{what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_closed_gate_holds_events_until_resume() {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let n = Arc::new(AtomicU32::new(0));
        let gate = PauseGate::new();
        let h = Counter(n.clone(), fd.try_clone().unwrap());
        let _w = Worker::spawn_gated("t".into(), &[(fd.as_raw_fd(), 1)], h, gate.clone()).unwrap();
        fd.write(1).unwrap();
        wait_for("first event not handled", || n.load(Ordering::SeqCst) == 1);
        assert!(gate.pause(Duration::from_secs(1)));
        assert!(gate.is_paused());
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "an event was handled while paused"
        );
        gate.resume();
        wait_for("event not handled after resume", || {
            n.load(Ordering::SeqCst) == 2
        });
    }

    #[test]
    fn a_worker_waiting_at_a_closed_gate_still_stops() {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let n = Arc::new(AtomicU32::new(0));
        let gate = PauseGate::new();
        let h = Counter(n.clone(), fd.try_clone().unwrap());
        let mut w =
            Worker::spawn_gated("t".into(), &[(fd.as_raw_fd(), 1)], h, gate.clone()).unwrap();
        assert!(gate.pause(Duration::from_secs(1)));
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let t = Instant::now();
        w.stop();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(n.load(Ordering::SeqCst), 0);
    }

    /// Handles one event slowly: pause must wait for it.
    struct Slow(Arc<AtomicU32>, EventFd);

    impl WorkerHandler for Slow {
        fn handle_event(&mut self, _token: u64, _ctl: &WorkerCtl<'_>) -> WorkerAction {
            let _ = self.1.read();
            self.0.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
            self.0.fetch_add(1, Ordering::SeqCst);
            WorkerAction::Continue
        }
    }

    #[test]
    fn pause_waits_for_the_event_in_progress() {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let n = Arc::new(AtomicU32::new(0));
        let gate = PauseGate::new();
        let h = Slow(n.clone(), fd.try_clone().unwrap());
        let _w = Worker::spawn_gated("t".into(), &[(fd.as_raw_fd(), 1)], h, gate.clone()).unwrap();
        fd.write(1).unwrap();
        wait_for("event not started", || n.load(Ordering::SeqCst) == 1);
        assert!(
            !gate.pause(Duration::from_millis(10)),
            "pause returned while busy"
        );
        assert!(gate.pause(Duration::from_secs(2)));
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "pause returned before the event finished"
        );
        gate.resume();
    }

    #[test]
    fn a_panicking_handler_is_contained() {
        let fd = EventFd::new(EFD_NONBLOCK).unwrap();
        let calls = Arc::new(AtomicU32::new(0));
        let broken = Arc::new(AtomicU32::new(0));
        let handler = Panicky {
            calls: calls.clone(),
            broken: broken.clone(),
        };
        let mut w = Worker::spawn("test".into(), &[(fd.as_raw_fd(), 7)], handler).unwrap();
        fd.write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while broken.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "broken() not called");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Further events are ignored (the fd is no longer watched), and stop still joins.
        fd.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        w.stop();
    }
}
