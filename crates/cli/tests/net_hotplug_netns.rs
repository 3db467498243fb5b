//! `rvirt attach-interface` / `detach-interface` / `domifstat` live, against a real `rvirtd` in a
//! network namespace this test creates (`ip netns exec`): the hotplugged NIC's TAP joins a host
//! bridge made in the namespace, and goes away when the (fake) guest ejects the NIC. Skips with a
//! reason without root, iproute2 or namespaces, or when rvirtd is not built next to rvirt.

mod common;

use common::Env;

impl Env {
    fn start() -> Option<Env> {
        Env::launch_in_netns("rvhp", &["ip"], &[&["destroy", "vm1"]], |env| {
            env.ip(&["link", "add", "rvhb0", "type", "bridge"]);
            env.ip(&["link", "set", "rvhb0", "up"]);
        })
    }

    /// Waits until the live XML contains `want` (boot devices are annotated just after start).
    fn until_xml(&self, want: &str) {
        self.until(&["dumpxml", "vm1"], |x| x.contains(want));
    }
}

#[test]
fn nic_hotplug_creates_and_removes_the_tap() {
    let Some(e) = Env::start() else { return };
    let dom = e.vm1_file(
        "<interface type='bridge'><source bridge='rvhb0'/><mac address='52:54:00:00:00:10'/></interface>",
    );
    e.ok(&["define", &dom]);
    e.ok(&["start", "vm1"]);
    assert!(e.has_link("rvnet0"), "boot NIC's TAP");
    e.until_xml("<target dev='rvnet0'/>\n      <alias name='net0'/>");
    assert_eq!(
        e.ok(&[
            "attach-interface",
            "vm1",
            "bridge",
            "rvhb0",
            "--mac",
            "52:54:00:00:00:11",
            "--model",
            "virtio"
        ]),
        "Interface attached successfully\n\n"
    );
    let ports = e.ip(&["-o", "link", "show", "master", "rvhb0"]);
    assert_eq!(ports.lines().count(), 2, "{ports}");
    assert!(e.has_link("rvnet1"), "{ports}");
    let iflist = e.ok(&["domiflist", "vm1"]);
    assert!(
        iflist.contains(" rvnet1      bridge   rvhb0    virtio   52:54:00:00:00:11"),
        "{iflist}"
    );
    let x = e.ok(&["dumpxml", "vm1"]);
    assert!(
        x.contains("<mac address='52:54:00:00:00:11'/>\n      <source bridge='rvhb0'/>\n      <target dev='rvnet1'/>\n      <model type='virtio'/>\n      <alias name='net1'/>\n      <address type='pci' domain='0x0000' bus='0x00' slot='0x04' function='0x0'/>"),
        "{x}"
    );
    assert_eq!(
        e.ok(&["domifstat", "vm1", "rvnet1"]),
        "rvnet1 rx_bytes 5400\nrvnet1 rx_packets 54\nrvnet1 rx_errs 0\nrvnet1 rx_drop 0\n\
         rvnet1 tx_bytes 4400\nrvnet1 tx_packets 44\nrvnet1 tx_errs 0\nrvnet1 tx_drop 1\n\n"
    );
    assert!(e
        .ok(&["domifstat", "vm1", "52:54:00:00:00:11"])
        .starts_with("rvnet1 rx_bytes "));
    assert!(e
        .ok(&["domstats", "vm1"])
        .contains("  net.count=2\n  net.0.name=rvnet0\n"));
    // Unplug the boot NIC: its TAP goes, the hotplugged one stays with its MAC.
    assert_eq!(
        e.ok(&[
            "detach-interface",
            "vm1",
            "bridge",
            "--mac",
            "52:54:00:00:00:10"
        ]),
        "Interface detached successfully\n\n"
    );
    assert!(!e.has_link("rvnet0"), "boot TAP removed after the eject");
    let iflist = e.ok(&["domiflist", "vm1"]);
    assert!(
        iflist.contains(" rvnet1 ") && !iflist.contains("52:54:00:00:00:10"),
        "{iflist}"
    );
    e.ok(&[
        "detach-interface",
        "vm1",
        "bridge",
        "--mac",
        "52:54:00:00:00:11",
    ]);
    assert!(!e.has_link("rvnet1"), "hotplugged TAP removed");
    assert_eq!(e.ip(&["-o", "link", "show", "master", "rvhb0"]), "");
    assert!(e.ok(&["domstats", "vm1"]).contains("  net.count=0\n"));
    // A bridge that does not exist: refused, nothing left behind.
    let err = e.err(&["attach-interface", "vm1", "bridge", "nosuchbr", "--live"]);
    assert!(
        err.starts_with("error: Failed to attach interface\n"),
        "{err}"
    );
    assert!(!e.ip(&["-o", "link"]).contains("rvnet"));
    // A hotplugged NIC's TAP also goes when the domain stops.
    e.ok(&["attach-interface", "vm1", "bridge", "rvhb0"]);
    assert!(e.ip(&["-o", "link"]).contains("rvnet"));
    e.ok(&["destroy", "vm1"]);
    assert!(
        !e.ip(&["-o", "link"]).contains("rvnet"),
        "TAP left after destroy"
    );
}
