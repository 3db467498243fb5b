//! rvirt virtual networks: libvirt network XML, bridges, TAPs, dnsmasq and nftables.
//!
//! The daemon calls [`NetworkManager`]; everything else is the parts it is built from.

mod addr;
pub mod validate;
pub mod xml;

pub use addr::{Ipv4Net, MacAddr};
pub use validate::{validate, HostView, ValidateError};
pub use xml::{ForwardMode, NetworkDef, XmlError};
pub mod dnsmasq;
pub mod link;
pub mod manager;
pub mod nft;
pub use manager::{AttachedTap, DhcpLease, InterfaceSource, NetError, NetworkInfo, NetworkManager};
