//! The domain registry: every defined (or transient, running) domain, its state, and the
//! per-domain lock that serializes operations on it. Lifecycle operations are in
//! [`crate::lifecycle`], pinning in [`crate::pinning`].

use crate::error::{ApiError, ApiResult};
use crate::store::{random_mac, random_uuid, Store};
use crate::xml::Domain;
use rvirt_api::rest::{
    BlockDevice, DefineResponse, DomainInfo, DomainState, DomainSummary, ErrorCode, NetInterface,
    StateReason,
};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    pub run_dir: PathBuf,
    pub vmm_binary: PathBuf,
}

/// What undefine does with a UEFI domain's variable store (virsh undefine --nvram /
/// --keep-nvram).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvramPolicy {
    /// Refuse to undefine while the store exists (no flag given).
    Refuse,
    /// Delete it.
    Remove,
    /// Keep the file.
    Keep,
}

/// One running VMM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Run {
    pub name: String,
    pub uuid: String,
    pub id: u32,
    pub pid: u32,
    /// /proc start time: with the pid, identifies the process across pid reuse.
    pub start_time: u64,
    pub api_socket: PathBuf,
    pub serial_socket: PathBuf,
    pub taps: Vec<String>,
    /// Increases with every start, so a late exit notice of an old run is not taken for the
    /// current one.
    pub generation: u64,
    /// How the VMM backs guest RAM, from its `info` answer (dominfo). Not in the run record:
    /// a re-attaching daemon asks the VMM again.
    #[serde(skip)]
    pub memory_backing: Option<rvirt_api::vmm::MemoryBackingInfo>,
}

pub struct SlotState {
    /// The definition: persistent config, or the transient domain's only definition.
    pub config: Domain,
    /// The definition the running VMM was started from.
    pub live: Option<Domain>,
    pub persistent: bool,
    pub autostart: bool,
    pub state: DomainState,
    pub reason: StateReason,
    pub run: Option<Run>,
    /// Set by destroy/reboot before they stop the VMM, so the exit is not taken for a crash.
    pub stop_intent: Option<StateReason>,
    /// The slot was removed from the registry (undefined transient domain that stopped).
    pub gone: bool,
    /// `reboot` pressed the power button: the guest's next poweroff restarts the domain.
    pub reboot_requested: bool,
    /// The VMM ended and the domain is being started again (guest reboot, `reboot`, `reset`,
    /// an on_* action `restart`): the domain keeps this id and stays "running" meanwhile, as
    /// libvirt's domain does while QEMU resets.
    pub restart_id: Option<u32>,
}

pub struct Slot {
    /// Serializes lifecycle operations on this domain.
    pub op: Arc<tokio::sync::Mutex<()>>,
    pub st: Mutex<SlotState>,
    /// Counts VMM runs that ended; waiters subscribe before stopping a VMM.
    pub stopped: tokio::sync::watch::Sender<u64>,
    /// Cancels the attached console session, if any.
    pub console: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The VMM's hotplug and balloon events, re-sent after supervision applied them to the live
    /// definition; waiters (detach, setvcpus) subscribe before sending their request.
    pub events: tokio::sync::broadcast::Sender<rvirt_api::vmm::Event>,
}

impl Slot {
    pub fn new(config: Domain, persistent: bool, autostart: bool) -> Arc<Slot> {
        Arc::new(Slot {
            op: Arc::new(tokio::sync::Mutex::new(())),
            st: Mutex::new(SlotState {
                config,
                live: None,
                persistent,
                autostart,
                state: DomainState::ShutOff,
                reason: StateReason::Unknown,
                run: None,
                stop_intent: None,
                gone: false,
                reboot_requested: false,
                restart_id: None,
            }),
            stopped: tokio::sync::watch::channel(0).0,
            console: Mutex::new(None),
            events: tokio::sync::broadcast::channel(64).0,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Manager {
    pub cfg: Config,
    pub store: Store,
    slots: Mutex<BTreeMap<String, Arc<Slot>>>,
    next_id: AtomicU32,
    pub host_cpus: usize,
    /// Virtual networks and domain TAPs (rvirt-net). Its calls block: see [`crate::networks`].
    pub net: Arc<rvirt_net::NetworkManager>,
}

impl Manager {
    pub fn new(cfg: Config) -> anyhow::Result<Arc<Manager>> {
        use anyhow::Context;
        let store = Store::open(&cfg.state_dir)?;
        std::fs::create_dir_all(&cfg.run_dir)
            .with_context(|| format!("cannot create run dir {}", cfg.run_dir.display()))?;
        let net = rvirt_net::NetworkManager::open(&cfg.state_dir, &cfg.run_dir)
            .context("cannot open the network state")?;
        let (stored, broken) = store.load_all()?;
        for b in broken {
            tracing::error!("skipping a stored definition: {b}; fix or remove the file");
        }
        let mut slots = BTreeMap::new();
        let mut uuids = HashSet::new();
        for mut s in stored {
            let name = s.domain.def.name.clone();
            let file = store.definition_path(&name);
            if !file.exists() || slots.contains_key(&name) {
                tracing::error!(
                    "skipping a definition of '{name}' stored under another file name; rename it to {}",
                    file.display()
                );
                continue;
            }
            if let Some(u) = &s.domain.def.uuid {
                if !uuids.insert(u.clone()) {
                    tracing::error!(
                        "skipping {}: its uuid {u} is used by another domain",
                        file.display()
                    );
                    continue;
                }
            }
            if s.domain.def.uuid.is_none() {
                // A file placed by hand without <uuid>: give it one, as define would.
                s.domain.set_uuid(&random_uuid());
                uuids.insert(s.domain.def.uuid.clone().unwrap_or_default());
                if let Err(e) = store.save(&s.domain) {
                    tracing::error!("domain {name}: cannot store its generated uuid: {e}");
                }
            }
            for w in &s.domain.warnings {
                tracing::warn!("domain {name}: {w}");
            }
            slots.insert(name, Slot::new(s.domain, true, s.autostart));
        }
        Ok(Arc::new(Manager {
            cfg,
            store,
            slots: Mutex::new(slots),
            next_id: AtomicU32::new(1),
            host_cpus: crate::host::host_cpus(),
            net: Arc::new(net),
        }))
    }

    fn slots(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn take_id(&self) -> u32 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn bump_id_above(&self, id: u32) {
        self.next_id.fetch_max(id + 1, Ordering::Relaxed);
    }

    pub fn all_slots(&self) -> Vec<(String, Arc<Slot>)> {
        self.slots()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Finds a domain by name, UUID or runtime id, as virsh does.
    pub fn find(&self, key: &str) -> ApiResult<(String, Arc<Slot>)> {
        let slots = self.slots();
        if let Some(s) = slots.get(key) {
            return Ok((key.to_string(), s.clone()));
        }
        let key_uuid = uuid::Uuid::parse_str(key)
            .ok()
            .map(|u| u.hyphenated().to_string());
        let key_id: Option<u32> = key.parse().ok();
        for (name, slot) in slots.iter() {
            let st = slot.lock();
            let by_uuid = key_uuid.is_some() && st.config.def.uuid == key_uuid;
            let by_id =
                key_id.is_some() && st.run.as_ref().map(|r| r.id).or(st.restart_id) == key_id;
            if by_uuid || by_id {
                return Ok((name.clone(), slot.clone()));
            }
        }
        Err(ApiError::no_domain(key))
    }

    pub fn insert_slot(&self, name: &str, slot: Arc<Slot>) {
        self.slots().insert(name.to_string(), slot);
    }

    /// Removes `slot` from the registry if it is still the one registered under `name`.
    pub fn remove_slot(&self, name: &str, slot: &Arc<Slot>) {
        let mut slots = self.slots();
        if slots.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(name);
        }
        slot.lock().gone = true;
    }

    /// Defines (or redefines) a persistent domain, or registers a transient one (which the
    /// caller then starts).
    /// Defines (or redefines) a persistent domain, or registers a transient one (which the
    /// caller then starts). Uniqueness is decided under the registry lock; the file is written
    /// outside it, under the domain's own op lock, so defines of different domains overlap.
    pub async fn define(
        &self,
        xml: &str,
        transient: bool,
    ) -> ApiResult<(DefineResponse, Arc<Slot>)> {
        let mut dom = Domain::parse(xml)?;
        let name = dom.def.name.clone();
        if dom.def.kernel.is_none() && dom.def.disks.is_empty() {
            // Refused now rather than at start: the firmware would find nothing to boot.
            return Err(ApiError::new(
                ErrorCode::ConfigUnsupported,
                format!(
                    "unsupported configuration: domain '{name}' has no way to boot: no \
                     <os><kernel> and no disk or CD-ROM for the firmware (rvirt has no network \
                     boot); add a <kernel>, a <disk> or a <disk device='cdrom'>"
                ),
            ));
        }
        dom.fill_firmware(&crate::firmware::default_nvram(&self.cfg.state_dir, &name));
        let (slot, new_guard) = {
            let mut slots = self.slots();
            self.check_unique(&slots, &mut dom)?;
            match slots.get(&name).cloned() {
                Some(slot) => (slot, None),
                None => {
                    if dom.def.uuid.is_none() {
                        dom.set_uuid(&random_uuid());
                    }
                    let slot = Slot::new(dom.clone(), !transient, false);
                    let guard = slot
                        .op
                        .clone()
                        .try_lock_owned()
                        .expect("a new slot is unlocked");
                    slots.insert(name.clone(), slot.clone());
                    (slot, Some(guard))
                }
            }
        };
        let response = |dom: &Domain| DefineResponse {
            name: name.clone(),
            uuid: dom.def.uuid.clone().unwrap_or_default(),
            warnings: dom.warnings.clone(),
        };
        if let Some(_op) = new_guard {
            if !transient {
                if let Err(e) = self.store.save(&dom) {
                    self.remove_slot(&name, &slot);
                    return Err(e.into());
                }
            }
            return Ok((response(&dom), slot));
        }
        let _op = slot.op.lock().await;
        {
            let st = slot.lock();
            if st.gone {
                return Err(ApiError::invalid_op(format!(
                    "operation failed: domain '{name}' was undefined while being redefined; retry"
                )));
            }
            let old_uuid = st.config.def.uuid.clone().unwrap_or_default();
            match &dom.def.uuid {
                Some(u) if *u != old_uuid => {
                    return Err(ApiError::invalid_op(format!(
                        "operation failed: domain '{name}' already exists with uuid {old_uuid}"
                    )))
                }
                Some(_) => {}
                None => dom.set_uuid(&old_uuid),
            }
            if transient {
                return Err(ApiError::invalid_op(if st.state.is_active() {
                    "Domain is already active".to_string()
                } else {
                    format!(
                        "operation failed: domain '{name}' already exists with uuid {old_uuid}; use start"
                    )
                }));
            }
        }
        self.store.save(&dom)?;
        let mut st = slot.lock();
        st.config = dom.clone();
        st.persistent = true;
        Ok((response(&dom), slot.clone()))
    }

    /// UUID and MAC uniqueness against every other domain; fills in generated MACs.
    fn check_unique(&self, slots: &BTreeMap<String, Arc<Slot>>, dom: &mut Domain) -> ApiResult<()> {
        let name = dom.def.name.clone();
        let mut used_macs: HashSet<String> = HashSet::new();
        for (other, slot) in slots.iter().filter(|(n, _)| **n != name) {
            let st = slot.lock();
            if dom.def.uuid.is_some() && st.config.def.uuid == dom.def.uuid {
                return Err(ApiError::invalid_op(format!(
                    "operation failed: domain '{other}' already exists with uuid {}",
                    dom.def.uuid.as_deref().unwrap_or_default()
                )));
            }
            used_macs.extend(
                st.config
                    .def
                    .interfaces
                    .iter()
                    .filter_map(|i| i.mac.clone()),
            );
        }
        for mac in dom.def.interfaces.iter().filter_map(|i| i.mac.as_ref()) {
            if !used_macs.insert(mac.clone()) {
                return Err(ApiError::new(
                    ErrorCode::ConfigUnsupported,
                    format!("MAC address {mac} is already used by another domain; remove <mac> to get a generated one"),
                ));
            }
        }
        dom.fill_macs(|| loop {
            let m = random_mac();
            if used_macs.insert(m.clone()) {
                return m;
            }
        });
        Ok(())
    }

    pub async fn undefine(&self, key: &str, policy: NvramPolicy) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let mut st = slot.lock();
        if st.gone {
            return Err(ApiError::no_domain(key));
        }
        if !st.persistent {
            return Err(ApiError::invalid_op(
                "Requested operation is not valid: cannot undefine transient domain",
            ));
        }
        // libvirt's rule: a variable store on disk goes only when asked, and is never left
        // behind silently.
        let nvram = st
            .config
            .def
            .firmware
            .as_ref()
            .and_then(|f| f.nvram.clone())
            .map(PathBuf::from)
            .filter(|p| p.exists());
        if let Some(p) = &nvram {
            if policy == NvramPolicy::Refuse {
                return Err(ApiError::invalid_op(format!(
                    "Requested operation is not valid: cannot undefine domain with nvram ({}); \
                     use --nvram to delete it or --keep-nvram to keep it",
                    p.display()
                )));
            }
        }
        self.store.remove(&name)?;
        if let (Some(p), NvramPolicy::Remove) = (&nvram, policy) {
            if let Err(e) = std::fs::remove_file(p) {
                tracing::warn!("domain '{name}': cannot remove NVRAM {}: {e}", p.display());
            }
        }
        st.persistent = false;
        st.autostart = false;
        let active = st.state.is_active();
        drop(st);
        if !active {
            self.remove_slot(&name, &slot);
        }
        Ok(())
    }

    pub async fn set_autostart(&self, key: &str, enable: bool) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let mut st = slot.lock();
        if !st.persistent {
            return Err(ApiError::invalid_op(
                "Requested operation is not valid: cannot set autostart for transient domain",
            ));
        }
        self.store.set_autostart(&name, enable)?;
        st.autostart = enable;
        Ok(())
    }

    pub fn summary(&self, slot: &Slot) -> DomainSummary {
        let st = slot.lock();
        summary_of(&st)
    }

    pub fn list(&self) -> Vec<DomainSummary> {
        self.all_slots()
            .iter()
            .map(|(_, s)| self.summary(s))
            .collect()
    }

    pub fn info(&self, key: &str) -> ApiResult<DomainInfo> {
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let def = &st.live.as_ref().unwrap_or(&st.config).def;
        let stat = st.run.as_ref().and_then(|r| crate::host::proc_stat(r.pid));
        Ok(DomainInfo {
            summary: summary_of(&st),
            os_type: def.os_type.clone(),
            vcpus: def.vcpus_current,
            max_memory_kib: def.memory_kib,
            used_memory_kib: def.current_memory_kib,
            cpu_time_ns: stat.map(|s| s.cpu_time_ns),
            pid: st.run.as_ref().map(|r| r.pid),
            memory_backing: st.run.as_ref().and_then(|r| r.memory_backing.clone()),
        })
    }

    pub fn mem_stats(&self, key: &str) -> ApiResult<rvirt_api::rest::MemStats> {
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let (Some(run), Some(live)) = (&st.run, &st.live) else {
            return Err(ApiError::not_running());
        };
        Ok(rvirt_api::rest::MemStats {
            actual: live.def.current_memory_kib,
            rss: crate::host::rss_kib(run.pid).unwrap_or(0),
            ..Default::default()
        })
    }

    pub fn xml(&self, key: &str, inactive: bool) -> ApiResult<String> {
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let dom = match (&st.live, inactive) {
            (Some(live), false) => live,
            _ => &st.config,
        };
        Ok(dom.to_xml())
    }

    pub fn block_devices(&self, key: &str) -> ApiResult<Vec<BlockDevice>> {
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let def = &st.live.as_ref().unwrap_or(&st.config).def;
        Ok(def
            .disks
            .iter()
            .map(|d| BlockDevice {
                target: d.target.clone(),
                source: d.source_or_dash(),
                kind: if d.source.as_deref().is_some_and(|s| s.starts_with("/dev/")) {
                    "block"
                } else {
                    "file"
                }
                .into(),
                device: d.device.clone(),
                format: d.format.name().into(),
                readonly: d.readonly,
            })
            .collect())
    }

    pub fn interfaces(&self, key: &str) -> ApiResult<Vec<NetInterface>> {
        use crate::xml::domain::InterfaceSource;
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let def = &st.live.as_ref().unwrap_or(&st.config).def;
        let taps = st.run.as_ref().map(|r| r.taps.clone()).unwrap_or_default();
        Ok(def
            .interfaces
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let (kind, source) = match &n.source {
                    InterfaceSource::Network(s) => ("network", s.clone()),
                    InterfaceSource::Bridge(s) => ("bridge", s.clone()),
                };
                NetInterface {
                    interface: taps.get(i).cloned().unwrap_or_else(|| "-".into()),
                    kind: kind.into(),
                    source,
                    model: n.model.clone(),
                    mac: n.mac.clone().unwrap_or_default(),
                }
            })
            .collect())
    }

    /// Appends a timestamped line to the domain's log (like libvirt's qemu/NAME.log).
    pub fn log(&self, name: &str, line: &str) {
        let path = self.store.log_path(name);
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
        {
            let _ = writeln!(f, "{} rvirtd: {line}", timestamp());
        }
    }
}

pub fn summary_of(st: &SlotState) -> DomainSummary {
    DomainSummary {
        id: st.run.as_ref().map(|r| r.id).or(st.restart_id),
        name: st.config.def.name.clone(),
        uuid: st.config.def.uuid.clone().unwrap_or_default(),
        state: st.state,
        reason: st.reason,
        persistent: st.persistent,
        autostart: st.autostart,
    }
}

/// UTC time as `YYYY-MM-DD HH:MM:SS.mmm`, without a date crate: civil-from-days arithmetic.
pub fn timestamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60,
        now.subsec_millis()
    )
}
