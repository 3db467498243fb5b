//! `rvirt net-*` against a real `rvirtd` that runs inside a network namespace this test creates
//! (`ip netns exec`), so bridges, nftables and dnsmasq live there and the machine's own
//! namespace is never touched. A domain on the network (fake VMM) gets a TAP on the bridge that
//! goes away when it stops. Skips with a reason without root, iproute2, nft, dnsmasq or
//! namespaces, or when rvirtd is not built next to rvirt.

mod common;

use common::{sh, Env};

const CLEANUP: common::Cleanup = &[&["destroy", "vm1"], &["net-destroy", "--force", "t1"]];

impl Env {
    fn start() -> Option<Env> {
        Env::launch_in_netns("rvct", &["ip", "nft", "dnsmasq"], CLEANUP, |env| {
            // A host route the overlap check must see.
            env.ip(&[
                "link", "add", "used0", "type", "veth", "peer", "name", "used0p",
            ]);
            env.ip(&["addr", "add", "10.77.0.1/16", "dev", "used0"]);
            env.ip(&["link", "set", "used0", "up"]);
        })
    }
}

fn net_xml(name: &str, bridge: &str, subnet3: &str) -> String {
    format!(
        "<network>\n  <name>{name}</name>\n  <forward mode='nat'/>\n  <bridge name='{bridge}'/>\n  \
         <ip address='{subnet3}.1' netmask='255.255.255.0'>\n    <dhcp>\n      \
         <range start='{subnet3}.10' end='{subnet3}.50'/>\n    </dhcp>\n  </ip>\n</network>\n"
    )
}

#[test]
fn networks_through_the_cli_in_a_namespace() {
    let Some(e) = Env::start() else { return };

    // The default network is defined on the first start, not started.
    let list = e.ok(&["net-list", "--all"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(
        lines[0], " Name      State      Autostart   Persistent",
        "{list}"
    );
    assert!(
        lines[1].chars().all(|c| c == '-') && lines[1].len() == 46,
        "{list}"
    );
    assert!(
        lines[2].starts_with(" default   inactive   no          yes"),
        "{list}"
    );
    assert_eq!(
        e.ok(&["net-list"]).lines().count(),
        3,
        "only header, rule, blank"
    );

    // Define, start, inspect.
    let f = e.file("t1.xml", &net_xml("t1", "rvt1br", "10.99.1"));
    assert_eq!(
        e.ok(&["net-define", &f]),
        format!("Network 't1' defined from {f}\n\n")
    );
    assert_eq!(e.ok(&["net-start", "t1"]), "Network 't1' started\n\n");
    assert!(e.has_link("rvt1br"), "bridge created in the namespace");
    assert!(e
        .ip(&["-4", "addr", "show", "dev", "rvt1br"])
        .contains("10.99.1.1/24"));
    let list = e.ok(&["net-list"]);
    assert!(
        list.lines()
            .any(|l| l == " t1     active   no          yes"),
        "{list}"
    );
    let info = e.ok(&["net-info", "t1"]);
    assert!(
        info.starts_with("Name:           t1\nUUID:           "),
        "{info}"
    );
    assert!(info.contains("\nActive:         yes\n"), "{info}");
    assert!(info.contains("\nBridge:         rvt1br\n"), "{info}");
    let xml = e.ok(&["net-dumpxml", "t1"]);
    assert!(
        xml.contains("<name>t1</name>") && xml.contains("<uuid>"),
        "{xml}"
    );
    assert_eq!(
        e.ok(&["net-autostart", "t1"]),
        "Network 't1' marked as autostarted\n\n"
    );
    assert!(e
        .ok(&["net-list"])
        .contains(" t1     active   yes         yes"));
    assert_eq!(
        e.ok(&["net-autostart", "--disable", "t1"]),
        "Network 't1' unmarked as autostarted\n\n"
    );
    let leases = e.ok(&["net-dhcp-leases", "t1"]);
    assert!(
        leases.starts_with(
            " Expiry Time   MAC address   Protocol   IP address   Hostname   Client ID or DUID\n"
        ),
        "{leases}"
    );

    // A domain on the network: a TAP on the bridge while it runs, gone when it stops.
    let dom = e.vm1_file("<interface type='network'><source network='t1'/></interface>");
    e.ok(&["define", &dom]);
    e.ok(&["start", "vm1"]);
    let tap = e.ip(&["link", "show", "master", "rvt1br"]);
    assert!(tap.contains("rvnet0"), "TAP on the bridge: {tap}");
    let iflist = e.ok(&["domiflist", "vm1"]);
    assert!(iflist.contains("rvnet0"), "{iflist}");
    let addr = e.ok(&["domifaddr", "vm1"]);
    assert!(addr.starts_with(" Name "), "{addr}");
    let refused = e.err(&["net-destroy", "t1"]);
    assert!(
        refused.contains("guest interface(s) attached (rvnet0)"),
        "{refused}"
    );
    e.ok(&["destroy", "vm1"]);
    assert!(!e.has_link("rvnet0"), "TAP removed when the domain stops");

    // 100 start/destroy cycles of the domain on the running network leak nothing: no TAP is left,
    // the bridge has no ports, the nftables table and dnsmasq are the ones the network started.
    let nft_before = sh(&["ip", "netns", "exec", e.ns(), "nft", "list", "ruleset"]);
    let dnsmasq_before = e.ok(&["net-info", "t1"]);
    for i in 0..100 {
        e.ok(&["start", "vm1"]);
        let ports = e.ip(&["-o", "link", "show", "master", "rvt1br"]);
        assert_eq!(
            ports.lines().count(),
            1,
            "cycle {i}: one TAP on the bridge: {ports}"
        );
        e.ok(&["destroy", "vm1"]);
    }
    let links = e.ip(&["-o", "link"]);
    assert!(
        !links.contains("rvnet"),
        "TAPs left after 100 cycles: {links}"
    );
    assert_eq!(e.ip(&["-o", "link", "show", "master", "rvt1br"]), "");
    let nft_after = sh(&["ip", "netns", "exec", e.ns(), "nft", "list", "ruleset"]);
    assert_eq!(
        String::from_utf8_lossy(&nft_before.stdout),
        String::from_utf8_lossy(&nft_after.stdout),
        "nftables ruleset changed over 100 domain cycles"
    );
    assert_eq!(dnsmasq_before, e.ok(&["net-info", "t1"]));
    let dnsmasqs = sh(&["ip", "netns", "pids", e.ns()]);
    let count = String::from_utf8_lossy(&dnsmasqs.stdout)
        .split_whitespace()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "dnsmasq")
        })
        .count();
    assert_eq!(count, 1, "one dnsmasq for t1 after 100 domain cycles");

    // Bad input: overlaps, nothing half-created.
    let o = e.file("o.xml", &net_xml("o", "rvobr", "10.77.3"));
    let msg = e.err(&["net-define", &o]);
    assert!(
        msg.contains("overlaps the host route 10.77.0.0/16"),
        "{msg}"
    );
    let o2 = e.file("o2.xml", &net_xml("o2", "rvo2br", "10.99.1"));
    let msg = e.err(&["net-define", &o2]);
    assert!(msg.contains("overlaps") && msg.contains("t1"), "{msg}");
    let all = e.ok(&["net-list", "--all"]);
    assert!(!all.contains(" o ") && !all.contains(" o2 "), "{all}");
    assert!(!e.dir.path().join("state/networks/o.xml").exists());
    assert!(!e.has_link("rvobr") && !e.has_link("rvo2br"));
    let msg = e.err(&["net-start", "nope"]);
    assert!(
        msg.starts_with("error: failed to get network 'nope'\n"),
        "{msg}"
    );

    // Stop and remove.
    assert_eq!(e.ok(&["net-destroy", "t1"]), "Network 't1' destroyed\n\n");
    assert!(!e.has_link("rvt1br"), "bridge removed");
    let msg = e.err(&["net-undefine", "t1"]);
    assert!(msg.contains("is used by domain(s) 'vm1'"), "{msg}");
    assert!(e.dir.path().join("state/networks/t1.xml").exists());
    e.ok(&["undefine", "vm1"]);
    assert_eq!(
        e.ok(&["net-undefine", "t1"]),
        "Network 't1' has been undefined\n\n"
    );
    assert!(!e.ok(&["net-list", "--all"]).contains(" t1 "));
}
