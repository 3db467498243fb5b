//! rvirtd: rvirt's management daemon, as a library so that its parts are testable alone.
//!
//! - [`xml`]: libvirt domain XML (lossless tree + typed view)
//! - [`store`]: definitions on disk, atomically written
//! - [`manager`]: the registry of domains and their states
//! - [`lifecycle`]: start/stop/supervise rvirt-vmm processes; re-attach after a restart
//! - [`networks`]: virtual networks (rvirt-net) behind the `/v1/networks` API
//! - [`firmware`]: OVMF/SeaBIOS images and per-domain UEFI variable stores
//! - [`pinning`]: vcpupin, emulatorpin, vcpuinfo
//! - [`http`], [`openapi`], [`server`]: the REST API on a unix socket

pub mod error;
pub mod firmware;
pub mod host;
pub mod http;
pub mod lifecycle;
pub mod live;
pub mod manager;
pub mod networks;
pub mod openapi;
pub mod pinning;
pub mod server;
pub mod store;
pub mod tap;
pub mod vmm_client;
pub mod xml;
