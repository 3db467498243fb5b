//! Types shared by rvirt's programs.
//!
//! - [`vmm`]: the control protocol spoken on `rvirt-vmm --api-socket`, and the VMM's exit statuses.
//! - [`vmm_config`]: the typed configuration of one VM (rvirt-vmm `--config`, built by rvirtd).
//! - [`rest`]: the REST API of `rvirtd` that the `rvirt` CLI uses.
//!
//! Keeping them here (and only here) means the daemon, the CLI and the VMM cannot drift apart.

pub mod rest;
pub mod vmm;
pub mod vmm_config;
