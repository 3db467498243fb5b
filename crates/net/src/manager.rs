//! [`NetworkManager`]: the calls rvirtd makes for `net-*` verbs and domain interfaces.
//!
//! State: definitions in `<state>/networks/<name>.xml`, autostart markers in
//! `<state>/networks/autostart/<name>`; a running network has `<run>/networks/<name>.xml` (the
//! definition it was started with) and its dnsmasq files next to it. Everything rvirt needs to
//! find after a daemon restart is on disk or in the kernel (links carry rvirt's alias, rules its
//! comment), so a new manager over the same directories picks up running networks as they are.
//!
//! The calls block (netlink, `nft`, dnsmasq start): call them from `spawn_blocking`.

use std::path::{Path, PathBuf};

use crate::dnsmasq::{self, Lease};
use crate::link::{self, LinkError, Netlink};
use crate::nft::{self, NetRules};
use crate::validate::{default_network, pick_default_subnet};
use crate::xml::{self, ForwardMode, NetworkDef};
use crate::{HostView, Ipv4Net, MacAddr, ValidateError, XmlError};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Xml(#[from] XmlError),
    #[error(transparent)]
    Invalid(#[from] ValidateError),
    #[error("network '{0}' is not defined; see `rvirt net-list --all`")]
    NoSuchNetwork(String),
    #[error("network '{0}' is already active")]
    AlreadyActive(String),
    #[error("network '{0}' is not active; start it with `rvirt net-start {0}`")]
    NotActive(String),
    #[error("network '{0}' is active; destroy it first with `rvirt net-destroy {0}`")]
    Active(String),
    #[error("network '{net}': bridge '{bridge}' already exists and rvirt does not own it; choose another <bridge name='...'/>")]
    BridgeInUse { net: String, bridge: String },
    #[error("bridge '{0}' does not exist on the host; create it (e.g. `ip link add {0} type bridge`) or fix <source bridge='...'/>")]
    MissingHostBridge(String),
    #[error("network '{net}' has {count} guest interface(s) attached ({taps}); stop those domains or destroy with --force")]
    InUse {
        net: String,
        count: usize,
        taps: String,
    },
    #[error("no free TAP name rvnet0..rvnet9999")]
    NoTapName,
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error(transparent)]
    Nft(#[from] nft::NftError),
    #[error(transparent)]
    Dnsmasq(#[from] dnsmasq::DnsmasqError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, NetError>;

/// One row of `net-list`/`net-info`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NetworkInfo {
    pub name: String,
    pub uuid: String,
    pub active: bool,
    pub autostart: bool,
    pub persistent: bool,
    pub bridge: String,
}

/// One `net-dhcp-leases` row; the JSON field names are libvirt's.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DhcpLease {
    pub iface: String,
    /// Seconds since the epoch; 0 for an infinite lease.
    pub expirytime: u64,
    pub r#type: &'static str,
    pub mac: String,
    pub ipaddr: String,
    pub prefix: u8,
    pub hostname: Option<String>,
    pub clientid: Option<String>,
}

/// Where a domain interface connects: libvirt's `<interface type='network'>` or `type='bridge'`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSource {
    Network(String),
    Bridge(String),
}

/// A TAP made for a domain interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedTap {
    pub tap: String,
    pub bridge: String,
    /// The network, for `type='network'` (leases for `domifaddr` come from it).
    pub network: Option<String>,
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> NetError {
    let path = path.to_owned();
    move |source| NetError::Io { what, path, source }
}

fn bridge_owner(net: &str) -> String {
    format!("net:{net}")
}

fn tap_owner(domain: &str) -> String {
    format!("dom:{domain}")
}

pub struct NetworkManager {
    defs: PathBuf,
    run: PathBuf,
    /// Serializes changes: two calls racing on one network or on TAP names would clash.
    lock: std::sync::Mutex<()>,
}

impl NetworkManager {
    /// Opens (creating) `<state_dir>/networks` and `<run_dir>/networks`.
    pub fn open(state_dir: &Path, run_dir: &Path) -> Result<Self> {
        let m = NetworkManager {
            defs: state_dir.join("networks"),
            run: run_dir.join("networks"),
            lock: std::sync::Mutex::new(()),
        };
        for d in [m.defs.join("autostart"), m.run.clone()] {
            std::fs::create_dir_all(&d).map_err(io("cannot create", &d))?;
        }
        Ok(m)
    }

    fn def_path(&self, name: &str) -> PathBuf {
        self.defs.join(format!("{name}.xml"))
    }

    fn active_path(&self, name: &str) -> PathBuf {
        self.run.join(format!("{name}.xml"))
    }

    fn autostart_path(&self, name: &str) -> PathBuf {
        self.defs.join("autostart").join(name)
    }

    /// The persistent definitions.
    pub fn definitions(&self) -> Result<Vec<NetworkDef>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.defs).map_err(io("cannot read", &self.defs))?;
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "xml") {
                let text = std::fs::read_to_string(&p).map_err(io("cannot read", &p))?;
                out.push(xml::parse(&text)?);
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn definition(&self, name: &str) -> Result<NetworkDef> {
        let p = self.def_path(name);
        let text = std::fs::read_to_string(&p).map_err(|_| NetError::NoSuchNetwork(name.into()))?;
        Ok(xml::parse(&text)?)
    }

    /// What the host looks like for validation: other definitions, routes, links.
    fn host_view(&self, nl: &Netlink, except: &str) -> Result<HostView> {
        let networks = self
            .definitions()?
            .into_iter()
            .filter(|d| d.name != except)
            .collect();
        let own = link::owner_alias(&bridge_owner(except));
        Ok(HostView {
            networks,
            routes: nl.ipv4_routes()?,
            links: nl
                .links()?
                .into_iter()
                .filter(|l| l.alias.as_deref() != Some(own.as_str()))
                .map(|l| l.name)
                .collect(),
        })
    }

    /// `net-define`: parses, validates and stores a definition; returns it (with a UUID).
    pub fn define(&self, xml_text: &str) -> Result<NetworkDef> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut def = xml::parse(xml_text)?;
        let nl = Netlink::new()?;
        let mut host = self.host_view(&nl, &def.name)?;
        if self.is_active(&def.name) {
            // The running network's own routes are not a clash with its new definition.
            if let Some(b) = self.active_def(&def.name).and_then(|d| d.bridge) {
                host.routes.retain(|(_, dev)| *dev != b.name);
            }
        }
        crate::validate(&def, &host)?;
        if def.uuid.is_none() {
            def.uuid = Some(self.existing_uuid(&def.name).unwrap_or_else(random_uuid));
        }
        if def.mac.is_none() && def.forward != ForwardMode::Bridge {
            def.mac = Some(MacAddr::random_kvm());
        }
        let p = self.def_path(&def.name);
        write_atomic(&p, &xml::to_xml(&def)).map_err(io("cannot write", &p))?;
        Ok(def)
    }

    fn existing_uuid(&self, name: &str) -> Option<String> {
        self.definition(name).ok().and_then(|d| d.uuid)
    }

    /// Defines libvirt's `default` NAT network on a free 192.168.N.0/24 the first time rvirtd
    /// starts (a marker file remembers it, so an undefined default stays undefined). Not started.
    pub fn ensure_default(&self) -> Result<Option<NetworkDef>> {
        let marker = self.defs.join(".default-created");
        if marker.exists() || self.def_path("default").exists() {
            return Ok(None);
        }
        let nl = Netlink::new()?;
        let host = self.host_view(&nl, "default")?;
        let Some(subnet) = pick_default_subnet(&host) else {
            return Ok(None);
        };
        let def = self.define(&xml::to_xml(&default_network(subnet)))?;
        std::fs::write(&marker, "").map_err(io("cannot write", &marker))?;
        Ok(Some(def))
    }

    /// `net-undefine`: refused while the network runs.
    pub fn undefine(&self, name: &str) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.definition(name)?;
        if self.is_active(name) {
            return Err(NetError::Active(name.into()));
        }
        let _ = std::fs::remove_file(self.autostart_path(name));
        let p = self.def_path(name);
        std::fs::remove_file(&p).map_err(io("cannot remove", &p))
    }

    /// `net-autostart [--disable]`.
    pub fn set_autostart(&self, name: &str, on: bool) -> Result<()> {
        self.definition(name)?;
        let p = self.autostart_path(name);
        if on {
            std::fs::write(&p, "").map_err(io("cannot write", &p))
        } else {
            match std::fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(io("cannot remove", &p)(e))
                }
                _ => Ok(()),
            }
        }
    }

    /// `net-list --all` / `net-info` rows.
    pub fn list(&self) -> Result<Vec<NetworkInfo>> {
        Ok(self
            .definitions()?
            .into_iter()
            .map(|d| NetworkInfo {
                active: self.is_active(&d.name),
                autostart: self.autostart_path(&d.name).exists(),
                persistent: true,
                uuid: d.uuid.clone().unwrap_or_default(),
                bridge: d.bridge.map(|b| b.name).unwrap_or_default(),
                name: d.name,
            })
            .collect())
    }

    /// `net-dumpxml`: the running definition when active, else the stored one.
    pub fn dump_xml(&self, name: &str) -> Result<String> {
        let def = match self.active_def(name) {
            Some(d) => d,
            None => self.definition(name)?,
        };
        Ok(xml::to_xml(&def))
    }

    fn active_def(&self, name: &str) -> Option<NetworkDef> {
        let text = std::fs::read_to_string(self.active_path(name)).ok()?;
        xml::parse(&text).ok()
    }

    pub fn is_active(&self, name: &str) -> bool {
        self.active_path(name).exists()
    }

    /// Run once when rvirtd starts, before `autostart_all`: a network recorded as running whose
    /// bridge is gone (deleted by hand, or the run dir outlived a reboot) has its leftovers
    /// (dnsmasq, nftables rules, run files) removed and counts as stopped again. Returns the names
    /// of the networks so stopped.
    pub fn reconcile(&self) -> Result<Vec<String>> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let nl = Netlink::new()?;
        let mut stopped = Vec::new();
        let rd = std::fs::read_dir(&self.run).map_err(io("cannot read", &self.run))?;
        for e in rd.flatten() {
            let p = e.path();
            let Some(name) = p.file_stem().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            if p.extension().is_none_or(|x| x != "xml") {
                continue;
            }
            let Some(def) = self.active_def(&name) else {
                continue;
            };
            let Some(bridge) = def.bridge.as_ref() else {
                continue;
            };
            let alive = match nl.link(&bridge.name)? {
                None => false,
                Some(l) if def.forward == ForwardMode::Bridge => {
                    l.kind.as_deref() == Some("bridge")
                }
                Some(l) => {
                    l.alias.as_deref() == Some(link::owner_alias(&bridge_owner(&name)).as_str())
                }
            };
            if !alive {
                if def.forward != ForwardMode::Bridge {
                    self.tear_down(&nl, &def);
                }
                std::fs::remove_file(&p).map_err(io("cannot remove", &p))?;
                stopped.push(name);
            }
        }
        stopped.sort();
        Ok(stopped)
    }

    /// Starts every network marked autostart that is not running; returns the errors by name.
    pub fn autostart_all(&self) -> Vec<(String, NetError)> {
        let mut errs = Vec::new();
        for info in self.list().unwrap_or_default() {
            if info.autostart && !info.active {
                if let Err(e) = self.start(&info.name) {
                    errs.push((info.name, e));
                }
            }
        }
        errs
    }

    /// `net-start`. On failure everything created so far is removed again.
    pub fn start(&self, name: &str) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let def = self.definition(name)?;
        if self.is_active(name) {
            return Err(NetError::AlreadyActive(name.into()));
        }
        let nl = Netlink::new()?;
        let bridge = def
            .bridge
            .clone()
            .expect("validated definitions have a bridge");
        if def.forward == ForwardMode::Bridge {
            match nl.link(&bridge.name)? {
                Some(l) if l.kind.as_deref() == Some("bridge") => {}
                _ => return Err(NetError::MissingHostBridge(bridge.name)),
            }
        } else {
            crate::validate(&def, &self.host_view(&nl, name)?)?;
            if let Some(l) = nl.link(&bridge.name)? {
                if l.alias.as_deref() != Some(link::owner_alias(&bridge_owner(name)).as_str()) {
                    return Err(NetError::BridgeInUse {
                        net: name.into(),
                        bridge: bridge.name,
                    });
                }
                // Left by a crashed run of this same network: start clean.
                nl.delete_owned(&bridge.name, &bridge_owner(name))?;
            }
            if let Err(e) = self.bring_up(&nl, &def) {
                self.tear_down(&nl, &def);
                return Err(e);
            }
        }
        let p = self.active_path(name);
        write_atomic(&p, &xml::to_xml(&def)).map_err(io("cannot write", &p))
    }

    fn bring_up(&self, nl: &Netlink, def: &NetworkDef) -> Result<()> {
        let b = def.bridge.as_ref().expect("validated");
        let ip = def.ip.as_ref().expect("validated");
        let owner = bridge_owner(&def.name);
        nl.create_bridge(&b.name, &owner, def.mac, b.stp, b.delay)?;
        nl.add_address(&b.name, &owner, Ipv4Net::new(ip.address, ip.prefix))?;
        nl.set_up(&b.name, &owner, true)?;
        if def.forward == ForwardMode::Nat {
            nft::enable_ipv4_forwarding().map_err(io(
                "cannot enable",
                Path::new("/proc/sys/net/ipv4/ip_forward"),
            ))?;
        }
        nft::add_network(&NetRules {
            network: def.name.clone(),
            bridge: b.name.clone(),
            subnet: ip.subnet(),
            mode: def.forward,
        })?;
        dnsmasq::start(def, &self.run)?;
        Ok(())
    }

    /// Removes what a network put in place; each step runs even when an earlier one failed.
    fn tear_down(&self, nl: &Netlink, def: &NetworkDef) {
        dnsmasq::stop(&def.name, &self.run);
        if let Err(e) = nft::remove_network(&def.name) {
            log::warn!("network '{}': removing nftables rules: {e}", def.name);
        }
        if let Some(b) = &def.bridge {
            if let Err(e) = nl.delete_owned(&b.name, &bridge_owner(&def.name)) {
                log::warn!("network '{}': deleting bridge: {e}", def.name);
            }
        }
    }

    /// TAPs rvirt made that sit on the network's bridge.
    fn attached_taps(&self, nl: &Netlink, bridge: &str) -> Result<Vec<String>> {
        let links = nl.links()?;
        let Some(b) = links.iter().find(|l| l.name == bridge) else {
            return Ok(Vec::new());
        };
        Ok(links
            .iter()
            .filter(|l| l.controller == Some(b.index))
            .filter(|l| {
                l.alias
                    .as_deref()
                    .is_some_and(|a| a.starts_with("rvirt:dom:"))
            })
            .map(|l| l.name.clone())
            .collect())
    }

    /// `net-destroy`: refused while guest TAPs are attached unless `force` (then they are
    /// detached and deleted; their VMs lose the link).
    pub fn destroy(&self, name: &str, force: bool) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let def = self
            .active_def(name)
            .ok_or_else(|| NetError::NotActive(name.into()))?;
        let nl = Netlink::new()?;
        if let Some(b) = &def.bridge {
            let taps = self.attached_taps(&nl, &b.name)?;
            if !taps.is_empty() && !force {
                return Err(NetError::InUse {
                    net: name.into(),
                    count: taps.len(),
                    taps: taps.join(", "),
                });
            }
            if def.forward != ForwardMode::Bridge {
                for t in nl.links()? {
                    if taps.contains(&t.name) {
                        if let Some(owner) =
                            t.alias.as_deref().and_then(|a| a.strip_prefix("rvirt:"))
                        {
                            nl.delete_owned(&t.name, owner)?;
                        }
                    }
                }
            }
        }
        if def.forward != ForwardMode::Bridge {
            self.tear_down(&nl, &def);
        }
        let p = self.active_path(name);
        std::fs::remove_file(&p).map_err(io("cannot remove", &p))
    }

    /// The current lease of a MAC on a network (for `domifaddr`).
    pub fn lease_for_mac(&self, name: &str, mac: MacAddr) -> Result<Option<Lease>> {
        Ok(self
            .leases(name)?
            .into_iter()
            .filter(|l| l.mac == mac)
            .max_by_key(|l| l.expiry))
    }

    /// `net-dhcp-leases` rows with libvirt's field names (virNetworkDHCPLease).
    pub fn dhcp_leases(&self, name: &str) -> Result<Vec<DhcpLease>> {
        let def = self.definition(name)?;
        let iface = def.bridge.map(|b| b.name).unwrap_or_default();
        let prefix = def.ip.map(|i| i.prefix).unwrap_or(32);
        Ok(self
            .leases(name)?
            .into_iter()
            .map(|l| DhcpLease {
                iface: iface.clone(),
                expirytime: l.expiry,
                r#type: "ipv4",
                mac: l.mac.to_string(),
                ipaddr: l.ip.to_string(),
                prefix,
                hostname: l.hostname,
                clientid: l.client_id,
            })
            .collect())
    }

    /// `net-dhcp-leases`: current (unexpired) leases.
    pub fn leases(&self, name: &str) -> Result<Vec<Lease>> {
        self.definition(name)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Ok(dnsmasq::leases(name, &self.run)
            .into_iter()
            .filter(|l| l.expiry == 0 || l.expiry > now)
            .collect())
    }

    /// Creates a TAP `rvnet<N>` for `domain`'s interface and joins it to the network's bridge or
    /// to a host bridge. Hand the name to `rvirt-vmm --net tap=NAME,mac=MAC`.
    pub fn attach_interface(&self, domain: &str, source: &InterfaceSource) -> Result<AttachedTap> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let nl = Netlink::new()?;
        let (bridge, network) = match source {
            InterfaceSource::Network(n) => {
                let def = self.active_def(n).ok_or_else(|| {
                    if self.def_path(n).exists() {
                        NetError::NotActive(n.clone())
                    } else {
                        NetError::NoSuchNetwork(n.clone())
                    }
                })?;
                (def.bridge.expect("validated").name, Some(n.clone()))
            }
            InterfaceSource::Bridge(b) => (b.clone(), None),
        };
        match nl.link(&bridge)? {
            Some(l) if l.kind.as_deref() == Some("bridge") => {}
            _ => return Err(NetError::MissingHostBridge(bridge)),
        }
        let names: Vec<String> = nl.links()?.into_iter().map(|l| l.name).collect();
        let tap = (0..10_000)
            .map(|n| format!("rvnet{n}"))
            .find(|t| !names.contains(t))
            .ok_or(NetError::NoTapName)?;
        link::create_persistent_tap(&tap)?;
        let owner = tap_owner(domain);
        let r = (|| {
            nl.claim_new_tap(&tap, &owner)?;
            nl.set_controller(&tap, &owner, &bridge)
        })();
        if let Err(e) = r {
            let _ = nl.delete_new_tap(&tap);
            return Err(e.into());
        }
        Ok(AttachedTap {
            tap,
            bridge,
            network,
        })
    }

    /// The TAPs rvirt made for `domain` that still exist, found by their alias: after a daemon
    /// restart or a VMM crash this is how the leftovers of a domain are found.
    pub fn interfaces_of(&self, domain: &str) -> Result<Vec<AttachedTap>> {
        let links = Netlink::new()?.links()?;
        let alias = link::owner_alias(&tap_owner(domain));
        let actives: Vec<NetworkDef> = self
            .definitions()?
            .into_iter()
            .filter_map(|d| self.active_def(&d.name))
            .collect();
        Ok(links
            .iter()
            .filter(|l| l.alias.as_deref() == Some(alias.as_str()))
            .map(|l| {
                let bridge = l
                    .controller
                    .and_then(|c| links.iter().find(|b| b.index == c))
                    .map(|b| b.name.clone())
                    .unwrap_or_default();
                let network = actives
                    .iter()
                    .find(|d| d.bridge.as_ref().is_some_and(|b| b.name == bridge))
                    .map(|d| d.name.clone());
                AttachedTap {
                    tap: l.name.clone(),
                    bridge,
                    network,
                }
            })
            .collect())
    }

    /// Deletes every TAP rvirt made for `domain` (VM stopped or crashed); returns their names.
    pub fn detach_all(&self, domain: &str) -> Result<Vec<String>> {
        let taps = self.interfaces_of(domain)?;
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let nl = Netlink::new()?;
        for t in &taps {
            nl.delete_owned(&t.tap, &tap_owner(domain))?;
        }
        Ok(taps.into_iter().map(|t| t.tap).collect())
    }

    /// Deletes a TAP made by [`attach_interface`](Self::attach_interface) for `domain`; a TAP
    /// already gone is fine (the VM crashed and the kernel cleaned up, or a second call).
    pub fn detach_interface(&self, domain: &str, tap: &str) -> Result<()> {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        Netlink::new()?.delete_owned(tap, &tap_owner(domain))?;
        Ok(())
    }
}

fn write_atomic(path: &Path, data: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

fn random_uuid() -> String {
    let mut b = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read;
        let _ = f.read_exact(&mut b);
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}
