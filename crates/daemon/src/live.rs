//! Live resources of a running domain, through rvirt-vmm's control requests: the balloon
//! (setmem, dommemstat), vCPU hotplug (setvcpus, vcpucount), disk and NIC hotplug
//! (attach-*/detach-*), device statistics (domblkstat, domifstat, domstats), and a QEMU monitor
//! look-alike (qemu-monitor-command) translated into the same requests.
//!
//! Every change follows virsh's `--live`/`--config`/`--current`. The live definition (dumpxml of
//! a running domain) is kept in step from the VMM's events, which [`Manager::vmm_event`] applies
//! before passing them on to waiters: a detach or a vCPU unplug completes when the guest has
//! ejected the device, or fails after [`UNPLUG_TIMEOUT`] saying the unplug is still pending.

use crate::error::{ApiError, ApiResult};
use crate::manager::{Manager, Run, Slot, SlotState};
use crate::vmm_client::{self, VmmClientError};
use crate::xml::domain::{read_disk, read_interface, validate_mac, DomainDef, InterfaceSource};
use crate::xml::tree::{Element, Node};
use crate::xml::Domain;
use rvirt_api::rest::*;
use rvirt_api::vmm::{DeviceStats, Event, Request, Response};
use rvirt_api::vmm_config::{CacheMode, DiskConfig, NetConfig};
use std::sync::Arc;
use std::time::Duration;

/// How long a detach or a vCPU unplug waits for the guest (libvirt's QEMU_UNPLUG_TIMEOUT).
pub const UNPLUG_TIMEOUT: Duration = Duration::from_secs(5);

fn vmm_failed(name: &str, what: &str, e: VmmClientError) -> ApiError {
    ApiError::failed(format!("cannot {what} of domain '{name}': {e}"))
}

/// Whether the definition has a balloon (libvirt adds a virtio one unless `model='none'`).
fn has_balloon(dom: &Domain) -> bool {
    dom.def.memballoon.as_deref() != Some("none")
}

/// libvirt's alias index of a disk target: vda → 0, vdz → 25, vdaa → 26.
fn disk_index(target: &str) -> Option<u32> {
    let letters = target
        .strip_prefix("vd")
        .or_else(|| target.strip_prefix("sd"))
        .or_else(|| target.strip_prefix("hd"))?;
    if letters.is_empty() || !letters.chars().all(|c| c.is_ascii_lowercase()) {
        return None;
    }
    let mut n: u32 = 0;
    for c in letters.chars() {
        n = n
            .checked_mul(26)?
            .checked_add(u32::from(c as u8 - b'a') + 1)?;
    }
    Some(n - 1)
}

fn parse_mac(mac: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    Some(out)
}

fn devices_of(dom: &Domain) -> impl Iterator<Item = &Element> {
    dom.tree
        .child("devices")
        .into_iter()
        .flat_map(|d| d.elements())
}

fn alias_of(el: &Element) -> Option<String> {
    el.child("alias")
        .and_then(|a| a.attr("name"))
        .map(str::to_string)
}

fn disk_target(el: &Element) -> Option<&str> {
    el.child("target").and_then(|t| t.attr("dev"))
}

fn iface_mac(el: &Element) -> Option<String> {
    el.child("mac")
        .and_then(|m| m.attr("address"))
        .map(str::to_ascii_lowercase)
}

/// Which device a detach means.
#[derive(Debug, Clone)]
enum DeviceKey {
    /// A disk by target dev (or source path, as virsh detach-disk accepts).
    Disk(String),
    /// An interface by MAC address.
    Iface(String),
    /// A device by alias, of any kind.
    Alias(String),
}

impl DeviceKey {
    fn matches(&self, el: &Element) -> bool {
        match (self, el.name.as_str()) {
            (DeviceKey::Disk(k), "disk") => {
                disk_target(el) == Some(k.as_str())
                    || el
                        .child("source")
                        .is_some_and(|s| s.attr("file").or(s.attr("dev")) == Some(k.as_str()))
            }
            (DeviceKey::Iface(m), "interface") => iface_mac(el).as_deref() == Some(m.as_str()),
            (DeviceKey::Alias(a), "disk" | "interface") => alias_of(el).as_deref() == Some(a),
            _ => false,
        }
    }

    fn not_found(&self, name: &str) -> ApiError {
        let msg = match self {
            DeviceKey::Disk(k) => format!("No disk found whose source path or target is {k}"),
            DeviceKey::Iface(m) => {
                format!("domain '{name}' has no interface with MAC address {m}; see domiflist")
            }
            DeviceKey::Alias(a) => {
                format!("domain '{name}' has no disk or interface with alias '{a}'; see dumpxml")
            }
        };
        ApiError::new(ErrorCode::OperationFailed, msg)
    }
}

/// Removes the first device matching `key` from `dom`'s `<devices>`; returns it.
fn remove_device(dom: &mut Domain, key: &DeviceKey) -> Option<Element> {
    let devices = dom.tree.child_mut("devices")?;
    let idx = devices
        .children
        .iter()
        .position(|n| matches!(n, Node::Element(e) if key.matches(e)))?;
    match devices.children.remove(idx) {
        Node::Element(e) => Some(e),
        _ => None,
    }
}

/// Sets (or, with `None`, removes) the `<source>` of disk `target`, where libvirt writes it
/// (after `<driver>`).
fn set_disk_source(dom: &mut Domain, target: &str, source: Option<&str>) {
    let Some(devices) = dom.tree.child_mut("devices") else {
        return;
    };
    let Some(el) = devices
        .elements_mut()
        .find(|e| e.name == "disk" && disk_target(e) == Some(target))
    else {
        return;
    };
    let attr = if el.attr("type") == Some("block") {
        "dev"
    } else {
        "file"
    };
    el.remove_children("source");
    if let Some(s) = source {
        el.insert_after(&["driver"], Element::new("source").with_attr(attr, s));
    }
}

/// `<target dev='TAP'/>` of a running interface, where libvirt writes it (before `<model>`).
fn set_iface_target(el: &mut Element, tap: &str) {
    el.remove_children("target");
    let t = Node::Element(Element::new("target").with_attr("dev", tap));
    match el
        .children
        .iter()
        .position(|n| matches!(n, Node::Element(e) if e.name == "model" || e.name == "alias" || e.name == "address"))
    {
        Some(i) => el.children.insert(i, t),
        None => el.children.push(t),
    }
}

/// libvirt's live device annotations: `<alias>` then `<address type='pci'>`.
fn annotate(el: &mut Element, alias: &str, slot: u8) {
    el.remove_children("alias");
    el.remove_children("address");
    el.children.push(Node::Element(
        Element::new("alias").with_attr("name", alias),
    ));
    el.children.push(Node::Element(
        Element::new("address")
            .with_attr("type", "pci")
            .with_attr("domain", "0x0000")
            .with_attr("bus", "0x00")
            .with_attr("slot", &format!("0x{slot:02x}"))
            .with_attr("function", "0x0"),
    ));
}

fn resolve_scope(st: &SlotState, scope: PinScope) -> ApiResult<(bool, bool)> {
    scope_targets(
        st.state.is_active() && st.run.is_some(),
        st.persistent,
        scope,
    )
}

/// Resolves virsh's --live/--config/--current for a domain that is `active` (or not) and
/// `persistent` (or transient): (live, config); the default is live when active, else config.
pub(crate) fn scope_targets(
    active: bool,
    persistent: bool,
    scope: PinScope,
) -> ApiResult<(bool, bool)> {
    let (live, config) = if !scope.live && !scope.config {
        (active, !active)
    } else {
        (scope.live, scope.config)
    };
    if live && !active {
        return Err(ApiError::not_running());
    }
    if config && !persistent {
        return Err(ApiError::invalid_op(
            "Requested operation is not valid: transient domains do not have any persistent config",
        ));
    }
    Ok((live, config))
}

/// What a waiter saw.
enum Waited {
    Done,
    TimedOut,
    Stopped,
}

impl Manager {
    fn live_parts(slot: &Slot) -> ApiResult<(Run, Domain)> {
        let st = slot.lock();
        match (&st.run, &st.live) {
            (Some(r), Some(l)) if st.state.is_active() => Ok((r.clone(), l.clone())),
            _ => Err(ApiError::not_running()),
        }
    }

    /// Writes the live definition and run record again (daemon restarts re-read them).
    fn persist_live(&self, st: &SlotState) {
        let (Some(run), Some(live)) = (&st.run, &st.live) else {
            return;
        };
        let dir = self.run_dir_of(&run.name);
        let _ = crate::store::write_atomic(&dir.join("live.xml"), live.to_xml().as_bytes());
        let _ = crate::store::write_atomic(
            &crate::lifecycle::run_record_path(&dir),
            serde_json::to_string(run).unwrap_or_default().as_bytes(),
        );
    }

    /// Saves an edited persistent definition.
    fn save_config(&self, slot: &Slot, edit: impl FnOnce(&mut Domain)) -> ApiResult<()> {
        let mut dom = slot.lock().config.clone();
        edit(&mut dom);
        dom.reparse()?;
        self.store.save(&dom)?;
        slot.lock().config = dom;
        Ok(())
    }

    /// Waits until `done` holds for the slot (checked now and after every VMM event), the
    /// timeout passes, or the VMM stops.
    async fn wait_until(
        slot: &Slot,
        events: &mut tokio::sync::broadcast::Receiver<Event>,
        stopped: &mut tokio::sync::watch::Receiver<u64>,
        timeout: Duration,
        done: impl Fn(&SlotState) -> bool,
    ) -> Waited {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            {
                let st = slot.lock();
                if done(&st) {
                    return Waited::Done;
                }
                if st.run.is_none() {
                    return Waited::Stopped;
                }
            }
            tokio::select! {
                _ = events.recv() => {}
                _ = stopped.changed() => return Waited::Stopped,
                _ = tokio::time::sleep_until(deadline) => {
                    return if done(&slot.lock()) { Waited::Done } else { Waited::TimedOut };
                }
            }
        }
    }

    /// Applies one hotplug/balloon event of the current run to the live definition, then passes
    /// it on to waiters.
    pub async fn vmm_event(&self, slot: &Arc<Slot>, run: &Run, ev: Event) {
        let mut tap_gone = None;
        let mut pin = None;
        {
            let mut st = slot.lock();
            if st.run.as_ref().map(|r| r.generation) != Some(run.generation) {
                return;
            }
            let mut changed = true;
            let SlotState {
                live, run: cur_run, ..
            } = &mut *st;
            if let (Some(live), Some(cur_run)) = (live.as_mut(), cur_run.as_mut()) {
                match &ev {
                    Event::DeviceRemoved { id } => {
                        let key = DeviceKey::Alias(id.clone());
                        let iface_idx = devices_of(live)
                            .filter(|e| e.name == "interface")
                            .position(|e| key.matches(e));
                        match remove_device(live, &key) {
                            Some(_) => {
                                if let Some(i) = iface_idx {
                                    if i < cur_run.taps.len() {
                                        tap_gone = Some(cur_run.taps.remove(i));
                                    }
                                }
                            }
                            None => changed = false,
                        }
                    }
                    Event::VcpuAdded { vcpu, tid } => {
                        let n = (vcpu + 1).max(live.def.vcpus_current);
                        set_vcpu_current(live, n);
                        // `<vcpupin>` (or `<vcpu cpuset>`) holds for hotplugged vCPUs too.
                        pin = live
                            .def
                            .vcpupin
                            .iter()
                            .find(|(v, _)| v == vcpu)
                            .map(|(_, c)| c.clone())
                            .or_else(|| live.def.vcpu_cpuset.clone())
                            .map(|c| (*vcpu, *tid, c));
                    }
                    Event::VcpuRemoved { vcpu } => {
                        let n = (*vcpu).min(live.def.vcpus_current).max(1);
                        set_vcpu_current(live, n);
                    }
                    Event::BalloonChanged { actual_bytes } => {
                        set_current_memory(live, actual_bytes.div_ceil(1024));
                    }
                    _ => changed = false,
                }
                if changed {
                    if let Err(e) = live.reparse() {
                        tracing::warn!("domain {}: live definition after {ev:?}: {e}", run.name);
                    }
                }
            }
            if changed {
                self.persist_live(&st);
            }
        }
        if let Some((vcpu, tid, cpus)) = pin {
            if let Err(e) = crate::host::set_affinity(tid, &cpus) {
                self.log(
                    &run.name,
                    &format!("hotplugged vcpu {vcpu} (thread {tid}) not pinned to {cpus}: {e}"),
                );
            }
        }
        if let Some(tap) = tap_gone {
            let domain = run.name.clone();
            let t = tap.clone();
            let r = crate::networks::blocking(&self.net, move |n| n.detach_interface(&domain, &t))
                .await;
            match r {
                Ok(()) => self.log(&run.name, &format!("interface {tap} unplugged and removed")),
                Err(e) => tracing::warn!("domain {}: cannot remove TAP {tap}: {e}", run.name),
            }
        }
        let _ = slot.events.send(ev);
    }

    /// Gives the live definition's devices their alias and PCI address from the VMM's device
    /// list (matched by host path or TAP), as libvirt shows them in a running domain's XML.
    pub async fn annotate_devices(self: Arc<Self>, slot: Arc<Slot>, run: Run) {
        let Ok(Response::Stats { devices, .. }) =
            vmm_client::request(&run.api_socket, &Request::Stats).await
        else {
            return;
        };
        let mut st = slot.lock();
        if st.run.as_ref().map(|r| r.generation) != Some(run.generation) {
            return;
        }
        let taps = run.taps.clone();
        let Some(live) = st.live.as_mut() else { return };
        let Some(devs) = live.tree.child_mut("devices") else {
            return;
        };
        let mut iface = 0;
        for el in devs.elements_mut() {
            let backend = match el.name.as_str() {
                "disk" => el
                    .child("source")
                    .and_then(|s| s.attr("file").or(s.attr("dev")))
                    .map(str::to_string),
                "interface" => {
                    iface += 1;
                    taps.get(iface - 1).cloned()
                }
                _ => None,
            };
            let Some(backend) = backend else { continue };
            if el.child("alias").is_some() {
                continue;
            }
            if let Some(d) = devices
                .iter()
                .find(|d| d.backend.as_deref() == Some(backend.as_str()))
            {
                if el.name == "interface" {
                    set_iface_target(el, &backend);
                }
                annotate(el, &d.id, d.slot);
            }
        }
        self.persist_live(&st);
    }

    // ---- memory ------------------------------------------------------------------------

    /// virsh setmem / setmaxmem.
    pub async fn set_memory(&self, key: &str, req: &MemoryRequest) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let kib = req.size_kib;
        if kib == 0 {
            return Err(ApiError::invalid_arg(format!(
                "memory size 0 for domain '{name}': give a size above zero"
            )));
        }
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        if req.maximum {
            if live {
                return Err(ApiError::invalid_op(format!(
                    "Requested operation is not valid: cannot resize the maximum memory on active domain '{name}' (rvirt-vmm, like QEMU/KVM, cannot change it live); use --config and restart the domain"
                )));
            }
            return self.save_config(&slot, |d| {
                set_max_memory(d, kib);
                if d.def.current_memory_kib > kib {
                    set_current_memory(d, kib);
                }
            });
        }
        let too_big = || {
            ApiError::invalid_arg(format!(
                "cannot set memory higher than max memory (domain '{name}'); raise it first with setmaxmem --config"
            ))
        };
        if config && kib > slot.lock().config.def.memory_kib {
            return Err(too_big());
        }
        if live {
            let (run, dom) = Self::live_parts(&slot)?;
            if kib > dom.def.memory_kib {
                return Err(too_big());
            }
            if !has_balloon(&dom) {
                return Err(ApiError::invalid_op(format!(
                    "Requested operation is not valid: Unable to change memory of active domain '{name}' without the balloon device and guest OS balloon driver; add <memballoon model='virtio'/> and restart it"
                )));
            }
            vmm_client::request(
                &run.api_socket,
                &Request::Balloon {
                    target_bytes: kib * 1024,
                },
            )
            .await
            .map_err(|e| vmm_failed(&name, "set the balloon target", e))?;
            self.log(&name, &format!("setmem: balloon target {kib} KiB"));
        }
        if config {
            self.save_config(&slot, |d| set_current_memory(d, kib))?;
        }
        Ok(())
    }

    /// virsh dommemstat: balloon, guest statistics and the VMM's RSS, in KiB.
    pub async fn mem_stats_live(&self, key: &str) -> ApiResult<MemStats> {
        let (name, slot) = self.find(key)?;
        let (run, dom) = Self::live_parts(&slot)?;
        let mut out = MemStats {
            actual: dom.def.current_memory_kib,
            ..Default::default()
        };
        if has_balloon(&dom) {
            if let Ok(Response::Balloon { actual_bytes, .. }) =
                vmm_client::request(&run.api_socket, &Request::QueryBalloon).await
            {
                out.actual = actual_bytes / 1024;
            }
            if let Ok(Response::BalloonStats { stats: s }) =
                vmm_client::request(&run.api_socket, &Request::BalloonStats).await
            {
                let kib = |v: Option<u64>| v.map(|b| b / 1024);
                out.swap_in = kib(s.swap_in);
                out.swap_out = kib(s.swap_out);
                out.major_fault = s.major_fault;
                out.minor_fault = s.minor_fault;
                out.unused = kib(s.unused);
                out.available = kib(s.available);
                out.usable = kib(s.usable);
                out.disk_caches = kib(s.disk_caches);
                out.hugetlb_pgalloc = s.hugetlb_pgalloc;
                out.hugetlb_pgfail = s.hugetlb_pgfail;
                out.last_update = (s.last_update > 0).then_some(s.last_update);
            }
        }
        out.rss = match vmm_client::request(&run.api_socket, &Request::Stats).await {
            Ok(Response::Stats { rss_bytes, .. }) if rss_bytes > 0 => rss_bytes / 1024,
            _ => crate::host::rss_kib(run.pid).unwrap_or(0),
        };
        let _ = name;
        Ok(out)
    }

    /// virsh dommemstat --period.
    pub async fn set_stats_period(&self, key: &str, req: &StatsPeriodRequest) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        let no_balloon = || {
            ApiError::invalid_op(format!(
                "Requested operation is not valid: No memory balloon device configured, can not set the collection period (domain '{name}'); add <memballoon model='virtio'/>"
            ))
        };
        if config && !has_balloon(&slot.lock().config) {
            return Err(no_balloon());
        }
        if live {
            let (run, dom) = Self::live_parts(&slot)?;
            if !has_balloon(&dom) {
                return Err(no_balloon());
            }
            vmm_client::request(
                &run.api_socket,
                &Request::SetBalloonStatsPeriod {
                    seconds: req.seconds,
                },
            )
            .await
            .map_err(|e| vmm_failed(&name, "set the balloon statistics period", e))?;
        }
        if config {
            let secs = req.seconds.to_string();
            self.save_config(&slot, |d| {
                let devices = d.tree.child_or_insert("devices");
                if devices.child("memballoon").is_none() {
                    devices.children.push(Node::Element(
                        Element::new("memballoon").with_attr("model", "virtio"),
                    ));
                }
                let mb = devices.child_mut("memballoon").expect("just ensured");
                mb.child_or_insert("stats").set_attr("period", &secs);
            })?;
        }
        Ok(())
    }

    /// dominfo: while running, the memory comes from the balloon.
    pub async fn info_live(&self, key: &str) -> ApiResult<DomainInfo> {
        let mut info = self.info(key)?;
        let (_, slot) = self.find(key)?;
        if let Ok((run, dom)) = Self::live_parts(&slot) {
            if has_balloon(&dom) {
                // Short: dominfo/domstate must not hang on a VMM that does not answer.
                let q = vmm_client::request(&run.api_socket, &Request::QueryBalloon);
                if let Ok(Ok(Response::Balloon { actual_bytes, .. })) =
                    tokio::time::timeout(Duration::from_millis(500), q).await
                {
                    info.used_memory_kib = actual_bytes / 1024;
                }
            }
        }
        Ok(info)
    }

    // ---- vCPUs -------------------------------------------------------------------------

    /// virsh setvcpus.
    pub async fn set_vcpus(&self, key: &str, req: &VcpusRequest) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let count = req.count;
        if count == 0 {
            return Err(ApiError::invalid_arg(format!(
                "vCPU count 0 for domain '{name}': vCPU 0 cannot be unplugged, a domain keeps at least one vCPU; give 1 or more"
            )));
        }
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        if req.maximum {
            if live {
                return Err(ApiError::invalid_op(format!(
                    "Requested operation is not valid: the maximum vCPU count of running domain '{name}' cannot be changed; use --maximum --config and restart it"
                )));
            }
            if count > 255 {
                return Err(ApiError::invalid_arg(format!(
                    "maximum vCPU count {count} for domain '{name}' is above 255"
                )));
            }
            return self.save_config(&slot, |d| set_vcpu_max(d, count));
        }
        if config {
            refuse_fixed_vcpus(&name, &slot.lock().config.def, count)?;
            let max = slot.lock().config.def.vcpus;
            if count > max {
                return Err(ApiError::invalid_arg(format!(
                    "requested vcpus is greater than max allowable vcpus for the persistent domain: {count} > {max}; raise the maximum with setvcpus --maximum --config"
                )));
            }
        }
        if live {
            let (run, dom) = Self::live_parts(&slot)?;
            let max = dom.def.vcpus;
            if count > max {
                return Err(ApiError::invalid_arg(format!(
                    "requested vcpus is greater than max allowable vcpus for the live domain: {count} > {max}; the maximum is set with setvcpus --maximum --config and applies at the next start"
                )));
            }
            let cur = dom.def.vcpus_current;
            refuse_fixed_vcpus(&name, &dom.def, count)?;
            if count != cur {
                let mut events = slot.events.subscribe();
                let mut stopped = slot.stopped.subscribe();
                stopped.borrow_and_update();
                vmm_client::request(&run.api_socket, &Request::SetVcpus { count })
                    .await
                    .map_err(|e| vmm_failed(&name, "change the vCPU count", e))?;
                let done = |st: &SlotState| {
                    st.live
                        .as_ref()
                        .is_some_and(|l| l.def.vcpus_current == count)
                };
                match Self::wait_until(&slot, &mut events, &mut stopped, UNPLUG_TIMEOUT, done)
                    .await
                {
                    Waited::Done => {}
                    Waited::Stopped => {
                        return Err(ApiError::failed(format!(
                            "domain '{name}' stopped while its vCPU count was changing"
                        )))
                    }
                    Waited::TimedOut if count < cur => {
                        return Err(ApiError::new(
                            ErrorCode::OperationTimeout,
                            format!(
                                "operation failed: vCPU unplug of domain '{name}' is still pending: the guest has not released {} within {} seconds; it goes offline when the guest ejects it (check with vcpucount)",
                                if count + 1 == cur {
                                    format!("vCPU {count}")
                                } else {
                                    format!("vCPUs {count}-{}", cur - 1)
                                },
                                UNPLUG_TIMEOUT.as_secs()
                            ),
                        ))
                    }
                    Waited::TimedOut => {
                        return Err(ApiError::new(
                            ErrorCode::OperationTimeout,
                            format!(
                                "operation failed: rvirt-vmm did not report the new vCPUs of domain '{name}' within {} seconds",
                                UNPLUG_TIMEOUT.as_secs()
                            ),
                        ))
                    }
                }
                self.log(&name, &format!("setvcpus: {cur} -> {count} vCPUs"));
            }
        }
        if config {
            self.save_config(&slot, |d| set_vcpu_current(d, count))?;
        }
        Ok(())
    }

    /// virsh vcpucount.
    pub fn vcpu_count(&self, key: &str) -> ApiResult<VcpuCount> {
        let (_, slot) = self.find(key)?;
        let st = slot.lock();
        let live = st.live.as_ref().filter(|_| st.state.is_active());
        Ok(VcpuCount {
            maximum_config: st.config.def.vcpus,
            maximum_live: live.map(|l| l.def.vcpus),
            current_config: st.config.def.vcpus_current,
            current_live: live.map(|l| l.def.vcpus_current),
        })
    }

    // ---- devices -----------------------------------------------------------------------

    /// virsh attach-device / attach-disk / attach-interface.
    pub async fn attach_device(&self, key: &str, req: &AttachRequest) -> ApiResult<AttachResponse> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let mut el = Element::parse(&req.xml)
            .map_err(|e| ApiError::new(ErrorCode::XmlError, e.to_string()))?;
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        match el.name.as_str() {
            "disk" => {
                if let Some(bus) = el.child("target").and_then(|t| t.attr("bus")) {
                    if bus != "virtio" {
                        let t = disk_target(&el).unwrap_or("?");
                        return Err(ApiError::new(
                            ErrorCode::ConfigUnsupported,
                            format!(
                                "unsupported configuration: disk {t} on bus '{bus}': rvirt hotplugs only virtio disks; use --targetbus virtio (<target bus='virtio'/>) with a vdX target"
                            ),
                        ));
                    }
                }
                let disk = read_disk(&el)?;
                if disk.bus != "virtio" {
                    return Err(ApiError::new(
                        ErrorCode::ConfigUnsupported,
                        format!(
                            "unsupported configuration: disk {} on bus '{}': rvirt hotplugs only virtio disks; use --targetbus virtio (<target bus='virtio'/>) with a vdX target",
                            disk.target, disk.bus
                        ),
                    ));
                }
                let source = disk.source.clone().unwrap_or_default();
                if let Err(e) = std::fs::metadata(&source) {
                    let why = e.to_string();
                    let why = why.split(" (os error").next().unwrap_or(&why);
                    return Err(ApiError::new(
                        ErrorCode::OperationFailed,
                        format!(
                            "Cannot access storage file '{source}': {why}; give an existing image (create one with rvirt-img create)",
                        ),
                    ));
                }
                let dup = |d: &Domain| d.def.disks.iter().any(|x| x.target == disk.target);
                let dup_err = || {
                    ApiError::failed(format!(
                        "target {} already exists in domain '{name}'; choose another target (see domblklist)",
                        disk.target
                    ))
                };
                if config && dup(&slot.lock().config) {
                    return Err(dup_err());
                }
                let mut answer = AttachResponse {
                    alias: None,
                    slot: None,
                };
                if live {
                    let (run, dom) = Self::live_parts(&slot)?;
                    if dup(&dom) {
                        return Err(dup_err());
                    }
                    let used = self.used_ids(&run, &dom).await;
                    let base = disk_index(&disk.target).unwrap_or(0);
                    let id = (base..)
                        .map(|n| format!("virtio-disk{n}"))
                        .find(|c| !used.contains(c))
                        .expect("a free alias");
                    let cfg = DiskConfig {
                        path: Some(source.clone().into()),
                        format: Some(disk.format.vmm()),
                        readonly: disk.readonly,
                        cache: disk
                            .cache
                            .as_deref()
                            .and_then(CacheMode::parse)
                            .unwrap_or_default(),
                        serial: None,
                        id: Some(id),
                        ..Default::default()
                    };
                    let (id, pci) = match vmm_client::request(
                        &run.api_socket,
                        &Request::AddDisk { disk: cfg },
                    )
                    .await
                    {
                        Ok(Response::DeviceAdded { id, slot }) => (id, slot),
                        Ok(other) => {
                            return Err(ApiError::failed(format!(
                                "rvirt-vmm answered {other:?} to a disk hotplug"
                            )))
                        }
                        Err(e) => return Err(vmm_failed(&name, "hotplug the disk", e)),
                    };
                    let mut live_el = el.clone();
                    annotate(&mut live_el, &id, pci);
                    self.add_live_device(&slot, live_el, None)?;
                    self.log(
                        &name,
                        &format!(
                            "disk {} ({}) hotplugged as {id} in slot {pci}",
                            disk.target, source
                        ),
                    );
                    answer = AttachResponse {
                        alias: Some(id),
                        slot: Some(pci),
                    };
                }
                if config {
                    el.remove_children("alias");
                    el.remove_children("address");
                    self.save_config(&slot, |d| {
                        insert_device(&mut d.tree, el)
                    })?;
                }
                Ok(answer)
            }
            "interface" => self.attach_interface(&name, &slot, el, live, config).await,
            other => Err(ApiError::new(
                ErrorCode::ConfigUnsupported,
                format!(
                    "unsupported configuration: rvirt cannot attach a <{other}> device; attach a <disk> or an <interface>"
                ),
            )),
        }
    }

    /// Device ids in use: aliases in the live XML and ids the VMM reports.
    async fn used_ids(&self, run: &Run, dom: &Domain) -> Vec<String> {
        let mut used: Vec<String> = devices_of(dom).filter_map(alias_of).collect();
        if let Ok(Response::Stats { devices, .. }) =
            vmm_client::request(&run.api_socket, &Request::Stats).await
        {
            used.extend(devices.into_iter().map(|d| d.id));
        }
        used
    }

    fn add_live_device(&self, slot: &Slot, el: Element, tap: Option<String>) -> ApiResult<()> {
        let mut st = slot.lock();
        let Some(live) = st.live.as_mut() else {
            return Err(ApiError::not_running());
        };
        insert_device(&mut live.tree, el);
        live.reparse()?;
        if let (Some(t), Some(run)) = (tap, st.run.as_mut()) {
            run.taps.push(t);
        }
        self.persist_live(&st);
        Ok(())
    }

    async fn attach_interface(
        &self,
        name: &str,
        slot: &Arc<Slot>,
        mut el: Element,
        live: bool,
        config: bool,
    ) -> ApiResult<AttachResponse> {
        // The alias is chosen below, among those the live domain does not use yet.
        let iface = read_interface(&el, 0)?;
        let mac = match &iface.mac {
            Some(m) => m.clone(),
            None => {
                let m = self.unused_mac();
                el.remove_children("mac");
                el.insert_after(&["source"], Element::new("mac").with_attr("address", &m));
                m
            }
        };
        if !validate_mac(&mac) {
            return Err(ApiError::invalid_arg(format!(
                "MAC address {mac} is not a unicast MAC address"
            )));
        }
        for (other, s) in self.all_slots() {
            let st = s.lock();
            let mine = other == name;
            let doms = [Some(&st.config), st.live.as_ref()];
            let clash = doms.iter().flatten().any(|d| {
                d.def
                    .interfaces
                    .iter()
                    .any(|i| i.mac.as_deref() == Some(mac.as_str()))
            });
            // The same MAC in this domain's other definition is the same NIC (live + config).
            let clash_here = mine
                && ((live
                    && st.live.as_ref().is_some_and(|d| {
                        d.def
                            .interfaces
                            .iter()
                            .any(|i| i.mac.as_deref() == Some(mac.as_str()))
                    }))
                    || (config
                        && st
                            .config
                            .def
                            .interfaces
                            .iter()
                            .any(|i| i.mac.as_deref() == Some(mac.as_str()))));
            if (!mine && clash) || clash_here {
                return Err(ApiError::failed(format!(
                    "MAC address {mac} is already used by domain '{other}'; give another --mac, or none for a generated one"
                )));
            }
        }
        let mut answer = AttachResponse {
            alias: None,
            slot: None,
        };
        if live {
            let (run, dom) = Self::live_parts(slot)?;
            let source = match &iface.source {
                InterfaceSource::Bridge(b) => rvirt_net::InterfaceSource::Bridge(b.clone()),
                InterfaceSource::Network(n) => rvirt_net::InterfaceSource::Network(n.clone()),
            };
            let domain = name.to_string();
            let tap =
                crate::networks::blocking(&self.net, move |n| n.attach_interface(&domain, &source))
                    .await
                    .map_err(|e| {
                        ApiError::new(
                            e.code,
                            format!("cannot connect the new interface of domain '{name}': {e}"),
                        )
                    })?
                    .tap;
            let undo_tap = |tap: String| {
                let domain = name.to_string();
                crate::networks::blocking(&self.net, move |n| n.detach_interface(&domain, &tap))
            };
            let used = self.used_ids(&run, &dom).await;
            let id = (0..)
                .map(|n| format!("net{n}"))
                .find(|c| !used.contains(c))
                .expect("a free alias");
            let cfg = NetConfig {
                tap: tap.clone(),
                mac: parse_mac(&mac),
                id: Some(id),
            };
            let (id, pci) =
                match vmm_client::request(&run.api_socket, &Request::AddNet { net: cfg }).await {
                    Ok(Response::DeviceAdded { id, slot }) => (id, slot),
                    other => {
                        let _ = undo_tap(tap).await;
                        return Err(match other {
                            Err(e) => vmm_failed(name, "hotplug the interface", e),
                            Ok(r) => ApiError::failed(format!(
                                "rvirt-vmm answered {r:?} to a NIC hotplug"
                            )),
                        });
                    }
                };
            let mut live_el = el.clone();
            set_iface_target(&mut live_el, &tap);
            annotate(&mut live_el, &id, pci);
            if let Err(e) = self.add_live_device(slot, live_el, Some(tap.clone())) {
                let _ = undo_tap(tap).await;
                return Err(e);
            }
            self.log(
                name,
                &format!("interface {mac} hotplugged on {tap} as {id} in slot {pci}"),
            );
            answer = AttachResponse {
                alias: Some(id),
                slot: Some(pci),
            };
        }
        if config {
            el.remove_children("alias");
            el.remove_children("address");
            el.remove_children("target");
            self.save_config(slot, |d| insert_device(&mut d.tree, el))?;
        }
        Ok(answer)
    }

    fn unused_mac(&self) -> String {
        let used: Vec<String> = self
            .all_slots()
            .iter()
            .flat_map(|(_, s)| {
                let st = s.lock();
                let mut v: Vec<String> = st
                    .config
                    .def
                    .interfaces
                    .iter()
                    .filter_map(|i| i.mac.clone())
                    .collect();
                if let Some(l) = &st.live {
                    v.extend(l.def.interfaces.iter().filter_map(|i| i.mac.clone()));
                }
                v
            })
            .collect();
        loop {
            let m = crate::store::random_mac();
            if !used.contains(&m) {
                return m;
            }
        }
    }

    /// virsh detach-device / detach-disk / detach-interface.
    pub async fn detach_device(self: &Arc<Self>, key: &str, req: &DetachRequest) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let dkey = match (&req.xml, &req.key) {
            (Some(xml), _) => {
                let el = Element::parse(xml)
                    .map_err(|e| ApiError::new(ErrorCode::XmlError, e.to_string()))?;
                match el.name.as_str() {
                    "disk" => DeviceKey::Disk(
                        disk_target(&el)
                            .ok_or_else(|| {
                                ApiError::invalid_arg(
                                    "the <disk> to detach needs <target dev='vdX'/>",
                                )
                            })?
                            .to_string(),
                    ),
                    "interface" => DeviceKey::Iface(iface_mac(&el).ok_or_else(|| {
                        ApiError::invalid_arg(
                            "the <interface> to detach needs <mac address='...'/> to say which one (see domiflist)",
                        )
                    })?),
                    other => {
                        return Err(ApiError::new(
                            ErrorCode::ConfigUnsupported,
                            format!(
                                "unsupported configuration: rvirt cannot detach a <{other}> device; detach a <disk> or an <interface>"
                            ),
                        ))
                    }
                }
            }
            (None, Some(k)) => match req.kind.as_deref() {
                Some("disk") => DeviceKey::Disk(k.clone()),
                Some("interface") => DeviceKey::Iface(k.to_ascii_lowercase()),
                _ if k.contains(':') => DeviceKey::Iface(k.to_ascii_lowercase()),
                _ => DeviceKey::Alias(k.clone()),
            },
            (None, None) => {
                return Err(ApiError::invalid_arg(
                    "say which device to detach: give xml or key",
                ))
            }
        };
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        let found = |d: &Domain| devices_of(d).any(|e| dkey.matches(e));
        if config && !found(&slot.lock().config) {
            return Err(dkey.not_found(&name));
        }
        if live {
            let (run, dom) = Self::live_parts(&slot)?;
            let el = devices_of(&dom)
                .find(|e| dkey.matches(e))
                .cloned()
                .ok_or_else(|| dkey.not_found(&name))?;
            let alias = match alias_of(&el) {
                Some(a) => a,
                None => {
                    // A boot device not annotated yet: ask the VMM.
                    self.clone()
                        .annotate_devices(slot.clone(), run.clone())
                        .await;
                    let st = slot.lock();
                    st.live
                        .as_ref()
                        .and_then(|d| devices_of(d).find(|e| dkey.matches(e)).and_then(alias_of))
                        .ok_or_else(|| {
                            ApiError::failed(format!(
                                "rvirt-vmm does not list the device to detach from domain '{name}'; it cannot be unplugged live (use --config and restart)"
                            ))
                        })?
                }
            };
            let mut events = slot.events.subscribe();
            let mut stopped = slot.stopped.subscribe();
            stopped.borrow_and_update();
            vmm_client::request(
                &run.api_socket,
                &Request::RemoveDevice { id: alias.clone() },
            )
            .await
            .map_err(|e| vmm_failed(&name, &format!("unplug device '{alias}'"), e))?;
            let akey = DeviceKey::Alias(alias.clone());
            let gone = |st: &SlotState| {
                st.live
                    .as_ref()
                    .is_none_or(|d| !devices_of(d).any(|e| akey.matches(e)))
            };
            match Self::wait_until(&slot, &mut events, &mut stopped, UNPLUG_TIMEOUT, gone).await {
                Waited::Done | Waited::Stopped => {
                    self.log(&name, &format!("device {alias} unplugged"))
                }
                Waited::TimedOut => {
                    return Err(ApiError::new(
                        ErrorCode::OperationTimeout,
                        format!(
                            "operation failed: unplug of device '{alias}' of domain '{name}' is still pending: the guest did not release it within {} seconds; it is removed when the guest ejects it (check with dumpxml)",
                            UNPLUG_TIMEOUT.as_secs()
                        ),
                    ))
                }
            }
        }
        if config {
            self.save_config(&slot, |d| {
                remove_device(d, &dkey);
            })?;
        }
        Ok(())
    }

    /// virsh change-media: ejects, inserts or replaces the disc of a CD-ROM drive, in the
    /// running guest (the VMM's drive reports the change, as a real one does) and/or in the
    /// definition.
    pub async fn change_media(&self, key: &str, req: &ChangeMediaRequest) -> ApiResult<()> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let action = req.action.as_deref().unwrap_or("update");
        let source = match (action, &req.source) {
            ("eject", Some(_)) => {
                return Err(ApiError::invalid_arg(
                    "--eject takes no source; give --update SOURCE to replace the disc",
                ))
            }
            ("eject", None) => None,
            ("insert", None) => {
                return Err(ApiError::invalid_arg("--insert needs the source to insert"))
            }
            ("insert" | "update", s) => s.clone(),
            (other, _) => {
                return Err(ApiError::invalid_arg(format!(
                    "change-media action '{other}': use eject, insert or update"
                )))
            }
        };
        if let Some(s) = &source {
            if let Err(e) = std::fs::metadata(s) {
                return Err(ApiError::failed(format!(
                    "Cannot access storage file '{s}': {}",
                    e.to_string().split(" (os error").next().unwrap_or_default()
                )));
            }
        }
        let (live, config) = resolve_scope(&slot.lock(), req.scope)?;
        // The drive, in the definition the change applies to first.
        let find = |dom: &Domain| -> ApiResult<crate::xml::domain::Disk> {
            let disk = dom
                .def
                .disks
                .iter()
                .find(|d| d.target == req.path || d.source.as_deref() == Some(req.path.as_str()))
                .cloned()
                .ok_or_else(|| {
                    ApiError::failed(format!(
                        "No disk found whose source path or target is {} in domain '{name}'",
                        req.path
                    ))
                })?;
            if disk.device != "cdrom" {
                return Err(ApiError::invalid_op(format!(
                    "The disk device '{}' is not removable",
                    disk.target
                )));
            }
            if action == "insert" && disk.source.is_some() {
                return Err(ApiError::invalid_op(format!(
                    "The disk device '{}' already has media; eject it first or use --update",
                    disk.target
                )));
            }
            Ok(disk)
        };
        if config {
            find(&slot.lock().config)?;
        }
        if live {
            let (run, dom) = Self::live_parts(&slot)?;
            let disk = find(&dom)?;
            let format = Some(disk.format.vmm());
            match vmm_client::request(
                &run.api_socket,
                &Request::ChangeMedia {
                    id: disk.alias.clone(),
                    source: source.as_ref().map(Into::into),
                    format,
                    force: req.force,
                },
            )
            .await
            {
                Ok(Response::Ok) => {}
                Ok(Response::Error { message }) => {
                    return Err(ApiError::failed(format!(
                        "cannot change the media of {} in domain '{name}': {message}",
                        disk.target
                    )))
                }
                Ok(other) => {
                    return Err(ApiError::internal(format!(
                        "rvirt-vmm answered change-media with {other:?}"
                    )))
                }
                Err(e) => return Err(vmm_failed(&name, "change the media", e)),
            }
            let mut st = slot.lock();
            if let Some(l) = st.live.as_mut() {
                set_disk_source(l, &disk.target, source.as_deref());
                if let Err(e) = l.reparse() {
                    tracing::warn!("domain '{name}': live definition after change-media: {e}");
                }
            }
            self.persist_live(&st);
            drop(st);
            self.log(
                &name,
                &format!(
                    "media of {}: {}",
                    disk.target,
                    source.as_deref().unwrap_or("ejected")
                ),
            );
        }
        if config {
            let target = find(&slot.lock().config)?.target;
            self.save_config(&slot, |d| set_disk_source(d, &target, source.as_deref()))?;
        }
        Ok(())
    }

    // ---- statistics --------------------------------------------------------------------

    /// virsh domstats / domblkstat / domifstat.
    pub async fn domain_stats(&self, key: &str) -> ApiResult<DomainStats> {
        let (name, slot) = self.find(key)?;
        let (state, reason, config) = {
            let st = slot.lock();
            (st.state, st.reason, st.config.clone())
        };
        let mut out = DomainStats {
            name: name.clone(),
            state,
            reason,
            cpu_time_ns: 0,
            balloon_current_kib: config.def.current_memory_kib,
            balloon_maximum_kib: config.def.memory_kib,
            rss_kib: 0,
            vcpu_current: config.def.vcpus_current,
            vcpu_maximum: config.def.vcpus,
            block: Vec::new(),
            net: Vec::new(),
        };
        let Ok((run, dom)) = Self::live_parts(&slot) else {
            return Ok(out);
        };
        out.balloon_current_kib = dom.def.current_memory_kib;
        out.balloon_maximum_kib = dom.def.memory_kib;
        out.vcpu_current = dom.def.vcpus_current;
        out.vcpu_maximum = dom.def.vcpus;
        out.cpu_time_ns = crate::host::proc_stat(run.pid).map_or(0, |s| s.cpu_time_ns);
        if has_balloon(&dom) {
            if let Ok(Response::Balloon { actual_bytes, .. }) =
                vmm_client::request(&run.api_socket, &Request::QueryBalloon).await
            {
                out.balloon_current_kib = actual_bytes / 1024;
            }
        }
        let devices = match vmm_client::request(&run.api_socket, &Request::Stats).await {
            Ok(Response::Stats {
                devices, rss_bytes, ..
            }) => {
                out.rss_kib = rss_bytes / 1024;
                devices
            }
            Ok(_) => Vec::new(),
            Err(e) => return Err(vmm_failed(&name, "read the device statistics", e)),
        };
        let find = |alias: Option<String>, backend: &str| -> Option<&DeviceStats> {
            devices
                .iter()
                .find(|d| alias.as_deref() == Some(d.id.as_str()))
                .or_else(|| {
                    devices
                        .iter()
                        .find(|d| d.backend.as_deref() == Some(backend))
                })
        };
        let c = |d: Option<&DeviceStats>, k: &str| {
            d.and_then(|d| d.counters.get(k).copied()).unwrap_or(0)
        };
        let mut iface = 0;
        for el in devices_of(&dom) {
            match el.name.as_str() {
                "disk" => {
                    let Ok(disk) = read_disk(el) else { continue };
                    let d = find(alias_of(el), disk.source.as_deref().unwrap_or(""));
                    out.block.push(BlockStats {
                        path: disk.source_or_dash(),
                        name: disk.target,
                        rd_req: c(d, "read_requests"),
                        rd_bytes: c(d, "bytes_read"),
                        wr_req: c(d, "write_requests"),
                        wr_bytes: c(d, "bytes_written"),
                        flush_operations: c(d, "flush_requests"),
                        errs: c(d, "errors"),
                    });
                }
                "interface" => {
                    let tap = run.taps.get(iface).cloned().unwrap_or_default();
                    iface += 1;
                    let d = find(alias_of(el), &tap);
                    out.net.push(NetStats {
                        name: tap,
                        mac: iface_mac(el).unwrap_or_default(),
                        rx_bytes: c(d, "rx_bytes"),
                        rx_packets: c(d, "rx_frames"),
                        rx_errs: 0,
                        rx_drop: c(d, "rx_dropped"),
                        tx_bytes: c(d, "tx_bytes"),
                        tx_packets: c(d, "tx_frames"),
                        tx_errs: 0,
                        tx_drop: c(d, "tx_dropped"),
                    });
                }
                _ => {}
            }
        }
        Ok(out)
    }

    // ---- monitor -----------------------------------------------------------------------

    /// virsh qemu-monitor-command: the few HMP/QMP commands that map onto rvirt-vmm's control
    /// requests, answered in QEMU's words.
    pub async fn monitor(&self, key: &str, req: &MonitorRequest) -> ApiResult<MonitorReply> {
        let (name, slot) = self.find(key)?;
        let _op = slot.op.lock().await;
        let (run, dom) = Self::live_parts(&slot)?;
        let balloon = has_balloon(&dom);
        const NO_BALLOON: &str = "No balloon device has been activated";
        let max_kib = dom.def.memory_kib;
        if req.hmp {
            let words: Vec<&str> = req.command.split_whitespace().collect();
            let text = match words.as_slice() {
                ["info", "balloon"] => {
                    if !balloon {
                        format!("Error: {NO_BALLOON}\n")
                    } else {
                        let actual = self.query_balloon(&name, &run).await?;
                        format!("balloon: actual={}\n", actual >> 20)
                    }
                }
                ["info", "status"] => format!(
                    "VM status: {}\n",
                    if slot.lock().state == DomainState::Paused {
                        "paused"
                    } else {
                        "running"
                    }
                ),
                ["balloon", n] => match n.parse::<u64>() {
                    Ok(_) if !balloon => format!("Error: {NO_BALLOON}\n"),
                    Ok(0) => "Error: Parameter 'value' expects a size\n".to_string(),
                    Ok(mib) => {
                        let bytes = mib.saturating_mul(1 << 20).min(max_kib * 1024);
                        self.balloon_to(&name, &run, bytes).await?;
                        String::new()
                    }
                    Err(_) => format!("Error: invalid size '{n}'\n"),
                },
                ["balloon"] => "Error: Parameter 'value' is missing\n".to_string(),
                [] => String::new(),
                [cmd, ..] => format!("unknown command: '{cmd}'\n"),
            };
            return Ok(MonitorReply {
                text: Some(text),
                json: None,
            });
        }
        let cmd: serde_json::Value = match serde_json::from_str(&req.command) {
            Ok(v) => v,
            Err(e) => {
                return Ok(MonitorReply {
                    text: None,
                    json: Some(serde_json::json!({
                        "error": {"class": "GenericError", "desc": format!("JSON parse error, {e}")}
                    })),
                })
            }
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = cmd.get("id").cloned().unwrap_or_else(|| {
            let n = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            serde_json::Value::String(format!("rvirt-{n}"))
        });
        let err = |class: &str, desc: String| serde_json::json!({"error": {"class": class, "desc": desc}, "id": id});
        let ret = |v: serde_json::Value| serde_json::json!({"return": v, "id": id});
        let execute = cmd.get("execute").and_then(|v| v.as_str()).unwrap_or("");
        let reply = match execute {
            "" => err(
                "GenericError",
                "QMP input lacks member 'execute'".to_string(),
            ),
            "query-balloon" if !balloon => err("DeviceNotActive", NO_BALLOON.into()),
            "query-balloon" => {
                let actual = self.query_balloon(&name, &run).await?;
                ret(serde_json::json!({ "actual": actual }))
            }
            "balloon" if !balloon => err("DeviceNotActive", NO_BALLOON.into()),
            "balloon" => match cmd
                .get("arguments")
                .and_then(|a| a.get("value"))
                .and_then(|v| v.as_i64())
            {
                Some(v) if v > 0 => {
                    let bytes = (v as u64).min(max_kib * 1024);
                    self.balloon_to(&name, &run, bytes).await?;
                    ret(serde_json::json!({}))
                }
                Some(_) => err(
                    "GenericError",
                    "Parameter 'value' expects a size".to_string(),
                ),
                None => err("GenericError", "Parameter 'value' is missing".to_string()),
            },
            "query-status" => {
                let paused = slot.lock().state == DomainState::Paused;
                ret(serde_json::json!({
                    "status": if paused { "paused" } else { "running" },
                    "singlestep": false,
                    "running": !paused,
                }))
            }
            other => err(
                "CommandNotFound",
                format!("The command {other} has not been found"),
            ),
        };
        Ok(MonitorReply {
            text: None,
            json: Some(reply),
        })
    }

    async fn query_balloon(&self, name: &str, run: &Run) -> ApiResult<u64> {
        match vmm_client::request(&run.api_socket, &Request::QueryBalloon).await {
            Ok(Response::Balloon { actual_bytes, .. }) => Ok(actual_bytes),
            Ok(other) => Err(ApiError::failed(format!(
                "rvirt-vmm answered {other:?} to query-balloon"
            ))),
            Err(e) => Err(vmm_failed(name, "query the balloon", e)),
        }
    }

    async fn balloon_to(&self, name: &str, run: &Run, bytes: u64) -> ApiResult<()> {
        vmm_client::request(
            &run.api_socket,
            &Request::Balloon {
                target_bytes: bytes,
            },
        )
        .await
        .map(|_| ())
        .map_err(|e| vmm_failed(name, "set the balloon target", e))
    }
}

/// Adds a device after the last one of its kind (libvirt lists disks, then interfaces, ...).
fn insert_device(tree: &mut Element, el: Element) {
    let devices = tree.child_or_insert("devices");
    let after = devices
        .children
        .iter()
        .rposition(|n| matches!(n, Node::Element(e) if e.name == el.name))
        .or_else(|| {
            // An interface goes after the disks when it is the first one.
            (el.name == "interface")
                .then(|| {
                    devices
                        .children
                        .iter()
                        .rposition(|n| matches!(n, Node::Element(e) if e.name == "disk"))
                })
                .flatten()
        });
    match after {
        Some(i) => devices.children.insert(i + 1, Node::Element(el)),
        None => devices.children.push(Node::Element(el)),
    }
}

/// `<currentMemory unit='KiB'>` (placed after `<memory>`).
fn set_current_memory(d: &mut Domain, kib: u64) {
    let el = Element::new("currentMemory")
        .with_attr("unit", "KiB")
        .with_text(&kib.to_string());
    replace_or_insert(d, el, &["memory"]);
    d.def.current_memory_kib = kib;
}

fn set_max_memory(d: &mut Domain, kib: u64) {
    let el = Element::new("memory")
        .with_attr("unit", "KiB")
        .with_text(&kib.to_string());
    replace_or_insert(d, el, &["uuid", "name"]);
    d.def.memory_kib = kib;
}

fn replace_or_insert(d: &mut Domain, el: Element, after: &[&str]) {
    let name = el.name.clone();
    match d.tree.child_mut(&name) {
        Some(cur) => *cur = el,
        None => d.tree.insert_after(after, el),
    }
}

/// A vCPU that `<vcpus><vcpu id='N' hotpluggable='no'/>` keeps online stops a count below it.
fn refuse_fixed_vcpus(name: &str, def: &DomainDef, count: u32) -> ApiResult<()> {
    match def.vcpus_fixed.iter().find(|&&id| id >= count) {
        Some(id) => Err(ApiError::invalid_arg(format!(
            "vCPU {id} of domain '{name}' is not hotpluggable (<vcpus><vcpu id='{id}' hotpluggable='no'/>), so the count cannot go below {}; change the definition with --config and restart",
            id + 1
        ))),
        None => Ok(()),
    }
}

/// Keeps `<vcpus>` (when the definition has it) in step with `<vcpu>`: one entry per possible
/// vCPU, the first `current` enabled (in order), the rest disabled and hotpluggable.
fn sync_vcpus_list(d: &mut Domain) {
    let (max, cur) = (d.def.vcpus, d.def.vcpus_current);
    let Some(list) = d.tree.child_mut("vcpus") else {
        return;
    };
    let id_of = |e: &Element| e.attr("id").and_then(|v| v.parse::<u32>().ok());
    list.children.retain(|n| match n {
        Node::Element(e) if e.name == "vcpu" => id_of(e).is_some_and(|id| id < max),
        _ => true,
    });
    for id in 0..max {
        if !list
            .elements()
            .any(|e| e.name == "vcpu" && id_of(e) == Some(id))
        {
            let mut e = Element::new("vcpu");
            e.set_attr("id", &id.to_string());
            list.children.push(Node::Element(e));
        }
    }
    for e in list.elements_mut().filter(|e| e.name == "vcpu") {
        let Some(id) = id_of(e) else { continue };
        let on = id < cur;
        e.set_attr("enabled", if on { "yes" } else { "no" });
        if e.attr("hotpluggable").is_none() || !on {
            e.set_attr("hotpluggable", if id == 0 { "no" } else { "yes" });
        }
        e.attrs.retain(|(k, _)| k != "order");
        if on {
            e.set_attr("order", &(id + 1).to_string());
        }
    }
}

/// `<vcpu current='N'>` (the attribute is dropped when N is the maximum, as libvirt writes it).
fn set_vcpu_current(d: &mut Domain, n: u32) {
    let max = d.def.vcpus;
    let el = d.tree.child_or_insert("vcpu");
    if el.text().is_empty() {
        el.set_text(&max.to_string());
    }
    if n >= max {
        el.attrs.retain(|(k, _)| k != "current");
    } else {
        el.set_attr("current", &n.to_string());
    }
    d.def.vcpus_current = n.min(max);
    sync_vcpus_list(d);
}

/// `<vcpu>MAX</vcpu>`; the current count and pinning beyond it are cut to the new maximum.
fn set_vcpu_max(d: &mut Domain, max: u32) {
    let cur = d.def.vcpus_current.min(max);
    let el = d.tree.child_or_insert("vcpu");
    el.set_text(&max.to_string());
    if cur >= max {
        el.attrs.retain(|(k, _)| k != "current");
    } else {
        el.set_attr("current", &cur.to_string());
    }
    if let Some(ct) = d.tree.child_mut("cputune") {
        ct.children.retain(|n| match n {
            Node::Element(e) if e.name == "vcpupin" => e
                .attr("vcpu")
                .and_then(|v| v.parse::<u32>().ok())
                .is_some_and(|v| v < max),
            _ => true,
        });
    }
    d.def.vcpus = max;
    d.def.vcpus_current = cur;
    d.def.vcpus_fixed.retain(|&id| id < max);
    sync_vcpus_list(d);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_aliases_follow_libvirt() {
        assert_eq!(disk_index("vda"), Some(0));
        assert_eq!(disk_index("vdb"), Some(1));
        assert_eq!(disk_index("vdz"), Some(25));
        assert_eq!(disk_index("vdaa"), Some(26));
        assert_eq!(disk_index("vd1"), None);
    }

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("52:54:00:ab:cd:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        assert_eq!(parse_mac("52:54:00"), None);
    }

    /// setvcpus keeps libvirt's `<vcpus>` list in step and refuses to unplug a vCPU the list
    /// marks hotpluggable='no'.
    #[test]
    fn vcpus_list_follows_the_count() {
        let mut d = Domain::parse(
            "<domain type='kvm'><name>a</name><memory unit='MiB'>512</memory><vcpu current='2'>3</vcpu><vcpus><vcpu id='0' enabled='yes' hotpluggable='no' order='1'/><vcpu id='1' enabled='yes' hotpluggable='yes' order='2'/><vcpu id='2' enabled='no' hotpluggable='yes'/></vcpus><os><type>hvm</type></os></domain>",
        )
        .unwrap();
        set_vcpu_current(&mut d, 3);
        d.reparse().unwrap();
        assert_eq!(d.def.vcpus_current, 3);
        assert!(
            d.to_xml()
                .contains("<vcpu id='2' enabled='yes' hotpluggable='yes' order='3'/>"),
            "{}",
            d.to_xml()
        );
        set_vcpu_current(&mut d, 1);
        d.reparse().unwrap();
        assert!(
            d.to_xml()
                .contains("<vcpu id='1' enabled='no' hotpluggable='yes'/>"),
            "{}",
            d.to_xml()
        );
        set_vcpu_max(&mut d, 4);
        d.reparse().unwrap();
        assert_eq!((d.def.vcpus, d.def.vcpus_current), (4, 1));
        assert!(
            d.to_xml()
                .contains("<vcpu id='3' enabled='no' hotpluggable='yes'/>"),
            "{}",
            d.to_xml()
        );
        set_vcpu_max(&mut d, 2);
        d.reparse().unwrap();
        assert!(!d.to_xml().contains("id='2'"), "{}", d.to_xml());

        let fixed = Domain::parse(
            "<domain type='kvm'><name>a</name><memory unit='MiB'>512</memory><vcpu>3</vcpu><vcpus><vcpu id='0'/><vcpu id='1' hotpluggable='no'/><vcpu id='2'/></vcpus><os><type>hvm</type></os></domain>",
        )
        .unwrap();
        assert!(refuse_fixed_vcpus("a", &fixed.def, 2).is_ok());
        let err = refuse_fixed_vcpus("a", &fixed.def, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vCPU 1 of domain 'a' is not hotpluggable")
                && err.contains("cannot go below 2"),
            "{err}"
        );
    }

    #[test]
    fn vcpu_and_memory_edits_keep_the_definition_valid() {
        let mut d = Domain::parse(
            "<domain type='kvm'><name>a</name><memory unit='MiB'>512</memory><vcpu current='2'>4</vcpu><os><type>hvm</type></os><cputune><vcpupin vcpu='3' cpuset='0'/></cputune></domain>",
        )
        .unwrap();
        set_vcpu_current(&mut d, 4);
        d.reparse().unwrap();
        assert_eq!((d.def.vcpus, d.def.vcpus_current), (4, 4));
        assert!(!d.to_xml().contains("current="));
        set_vcpu_max(&mut d, 2);
        d.reparse().unwrap();
        assert_eq!((d.def.vcpus, d.def.vcpus_current), (2, 2));
        assert!(!d.to_xml().contains("vcpupin"), "{}", d.to_xml());
        set_current_memory(&mut d, 262144);
        d.reparse().unwrap();
        assert_eq!(d.def.current_memory_kib, 262144);
        assert!(d
            .to_xml()
            .contains("<currentMemory unit='KiB'>262144</currentMemory>"));
    }
}
