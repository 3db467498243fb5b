//! Networks started for real inside network namespaces the test creates: a "host" namespace runs
//! the manager (bridge, nftables, dnsmasq), "guest" namespaces join the bridge over veth pairs and
//! use busybox udhcpc, and an "outside" namespace sits behind the host. Nothing touches the
//! machine's own namespace. Skips with a reason when root, `ip netns`, dnsmasq or nft are absent.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;

use rvirt_net::{InterfaceSource, NetError, NetworkManager};

fn sh(args: &[&str]) -> std::process::Output {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn ok(args: &[&str]) -> String {
    let o = sh(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root for network namespaces".into());
    }
    for tool in ["ip", "nft", "dnsmasq", "busybox"] {
        let found = ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).exists());
        if !found {
            return Some(format!(
                "{tool} is not installed (scripts/install-deps installs it)"
            ));
        }
    }
    // One probe name per call: tests run in parallel.
    static PROBE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = PROBE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("rvnt-probe{n}-{}", std::process::id());
    if !sh(&["ip", "netns", "add", &probe]).status.success() {
        return Some("cannot create network namespaces".into());
    }
    let _ = sh(&["ip", "netns", "del", &probe]);
    None
}

macro_rules! skip_if_unsupported {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP: {why}");
            return;
        }
    };
}

/// Namespaces made by one test; dropping it kills their processes and deletes them.
struct Netns {
    names: Vec<String>,
}

impl Netns {
    fn new(tag: &str, roles: &[&str]) -> Netns {
        let mut n = Netns { names: Vec::new() };
        for r in roles {
            let name = format!("rvnt-{tag}-{r}-{}", std::process::id());
            let _ = sh(&["ip", "netns", "del", &name]);
            ok(&["ip", "netns", "add", &name]);
            ok(&["ip", "-n", &name, "link", "set", "lo", "up"]);
            n.names.push(name);
        }
        n
    }

    fn name(&self, role: &str) -> &str {
        self.names
            .iter()
            .find(|n| n.contains(&format!("-{role}-")))
            .expect("known role")
    }

    fn pids(&self, ns: &str) -> Vec<i32> {
        String::from_utf8_lossy(&sh(&["ip", "netns", "pids", ns]).stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    fn exec(&self, role: &str, args: &[&str]) -> std::process::Output {
        let mut full = vec!["ip", "netns", "exec", self.name(role)];
        full.extend_from_slice(args);
        sh(&full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for ns in &self.names {
            for pid in self.pids(ns) {
                // SAFETY: kill(2) on a process that lives in a namespace this test created.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = sh(&["ip", "netns", "del", ns]);
        }
    }
}

/// Runs `f` on a thread that has joined the namespace `ns`; children it spawns inherit it.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns on an open netns file for this thread only; the fd outlives the call.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap_or_else(|p| std::panic::resume_unwind(p))
}

struct Dirs {
    _tmp: tempfile::TempDir,
    state: std::path::PathBuf,
    run: std::path::PathBuf,
}

fn dirs() -> Dirs {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let run = tmp.path().join("run");
    Dirs {
        _tmp: tmp,
        state,
        run,
    }
}

fn manager(d: &Dirs) -> NetworkManager {
    NetworkManager::open(&d.state, &d.run).unwrap()
}

const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
  deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
  bound|renew)
    ip addr add "$ip/$subnet" dev "$interface"
    for r in $router; do ip route replace default via "$r" dev "$interface"; break; done ;;
esac
"#;

/// Gives guest namespace `role` an eth0 on `bridge` (in the host namespace) and runs udhcpc.
/// Returns the leased address.
fn dhcp_guest(ns: &Netns, role: &str, bridge: &str, script: &Path) -> String {
    let host = ns.name("host").to_owned();
    let hside = format!("rv{role}h");
    if !ns
        .exec("host", &["ip", "link", "show", &hside])
        .status
        .success()
    {
        ok(&[
            "ip",
            "-n",
            &host,
            "link",
            "add",
            &hside,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(role),
        ]);
    }
    ok(&[
        "ip", "-n", &host, "link", "set", &hside, "master", bridge, "up",
    ]);
    ok(&["ip", "-n", ns.name(role), "addr", "flush", "dev", "eth0"]);
    ok(&["ip", "-n", ns.name(role), "link", "set", "eth0", "up"]);
    let hostname = format!("hostname:{role}");
    let s = script.to_str().unwrap();
    let o = ns.exec(
        role,
        &[
            "busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f", "-t", "10", "-T", "1", "-x",
            &hostname, "-s", s,
        ],
    );
    assert!(
        o.status.success(),
        "udhcpc in {role}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let show = ok(&[
        "ip",
        "-n",
        ns.name(role),
        "-4",
        "-o",
        "addr",
        "show",
        "dev",
        "eth0",
    ]);
    show.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

fn pings(ns: &Netns, role: &str, ip: &str) -> bool {
    ns.exec(role, &["busybox", "ping", "-c", "1", "-W", "2", ip])
        .status
        .success()
}

fn write_script(d: &Dirs) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let p = d._tmp.path().join("udhcpc.sh");
    std::fs::write(&p, UDHCPC_SCRIPT).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

const NAT_XML: &str = "<network><name>natnet</name><forward mode='nat'/>\
    <bridge name='rvtnat0' stp='off'/>\
    <ip address='10.123.0.1' netmask='255.255.255.0'><dhcp><range start='10.123.0.100' end='10.123.0.150'/></dhcp></ip>\
    </network>";

const ISO_XML: &str = "<network><name>isonet</name>\
    <bridge name='rvtiso0' stp='off'/>\
    <ip address='10.124.0.1' prefix='24'><dhcp><range start='10.124.0.100' end='10.124.0.150'/></dhcp></ip>\
    </network>";

/// An outside namespace at 10.99.0.2 behind the host's 10.99.0.1; it has no route to guests, so
/// it can only answer them if their traffic was masqueraded to the host's address.
fn wire_outside(ns: &Netns) {
    let (host, out) = (ns.name("host"), ns.name("out"));
    ok(&[
        "ip", "-n", host, "link", "add", "rvup0", "type", "veth", "peer", "name", "eth0", "netns",
        out,
    ]);
    ok(&[
        "ip",
        "-n",
        host,
        "addr",
        "add",
        "10.99.0.1/24",
        "dev",
        "rvup0",
    ]);
    ok(&["ip", "-n", host, "link", "set", "rvup0", "up"]);
    ok(&[
        "ip",
        "-n",
        out,
        "addr",
        "add",
        "10.99.0.2/24",
        "dev",
        "eth0",
    ]);
    ok(&["ip", "-n", out, "link", "set", "eth0", "up"]);
}

/// The source address the outside sees for a TCP connection from guest `role`.
fn outside_sees(ns: &Netns, role: &str) -> Option<String> {
    if !Path::new("/usr/bin/python3").exists() {
        eprintln!("python3 missing: not checking the source address seen outside");
        return None;
    }
    let server =
        "import socket;s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);\
        s.bind(('10.99.0.2',7007));s.listen(1);s.settimeout(10);c,a=s.accept();print(a[0])";
    let child = Command::new("ip")
        .args(["netns", "exec", ns.name("out"), "python3", "-c", server])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    for _ in 0..50 {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if ns
            .exec(role, &["busybox", "nc", "-w", "2", "10.99.0.2", "7007"])
            .status
            .success()
        {
            break;
        }
    }
    let out = child.wait_with_output().unwrap();
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn nat_and_isolated_networks_with_dhcp_dns_and_masquerade() {
    skip_if_unsupported!();
    let ns = Netns::new("nat", &["host", "g1", "g2", "out"]);
    let d = dirs();
    let script = write_script(&d);
    wire_outside(&ns);
    let host = ns.name("host").to_owned();
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = NetworkManager::open(&state, &run).unwrap();
        m.define(NAT_XML).unwrap();
        m.start("natnet").unwrap();
        assert!(m.is_active("natnet"));
    });

    let ip1 = dhcp_guest(&ns, "g1", "rvtnat0", &script);
    let ip2 = dhcp_guest(&ns, "g2", "rvtnat0", &script);
    assert!(
        ip1.starts_with("10.123.0.") && ip2.starts_with("10.123.0.") && ip1 != ip2,
        "{ip1} {ip2}"
    );

    let (state, run) = (d.state.clone(), d.run.clone());
    let leases = in_netns(&host, move || {
        manager_at(&state, &run).leases("natnet").unwrap()
    });
    let mut names: Vec<_> = leases
        .iter()
        .map(|l| (l.hostname.clone().unwrap_or_default(), l.ip.to_string()))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            ("g1".to_string(), ip1.clone()),
            ("g2".to_string(), ip2.clone())
        ]
    );

    // domifaddr: the lease of g1's MAC, seen by a new manager (a restarted daemon).
    let mac_line = ok(&["ip", "-n", ns.name("g1"), "-o", "link", "show", "eth0"]);
    let mac: rvirt_net::MacAddr = mac_line
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let (state, run) = (d.state.clone(), d.run.clone());
    let pid_before = std::fs::read_to_string(d.run.join("networks/natnet.pid")).unwrap();
    let lease = in_netns(&host, move || {
        manager_at(&state, &run)
            .lease_for_mac("natnet", mac)
            .unwrap()
    });
    assert_eq!(lease.map(|l| l.ip.to_string()), Some(ip1.clone()));
    assert_eq!(
        pid_before,
        std::fs::read_to_string(d.run.join("networks/natnet.pid")).unwrap()
    );
    let (state, run) = (d.state.clone(), d.run.clone());
    let rows = in_netns(&host, move || {
        manager_at(&state, &run).dhcp_leases("natnet").unwrap()
    });
    let row = rows
        .iter()
        .find(|r| r.ipaddr == ip1)
        .expect("g1 in net-dhcp-leases");
    assert_eq!(
        (row.iface.as_str(), row.prefix, row.r#type),
        ("rvtnat0", 24, "ipv4")
    );
    assert_eq!(row.mac, mac.to_string());
    assert!(row.expirytime > 0);

    assert!(pings(&ns, "g1", &ip2), "guest to guest");
    assert!(pings(&ns, "g2", "10.123.0.1"), "guest to gateway");
    let look = ns.exec("g1", &["busybox", "nslookup", "g2", "10.123.0.1"]);
    let text = String::from_utf8_lossy(&look.stdout);
    assert!(
        text.contains(&ip2),
        "g1 resolves g2 through dnsmasq: {text}"
    );
    assert!(
        pings(&ns, "g1", "10.99.0.2"),
        "guest reaches the outside through NAT"
    );
    if let Some(seen) = outside_sees(&ns, "g1") {
        assert_eq!(seen, "10.99.0.1", "the outside sees the host's address");
    }

    // Isolated: same guests on a new bridge reach each other, not the outside.
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        m.destroy("natnet", false).unwrap();
        m.define(ISO_XML).unwrap();
        m.start("isonet").unwrap();
    });
    let ip1 = dhcp_guest(&ns, "g1", "rvtiso0", &script);
    let ip2 = dhcp_guest(&ns, "g2", "rvtiso0", &script);
    assert!(
        ip1.starts_with("10.124.0.") && ip2.starts_with("10.124.0."),
        "{ip1} {ip2}"
    );
    assert!(pings(&ns, "g1", &ip2), "isolated: guest to guest");
    assert!(pings(&ns, "g1", "10.124.0.1"), "isolated: guest to host");
    assert!(!pings(&ns, "g1", "10.99.0.2"), "isolated: no way out");

    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        m.destroy("isonet", false).unwrap();
        assert_no_leftovers(&run);
    });
    assert!(
        ns.pids(&host).is_empty(),
        "dnsmasq left running: {:?}",
        ns.pids(&host)
    );
}

fn manager_at(state: &Path, run: &Path) -> NetworkManager {
    NetworkManager::open(state, run).unwrap()
}

/// No rvirt-owned link, no rvirt nftables table, no dnsmasq pid file in this namespace.
fn assert_no_leftovers(run: &Path) {
    let links = ok(&["ip", "-o", "link", "show"]);
    let ours: Vec<&str> = links
        .lines()
        .filter(|l| l.contains("rvtnat0") || l.contains("rvtiso0") || l.contains("rvnet"))
        .collect();
    assert!(ours.is_empty(), "links left: {ours:?}");
    let aliases = ok(&["ip", "-d", "link", "show"]);
    assert!(
        !aliases.contains("alias rvirt:"),
        "rvirt-owned links left:\n{aliases}"
    );
    let nft = sh(&["nft", "list", "table", "ip", "rvirt"]);
    assert!(
        !nft.status.success(),
        "nft table left: {}",
        String::from_utf8_lossy(&nft.stdout)
    );
    let pids: Vec<_> = std::fs::read_dir(run.join("networks"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
        .collect();
    assert!(pids.is_empty(), "pid files left");
}

#[test]
fn start_stop_100_times_leaks_nothing_and_taps_attach() {
    skip_if_unsupported!();
    let ns = Netns::new("loop", &["host"]);
    let d = dirs();
    let host = ns.name("host").to_owned();
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        m.define(NAT_XML).unwrap();
        for i in 0..100 {
            m.start("natnet")
                .unwrap_or_else(|e| panic!("start {i}: {e}"));
            let tap = m
                .attach_interface("vm1", &InterfaceSource::Network("natnet".into()))
                .unwrap();
            assert!(tap.tap.starts_with("rvnet"));
            let shown = ok(&["ip", "-d", "link", "show", &tap.tap]);
            assert!(
                shown.contains("master rvtnat0") && shown.contains("tun"),
                "{shown}"
            );
            if i == 0 {
                let e = m.destroy("natnet", false).unwrap_err();
                assert!(matches!(e, NetError::InUse { .. }), "{e}");
            }
            if i % 2 == 0 {
                m.detach_interface("vm1", &tap.tap).unwrap();
            } else {
                // The crash path: the daemon finds the domain's TAPs by their mark.
                let found = m.interfaces_of("vm1").unwrap();
                assert_eq!(found.len(), 1);
                assert_eq!(
                    (found[0].bridge.as_str(), found[0].network.as_deref()),
                    ("rvtnat0", Some("natnet"))
                );
                assert_eq!(m.detach_all("vm1").unwrap(), vec![tap.tap.clone()]);
            }
            m.destroy("natnet", false)
                .unwrap_or_else(|e| panic!("destroy {i}: {e}"));
        }
        assert_no_leftovers(&run);
    });
    assert!(
        ns.pids(&host).is_empty(),
        "processes left: {:?}",
        ns.pids(&host)
    );
}

#[test]
fn bridge_mode_and_bad_input() {
    skip_if_unsupported!();
    let ns = Netns::new("bad", &["host"]);
    let d = dirs();
    let host = ns.name("host").to_owned();
    ok(&["ip", "-n", &host, "link", "add", "rvtbr9", "type", "bridge"]);
    ok(&[
        "ip", "-n", &host, "link", "add", "used0", "type", "veth", "peer", "name", "used0p",
    ]);
    ok(&[
        "ip",
        "-n",
        &host,
        "addr",
        "add",
        "10.50.0.1/16",
        "dev",
        "used0",
    ]);
    ok(&["ip", "-n", &host, "link", "set", "used0", "up"]);
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        // Bridge mode on a host bridge: TAPs join it; the bridge itself is never changed.
        m.define(
            "<network><name>hb</name><forward mode='bridge'/><bridge name='rvtbr9'/></network>",
        )
        .unwrap();
        m.start("hb").unwrap();
        let tap = m
            .attach_interface("vm", &InterfaceSource::Network("hb".into()))
            .unwrap();
        assert_eq!(tap.bridge, "rvtbr9");
        assert!(ok(&["ip", "link", "show", &tap.tap]).contains("master rvtbr9"));
        let direct = m
            .attach_interface("vm", &InterfaceSource::Bridge("rvtbr9".into()))
            .unwrap();
        m.detach_interface("vm", &direct.tap).unwrap();
        m.detach_interface("vm", &tap.tap).unwrap();
        m.destroy("hb", false).unwrap();
        assert!(
            ok(&["ip", "link", "show", "rvtbr9"]).contains("rvtbr9"),
            "host bridge kept"
        );

        // A foreign link that merely looks like rvirt's is skipped and never removed.
        ok(&["ip", "link", "add", "rvnet0", "type", "bridge"]);
        let t = m
            .attach_interface("vm", &InterfaceSource::Bridge("rvtbr9".into()))
            .unwrap();
        assert_eq!(t.tap, "rvnet1");
        let e = m.detach_interface("vm", "rvnet0").unwrap_err();
        assert!(e.to_string().contains("not owned by rvirt"), "{e}");
        let e = m.detach_interface("other-vm", &t.tap).unwrap_err();
        assert!(e.to_string().contains("not owned by rvirt"), "{e}");
        assert_eq!(m.detach_all("vm").unwrap(), vec!["rvnet1".to_string()]);
        assert!(ok(&["ip", "link", "show", "rvnet0"]).contains("rvnet0"));
        ok(&["ip", "link", "del", "rvnet0"]);

        let e = m
            .attach_interface("vm", &InterfaceSource::Bridge("nosuchbr".into()))
            .unwrap_err();
        assert!(
            e.to_string().contains("bridge 'nosuchbr' does not exist"),
            "{e}"
        );
        m.define(
            "<network><name>gone</name><forward mode='bridge'/><bridge name='nosuchbr'/></network>",
        )
        .unwrap();
        let e = m.start("gone").unwrap_err();
        assert!(matches!(e, NetError::MissingHostBridge(_)), "{e}");
        assert!(!m.is_active("gone"));

        // Overlap with a host route, a link name in use, a bad range, another network's subnet.
        let e = m.define("<network><name>o</name><bridge name='rvto0'/><ip address='10.50.3.1' prefix='24'/></network>").unwrap_err();
        assert!(
            e.to_string().contains("host route 10.50.0.0/16 on used0"),
            "{e}"
        );
        let e = m.define("<network><name>u</name><bridge name='used0'/><ip address='10.60.0.1' prefix='24'/></network>").unwrap_err();
        assert!(
            e.to_string()
                .contains("bridge name 'used0' is already used"),
            "{e}"
        );
        let e = m.define("<network><name>r</name><bridge name='rvtr0'/><ip address='10.61.0.1' prefix='24'><dhcp><range start='10.61.0.9' end='10.61.0.2'/></dhcp></ip></network>").unwrap_err();
        assert!(e.to_string().contains("starts after it ends"), "{e}");
        m.define(NAT_XML).unwrap();
        let e = m.define("<network><name>twin</name><bridge name='rvtw0'/><ip address='10.123.0.129' prefix='25'/></network>").unwrap_err();
        assert!(e.to_string().contains("overlaps network 'natnet'"), "{e}");
        let e = m
            .define("<network><name>x</name>\n<bridge name='a' stp='maybe'/></network>")
            .unwrap_err();
        assert!(e.to_string().contains("line 2"), "{e}");
        let names: Vec<String> = m.list().unwrap().into_iter().map(|n| n.name).collect();
        assert_eq!(names, ["gone", "hb", "natnet"], "nothing half-defined");

        // A bridge name taken after define: start refuses and leaves nothing behind.
        ok(&["ip", "link", "add", "rvtnat0", "type", "bridge"]);
        let e = m.start("natnet").unwrap_err();
        assert!(e.to_string().contains("rvtnat0"), "{e}");
        assert!(!m.is_active("natnet"));
        ok(&["ip", "link", "del", "rvtnat0"]);
        assert!(sh(&["nft", "list", "table", "ip", "rvirt"]).status.code() != Some(0));

        // A failure late in start (dnsmasq's config cannot be written) undoes the bridge and rules.
        let blocker = run.join("networks/natnet.conf");
        std::fs::create_dir_all(&blocker).unwrap();
        let e = m.start("natnet").unwrap_err();
        assert!(e.to_string().contains("natnet.conf"), "{e}");
        assert!(!m.is_active("natnet"));
        assert!(
            !sh(&["ip", "link", "show", "rvtnat0"]).status.success(),
            "bridge left behind"
        );
        assert!(sh(&["nft", "list", "table", "ip", "rvirt"]).status.code() != Some(0));
        std::fs::remove_dir(&blocker).unwrap();

        // Restart of the daemon: a new manager sees the running network and stops it.
        m.start("natnet").unwrap();
        drop(m);
        let m2 = manager_at(&state, &run);
        assert!(m2
            .list()
            .unwrap()
            .iter()
            .any(|n| n.name == "natnet" && n.active));
        let e = m2.start("natnet").unwrap_err();
        assert!(matches!(e, NetError::AlreadyActive(_)), "{e}");
        m2.destroy("natnet", false).unwrap();

        // A running network whose bridge vanished is stopped by reconcile, leftovers and all.
        m2.start("natnet").unwrap();
        assert!(
            m2.reconcile().unwrap().is_empty(),
            "a healthy network is left alone"
        );
        ok(&["ip", "link", "del", "rvtnat0"]);
        assert_eq!(m2.reconcile().unwrap(), ["natnet"]);
        assert!(!m2.is_active("natnet"));
        assert!(sh(&["nft", "list", "table", "ip", "rvirt"]).status.code() != Some(0));
        assert!(m2.undefine("natnet").is_ok());
        assert_no_leftovers(&run);
    });
    assert!(ns.pids(&host).is_empty());
}

#[test]
fn default_network_is_defined_once_on_a_free_subnet() {
    skip_if_unsupported!();
    let ns = Netns::new("def", &["host"]);
    let d = dirs();
    let host = ns.name("host").to_owned();
    ok(&[
        "ip", "-n", &host, "link", "add", "lan0", "type", "veth", "peer", "name", "lan0p",
    ]);
    ok(&[
        "ip",
        "-n",
        &host,
        "addr",
        "add",
        "192.168.122.7/24",
        "dev",
        "lan0",
    ]);
    ok(&["ip", "-n", &host, "link", "set", "lan0", "up"]);
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        let def = m
            .ensure_default()
            .unwrap()
            .expect("first run defines default");
        let ip = def.ip.unwrap();
        assert_eq!(ip.address.to_string(), "192.168.123.1");
        assert!(!m.is_active("default"), "defined, not started");
        assert!(m.ensure_default().unwrap().is_none());
        m.set_autostart("default", true).unwrap();
        assert!(m.autostart_all().is_empty());
        let row = m
            .list()
            .unwrap()
            .into_iter()
            .find(|n| n.name == "default")
            .unwrap();
        assert!(row.active && row.autostart && row.persistent, "{row:?}");
        assert_eq!(row.bridge, "rvirbr0");
        assert!(ok(&["ip", "-4", "addr", "show", "rvirbr0"]).contains("192.168.123.1/24"));
        let e = m.undefine("default").unwrap_err();
        assert!(matches!(e, NetError::Active(_)), "{e}");
        m.destroy("default", false).unwrap();
        m.set_autostart("default", false).unwrap();
        m.undefine("default").unwrap();
        assert!(
            m.ensure_default().unwrap().is_none(),
            "an undefined default stays undefined"
        );
    });
    let _ = manager(&d);
}

#[test]
fn manager_works_when_called_from_async_code() {
    skip_if_unsupported!();
    let ns = Netns::new("async", &["host"]);
    let d = dirs();
    let host = ns.name("host").to_owned();
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let m = manager_at(&state, &run);
            m.define(ISO_XML).unwrap();
            m.start("isonet").unwrap();
            let tap = m
                .attach_interface("vm", &InterfaceSource::Network("isonet".into()))
                .unwrap();
            assert!(ok(&["ip", "link", "show", &tap.tap]).contains("master rvtiso0"));
            m.detach_interface("vm", &tap.tap).unwrap();
            m.destroy("isonet", false).unwrap();
        });
        assert_no_leftovers(&run);
    });
    assert!(ns.pids(&host).is_empty());
}

/// An rvirtd restart is a new `NetworkManager` over the same directories: the running network,
/// its dnsmasq process (same pid, still serving DHCP) and its TAPs are kept; only a network
/// whose bridge vanished is cleaned up by `reconcile` (dnsmasq stopped, rules removed).
#[test]
fn restart_keeps_running_networks_and_their_dnsmasq() {
    skip_if_unsupported!();
    let ns = Netns::new("rst", &["host", "g1"]);
    let d = dirs();
    let script = write_script(&d);
    let host = ns.name("host").to_owned();
    let (state, run) = (d.state.clone(), d.run.clone());
    let tap = in_netns(&host, move || {
        let m = manager_at(&state, &run);
        m.define(NAT_XML).unwrap();
        m.start("natnet").unwrap();
        m.attach_interface("vm1", &InterfaceSource::Network("natnet".into()))
            .unwrap()
            .tap
        // The manager is dropped here, as when rvirtd stops.
    });
    let pid_file = d.run.join("networks/natnet.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();

    let (state, run) = (d.state.clone(), d.run.clone());
    let tap2 = tap.clone();
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        assert_eq!(m.reconcile().unwrap(), Vec::<String>::new());
        m.ensure_default().unwrap();
        assert!(m.autostart_all().is_empty());
        assert!(m.is_active("natnet"), "natnet still active after a restart");
        let info = m.list().unwrap();
        assert!(
            info.iter().any(|n| n.name == "natnet" && n.active),
            "{info:?}"
        );
        let e = m.start("natnet").unwrap_err();
        assert!(matches!(e, NetError::AlreadyActive(_)), "{e}");
        let found = m.interfaces_of("vm1").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].tap, tap2);
        let e = m.destroy("natnet", false).unwrap_err();
        assert!(
            e.to_string().contains("attached") && e.to_string().contains(&tap2),
            "{e}"
        );
    });
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        pid.to_string(),
        "same dnsmasq after the restart"
    );
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "dnsmasq {pid} still runs"
    );
    // The kept dnsmasq still serves: a guest gets a lease after the restart.
    let ip = dhcp_guest(&ns, "g1", "rvtnat0", &script);
    assert!(ip.starts_with("10.123.0."), "{ip}");

    // The bridge vanishes behind rvirt's back (the host was reconfigured): the next start
    // marks the network stopped and removes its dnsmasq and rules.
    ok(&["ip", "-n", &host, "link", "del", "rvtnat0"]);
    let (state, run) = (d.state.clone(), d.run.clone());
    in_netns(&host, move || {
        let m = manager_at(&state, &run);
        assert_eq!(m.reconcile().unwrap(), vec!["natnet".to_string()]);
        assert!(!m.is_active("natnet"));
        m.detach_all("vm1").unwrap();
        assert_no_leftovers(&run);
    });
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists() || {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            stat.contains(") Z ")
        },
        "dnsmasq {pid} stopped with its vanished network"
    );
}
