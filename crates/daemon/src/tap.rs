//! Host side of guest NICs, through rvirt-net: a TAP `rvnet<N>` per interface, made by
//! [`NetworkManager::attach_interface`] (joined to the network's bridge or to a host bridge and
//! marked as the domain's), removed with [`NetworkManager::detach_all`] when the VM stops,
//! crashes or is not re-attached.
//!
//! These calls block briefly (netlink); rvirt-net makes them safe from async code.

use crate::error::{ApiError, ApiResult};
use crate::xml::domain::{DomainDef, InterfaceSource};
use rvirt_net::NetworkManager;

/// Creates one TAP per interface; on failure removes those already made.
pub fn create_taps(net: &NetworkManager, domain: &str, def: &DomainDef) -> ApiResult<Vec<String>> {
    let mut made: Vec<String> = Vec::new();
    for iface in &def.interfaces {
        let source = match &iface.source {
            InterfaceSource::Bridge(b) => rvirt_net::InterfaceSource::Bridge(b.clone()),
            InterfaceSource::Network(n) => rvirt_net::InterfaceSource::Network(n.clone()),
        };
        match net.attach_interface(domain, &source) {
            Ok(t) => made.push(t.tap),
            Err(e) => {
                delete_taps(net, domain, &made);
                return Err(ApiError::failed(format!(
                    "cannot connect an interface of domain '{domain}': {e}"
                )));
            }
        }
    }
    Ok(made)
}

/// Deletes the domain's TAPs: every one rvirt-net finds marked as the domain's, plus the names
/// recorded (in case the marks are gone).
pub fn delete_taps(net: &NetworkManager, domain: &str, taps: &[String]) {
    if let Err(e) = net.detach_all(domain) {
        tracing::warn!("domain {domain}: cannot remove its TAPs: {e}");
    }
    for t in taps {
        if let Err(e) = net.detach_interface(domain, t) {
            tracing::warn!("domain {domain}: cannot remove TAP {t}: {e}");
        }
    }
}
