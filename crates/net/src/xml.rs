//! libvirt network XML: parse into [`NetworkDef`] and write it back.
//!
//! Parsing goes through a small element tree that keeps each element's position, so errors name
//! the line and column of the offending element.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::{Ipv4Net, MacAddr};

/// An XML parse or schema error with its position in the document.
#[derive(Debug, thiserror::Error)]
#[error("network XML line {line}, column {column}: {message}")]
pub struct XmlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// How a network reaches the outside, libvirt's `<forward mode=...>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardMode {
    /// `<forward mode='nat'/>` (also `<forward/>`): masquerade the subnet.
    Nat,
    /// No `<forward>` element: guests reach each other and the host only.
    Isolated,
    /// `<forward mode='bridge'/>`: TAPs join an existing host bridge; rvirt manages no addresses.
    Bridge,
}

impl ForwardMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardMode::Nat => "nat",
            ForwardMode::Isolated => "none",
            ForwardMode::Bridge => "bridge",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BridgeDef {
    pub name: String,
    pub stp: bool,
    pub delay: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpHost {
    pub mac: Option<MacAddr>,
    pub name: Option<String>,
    pub ip: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpRange {
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DhcpDef {
    pub ranges: Vec<DhcpRange>,
    pub hosts: Vec<DhcpHost>,
}

/// `<ip address=... netmask=...|prefix=...>`: the bridge's gateway address and its subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpDef {
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// Whether the source used `prefix=` rather than `netmask=`; kept for round trips.
    pub written_as_prefix: bool,
    pub dhcp: Option<DhcpDef>,
}

impl IpDef {
    pub fn subnet(&self) -> Ipv4Net {
        Ipv4Net::new(self.address, self.prefix).network()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsHost {
    pub ip: Ipv4Addr,
    pub hostnames: Vec<String>,
}

/// A virtual network definition, the subset of libvirt's network XML that rvirt implements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkDef {
    pub name: String,
    pub uuid: Option<String>,
    pub forward: ForwardMode,
    pub bridge: Option<BridgeDef>,
    pub mac: Option<MacAddr>,
    pub domain: Option<String>,
    pub dns_hosts: Vec<DnsHost>,
    pub ip: Option<IpDef>,
}

struct Element {
    name: String,
    attrs: Vec<(String, String)>,
    children: Vec<Element>,
    text: String,
    line: usize,
    column: usize,
}

impl Element {
    fn err(&self, message: impl Into<String>) -> XmlError {
        XmlError {
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }

    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn req_attr(&self, key: &str) -> Result<&str, XmlError> {
        self.attr(key)
            .ok_or_else(|| self.err(format!("<{}> needs the attribute {key}='...'", self.name)))
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.children.iter().find(|c| c.name == name)
    }

    fn children<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    fn ipv4_attr(&self, key: &str) -> Result<Ipv4Addr, XmlError> {
        let v = self.req_attr(key)?;
        v.parse().map_err(|_| {
            self.err(format!(
                "<{}> {key}='{v}' is not an IPv4 address",
                self.name
            ))
        })
    }
}

fn line_col(src: &str, pos: usize) -> (usize, usize) {
    // Bytes, not chars: an error offset may fall inside a multi-byte character.
    let before = &src.as_bytes()[..pos.min(src.len())];
    let line = before.iter().filter(|b| **b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    (line, before.len() - line_start + 1)
}

fn parse_tree(src: &str) -> Result<Element, XmlError> {
    let mut reader = Reader::from_str(src);
    let mut stack: Vec<Element> = Vec::new();
    let mut root: Option<Element> = None;
    loop {
        let start = reader.buffer_position() as usize;
        let event = reader.read_event().map_err(|e| {
            let (line, column) = line_col(src, reader.error_position() as usize);
            XmlError {
                line,
                column,
                message: format!("malformed XML: {e}"),
            }
        })?;
        let open = |e: &quick_xml::events::BytesStart| -> Result<Element, XmlError> {
            let (line, column) = line_col(src, start);
            let mut attrs = Vec::new();
            for a in e.attributes() {
                let a = a.map_err(|err| XmlError {
                    line,
                    column,
                    message: format!("bad attribute: {err}"),
                })?;
                let v = a.unescape_value().map_err(|err| XmlError {
                    line,
                    column,
                    message: format!("bad attribute value: {err}"),
                })?;
                attrs.push((
                    String::from_utf8_lossy(a.key.as_ref()).into_owned(),
                    v.into_owned(),
                ));
            }
            Ok(Element {
                name: String::from_utf8_lossy(e.name().as_ref()).into_owned(),
                attrs,
                children: Vec::new(),
                text: String::new(),
                line,
                column,
            })
        };
        match event {
            Event::Start(e) => stack.push(open(&e)?),
            Event::Empty(e) => {
                let el = open(&e)?;
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::End(_) => {
                let Some(el) = stack.pop() else {
                    let (line, column) = line_col(src, start);
                    return Err(XmlError {
                        line,
                        column,
                        message: "end tag without a start tag".into(),
                    });
                };
                match stack.last_mut() {
                    Some(parent) => parent.children.push(el),
                    None => root = Some(el),
                }
            }
            Event::Text(t) => {
                if let Some(top) = stack.last_mut() {
                    let (line, column) = line_col(src, start);
                    let s = t.unescape().map_err(|e| XmlError {
                        line,
                        column,
                        message: format!("bad text: {e}"),
                    })?;
                    top.text.push_str(&s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(open.err(format!("<{}> is not closed", open.name)));
    }
    root.ok_or(XmlError {
        line: 1,
        column: 1,
        message: "empty document".into(),
    })
}

/// DNS names go into dnsmasq's configuration, so they are held to hostname characters: anything
/// else (a newline especially) could smuggle in dnsmasq options.
fn dns_name(el: &Element, what: &str, v: &str) -> Result<String, XmlError> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(v.to_owned())
    } else {
        Err(el.err(format!(
            "{what} '{}' is not a DNS name (letters, digits, '-', '.', '_')",
            v.escape_debug()
        )))
    }
}

fn yes_no(el: &Element, key: &str, default: bool) -> Result<bool, XmlError> {
    match el.attr(key) {
        None => Ok(default),
        Some("yes" | "on") => Ok(true),
        Some("no" | "off") => Ok(false),
        Some(v) => Err(el.err(format!("<{}> {key}='{v}' must be on or off", el.name))),
    }
}

fn mac_attr(el: &Element, key: &str) -> Result<MacAddr, XmlError> {
    let v = el.req_attr(key)?;
    v.parse()
        .map_err(|_| el.err(format!("<{}> {key}='{v}' is not a MAC address", el.name)))
}

fn prefix_of_netmask(mask: Ipv4Addr) -> Option<u8> {
    let bits = u32::from(mask);
    let prefix = bits.leading_ones();
    (bits.checked_shl(prefix).unwrap_or(0) == 0).then_some(prefix as u8)
}

fn parse_ip(el: &Element) -> Result<IpDef, XmlError> {
    if let Some(family) = el.attr("family") {
        if family != "ipv4" && family != "ipv6" {
            return Err(el.err(format!(
                "<ip family='{family}'> is not supported; rvirt networks are IPv4"
            )));
        }
    }
    let address = el.ipv4_attr("address")?;
    let (prefix, written_as_prefix) = match (el.attr("netmask"), el.attr("prefix")) {
        (Some(_), Some(_)) => return Err(el.err("<ip> takes netmask or prefix, not both")),
        (Some(m), None) => {
            let mask: Ipv4Addr = m
                .parse()
                .map_err(|_| el.err(format!("netmask='{m}' is not an IPv4 netmask")))?;
            let p = prefix_of_netmask(mask)
                .ok_or_else(|| el.err(format!("netmask='{m}' is not contiguous")))?;
            (p, false)
        }
        (None, Some(p)) => {
            let p: u8 = p
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| el.err(format!("prefix='{p}' must be 0..32")))?;
            (p, true)
        }
        (None, None) => return Err(el.err("<ip> needs netmask='...' or prefix='...'")),
    };
    let dhcp = match el.child("dhcp") {
        None => None,
        Some(d) => {
            let mut dhcp = DhcpDef::default();
            for r in d.children("range") {
                dhcp.ranges.push(DhcpRange {
                    start: r.ipv4_attr("start")?,
                    end: r.ipv4_attr("end")?,
                });
            }
            for h in d.children("host") {
                let mac = h.attr("mac").map(|_| mac_attr(h, "mac")).transpose()?;
                let name = h
                    .attr("name")
                    .map(|n| dns_name(h, "host name", n))
                    .transpose()?;
                if mac.is_none() && name.is_none() {
                    return Err(h.err("<dhcp><host> needs mac='...' or name='...'"));
                }
                dhcp.hosts.push(DhcpHost {
                    mac,
                    name,
                    ip: h.ipv4_attr("ip")?,
                });
            }
            Some(dhcp)
        }
    };
    Ok(IpDef {
        address,
        prefix,
        written_as_prefix,
        dhcp,
    })
}

/// Parses libvirt network XML. Unknown elements are ignored, as libvirt ignores what it does not
/// implement for a given mode; IPv6 `<ip>` elements are skipped with a warning; what rvirt cannot
/// honour (other forward modes, a second IPv4 `<ip>`) is an error.
pub fn parse(src: &str) -> Result<NetworkDef, XmlError> {
    let root = parse_tree(src)?;
    if root.name != "network" {
        return Err(root.err(format!(
            "root element is <{}>, expected <network>",
            root.name
        )));
    }
    let name_el = root
        .child("name")
        .ok_or_else(|| root.err("<network> needs a <name>"))?;
    let name = name_el.text.trim().to_owned();
    let bad_char = |c: char| c == '/' || c.is_whitespace() || c.is_control();
    if name.is_empty() || name.len() > 64 || name.starts_with('.') || name.chars().any(bad_char) {
        return Err(name_el.err(format!(
            "network name '{}' must be 1..64 characters, not starting with '.', without '/', spaces or control characters",
            name.escape_debug()
        )));
    }
    let uuid = root.child("uuid").map(|u| u.text.trim().to_owned());
    if let Some(u) = &uuid {
        let hex: String = u.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(root
                .child("uuid")
                .unwrap()
                .err(format!("uuid '{u}' is not a UUID")));
        }
    }
    let forward = match root.child("forward") {
        None => ForwardMode::Isolated,
        Some(f) => match f.attr("mode").unwrap_or("nat") {
            "nat" => ForwardMode::Nat,
            "bridge" => ForwardMode::Bridge,
            other => {
                return Err(f.err(format!(
                    "forward mode '{other}' is not supported; use nat, bridge, or no <forward> for an isolated network"
                )))
            }
        },
    };
    let bridge = root
        .child("bridge")
        .map(|b| -> Result<BridgeDef, XmlError> {
            let name = b.req_attr("name")?.to_owned();
            if name.is_empty()
                || name.len() > 15
                || name
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
            {
                return Err(b.err(format!(
                    "bridge name '{name}' is not a valid interface name (1..15 characters)"
                )));
            }
            let delay = match b.attr("delay") {
                None => 0,
                Some(d) => d
                    .parse()
                    .map_err(|_| b.err(format!("bridge delay='{d}' is not a number")))?,
            };
            Ok(BridgeDef {
                name,
                stp: yes_no(b, "stp", true)?,
                delay,
            })
        })
        .transpose()?;
    let mac = root
        .child("mac")
        .map(|m| mac_attr(m, "address"))
        .transpose()?;
    let domain = root
        .child("domain")
        .map(|d| {
            d.req_attr("name")
                .and_then(|n| dns_name(d, "domain name", n))
        })
        .transpose()?;
    let mut dns_hosts = Vec::new();
    if let Some(dns) = root.child("dns") {
        for h in dns.children("host") {
            let hostnames: Vec<String> = h
                .children("hostname")
                .map(|n| dns_name(n, "hostname", n.text.trim()))
                .collect::<Result<_, _>>()?;
            if hostnames.is_empty() {
                return Err(h.err("<dns><host> needs at least one <hostname>"));
            }
            dns_hosts.push(DnsHost {
                ip: h.ipv4_attr("ip")?,
                hostnames,
            });
        }
    }
    // libvirt's packaged default network may carry an IPv6 <ip>; rvirt networks are IPv4, so
    // such elements are skipped (with a warning) rather than failing a real file.
    let is_v6 = |e: &&Element| {
        e.attr("family") == Some("ipv6") || e.attr("address").is_some_and(|a| a.contains(':'))
    };
    for v6 in root.children("ip").filter(is_v6) {
        log::warn!(
            "network '{name}': line {}: IPv6 <ip> ignored; rvirt networks are IPv4 only",
            v6.line
        );
    }
    let mut ips = root.children("ip").filter(|e| !is_v6(e));
    let ip = ips.next().map(parse_ip).transpose()?;
    if let Some(extra) = ips.next() {
        return Err(extra.err("only one <ip> element is supported"));
    }
    if forward == ForwardMode::Bridge {
        if bridge.is_none() {
            return Err(root.err(
                "forward mode 'bridge' needs <bridge name='...'/> naming an existing host bridge",
            ));
        }
        if ip.is_some() {
            return Err(root
                .child("ip")
                .unwrap()
                .err("forward mode 'bridge' takes no <ip>: addresses belong to the host bridge"));
        }
    }
    Ok(NetworkDef {
        name,
        uuid,
        forward,
        bridge,
        mac,
        domain,
        dns_hosts,
        ip,
    })
}

fn esc(s: &str) -> String {
    quick_xml::escape::escape(s).into_owned()
}

/// Writes the definition as libvirt network XML (what `net-dumpxml` prints).
pub fn to_xml(def: &NetworkDef) -> String {
    let mut o = String::new();
    o.push_str("<network>\n");
    let _ = writeln!(o, "  <name>{}</name>", esc(&def.name));
    if let Some(u) = &def.uuid {
        let _ = writeln!(o, "  <uuid>{}</uuid>", esc(u));
    }
    match def.forward {
        ForwardMode::Nat => o.push_str("  <forward mode='nat'/>\n"),
        ForwardMode::Bridge => o.push_str("  <forward mode='bridge'/>\n"),
        ForwardMode::Isolated => {}
    }
    if let Some(b) = &def.bridge {
        if def.forward == ForwardMode::Bridge {
            let _ = writeln!(o, "  <bridge name='{}'/>", esc(&b.name));
        } else {
            let stp = if b.stp { "on" } else { "off" };
            let _ = writeln!(
                o,
                "  <bridge name='{}' stp='{stp}' delay='{}'/>",
                esc(&b.name),
                b.delay
            );
        }
    }
    if let Some(m) = &def.mac {
        let _ = writeln!(o, "  <mac address='{m}'/>");
    }
    if let Some(d) = &def.domain {
        let _ = writeln!(o, "  <domain name='{}'/>", esc(d));
    }
    if !def.dns_hosts.is_empty() {
        o.push_str("  <dns>\n");
        for h in &def.dns_hosts {
            let _ = writeln!(o, "    <host ip='{}'>", h.ip);
            for n in &h.hostnames {
                let _ = writeln!(o, "      <hostname>{}</hostname>", esc(n));
            }
            o.push_str("    </host>\n");
        }
        o.push_str("  </dns>\n");
    }
    if let Some(ip) = &def.ip {
        let mask = if ip.written_as_prefix {
            format!("prefix='{}'", ip.prefix)
        } else {
            format!(
                "netmask='{}'",
                Ipv4Net::new(ip.address, ip.prefix).netmask()
            )
        };
        match &ip.dhcp {
            None => {
                let _ = writeln!(o, "  <ip address='{}' {mask}/>", ip.address);
            }
            Some(d) => {
                let _ = writeln!(o, "  <ip address='{}' {mask}>", ip.address);
                o.push_str("    <dhcp>\n");
                for r in &d.ranges {
                    let _ = writeln!(o, "      <range start='{}' end='{}'/>", r.start, r.end);
                }
                for h in &d.hosts {
                    o.push_str("      <host");
                    if let Some(m) = &h.mac {
                        let _ = write!(o, " mac='{m}'");
                    }
                    if let Some(n) = &h.name {
                        let _ = write!(o, " name='{}'", esc(n));
                    }
                    let _ = writeln!(o, " ip='{}'/>", h.ip);
                }
                o.push_str("    </dhcp>\n");
                o.push_str("  </ip>\n");
            }
        }
    }
    o.push_str("</network>\n");
    o
}
