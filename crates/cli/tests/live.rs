//! Live-resource verbs (setmem, dommemstat, qemu-monitor-command, setvcpus, vcpucount,
//! attach-*/detach-*, domblkstat, domstats) through `rvirt` against `rvirtd` supervising
//! `rvirt-fake-vmm`, the stand-in VMM that simulates the balloon, vCPU hotplug and PCI hotplug
//! without running a guest.

mod common;

use common::Env;
use std::time::{Duration, Instant};

impl Env {
    /// `no_eject`: the fake guest never releases what it is asked to unplug.
    fn start(no_eject: bool) -> Option<Env> {
        let e = Env::launch(&[&["destroy", "vm1"], &["destroy", "nob"]], |cmd| {
            if no_eject {
                cmd.env("RVIRT_FAKE_NO_EJECT", "1");
            } else {
                cmd.env_remove("RVIRT_FAKE_NO_EJECT");
            }
        })?;
        for d in ["d2.img", "d3.img"] {
            std::fs::write(e.dir.path().join(d), vec![0u8; 4096]).unwrap();
        }
        Some(e)
    }

    /// Defines `name`: 512 MiB, vCPUs 2 of 4, disk vda, `balloon` = memballoon model.
    fn define(&self, name: &str, balloon: &str) {
        let p = self.dir.path().join(format!("{name}.xml"));
        std::fs::write(
            &p,
            format!(
                "<domain type='kvm'>\n  <name>{name}</name>\n  <memory unit='MiB'>512</memory>\n  <vcpu current='2'>4</vcpu>\n  <os>\n    <type>hvm</type>\n    <kernel>{k}</kernel>\n  </os>\n  <devices>\n    <disk type='file'>\n      <source file='{d}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    <memballoon model='{balloon}'/>\n  </devices>\n</domain>\n",
                k = self.path("vmlinux"),
                d = self.path("disk.img"),
            ),
        )
        .unwrap();
        self.ok(&["define", p.to_str().unwrap()]);
    }
}

#[test]
fn balloon_setmem_dommemstat_and_monitor() {
    let Some(e) = Env::start(false) else { return };
    e.define("vm1", "virtio");
    e.ok(&["start", "vm1"]);
    let m = e.ok(&["dommemstat", "vm1"]);
    assert!(m.starts_with("actual 524288\nrss "), "{m}");
    assert!(m.ends_with("\n\n"), "{m}");
    assert_eq!(e.ok(&["setmem", "vm1", "256M"]), "\n");
    // The balloon moves in steps; actual arrives at the target.
    e.until(&["dommemstat", "vm1"], |o| o.starts_with("actual 262144\n"));
    let info = e.ok(&["dominfo", "vm1"]);
    assert!(info.contains("Max memory:     524288 KiB\n"), "{info}");
    assert!(info.contains("Used memory:    262144 KiB\n"), "{info}");
    // The live XML follows the balloon (libvirt's currentMemory).
    assert!(e
        .ok(&["dumpxml", "vm1"])
        .contains("<currentMemory unit='KiB'>262144</currentMemory>"));
    // With statistics polling, every virsh field in virsh's order.
    let m = e.ok(&["dommemstat", "vm1", "--period", "2"]);
    let names: Vec<&str> = m.lines().filter_map(|l| l.split(' ').next()).collect();
    assert_eq!(
        names,
        [
            "swap_in",
            "swap_out",
            "major_fault",
            "minor_fault",
            "unused",
            "available",
            "usable",
            "actual",
            "rss",
            "last_update",
            "disk_caches",
            "hugetlb_pgalloc",
            "hugetlb_pgfail",
            ""
        ]
    );
    assert!(m.contains("\nactual 262144\n"), "{m}");
    // Refusals.
    assert_eq!(
        e.err(&["setmem", "vm1", "1G"]),
        "error: invalid argument: cannot set memory higher than max memory (domain 'vm1'); raise it first with setmaxmem --config\n"
    );
    let err = e.err(&["setmaxmem", "vm1", "1G", "--live"]);
    assert!(
        err.contains("cannot resize the maximum memory on active domain 'vm1'")
            && err.contains("use --config"),
        "{err}"
    );
    assert!(e
        .err(&["setmem", "vm1", "12furlongs"])
        .contains("malformed"));
    // --config: the stored definition changes, the running one does not.
    e.ok(&["setmaxmem", "vm1", "1G", "--config"]);
    e.ok(&["setmem", "vm1", "786432", "--config"]);
    let inactive = e.ok(&["dumpxml", "vm1", "--inactive"]);
    assert!(
        inactive.contains("<memory unit='KiB'>1048576</memory>"),
        "{inactive}"
    );
    assert!(inactive.contains("<currentMemory unit='KiB'>786432</currentMemory>"));
    assert!(e
        .ok(&["dominfo", "vm1"])
        .contains("Max memory:     524288 KiB\n"));

    // The QEMU monitor look-alike.
    let hmp = |cmd: &str| e.ok(&["qemu-monitor-command", "vm1", "--hmp", "--cmd", cmd]);
    assert_eq!(hmp("info balloon"), "balloon: actual=256\n");
    assert_eq!(hmp("balloon 300"), "", "QEMU's balloon prints nothing");
    e.until(
        &["qemu-monitor-command", "vm1", "--hmp", "info", "balloon"],
        |o| o == "balloon: actual=300\n",
    );
    assert_eq!(hmp("foo"), "unknown command: 'foo'\n");
    let qmp = e.ok(&[
        "qemu-monitor-command",
        "vm1",
        r#"{"execute":"query-balloon"}"#,
    ]);
    assert!(
        qmp.starts_with(r#"{"return":{"actual":314572800},"id":"rvirt-"#),
        "{qmp}"
    );
    let pretty = e.ok(&[
        "qemu-monitor-command",
        "vm1",
        "--pretty",
        r#"{"execute":"query-balloon","id":"q1"}"#,
    ]);
    assert_eq!(
        pretty,
        "{\n  \"return\": {\n    \"actual\": 314572800\n  },\n  \"id\": \"q1\"\n}\n"
    );
    assert_eq!(
        e.ok(&[
            "qemu-monitor-command",
            "vm1",
            r#"{"execute":"balloon","arguments":{"value":268435456},"id":"b"}"#
        ]),
        "{\"return\":{},\"id\":\"b\"}\n"
    );
    e.until(&["dommemstat", "vm1"], |o| o.contains("actual 262144\n"));
    assert_eq!(
        e.ok(&["qemu-monitor-command", "vm1", r#"{"execute":"foo","id":1}"#]),
        "{\"error\":{\"class\":\"CommandNotFound\",\"desc\":\"The command foo has not been found\"},\"id\":1}\n"
    );

    // A domain without a balloon answers as QEMU does without one.
    e.define("nob", "none");
    e.ok(&["start", "nob"]);
    assert_eq!(
        e.ok(&["qemu-monitor-command", "nob", "--hmp", "info balloon"]),
        "Error: No balloon device has been activated\n"
    );
    assert_eq!(
        e.ok(&["qemu-monitor-command", "nob", r#"{"execute":"query-balloon","id":2}"#]),
        "{\"error\":{\"class\":\"DeviceNotActive\",\"desc\":\"No balloon device has been activated\"},\"id\":2}\n"
    );
    let err = e.err(&["setmem", "nob", "128M"]);
    assert!(
        err.contains("without the balloon device") && err.contains("<memballoon model='virtio'/>"),
        "{err}"
    );
    assert_eq!(
        e.ok(&["dommemstat", "nob"]).lines().next(),
        Some("actual 524288")
    );
    e.ok(&["destroy", "nob"]);
    assert!(e
        .err(&["qemu-monitor-command", "nob", "--hmp", "info balloon"])
        .contains("domain is not running"));
}

#[test]
fn vcpu_hotplug_and_vcpucount() {
    let Some(e) = Env::start(false) else { return };
    e.define("vm1", "virtio");
    assert_eq!(
        e.ok(&["vcpucount", "vm1"]),
        "maximum      config         4\ncurrent      config         2\n\n"
    );
    // Pinning of a vCPU that is not online yet applies when it is hotplugged.
    e.ok(&["vcpupin", "vm1", "3", "0", "--config"]);
    e.ok(&["start", "vm1"]);
    e.ok(&["setvcpus", "vm1", "4"]);
    let pins = e.ok(&["vcpupin", "vm1"]);
    assert!(
        pins.lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["3", "0"]),
        "{pins}"
    );
    assert_eq!(
        e.ok(&["vcpucount", "vm1"]),
        "maximum      config         4\n\
         maximum      live           4\n\
         current      config         2\n\
         current      live           4\n\n"
    );
    let info = e.ok(&["vcpuinfo", "vm1"]);
    assert_eq!(info.matches("VCPU:").count(), 4, "{info}");
    // Unplug completes when the guest ejected (the fake's vCPU threads end).
    e.ok(&["setvcpus", "vm1", "1", "--live"]);
    assert!(e
        .ok(&["vcpucount", "vm1"])
        .contains("current      live           1\n"));
    assert_eq!(e.ok(&["vcpuinfo", "vm1"]).matches("VCPU:").count(), 1);
    assert!(e
        .ok(&["dumpxml", "vm1"])
        .contains("<vcpu current='1'>4</vcpu>"));
    // Refusals.
    assert_eq!(
        e.err(&["setvcpus", "vm1", "5"]),
        "error: invalid argument: requested vcpus is greater than max allowable vcpus for the live domain: 5 > 4; the maximum is set with setvcpus --maximum --config and applies at the next start\n"
    );
    assert!(e
        .err(&["setvcpus", "vm1", "0"])
        .contains("vCPU 0 cannot be unplugged"));
    assert!(e
        .err(&["setvcpus", "vm1", "2", "--maximum", "--live"])
        .contains("use --maximum --config"));
    // --config.
    e.ok(&["setvcpus", "vm1", "3", "--config"]);
    e.ok(&["setvcpus", "vm1", "6", "--maximum", "--config"]);
    let inactive = e.ok(&["dumpxml", "vm1", "--inactive"]);
    assert!(
        inactive.contains("<vcpu current='3'>6</vcpu>"),
        "{inactive}"
    );
    assert!(e
        .ok(&["vcpucount", "vm1"])
        .starts_with("maximum      config         6\nmaximum      live           4\n"));
}

#[test]
fn disk_hotplug_live_xml_stats_and_persistence() {
    let Some(e) = Env::start(false) else { return };
    e.define("vm1", "virtio");
    let d2 = e.path("d2.img");
    let d3 = e.path("d3.img");
    assert!(e
        .err(&["attach-disk", "vm1", &d2, "vdb", "--live"])
        .ends_with("error: Requested operation is not valid: domain is not running\n"));
    e.ok(&["start", "vm1"]);
    // Boot devices get their alias and address in the live XML too.
    e.until(&["dumpxml", "vm1"], |x| {
        x.contains("<alias name='virtio-disk0'/>")
    });
    assert_eq!(
        e.ok(&[
            "attach-disk",
            "vm1",
            &d2,
            "vdb",
            "--subdriver",
            "raw",
            "--cache",
            "none"
        ]),
        "Disk attached successfully\n\n"
    );
    let x = e.ok(&["dumpxml", "vm1"]);
    let vdb = &x[x.find(&d2).unwrap()..];
    assert!(
        vdb.starts_with(&format!(
            "{d2}'/>\n      <target dev='vdb' bus='virtio'/>\n      <alias name='virtio-disk1'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>\n    </disk>\n"
        )),
        "{x}"
    );
    assert!(x.contains("<driver name='qemu' type='raw' cache='none'/>"));
    assert!(!e.ok(&["dumpxml", "vm1", "--inactive"]).contains("vdb"));
    assert!(e
        .ok(&["domblklist", "vm1"])
        .contains(&format!(" vdb      {d2}\n")));
    assert_eq!(
        e.ok(&["domblkstat", "vm1", "vdb"]),
        "vdb rd_req 103\nvdb rd_bytes 421888\nvdb wr_req 23\nvdb wr_bytes 94208\nvdb flush_operations 3\n\n"
    );
    assert_eq!(
        e.ok(&["domblkstat", "vm1"]),
        " rd_req 205\n rd_bytes 839680\n wr_req 45\n wr_bytes 184320\n flush_operations 6\n\n"
    );
    let s = e.ok(&["domstats", "vm1"]);
    assert!(
        s.starts_with("Domain: 'vm1'\n  state.state=1\n  state.reason=1\n"),
        "{s}"
    );
    for want in [
        "  balloon.current=524288\n",
        "  balloon.maximum=524288\n",
        "  vcpu.current=2\n",
        "  vcpu.maximum=4\n",
        "  net.count=0\n",
        "  block.count=2\n",
        "  block.0.name=vda\n",
        "  block.1.name=vdb\n",
        "  block.1.rd.reqs=103\n",
        "  block.1.wr.bytes=94208\n",
        "  block.1.fl.reqs=3\n",
    ] {
        assert!(s.contains(want), "{want} in {s}");
    }
    // Refusals.
    assert_eq!(
        e.err(&["attach-disk", "vm1", &d3, "vdb"]),
        "error: Failed to attach disk\nerror: operation failed: target vdb already exists in domain 'vm1'; choose another target (see domblklist)\n"
    );
    let missing = e.path("missing.img");
    assert_eq!(
        e.err(&["attach-disk", "vm1", &missing, "vdc"]),
        format!("error: Failed to attach disk\nerror: Cannot access storage file '{missing}': No such file or directory; give an existing image (create one with rvirt-img create)\n")
    );
    assert!(e
        .err(&["attach-disk", "vm1", &d3, "sdc", "--targetbus", "scsi"])
        .contains("use --targetbus virtio"));
    assert!(e
        .err(&["detach-disk", "vm1", "vdz"])
        .ends_with("error: No disk found whose source path or target is vdz\n"));
    // Detach: gone from the live XML, the VMM's device list and the statistics.
    assert_eq!(
        e.ok(&["detach-disk", "vm1", "vdb"]),
        "Disk detached successfully\n\n"
    );
    assert!(!e.ok(&["dumpxml", "vm1"]).contains("vdb"));
    assert!(e.ok(&["domstats", "vm1"]).contains("  block.count=1\n"));
    assert!(e
        .err(&["domblkstat", "vm1", "vdb"])
        .contains("invalid path: vdb"));
    // The slot is free again.
    e.ok(&["attach-disk", "vm1", &d3, "vdc"]);
    assert!(e
        .ok(&["dumpxml", "vm1"])
        .contains("<alias name='virtio-disk2'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x03' function='0x0'/>"));
    e.ok(&["detach-disk", "vm1", "vdc"]);

    // --persistent: live and definition; detach --config only touches the definition.
    e.ok(&["attach-disk", "vm1", &d2, "vdb", "--persistent"]);
    assert!(e.ok(&["dumpxml", "vm1"]).contains("<target dev='vdb'"));
    let inactive = e.ok(&["dumpxml", "vm1", "--inactive"]);
    assert!(inactive.contains("<target dev='vdb'"), "{inactive}");
    assert!(!inactive.contains("<alias"), "{inactive}");
    e.ok(&["detach-disk", "vm1", "vdb", "--config"]);
    assert!(!e.ok(&["dumpxml", "vm1", "--inactive"]).contains("vdb"));
    assert!(e.ok(&["dumpxml", "vm1"]).contains("vdb"));

    // attach-device / detach-device with a <disk> file.
    let f = e.dir.path().join("dev.xml");
    std::fs::write(
        &f,
        format!("<disk type='file' device='disk'>\n  <source file='{d3}'/>\n  <target dev='vdd' bus='virtio'/>\n</disk>\n"),
    )
    .unwrap();
    let f = f.to_str().unwrap();
    assert_eq!(
        e.ok(&["attach-device", "vm1", f, "--live"]),
        "Device attached successfully\n\n"
    );
    assert!(e.ok(&["domblklist", "vm1"]).contains(" vdd "));
    assert_eq!(
        e.ok(&["detach-device", "vm1", f]),
        "Device detached successfully\n\n"
    );
    assert!(!e.ok(&["domblklist", "vm1"]).contains(" vdd "));

    // After a stop, the next start runs the definition (no hotplugged leftovers).
    e.ok(&["destroy", "vm1"]);
    e.ok(&["start", "vm1"]);
    let l = e.ok(&["domblklist", "vm1"]);
    assert!(!l.contains("vdb") && l.contains("vda"), "{l}");
}

#[test]
fn interfaces_in_the_definition_and_refusals() {
    let Some(e) = Env::start(false) else { return };
    e.define("vm1", "virtio");
    let attach = [
        "attach-interface",
        "vm1",
        "bridge",
        "br-none",
        "--mac",
        "52:54:00:aa:bb:cc",
        "--config",
    ];
    assert_eq!(e.ok(&attach), "Interface attached successfully\n\n");
    let l = e.ok(&["domiflist", "vm1"]);
    assert!(
        l.contains("bridge") && l.contains("52:54:00:aa:bb:cc"),
        "{l}"
    );
    assert!(e
        .err(&attach)
        .contains("MAC address 52:54:00:aa:bb:cc is already used"));
    assert!(e
        .err(&["attach-interface", "vm1", "direct", "eth0"])
        .contains("network or bridge"));
    assert_eq!(
        e.ok(&[
            "detach-interface",
            "vm1",
            "bridge",
            "--mac",
            "52:54:00:aa:bb:cc",
            "--config"
        ]),
        "Interface detached successfully\n\n"
    );
    assert!(!e.ok(&["domiflist", "vm1"]).contains("52:54:00:aa:bb:cc"));
    // Live: a missing host bridge is refused before anything reaches the VMM.
    e.ok(&["start", "vm1"]);
    let err = e.err(&[
        "attach-interface",
        "vm1",
        "bridge",
        "br-missing-x",
        "--live",
    ]);
    assert!(
        err.starts_with("error: Failed to attach interface\nerror: "),
        "{err}"
    );
    assert!(e.ok(&["domstats", "vm1"]).contains("  net.count=0\n"));
    assert!(e
        .err(&[
            "detach-interface",
            "vm1",
            "network",
            "--mac",
            "52:54:00:00:00:01"
        ])
        .contains("has no interface with MAC address 52:54:00:00:00:01"));
}

#[test]
fn unplug_that_the_guest_ignores_times_out() {
    let Some(e) = Env::start(true) else { return };
    e.define("vm1", "virtio");
    e.ok(&["start", "vm1"]);
    e.ok(&["attach-disk", "vm1", &e.path("d2.img"), "vdb"]);
    let t = Instant::now();
    let err = e.err(&["detach-disk", "vm1", "vdb"]);
    assert!(
        t.elapsed() >= Duration::from_secs(5),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(
        err,
        "error: Failed to detach disk\nerror: operation failed: unplug of device 'virtio-disk1' of domain 'vm1' is still pending: the guest did not release it within 5 seconds; it is removed when the guest ejects it (check with dumpxml)\n"
    );
    // Still there: the guest has it.
    assert!(e
        .ok(&["dumpxml", "vm1"])
        .contains("<alias name='virtio-disk1'/>"));
    let err = e.err(&["setvcpus", "vm1", "1"]);
    assert!(
        err.contains("vCPU unplug of domain 'vm1' is still pending") && err.contains("vCPU 1 "),
        "{err}"
    );
    assert!(e
        .ok(&["vcpucount", "vm1"])
        .contains("current      live           2\n"));
}

#[test]
fn change_media_and_domblklist_of_a_cdrom_drive() {
    let Some(e) = Env::start(false) else { return };
    let iso = e.path("d2.img");
    let p = e.dir.path().join("cd.xml");
    std::fs::write(
        &p,
        format!(
            "<domain type='kvm'>\n  <name>vm1</name>\n  <memory unit='MiB'>128</memory>\n  <os>\n    <type>hvm</type>\n    <kernel>{k}</kernel>\n  </os>\n  <devices>\n    <disk type='file'>\n      <source file='{d}'/>\n      <target dev='vda' bus='virtio'/>\n    </disk>\n    <disk type='file' device='cdrom'>\n      <target dev='sda' bus='scsi'/>\n    </disk>\n  </devices>\n</domain>\n",
            k = e.path("vmlinux"),
            d = e.path("disk.img"),
        ),
    )
    .unwrap();
    e.ok(&["define", p.to_str().unwrap()]);
    e.ok(&["start", "vm1"]);
    // virsh's table: an empty drive shows '-'.
    let l = e.ok(&["domblklist", "vm1", "--details"]);
    assert!(l.contains("file   cdrom    sda      -"), "{l}");
    assert_eq!(
        e.ok(&["change-media", "vm1", "sda", &iso, "--insert"]),
        "Successfully inserted media.\n"
    );
    let l = e.ok(&["domblklist", "vm1"]);
    assert!(l.contains(&format!("sda      {iso}")), "{l}");
    assert_eq!(
        e.ok(&[
            "change-media",
            "vm1",
            "sda",
            "--eject",
            "--config",
            "--live"
        ]),
        "Successfully ejected media.\n"
    );
    assert!(!e.ok(&["dumpxml", "vm1", "--inactive"]).contains(&iso));
    assert_eq!(
        e.err(&["change-media", "vm1", "vda", "--eject"]),
        "error: Failed to complete action eject on media\nerror: The disk device 'vda' is not removable\n"
    );
    assert!(e
        .err(&["change-media", "vm1", "sda", "--eject", "--insert"])
        .contains("mutually exclusive"));
}
