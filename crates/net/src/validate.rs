//! Checks a definition against itself, the other defined networks and the host's routes.

use std::net::Ipv4Addr;

use crate::xml::{ForwardMode, NetworkDef};
use crate::Ipv4Net;

/// Why a network definition cannot be used. Each message names the object and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValidateError {
    #[error("network '{net}': bridge name '{bridge}' is already used by {user}; choose another <bridge name='...'/>")]
    BridgeInUse {
        net: String,
        bridge: String,
        user: String,
    },
    #[error("network '{net}': DHCP range {start}-{end} {problem}")]
    BadRange {
        net: String,
        start: Ipv4Addr,
        end: Ipv4Addr,
        problem: String,
    },
    #[error("network '{net}': static host {ip} is outside the subnet {subnet}")]
    HostOutsideSubnet {
        net: String,
        ip: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error("network '{net}': gateway {ip} is the subnet's network or broadcast address; use a host address such as {suggest}")]
    BadGateway {
        net: String,
        ip: Ipv4Addr,
        suggest: Ipv4Addr,
    },
    #[error("network '{net}': a {mode} network needs an <ip address='...' netmask='...'> for its gateway")]
    MissingIp { net: String, mode: &'static str },
    #[error("network '{net}': a {mode} network needs <bridge name='...'/>")]
    MissingBridge { net: String, mode: &'static str },
    #[error("network '{net}': subnet {subnet} overlaps {other}; choose a free subnet")]
    SubnetOverlap {
        net: String,
        subnet: Ipv4Net,
        other: String,
    },
}

/// What the definition is checked against.
#[derive(Debug, Default, Clone)]
pub struct HostView {
    /// Other defined networks (by name), excluding the one being checked.
    pub networks: Vec<NetworkDef>,
    /// Destinations of the host's IPv4 routes, excluding default routes and routes on links that
    /// belong to the network being checked.
    pub routes: Vec<(Ipv4Net, String)>,
    /// Names of existing links, excluding the network's own bridge.
    pub links: Vec<String>,
}

/// Checks ranges, the gateway, and clashes with other networks, routes and links.
pub fn validate(def: &NetworkDef, host: &HostView) -> Result<(), ValidateError> {
    let net = def.name.clone();
    let mode = def.forward.as_str();
    let bridge = def.bridge.as_ref().ok_or(ValidateError::MissingBridge {
        net: net.clone(),
        mode,
    })?;
    if def.forward == ForwardMode::Bridge {
        // The bridge belongs to the host; the link must exist, which is checked at start.
        return Ok(());
    }
    for other in &host.networks {
        if other.name != def.name && other.bridge.as_ref().is_some_and(|b| b.name == bridge.name) {
            return Err(ValidateError::BridgeInUse {
                net,
                bridge: bridge.name.clone(),
                user: format!("network '{}'", other.name),
            });
        }
    }
    if host.links.contains(&bridge.name) {
        return Err(ValidateError::BridgeInUse {
            net,
            bridge: bridge.name.clone(),
            user: "an existing host link".into(),
        });
    }
    let ip = def.ip.as_ref().ok_or(ValidateError::MissingIp {
        net: net.clone(),
        mode,
    })?;
    let subnet = ip.subnet();
    let full = Ipv4Net::new(ip.address, ip.prefix);
    if ip.prefix < 31 && (ip.address == subnet.addr || ip.address == full.broadcast()) {
        return Err(ValidateError::BadGateway {
            net,
            ip: ip.address,
            suggest: Ipv4Addr::from(u32::from(subnet.addr) + 1),
        });
    }
    if let Some(dhcp) = &ip.dhcp {
        for r in &dhcp.ranges {
            let bad = |problem: String| ValidateError::BadRange {
                net: net.clone(),
                start: r.start,
                end: r.end,
                problem,
            };
            if !subnet.contains(r.start) || !subnet.contains(r.end) {
                return Err(bad(format!("is not inside the subnet {subnet}")));
            }
            if u32::from(r.start) > u32::from(r.end) {
                return Err(bad("starts after it ends".into()));
            }
            let (s, e, gw) = (u32::from(r.start), u32::from(r.end), u32::from(ip.address));
            if (s..=e).contains(&gw) {
                return Err(bad(format!("includes the gateway {}", ip.address)));
            }
            if s == u32::from(subnet.addr) || e == u32::from(full.broadcast()) {
                return Err(bad("includes the network or broadcast address".into()));
            }
        }
        for h in &dhcp.hosts {
            if !subnet.contains(h.ip) {
                return Err(ValidateError::HostOutsideSubnet {
                    net,
                    ip: h.ip,
                    subnet,
                });
            }
        }
    }
    for other in &host.networks {
        if other.name == def.name {
            continue;
        }
        if let Some(oip) = &other.ip {
            if oip.subnet().overlaps(subnet) {
                return Err(ValidateError::SubnetOverlap {
                    net,
                    subnet,
                    other: format!("network '{}' ({})", other.name, oip.subnet()),
                });
            }
        }
    }
    for (route, dev) in &host.routes {
        if route.prefix > 0 && dev != &bridge.name && route.network().overlaps(subnet) {
            return Err(ValidateError::SubnetOverlap {
                net,
                subnet,
                other: format!("the host route {route} on {dev}"),
            });
        }
    }
    Ok(())
}

/// Picks the first free 192.168.N.0/24, starting at libvirt's 192.168.122.0/24, that clashes with
/// no route and no other network.
pub fn pick_default_subnet(host: &HostView) -> Option<Ipv4Net> {
    let taken = |n: Ipv4Net| {
        host.routes
            .iter()
            .any(|(r, _)| r.prefix > 0 && r.network().overlaps(n))
            || host
                .networks
                .iter()
                .any(|o| o.ip.as_ref().is_some_and(|i| i.subnet().overlaps(n)))
    };
    (122..=254)
        .chain(0..122)
        .map(|n| Ipv4Net::new(Ipv4Addr::new(192, 168, n, 0), 24))
        .find(|n| !taken(*n))
}

/// The `default` NAT network on `subnet` (a /24), as libvirt defines it.
pub fn default_network(subnet: Ipv4Net) -> NetworkDef {
    use crate::xml::{BridgeDef, DhcpDef, DhcpRange, IpDef};
    let base = u32::from(subnet.network().addr);
    NetworkDef {
        name: "default".into(),
        uuid: None,
        forward: ForwardMode::Nat,
        bridge: Some(BridgeDef {
            name: "rvirbr0".into(),
            stp: true,
            delay: 0,
        }),
        mac: None,
        domain: None,
        dns_hosts: Vec::new(),
        ip: Some(IpDef {
            address: Ipv4Addr::from(base + 1),
            prefix: 24,
            written_as_prefix: false,
            dhcp: Some(DhcpDef {
                ranges: vec![DhcpRange {
                    start: Ipv4Addr::from(base + 2),
                    end: Ipv4Addr::from(base + 254),
                }],
                hosts: Vec::new(),
            }),
        }),
    }
}
