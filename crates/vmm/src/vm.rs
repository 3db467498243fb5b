//! VM creation on /dev/kvm, vCPU threads and exit handling.

use std::io::Read;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_pit_config, kvm_segment, kvm_userspace_memory_region, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use rvirt_api::vmm::{Event, ExitReason, RunState};
use rvirt_devices::pci::{PciBus, PciWindows};
use rvirt_devices::virtio::{self, VirtioPciDevice};
use rvirt_devices::{IoEventRegistry, MsiRouting};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootEntry, GuestMem};
use crate::cli::{SerialMode, VmConfig};
use crate::devices::{IrqLine, Legacy, Pm, SerialOut};
use crate::interrupts::{IoEvents, Routing};
use crate::layout::*;

/// State shared by the vCPU threads, the control socket and the main thread.
pub struct Shared {
    pub name: Option<String>,
    pub vcpus: u32,
    pub memory: u64,
    exit: Mutex<Option<ExitReason>>,
    exit_cv: Condvar,
    pub state: Mutex<RunState>,
    paused: AtomicBool,
    parked: AtomicUsize,
    pause_lock: Mutex<()>,
    pause_cv: Condvar,
    /// (tid, pthread) per vCPU.
    pub threads: Mutex<Vec<(i32, libc::pthread_t)>>,
    /// Whether each vCPU thread still runs; a thread clears its flag (under this lock) just
    /// before it returns, and kicks are sent only while holding the lock, so no signal ever
    /// goes to a thread that has finished.
    vcpu_alive: Mutex<Vec<bool>>,
    pub watchers: Mutex<Vec<std::os::unix::net::UnixStream>>,
    pub legacy: Mutex<Option<Arc<Legacy>>>,
    /// Closed while the VM is paused: device workers do not touch guest memory.
    pub gate: virtio::PauseGate,
}

impl Shared {
    fn new(cfg: &VmConfig) -> Self {
        Shared {
            name: cfg.name.clone(),
            vcpus: cfg.cpus.boot,
            memory: cfg.memory.size,
            exit: Mutex::new(None),
            exit_cv: Condvar::new(),
            state: Mutex::new(RunState::Running),
            paused: AtomicBool::new(false),
            parked: AtomicUsize::new(0),
            pause_lock: Mutex::new(()),
            pause_cv: Condvar::new(),
            threads: Mutex::new(Vec::new()),
            vcpu_alive: Mutex::new(vec![true; cfg.cpus.boot as usize]),
            watchers: Mutex::new(Vec::new()),
            legacy: Mutex::new(None),
            gate: virtio::PauseGate::new(),
        }
    }

    /// Ask the VM to stop with `reason` (the first request wins).
    pub fn request_exit(&self, reason: ExitReason) {
        let mut g = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(reason);
        }
        self.exit_cv.notify_all();
        // Wake parked vCPUs so they see the exit.
        let _l = self.pause_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.pause_cv.notify_all();
    }

    fn stopping(&self) -> bool {
        self.exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn wait_exit(&self) -> ExitReason {
        let mut g = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = *g {
                return r;
            }
            g = self.exit_cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Current run state.
    pub fn run_state(&self) -> RunState {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Change the run state and tell watchers.
    pub fn set_state(&self, s: RunState) {
        {
            let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if *g == s {
                return;
            }
            *g = s;
        }
        self.broadcast(&Event::StateChanged { state: s });
    }

    /// Send an event line to every watcher.
    pub fn broadcast(&self, ev: &Event) {
        use std::io::Write;
        let Ok(mut line) = serde_json::to_string(ev) else {
            return;
        };
        line.push('\n');
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.retain_mut(|s| s.write_all(line.as_bytes()).is_ok());
    }

    fn kick_all(&self) {
        let alive = self.vcpu_alive.lock().unwrap_or_else(|e| e.into_inner());
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for (i, (_, pt)) in threads.iter().enumerate() {
            if !alive.get(i).copied().unwrap_or(false) {
                continue;
            }
            // SAFETY: the thread has not cleared its alive flag, which it does under the lock
            // we hold before returning, so it is running and not yet joined; the signal has a
            // no-op handler installed.
            unsafe {
                libc::pthread_kill(*pt, vcpu_signal());
            }
        }
    }

    /// Called by vCPU thread `id` right before it returns.
    fn vcpu_finished(&self, id: usize) {
        let mut alive = self.vcpu_alive.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = alive.get_mut(id) {
            *a = false;
        }
    }

    /// Stop all vCPUs, then the device workers (they finish the request in hand and touch
    /// guest memory no more until [`Shared::resume`]); true once every vCPU is parked and every
    /// worker idle (false if that took over 2 s; the VM stays paused as far as it got).
    pub fn pause(&self) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        let mut vcpus_parked = false;
        for _ in 0..2000 {
            if self.parked.load(Ordering::SeqCst) >= self.vcpus as usize {
                vcpus_parked = true;
                break;
            }
            self.kick_all();
            thread::sleep(Duration::from_millis(1));
        }
        let workers_idle = self.gate.pause(Duration::from_secs(2));
        self.set_state(RunState::Paused);
        vcpus_parked && workers_idle
    }

    /// Let the device workers and the vCPUs run again.
    pub fn resume(&self) {
        self.gate.resume();
        self.paused.store(false, Ordering::SeqCst);
        let _l = self.pause_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.pause_cv.notify_all();
        drop(_l);
        self.set_state(RunState::Running);
    }

    fn park_if_paused(&self) {
        if !self.paused.load(Ordering::SeqCst) {
            return;
        }
        let mut l = self.pause_lock.lock().unwrap_or_else(|e| e.into_inner());
        self.parked.fetch_add(1, Ordering::SeqCst);
        while self.paused.load(Ordering::SeqCst) && !self.stopping() {
            l = self.pause_cv.wait(l).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

fn vcpu_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn noop_handler(_: libc::c_int) {}

fn install_kick_handler() -> Result<()> {
    // SAFETY: a zeroed sigaction with a handler that does nothing is a valid argument; no
    // SA_RESTART so KVM_RUN returns EINTR.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = noop_handler as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(vcpu_signal(), &sa, std::ptr::null_mut()) != 0 {
            bail!("sigaction: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Everything a vCPU thread needs to handle exits.
struct Exits {
    legacy: Arc<Legacy>,
    bus: Arc<PciBus>,
    shared: Arc<Shared>,
}

impl Exits {
    fn handle(&self, exit: VcpuExit<'_>, id: u32) -> Option<ExitReason> {
        match exit {
            VcpuExit::IoIn(port, data) => {
                if !self.legacy.pio_read(port, data) && !self.bus.pio_read(port, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                let (done, reason) = self.legacy.pio_write(port, data);
                if reason.is_some() {
                    return reason;
                }
                if !done {
                    self.bus.pio_write(port, data);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
                    self.bus.ecam_read(addr - ECAM_BASE, data);
                } else if !self.bus.mmio_read(addr, data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if (ECAM_BASE..ECAM_BASE + ECAM_SIZE).contains(&addr) {
                    self.bus.ecam_write(addr - ECAM_BASE, data);
                } else {
                    self.bus.mmio_write(addr, data);
                }
            }
            VcpuExit::Hlt => thread::sleep(Duration::from_millis(1)),
            VcpuExit::Shutdown => {
                eprintln!("rvirt-vmm: vcpu{id}: triple fault (KVM shutdown exit): guest crashed");
                return Some(ExitReason::Crash);
            }
            VcpuExit::SystemEvent(ty, _) => {
                return Some(match ty {
                    kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Poweroff,
                    kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                    _ => ExitReason::Crash,
                });
            }
            VcpuExit::FailEntry(reason, cpu) => {
                eprintln!("rvirt-vmm: vcpu{id}: VM entry failed (reason {reason:#x}, cpu {cpu})");
                return Some(ExitReason::Error);
            }
            VcpuExit::InternalError => {
                eprintln!("rvirt-vmm: vcpu{id}: KVM internal error (emulation failure)");
                return Some(ExitReason::Crash);
            }
            VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
            other => {
                log::warn!("vcpu{id}: unhandled exit {other:?}");
            }
        }
        let _ = &self.shared;
        None
    }
}

fn segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

fn setup_boot_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<()> {
    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let long = matches!(entry, BootEntry::Linux64 { .. });
    let code = if long {
        segment(0x8, true, true)
    } else {
        segment(0x10, true, false)
    };
    let data = segment(0x18, false, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x20,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (boot::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
    regs.rflags = 2;
    match entry {
        BootEntry::Pvh { entry } => {
            sregs.cr0 = 0x11; // PE | ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_START_INFO;
        }
        BootEntry::Linux64 { entry } => {
            sregs.cr3 = PML4;
            sregs.cr4 = 0x20; // PAE
            sregs.cr0 = 0x8000_0011; // PG | ET | PE
            sregs.efer = 0x500; // LME | LMA
            regs.rip = entry;
            regs.rsi = ZERO_PAGE;
            regs.rsp = 0x8ff0;
            regs.rbp = 0x8ff0;
        }
    }
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(())
}

fn patch_cpuid(kvm: &Kvm, id: u32, ncpus: u32) -> Result<kvm_bindings::CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    if !crate::cpuid::patch(cpuid.as_mut_slice(), id, ncpus) {
        let _ = cpuid.push(crate::cpuid::hypervisor_leaf());
    }
    Ok(cpuid)
}

fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    let get = |regs: &[libc::c_char], off: usize| -> u32 {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let put = |regs: &mut [libc::c_char], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as libc::c_char;
        }
    };
    let lint0 = get(&lapic.regs, 0x350);
    put(&mut lapic.regs, 0x350, (lint0 & !0x700) | (7 << 8)); // ExtINT
    let lint1 = get(&lapic.regs, 0x360);
    put(&mut lapic.regs, 0x360, (lint1 & !0x700) | (4 << 8)); // NMI
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    Ok(())
}

fn setup_vcpu(kvm: &Kvm, vcpu: &VcpuFd, id: u32, ncpus: u32) -> Result<()> {
    let cpuid = patch_cpuid(kvm, id, ncpus)?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;
    let msrs = Msrs::from_entries(&[
        kvm_msr_entry {
            index: 0x1a0, // IA32_MISC_ENABLE: fast strings
            data: 1,
            ..Default::default()
        },
        kvm_msr_entry {
            index: 0x2ff, // MTRRdefType: enabled, default write-back
            data: (1 << 11) | 6,
            ..Default::default()
        },
    ])
    .map_err(|e| anyhow::anyhow!("MSR list: {e:?}"))?;
    vcpu.set_msrs(&msrs).context("KVM_SET_MSRS")?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;
    set_lint(vcpu)?;
    Ok(())
}

type SerialSink = Box<dyn std::io::Write + Send>;

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

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

fn feed_serial(com1: &Arc<Mutex<crate::devices::Com1>>, mut input: impl Read) {
    let mut buf = [0u8; 64];
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        enqueue(com1, &buf[..n]);
    }
}

fn enqueue(com1: &Arc<Mutex<crate::devices::Com1>>, bytes: &[u8]) {
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
fn feed_console(com1: &Arc<Mutex<crate::devices::Com1>>, mut input: impl Read, sh: &Shared) {
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
            sh.request_exit(ExitReason::Quit);
            return;
        }
    }
}

/// Create the VM, run it, and return why it stopped.
pub fn run(cfg: VmConfig) -> Result<ExitReason> {
    let kvm = Kvm::new().map_err(|e| {
        anyhow::anyhow!(
            "cannot open /dev/kvm ({e}): load the kvm module (kvm_intel/kvm_amd) and check the permissions of /dev/kvm"
        )
    })?;
    let max = kvm.get_max_vcpus();
    if cfg.cpus.boot as usize > max {
        bail!(
            "--cpus {}: this host's KVM allows at most {max} vCPUs",
            cfg.cpus.boot
        );
    }
    let vm = Arc::new(kvm.create_vm().context("KVM_CREATE_VM")?);
    vm.set_tss_address(TSS_ADDR as usize)
        .context("KVM_SET_TSS_ADDR")?;
    vm.create_irq_chip().context("KVM_CREATE_IRQCHIP")?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .context("KVM_CREATE_PIT2")?;

    let mem = boot::create_memory(cfg.memory.size)?;
    register_memory(&vm, &mem)?;
    boot::write_boot_structures(&mem)?;
    let rsdp = crate::acpi::write_tables(&mem, cfg.cpus.boot, cfg.memory.size)
        .context("writing ACPI tables")?;
    let entry = boot::load(&cfg, &mem, Some(rsdp))?;

    let shared = Arc::new(Shared::new(&cfg));
    install_kick_handler()?;
    let signals = QuitSignals::start(shared.clone())?;

    // Serial.
    let (sink, pty_master) = open_serial_output(&cfg.serial)?;
    let sink = Arc::new(Mutex::new(sink));
    let com1_irq = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.register_irqfd(&com1_irq, 4)
        .context("KVM_IRQFD for COM1 (GSI 4)")?;
    let com1 = Arc::new(Mutex::new(Serial::new(
        IrqLine(com1_irq),
        SerialOut { sink: sink.clone() },
    )));
    let mut raw_term = None;
    match &cfg.serial {
        SerialMode::Stdio => {
            raw_term = crate::term::RawTerminal::enter(libc::STDIN_FILENO)
                .context("--serial stdio: cannot put the stdin terminal into raw mode")?;
            let c = com1.clone();
            let escape = raw_term.is_some().then(|| shared.clone());
            if escape.is_some() {
                eprintln!("rvirt-vmm: console on this terminal in raw mode; Ctrl-A x quits");
            }
            thread::Builder::new()
                .name("serial-in".into())
                .spawn(move || match escape {
                    Some(sh) => feed_console(&c, std::io::stdin(), &sh),
                    None => feed_serial(&c, std::io::stdin()),
                })?;
        }
        SerialMode::Pty => {
            if let Some(m) = pty_master {
                let c = com1.clone();
                thread::Builder::new()
                    .name("serial-in".into())
                    .spawn(move || feed_serial(&c, m))?;
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
            let c = com1.clone();
            let sink = sink.clone();
            thread::Builder::new()
                .name("serial-sock".into())
                .spawn(move || {
                    for s in l.incoming().flatten() {
                        if let Ok(w) = s.try_clone() {
                            *sink.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(w));
                        }
                        feed_serial(&c, s);
                        *sink.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    }
                })?;
        }
        SerialMode::None => {}
    }

    let sci = EventFd::new(libc::EFD_NONBLOCK).context("eventfd")?;
    vm.register_irqfd(&sci, 9)
        .context("KVM_IRQFD for the ACPI SCI (GSI 9)")?;
    // Weak: `shared` holds `legacy`, a strong reference back would keep both alive forever.
    let sh = Arc::downgrade(&shared);
    let legacy = Arc::new(Legacy {
        com1,
        cmos_index: Mutex::new(0),
        // SCI_EN set: the guest finds ACPI mode already enabled (there is no SMI_CMD).
        pm: Arc::new(Mutex::new(Pm {
            cnt: 1,
            ..Default::default()
        })),
        sci: Some(sci),
        on_pm_write: Some(Box::new(move |_pm| {
            if let Some(sh) = sh.upgrade() {
                sh.set_state(RunState::ShuttingDown);
            }
        })),
    });
    *shared.legacy.lock().unwrap_or_else(|e| e.into_inner()) = Some(legacy.clone());

    // PCI + virtio.
    let routing: Arc<dyn MsiRouting> =
        Arc::new(Routing::new(vm.clone()).map_err(|e| anyhow::anyhow!("GSI routing: {e}"))?);
    let ioevents: Arc<dyn IoEventRegistry> = Arc::new(IoEvents { vm: vm.clone() });
    let m64 = pci_mmio64_start(cfg.memory.size);
    let bus = Arc::new(PciBus::new(PciWindows {
        mmio32: PCI_MMIO32,
        mmio64: m64..m64 + PCI_MMIO64_SIZE,
        io: PCI_IO,
    }));
    let mut devs: Vec<Arc<Mutex<VirtioPciDevice>>> = Vec::new();
    let mut disks: Vec<(std::path::PathBuf, Arc<dyn rvirt_image::BlockDevice>)> = Vec::new();
    for (i, d) in cfg.disks.iter().enumerate() {
        let opts = rvirt_image::OpenOptions {
            read_only: d.readonly,
            direct: d.cache.direct(),
            ..Default::default()
        };
        let format = d.format.map(|f| match f {
            crate::cli::DiskFormat::Raw => rvirt_image::Format::Raw,
            crate::cli::DiskFormat::Qcow2 => rvirt_image::Format::Qcow2,
        });
        let img = rvirt_image::open_image(&d.path, format, &opts).with_context(|| {
            format!(
                "--disk {} (cache={}): cannot open the image",
                d.path.display(),
                d.cache.name()
            )
        })?;
        let img: Arc<dyn rvirt_image::BlockDevice> = Arc::new(img);
        // The exit flush goes to the image itself: it happens even with cache=unsafe.
        disks.push((d.path.clone(), img.clone()));
        let img: Arc<dyn rvirt_image::BlockDevice> = Arc::new(rvirt_image::Cached::new(
            img,
            rvirt_image::CachePolicy {
                write_through: d.cache.write_through(),
                ignore_flush: !d.cache.honours_flush(),
            },
        ));
        let blk = virtio::block::Block::new(
            img,
            &virtio::block::BlockConfig {
                id: d.serial.clone().unwrap_or_else(|| format!("disk{i}")),
                read_only: d.readonly,
            },
        );
        devs.push(Arc::new(Mutex::new(
            VirtioPciDevice::new(
                Box::new(blk),
                mem.clone(),
                routing.clone(),
                ioevents.clone(),
            )
            .with_context(|| format!("virtio-blk for {}", d.path.display()))?,
        )));
    }
    for (i, n) in cfg.nets.iter().enumerate() {
        let tap = virtio::net::Tap::open(&n.tap).with_context(|| format!("--net tap={}", n.tap))?;
        let mac = n.mac.unwrap_or_else(|| crate::cli::default_mac(i));
        let nic = virtio::net::Net::new(Arc::new(tap), virtio::net::NetConfig { mac });
        devs.push(Arc::new(Mutex::new(
            VirtioPciDevice::new(
                Box::new(nic),
                mem.clone(),
                routing.clone(),
                ioevents.clone(),
            )
            .with_context(|| format!("virtio-net for tap {}", n.tap))?,
        )));
    }
    let rng = virtio::rng::Rng::new().context("virtio-rng: /dev/urandom")?;
    devs.push(Arc::new(Mutex::new(
        VirtioPciDevice::new(
            Box::new(rng),
            mem.clone(),
            routing.clone(),
            ioevents.clone(),
        )
        .context("virtio-rng")?,
    )));
    let dev_refs = devs.clone();
    for d in devs {
        d.lock()
            .unwrap_or_else(|e| e.into_inner())
            .set_pause_gate(shared.gate.clone());
        bus.add_device(d)
            .map_err(|e| anyhow::anyhow!("adding a PCI device: {e}"))?;
    }

    // vCPUs.
    let mut vcpu_fds = Vec::new();
    for id in 0..cfg.cpus.boot {
        let vcpu = vm
            .create_vcpu(u64::from(id))
            .with_context(|| format!("KVM_CREATE_VCPU {id}"))?;
        setup_vcpu(&kvm, &vcpu, id, cfg.cpus.boot)
            .with_context(|| format!("setting up vcpu{id}"))?;
        if id == 0 {
            setup_boot_regs(&vcpu, entry)?;
        }
        vcpu_fds.push(vcpu);
    }

    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let mut handles = Vec::with_capacity(vcpu_fds.len());
    for (id, mut vcpu) in vcpu_fds.into_iter().enumerate() {
        let exits = Exits {
            legacy: legacy.clone(),
            bus: bus.clone(),
            shared: shared.clone(),
        };
        let sh = shared.clone();
        let tx = tid_tx.clone();
        let h = thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                // SAFETY: pthread_self has no preconditions.
                let pt = unsafe { libc::pthread_self() };
                let _ = tx.send((id, gettid(), pt));
                loop {
                    if sh.stopping() {
                        break;
                    }
                    sh.park_if_paused();
                    match vcpu.run() {
                        Ok(exit) => {
                            if let Some(r) = exits.handle(exit, id as u32) {
                                sh.request_exit(r);
                                break;
                            }
                        }
                        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                        Err(e) => {
                            eprintln!("rvirt-vmm: vcpu{id}: KVM_RUN failed: {e}");
                            sh.request_exit(ExitReason::Error);
                            break;
                        }
                    }
                }
                sh.vcpu_finished(id);
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                shared.vcpu_finished(id);
                shared.request_exit(ExitReason::Error);
                stop_vcpus(&shared, handles);
                return Err(e).context("spawning a vCPU thread");
            }
        }
    }
    drop(tid_tx);
    let mut threads: Vec<(usize, i32, libc::pthread_t)> =
        tid_rx.iter().take(cfg.cpus.boot as usize).collect();
    threads.sort_by_key(|t| t.0);
    *shared.threads.lock().unwrap_or_else(|e| e.into_inner()) =
        threads.into_iter().map(|(_, t, p)| (t, p)).collect();

    // The control socket answers once the VM is fully set up (vCPU threads known).
    let control = match &cfg.api_socket {
        Some(path) => match crate::control::start(path, shared.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                shared.request_exit(ExitReason::Error);
                stop_vcpus(&shared, handles);
                return Err(e);
            }
        },
        None => None,
    };

    let mut reason = shared.wait_exit();
    // Orderly stop: vCPUs first (nothing touches devices any more), then the devices (their
    // workers finish in-flight requests and are joined), then the disks are flushed. Only then
    // do watchers hear `exited`, so a supervisor that restarts the VM never finds the old
    // process still writing.
    stop_vcpus(&shared, handles);
    // A VM stopped while paused: let the workers finish what they hold before they are joined.
    shared.gate.resume();
    drop(bus);
    for d in dev_refs {
        if let Err(d) = Arc::try_unwrap(d) {
            let name = d.lock().map(|g| g.name()).unwrap_or("?");
            eprintln!("rvirt-vmm: virtio-{name} is still referenced at exit; its worker may outlive the VM");
        }
    }
    for (path, disk) in disks {
        if disk.read_only() {
            continue;
        }
        if let Err(e) = disk.flush() {
            eprintln!(
                "rvirt-vmm: error: flushing disk {} at exit failed: {e}; the guest's last writes may be lost",
                path.display()
            );
            reason = ExitReason::Error;
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    shared.broadcast(&Event::Exited { reason });
    if let Some(c) = control {
        c.stop();
    }
    if let SerialMode::Socket(p) = &cfg.serial {
        let _ = std::fs::remove_file(p);
    }
    *shared.legacy.lock().unwrap_or_else(|e| e.into_inner()) = None;
    drop(signals);
    drop(raw_term);
    Ok(reason)
}

/// Make every vCPU thread return and join it: kick (signal) the ones still running until all
/// have finished, for at most 5 s. A thread that never returns is left detached, with a message.
fn stop_vcpus(shared: &Shared, handles: Vec<thread::JoinHandle<()>>) {
    let t = std::time::Instant::now();
    while handles.iter().any(|h| !h.is_finished()) && t.elapsed() < Duration::from_secs(5) {
        shared.kick_all();
        thread::sleep(Duration::from_micros(500));
    }
    for (id, h) in handles.into_iter().enumerate() {
        if h.is_finished() {
            if h.join().is_err() {
                eprintln!("rvirt-vmm: vcpu{id} thread panicked");
            }
        } else {
            eprintln!("rvirt-vmm: vcpu{id} did not stop within 5 s; exiting without it");
        }
    }
}

/// SIGTERM, SIGINT and SIGHUP stop the VM like `quit` (exit 0): they are blocked in every VMM
/// thread and taken by one `signals` thread with sigwait, so the normal exit path (devices
/// stopped, disks flushed, terminal restored) runs. Dropping this stops that thread and restores
/// the signal mask of the calling thread.
struct QuitSignals {
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
    fn start(shared: Arc<Shared>) -> Result<Self> {
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
        let spawned = thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
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
                        shared.request_exit(ExitReason::Quit);
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

fn register_memory(vm: &VmFd, mem: &GuestMem) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mmap owned by `mem`, which outlives the VM (both are
        // dropped only when `run` returns and the process exits); its size is `region.len()`.
        unsafe { vm.set_user_memory_region(r) }
            .with_context(|| format!("KVM_SET_USER_MEMORY_REGION slot {slot}"))?;
    }
    Ok(())
}
