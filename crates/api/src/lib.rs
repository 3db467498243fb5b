//! Types shared by rvirt's programs.
//!
//! - [`vmm`]: the control protocol spoken on `rvirt-vmm --api-socket`, and the VMM's exit statuses.
//!
//! Keeping them here (and only here) means the daemon and the VMM cannot drift apart.

pub mod vmm;
