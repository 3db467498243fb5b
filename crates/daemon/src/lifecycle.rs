//! Starting, stopping and supervising rvirt-vmm processes, with libvirt's states and reasons.

use crate::error::{ApiError, ApiResult};
use crate::manager::{Manager, Run, Slot};
use crate::vmm_client::{self, Watch};
use crate::xml::domain::{DomainDef, LifecycleAction};
use crate::xml::Domain;
use rvirt_api::rest::{DomainState, ErrorCode, StateReason};
use rvirt_api::vmm::{Event, ExitReason, MemoryBackingInfo, Request, Response, RunState};
use rvirt_api::vmm_config::{
    BalloonConfig, BootConfig, CacheMode, CpuConfig, DiskBus, DiskConfig, DiskDevice,
    MemoryBacking, MemoryConfig, NetConfig, SerialConfig, VcpuAffinity, VmConfig,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// How long a starting VMM has to answer on its control socket (libvirt waits as long for
/// QEMU's monitor): several VMMs starting at once next to booting guests on a loaded host
/// need more than 15 s.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long destroy waits after asking the VMM to quit before it sends SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// Name of the VMM configuration file in a domain's run directory.
pub const VMM_CONFIG_FILE: &str = "vmm-config.json";

fn mib_bytes(kib: u64) -> u64 {
    kib.div_ceil(1024) << 20
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn cpus_of(set: &crate::xml::CpuSet) -> Vec<usize> {
    set.0.iter().copied().collect()
}

/// The configuration rvirt-vmm runs a definition with (written as JSON, `--config FILE`). The
/// VMM always starts paused: [`Manager::start`] pins its threads, then resumes it.
pub fn vmm_config(
    def: &DomainDef,
    api: &Path,
    serial: &Path,
    taps: &[String],
) -> ApiResult<VmConfig> {
    let boot = boot_config(def)?;
    let balloon = def.has_balloon().then(|| BalloonConfig {
        deflate_on_oom: def.balloon_autodeflate,
        free_page_reporting: def.balloon_free_page_reporting,
        stats_period: def.balloon_stats_period.unwrap_or(0),
    });
    // With a balloon the guest's memory map has <memory> and the balloon holds the rest of
    // <currentMemory>; without one the guest simply gets <currentMemory> (as before).
    let (size, current) = if balloon.is_some() {
        let size = mib_bytes(def.memory_kib);
        let cur = mib_bytes(def.current_memory_kib);
        (size, (cur < size).then_some(cur))
    } else {
        (mib_bytes(def.current_memory_kib), None)
    };
    let disks = def
        .disks
        .iter()
        .map(|d| {
            let cache = match d.cache.as_deref() {
                None => CacheMode::default(),
                Some(c) => CacheMode::parse(c).ok_or_else(|| {
                    ApiError::new(
                        ErrorCode::ConfigUnsupported,
                        format!("unknown disk cache mode '{c}' of disk {}", d.target),
                    )
                })?,
            };
            Ok(DiskConfig {
                path: d.source.as_ref().map(PathBuf::from),
                format: Some(d.format.vmm()),
                readonly: d.readonly,
                cache,
                serial: d.serial.clone(),
                id: Some(d.alias.clone()),
                bus: if d.bus == "scsi" {
                    DiskBus::Scsi
                } else {
                    DiskBus::Virtio
                },
                device: if d.device == "cdrom" {
                    DiskDevice::Cdrom
                } else {
                    DiskDevice::Disk
                },
                unit: d.unit,
                boot_order: None,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    let mut disks = disks;
    if matches!(boot, BootConfig::Firmware { .. }) {
        for (i, order) in boot_orders(def) {
            disks[i].boot_order = Some(order);
        }
    }
    let nets = def
        .interfaces
        .iter()
        .zip(taps)
        .map(|(iface, tap)| NetConfig {
            tap: tap.clone(),
            mac: iface.mac.as_deref().and_then(parse_mac),
            id: Some(iface.alias.clone()),
        })
        .collect();
    let vcpu_affinity = (0..def.vcpus)
        .filter_map(|v| {
            let pin = def.vcpupin.iter().find(|(p, _)| *p == v).map(|(_, c)| c);
            pin.or(def.vcpu_cpuset.as_ref()).map(|c| VcpuAffinity {
                vcpu: v,
                cpus: cpus_of(c),
            })
        })
        .collect();
    Ok(VmConfig {
        name: Some(def.name.clone()),
        boot,
        memory: MemoryConfig {
            size,
            current,
            backing: MemoryBacking {
                hugepages: def.hugepages,
                nosharepages: def.nosharepages,
                // Shared anonymous RAM is a memfd (what QEMU's memory-backend-memfd gives).
                memfd: def.memfd || (def.shared_memory && !def.hugepages),
                shared: def.shared_memory,
            },
        },
        cpus: CpuConfig {
            boot: def.vcpus_current,
            max: (def.vcpus > def.vcpus_current).then_some(def.vcpus),
        },
        disks,
        nets,
        serial: SerialConfig::Socket(serial.to_path_buf()),
        balloon,
        rng: true,
        api_socket: Some(api.to_path_buf()),
        start_paused: true,
        emulator_affinity: def
            .emulatorpin
            .as_ref()
            .or(def.vcpu_cpuset.as_ref())
            .map(cpus_of),
        vcpu_affinity,
    })
}

/// A `<kernel>` boots directly; otherwise the firmware `<os>` names (SeaBIOS when it names
/// none, as libvirt boots a BIOS by default).
fn boot_config(def: &DomainDef) -> ApiResult<BootConfig> {
    if let Some(kernel) = &def.kernel {
        return Ok(BootConfig::Kernel {
            kernel: PathBuf::from(kernel),
            initrd: def.initrd.as_ref().map(PathBuf::from),
            cmdline: def
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 reboot=k panic=1".into()),
        });
    }
    let fw = def.firmware.clone().unwrap_or_else(bios);
    Ok(BootConfig::Firmware {
        firmware: PathBuf::from(crate::firmware::loader_of(&fw)),
        nvram: (fw.kind == "efi")
            .then(|| fw.nvram.clone().map(PathBuf::from))
            .flatten(),
        // Parsed to at most 65535 ms.
        boot_menu_ms: def
            .boot_menu_ms
            .map(|ms| ms.min(u32::from(u16::MAX)) as u16),
    })
}

fn bios() -> crate::xml::domain::Firmware {
    crate::xml::domain::Firmware {
        kind: "bios".into(),
        loader: None,
        nvram: None,
        nvram_template: None,
    }
}

/// The firmware boot priority of each disk (index into `def.disks`): per-device
/// `<boot order>`, or `<os><boot dev=...>` in turn, each naming the first drive of its kind
/// (cdrom: the first CD-ROM; hd: the first disk), as libvirt maps them to QEMU's bootindex.
pub fn boot_orders(def: &DomainDef) -> Vec<(usize, u32)> {
    let per_device: Vec<(usize, u32)> = def
        .disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.boot_order.map(|o| (i, o)))
        .collect();
    if !per_device.is_empty() {
        return per_device;
    }
    let mut out = Vec::new();
    for (n, dev) in def.boot.iter().enumerate() {
        let want = match dev.as_str() {
            "cdrom" => "cdrom",
            "hd" => "disk",
            _ => continue,
        };
        if let Some(i) = def.disks.iter().position(|d| d.device == want) {
            if !out.iter().any(|(j, _)| *j == i) {
                out.push((i, n as u32 + 1));
            }
        }
    }
    out
}

/// Writes `cfg` as `dir/vmm-config.json` (atomically, mode 0600) and returns its path.
pub fn write_vmm_config(dir: &Path, cfg: &VmConfig) -> ApiResult<PathBuf> {
    let path = dir.join(VMM_CONFIG_FILE);
    let json = serde_json::to_vec_pretty(cfg)
        .map_err(|e| ApiError::internal(format!("cannot encode the VMM configuration: {e}")))?;
    crate::store::write_atomic(&path, &json)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", path.display())))?;
    Ok(path)
}

fn check_files(def: &DomainDef) -> ApiResult<()> {
    if def.kernel.is_none() {
        let fw = def.firmware.clone().unwrap_or_else(bios);
        crate::firmware::check_image(&crate::firmware::loader_of(&fw), "firmware")?;
        crate::firmware::prepare_nvram(&fw, &def.name)?;
    }
    let mut paths: Vec<&String> = def.kernel.iter().chain(def.initrd.iter()).collect();
    paths.extend(def.disks.iter().filter_map(|d| d.source.as_ref()));
    for p in paths {
        if let Err(e) = std::fs::metadata(p) {
            return Err(ApiError::new(
                ErrorCode::OperationFailed,
                format!("Cannot access storage file '{p}': {}", io_reason(&e)),
            ));
        }
    }
    Ok(())
}

fn io_reason(e: &std::io::Error) -> String {
    let s = e.to_string();
    s.split(" (os error").next().unwrap_or(&s).to_string()
}

pub(crate) fn run_record_path(dir: &Path) -> PathBuf {
    dir.join("vmm.json")
}

impl Manager {
    pub(crate) fn run_dir_of(&self, name: &str) -> PathBuf {
        self.cfg.run_dir.join(name)
    }

    pub async fn start(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        self.start_paused(key, false).await
    }

    /// virsh start [--paused]: with `paused` the domain stays paused once its VMM is up.
    pub async fn start_paused(self: &Arc<Self>, key: &str, paused: bool) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        self.start_locked_paused(&name, &slot, paused).await
    }

    /// Starts the VMM; the caller holds the slot's op lock. A pending restart (`restart_id`)
    /// keeps its id; if the start fails, the domain is shut off (failed).
    pub async fn start_locked(self: &Arc<Self>, name: &str, slot: &Arc<Slot>) -> ApiResult<()> {
        self.start_locked_paused(name, slot, false).await
    }

    /// [`Manager::start_locked`], leaving the domain paused when `paused`.
    pub async fn start_locked_paused(
        self: &Arc<Self>,
        name: &str,
        slot: &Arc<Slot>,
        paused: bool,
    ) -> ApiResult<()> {
        let r = self.start_inner(name, slot, paused).await;
        if r.is_err() {
            let mut st = slot.lock();
            if st.restart_id.take().is_some() && st.run.is_none() {
                st.state = DomainState::ShutOff;
                st.reason = StateReason::Failed;
            }
        }
        r
    }

    async fn start_inner(
        self: &Arc<Self>,
        name: &str,
        slot: &Arc<Slot>,
        paused: bool,
    ) -> ApiResult<()> {
        let (dom, generation, keep_id) = {
            let st = slot.lock();
            if st.gone {
                return Err(ApiError::no_domain(name));
            }
            if st.state.is_active() && st.restart_id.is_none() {
                return Err(ApiError::invalid_op("Domain is already active"));
            }
            (st.config.clone(), *slot.stopped.borrow() + 1, st.restart_id)
        };
        let def = &dom.def;
        check_files(def)?;
        let dir = self.run_dir_of(name);
        let _ = std::fs::remove_dir_all(&dir);
        {
            use std::os::unix::fs::DirBuilderExt;
            // The VMM's control and console sockets live here: only the daemon's user gets in.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
        }
        let api = dir.join("api.sock");
        let serial = dir.join("serial.sock");
        let taps = match crate::tap::create_taps(&self.net, name, def) {
            Ok(t) => t,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        let cleanup = |why: &str| {
            crate::tap::delete_taps(&self.net, name, &taps);
            let _ = std::fs::remove_dir_all(&dir);
            let mut st = slot.lock();
            st.state = DomainState::ShutOff;
            st.reason = StateReason::Failed;
            self.log(name, &format!("start failed: {why}"));
        };
        let config =
            vmm_config(def, &api, &serial, &taps).and_then(|cfg| write_vmm_config(&dir, &cfg));
        let args = match config {
            Ok(path) => vec!["--config".to_string(), path.display().to_string()],
            Err(e) => {
                cleanup(&e.message);
                return Err(e);
            }
        };
        let mut child = match self.spawn_vmm(name, &args) {
            Ok(c) => c,
            Err(e) => {
                cleanup(&e.message);
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let mut run = Run {
            name: name.to_string(),
            uuid: def.uuid.clone().unwrap_or_default(),
            id: keep_id.unwrap_or_else(|| self.take_id()),
            pid,
            start_time: crate::host::proc_stat(pid).map_or(0, |s| s.start_time),
            api_socket: api.clone(),
            serial_socket: serial,
            taps: taps.clone(),
            generation,
            memory_backing: None,
        };
        // Recorded before waiting for the VMM, so that a daemon that dies right now still finds
        // (and re-attaches to, or cleans up) this VMM on its next start.
        let _ = crate::store::write_atomic(&dir.join("live.xml"), dom.to_xml().as_bytes());
        let _ = crate::store::write_atomic(
            &run_record_path(&dir),
            serde_json::to_string(&run).unwrap_or_default().as_bytes(),
        );
        let vmm_state = match wait_ready(&mut child, &api).await {
            Ok((state, backing)) => {
                run.memory_backing = backing;
                Ok(state)
            }
            Err(e) => Err(e),
        };
        if let Err(e) = vmm_state {
            let _ = child.start_kill();
            let _ = child.wait().await;
            let tail = self.log_tail(name, 5);
            let msg = format!(
                "{e}; last lines of {}:\n{tail}",
                self.store.log_path(name).display()
            );
            cleanup(&e);
            return Err(ApiError::failed(format!(
                "rvirt-vmm for domain '{name}' did not start: {msg}"
            )));
        }
        // Watch from now on, so that no state change (a power button pressed right after the
        // start returns) is missed before supervision begins.
        let watch = Watch::open(&api).await.ok();
        // The VMM started paused (QEMU's -S): pin its threads while no vCPU has run, then let
        // it go (QEMU's `cont`), unless the user asked for a paused start.
        let vmm_paused = vmm_state == Ok(RunState::Paused);
        if !vmm_paused {
            self.log(
                name,
                "rvirt-vmm did not start paused (start_paused not honoured): its vCPUs run before pinning",
            );
        }
        self.apply_cputune(&run, def).await;
        // Bring the VMM to the state asked for: resume the paused one, or pause one that did not
        // start paused when --paused was given.
        let want = match (paused, vmm_paused) {
            (false, true) => Some(Request::Resume),
            (true, false) => Some(Request::Pause),
            _ => None,
        };
        if let Some(req) = want {
            if let Err(e) = vmm_client::request(&run.api_socket, &req).await {
                let _ = child.start_kill();
                let _ = child.wait().await;
                let msg = format!("cannot {req:?} the VMM after start-up: {e}").to_lowercase();
                cleanup(&msg);
                return Err(ApiError::failed(format!(
                    "rvirt-vmm for domain '{name}' did not start: {msg}"
                )));
            }
        }
        {
            let mut st = slot.lock();
            if paused {
                st.state = DomainState::Paused;
                st.reason = StateReason::User;
            } else {
                st.state = DomainState::Running;
                st.reason = StateReason::Booted;
            }
            st.run = Some(run.clone());
            st.live = Some(dom.clone());
            st.stop_intent = None;
            st.restart_id = None;
        }
        self.log(
            name,
            &format!(
                "started rvirt-vmm pid {pid} (id {}{}): {}",
                run.id,
                if paused { ", paused" } else { "" },
                args.join(" ")
            ),
        );
        tokio::spawn(
            self.clone()
                .supervise(slot.clone(), run, Some(child), watch),
        );
        Ok(())
    }

    fn spawn_vmm(&self, name: &str, args: &[String]) -> ApiResult<tokio::process::Child> {
        let log_path = self.store.log_path(name);
        let open_log = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| ApiError::internal(format!("cannot open {}: {e}", log_path.display())))
        };
        let mut cmd = tokio::process::Command::new(&self.cfg.vmm_binary);
        cmd.args(args)
            .stdin(std::process::Stdio::null())
            .stdout(open_log()?)
            .stderr(open_log()?)
            // Own process group: a signal to the daemon's group (Ctrl+C, systemd stop of the
            // daemon alone) does not take the VMs down, and a restarted daemon re-attaches.
            .process_group(0)
            .kill_on_drop(false);
        cmd.spawn().map_err(|e| {
            ApiError::failed(format!(
                "cannot run the VMM binary {}: {}; set --vmm-binary or RVIRT_VMM",
                self.cfg.vmm_binary.display(),
                io_reason(&e)
            ))
        })
    }

    fn log_tail(&self, name: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.store.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Follows one VMM run until it ends, then reconciles the domain's state. `watch` is an
    /// event stream opened earlier (so no event since then is missed); without one it opens
    /// its own.
    pub async fn supervise(
        self: Arc<Self>,
        slot: Arc<Slot>,
        run: Run,
        child: Option<tokio::process::Child>,
        watch: Option<Watch>,
    ) {
        let mut told: Option<ExitReason> = None;
        let watch = match watch {
            Some(w) => Ok(w),
            None => Watch::open(&run.api_socket).await,
        };
        if let Ok(mut watch) = watch {
            // Boot devices get their alias and PCI address in the live XML.
            tokio::spawn(self.clone().annotate_devices(slot.clone(), run.clone()));
            while let Some(ev) = watch.next().await {
                match ev {
                    Event::Exited { reason } => told = Some(reason),
                    Event::StateChanged { state } => self.vmm_state_changed(&slot, &run, state),
                    // Hotplug and balloon events: applied to the live definition, then passed
                    // on to whoever waits for them.
                    other => self.vmm_event(&slot, &run, other).await,
                }
            }
        }
        let code = match child {
            Some(mut c) => c.wait().await.ok().and_then(|s| s.code()),
            None => {
                while crate::host::process_matches(run.pid, run.start_time) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                None
            }
        };
        let reason = match (code, told) {
            (Some(c), _) => ExitReason::from_exit_code(c),
            (None, t) => t,
        };
        self.vmm_exited(&slot, &run, reason);
    }

    fn vmm_state_changed(&self, slot: &Slot, run: &Run, state: RunState) {
        let mut st = slot.lock();
        if st.run.as_ref().map(|r| r.generation) != Some(run.generation) {
            return;
        }
        match state {
            RunState::Paused if st.state != DomainState::Paused => {
                st.state = DomainState::Paused;
                st.reason = StateReason::User;
            }
            RunState::Running if st.state == DomainState::Paused => {
                st.state = DomainState::Running;
                st.reason = StateReason::Unpaused;
            }
            // The guest acknowledged the power button (libvirt's "in shutdown").
            RunState::ShuttingDown => {
                st.state = DomainState::InShutdown;
                st.reason = StateReason::User;
            }
            _ => {}
        }
    }

    /// A VMM is gone: `reason` is what it said (or its exit status meant); `None` means it died
    /// without saying (killed, or crashed itself).
    fn vmm_exited(self: &Arc<Self>, slot: &Arc<Slot>, run: &Run, reason: Option<ExitReason>) {
        let (restart, final_reason, transient_gone) = {
            let mut st = slot.lock();
            if st.run.as_ref().map(|r| r.generation) != Some(run.generation) {
                return;
            }
            crate::tap::delete_taps(&self.net, &run.name, &run.taps);
            let _ = std::fs::remove_dir_all(self.run_dir_of(&run.name));
            st.run = None;
            st.live = None;
            let def = st.config.def.clone();
            let reboot_requested = std::mem::take(&mut st.reboot_requested);
            let (action, off_reason) = match (st.stop_intent.take(), reason) {
                (Some(intent), _) => (LifecycleAction::Destroy, intent),
                // `reboot` pressed the power button: this poweroff is the guest's half of it.
                (None, Some(ExitReason::Poweroff | ExitReason::Quit)) if reboot_requested => {
                    (LifecycleAction::Restart, StateReason::Shutdown)
                }
                (None, Some(ExitReason::Poweroff | ExitReason::Quit)) => {
                    (def.on_poweroff, StateReason::Shutdown)
                }
                (None, Some(ExitReason::Reboot)) => (def.on_reboot, StateReason::Shutdown),
                (None, Some(ExitReason::Crash) | None) => (def.on_crash, StateReason::Crashed),
                (None, Some(ExitReason::Error)) => (LifecycleAction::Destroy, StateReason::Failed),
            };
            let restart = action == LifecycleAction::Restart && !st.gone;
            if restart {
                // Like libvirt across a reset: still running, same id, until the new VMM runs.
                st.state = DomainState::Running;
                st.reason = StateReason::Booted;
                st.restart_id = Some(run.id);
            } else {
                st.state = DomainState::ShutOff;
                st.reason = off_reason;
            }
            (restart, off_reason, !st.persistent && !restart)
        };
        let why = match reason {
            Some(r) => format!("{r:?}").to_lowercase(),
            None => "died without an exit notice (killed or crashed)".into(),
        };
        let line = if restart {
            format!(
                "rvirt-vmm pid {} exited ({why}); restarting the domain (id {})",
                run.pid, run.id
            )
        } else {
            format!(
                "rvirt-vmm pid {} exited ({why}); domain is shut off ({})",
                run.pid,
                final_reason.as_str()
            )
        };
        self.log(&run.name, &line);
        if final_reason == StateReason::Crashed || final_reason == StateReason::Failed {
            tracing::warn!("domain {}: {line}", run.name);
        } else {
            tracing::info!("domain {}: {line}", run.name);
        }
        if transient_gone {
            self.remove_slot(&run.name, slot);
        }
        slot.stopped.send_modify(|n| *n += 1);
        if restart {
            let (mgr, slot, name) = (self.clone(), slot.clone(), run.name.clone());
            tokio::spawn(async move {
                let _op = slot.op.lock().await;
                // destroy may have cancelled the restart while this task waited for the lock.
                if slot.lock().restart_id.is_some() {
                    if let Err(e) = mgr.start_locked(&name, &slot).await {
                        mgr.log(&name, &format!("restart failed: {e}"));
                        tracing::error!("domain {name}: restart failed: {e}");
                    }
                }
            });
        }
    }

    fn active_run(slot: &Slot) -> ApiResult<Run> {
        let st = slot.lock();
        match &st.run {
            Some(r) if st.state.is_active() => Ok(r.clone()),
            _ => Err(ApiError::not_running()),
        }
    }

    pub async fn destroy(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        let (_, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        self.stop_locked(&slot, StateReason::Destroyed).await
    }

    /// Stops the VMM now: quit request, then SIGKILL. Waits until supervision saw it end. A
    /// pending restart (the VMM already ended) is cancelled instead.
    async fn stop_locked(&self, slot: &Arc<Slot>, intent: StateReason) -> ApiResult<()> {
        let run = match Self::active_run(slot) {
            Ok(r) => r,
            Err(e) => {
                let mut st = slot.lock();
                if st.restart_id.take().is_none() || st.run.is_some() {
                    return Err(e);
                }
                st.state = DomainState::ShutOff;
                st.reason = intent;
                let (name, transient) = (st.config.def.name.clone(), !st.persistent);
                drop(st);
                self.log(&name, "pending restart cancelled; domain is shut off");
                if transient {
                    self.remove_slot(&name, slot);
                }
                return Ok(());
            }
        };
        let mut stopped = slot.stopped.subscribe();
        stopped.borrow_and_update();
        slot.lock().stop_intent = Some(intent);
        let _ = vmm_client::request(&run.api_socket, &Request::Quit).await;
        if tokio::time::timeout(QUIT_GRACE, stopped.changed())
            .await
            .is_ok()
        {
            return Ok(());
        }
        if crate::host::process_matches(run.pid, run.start_time) {
            // SAFETY: kill(2) with a pid we verified is our VMM (pid + start time).
            unsafe { libc::kill(run.pid as i32, libc::SIGKILL) };
        }
        match tokio::time::timeout(Duration::from_secs(10), stopped.changed()).await {
            Ok(_) => Ok(()),
            Err(_) => Err(ApiError::failed(format!(
                "rvirt-vmm pid {} did not exit after SIGKILL",
                run.pid
            ))),
        }
    }

    pub async fn shutdown(self: &Arc<Self>, key: &str, timeout: Option<Duration>) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let mut stopped = slot.stopped.subscribe();
        {
            let _op = slot.op.lock().await;
            let run = Self::active_run(&slot)?;
            if slot.lock().state == DomainState::Paused {
                return Err(ApiError::invalid_op(
                    "Requested operation is not valid: domain is paused; resume it before shutdown",
                ));
            }
            stopped.borrow_and_update();
            // A shutdown overrides an earlier reboot request that the guest has not acted on.
            slot.lock().reboot_requested = false;
            vmm_client::request(&run.api_socket, &Request::PowerButton)
                .await
                .map_err(|e| {
                    ApiError::failed(format!("cannot press the power button of '{name}': {e}"))
                })?;
        }
        let Some(t) = timeout else { return Ok(()) };
        if tokio::time::timeout(t, stopped.changed()).await.is_ok() {
            return Ok(());
        }
        Err(ApiError::new(
            ErrorCode::OperationTimeout,
            format!(
                "domain '{name}' did not shut down within {} seconds; it is still running (destroy forces it off)",
                t.as_secs()
            ),
        ))
    }

    /// virsh reboot: presses the ACPI power button and, when the guest has powered off, starts
    /// the domain again (same id), as libvirt's QEMU driver does. Returns once the button is
    /// pressed; a guest that ignores the button keeps running.
    pub async fn reboot(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let run = Self::active_run(&slot)?;
        if slot.lock().state == DomainState::Paused {
            return Err(ApiError::invalid_op(
                "Requested operation is not valid: domain is paused; resume it before reboot",
            ));
        }
        slot.lock().reboot_requested = true;
        if let Err(e) = vmm_client::request(&run.api_socket, &Request::PowerButton).await {
            slot.lock().reboot_requested = false;
            return Err(ApiError::failed(format!(
                "cannot press the power button of '{name}' to reboot it: {e}"
            )));
        }
        self.log(
            &name,
            "reboot: power button pressed; the domain restarts when the guest powers off",
        );
        Ok(())
    }

    /// virsh reset: the VMM is stopped at once and started again from the definition, keeping
    /// the domain's id (a hard reset; the guest is not asked).
    pub async fn reset(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let (persistent_config, id) = {
            let st = slot.lock();
            match &st.run {
                Some(r) if st.state.is_active() => (st.persistent, r.id),
                _ => return Err(ApiError::not_running()),
            }
        };
        // A transient domain would vanish when stopped: keep it registered for the restart.
        if !persistent_config {
            slot.lock().persistent = true;
        }
        let stop = self.stop_locked(&slot, StateReason::Destroyed).await;
        if !persistent_config {
            slot.lock().persistent = false;
        }
        stop?;
        {
            let mut st = slot.lock();
            st.state = DomainState::Running;
            st.reason = StateReason::Booted;
            st.restart_id = Some(id);
        }
        self.log(&name, "reset: VMM stopped, starting it again");
        self.start_locked(&name, &slot).await
    }

    pub async fn suspend(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        self.pause_resume(key, true).await
    }

    pub async fn resume(self: &Arc<Self>, key: &str) -> ApiResult<()> {
        self.pause_resume(key, false).await
    }

    async fn pause_resume(&self, key: &str, pause: bool) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let run = Self::active_run(&slot)?;
        let state = slot.lock().state;
        match (pause, state) {
            (true, DomainState::Paused) => return Ok(()),
            (false, DomainState::Running | DomainState::InShutdown) => {
                return Err(ApiError::invalid_op(
                    "Requested operation is not valid: domain is not paused",
                ))
            }
            _ => {}
        }
        let req = if pause {
            Request::Pause
        } else {
            Request::Resume
        };
        vmm_client::request(&run.api_socket, &req)
            .await
            .map_err(|e| {
                ApiError::failed(format!(
                    "cannot {} domain '{name}': {e}",
                    if pause { "suspend" } else { "resume" }
                ))
            })?;
        let mut st = slot.lock();
        if st.run.as_ref().map(|r| r.generation) == Some(run.generation) {
            if pause {
                st.state = DomainState::Paused;
                st.reason = StateReason::User;
            } else {
                st.state = DomainState::Running;
                st.reason = StateReason::Unpaused;
            }
        }
        Ok(())
    }

    /// After a daemon restart: re-attaches to every VMM still running per the run dir, and
    /// cleans up after those that are gone.
    pub async fn reattach(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.cfg.run_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let dir = entry.path();
            let Ok(text) = std::fs::read_to_string(run_record_path(&dir)) else {
                continue;
            };
            let Ok(run) = serde_json::from_str::<Run>(&text) else {
                tracing::warn!("ignoring unreadable run record in {}", dir.display());
                continue;
            };
            self.bump_id_above(run.id);
            if let Err(e) = self.reattach_one(&dir, run.clone()).await {
                tracing::warn!("domain {}: {e}; marking it shut off", run.name);
                self.log(
                    &run.name,
                    &format!("not re-attached after daemon restart: {e}"),
                );
                crate::tap::delete_taps(&self.net, &run.name, &run.taps);
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }

    async fn reattach_one(self: &Arc<Self>, dir: &Path, mut run: Run) -> Result<(), String> {
        if !crate::host::process_matches(run.pid, run.start_time) {
            return Err(format!("its VMM (pid {}) is gone", run.pid));
        }
        // A live VMM that does not answer is still ours: keep it (destroy still works, by
        // SIGKILL) rather than forget a running process.
        let state = match vmm_client::request(&run.api_socket, &Request::Info).await {
            Ok(Response::Info {
                state,
                memory_backing,
                ..
            }) => {
                run.memory_backing = memory_backing;
                state
            }
            other => {
                let why = match other {
                    Ok(resp) => format!("unexpected answer {resp:?}"),
                    Err(e) => e.to_string(),
                };
                tracing::warn!(
                    "domain {}: VMM pid {} is alive but its control socket failed ({why}); re-attaching anyway",
                    run.name,
                    run.pid
                );
                RunState::Running
            }
        };
        let live = std::fs::read_to_string(dir.join("live.xml"))
            .ok()
            .and_then(|x| Domain::parse(&x).ok())
            .ok_or("its live definition is missing")?;
        let slot = match self.find(&run.name) {
            Ok((_, s)) => s,
            Err(_) => {
                let s = Slot::new(live.clone(), false, false);
                self.insert_slot(&run.name, s.clone());
                s
            }
        };
        {
            let mut st = slot.lock();
            st.state = match state {
                RunState::Paused => DomainState::Paused,
                RunState::ShuttingDown => DomainState::InShutdown,
                RunState::Running => DomainState::Running,
            };
            st.reason = match state {
                RunState::Running => StateReason::Booted,
                _ => StateReason::User,
            };
            st.run = Some(run.clone());
            st.live = Some(live);
        }
        slot.stopped
            .send_modify(|n| *n = (*n).max(run.generation - 1));
        self.log(
            &run.name,
            &format!(
                "re-attached to rvirt-vmm pid {} after daemon restart",
                run.pid
            ),
        );
        tokio::spawn(self.clone().supervise(slot, run, None, None));
        Ok(())
    }

    /// Starts every autostart domain that is not running (at daemon start).
    pub async fn autostart(self: &Arc<Self>) {
        for (name, slot) in self.all_slots() {
            let want = {
                let st = slot.lock();
                st.autostart && !st.state.is_active()
            };
            if want {
                match self.start(&name).await {
                    Ok(()) => tracing::info!("domain {name}: autostarted"),
                    Err(e) => tracing::error!("domain {name}: autostart failed: {e}"),
                }
            }
        }
    }
}

/// Waits until the VMM answers `info` on its control socket (returning its run state and how
/// it backs guest RAM), or fails if it exits first.
async fn wait_ready(
    child: &mut tokio::process::Child,
    api: &Path,
) -> Result<(RunState, Option<MemoryBackingInfo>), String> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("rvirt-vmm exited during start-up with {status}"));
        }
        if api.exists() {
            match vmm_client::request(api, &Request::Info).await {
                Ok(Response::Info {
                    state,
                    memory_backing,
                    ..
                }) => return Ok((state, memory_backing)),
                // Any other answer still means it is up.
                Ok(_) => return Ok((RunState::Running, None)),
                Err(_) => {}
            }
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "rvirt-vmm did not answer on {} within {START_TIMEOUT:?}",
                api.display()
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(extra: &str, devices: &str) -> DomainDef {
        Domain::parse(&format!(
            "<domain type='kvm'><name>t</name><memory unit='KiB'>1048576</memory>\
             <currentMemory unit='KiB'>524289</currentMemory>{extra}\
             <os><type>hvm</type><kernel>/k</kernel></os><devices>{devices}</devices></domain>"
        ))
        .unwrap()
        .def
    }

    fn cfg(d: &DomainDef) -> VmConfig {
        vmm_config(
            d,
            Path::new("/r/api.sock"),
            Path::new("/r/serial.sock"),
            &[],
        )
        .unwrap()
    }

    #[test]
    fn memory_with_and_without_a_balloon() {
        // Default: libvirt's virtio balloon; currentMemory rounds up to MiB.
        let c = cfg(&def("", ""));
        assert_eq!(c.memory.size, 1 << 30);
        assert_eq!(c.memory.current, Some(513 << 20));
        assert_eq!(c.balloon, Some(BalloonConfig::default()));
        // No balloon: the guest gets currentMemory, as before the balloon existed.
        let c = cfg(&def("", "<memballoon model='none'/>"));
        assert_eq!((c.memory.size, c.memory.current), (513 << 20, None));
        assert!(c.balloon.is_none());
    }

    #[test]
    fn vcpus_pinning_and_defaults() {
        let c = cfg(&def(
            "<vcpu cpuset='1-2' current='2'>4</vcpu><cputune><vcpupin vcpu='3' cpuset='0'/></cputune>",
            "",
        ));
        assert_eq!(
            c.cpus,
            CpuConfig {
                boot: 2,
                max: Some(4)
            }
        );
        assert_eq!(
            c.emulator_affinity,
            Some(vec![1, 2]),
            "<vcpu cpuset> default"
        );
        let pins: Vec<(u32, Vec<usize>)> = c
            .vcpu_affinity
            .into_iter()
            .map(|a| (a.vcpu, a.cpus))
            .collect();
        assert_eq!(
            pins,
            [
                (0, vec![1, 2]),
                (1, vec![1, 2]),
                (2, vec![1, 2]),
                (3, vec![0])
            ]
        );
        assert!(c.start_paused, "rvirtd always starts the VMM paused");
        let c = cfg(&def("<vcpu>2</vcpu>", ""));
        assert_eq!(c.cpus, CpuConfig { boot: 2, max: None });
        assert!(c.vcpu_affinity.is_empty() && c.emulator_affinity.is_none());
        match c.boot {
            BootConfig::Kernel { cmdline, .. } => {
                assert_eq!(cmdline, "console=ttyS0 reboot=k panic=1")
            }
            other => panic!("a kernel boot, not {other:?}"),
        }
    }

    #[test]
    fn nics_get_taps_macs_and_aliases() {
        let d = def(
            "",
            "<interface type='bridge'><source bridge='br0'/><mac address='52:54:00:00:00:01'/></interface>\
             <interface type='bridge'><source bridge='br0'/><alias name='ua-x'/></interface>",
        );
        let c = vmm_config(
            &d,
            Path::new("/a"),
            Path::new("/s"),
            &["tap0".into(), "tap1".into()],
        )
        .unwrap();
        assert_eq!(c.nets[0].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(c.nets[0].id.as_deref(), Some("net0"));
        assert_eq!(
            (
                c.nets[1].tap.as_str(),
                c.nets[1].mac,
                c.nets[1].id.as_deref()
            ),
            ("tap1", None, Some("ua-x"))
        );
    }

    #[test]
    fn config_file_is_private_and_atomic() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&def("", ""));
        let p = write_vmm_config(dir.path(), &c).unwrap();
        assert_eq!(p, dir.path().join(VMM_CONFIG_FILE));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back: VmConfig = serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        assert_eq!(back, c);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }
}
