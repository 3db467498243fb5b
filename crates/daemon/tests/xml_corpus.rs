//! The libvirt XML corpus in tests/xml/: every file parses, and dumpxml keeps every element,
//! attribute, text and comment of it.

use rvirtd::xml::domain::{DiskFormat, InterfaceSource, LifecycleAction};
use rvirtd::xml::tree::Node;
use rvirtd::xml::{Domain, DomainXmlError, Element};
use std::path::PathBuf;

fn corpus() -> Vec<(String, String)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/xml");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "corpus is missing from {dir:?}");
    files
        .into_iter()
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect()
}

fn load(name: &str) -> Domain {
    let (_, text) = corpus().into_iter().find(|(n, _)| n == name).unwrap();
    Domain::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every element path with its attributes and trimmed text, in document order.
fn flatten(el: &Element, prefix: &str, out: &mut Vec<String>) {
    let path = format!("{prefix}/{}", el.name);
    let mut attrs: Vec<String> = el.attrs.iter().map(|(k, v)| format!("{k}={v}")).collect();
    attrs.sort();
    out.push(format!("{path} [{}] '{}'", attrs.join(" "), el.text()));
    for n in &el.children {
        match n {
            Node::Element(c) => flatten(c, &path, out),
            Node::Comment(c) => out.push(format!("{path} <!--{c}-->")),
            _ => {}
        }
    }
}

#[test]
fn every_corpus_file_round_trips_losslessly() {
    for (name, text) in corpus() {
        let dom = Domain::parse(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        let dumped = dom.to_xml();
        let again = Domain::parse(&dumped).unwrap_or_else(|e| panic!("{name} re-parse: {e}"));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        flatten(&Element::parse(&text).unwrap(), "", &mut a);
        flatten(&again.tree, "", &mut b);
        assert_eq!(a, b, "{name}: dumpxml lost or changed something");
        assert_eq!(dom.def, again.def, "{name}: typed view changed");
        // A second dump is byte-identical: the output is stable.
        assert_eq!(dumped, again.to_xml(), "{name}");
    }
}

#[test]
fn virt_install_file_is_read_fully() {
    let d = load("virt-install-fedora.xml");
    let def = &d.def;
    assert_eq!(def.name, "fedora39");
    assert_eq!(
        def.uuid.as_deref(),
        Some("0a4d1f5e-7c2b-4e3a-9d61-2f8b7c9e1a34")
    );
    assert_eq!(def.memory_kib, 2 * 1024 * 1024);
    assert_eq!(def.vcpus, 2);
    assert_eq!(def.disks[0].format, DiskFormat::Qcow2);
    assert_eq!(def.disks[0].cache.as_deref(), Some("none"));
    assert_eq!(
        def.interfaces[0].source,
        InterfaceSource::Network("default".into())
    );
    assert_eq!(def.interfaces[0].mac.as_deref(), Some("52:54:00:6b:3c:58"));
    assert_eq!(def.graphics[0].listen.as_deref(), Some("127.0.0.1"));
    assert_eq!(def.graphics[0].port, Some(-1));
    assert!(def.acpi);
    assert_eq!(def.cpu_mode.as_deref(), Some("host-passthrough"));
    assert_eq!(def.memballoon.as_deref(), Some("virtio"));
    assert_eq!(def.rng.as_deref(), Some("virtio"));
    assert_eq!((def.serials, def.consoles), (1, 1));
    assert_eq!(def.boot, vec!["hd"]);
    assert!(def.has_balloon());
    assert_eq!(def.balloon_stats_period, None);
    assert_eq!(
        def.disks[0].alias, "virtio-disk0",
        "libvirt's default alias"
    );
    assert_eq!(def.interfaces[0].alias, "net0");
    // The guest-agent channel is unknown to rvirt: one warning. cache='none' and the virtio
    // balloon are passed to the VMM: no warning.
    assert_eq!(d.warnings.len(), 1, "{:#?}", d.warnings);
    assert!(
        d.warnings[0].contains("devices/channel"),
        "{:?}",
        d.warnings
    );
}

#[test]
fn pinning_and_hugepages_are_read() {
    let d = load("pinned-hugepages.xml");
    // Hugepages are passed to the VMM now; what cannot be applied is still said.
    assert!(
        !d.warnings.iter().any(|w| w.contains("hugepages")),
        "{:?}",
        d.warnings
    );
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("<memballoon model='none'/> gives no balloon")),
        "currentMemory without a balloon is not silently ignored: {:?}",
        d.warnings
    );
    assert!(!d.def.has_balloon());
    let def = d.def;
    assert_eq!(def.memory_kib, 4 << 20);
    assert_eq!(def.current_memory_kib, 3 << 20);
    assert_eq!((def.vcpus, def.vcpus_current), (4, 2));
    assert_eq!(def.vcpu_cpuset.unwrap().to_string(), "0-1");
    assert_eq!(def.vcpupin.len(), 2);
    assert_eq!(def.vcpupin[1].0, 1);
    assert_eq!(def.vcpupin[1].1.to_string(), "1");
    assert_eq!(def.emulatorpin.unwrap().to_string(), "0-1");
    assert!(def.hugepages && def.nosharepages);
    assert_eq!(def.on_crash, LifecycleAction::Restart);
    assert_eq!(def.disks[0].source.as_deref(), Some("/dev/vg0/db"));
    assert_eq!(
        def.interfaces[0].source,
        InterfaceSource::Bridge("br0".into())
    );
}

#[test]
fn second_disk_readonly_and_defaults() {
    let def = load("bridge-two-disks.xml").def;
    assert_eq!(def.memory_kib, 768 * 1024);
    assert_eq!(def.vcpu_placement, "auto");
    assert!(!def.disks[0].readonly && def.disks[1].readonly);
    assert_eq!(def.on_reboot, LifecycleAction::Destroy);
    assert_eq!(def.on_poweroff, LifecycleAction::Destroy);
    assert_eq!(def.interfaces[1].model, "virtio");
    assert!(def.interfaces[1].mac.is_none());
    assert!(!def.acpi);
}

#[test]
fn unknown_elements_are_kept_and_warned_once() {
    let d = load("unknown-elements.xml");
    let w = d.warnings.join("\n");
    for path in [
        "iothreads",
        "blkiotune",
        "sysinfo",
        "os/smbios",
        "devices/panic",
        "qemu:commandline",
    ] {
        assert!(
            w.contains(&format!("<{path}>")),
            "no warning for {path}: {w}"
        );
    }
    // Children of an unknown element are not warned about separately.
    assert!(!w.contains("sysinfo/system"), "{w}");
    // A disk's <serial> is passed to the VMM now.
    assert!(!w.contains("devices/disk/serial"), "{w}");
    assert_eq!(d.def.disks[0].serial.as_deref(), Some("DISK-0001"));
    let dumped = d.to_xml();
    assert!(
        dumped.contains("<entry name='serial'>ABC-123</entry>"),
        "{dumped}"
    );
    assert!(dumped.contains("<qemu:arg value='-no-hpet'/>"), "{dumped}");
}

#[test]
fn uuid_and_macs_are_added_without_losing_anything() {
    let mut d = load("bridge-two-disks.xml");
    d.set_uuid("11111111-2222-3333-4444-555555555555");
    let mut n = 0;
    d.fill_macs(|| {
        n += 1;
        format!("52:54:00:00:00:{n:02x}")
    });
    let again = Domain::parse(&d.to_xml()).unwrap();
    assert_eq!(
        again.def.uuid.as_deref(),
        Some("11111111-2222-3333-4444-555555555555")
    );
    let macs: Vec<_> = again
        .def
        .interfaces
        .iter()
        .map(|i| i.mac.clone().unwrap())
        .collect();
    assert_eq!(macs, vec!["52:54:00:00:00:01", "52:54:00:00:00:02"]);
    assert_eq!(
        again.tree.elements().nth(1).unwrap().name,
        "uuid",
        "uuid goes after name"
    );
}

fn refuse(xml: &str) -> DomainXmlError {
    Domain::parse(xml).expect_err("accepted")
}

const BASE_HEAD: &str =
    "<domain type='kvm'>\n<name>x</name>\n<memory>1024</memory>\n<os><type>hvm</type></os>\n";

#[test]
fn behaviour_changing_elements_are_refused_by_name() {
    let cases = [
        ("<devices><disk type='file'><source file='/a'/><target dev='sda' bus='sata'/></disk></devices>", "bus='sata'"),
        ("<devices><disk type='file' device='cdrom'><source file='/a'/><target dev='hdc'/></disk></devices>", "bus='ide'"),
        ("<devices><disk type='file' device='cdrom'><source file='/a'/><target dev='vdb' bus='virtio'/></disk></devices>", "does not support ejectable media"),
        ("<devices><disk type='file' device='floppy'><source file='/a'/><target dev='fda'/></disk></devices>", "device='floppy'"),
        ("<devices><controller type='scsi' model='lsilogic'/></devices>", "model='lsilogic'"),
        ("<devices><controller type='ide' index='0'/></devices>", "IDE controllers are unsupported"),
        ("<devices><disk type='file'><source file='/a'/><target dev='sda'/><address type='drive' controller='1' bus='0' target='0' unit='0'/></disk></devices>", "controller='1'"),
        ("<devices><disk type='network'><source protocol='nbd'/><target dev='vda'/></disk></devices>", "type='network'"),
        ("<devices><disk type='file'><driver type='vmdk'/><source file='/a'/><target dev='vda'/></disk></devices>", "type='vmdk'"),
        ("<devices><interface type='user'/></devices>", "<interface type='user'>"),
        ("<devices><interface type='network'><source network='default'/><model type='e1000'/></interface></devices>", "type='e1000'"),
        ("<devices><hostdev mode='subsystem' type='pci'/></devices>", "<hostdev>"),
        ("<devices><graphics type='spice'/></devices>", "spice"),
        ("<devices><serial type='tcp'/></devices>", "<serial type='tcp'>"),
        ("<on_crash>preserve</on_crash>", "preserve"),
    ];
    for (body, needle) in cases {
        let xml = format!("{BASE_HEAD}{body}</domain>");
        let err = refuse(&xml);
        assert!(
            matches!(err, DomainXmlError::Unsupported { .. }),
            "{body}: {err}"
        );
        assert!(err.to_string().contains(needle), "{body}: {err}");
        assert!(
            err.to_string().contains("line 5"),
            "{body}: no position: {err}"
        );
    }
    let err = refuse("<domain type='qemu'><name>x</name></domain>");
    assert!(err.to_string().contains("type='qemu'"), "{err}");
    let err = refuse("<domain type='kvm'><name>x</name><memory>1</memory><os firmware='efi'><type>hvm</type><loader secure='yes'>/x</loader></os></domain>");
    assert!(err.to_string().contains("secure='yes'"), "{err}");
    let err = refuse("<domain type='kvm'><name>x</name><memory>1</memory><os firmware='efi'><type>hvm</type><firmware><feature enabled='yes' name='secure-boot'/></firmware></os></domain>");
    assert!(err.to_string().contains("secure-boot"), "{err}");
    let err = refuse("<domain type='kvm'><name>x</name><memory>1</memory><os firmware='bios'><type>hvm</type><nvram>/v.fd</nvram></os></domain>");
    assert!(err.to_string().contains("<nvram> is for UEFI"), "{err}");
    let err = refuse("<domain type='kvm'><name>x</name><memory>1</memory><os firmware='coreboot'><type>hvm</type></os></domain>");
    assert!(err.to_string().contains("firmware='coreboot'"), "{err}");
}

#[test]
fn disk_and_boot_mistakes_libvirt_refuses_are_refused() {
    let disk = |t: &str, extra: &str| {
        format!("<disk type='file'><source file='/d-{t}'/><target dev='{t}'/>{extra}</disk>")
    };
    let dom = |os: &str, devs: &str| {
        format!("<domain type='kvm'><name>x</name><memory>1024</memory><os><type>hvm</type>{os}</os><devices>{devs}</devices></domain>")
    };
    // Two disks on one target (libvirt: "target 'vda' duplicated for disk sources ...").
    let err = refuse(&dom("", &(disk("vda", "") + &disk("vda", ""))));
    assert!(
        err.to_string()
            .contains("target 'vda' duplicated for disk sources '/d-vda' and '/d-vda'"),
        "{err}"
    );
    // Two SCSI disks at one unit.
    let unit0 = "<address type='drive' controller='0' bus='0' target='0' unit='0'/>";
    let err = refuse(&dom("", &(disk("sda", "") + &disk("sdb", unit0))));
    assert!(err.to_string().contains("SCSI unit 0"), "{err}");
    // <boot dev> and per-device <boot order> together; the same order twice; order 0.
    let err = refuse(&dom("<boot dev='hd'/>", &disk("vda", "<boot order='1'/>")));
    assert!(
        err.to_string()
            .contains("per-device boot elements cannot be used together with os/boot elements"),
        "{err}"
    );
    let err = refuse(&dom(
        "",
        &(disk("vda", "<boot order='1'/>") + &disk("vdb", "<boot order='1'/>")),
    ));
    assert!(
        err.to_string()
            .contains("boot order '1' used for more than one device"),
        "{err}"
    );
    let err = refuse(&dom("", &disk("vda", "<boot order='0'/>")));
    assert!(err.to_string().contains("orders start at 1"), "{err}");
    let err = refuse(&dom("<boot dev='fd'/>", ""));
    assert!(err.to_string().contains("floppy"), "{err}");
    // A disk must have an image; only a CD-ROM may be empty.
    let err = refuse(&dom("", "<disk type='file'><target dev='vda'/></disk>"));
    assert!(err.to_string().contains("only valid for a cdrom"), "{err}");
}

#[test]
fn uefi_install_from_a_cdrom_reads_as_libvirt_means_it() {
    let dom = load("virt-install-debian-uefi-cdrom.xml");
    let def = &dom.def;
    let fw = def.firmware.as_ref().expect("firmware");
    assert_eq!(fw.kind, "efi");
    assert_eq!((fw.loader.as_deref(), fw.nvram.as_deref()), (None, None));
    assert_eq!(def.boot, vec!["cdrom", "hd"]);
    assert_eq!(def.disks.len(), 2);
    let (hd, cd) = (&def.disks[0], &def.disks[1]);
    assert_eq!(
        (hd.bus.as_str(), hd.device.as_str(), hd.unit),
        ("scsi", "disk", Some(0))
    );
    assert_eq!(
        (cd.bus.as_str(), cd.device.as_str(), cd.unit),
        ("scsi", "cdrom", Some(1))
    );
    assert!(cd.readonly && !hd.readonly);
    assert_eq!(
        (hd.alias.as_str(), cd.alias.as_str()),
        ("scsi0-0-0-0", "scsi0-0-0-1")
    );
    // Nothing about firmware, controllers or the CD-ROM is reported as unused.
    for w in &dom.warnings {
        assert!(
            !w.contains("<os/") && !w.contains("controller") && !w.contains("disk"),
            "{w}"
        );
    }
    // At define time the OVMF pair and a per-domain variable store are filled in, as libvirt
    // does; dumpxml shows them.
    let mut filled = dom.clone();
    filled.fill_firmware(std::path::Path::new("/var/lib/rvirt/nvram/deb12_VARS.fd"));
    let fw = filled.def.firmware.as_ref().unwrap();
    assert_eq!(
        fw.loader.as_deref(),
        Some("/usr/share/OVMF/OVMF_CODE_4M.fd")
    );
    assert_eq!(
        fw.nvram.as_deref(),
        Some("/var/lib/rvirt/nvram/deb12_VARS.fd")
    );
    let xml = filled.to_xml();
    assert!(
        xml.contains(
            "<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.fd</loader>"
        ),
        "{xml}"
    );
    assert!(xml.contains("<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>/var/lib/rvirt/nvram/deb12_VARS.fd</nvram>"), "{xml}");
    let again = Domain::parse(&xml).unwrap();
    assert_eq!(again.def.firmware, filled.def.firmware);
}

#[test]
fn bios_loader_empty_cdrom_and_boot_orders() {
    let dom = load("bios-empty-cdrom-boot-order.xml");
    let def = &dom.def;
    let fw = def.firmware.as_ref().expect("firmware");
    assert_eq!(fw.kind, "bios", "a ROM loader is a BIOS");
    assert_eq!(
        fw.loader.as_deref(),
        Some("/usr/share/seabios/bios-256k.bin")
    );
    assert_eq!(def.boot_menu_ms, Some(3000));
    let cd = &def.disks[0];
    assert_eq!((cd.source.as_deref(), cd.device.as_str()), (None, "cdrom"));
    assert_eq!(cd.source_or_dash(), "-");
    assert_eq!(cd.unit, Some(2), "sdc is unit 2");
    let sda = &def.disks[1];
    assert_eq!(
        (sda.bus.as_str(), sda.unit, sda.boot_order),
        ("scsi", Some(0), Some(1))
    );
    assert_eq!(def.disks[2].boot_order, Some(2));
    // Filling firmware leaves a BIOS definition as written.
    let mut filled = dom.clone();
    filled.fill_firmware(std::path::Path::new("/n.fd"));
    assert_eq!(filled.to_xml(), dom.to_xml());
}

#[test]
fn invalid_values_name_the_element_and_place() {
    let cases = [
        ("<domain type='kvm'><memory>1</memory></domain>", "no <name>"),
        ("<domain type='kvm'><name>a/b</name><memory>1</memory></domain>", "contains '/'"),
        ("<domain type='kvm'>\n<name>x</name>\n<memory unit='parsecs'>1</memory><os><type>hvm</type></os></domain>", "line 3"),
        ("<domain type='kvm'><name>x</name><uuid>nope</uuid><memory>1</memory><os><type>hvm</type></os></domain>", "<uuid> 'nope'"),
        ("<domain type='kvm'><name>x</name><memory>1</memory><vcpu>0</vcpu><os><type>hvm</type></os></domain>", "out of range"),
        ("<domain type='kvm'><name>x</name><memory>1</memory><vcpu>2</vcpu><cputune><vcpupin vcpu='5' cpuset='0'/></cputune><os><type>hvm</type></os></domain>", "vcpu='5'"),
        ("<domain type='kvm'><name>x</name><memory>1</memory><cputune><emulatorpin cpuset='3-1'/></cputune><os><type>hvm</type></os></domain>", "reversed"),
        ("<domain type='kvm'><name>x</name><memory>1</memory><os><type>hvm</type></os><devices><interface type='bridge'><source bridge='b'/><mac address='zz'/></interface></devices></domain>", "zz"),
        ("<network><name>default</name></network>", "<network>"),
    ];
    for (xml, needle) in cases {
        let err = refuse(xml);
        assert!(err.to_string().contains(needle), "{xml}: {err}");
    }
    let err = refuse("<domain type='kvm'>\n  <name>x</name\n</domain>");
    assert!(matches!(err, DomainXmlError::Syntax(_)), "{err}");
    assert!(err.to_string().contains("line "), "{err}");
}

#[test]
fn live_virsh_dumpxml_is_accepted_with_few_warnings() {
    let d = load("virsh-dumpxml-running.xml");
    let def = &d.def;
    assert_eq!(def.name, "debian12");
    assert_eq!(def.interfaces[0].target.as_deref(), Some("vnet2"));
    assert_eq!(def.graphics[0].port, Some(5900));
    assert_eq!(
        def.cmdline.as_deref(),
        Some("root=/dev/vda1 console=ttyS0 net.ifnames=0")
    );
    // Runtime-only details (aliases, pty paths, backingStore, seclabel) are not warned about.
    let w = d.warnings.join("\n");
    assert_eq!(d.warnings.len(), 1, "{w}");
    assert!(w.contains("<devices/audio>"), "{w}");
    assert_eq!(def.balloon_stats_period, Some(5));
    assert_eq!(def.disks[0].alias, "virtio-disk0");
    assert_eq!(def.interfaces[0].alias, "net0");
}

#[test]
fn byte_units_and_hotplug_vcpus() {
    let def = load("bytes-and-gigabytes.xml").def;
    assert_eq!(def.memory_kib, 2 << 20);
    assert_eq!(def.current_memory_kib, 1 << 20);
    assert_eq!((def.vcpus, def.vcpus_current), (4, 1));
    assert_eq!(def.on_poweroff, LifecycleAction::Restart);
    assert_eq!(def.disks[0].cache.as_deref(), Some("unsafe"));
}
