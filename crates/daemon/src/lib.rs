//! rvirtd: rvirt's management daemon, as a library so that its parts are testable alone.

pub mod store;
pub mod xml;
