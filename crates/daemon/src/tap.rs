//! Host side of guest NICs: a TAP `rvnet<N>` per interface, enslaved to the bridge the interface
//! names (directly, or through the network's bridge), removed when the VM stops. Done with
//! iproute2, as the rest of the host networking is.

use crate::error::{ApiError, ApiResult};
use crate::xml::domain::{DomainDef, InterfaceSource};
use rvirt_api::rest::ErrorCode;
use std::path::Path;
use std::process::Command;

/// The bridge of a libvirt-style network. Networks are managed outside the domain code; the
/// NAT network `default` uses bridge `rvirbr0`.
fn network_bridge(network: &str) -> ApiResult<String> {
    match network {
        "default" => Ok("rvirbr0".to_string()),
        other => Err(ApiError::new(
            ErrorCode::ConfigUnsupported,
            format!("network '{other}' is not known to rvirtd (only 'default', bridge rvirbr0); use <interface type='bridge'> with an existing bridge"),
        )),
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates one TAP per interface; on failure removes those already made.
pub fn create_taps(domain: &str, def: &DomainDef) -> ApiResult<Vec<String>> {
    let mut made: Vec<String> = Vec::new();
    for iface in &def.interfaces {
        let bridge = match &iface.source {
            InterfaceSource::Bridge(b) => b.clone(),
            InterfaceSource::Network(n) => network_bridge(n).inspect_err(|_| delete_taps(&made))?,
        };
        if !Path::new("/sys/class/net")
            .join(&bridge)
            .join("bridge")
            .exists()
        {
            delete_taps(&made);
            return Err(ApiError::failed(format!(
                "bridge '{bridge}' for an interface of domain '{domain}' does not exist; create it (or start its network) first"
            )));
        }
        let tap = (0..10_000)
            .map(|n| format!("rvnet{n}"))
            .find(|t| !Path::new("/sys/class/net").join(t).exists() && !made.contains(t))
            .ok_or_else(|| ApiError::failed("no free rvnet<N> TAP name"))?;
        let r = ip(&["tuntap", "add", "dev", &tap, "mode", "tap", "vnet_hdr"])
            .and_then(|_| ip(&["link", "set", "dev", &tap, "master", &bridge]))
            .and_then(|_| ip(&["link", "set", "dev", &tap, "up"]));
        if let Err(e) = r {
            made.push(tap);
            delete_taps(&made);
            return Err(ApiError::failed(format!(
                "cannot create a TAP for domain '{domain}': {e}"
            )));
        }
        made.push(tap);
    }
    Ok(made)
}

pub fn delete_taps(taps: &[String]) {
    for t in taps {
        let _ = ip(&["link", "del", "dev", t]);
    }
}
