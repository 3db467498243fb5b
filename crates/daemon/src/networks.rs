//! Virtual networks: the `/v1/networks` handlers' logic over [`rvirt_net::NetworkManager`], and
//! the daemon-start sequence (reconcile, default network, autostart). Every rvirt-net call
//! blocks (netlink, nft, dnsmasq), so each runs on the blocking pool.

use crate::error::{ApiError, ApiResult};
use crate::manager::Manager;
use rvirt_api::rest::{ErrorCode, IfAddr, NetDefineResponse, NetDhcpLease, NetworkSummary};
use rvirt_net::{NetError, NetworkManager};
use std::sync::Arc;

impl From<NetError> for ApiError {
    fn from(e: NetError) -> ApiError {
        let code = match &e {
            NetError::NoSuchNetwork(_) => ErrorCode::NoNetwork,
            NetError::Xml(_) => ErrorCode::XmlError,
            NetError::Invalid(_)
            | NetError::BridgeInUse { .. }
            | NetError::MissingHostBridge(_) => ErrorCode::InvalidArg,
            NetError::AlreadyActive(_)
            | NetError::NotActive(_)
            | NetError::Active(_)
            | NetError::InUse { .. } => ErrorCode::OperationInvalid,
            _ => ErrorCode::OperationFailed,
        };
        ApiError::new(code, e.to_string())
    }
}

/// Runs a blocking rvirt-net call on the blocking pool.
pub async fn blocking<T, F>(net: &Arc<NetworkManager>, f: F) -> ApiResult<T>
where
    T: Send + 'static,
    F: FnOnce(&NetworkManager) -> Result<T, NetError> + Send + 'static,
{
    let net = net.clone();
    tokio::task::spawn_blocking(move || f(&net))
        .await
        .map_err(|e| ApiError::internal(format!("network task failed: {e}")))?
        .map_err(ApiError::from)
}

/// rvirtd start: clean up networks whose bridge vanished, define `default` on the first start,
/// then start the autostart networks. Failures are logged, never fatal.
pub async fn startup(net: &Arc<NetworkManager>) {
    let net = net.clone();
    let r = tokio::task::spawn_blocking(move || {
        match net.reconcile() {
            Ok(gone) => {
                for n in gone {
                    tracing::warn!("network {n}: its bridge was gone; marked stopped");
                }
            }
            Err(e) => tracing::error!("cannot reconcile networks: {e}"),
        }
        match net.ensure_default() {
            Ok(Some(d)) => tracing::info!("defined the default network ({})", d.name),
            Ok(None) => {}
            Err(e) => tracing::error!("cannot define the default network: {e}"),
        }
        for (n, e) in net.autostart_all() {
            tracing::error!("network {n}: autostart failed: {e}");
        }
    })
    .await;
    if let Err(e) = r {
        tracing::error!("network startup task failed: {e}");
    }
}

fn summary(i: rvirt_net::NetworkInfo) -> NetworkSummary {
    NetworkSummary {
        name: i.name,
        uuid: i.uuid,
        active: i.active,
        autostart: i.autostart,
        persistent: i.persistent,
        bridge: i.bridge,
    }
}

impl Manager {
    pub async fn net_list(&self) -> ApiResult<Vec<NetworkSummary>> {
        let l = blocking(&self.net, |n| n.list()).await?;
        Ok(l.into_iter().map(summary).collect())
    }

    pub async fn net_info(&self, name: &str) -> ApiResult<NetworkSummary> {
        self.net_list()
            .await?
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| NetError::NoSuchNetwork(name.to_string()).into())
    }

    pub async fn net_define(&self, xml: String) -> ApiResult<NetDefineResponse> {
        let d = blocking(&self.net, move |n| n.define(&xml)).await?;
        Ok(NetDefineResponse {
            name: d.name,
            uuid: d.uuid.unwrap_or_default(),
        })
    }

    /// net-undefine, refused while a defined domain (persistent definition or running
    /// configuration) has an interface on the network: the domain could no longer start.
    pub async fn net_undefine(&self, name: &str) -> ApiResult<()> {
        let users = self.domains_using_network(name);
        if !users.is_empty() {
            return Err(ApiError::new(
                ErrorCode::OperationInvalid,
                format!(
                    "network '{name}' is used by domain(s) {}; remove their <interface type='network'> \
                     on it (edit and define them again) or undefine them first",
                    users
                        .iter()
                        .map(|d| format!("'{d}'"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let name = name.to_string();
        blocking(&self.net, move |n| n.undefine(&name)).await
    }

    /// Names of the domains whose definition (or running configuration) has an interface on
    /// network `net`, sorted.
    pub fn domains_using_network(&self, net: &str) -> Vec<String> {
        use crate::xml::domain::InterfaceSource;
        let mut out = Vec::new();
        for (name, slot) in self.all_slots() {
            let st = slot.lock();
            let uses = |d: &crate::xml::domain::DomainDef| {
                d.interfaces
                    .iter()
                    .any(|i| matches!(&i.source, InterfaceSource::Network(n) if n == net))
            };
            if uses(&st.config.def) || st.live.as_ref().is_some_and(|l| uses(&l.def)) {
                out.push(name);
            }
        }
        out.sort();
        out
    }

    pub async fn net_start(&self, name: &str) -> ApiResult<()> {
        let name = name.to_string();
        blocking(&self.net, move |n| n.start(&name)).await
    }

    pub async fn net_destroy(&self, name: &str, force: bool) -> ApiResult<()> {
        let name = name.to_string();
        blocking(&self.net, move |n| n.destroy(&name, force)).await
    }

    pub async fn net_xml(&self, name: &str) -> ApiResult<String> {
        let name = name.to_string();
        blocking(&self.net, move |n| n.dump_xml(&name)).await
    }

    pub async fn net_set_autostart(&self, name: &str, on: bool) -> ApiResult<()> {
        let name = name.to_string();
        blocking(&self.net, move |n| n.set_autostart(&name, on)).await
    }

    pub async fn net_dhcp_leases(&self, name: &str) -> ApiResult<Vec<NetDhcpLease>> {
        let name = name.to_string();
        let l = blocking(&self.net, move |n| n.dhcp_leases(&name)).await?;
        Ok(l.into_iter()
            .map(|l| NetDhcpLease {
                iface: l.iface,
                expirytime: l.expirytime,
                kind: l.r#type.to_string(),
                mac: l.mac,
                ipaddr: l.ipaddr,
                prefix: l.prefix,
                hostname: l.hostname,
                clientid: l.clientid,
            })
            .collect())
    }

    /// virsh domifaddr: each running interface's address from its network's DHCP leases.
    pub async fn domifaddr(&self, key: &str) -> ApiResult<Vec<IfAddr>> {
        let ifaces = self.interfaces(key)?;
        let (name, _) = self.find(key)?;
        let taps = blocking(&self.net, move |n| n.interfaces_of(&name)).await?;
        let mut out = Vec::new();
        for iface in ifaces {
            let Some(t) = taps.iter().find(|t| t.tap == iface.interface) else {
                continue;
            };
            let Some(net) = t.network.clone() else {
                continue;
            };
            let leases = blocking(&self.net, move |n| n.dhcp_leases(&net)).await?;
            for l in leases
                .into_iter()
                .filter(|l| l.mac.eq_ignore_ascii_case(&iface.mac))
            {
                out.push(IfAddr {
                    name: iface.interface.clone(),
                    mac: iface.mac.clone(),
                    protocol: l.r#type.to_string(),
                    address: format!("{}/{}", l.ipaddr, l.prefix),
                });
            }
        }
        Ok(out)
    }
}
