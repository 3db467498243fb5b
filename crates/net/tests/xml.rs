//! libvirt network XML: parsing real files, round trips, errors with positions, validation.

use std::net::Ipv4Addr;

use rvirt_net::validate::{default_network, pick_default_subnet};
use rvirt_net::xml::{parse, to_xml};
use rvirt_net::{validate, ForwardMode, HostView, Ipv4Net, ValidateError};

fn data(name: &str) -> String {
    std::fs::read_to_string(format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn parses_libvirt_default_network() {
    let def = parse(&data("default.xml")).unwrap();
    assert_eq!(def.name, "default");
    assert_eq!(def.forward, ForwardMode::Nat);
    let b = def.bridge.as_ref().unwrap();
    assert_eq!((b.name.as_str(), b.stp, b.delay), ("virbr0", true, 0));
    assert_eq!(def.mac.unwrap().to_string(), "52:54:00:0a:cd:21");
    let ip = def.ip.as_ref().unwrap();
    assert_eq!(ip.address, Ipv4Addr::new(192, 168, 122, 1));
    assert_eq!(ip.prefix, 24);
    let r = &ip.dhcp.as_ref().unwrap().ranges[0];
    assert_eq!(
        (r.start, r.end),
        (
            Ipv4Addr::new(192, 168, 122, 2),
            Ipv4Addr::new(192, 168, 122, 254)
        )
    );
    validate(&def, &HostView::default()).unwrap();
}

#[test]
fn parses_modes_and_extras() {
    let full = parse(&data("full.xml")).unwrap();
    assert_eq!(full.domain.as_deref(), Some("lab.example"));
    assert_eq!(full.dns_hosts[0].hostnames, ["db", "db.lab.example"]);
    let dhcp = full.ip.as_ref().unwrap().dhcp.as_ref().unwrap();
    assert_eq!(dhcp.hosts.len(), 2);
    assert_eq!(dhcp.hosts[1].mac, None);
    assert!(!full.bridge.as_ref().unwrap().stp);
    assert_eq!(
        parse(&data("isolated.xml")).unwrap().forward,
        ForwardMode::Isolated
    );
    let hb = parse(&data("host-bridge.xml")).unwrap();
    assert_eq!(hb.forward, ForwardMode::Bridge);
    assert_eq!(hb.bridge.unwrap().name, "br0");
}

#[test]
fn round_trips() {
    for f in ["default.xml", "full.xml", "isolated.xml", "host-bridge.xml"] {
        let def = parse(&data(f)).unwrap();
        let written = to_xml(&def);
        let again = parse(&written).unwrap_or_else(|e| panic!("{f}: {e}\n{written}"));
        assert_eq!(def, again, "{f} changed in a round trip:\n{written}");
        assert_eq!(written, to_xml(&again));
    }
}

#[test]
fn errors_carry_positions() {
    let e = parse("<network>\n  <name>x</name>\n  <forward mode='vepa'/>\n</network>").unwrap_err();
    assert_eq!((e.line, e.column), (3, 3), "{e}");
    assert!(e.to_string().contains("vepa"), "{e}");
    let e = parse("<network>\n<name>x</name>\n<ip address='10.0.0.300' prefix='24'/></network>")
        .unwrap_err();
    assert_eq!(e.line, 3, "{e}");
    assert!(e.to_string().contains("10.0.0.300"), "{e}");
    let e = parse("<network>\n  <name>x</name>\n  <bridge name='a'>\n</network>").unwrap_err();
    assert!(e.to_string().contains("malformed"), "{e}");
    assert_eq!(e.line, 4, "{e}");
    let e =
        parse("<network><name>x</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>")
            .unwrap_err();
    assert!(e.to_string().contains("not contiguous"), "{e}");
    assert!(parse("<domain/>")
        .unwrap_err()
        .to_string()
        .contains("expected <network>"));
    assert!(parse("<network><forward mode='bridge'/><name>b</name></network>").is_err());
}

fn with_range(start: &str, end: &str) -> String {
    format!(
        "<network><name>t</name><bridge name='rvt0'/><ip address='10.9.0.1' netmask='255.255.255.0'>\
         <dhcp><range start='{start}' end='{end}'/></dhcp></ip></network>"
    )
}

#[test]
fn rejects_invalid_ranges() {
    let host = HostView::default();
    for (s, e, want) in [
        ("10.9.1.2", "10.9.1.9", "not inside the subnet"),
        ("10.9.0.50", "10.9.0.10", "starts after it ends"),
        ("10.9.0.1", "10.9.0.9", "includes the gateway"),
        ("10.9.0.2", "10.9.0.255", "broadcast"),
    ] {
        let err = validate(&parse(&with_range(s, e)).unwrap(), &host).unwrap_err();
        assert!(matches!(err, ValidateError::BadRange { .. }), "{err}");
        assert!(err.to_string().contains(want), "{s}-{e}: {err}");
    }
    validate(
        &parse(&with_range("10.9.0.2", "10.9.0.254")).unwrap(),
        &host,
    )
    .unwrap();
}

#[test]
fn rejects_overlaps_and_bridge_reuse() {
    let def = parse(&with_range("10.9.0.2", "10.9.0.254")).unwrap();
    let mut other = parse(&data("default.xml")).unwrap();
    other.ip.as_mut().unwrap().address = Ipv4Addr::new(10, 9, 0, 129);
    other.ip.as_mut().unwrap().prefix = 25;
    let host = HostView {
        networks: vec![other.clone()],
        ..Default::default()
    };
    let err = validate(&def, &host).unwrap_err();
    assert!(
        err.to_string().contains("overlaps network 'default'"),
        "{err}"
    );

    other.bridge.as_mut().unwrap().name = "rvt0".into();
    let err = validate(
        &def,
        &HostView {
            networks: vec![other],
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, ValidateError::BridgeInUse { .. }), "{err}");

    let routes = vec![("10.0.0.0/8".parse::<Ipv4Net>().unwrap(), "eth0".to_string())];
    let err = validate(
        &def,
        &HostView {
            routes,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("host route 10.0.0.0/8 on eth0"),
        "{err}"
    );
}

#[test]
fn default_subnet_avoids_routes() {
    let r = |s: &str| (s.parse::<Ipv4Net>().unwrap(), "eth0".to_string());
    let free = HostView {
        routes: vec![r("0.0.0.0/0"), r("10.0.0.0/8")],
        ..Default::default()
    };
    assert_eq!(
        pick_default_subnet(&free).unwrap().to_string(),
        "192.168.122.0/24"
    );
    let busy = HostView {
        routes: vec![r("192.168.122.0/24"), r("192.168.123.0/25")],
        ..Default::default()
    };
    let subnet = pick_default_subnet(&busy).unwrap();
    assert_eq!(subnet.to_string(), "192.168.124.0/24");
    let def = default_network(subnet);
    assert_eq!(def.bridge.as_ref().unwrap().name, "rvirbr0");
    validate(&def, &busy).unwrap();
    assert_eq!(parse(&to_xml(&def)).unwrap(), def);
}

#[test]
fn packaged_default_with_ipv6_is_accepted_ipv4_only() {
    // The shape some distributions ship as their packaged default network.
    let def = parse(
        "<network>\n  <name>default</name>\n  <bridge name=\"virbr0\"/>\n  <forward mode=\"nat\"/>\n\
         <ip address=\"192.168.122.1\" netmask=\"255.255.255.0\">\n    <dhcp>\n\
         <range start=\"192.168.122.2\" end=\"192.168.122.254\"/>\n    </dhcp>\n  </ip>\n\
         <ip family=\"ipv6\" address=\"2001:db8:ca2:2::1\" prefix=\"64\"/>\n</network>\n",
    )
    .unwrap();
    assert_eq!(def.ip.unwrap().address, Ipv4Addr::new(192, 168, 122, 1));
    let e = parse("<network><name>r</name><forward mode='route'/></network>").unwrap_err();
    assert!(
        e.to_string()
            .contains("forward mode 'route' is not supported"),
        "{e}"
    );
}

#[test]
fn damaged_documents_give_errors_not_panics() {
    let src = data("full.xml").replace("lab.example", "läb.exämple");
    let bytes = src.as_bytes();
    let mut errors = 0;
    for cut in 0..bytes.len() {
        if let Ok(s) = std::str::from_utf8(&bytes[..cut]) {
            errors += usize::from(parse(s).is_err());
        }
    }
    assert!(errors > bytes.len() / 2, "truncations should mostly fail");
    for (i, c) in src.char_indices() {
        for repl in ["<", ">", "'", "/", "&", "\u{e9}", ""] {
            let mut s = String::with_capacity(src.len() + 2);
            s.push_str(&src[..i]);
            s.push_str(repl);
            s.push_str(&src[i + c.len_utf8()..]);
            if let Err(e) = parse(&s) {
                assert!(e.line >= 1 && e.column >= 1, "{e}");
            }
        }
    }
    let e = parse("<network><name>x</name></bridge></network>").unwrap_err();
    assert!(e.line == 1, "{e}");
}

#[test]
fn names_cannot_smuggle_dnsmasq_options() {
    for bad in [
        "<network><name>n</name><domain name='x&#10;dhcp-script=/bin/sh'/></network>",
        "<network><name>n</name><dns><host ip='10.0.0.2'><hostname>a b</hostname></host></dns></network>",
        "<network><name>n</name><bridge name='b'/><ip address='10.0.0.1' prefix='24'><dhcp>\
         <host name='h&#10;x' ip='10.0.0.5'/></dhcp></ip></network>",
        "<network><name>a&#10;b</name></network>",
        "<network><name>.hidden</name></network>",
        "<network><name>n</name><bridge name='br&#10;0'/></network>",
    ] {
        let e = parse(bad).expect_err(bad);
        assert!(e.line >= 1, "{e}");
    }
}
