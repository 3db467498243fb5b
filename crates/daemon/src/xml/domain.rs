//! The typed view of a libvirt domain definition, read from (and edited through) the element
//! tree so that dumpxml returns everything the user wrote.

use super::cpuset::CpuSet;
use super::tree::{Element, Position, SyntaxError};
use std::collections::BTreeSet;

/// Why a definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainXmlError {
    #[error(transparent)]
    Syntax(#[from] SyntaxError),
    #[error("invalid domain XML at {position}: {message}")]
    Invalid { position: Position, message: String },
    #[error("unsupported configuration at {position}: {message}")]
    Unsupported { position: Position, message: String },
}

fn invalid(el: &Element, message: impl Into<String>) -> DomainXmlError {
    DomainXmlError::Invalid {
        position: el.position,
        message: message.into(),
    }
}

fn unsupported(el: &Element, message: impl Into<String>) -> DomainXmlError {
    DomainXmlError::Unsupported {
        position: el.position,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LifecycleAction {
    Destroy,
    Restart,
}

impl LifecycleAction {
    fn parse(el: &Element, allowed_default: LifecycleAction) -> Result<Self, DomainXmlError> {
        match el.text().as_str() {
            "destroy" => Ok(LifecycleAction::Destroy),
            "restart" => Ok(LifecycleAction::Restart),
            "" => Ok(allowed_default),
            other @ ("preserve" | "rename-restart" | "coredump-destroy" | "coredump-restart") => {
                Err(unsupported(
                    el,
                    format!(
                        "<{}>{other}</{}> is not supported; use destroy or restart",
                        el.name, el.name
                    ),
                ))
            }
            other => Err(invalid(
                el,
                format!(
                    "<{}> has unknown action '{other}' (expected destroy or restart)",
                    el.name
                ),
            )),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// The VMM configuration's spelling of the same format.
    pub fn vmm(self) -> rvirt_api::vmm_config::DiskFormat {
        match self {
            DiskFormat::Raw => rvirt_api::vmm_config::DiskFormat::Raw,
            DiskFormat::Qcow2 => rvirt_api::vmm_config::DiskFormat::Qcow2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// The image; `None` for an empty CD-ROM drive.
    pub source: Option<String>,
    /// `disk` or `cdrom`.
    pub device: String,
    pub format: DiskFormat,
    /// `<driver cache=...>` as written (checked to be a libvirt cache mode).
    pub cache: Option<String>,
    pub readonly: bool,
    pub target: String,
    pub bus: String,
    /// `<serial>`: the serial number the guest sees (at most 20 bytes).
    pub serial: Option<String>,
    /// `<alias name=...>`, else libvirt's default: `virtio-disk<N>` (N from the target name)
    /// or `scsi0-0-0-<unit>`.
    pub alias: String,
    /// SCSI unit (`<address type='drive' unit=...>`, else the target name's index).
    pub unit: Option<u16>,
    /// `<boot order='N'/>`.
    pub boot_order: Option<u32>,
}

impl Disk {
    /// The source as virsh domblklist prints it (`-` for an empty drive).
    pub fn source_or_dash(&self) -> String {
        self.source.clone().unwrap_or_else(|| "-".into())
    }
}

/// How the guest boots when it has no `<kernel>`: firmware, as libvirt's `<os>` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firmware {
    /// `efi` or `bios`.
    pub kind: String,
    /// `<loader>` path (None: the default image of `kind`).
    pub loader: Option<String>,
    /// `<nvram>` path (EFI; None: made up at define time under the state dir).
    pub nvram: Option<String>,
    /// `<nvram template=...>` (None: the loader's matching VARS image).
    pub nvram_template: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InterfaceSource {
    Network(String),
    Bridge(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub source: InterfaceSource,
    pub mac: Option<String>,
    pub model: String,
    /// `<target dev=.../>` when present (the TAP name).
    pub target: Option<String>,
    /// `<alias name=...>`, else libvirt's default `net<N>` (N = position).
    pub alias: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Graphics {
    pub kind: String,
    pub port: Option<i32>,
    pub listen: Option<String>,
}

/// Everything rvirt acts on, read from a definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainDef {
    pub domain_type: String,
    pub name: String,
    pub uuid: Option<String>,
    pub memory_kib: u64,
    pub current_memory_kib: u64,
    pub vcpus: u32,
    pub vcpus_current: u32,
    /// vCPUs `<vcpus><vcpu id='N' hotpluggable='no'/>` keeps online: setvcpus --live cannot
    /// unplug them (vCPU 0 never is hotpluggable and is not listed here).
    pub vcpus_fixed: Vec<u32>,
    pub vcpu_placement: String,
    pub vcpu_cpuset: Option<CpuSet>,
    pub os_type: String,
    pub arch: Option<String>,
    pub kernel: Option<String>,
    pub initrd: Option<String>,
    pub cmdline: Option<String>,
    pub boot: Vec<String>,
    /// Firmware boot (no `<kernel>`): `<os firmware=...>`, `<loader>`, `<nvram>`.
    pub firmware: Option<Firmware>,
    /// `<bootmenu enable='yes' timeout='MS'/>`: the firmware's menu wait in ms.
    pub boot_menu_ms: Option<u32>,
    pub on_poweroff: LifecycleAction,
    pub on_reboot: LifecycleAction,
    pub on_crash: LifecycleAction,
    pub acpi: bool,
    pub cpu_mode: Option<String>,
    pub vcpupin: Vec<(u32, CpuSet)>,
    pub emulatorpin: Option<CpuSet>,
    pub hugepages: bool,
    pub nosharepages: bool,
    /// `<memoryBacking><source type='memfd'/>`.
    pub memfd: bool,
    /// `<memoryBacking><access mode='shared'/>`.
    pub shared_memory: bool,
    /// `<memoryBacking><source type='file'/>` (not applied: warned).
    pub file_backed_memory: bool,
    pub disks: Vec<Disk>,
    pub interfaces: Vec<Interface>,
    pub serials: usize,
    pub consoles: usize,
    pub graphics: Vec<Graphics>,
    /// `<memballoon model=...>` as written; absent means libvirt's default, a virtio balloon.
    pub memballoon: Option<String>,
    /// `<memballoon autodeflate='on'>`.
    pub balloon_autodeflate: bool,
    /// `<memballoon freePageReporting='on'>`.
    pub balloon_free_page_reporting: bool,
    /// `<memballoon><stats period='N'/>`.
    pub balloon_stats_period: Option<u32>,
    pub rng: Option<String>,
}

impl DomainDef {
    /// Whether the guest gets a virtio balloon: unless `<memballoon model='none'/>` (libvirt
    /// adds a virtio balloon to KVM guests that do not say).
    pub fn has_balloon(&self) -> bool {
        self.memballoon.as_deref() != Some("none")
    }
}

/// A parsed definition: the full tree (source of truth for dumpxml), the typed view, and the
/// warnings about parts that are kept but ignored.
#[derive(Debug, Clone)]
pub struct Domain {
    pub tree: Element,
    pub def: DomainDef,
    pub warnings: Vec<String>,
}

/// Scales a libvirt memory value with its `unit` attribute to KiB (libvirt's default unit),
/// rounding up as libvirt does.
pub fn memory_to_kib(value: u64, unit: &str) -> Option<u64> {
    // Case-insensitive like libvirt's scaled integers: "KB" is 1000, "k"/"KiB" is 1024.
    let bytes_per: u128 = match unit.to_ascii_lowercase().as_str() {
        "b" | "bytes" => 1,
        "kb" => 1000,
        "k" | "kib" => 1 << 10,
        "mb" => 1_000_000,
        "m" | "mib" => 1 << 20,
        "gb" => 1_000_000_000,
        "g" | "gib" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "t" | "tib" => 1 << 40,
        "pb" => 1_000_000_000_000_000,
        "p" | "pib" => 1 << 50,
        "eb" => 1_000_000_000_000_000_000,
        "e" | "eib" => 1 << 60,
        _ => return None,
    };
    let bytes = value as u128 * bytes_per;
    u64::try_from(bytes.div_ceil(1024)).ok()
}

fn memory(el: &Element) -> Result<u64, DomainXmlError> {
    let text = el.text();
    let value: u64 = text
        .parse()
        .map_err(|_| invalid(el, format!("<{}> value '{text}' is not a number", el.name)))?;
    let unit = el.attr("unit").unwrap_or("KiB");
    let kib = memory_to_kib(value, unit).ok_or_else(|| {
        invalid(
            el,
            format!(
                "<{}> has unknown unit '{unit}' (use KiB, MiB, GiB, ...)",
                el.name
            ),
        )
    })?;
    if kib == 0 {
        return Err(invalid(el, format!("<{}> must be above zero", el.name)));
    }
    Ok(kib)
}

fn number<T: std::str::FromStr>(el: &Element, what: &str, text: &str) -> Result<T, DomainXmlError> {
    text.trim().parse().map_err(|_| {
        invalid(
            el,
            format!("{what} '{text}' in <{}> is not a valid number", el.name),
        )
    })
}

fn cpuset(el: &Element, text: &str) -> Result<CpuSet, DomainXmlError> {
    CpuSet::parse(text).map_err(|e| invalid(el, format!("<{}>: {e}", el.name)))
}

/// Element paths (below `<domain>`) that rvirt reads and acts on.
const SUPPORTED: &[&str] = &[
    "name",
    "uuid",
    "memory",
    "currentMemory",
    "vcpu",
    "os",
    "os/type",
    "os/kernel",
    "os/initrd",
    "os/cmdline",
    "os/boot",
    "os/loader",
    "os/nvram",
    "os/firmware",
    "os/firmware/feature",
    "os/bootmenu",
    "on_poweroff",
    "on_reboot",
    "on_crash",
    "features",
    "features/acpi",
    "cpu",
    "cputune",
    "cputune/vcpupin",
    "cputune/emulatorpin",
    "memoryBacking",
    "memoryBacking/hugepages",
    "memoryBacking/nosharepages",
    "memoryBacking/source",
    "memoryBacking/access",
    "devices",
    "devices/disk",
    "devices/disk/driver",
    "devices/disk/source",
    "devices/disk/target",
    "devices/disk/readonly",
    "devices/disk/serial",
    "devices/disk/boot",
    "devices/controller",
    "devices/interface",
    "devices/interface/source",
    "devices/interface/mac",
    "devices/interface/model",
    "devices/interface/target",
    "devices/serial",
    "devices/serial/target",
    "devices/console",
    "devices/console/target",
    "devices/graphics",
    "devices/graphics/listen",
    "devices/memballoon",
    "devices/memballoon/stats",
    "devices/rng",
    "devices/rng/backend",
];

/// Paths that carry no behaviour for rvirt (descriptions, host-side details that have no
/// equivalent in a one-process-per-VM design): kept on dumpxml, not warned about. A trailing `*`
/// covers the whole subtree.
const QUIET: &[&str] = &[
    "title",
    "description",
    "metadata*",
    "clock*",
    "pm*",
    "resource*",
    "seclabel*",
    "devices/emulator",
    "devices/controller/model",
    "devices/controller/target",
    "devices/input*",
    "devices/video*",
    "*address",
    "*alias",
    "features/apic",
    "features/pae",
    "features/vmport",
    "cpu/topology",
    "cpu/model",
    "cpu/feature",
    "devices/interface/boot",
    "devices/serial/target/model",
    "devices/serial/source",
    "devices/console/source",
    "devices/disk/backingStore*",
];

fn is_quiet(path: &str) -> bool {
    QUIET.iter().any(|q| {
        if let Some(tail) = q.strip_prefix('*') {
            path == tail || path.ends_with(&format!("/{tail}"))
        } else if let Some(head) = q.strip_suffix('*') {
            path == head || path.starts_with(&format!("{head}/"))
        } else {
            path == *q
        }
    })
}

fn collect_unknown(el: &Element, prefix: &str, seen: &mut BTreeSet<String>, out: &mut Vec<String>) {
    for child in el.elements() {
        let path = if prefix.is_empty() {
            child.name.clone()
        } else {
            format!("{prefix}/{}", child.name)
        };
        if is_quiet(&path) {
            continue;
        }
        if !SUPPORTED.contains(&path.as_str()) {
            if seen.insert(path.clone()) {
                out.push(format!(
                    "element <{path}> (first at {}) is not used by rvirt; it is kept as written",
                    child.position
                ));
            }
            continue;
        }
        collect_unknown(child, &path, seen, out);
    }
}

impl Domain {
    pub fn parse(xml: &str) -> Result<Domain, DomainXmlError> {
        let tree = Element::parse(xml)?;
        Domain::from_tree(tree)
    }

    pub fn from_tree(tree: Element) -> Result<Domain, DomainXmlError> {
        let def = read_domain(&tree)?;
        let mut warnings = Vec::new();
        collect_unknown(&tree, "", &mut BTreeSet::new(), &mut warnings);
        warnings.extend(not_applied(&def));
        Ok(Domain {
            tree,
            def,
            warnings,
        })
    }

    pub fn to_xml(&self) -> String {
        self.tree.to_xml()
    }

    /// Sets `<uuid>` (placed after `<name>` as libvirt writes it).
    pub fn set_uuid(&mut self, uuid: &str) {
        match self.tree.child_mut("uuid") {
            Some(el) => el.set_text(uuid),
            None => self
                .tree
                .insert_after(&["name"], Element::new("uuid").with_text(uuid)),
        }
        self.def.uuid = Some(uuid.to_string());
    }

    /// Completes a UEFI `<os>` as libvirt does at define time: the OVMF code image as
    /// `<loader readonly='yes' type='pflash'>` and a per-domain `<nvram template=...>` path
    /// (`nvram_path`) when the definition gives none. A BIOS `<os>` is left as written.
    pub fn fill_firmware(&mut self, nvram_path: &std::path::Path) {
        let Some(fw) = self.def.firmware.as_mut() else {
            return;
        };
        if fw.kind != "efi" {
            return;
        }
        let Some(os) = self.tree.child_mut("os") else {
            return;
        };
        if fw.loader.is_none() {
            let code = crate::firmware::OVMF_CODE.to_string();
            os.remove_children("loader");
            os.insert_after(
                &["type"],
                Element::new("loader")
                    .with_attr("readonly", "yes")
                    .with_attr("type", "pflash")
                    .with_text(&code),
            );
            fw.loader = Some(code);
        }
        if fw.nvram.is_none() {
            let path = nvram_path.display().to_string();
            let template = fw
                .nvram_template
                .clone()
                .unwrap_or_else(|| crate::firmware::OVMF_VARS.to_string());
            os.remove_children("nvram");
            os.insert_after(
                &["loader"],
                Element::new("nvram")
                    .with_attr("template", &template)
                    .with_text(&path),
            );
            fw.nvram = Some(path);
            fw.nvram_template = Some(template);
        }
    }

    /// Gives every interface without `<mac>` one from `next_mac`.
    pub fn fill_macs(&mut self, mut next_mac: impl FnMut() -> String) {
        let Some(devices) = self.tree.child_mut("devices") else {
            return;
        };
        for (i, iface) in devices
            .elements_mut()
            .filter(|e| e.name == "interface")
            .enumerate()
        {
            if iface.child("mac").and_then(|m| m.attr("address")).is_none() {
                let mac = next_mac();
                iface.remove_children("mac");
                iface.insert_after(&["source"], Element::new("mac").with_attr("address", &mac));
                if let Some(def) = self.def.interfaces.get_mut(i) {
                    def.mac = Some(mac);
                }
            }
        }
    }

    /// Replaces the `<cputune>` pinning with `vcpupin`/`emulatorpin` (virsh vcpupin --config).
    pub fn set_vcpupin(&mut self, vcpu: u32, cpus: &CpuSet) -> Result<(), DomainXmlError> {
        let cputune = self.tree.child_or_insert("cputune");
        let v = vcpu.to_string();
        let existing = cputune
            .elements_mut()
            .find(|e| e.name == "vcpupin" && e.attr("vcpu") == Some(v.as_str()));
        if let Some(pin) = existing {
            pin.set_attr("cpuset", &cpus.to_string());
        } else {
            cputune.children.push(super::tree::Node::Element(
                Element::new("vcpupin")
                    .with_attr("vcpu", &v)
                    .with_attr("cpuset", &cpus.to_string()),
            ));
        }
        self.def = read_domain(&self.tree)?;
        Ok(())
    }

    /// Reads the typed view again after the tree was edited (hotplug, setmem, setvcpus).
    pub fn reparse(&mut self) -> Result<(), DomainXmlError> {
        self.def = read_domain(&self.tree)?;
        Ok(())
    }

    pub fn set_emulatorpin(&mut self, cpus: &CpuSet) -> Result<(), DomainXmlError> {
        let cputune = self.tree.child_or_insert("cputune");
        cputune
            .child_or_insert("emulatorpin")
            .set_attr("cpuset", &cpus.to_string());
        self.def = read_domain(&self.tree)?;
        Ok(())
    }
}

fn read_domain(root: &Element) -> Result<DomainDef, DomainXmlError> {
    if root.name != "domain" {
        return Err(invalid(
            root,
            format!(
                "the root element is <{}>; a domain definition starts with <domain>",
                root.name
            ),
        ));
    }
    let domain_type = root
        .attr("type")
        .ok_or_else(|| invalid(root, "<domain> needs a type attribute (type='kvm')"))?
        .to_string();
    if domain_type != "kvm" {
        return Err(unsupported(
            root,
            format!("<domain type='{domain_type}'>: rvirt runs only type='kvm' domains"),
        ));
    }
    let name_el = root
        .child("name")
        .ok_or_else(|| invalid(root, "<domain> has no <name>"))?;
    let name = name_el.text();
    validate_name(&name).map_err(|m| invalid(name_el, m))?;
    let uuid = match root.child("uuid") {
        Some(el) => {
            let text = el.text();
            let parsed = uuid::Uuid::parse_str(&text)
                .map_err(|_| invalid(el, format!("<uuid> '{text}' is not a UUID")))?;
            Some(parsed.hyphenated().to_string())
        }
        None => None,
    };
    let mem_el = root
        .child("memory")
        .or_else(|| root.child("currentMemory"))
        .ok_or_else(|| invalid(root, "<domain> has no <memory>"))?;
    let memory_kib = memory(mem_el)?;
    let current_memory_kib = match root.child("currentMemory") {
        Some(el) => {
            let cur = memory(el)?;
            if cur > memory_kib {
                return Err(invalid(el, "<currentMemory> is larger than <memory>"));
            }
            cur
        }
        None => memory_kib,
    };
    let (vcpus, vcpus_current, vcpu_placement, vcpu_cpuset) = match root.child("vcpu") {
        Some(el) => {
            let n: u32 = number(el, "vCPU count", &el.text())?;
            if n == 0 || n > 255 {
                return Err(invalid(el, format!("<vcpu> {n} is out of range 1-255")));
            }
            let cur = match el.attr("current") {
                Some(c) => number(el, "current", c)?,
                None => n,
            };
            if cur == 0 || cur > n {
                return Err(invalid(el, format!("<vcpu current='{cur}'> must be 1-{n}")));
            }
            let placement = el.attr("placement").unwrap_or("static").to_string();
            if placement != "static" && placement != "auto" {
                return Err(invalid(
                    el,
                    format!("<vcpu placement='{placement}'> must be static or auto"),
                ));
            }
            let set = el.attr("cpuset").map(|s| cpuset(el, s)).transpose()?;
            (n, cur, placement, set)
        }
        None => (1, 1, "static".to_string(), None),
    };
    let (vcpus_current, vcpus_fixed) = match root.child("vcpus") {
        Some(el) => read_vcpus(
            el,
            vcpus,
            root.child("vcpu")
                .and_then(|v| v.attr("current"))
                .map(|_| vcpus_current),
        )?,
        None => (vcpus_current, Vec::new()),
    };
    let os = root
        .child("os")
        .ok_or_else(|| invalid(root, "<domain> has no <os>"))?;
    let firmware = read_firmware(os)?;
    let type_el = os
        .child("type")
        .ok_or_else(|| invalid(os, "<os> has no <type>hvm</type>"))?;
    let os_type = type_el.text();
    if os_type != "hvm" {
        return Err(unsupported(
            type_el,
            format!("<os><type>{os_type}</type>: only hvm is supported"),
        ));
    }
    if let Some(arch) = type_el.attr("arch") {
        if arch != "x86_64" {
            return Err(unsupported(
                type_el,
                format!("<type arch='{arch}'>: only x86_64 is supported"),
            ));
        }
    }
    let text_of = |el: &Element, n: &str| el.child(n).map(|c| c.text()).filter(|t| !t.is_empty());
    let on = |n: &str, d| match root.child(n) {
        Some(el) => LifecycleAction::parse(el, d),
        None => Ok(d),
    };
    let mut vcpupin = Vec::new();
    let mut emulatorpin = None;
    if let Some(ct) = root.child("cputune") {
        for pin in ct.children_named("vcpupin") {
            let v: u32 = number(pin, "vcpu", pin.attr("vcpu").unwrap_or(""))?;
            if v >= vcpus {
                return Err(invalid(
                    pin,
                    format!("<vcpupin vcpu='{v}'>: the domain has vCPUs 0-{}", vcpus - 1),
                ));
            }
            let set = cpuset(pin, pin.attr("cpuset").unwrap_or(""))?;
            vcpupin.push((v, set));
        }
        if let Some(pin) = ct.child("emulatorpin") {
            emulatorpin = Some(cpuset(pin, pin.attr("cpuset").unwrap_or(""))?);
        }
    }
    let mb = root.child("memoryBacking");
    if let Some(hp) = mb.and_then(|m| m.child("hugepages")) {
        if hp.child("page").is_some() {
            return Err(unsupported(
                hp,
                "<hugepages><page> (explicit page sizes/nodes) is not supported; use <hugepages/>",
            ));
        }
    }
    let mut memfd = false;
    let mut file_backed_memory = false;
    if let Some(src) = mb.and_then(|m| m.child("source")) {
        match src.attr("type").unwrap_or("anonymous") {
            "memfd" => memfd = true,
            "anonymous" => {}
            "file" => file_backed_memory = true,
            other => {
                return Err(invalid(
                    src,
                    format!("<memoryBacking><source type='{other}'>: use anonymous, memfd or file"),
                ))
            }
        }
    }
    let shared_memory = match mb.and_then(|m| m.child("access")) {
        Some(acc) => match acc.attr("mode").unwrap_or("private") {
            "shared" => true,
            "private" => false,
            other => {
                return Err(invalid(
                    acc,
                    format!("<memoryBacking><access mode='{other}'>: use shared or private"),
                ))
            }
        },
        None => false,
    };
    let (disks, interfaces, extras) = match root.child("devices") {
        Some(d) => read_devices(d)?,
        None => Default::default(),
    };
    let mut boot_devs = Vec::new();
    for b in os.children_named("boot") {
        let dev = b
            .attr("dev")
            .ok_or_else(|| invalid(b, "<boot> needs dev='hd', 'cdrom' or 'network'"))?;
        if !["hd", "cdrom", "network", "fd"].contains(&dev) {
            return Err(invalid(
                b,
                format!("<boot dev='{dev}'>: use hd, cdrom, network or fd"),
            ));
        }
        if dev == "fd" {
            return Err(unsupported(b, "<boot dev='fd'>: rvirt has no floppy drive"));
        }
        boot_devs.push(dev.to_string());
    }
    if !boot_devs.is_empty() {
        if let Some(d) = disks.iter().find(|d| d.boot_order.is_some()) {
            // libvirt's own rule and words.
            return Err(unsupported(
                os,
                format!(
                    "per-device boot elements cannot be used together with os/boot elements \
                     (disk {} has <boot order>); keep one of them",
                    d.target
                ),
            ));
        }
    }
    let mut orders = BTreeSet::new();
    for d in &disks {
        if let Some(o) = d.boot_order {
            if !orders.insert(o) {
                return Err(invalid(
                    os,
                    format!(
                        "boot order '{o}' used for more than one device (disk {})",
                        d.target
                    ),
                ));
            }
        }
    }
    let kernel = text_of(os, "kernel");
    if kernel.is_some() {
        if let Some(fw) = &firmware {
            if fw.loader.is_some() || fw.nvram.is_some() {
                return Err(unsupported(
                    os,
                    "<kernel> with a <loader>/<nvram>: rvirt boots a kernel directly or firmware, \
                     not both; drop <kernel> to boot the firmware",
                ));
            }
        }
    }
    let boot_menu_ms = match os.child("bootmenu") {
        Some(m) if m.attr("enable") == Some("yes") => Some(match m.attr("timeout") {
            Some(t) => {
                let ms: u32 = number(m, "timeout", t)?;
                if ms > 65535 {
                    return Err(invalid(
                        m,
                        format!("<bootmenu timeout='{ms}'>: the most is 65535 ms"),
                    ));
                }
                ms
            }
            None => 0,
        }),
        _ => None,
    };
    Ok(DomainDef {
        domain_type,
        name,
        uuid,
        memory_kib,
        current_memory_kib,
        vcpus,
        vcpus_current,
        vcpus_fixed,
        vcpu_placement,
        vcpu_cpuset,
        os_type,
        arch: type_el.attr("arch").map(str::to_string),
        kernel,
        initrd: text_of(os, "initrd"),
        cmdline: text_of(os, "cmdline"),
        boot: boot_devs.clone(),
        firmware,
        boot_menu_ms,
        on_poweroff: on("on_poweroff", LifecycleAction::Destroy)?,
        on_reboot: on("on_reboot", LifecycleAction::Restart)?,
        on_crash: on("on_crash", LifecycleAction::Destroy)?,
        acpi: root
            .child("features")
            .is_some_and(|f| f.child("acpi").is_some()),
        cpu_mode: root
            .child("cpu")
            .and_then(|c| c.attr("mode"))
            .map(str::to_string),
        vcpupin,
        emulatorpin,
        hugepages: mb.is_some_and(|m| m.child("hugepages").is_some()),
        nosharepages: mb.is_some_and(|m| m.child("nosharepages").is_some()),
        memfd,
        shared_memory,
        file_backed_memory,
        disks,
        interfaces,
        serials: extras.serials,
        consoles: extras.consoles,
        graphics: extras.graphics,
        memballoon: extras.memballoon,
        balloon_autodeflate: extras.balloon_autodeflate,
        balloon_free_page_reporting: extras.balloon_free_page_reporting,
        balloon_stats_period: extras.balloon_stats_period,
        rng: extras.rng,
    })
}

/// `<os firmware='efi|bios'>`, `<loader readonly='yes' type='pflash|rom'>PATH</loader>`,
/// `<nvram template='PATH'>PATH</nvram>`. None when the `<os>` names no firmware (a kernel
/// boot, or SeaBIOS by default when there is no kernel either).
fn read_firmware(os: &Element) -> Result<Option<Firmware>, DomainXmlError> {
    let loader = os.child("loader");
    let nvram = os.child("nvram");
    let mut kind = match os.attr("firmware") {
        None => None,
        Some(k @ ("efi" | "bios")) => Some(k.to_string()),
        Some(k) => return Err(invalid(os, format!("<os firmware='{k}'>: use efi or bios"))),
    };
    if let Some(f) = os.child("firmware") {
        // Feature requests (secure-boot, enrolled-keys): rvirt's OVMF pair has neither.
        for feat in f.children_named("feature") {
            if feat.attr("enabled") == Some("yes") {
                return Err(unsupported(
                    feat,
                    format!(
                        "<firmware><feature name='{}' enabled='yes'>: rvirt uses the OVMF image \
                         without Secure Boot/SMM; remove the feature",
                        feat.attr("name").unwrap_or("")
                    ),
                ));
            }
        }
    }
    let loader_path = match loader {
        Some(l) => {
            if let Some(t) = l.attr("type") {
                if t != "pflash" && t != "rom" {
                    return Err(invalid(
                        l,
                        format!("<loader type='{t}'>: use pflash or rom"),
                    ));
                }
            }
            if l.attr("secure") == Some("yes") {
                return Err(unsupported(
                    l,
                    "<loader secure='yes'> needs an SMM firmware build, which rvirt does not run; \
                     use the non-secure OVMF_CODE_4M.fd",
                ));
            }
            let p = l.text();
            if p.is_empty() {
                None
            } else {
                if !p.starts_with('/') {
                    return Err(invalid(
                        l,
                        format!("<loader> '{p}' must be an absolute path"),
                    ));
                }
                // A pflash loader with an NVRAM is EFI; a ROM (bios-256k.bin) is BIOS.
                if kind.is_none() {
                    let rom = l.attr("type") == Some("rom")
                        || (l.attr("type").is_none() && nvram.is_none() && !p.contains("OVMF"));
                    kind = Some(if rom { "bios" } else { "efi" }.to_string());
                }
                Some(p)
            }
        }
        None => None,
    };
    let (nvram_path, template) = match nvram {
        Some(n) => {
            let p = Some(n.text()).filter(|t| !t.is_empty());
            let t = n.attr("template").map(str::to_string);
            for v in p.iter().chain(t.iter()) {
                if !v.starts_with('/') {
                    return Err(invalid(n, format!("<nvram> path '{v}' must be absolute")));
                }
            }
            if kind.as_deref() == Some("bios") {
                return Err(unsupported(
                    n,
                    "<nvram> is for UEFI firmware; a BIOS has no variable store",
                ));
            }
            kind.get_or_insert_with(|| "efi".to_string());
            (p, t)
        }
        None => (None, None),
    };
    Ok(kind.map(|kind| Firmware {
        kind,
        loader: loader_path,
        nvram: nvram_path,
        nvram_template: template,
    }))
}

/// `<vcpus>`: one `<vcpu id enabled hotpluggable order/>` per possible vCPU, as libvirt writes
/// them. rvirt-vmm boots vCPUs 0..current-1 and hot-adds the next ids in turn, so the enabled
/// ones must be the first ids and `order`, when given, must follow the ids. Returns the current
/// count (the enabled ones; it must agree with `<vcpu current>` when that is given) and the
/// enabled vCPUs that are not hotpluggable.
fn read_vcpus(
    el: &Element,
    max: u32,
    current: Option<u32>,
) -> Result<(u32, Vec<u32>), DomainXmlError> {
    let mut seen = vec![false; max as usize];
    let mut enabled = Vec::new();
    let mut fixed = Vec::new();
    for v in el.children_named("vcpu") {
        let id: u32 = number(
            v,
            "id",
            v.attr("id")
                .ok_or_else(|| invalid(v, "<vcpus><vcpu> needs an id"))?,
        )?;
        if id >= max {
            return Err(invalid(
                v,
                format!(
                    "<vcpus><vcpu id='{id}'>: the domain has vCPUs 0-{} (<vcpu>{max}</vcpu>)",
                    max - 1
                ),
            ));
        }
        if std::mem::replace(&mut seen[id as usize], true) {
            return Err(invalid(
                v,
                format!("<vcpus><vcpu id='{id}'> is listed twice"),
            ));
        }
        let yes_no = |attr: &str, default: bool| match v.attr(attr) {
            None => Ok(default),
            Some("yes") => Ok(true),
            Some("no") => Ok(false),
            Some(o) => Err(invalid(
                v,
                format!("<vcpus><vcpu id='{id}' {attr}='{o}'>: use yes or no"),
            )),
        };
        let on = yes_no("enabled", true)?;
        let hotpluggable = yes_no("hotpluggable", id != 0)?;
        if id == 0 && (!on || hotpluggable) {
            return Err(invalid(v, "<vcpus><vcpu id='0'> must be enabled='yes' hotpluggable='no': the boot vCPU cannot be unplugged"));
        }
        if !on && !hotpluggable {
            return Err(invalid(v, format!("<vcpus><vcpu id='{id}'> is both disabled and not hotpluggable, so it could never run; make it hotpluggable='yes' or enabled='yes'")));
        }
        if let Some(o) = v.attr("order") {
            let o: u32 = number(v, "order", o)?;
            if o != id + 1 {
                return Err(unsupported(v, format!("<vcpus><vcpu id='{id}' order='{o}'>: rvirt brings vCPUs online in id order (order='{}'); drop order= or use that", id + 1)));
            }
        }
        if on {
            enabled.push(id);
            if !hotpluggable && id != 0 {
                fixed.push(id);
            }
        }
    }
    if let Some(missing) = seen.iter().position(|s| !s) {
        return Err(invalid(
            el,
            format!(
                "<vcpus> does not list vCPU {missing}; list every vCPU 0-{} of <vcpu>{max}</vcpu>",
                max - 1
            ),
        ));
    }
    enabled.sort_unstable();
    let n = enabled.len() as u32;
    if enabled.iter().enumerate().any(|(i, &id)| id != i as u32) {
        return Err(unsupported(el, format!("<vcpus>: enabled vCPUs {enabled:?} are not the first {n} ids; rvirt boots vCPUs 0-{} and hot-adds the next ids in turn", n.saturating_sub(1))));
    }
    if let Some(c) = current {
        if c != n {
            return Err(invalid(
                el,
                format!("<vcpu current='{c}'> does not match the {n} enabled vCPUs in <vcpus>"),
            ));
        }
    }
    Ok((n, fixed))
}

/// Settings that are read and kept but that rvirt-vmm cannot apply: said once at define time,
/// so nobody believes the guest has them.
fn not_applied(def: &DomainDef) -> Vec<String> {
    let mut w = Vec::new();
    if def.file_backed_memory {
        w.push(
            "<memoryBacking><source type='file'/> is kept but not applied: rvirt-vmm backs guest \
             RAM with anonymous memory (or memfd with <source type='memfd'/>)"
                .to_string(),
        );
    }
    if def.kernel.is_none() && def.boot.iter().any(|b| b == "network") {
        w.push(
            "<boot dev='network'/> is kept but not applied: rvirt's NICs have no PXE boot ROM; \
             boot from a disk or CD-ROM"
                .to_string(),
        );
    }
    if !def.has_balloon() && def.current_memory_kib < def.memory_kib {
        w.push(format!(
            "<currentMemory> {} KiB is below <memory> {} KiB but <memballoon model='none'/> gives \
             no balloon to hold the difference: the guest gets {} KiB of RAM",
            def.current_memory_kib, def.memory_kib, def.current_memory_kib
        ));
    }
    w
}

/// Domain names become file names and appear in URLs: keep them to a safe set.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("<name> is empty".into());
    }
    if name.len() > 200 {
        return Err("<name> is longer than 200 characters".into());
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!(
            "domain name '{name}' must not start with '.' or '-'"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+')))
    {
        return Err(format!(
            "domain name '{name}' contains '{c}'; use letters, digits, '-', '_', '.', '+'"
        ));
    }
    Ok(())
}

#[derive(Default)]
struct Extras {
    serials: usize,
    consoles: usize,
    graphics: Vec<Graphics>,
    memballoon: Option<String>,
    balloon_autodeflate: bool,
    balloon_free_page_reporting: bool,
    balloon_stats_period: Option<u32>,
    rng: Option<String>,
}

/// Devices that would change guest-visible behaviour if silently ignored.
const REFUSED_DEVICES: &[&str] = &[
    "hostdev",
    "filesystem",
    "smartcard",
    "redirdev",
    "shmem",
    "tpm",
    "vsock",
    "iommu",
    "watchdog",
    "sound",
    "parallel",
    "hub",
    "lease",
];

fn read_devices(devices: &Element) -> Result<(Vec<Disk>, Vec<Interface>, Extras), DomainXmlError> {
    let mut disks = Vec::new();
    let mut interfaces = Vec::new();
    let mut extras = Extras::default();
    for dev in devices.elements() {
        match dev.name.as_str() {
            "disk" => {
                let d = read_disk(dev)?;
                if let Some(o) = disks.iter().find(|o: &&Disk| o.target == d.target) {
                    return Err(invalid(
                        dev,
                        format!(
                            "target '{}' duplicated for disk sources '{}' and '{}'",
                            d.target,
                            o.source_or_dash(),
                            d.source_or_dash()
                        ),
                    ));
                }
                if let Some(o) = disks
                    .iter()
                    .find(|o: &&Disk| d.unit.is_some() && o.unit == d.unit)
                {
                    return Err(invalid(
                        dev,
                        format!(
                            "disks {} and {} are both at SCSI unit {}; give each its own <address unit>",
                            o.target, d.target, d.unit.unwrap_or(0)
                        ),
                    ));
                }
                disks.push(d)
            }
            "controller" => read_controller(dev)?,
            "interface" => interfaces.push(read_interface(dev, interfaces.len())?),
            "serial" | "console" => {
                let t = dev.attr("type").unwrap_or("pty");
                if t != "pty" {
                    return Err(unsupported(
                        dev,
                        format!("<{} type='{t}'>: only type='pty' is supported", dev.name),
                    ));
                }
                if dev.name == "serial" {
                    extras.serials += 1;
                } else {
                    extras.consoles += 1;
                }
            }
            "graphics" => {
                let t = dev.attr("type").unwrap_or("");
                if t != "vnc" {
                    return Err(unsupported(
                        dev,
                        format!("<graphics type='{t}'>: only vnc is supported"),
                    ));
                }
                let port = dev
                    .attr("port")
                    .map(|p| number(dev, "port", p))
                    .transpose()?;
                let listen = dev
                    .attr("listen")
                    .or_else(|| dev.child("listen").and_then(|l| l.attr("address")))
                    .map(str::to_string);
                extras.graphics.push(Graphics {
                    kind: t.to_string(),
                    port,
                    listen,
                });
            }
            "memballoon" => {
                let m = dev.attr("model").unwrap_or("");
                if m != "virtio" && m != "none" {
                    return Err(unsupported(
                        dev,
                        format!("<memballoon model='{m}'>: use virtio or none"),
                    ));
                }
                extras.memballoon = Some(m.to_string());
                let on_off = |attr: &str| match dev.attr(attr) {
                    None | Some("off") => Ok(false),
                    Some("on") => Ok(true),
                    Some(v) => Err(invalid(
                        dev,
                        format!("<memballoon {attr}='{v}'>: use on or off"),
                    )),
                };
                extras.balloon_autodeflate = on_off("autodeflate")?;
                extras.balloon_free_page_reporting = on_off("freePageReporting")?;
                if let Some(st) = dev.child("stats") {
                    let p = st.attr("period").unwrap_or("0");
                    extras.balloon_stats_period = Some(number(st, "period", p)?);
                }
            }
            "rng" => {
                let m = dev.attr("model").unwrap_or("");
                if m != "virtio" {
                    return Err(unsupported(
                        dev,
                        format!("<rng model='{m}'>: only virtio is supported"),
                    ));
                }
                if let Some(b) = dev.child("backend") {
                    let bm = b.attr("model").unwrap_or("random");
                    if bm != "random" {
                        return Err(unsupported(
                            b,
                            format!("<rng><backend model='{bm}'>: only random is supported"),
                        ));
                    }
                }
                extras.rng = Some(m.to_string());
            }
            name if REFUSED_DEVICES.contains(&name) => {
                return Err(unsupported(
                    dev,
                    format!("<devices><{name}> is not supported by rvirt; remove it"),
                ));
            }
            _ => {}
        }
    }
    let mut aliases = BTreeSet::new();
    let all = disks
        .iter()
        .map(|d| d.alias.as_str())
        .chain(interfaces.iter().map(|i| i.alias.as_str()));
    for alias in all {
        if !aliases.insert(alias) {
            return Err(invalid(
                devices,
                format!(
                    "non unique alias detected: {alias}; give each device its own <alias name=...>"
                ),
            ));
        }
    }
    Ok((disks, interfaces, extras))
}

fn alias_of(dev: &Element) -> Option<String> {
    dev.child("alias")
        .and_then(|a| a.attr("name"))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// libvirt's disk index of a target name (`vda` 0, `vdz` 25, `vdaa` 26), as
/// virDiskNameToIndex computes it.
pub fn disk_index(target: &str) -> Option<u32> {
    let letters = ["vd", "sd", "hd", "xvd", "ubd"]
        .iter()
        .find_map(|p| target.strip_prefix(p))?;
    if letters.is_empty() || !letters.bytes().all(|b| b.is_ascii_lowercase()) {
        return None;
    }
    let mut idx: u32 = 0;
    for (i, b) in letters.bytes().enumerate() {
        if i > 0 {
            idx = idx.checked_add(1)?;
        }
        idx = idx.checked_mul(26)?.checked_add(u32::from(b - b'a'))?;
    }
    Some(idx)
}

/// The characters libvirt allows in a disk `<serial>`.
fn valid_serial_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '+' | '-' | ' ')
}

pub(crate) fn read_disk(dev: &Element) -> Result<Disk, DomainXmlError> {
    let kind = dev.attr("type").unwrap_or("file");
    if kind != "file" && kind != "block" {
        return Err(unsupported(
            dev,
            format!("<disk type='{kind}'>: only file and block disks are supported"),
        ));
    }
    let device = dev.attr("device").unwrap_or("disk");
    if device != "disk" && device != "cdrom" {
        return Err(unsupported(
            dev,
            format!("<disk device='{device}'>: use device='disk' or 'cdrom' (no floppy/lun)"),
        ));
    }
    let cdrom = device == "cdrom";
    let attr = if kind == "file" { "file" } else { "dev" };
    let source = match dev.child("source") {
        Some(el) => match el.attr(attr).filter(|v| !v.is_empty()) {
            Some(v) => Some(v.to_string()),
            None if cdrom => None,
            None => {
                return Err(invalid(
                    el,
                    format!("<source> of a {kind} disk needs the {attr} attribute"),
                ))
            }
        },
        None if cdrom => None,
        None => {
            return Err(invalid(
                dev,
                "<disk> has no <source> (an empty drive is only valid for a cdrom)",
            ))
        }
    };
    let (format, cache) = match dev.child("driver") {
        Some(drv) => {
            let format = match drv.attr("type").unwrap_or("raw") {
                "raw" => DiskFormat::Raw,
                "qcow2" => DiskFormat::Qcow2,
                other => {
                    return Err(unsupported(
                        drv,
                        format!("<driver type='{other}'>: disks must be raw or qcow2"),
                    ))
                }
            };
            let cache = drv.attr("cache").map(str::to_string);
            if let Some(c) = &cache {
                if ![
                    "default",
                    "none",
                    "writethrough",
                    "writeback",
                    "directsync",
                    "unsafe",
                ]
                .contains(&c.as_str())
                {
                    return Err(unsupported(
                        drv,
                        format!(
                            "unknown disk cache mode '{c}' in <driver cache='{c}'>; use default, none, writethrough, writeback, directsync or unsafe"
                        ),
                    ));
                }
            }
            (format, cache)
        }
        None => (DiskFormat::Raw, None),
    };
    let target_el = dev
        .child("target")
        .ok_or_else(|| invalid(dev, "<disk> has no <target dev='vda' bus='virtio'/>"))?;
    let target = target_el
        .attr("dev")
        .ok_or_else(|| invalid(target_el, "<target> needs a dev attribute"))?
        .to_string();
    // Without bus=, libvirt goes by the name: sdX is SCSI, hdX IDE, the rest virtio here.
    let bus = match target_el.attr("bus") {
        Some(b) => b.to_string(),
        None if target.starts_with("sd") => "scsi".into(),
        None if target.starts_with("hd") => "ide".into(),
        None => "virtio".into(),
    };
    match bus.as_str() {
        "virtio" | "scsi" => {}
        "ide" => {
            return Err(unsupported(
                target_el,
                format!(
                    "<target bus='ide'> of disk {target}: IDE controllers are unsupported for \
                     this machine type (q35 has no IDE bus); use <target bus='scsi'/> \
                     (virtio-scsi) instead"
                ),
            ))
        }
        "sata" => {
            return Err(unsupported(
                target_el,
                format!(
                    "<target bus='sata'> of disk {target}: rvirt has no AHCI controller yet; use \
                     <target dev='sdX' bus='scsi'/> (virtio-scsi, which installers and Linux \
                     support)"
                ),
            ))
        }
        other => {
            return Err(unsupported(
                target_el,
                format!("<target bus='{other}'> of disk {target}: use bus='virtio' or 'scsi'"),
            ))
        }
    }
    if cdrom && bus == "virtio" {
        // libvirt's words for the same mistake.
        return Err(unsupported(
            target_el,
            format!(
                "disk type of '{target}' does not support ejectable media: a cdrom needs \
                 <target dev='sdX' bus='scsi'/>"
            ),
        ));
    }
    let index = disk_index(&target);
    let unit = if bus == "scsi" {
        let unit = match dev.child("address") {
            Some(a) if a.attr("type") == Some("drive") => {
                for k in ["controller", "bus", "target"] {
                    let v = a.attr(k).unwrap_or("0");
                    if number::<u32>(a, k, v)? != 0 {
                        return Err(unsupported(
                            a,
                            format!(
                                "<address type='drive' {k}='{v}'> of disk {target}: rvirt has one \
                                 SCSI controller with one bus; give units on controller 0, bus 0, \
                                 target 0"
                            ),
                        ));
                    }
                }
                number::<u32>(a, "unit", a.attr("unit").unwrap_or("0"))?
            }
            Some(a) => {
                return Err(invalid(
                    a,
                    format!(
                        "<address type='{}'> of SCSI disk {target}: use type='drive'",
                        a.attr("type").unwrap_or("")
                    ),
                ))
            }
            None => index.ok_or_else(|| {
                invalid(
                    target_el,
                    format!("<target dev='{target}'>: not a disk name like sda, sdb, ..., sdaa"),
                )
            })?,
        };
        if unit > 255 {
            return Err(unsupported(
                target_el,
                format!("disk {target}: SCSI unit {unit} is beyond 255, the last rvirt offers"),
            ));
        }
        Some(unit as u16)
    } else {
        None
    };
    let boot_order = match dev.child("boot") {
        Some(b) => {
            let o: u32 = number(b, "order", b.attr("order").unwrap_or(""))?;
            if o == 0 {
                return Err(invalid(
                    b,
                    format!("<boot order='0'> of disk {target}: orders start at 1"),
                ));
            }
            Some(o)
        }
        None => None,
    };
    let serial = match dev.child("serial") {
        Some(el) => {
            let s = el.text();
            if let Some(c) = s.chars().find(|c| !valid_serial_char(*c)) {
                return Err(invalid(
                    el,
                    format!("disk serial ({s}) contains invalid characters ('{c}'); use letters, digits, ' ', '_', '.', '+', '-'"),
                ));
            }
            if s.len() > 20 {
                return Err(unsupported(
                    el,
                    format!(
                        "<serial> of disk {target} is {} bytes: virtio-blk serials are at most 20 bytes; shorten it",
                        s.len()
                    ),
                ));
            }
            Some(s).filter(|s| !s.is_empty())
        }
        None => None,
    };
    let alias = match (alias_of(dev), unit) {
        (Some(a), _) => a,
        (None, Some(u)) => format!("scsi0-0-0-{u}"),
        (None, None) => format!(
            "virtio-disk{}",
            index.ok_or_else(|| invalid(
                target_el,
                format!("<target dev='{target}'>: not a disk name like vda, vdb, ..., vdaa")
            ))?
        ),
    };
    Ok(Disk {
        source,
        device: device.to_string(),
        format,
        cache,
        // Optical media are read-only, written or not.
        readonly: cdrom || dev.child("readonly").is_some(),
        target,
        bus,
        serial,
        alias,
        unit,
        boot_order,
    })
}

/// `<controller>`: the virtio-scsi one is what SCSI disks hang off; IDE is refused as libvirt
/// refuses it on q35; the others (pci, usb, sata, virtio-serial) carry no guest-visible setting
/// rvirt applies and are kept as written.
fn read_controller(dev: &Element) -> Result<(), DomainXmlError> {
    match dev.attr("type").unwrap_or("") {
        "scsi" => {
            let model = dev.attr("model").unwrap_or("virtio-scsi");
            if model != "virtio-scsi" {
                return Err(unsupported(
                    dev,
                    format!(
                        "<controller type='scsi' model='{model}'>: rvirt's SCSI controller is \
                         virtio-scsi; use model='virtio-scsi'"
                    ),
                ));
            }
            let index = dev.attr("index").unwrap_or("0");
            if number::<u32>(dev, "index", index)? != 0 {
                return Err(unsupported(
                    dev,
                    format!("<controller type='scsi' index='{index}'>: rvirt has one SCSI controller (index 0)"),
                ));
            }
            Ok(())
        }
        "ide" => Err(unsupported(
            dev,
            "IDE controllers are unsupported for this machine type (q35); use a virtio-scsi \
             controller",
        )),
        _ => Ok(()),
    }
}

pub fn validate_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 0)
}

pub(crate) fn read_interface(dev: &Element, index: usize) -> Result<Interface, DomainXmlError> {
    let kind = dev.attr("type").unwrap_or("");
    let source_el = dev.child("source");
    let source = match kind {
        "network" => InterfaceSource::Network(
            source_el
                .and_then(|s| s.attr("network"))
                .ok_or_else(|| {
                    invalid(
                        dev,
                        "<interface type='network'> needs <source network='NAME'/>",
                    )
                })?
                .to_string(),
        ),
        "bridge" => InterfaceSource::Bridge(
            source_el
                .and_then(|s| s.attr("bridge"))
                .ok_or_else(|| {
                    invalid(
                        dev,
                        "<interface type='bridge'> needs <source bridge='BRIDGE'/>",
                    )
                })?
                .to_string(),
        ),
        other => {
            return Err(unsupported(
                dev,
                format!(
                    "<interface type='{other}'>: only network and bridge interfaces are supported"
                ),
            ))
        }
    };
    let mac = match dev.child("mac") {
        Some(m) => {
            let a = m.attr("address").unwrap_or("");
            if !validate_mac(a) {
                return Err(invalid(
                    m,
                    format!("<mac address='{a}'> is not a unicast MAC address"),
                ));
            }
            Some(a.to_ascii_lowercase())
        }
        None => None,
    };
    let model = dev
        .child("model")
        .and_then(|m| m.attr("type"))
        .unwrap_or("virtio")
        .to_string();
    if model != "virtio" {
        let el = dev.child("model").unwrap_or(dev);
        return Err(unsupported(
            el,
            format!("<model type='{model}'>: only virtio network cards are supported"),
        ));
    }
    Ok(Interface {
        source,
        mac,
        model,
        target: dev
            .child("target")
            .and_then(|t| t.attr("dev"))
            .map(str::to_string),
        alias: alias_of(dev).unwrap_or_else(|| format!("net{index}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_units_follow_libvirt() {
        assert_eq!(memory_to_kib(1, "GiB"), Some(1 << 20));
        assert_eq!(memory_to_kib(1, "G"), Some(1 << 20));
        assert_eq!(memory_to_kib(1, "GB"), Some(976_563));
        assert_eq!(memory_to_kib(524288, "KiB"), Some(524288));
        assert_eq!(memory_to_kib(1500, "b"), Some(2));
        assert_eq!(memory_to_kib(2, "m"), Some(2048));
        assert_eq!(
            memory_to_kib(1, "kb"),
            Some(1),
            "1000 bytes round up to 1 KiB"
        );
        assert_eq!(memory_to_kib(1, "furlongs"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_name("web-01.example_2").is_ok());
        for bad in ["", "a/b", "../x", "-x", "a b", "é"] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn macs_are_checked() {
        assert!(validate_mac("52:54:00:ab:CD:01"));
        assert!(!validate_mac("53:54:00:ab:cd:01"), "multicast bit");
        assert!(!validate_mac("52:54:00:ab:cd"));
    }

    /// libvirt's `<vcpus>` list: the enabled vCPUs give the current count, hotpluggable='no'
    /// keeps one online; what rvirt cannot do (gaps, reordering) is refused with the fix.
    #[test]
    fn vcpus_list_is_honoured_or_refused() {
        let v = |list: &str, current: &str| {
            dom(
                "",
                &format!("<vcpu placement='static'{current}>3</vcpu><vcpus>{list}</vcpus>"),
            )
            .map(|d| (d.def.vcpus, d.def.vcpus_current, d.def.vcpus_fixed))
            .map_err(|e| e.to_string())
        };
        let ok = "<vcpu id='0' enabled='yes' hotpluggable='no' order='1'/>\
                  <vcpu id='1' enabled='yes' hotpluggable='no' order='2'/>\
                  <vcpu id='2' enabled='no' hotpluggable='yes'/>";
        assert_eq!(v(ok, ""), Ok((3, 2, vec![1])));
        assert_eq!(v(ok, " current='2'"), Ok((3, 2, vec![1])));
        let err = v(ok, " current='1'").unwrap_err();
        assert!(
            err.contains("current='1'> does not match the 2 enabled"),
            "{err}"
        );
        let gap = "<vcpu id='0'/><vcpu id='1' enabled='no'/><vcpu id='2'/>";
        let err = v(gap, "").unwrap_err();
        assert!(
            err.contains("unsupported") && err.contains("not the first 2 ids"),
            "{err}"
        );
        let err = v("<vcpu id='0'/><vcpu id='1'/>", "").unwrap_err();
        assert!(err.contains("does not list vCPU 2"), "{err}");
        let err = v("<vcpu id='0'/><vcpu id='1'/><vcpu id='1'/>", "").unwrap_err();
        assert!(err.contains("id='1'> is listed twice"), "{err}");
        let err = v(
            "<vcpu id='0' hotpluggable='yes'/><vcpu id='1'/><vcpu id='2'/>",
            "",
        )
        .unwrap_err();
        assert!(
            err.contains("id='0'> must be enabled='yes' hotpluggable='no'"),
            "{err}"
        );
        let err = v(
            "<vcpu id='0'/><vcpu id='1'/><vcpu id='2' enabled='no' hotpluggable='no'/>",
            "",
        )
        .unwrap_err();
        assert!(err.contains("both disabled and not hotpluggable"), "{err}");
        let err = v(
            "<vcpu id='0'/><vcpu id='1' order='3'/><vcpu id='2' order='2'/>",
            "",
        )
        .unwrap_err();
        assert!(
            err.contains("order='3'>: rvirt brings vCPUs online in id order"),
            "{err}"
        );
        let err = v("<vcpu id='0'/><vcpu id='1'/><vcpu id='5'/>", "").unwrap_err();
        assert!(err.contains("id='5'>: the domain has vCPUs 0-2"), "{err}");
        // Listed out of order is fine.
        assert_eq!(
            v(
                "<vcpu id='2' enabled='no'/><vcpu id='0'/><vcpu id='1'/>",
                ""
            ),
            Ok((3, 2, vec![]))
        );
    }

    fn dom(devices: &str, extra: &str) -> Result<Domain, DomainXmlError> {
        Domain::parse(&format!(
            "<domain type='kvm'><name>t</name><memory unit='MiB'>512</memory>{extra}\
             <os><type>hvm</type><kernel>/k</kernel></os><devices>{devices}</devices></domain>"
        ))
    }

    fn disk(target: &str, inner: &str) -> String {
        format!(
            "<disk type='file'><source file='/d-{target}'/><target dev='{target}' bus='virtio'/>{inner}</disk>"
        )
    }

    #[test]
    fn disk_indexes_follow_libvirt() {
        assert_eq!(disk_index("vda"), Some(0));
        assert_eq!(disk_index("vdz"), Some(25));
        assert_eq!(disk_index("vdaa"), Some(26));
        assert_eq!(disk_index("vdab"), Some(27));
        assert_eq!(disk_index("sdb"), Some(1));
        assert_eq!(disk_index("vd"), None);
        assert_eq!(disk_index("vda1"), None);
        assert_eq!(disk_index("disk0"), None);
    }

    #[test]
    fn aliases_default_like_libvirt_and_must_be_unique() {
        let nic = "<interface type='network'><source network='default'/></interface>";
        let d = dom(
            &format!("{}{}{nic}{nic}", disk("vdb", ""), disk("vda", "")),
            "",
        )
        .unwrap();
        let aliases: Vec<&str> = d.def.disks.iter().map(|d| d.alias.as_str()).collect();
        assert_eq!(aliases, ["virtio-disk1", "virtio-disk0"]);
        assert_eq!(d.def.interfaces[1].alias, "net1");
        let d = dom(&disk("vda", "<alias name='ua-root'/>"), "").unwrap();
        assert_eq!(d.def.disks[0].alias, "ua-root");
        let e = dom(
            &format!(
                "{}{}",
                disk("vda", "<alias name='ua-x'/>"),
                disk("vdb", "<alias name='ua-x'/>")
            ),
            "",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("non unique alias detected: ua-x"), "{e}");
        let e = dom(&disk("xyz", ""), "").unwrap_err().to_string();
        assert!(e.contains("<target dev='xyz'>"), "{e}");
    }

    #[test]
    fn disk_serial_and_cache() {
        let d = dom(&disk("vda", "<serial>SN-1 a.b</serial>"), "").unwrap();
        assert_eq!(d.def.disks[0].serial.as_deref(), Some("SN-1 a.b"));
        let e = dom(&disk("vda", "<serial>123456789012345678901</serial>"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at most 20 bytes"), "{e}");
        let e = dom(&disk("vda", "<serial>a,b</serial>"), "")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("disk serial (a,b) contains invalid characters"),
            "{e}"
        );
        let e = dom(&disk("vda", "<driver type='raw' cache='fast'/>"), "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown disk cache mode 'fast'"), "{e}");
        let d = dom(
            &disk("vda", "<driver type='raw' cache='writethrough'/>"),
            "",
        )
        .unwrap();
        assert_eq!(d.def.disks[0].cache.as_deref(), Some("writethrough"));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        let d = dom(&disk("vda", "<driver type='raw' cache='none'/>"), "").unwrap();
        assert_eq!(d.def.disks[0].cache.as_deref(), Some("none"));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
    }

    #[test]
    fn memballoon_and_memory_backing() {
        let d = dom("", "").unwrap();
        assert!(d.def.has_balloon(), "libvirt's default: a virtio balloon");
        let d = dom(
            "<memballoon model='virtio' autodeflate='on' freePageReporting='on'><stats period='10'/></memballoon>",
            "",
        )
        .unwrap();
        assert!(d.def.balloon_autodeflate && d.def.balloon_free_page_reporting);
        assert_eq!(d.def.balloon_stats_period, Some(10));
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        let d = dom("<memballoon model='none'/>", "").unwrap();
        assert!(!d.def.has_balloon());
        let e = dom("<memballoon model='virtio' autodeflate='yes'/>", "")
            .unwrap_err()
            .to_string();
        assert!(e.contains("autodeflate='yes'"), "{e}");
        let d = dom(
            "",
            "<memoryBacking><hugepages/><nosharepages/><source type='memfd'/><access mode='shared'/></memoryBacking>",
        )
        .unwrap();
        assert!(d.def.hugepages && d.def.nosharepages && d.def.memfd && d.def.shared_memory);
        assert!(d.warnings.is_empty(), "{:?}", d.warnings);
        let d = dom("", "<memoryBacking><source type='file'/></memoryBacking>").unwrap();
        assert!(d.warnings[0].contains("type='file'"), "{:?}", d.warnings);
        assert!(dom("", "<memoryBacking><access mode='public'/></memoryBacking>").is_err());
    }
}
