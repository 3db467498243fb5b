//! The VMM: builds a VM from its configuration, then runs the control loop on the process's
//! main thread (the one owner of the vCPUs and devices, answering [`VmmMessage`]s), then tears
//! it down in order: vCPUs, devices (workers joined, disks flushed), watchers told `exited`.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rvirt_api::vmm::{BalloonStats, Event, ExitReason, Request, Response, RunState, VcpuThread};

use crate::cli::{BootConfig, VmConfig};
use crate::console::Console;
use crate::device_manager::DeviceManager;
use crate::layout::Machine;
use crate::messages::{self, VmmMessage};
use crate::signals::QuitSignals;
use crate::vcpu_manager::{VcpuManager, VcpuSetup};
use crate::vstate::{vcpu, vm::Vm};
use crate::{boot, threads};

/// Most one balloon event a second, as QEMU's BALLOON_CHANGE throttling.
const BALLOON_EVENT_INTERVAL: Duration = Duration::from_secs(1);

/// The running VM as its control loop sees it.
struct Vmm {
    name: Option<String>,
    memory: u64,
    backing: crate::memory::Applied,
    state: RunState,
    watchers: Vec<UnixStream>,
    /// The balloon's latest size not yet told to watchers, and when they were last told: the
    /// guest moves it in steps of 1 MiB, watchers hear at most one event a second (and the
    /// final size).
    balloon_event: Option<u64>,
    balloon_told: Option<Instant>,
    vcpus: VcpuManager,
    devices: DeviceManager,
}

/// Creates the VM, runs it, and returns why it stopped.
pub fn run(cfg: VmConfig) -> Result<ExitReason> {
    crate::logger::init();
    // First, before any other thread exists, so every VMM thread inherits the emulator pin;
    // vCPUs without a pin of their own may use every CPU the process could use at start.
    let default_affinity = threads::affinity().context("sched_getaffinity")?;
    if let Some(cpus) = &cfg.emulator_affinity {
        threads::set_affinity(cpus)
            .with_context(|| format!("emulator_affinity {cpus:?}: cannot pin the VMM thread"))?;
    }
    let (boot_cpus, max_cpus, ram) = (cfg.cpus.boot, cfg.cpus.max(), cfg.memory.size);
    let machine = match &cfg.boot {
        BootConfig::Kernel { .. } => Machine::Direct,
        BootConfig::Firmware { .. } => Machine::Q35,
    };
    let vm = Vm::new(machine, max_cpus, ram, &cfg.memory.backing)?;
    // The firmware's code mapping lives as long as the VM (dropped after `vm` below).
    let (entry, firmware) = match &cfg.boot {
        BootConfig::Kernel { .. } => {
            boot::write_boot_structures(&vm.mem)?;
            // ACPI PCI hotplug is always on, as on QEMU's machines; vCPU hotplug when
            // max > boot.
            let rsdp = crate::acpi::write_tables(
                &vm.mem,
                &crate::acpi::AcpiConfig {
                    boot_vcpus: boot_cpus,
                    max_vcpus: max_cpus,
                    ram,
                    pci_hotplug: true,
                },
            )
            .context("writing ACPI tables")?;
            (boot::load(&cfg, &vm.mem, Some(rsdp))?, None)
        }
        BootConfig::Firmware { firmware, .. } => {
            let image = crate::firmware::map_code(&vm.fd, &vm.mem, firmware)?;
            log::info!(
                "firmware {} mapped at {:#x} ({} KiB)",
                image.path.display(),
                image.base,
                image.size >> 10
            );
            (boot::BootEntry::Firmware, Some(image))
        }
    };

    let (mailbox, inbox) = messages::mailbox();
    vcpu::install_kick_handler()?;
    let signals = QuitSignals::start(mailbox.clone())?;
    let console = Console::open(&cfg.serial, vm.irqfd(4, "COM1")?, &mailbox)?;
    let mut devices = DeviceManager::new(
        &vm,
        machine,
        ram,
        (boot_cpus, max_cpus),
        console.com1.clone(),
        &mailbox,
    )?;
    devices.add_disks(&cfg.disks)?;
    for n in &cfg.nets {
        devices.add_net(n)?;
    }
    if cfg.rng {
        devices.add_rng()?;
    }
    if let Some(b) = &cfg.balloon {
        devices.add_balloon(b, ram, cfg.memory.current.unwrap_or(ram))?;
    }
    devices.cold_plugged()?;
    // Kept to flush the variable store after the vCPUs stopped.
    let mut nvram = None;
    if let (
        Some(image),
        BootConfig::Firmware {
            nvram: Some(path), ..
        },
    ) = (&firmware, &cfg.boot)
    {
        let flash = crate::legacy::pflash::Pflash::open(path, false)
            .with_context(|| format!("--nvram {} (boot.nvram)", path.display()))?;
        // The variable store sits right below the code, as the firmware was built to expect
        // (OVMF_VARS_4M.fd at 0xFFC00000 under the 3.5 MiB OVMF_CODE_4M.fd).
        let base = image.base - flash.size();
        let size = flash.size();
        let flash = std::sync::Arc::new(std::sync::Mutex::new(flash));
        devices
            .mmio_bus()
            .insert(base, size, flash.clone())
            .context("the flash variable store")?;
        log::info!("variable store {} at {base:#x}", path.display());
        nvram = Some(flash);
    }
    if firmware.is_some() {
        let fw_cfg = crate::firmware::fw_cfg(
            &vm.mem,
            ram,
            (boot_cpus, max_cpus),
            &devices.boot_order(),
            match &cfg.boot {
                BootConfig::Firmware { boot_menu_ms, .. } => *boot_menu_ms,
                BootConfig::Kernel { .. } => None,
            },
        )?;
        devices
            .pio_bus()
            .insert(
                u64::from(crate::legacy::fw_cfg::PORT_BASE),
                crate::legacy::fw_cfg::PORT_LEN,
                std::sync::Arc::new(std::sync::Mutex::new(fw_cfg)),
            )
            .context("fw_cfg")?;
        devices
            .pio_bus()
            .insert(
                u64::from(crate::legacy::debugcon::PORT),
                1,
                std::sync::Arc::new(std::sync::Mutex::new(
                    crate::legacy::debugcon::DebugCon::default(),
                )),
            )
            .context("firmware debug console")?;
    }

    let mut affinity = vec![None; max_cpus as usize];
    for a in &cfg.vcpu_affinity {
        if let Some(slot) = affinity.get_mut(a.vcpu as usize) {
            *slot = Some(a.cpus.clone());
        }
    }
    let mut vcpus = VcpuManager::new(VcpuSetup {
        vm: vm.fd.clone(),
        kvm: kvm_ioctls::Kvm::new().context("opening /dev/kvm for vCPU set-up")?,
        max: max_cpus,
        entry,
        exits: std::sync::Arc::new(devices.exit_handler()),
        mailbox: mailbox.clone(),
        affinity,
        default_affinity,
    });
    // Started paused (QEMU's -S): the vCPU threads exist (a supervisor can pin them) but park
    // before their first guest instruction, and device workers wait at the gate.
    let state = if cfg.start_paused {
        vcpus.pause();
        devices.gate().pause(std::time::Duration::ZERO);
        RunState::Paused
    } else {
        RunState::Running
    };
    // On an error, dropping the manager stops the vCPUs started so far.
    for id in 0..boot_cpus {
        vcpus.start(id)?;
    }
    let mut vmm = Vmm {
        name: cfg.name.clone(),
        memory: ram,
        backing: vm.backing.clone(),
        state,
        watchers: Vec::new(),
        balloon_event: None,
        balloon_told: None,
        vcpus,
        devices,
    };

    // The control socket answers once the VM is fully set up (vCPU threads known).
    let control = match &cfg.api_socket {
        Some(path) => match crate::control::start(path, mailbox.clone()) {
            Ok(c) => Some(c),
            Err(e) => {
                vmm.vcpus.stop_all();
                return Err(e);
            }
        },
        None => None,
    };

    let reason = vmm.serve(&inbox);
    let reason = vmm.teardown(reason);
    // Control connections waiting for an answer see the VMM gone (their reply channels drop
    // with the queued messages), so the control socket can join them.
    drop(inbox);
    if let Some(c) = control {
        c.stop();
    }
    drop(console);
    drop(signals);
    if let Some(flash) = nvram {
        if let Err(e) = flash.lock().unwrap_or_else(|e| e.into_inner()).flush() {
            log::error!("the variable store was not flushed: {e}");
        }
    }
    drop(vm);
    drop(firmware);
    Ok(reason)
}

impl Vmm {
    /// Answers messages until the VM must stop; returns why.
    fn serve(&mut self, inbox: &Receiver<VmmMessage>) -> ExitReason {
        loop {
            let msg = match self.balloon_event {
                None => inbox.recv().map_err(|_| RecvTimeoutError::Disconnected),
                Some(_) => inbox.recv_timeout(BALLOON_EVENT_INTERVAL),
            };
            let msg = match msg {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => {
                    self.flush_balloon_event(true);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return ExitReason::Error,
            };
            match msg {
                VmmMessage::Exit(reason) => return reason,
                VmmMessage::Request { request, reply } => {
                    let _ = reply.send(self.answer(&request));
                }
                VmmMessage::Watch(s) => self.watchers.push(s),
                VmmMessage::ShuttingDown => self.set_state(RunState::ShuttingDown),
                VmmMessage::Activate(slot) => self.devices.activate(slot),
                VmmMessage::VcpuEjected(id) => self.vcpu_ejected(id),
                VmmMessage::SlotEjected(slot) => match self.devices.remove_slot(slot) {
                    Ok(id) => {
                        log::info!("the guest ejected {id} (slot {slot}); it is removed");
                        self.broadcast(&Event::DeviceRemoved { id });
                    }
                    Err(e) => log::warn!("guest ejected slot {slot}: {e:#}"),
                },
                VmmMessage::BalloonChanged(actual) => {
                    self.balloon_event = Some(actual);
                    self.flush_balloon_event(false);
                }
            }
        }
    }

    /// Tells watchers the balloon's size if a change is pending and the last event is a second
    /// old (or `now`).
    fn flush_balloon_event(&mut self, now: bool) {
        let due = now
            || self
                .balloon_told
                .is_none_or(|t| t.elapsed() >= BALLOON_EVENT_INTERVAL);
        if let (true, Some(actual_bytes)) = (due, self.balloon_event) {
            self.balloon_event = None;
            self.balloon_told = Some(Instant::now());
            self.broadcast(&Event::BalloonChanged { actual_bytes });
        }
    }

    /// Brings the online vCPU count to `count`: new vCPUs start and are announced at once;
    /// removals are asked of the guest and finish in [`Vmm::vcpu_ejected`].
    fn set_vcpus(&mut self, count: u32) -> Result<(), String> {
        let max = self.vcpus.max();
        if count == 0 {
            return Err("a VM needs at least one vCPU; vCPU 0 cannot be unplugged".into());
        }
        if count > max {
            return Err(format!(
                "requested vcpus is greater than max allowable vcpus for the live domain: {count} > {max}; raise the maximum (<vcpu>) while the domain is shut off"
            ));
        }
        let online = self.vcpus.online();
        if count == online {
            return Ok(());
        }
        let Some(hp) = self.devices.cpu_hotplug().cloned() else {
            return Err(format!(
                "this VM was started with its maximum of {max} vCPUs, so none can be added or removed; give a higher maximum (<vcpu current='N'>MAX</vcpu>) and restart it"
            ));
        };
        let mut notify = false;
        for id in online..count {
            let tid = self.vcpus.start(id).map_err(|e| format!("{e:#}"))?;
            hp.lock()
                .unwrap_or_else(|e| e.into_inner())
                .plug(id)
                .map_err(|e| e.to_string())?;
            self.broadcast(&Event::VcpuAdded { vcpu: id, tid });
            notify = true;
        }
        for id in (count..online).rev() {
            let mut hp = hp.lock().unwrap_or_else(|e| e.into_inner());
            if hp.unplugging(id) {
                continue;
            }
            hp.unplug(id).map_err(|e| e.to_string())?;
            notify = true;
        }
        if notify {
            self.devices.notify(crate::hotplug::ged::EVENT_CPU);
        }
        Ok(())
    }

    /// The guest offlined and ejected vCPU `id`: its thread ends (the fd stays for a re-plug).
    fn vcpu_ejected(&mut self, id: u32) {
        match self.vcpus.stop(id) {
            Ok(()) => {
                log::info!("the guest ejected vcpu{id}; its thread has stopped");
                self.broadcast(&Event::VcpuRemoved { vcpu: id });
            }
            Err(e) => log::warn!("guest ejected vcpu{id}: {e:#}"),
        }
    }

    fn hotplug_device(&mut self, req: &Request) -> Result<(String, u8), String> {
        let added = match req {
            Request::AddDisk { disk } => self.devices.add_disk(disk),
            Request::AddNet { net } => self.devices.add_net(net),
            _ => return Err(format!("{req:?} is not a device hotplug request")),
        };
        let (id, slot) = added.map_err(|e| format!("{e:#}"))?;
        self.devices
            .announce_slot(slot)
            .map_err(|e| format!("{e:#}"))?;
        log::info!("hotplugged {id} in slot {slot}");
        Ok((id, slot))
    }

    fn answer_balloon(&mut self, req: &Request) -> Response {
        let Some(b) = self.devices.balloon() else {
            // QEMU's words, which scripts look for.
            return Response::Error {
                message: "No balloon device has been activated".into(),
            };
        };
        match req {
            Request::Balloon { target_bytes } => {
                if *target_bytes == 0 {
                    return Response::Error {
                        message:
                            "balloon target 0: give the memory the guest should keep (more than 0)"
                                .into(),
                    };
                }
                // QEMU clamps a target above the guest's RAM to the RAM size.
                b.set_target_bytes((*target_bytes).min(b.ram_size()));
                Response::Ok
            }
            Request::QueryBalloon => Response::Balloon {
                actual_bytes: b.actual_bytes(),
                target_bytes: b.target_bytes(),
                max_bytes: b.ram_size(),
            },
            Request::BalloonStats => {
                let s = b.stats();
                Response::BalloonStats {
                    stats: BalloonStats {
                        swap_in: s.swap_in,
                        swap_out: s.swap_out,
                        major_fault: s.major_faults,
                        minor_fault: s.minor_faults,
                        unused: s.free_memory,
                        available: s.total_memory,
                        usable: s.available_memory,
                        disk_caches: s.disk_caches,
                        hugetlb_pgalloc: s.hugetlb_allocations,
                        hugetlb_pgfail: s.hugetlb_failures,
                        last_update: s.last_update,
                    },
                }
            }
            Request::SetBalloonStatsPeriod { seconds } => {
                b.set_stats_period(*seconds);
                Response::Ok
            }
            _ => Response::Error {
                message: format!("{req:?} is not a balloon request"),
            },
        }
    }

    fn set_state(&mut self, s: RunState) {
        if self.state != s {
            self.state = s;
            self.broadcast(&Event::StateChanged { state: s });
        }
    }

    /// Sends an event line to every watcher; a watcher that went away is forgotten.
    fn broadcast(&mut self, ev: &Event) {
        let Ok(mut line) = serde_json::to_string(ev) else {
            return;
        };
        line.push('\n');
        self.watchers
            .retain_mut(|s| s.write_all(line.as_bytes()).is_ok());
    }

    fn answer(&mut self, req: &Request) -> Response {
        match req {
            Request::Info => Response::Info {
                pid: std::process::id(),
                name: self.name.clone(),
                state: self.state,
                vcpus: self.vcpus.online(),
                memory_bytes: self.memory,
                max_vcpus: self.vcpus.max(),
                memory_backing: Some(self.backing.clone()),
            },
            Request::Pause => {
                let vcpus = self.vcpus.pause();
                let workers = self.devices.gate().pause(std::time::Duration::from_secs(2));
                self.set_state(RunState::Paused);
                if vcpus && workers {
                    Response::Ok
                } else {
                    Response::Error {
                        message: "not every vCPU and device worker stopped within 2 s; try again"
                            .into(),
                    }
                }
            }
            Request::Resume => {
                self.devices.gate().resume();
                self.vcpus.resume();
                self.set_state(RunState::Running);
                Response::Ok
            }
            Request::PowerButton => {
                self.devices.power_button();
                Response::Ok
            }
            Request::VcpuInfo => Response::VcpuInfo {
                vcpus: self
                    .vcpus
                    .threads()
                    .into_iter()
                    .map(|(vcpu, tid)| VcpuThread {
                        vcpu,
                        tid,
                        state: self.state,
                    })
                    .collect(),
            },
            Request::Stats => Response::Stats {
                rss_bytes: rss_bytes(),
                cpu_time_ns: cpu_time_ns(),
                devices: self.devices.stats(),
            },
            Request::SetVcpus { count } => match self.set_vcpus(*count) {
                Ok(()) => Response::Ok,
                Err(message) => Response::Error { message },
            },
            Request::AddDisk { .. } | Request::AddNet { .. } => match self.hotplug_device(req) {
                Ok((id, slot)) => Response::DeviceAdded { id, slot },
                Err(message) => Response::Error { message },
            },
            Request::ChangeMedia {
                id,
                source,
                format,
                force,
            } => match self
                .devices
                .change_media(id, source.as_deref(), *format, *force)
            {
                Ok(()) => Response::Ok,
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::RemoveDevice { id } => match self.devices.request_removal(id) {
                Ok(_) => Response::Ok,
                Err(e) => Response::Error {
                    message: format!("{e:#}"),
                },
            },
            Request::Balloon { .. }
            | Request::QueryBalloon
            | Request::BalloonStats
            | Request::SetBalloonStatsPeriod { .. } => self.answer_balloon(req),
            // The control socket answers these itself (it replies before the VM stops).
            Request::Quit | Request::Watch => Response::Ok,
        }
    }

    /// Orderly stop: vCPUs first (nothing touches devices any more), then the devices (their
    /// workers finish in-flight requests and are joined), then the disks are flushed. Only then
    /// do watchers hear `exited`, so a supervisor that restarts the VM never finds the old
    /// process still writing.
    fn teardown(self, mut reason: ExitReason) -> ExitReason {
        let Vmm {
            mut vcpus,
            devices,
            mut watchers,
            ..
        } = self;
        vcpus.stop_all();
        // The vCPUs' exit handler holds the buses: drop it before the devices.
        drop(vcpus);
        for (path, e) in devices.shutdown() {
            log::error!(
                "flushing disk {} at exit failed: {e}; the guest's last writes may be lost",
                path.display()
            );
            reason = ExitReason::Error;
        }
        let _ = std::io::stdout().flush();
        let mut line = serde_json::to_string(&Event::Exited { reason }).unwrap_or_default();
        line.push('\n');
        for mut w in watchers.drain(..) {
            let _ = w.write_all(line.as_bytes());
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        reason
    }
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = s
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

fn cpu_time_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer for clock_gettime.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
