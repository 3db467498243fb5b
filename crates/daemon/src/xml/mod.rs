//! libvirt domain XML: a lossless element tree ([`tree`]) and the typed view rvirt acts on
//! ([`domain`]).

pub mod cpuset;
pub mod domain;
pub mod tree;

pub use cpuset::CpuSet;
pub use domain::{Domain, DomainDef, DomainXmlError};
pub use tree::{Element, Position};
