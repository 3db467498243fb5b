//! rvirt-fake-vmm: a test double of rvirt-vmm for rvirtd's supervision tests. It runs no guest.
//!
//! It takes rvirt-vmm's command line (flags, or `--config FILE` with the JSON
//! `rvirt_api::vmm_config::VmConfig` rvirtd writes), speaks the real control protocol
//! (`rvirt_api::vmm`) on the API socket, runs one idle thread per vCPU named `vcpu<N>` (so
//! pinning can be checked), and serves a `socket=PATH` serial as a console. With
//! `start_paused` (`--start-paused`) it starts paused; on the first resume it prints the
//! affinity of every thread to stderr (`rvirt-fake-vmm: resumed; affinity ...`), so tests can
//! check that pinning happened before the vCPUs ran. Its "guest" is scripted by words in
//! `--cmdline`, and by lines typed on the console:
//!
//! - cmdline `fake.ignore_acpi`: the power button does nothing (for shutdown timeouts)
//! - cmdline `fake.shutdown_ms=N`: after the power button, report "shutting down" and power off
//!   N ms later (default 50)
//! - cmdline `fake.fail_start`: exit with an error before serving (a VMM that cannot start)
//! - cmdline `fake.ignore_start_paused`: run at once even with `start_paused` (an older VMM)
//! - console `poweroff` / `reboot` / `panic`: exit as rvirt-vmm does on guest poweroff (0),
//!   reboot (3) or crash (4); `progress`: print how many 10 ms ticks the vCPUs ran (stops while
//!   paused); anything else is echoed.
//!
//! Live resources are simulated, without a guest: the balloon's `actual` walks to the target in
//! a few steps (~200 ms) with a `balloon_changed` event per step; `set_vcpus` starts/ends idle
//! `vcpu<N>` threads (`vcpu_added` at once, `vcpu_removed` ~50 ms later, as an ejecting guest);
//! `add_disk`/`add_net` take the lowest free PCI slot and `remove_device` reports
//! `device_removed` ~50 ms later; `stats` returns the process RSS and fixed per-device counters.
//! A guest that never ejects (to test timeouts): env `RVIRT_FAKE_NO_EJECT=1` or cmdline word
//! `fake.no_eject`. Boot devices, the vCPU maximum and the balloon's start are read from the
//! command line, or from a `--config FILE` (rvirt-vmm's typed JSON) when one is given.

use rvirt_api::vmm::{
    BalloonStats, DeviceStats, Event, ExitReason, Request, Response, RunState, VcpuThread,
};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

struct Vm {
    name: Option<String>,
    vcpus: u32,
    memory_bytes: u64,
    paused: AtomicBool,
    /// Started paused and not resumed yet.
    start_paused: AtomicBool,
    ticks: AtomicU64,
    tids: Mutex<Vec<i32>>,
    watchers: Mutex<Vec<UnixStream>>,
    ignore_acpi: bool,
    /// `fake.shutdown_ms=N`: how long the guest takes to power off after the button.
    shutdown_ms: Option<u64>,
    sockets: Vec<PathBuf>,
    /// Balloon, hotplugged devices, ejected vCPUs: the simulated live resources.
    live: Mutex<Live>,
}

/// A device on the fake PCI bus.
#[derive(Clone)]
struct FakeDevice {
    id: String,
    kind: &'static str,
    backend: String,
    slot: u8,
}

#[derive(Default)]
struct Live {
    /// (actual, target) in bytes; `None` until first used (then both are the RAM size).
    balloon: Option<(u64, u64)>,
    stats_period: u32,
    /// Boot devices (read once from the command line) and hotplugged ones.
    devices: Option<Vec<FakeDevice>>,
    /// Ids whose removal was asked for (a second request does not start a second eject).
    unplugging: BTreeSet<String>,
    /// vCPUs whose thread must end.
    stopping: BTreeSet<u32>,
}

/// Most vCPUs the stand-in runs (it has no ACPI table to size).
const FAKE_MAX_VCPUS: u32 = 64;
/// First PCI slot devices get (slot 0 host bridge, 1 ISA bridge, as on i440fx).
const FIRST_SLOT: u8 = 2;

fn shutdown_delay_ms(vm: &Vm) -> u64 {
    vm.shutdown_ms.unwrap_or(50)
}

impl Vm {
    fn state(&self) -> RunState {
        if self.paused.load(Ordering::SeqCst) {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    fn broadcast(&self, ev: &Event) {
        let line = format!("{}\n", serde_json::to_string(ev).unwrap());
        let mut w = self.watchers.lock().unwrap();
        w.retain_mut(|s| s.write_all(line.as_bytes()).is_ok());
    }

    fn exit(&self, reason: ExitReason) -> ! {
        self.broadcast(&Event::Exited { reason });
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        std::process::exit(reason.exit_code());
    }
}

fn parse_memory(s: &str) -> Option<u64> {
    let (num, mult) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 1 << 10),
        'M' | 'm' => (&s[..s.len() - 1], 1 << 20),
        'G' | 'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok().map(|n| n * mult)
}

fn fail(msg: &str) -> ! {
    eprintln!("rvirt-fake-vmm: error: {msg}");
    std::process::exit(rvirt_api::vmm::exit_code::VMM_ERROR);
}

fn exists_or_fail(path: &std::path::Path, what: &str) {
    if !path.exists() {
        fail(&format!("cannot open {what} {}", path.display()));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut api = None;
    let mut serial = None;
    let (mut vcpus, mut memory, mut name, mut cmdline) = (1u32, 256u64 << 20, None, String::new());
    let mut start_paused = false;
    let mut i = 0;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--config" => {
                if args.len() != 2 {
                    fail("--config excludes every other option");
                }
                let text = std::fs::read_to_string(&val)
                    .unwrap_or_else(|e| fail(&format!("--config {val}: {e}")));
                let cfg: rvirt_api::vmm_config::VmConfig = serde_json::from_str(&text)
                    .unwrap_or_else(|e| fail(&format!("--config {val}: {e}")));
                match &cfg.boot {
                    rvirt_api::vmm_config::BootConfig::Kernel {
                        kernel,
                        initrd,
                        cmdline: c,
                    } => {
                        exists_or_fail(kernel, "kernel");
                        if let Some(i) = initrd {
                            exists_or_fail(i, "initrd");
                        }
                        cmdline = c.clone();
                    }
                    rvirt_api::vmm_config::BootConfig::Firmware { firmware, .. } => {
                        exists_or_fail(firmware, "firmware");
                    }
                }
                for p in cfg.disks.iter().filter_map(|d| d.path.as_ref()) {
                    exists_or_fail(p, "disk");
                }
                name = cfg.name.clone();
                vcpus = cfg.cpus.boot;
                memory = cfg.memory.size;
                api = cfg.api_socket.clone();
                serial = match &cfg.serial {
                    rvirt_api::vmm_config::SerialConfig::Socket(p) => Some(p.clone()),
                    _ => None,
                };
                start_paused = cfg.start_paused;
            }
            "--start-paused" => {
                start_paused = true;
                i += 1;
                continue;
            }
            "--api-socket" => api = Some(PathBuf::from(&val)),
            "--serial" => serial = val.strip_prefix("socket=").map(PathBuf::from),
            "--cpus" => vcpus = val.parse().unwrap_or_else(|_| fail("bad --cpus")),
            "--memory" => memory = parse_memory(&val).unwrap_or_else(|| fail("bad --memory")),
            "--name" => name = Some(val.clone()),
            "--cmdline" => cmdline = val.clone(),
            "--kernel" | "--initrd" => {
                if !std::path::Path::new(&val).exists() {
                    fail(&format!("cannot open {val}"));
                }
            }
            "--disk" => {
                let path = val
                    .split(',')
                    .find_map(|p| p.strip_prefix("path="))
                    .unwrap_or_else(|| fail("--disk needs path="));
                if !std::path::Path::new(path).exists() {
                    fail(&format!("cannot open disk {path}"));
                }
            }
            "--net" => {}
            other => fail(&format!("unknown option {other}")),
        }
        i += 2;
    }
    let api = api.unwrap_or_else(|| fail("--api-socket is required"));
    if cmdline.split_whitespace().any(|w| w == "fake.fail_start") {
        fail("simulated start-up failure (fake.fail_start)");
    }
    if cmdline
        .split_whitespace()
        .any(|w| w == "fake.ignore_start_paused")
    {
        start_paused = false;
    }
    let mut sockets = vec![api.clone()];
    sockets.extend(serial.clone());
    let vm = Arc::new(Vm {
        name,
        vcpus,
        memory_bytes: memory,
        paused: AtomicBool::new(start_paused),
        start_paused: AtomicBool::new(start_paused),
        ticks: AtomicU64::new(0),
        tids: Mutex::new(vec![0; vcpus as usize]),
        watchers: Mutex::new(Vec::new()),
        ignore_acpi: cmdline.split_whitespace().any(|w| w == "fake.ignore_acpi"),
        shutdown_ms: cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix("fake.shutdown_ms="))
            .and_then(|v| v.parse().ok()),
        sockets,
        live: Mutex::new(Live::default()),
    });
    for n in 0..vcpus {
        spawn_vcpu(&vm, n);
    }
    // Like rvirt-vmm, answer on the control socket only once the vCPU threads are known.
    while vm.tids.lock().unwrap().contains(&0) {
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(path) = serial {
        let listener = UnixListener::bind(&path).unwrap_or_else(|e| fail(&format!("{e}")));
        let vm = vm.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let vm = vm.clone();
                std::thread::spawn(move || console(vm, conn));
            }
        });
    }
    let listener =
        UnixListener::bind(&api).unwrap_or_else(|e| fail(&format!("{}: {e}", api.display())));
    for conn in listener.incoming().flatten() {
        let vm = vm.clone();
        std::thread::spawn(move || control(vm, conn));
    }
}

fn console(vm: Arc<Vm>, conn: UnixStream) {
    let mut out = conn.try_clone().unwrap();
    let name = vm.name.clone().unwrap_or_default();
    let _ = write!(out, "rvirt-fake-vmm: guest {name} booted\r\n");
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { break };
        match line.trim() {
            "poweroff" => vm.exit(ExitReason::Poweroff),
            "reboot" => vm.exit(ExitReason::Reboot),
            "panic" => vm.exit(ExitReason::Crash),
            "progress" => {
                let _ = write!(out, "progress {}\r\n", vm.ticks.load(Ordering::SeqCst));
            }
            other => {
                let _ = write!(out, "{other}\r\n");
            }
        }
    }
    // The client stopped sending: end the session.
    let _ = out.shutdown(std::net::Shutdown::Both);
}

fn control(vm: Arc<Vm>, conn: UnixStream) {
    let mut out = conn.try_clone().unwrap();
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        let resp = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
            Ok(Request::Watch) => {
                vm.watchers.lock().unwrap().push(out);
                return;
            }
            Ok(req) => handle(&vm, req),
        };
        let _ = writeln!(out, "{}", serde_json::to_string(&resp).unwrap());
        if line.contains("\"quit\"") {
            vm.exit(ExitReason::Quit);
        }
    }
}

fn handle(vm: &Arc<Vm>, req: Request) -> Response {
    match req {
        Request::Info => Response::Info {
            pid: std::process::id(),
            name: vm.name.clone(),
            state: vm.state(),
            vcpus: vm.tids.lock().unwrap().len() as u32,
            memory_bytes: vm.memory_bytes,
            max_vcpus: max_vcpus(vm),
            // The stand-in has no guest RAM: it reports what rvirt-vmm would apply for the
            // config file's backing (every hint taken).
            memory_backing: config_file().map(|c| {
                let b = &c.memory.backing;
                rvirt_api::vmm::MemoryBackingInfo {
                    source: if b.hugepages {
                        "hugepages"
                    } else if b.memfd || b.shared {
                        "memfd"
                    } else {
                        "anonymous"
                    }
                    .into(),
                    shared: b.shared,
                    ksm: !b.nosharepages,
                    thp: !b.hugepages,
                }
            }),
        },
        Request::Pause | Request::Resume => {
            let pause = req == Request::Pause;
            if !pause && vm.start_paused.swap(false, Ordering::SeqCst) {
                report_affinity(vm);
            }
            vm.paused.store(pause, Ordering::SeqCst);
            vm.broadcast(&Event::StateChanged { state: vm.state() });
            Response::Ok
        }
        Request::PowerButton => {
            if !vm.ignore_acpi {
                let vm = vm.clone();
                std::thread::spawn(move || {
                    vm.broadcast(&Event::StateChanged {
                        state: RunState::ShuttingDown,
                    });
                    std::thread::sleep(Duration::from_millis(shutdown_delay_ms(&vm)));
                    vm.exit(ExitReason::Poweroff)
                });
            }
            Response::Ok
        }
        Request::Quit => Response::Ok,
        Request::VcpuInfo => Response::VcpuInfo {
            vcpus: vm
                .tids
                .lock()
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, &tid)| VcpuThread {
                    vcpu: i as u32,
                    tid,
                    state: vm.state(),
                })
                .collect(),
        },
        Request::Stats => Response::Stats {
            rss_bytes: rss_bytes(),
            cpu_time_ns: 0,
            devices: devices(vm)
                .into_iter()
                .map(|d| DeviceStats {
                    counters: counters(&d),
                    id: d.id,
                    kind: d.kind.to_string(),
                    backend: Some(d.backend),
                    slot: d.slot,
                })
                .collect(),
        },
        Request::Watch => unreachable!("handled by the caller"),
        Request::Balloon { target_bytes } => set_balloon(vm, target_bytes),
        Request::QueryBalloon => {
            let (actual, target) = balloon(vm);
            Response::Balloon {
                actual_bytes: actual,
                target_bytes: target,
                max_bytes: vm.memory_bytes,
            }
        }
        Request::BalloonStats => {
            let (actual, _) = balloon(vm);
            let period = vm.live.lock().unwrap().stats_period;
            Response::BalloonStats {
                stats: guest_stats(actual, period),
            }
        }
        Request::SetBalloonStatsPeriod { seconds } => {
            vm.live.lock().unwrap().stats_period = seconds;
            Response::Ok
        }
        Request::SetVcpus { count } => set_vcpus(vm, count),
        Request::AddDisk { disk } => {
            let Some(path) = disk.path.filter(|p| p.exists()) else {
                return Response::Error {
                    message: "cannot open disk: no such file".into(),
                };
            };
            add_device(vm, disk.id, "block", path.display().to_string())
        }
        Request::AddNet { net } => add_device(vm, net.id, "net", net.tap),
        Request::RemoveDevice { id } => remove_device(vm, id),
        // As rvirt-vmm: only CD-ROM drives of the configuration change media, and the disc
        // must exist.
        Request::ChangeMedia { id, source, .. } => {
            let is_cd = config_file().is_some_and(|c| {
                c.disks.iter().any(|d| {
                    d.id.as_deref() == Some(id.as_str())
                        && d.device == rvirt_api::vmm_config::DiskDevice::Cdrom
                })
            });
            if !is_cd {
                Response::Error {
                    message: format!("no CD-ROM drive {id:?} in this VM"),
                }
            } else if source.as_ref().is_some_and(|p| !p.exists()) {
                Response::Error {
                    message: "cannot open the disc: no such file".into(),
                }
            } else {
                Response::Ok
            }
        }
    }
}

/// The affinity of every thread, on stderr (the domain log): the vCPUs by number, the others
/// ("emulator") by name.
fn report_affinity(vm: &Vm) {
    let vcpu_tids = vm.tids.lock().unwrap().clone();
    let mut parts = Vec::new();
    for (n, tid) in vcpu_tids.iter().enumerate() {
        parts.push(format!("vcpu{n}={}", affinity(*tid)));
    }
    let mut emulator: Vec<String> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for e in dir.flatten() {
            let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<i32>().ok()) else {
                continue;
            };
            if !vcpu_tids.contains(&tid) {
                emulator.push(affinity(tid));
            }
        }
    }
    emulator.sort();
    emulator.dedup();
    eprintln!(
        "rvirt-fake-vmm: resumed; affinity {} emulator={}",
        parts.join(" "),
        emulator.join("/")
    );
}

fn affinity(tid: i32) -> String {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of_val(&set), &mut set) } != 0 {
        return "?".into();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: c is below CPU_SETSIZE.
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// One vCPU thread; it ends when the vCPU is unplugged.
fn spawn_vcpu(vm: &Arc<Vm>, n: u32) {
    let vm = vm.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(format!("vcpu{n}"))
        .spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            {
                let mut tids = vm.tids.lock().unwrap();
                if tids.len() <= n as usize {
                    tids.resize(n as usize + 1, 0);
                }
                tids[n as usize] = tid;
            }
            let _ = tx.send(tid);
            loop {
                std::thread::sleep(Duration::from_millis(10));
                if vm.live.lock().unwrap().stopping.remove(&n) {
                    return;
                }
                if !vm.paused.load(Ordering::SeqCst) && n == 0 {
                    vm.ticks.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
    // The thread id is known before the request is answered (the real VMM does the same).
    let _ = rx.recv_timeout(Duration::from_secs(1));
}

/// The typed configuration when the VMM was started with `--config FILE` (rvirt-vmm's JSON
/// form); the live-resource handlers read boot devices and the balloon's start from it.
fn config_file() -> Option<rvirt_api::vmm_config::VmConfig> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.windows(2).find(|w| w[0] == "--config")?[1].clone();
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// The hotplug maximum: the config file's `cpus.max`, else generous (the command line form has
/// no maximum; rvirtd checks `<vcpu>` itself).
fn max_vcpus(vm: &Vm) -> u32 {
    config_file().map_or(FAKE_MAX_VCPUS.max(vm.vcpus), |c| c.cpus.max())
}

/// The guest never ejects what it is asked to (for unplug timeouts).
fn no_eject() -> bool {
    let in_cmdline = |s: &str| s.split_whitespace().any(|w| w == "fake.no_eject");
    std::env::var("RVIRT_FAKE_NO_EJECT").is_ok_and(|v| v == "1")
        || std::env::args().any(|a| in_cmdline(&a))
        || config_file().is_some_and(|c| match &c.boot {
            rvirt_api::vmm_config::BootConfig::Kernel { cmdline, .. } => in_cmdline(cmdline),
            rvirt_api::vmm_config::BootConfig::Firmware { .. } => false,
        })
}

fn set_vcpus(vm: &Arc<Vm>, count: u32) -> Response {
    let online = vm.tids.lock().unwrap().len() as u32;
    let max = max_vcpus(vm);
    if count == 0 || count > max {
        return Response::Error {
            message: format!("vCPU count {count} is out of range 1-{max}"),
        };
    }
    if count > online {
        for n in online..count {
            spawn_vcpu(vm, n);
            let tid = vm.tids.lock().unwrap()[n as usize];
            vm.broadcast(&Event::VcpuAdded { vcpu: n, tid });
        }
    } else if count < online && !no_eject() {
        let vm = vm.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            for n in (count..online).rev() {
                vm.live.lock().unwrap().stopping.insert(n);
                // Wait for the thread to end, as the guest's eject does.
                while vm.live.lock().unwrap().stopping.contains(&n) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                vm.tids.lock().unwrap().truncate(n as usize);
                vm.broadcast(&Event::VcpuRemoved { vcpu: n });
            }
        });
    }
    Response::Ok
}

fn balloon(vm: &Vm) -> (u64, u64) {
    *vm.live.lock().unwrap().balloon.get_or_insert_with(|| {
        // `memory.current` of a config file: the balloon starts inflated to it.
        let start = config_file()
            .and_then(|c| c.memory.current)
            .unwrap_or(vm.memory_bytes)
            .min(vm.memory_bytes);
        (start, start)
    })
}

/// QEMU's semantics: the target is clamped to the RAM size; the guest gets there on its own.
fn set_balloon(vm: &Arc<Vm>, target: u64) -> Response {
    if target == 0 {
        return Response::Error {
            message: "balloon target must be above zero".into(),
        };
    }
    let target = target.min(vm.memory_bytes);
    let (start, _) = balloon(vm);
    vm.live.lock().unwrap().balloon = Some((start, target));
    let vm = vm.clone();
    std::thread::spawn(move || {
        const STEPS: u64 = 4;
        for step in 1..=STEPS {
            std::thread::sleep(Duration::from_millis(50));
            let mut live = vm.live.lock().unwrap();
            let Some((_, cur_target)) = live.balloon else {
                return;
            };
            if cur_target != target {
                return; // a newer target took over
            }
            let actual = if step == STEPS {
                target
            } else if target >= start {
                start + (target - start) * step / STEPS
            } else {
                start - (start - target) * step / STEPS
            };
            // Guest pages are 4 KiB.
            let actual = actual / 4096 * 4096;
            live.balloon = Some((actual, target));
            drop(live);
            vm.broadcast(&Event::BalloonChanged {
                actual_bytes: actual,
            });
        }
    });
    Response::Ok
}

/// What a small idle Linux guest reports: most memory free, some page cache.
fn guest_stats(actual: u64, period: u32) -> BalloonStats {
    if period == 0 {
        return BalloonStats::default();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    BalloonStats {
        swap_in: Some(0),
        swap_out: Some(0),
        major_fault: Some(212),
        minor_fault: Some(48_219),
        unused: Some(actual / 4 * 3),
        available: Some(actual - actual / 32),
        usable: Some(actual / 5 * 4),
        disk_caches: Some(actual / 16),
        hugetlb_pgalloc: Some(0),
        hugetlb_pgfail: Some(0),
        last_update: now,
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Boot devices as the command line (or `--config` file) gave them: disks first, then NICs.
fn boot_devices() -> Vec<FakeDevice> {
    let mut out = Vec::new();
    let mut slot = FIRST_SLOT;
    if let Some(c) = config_file() {
        // SCSI drives sit behind one controller and are not PCI functions of their own.
        for (i, d) in c
            .disks
            .iter()
            .filter(|d| d.bus == rvirt_api::vmm_config::DiskBus::Virtio)
            .enumerate()
        {
            out.push(FakeDevice {
                id: d.id.clone().unwrap_or_else(|| format!("virtio-disk{i}")),
                kind: "block",
                backend: d
                    .path
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                slot,
            });
            slot += 1;
        }
        for (i, n) in c.nets.iter().enumerate() {
            out.push(FakeDevice {
                id: n.id.clone().unwrap_or_else(|| format!("net{i}")),
                kind: "net",
                backend: n.tap.clone(),
                slot,
            });
            slot += 1;
        }
        return out;
    }
    let args: Vec<String> = std::env::args().collect();
    for kind in ["--disk", "--net"] {
        for (index, w) in args.windows(2).filter(|w| w[0] == kind).enumerate() {
            let key = if kind == "--disk" { "path=" } else { "tap=" };
            let backend = w[1]
                .split(',')
                .find_map(|p| p.strip_prefix(key))
                .unwrap_or_default()
                .to_string();
            let (id, kind) = if kind == "--disk" {
                (format!("virtio-disk{index}"), "block")
            } else {
                (format!("net{index}"), "net")
            };
            out.push(FakeDevice {
                id,
                kind,
                backend,
                slot,
            });
            slot += 1;
        }
    }
    out
}

fn devices(vm: &Vm) -> Vec<FakeDevice> {
    vm.live
        .lock()
        .unwrap()
        .devices
        .get_or_insert_with(boot_devices)
        .clone()
}

fn add_device(vm: &Vm, id: Option<String>, kind: &'static str, backend: String) -> Response {
    let mut live = vm.live.lock().unwrap();
    let devs = live.devices.get_or_insert_with(boot_devices);
    let id = id.unwrap_or_else(|| {
        let prefix = if kind == "block" {
            "virtio-disk"
        } else {
            "net"
        };
        (0..)
            .map(|n| format!("{prefix}{n}"))
            .find(|c| !devs.iter().any(|d| d.id == *c))
            .expect("a free id")
    });
    if devs.iter().any(|d| d.id == id) {
        return Response::Error {
            message: format!("device id '{id}' is already in use; choose another id"),
        };
    }
    let Some(slot) = (FIRST_SLOT..32).find(|s| !devs.iter().any(|d| d.slot == *s)) else {
        return Response::Error {
            message: "no free PCI slot on bus 0 (slots 2-31 are taken); remove a device first"
                .into(),
        };
    };
    devs.push(FakeDevice {
        id: id.clone(),
        kind,
        backend,
        slot,
    });
    Response::DeviceAdded { id, slot }
}

fn remove_device(vm: &Arc<Vm>, id: String) -> Response {
    {
        let mut live = vm.live.lock().unwrap();
        let devs = live.devices.get_or_insert_with(boot_devices);
        if !devs.iter().any(|d| d.id == id) {
            return Response::Error {
                message: format!("no device with id '{id}'"),
            };
        }
        if !live.unplugging.insert(id.clone()) || no_eject() {
            return Response::Ok;
        }
    }
    let vm = vm.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        {
            let mut live = vm.live.lock().unwrap();
            live.unplugging.remove(&id);
            if let Some(devs) = live.devices.as_mut() {
                devs.retain(|d| d.id != id);
            }
        }
        vm.broadcast(&Event::DeviceRemoved { id });
    });
    Response::Ok
}

/// Fixed counters per device, named as rvirt-vmm's virtio devices name them.
fn counters(d: &FakeDevice) -> BTreeMap<String, u64> {
    let s = u64::from(d.slot);
    let named: &[(&str, u64)] = if d.kind == "block" {
        &[
            ("read_requests", 100 + s),
            ("write_requests", 20 + s),
            ("flush_requests", 3),
            ("discard_requests", 0),
            ("write_zeroes_requests", 0),
            ("bytes_read", (100 + s) * 4096),
            ("bytes_written", (20 + s) * 4096),
            ("errors", 0),
            ("bad_chains", 0),
        ]
    } else {
        &[
            ("rx_frames", 50 + s),
            ("rx_bytes", (50 + s) * 100),
            ("rx_dropped", 0),
            ("tx_frames", 40 + s),
            ("tx_bytes", (40 + s) * 100),
            ("tx_dropped", 1),
        ]
    };
    named.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}
