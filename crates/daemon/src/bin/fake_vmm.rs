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

use rvirt_api::vmm::{Event, ExitReason, Request, Response, RunState, VcpuThread};
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
}

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
                let rvirt_api::vmm_config::BootConfig::Kernel {
                    kernel,
                    initrd,
                    cmdline: c,
                } = &cfg.boot;
                exists_or_fail(kernel, "kernel");
                if let Some(i) = initrd {
                    exists_or_fail(i, "initrd");
                }
                for d in &cfg.disks {
                    exists_or_fail(&d.path, "disk");
                }
                cmdline = c.clone();
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
    });
    for n in 0..vcpus {
        let vm = vm.clone();
        std::thread::Builder::new()
            .name(format!("vcpu{n}"))
            .spawn(move || {
                // SAFETY: gettid has no preconditions.
                vm.tids.lock().unwrap()[n as usize] = unsafe { libc::gettid() };
                loop {
                    std::thread::sleep(Duration::from_millis(10));
                    if !vm.paused.load(Ordering::SeqCst) && n == 0 {
                        vm.ticks.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .unwrap();
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
            vcpus: vm.vcpus,
            memory_bytes: vm.memory_bytes,
            max_vcpus: vm.vcpus,
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
            rss_bytes: 0,
            cpu_time_ns: 0,
            devices: Vec::new(),
        },
        Request::Watch => unreachable!("handled by the caller"),
        other => Response::Error {
            message: format!("the stand-in VMM does not implement {other:?}"),
        },
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
