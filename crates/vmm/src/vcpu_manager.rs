//! The vCPU threads: created at start and at run time (hotplug), paused and resumed together
//! with a barrier, kicked out of `KVM_RUN` with `immediate_exit`, stopped one at a time
//! (hot-unplug: the thread ends, its fd is kept for a later re-plug since KVM cannot destroy a
//! vCPU) or all at once (VM exit), and joined.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use rvirt_api::vmm::ExitReason;

use crate::boot::BootEntry;
use crate::exits::ExitHandler;
use crate::messages::Mailbox;
use crate::threads;
use crate::vstate::vcpu;

/// How long [`VcpuManager::pause`] waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long stopping waits for a vCPU thread to return.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Control {
    paused: bool,
    exiting: bool,
    parked: usize,
}

/// Pause/exit state shared with the vCPU threads. The flags are also atomics so the run loop
/// checks them without the lock; the lock and condvar are the barrier.
#[derive(Default)]
struct RunControl {
    state: Mutex<Control>,
    cv: Condvar,
    paused: AtomicBool,
    exiting: AtomicBool,
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Parks the calling vCPU thread until resumed, told to exit, or `stop` is set.
    fn park(&self, stop: &AtomicBool) {
        let mut st = self.lock();
        st.parked += 1;
        self.cv.notify_all();
        while st.paused && !st.exiting && !stop.load(Ordering::SeqCst) {
            st = self.cv.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.parked -= 1;
    }
}

/// A running vCPU thread.
struct Running {
    handle: JoinHandle<VcpuFd>,
    tid: i32,
    pthread: libc::pthread_t,
    /// Ends this thread alone (hot-unplug).
    stop: Arc<AtomicBool>,
    /// True while the thread runs; cleared under the lock right before it returns, and kicks
    /// are sent only while holding it, so no signal ever goes to a finished thread.
    alive: Arc<Mutex<bool>>,
}

impl Running {
    fn kick(&self) {
        let alive = self.alive.lock().unwrap_or_else(|e| e.into_inner());
        if *alive {
            // SAFETY: the thread has not cleared its alive flag, which it does under the lock we
            // hold before returning, so its pthread id is valid; the signal's handler is
            // installed before any vCPU thread starts.
            unsafe { libc::pthread_kill(self.pthread, vcpu::kick_signal()) };
        }
    }
}

#[derive(Default)]
struct Slot {
    /// A created vCPU whose thread is not running (not yet started, or unplugged).
    parked_fd: Option<VcpuFd>,
    running: Option<Running>,
}

/// What a new vCPU thread needs.
pub struct VcpuSetup {
    pub vm: Arc<VmFd>,
    pub kvm: Kvm,
    /// Possible vCPUs (CPUID topology and APIC ids are laid out for all of them).
    pub max: u32,
    /// Registers of the boot vCPU.
    pub entry: BootEntry,
    pub exits: Arc<ExitHandler>,
    pub mailbox: Mailbox,
    /// Host CPUs per vCPU id; `None`: every CPU the process could use at start.
    pub affinity: Vec<Option<Vec<usize>>>,
    /// The process's CPUs before any emulator pinning, for vCPUs without their own.
    pub default_affinity: Vec<usize>,
}

/// Owns every vCPU of the VM.
pub struct VcpuManager {
    setup: VcpuSetup,
    control: Arc<RunControl>,
    slots: Vec<Slot>,
}

impl VcpuManager {
    pub fn new(setup: VcpuSetup) -> Self {
        let slots = (0..setup.max).map(|_| Slot::default()).collect();
        VcpuManager {
            setup,
            control: Arc::default(),
            slots,
        }
    }

    /// The number of vCPUs whose threads run.
    pub fn online(&self) -> u32 {
        self.slots.iter().filter(|s| s.running.is_some()).count() as u32
    }

    /// Possible vCPUs.
    pub fn max(&self) -> u32 {
        self.setup.max
    }

    /// (vCPU id, thread id) of every running vCPU, by id.
    pub fn threads(&self) -> Vec<(u32, i32)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.running.as_ref().map(|r| (i as u32, r.tid)))
            .collect()
    }

    /// Whether vCPUs are held paused.
    pub fn is_paused(&self) -> bool {
        self.control.paused.load(Ordering::SeqCst)
    }

    /// Creates (first time) and starts vCPU `id`; returns its thread id. While the VM is
    /// paused the new thread parks before running guest code.
    pub fn start(&mut self, id: u32) -> Result<i32> {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            bail!(
                "vCPU {id} does not exist: this VM has at most {} vCPUs",
                self.setup.max
            );
        };
        if slot.running.is_some() {
            bail!("vCPU {id} is already running");
        }
        let fd = match slot.parked_fd.take() {
            Some(fd) => fd,
            None => {
                let fd = self
                    .setup
                    .vm
                    .create_vcpu(u64::from(id))
                    .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
                vcpu::setup_vcpu(&self.setup.kvm, &fd, id, self.setup.max, self.setup.entry)
                    .with_context(|| format!("setting up vcpu{id}"))?;
                if id == 0 {
                    vcpu::setup_boot_regs(&fd, self.setup.entry)?;
                }
                fd
            }
        };
        let cpus = self.setup.affinity.get(id as usize).cloned().flatten();
        let cpus = cpus.unwrap_or_else(|| self.setup.default_affinity.clone());
        let running = spawn_vcpu(
            id,
            fd,
            cpus,
            self.setup.exits.clone(),
            self.setup.mailbox.clone(),
            self.control.clone(),
        )?;
        let tid = running.tid;
        self.slots[id as usize].running = Some(running);
        Ok(tid)
    }

    /// Stops every vCPU and waits (up to 2 s) until all are parked; false if some did not.
    pub fn pause(&self) -> bool {
        {
            let mut st = self.control.lock();
            st.paused = true;
            self.control.paused.store(true, Ordering::SeqCst);
        }
        for r in self.slots.iter().filter_map(|s| s.running.as_ref()) {
            r.kick();
        }
        let want = self.online() as usize;
        let deadline = Instant::now() + PAUSE_TIMEOUT;
        let mut st = self.control.lock();
        while st.parked < want {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self
                .control
                .cv
                .wait_timeout(st, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        let mut st = self.control.lock();
        st.paused = false;
        self.control.paused.store(false, Ordering::SeqCst);
        self.control.cv.notify_all();
    }

    /// Ends vCPU `id`'s thread (after the guest ejected it) and keeps its fd for a re-plug.
    pub fn stop(&mut self, id: u32) -> Result<()> {
        let Some(r) = self
            .slots
            .get_mut(id as usize)
            .and_then(|s| s.running.take())
        else {
            bail!("vCPU {id} is not running");
        };
        r.stop.store(true, Ordering::SeqCst);
        {
            // Wake it if it is parked.
            let _st = self.control.lock();
            self.control.cv.notify_all();
        }
        match join(r) {
            Some(fd) => {
                self.slots[id as usize].parked_fd = Some(fd);
                Ok(())
            }
            None => bail!("vcpu{id} did not stop within {STOP_TIMEOUT:?}"),
        }
    }

    /// Makes every vCPU thread return and joins it (the VM is exiting).
    pub fn stop_all(&mut self) {
        {
            let mut st = self.control.lock();
            st.exiting = true;
            self.control.exiting.store(true, Ordering::SeqCst);
            self.control.cv.notify_all();
        }
        for (id, slot) in self.slots.iter_mut().enumerate() {
            if let Some(r) = slot.running.take() {
                if join(r).is_none() {
                    log::error!(
                        "vcpu{id} did not stop within {STOP_TIMEOUT:?}; exiting without it"
                    );
                }
            }
        }
    }
}

impl Drop for VcpuManager {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// Kicks `r` until its thread returns (at most [`STOP_TIMEOUT`]) and joins it.
fn join(r: Running) -> Option<VcpuFd> {
    let t = Instant::now();
    while !r.handle.is_finished() && t.elapsed() < STOP_TIMEOUT {
        r.kick();
        thread::sleep(Duration::from_micros(500));
    }
    if !r.handle.is_finished() {
        return None;
    }
    match r.handle.join() {
        Ok(fd) => Some(fd),
        Err(_) => {
            log::error!("a vCPU thread panicked");
            None
        }
    }
}

fn spawn_vcpu(
    id: u32,
    mut fd: VcpuFd,
    cpus: Vec<usize>,
    exits: Arc<ExitHandler>,
    mailbox: Mailbox,
    control: Arc<RunControl>,
) -> Result<Running> {
    let stop = Arc::new(AtomicBool::new(false));
    let alive = Arc::new(Mutex::new(true));
    let (tx, rx) = std::sync::mpsc::channel();
    let (st, al) = (stop.clone(), alive.clone());
    let handle = threads::spawn(&format!("vcpu{id}"), move || {
        if let Err(e) = threads::set_affinity(&cpus) {
            log::warn!("vcpu{id}: cannot set its CPU affinity to {cpus:?}: {e}");
        }
        // SAFETY: pthread_self has no preconditions.
        let _ = tx.send((threads::gettid(), unsafe { libc::pthread_self() }));
        vcpu::bind_kick(&mut fd);
        run_loop(id, &mut fd, &exits, &mailbox, &control, &st);
        *al.lock().unwrap_or_else(|e| e.into_inner()) = false;
        vcpu::unbind_kick();
        fd
    })
    .context("spawning a vCPU thread")?;
    let (tid, pthread) = rx
        .recv()
        .map_err(|_| anyhow::anyhow!("vcpu{id}: the thread died at start"))?;
    Ok(Running {
        handle,
        tid,
        pthread,
        stop,
        alive,
    })
}

fn run_loop(
    id: u32,
    fd: &mut VcpuFd,
    exits: &ExitHandler,
    mailbox: &Mailbox,
    control: &RunControl,
    stop: &AtomicBool,
) {
    loop {
        // Clear a kick first, then look at the flags: a kick after this point makes the next
        // KVM_RUN return at once, so a pause or stop is never missed.
        fd.set_kvm_immediate_exit(0);
        if control.exiting.load(Ordering::SeqCst) || stop.load(Ordering::SeqCst) {
            return;
        }
        if control.paused.load(Ordering::SeqCst) {
            control.park(stop);
            continue;
        }
        match fd.run() {
            Ok(exit) => {
                if let Some(r) = exits.handle(exit, id) {
                    mailbox.exit(r);
                    return;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                log::error!("vcpu{id}: KVM_RUN failed: {e}");
                mailbox.exit(ExitReason::Error);
                return;
            }
        }
    }
}
