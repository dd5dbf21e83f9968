//! Discovery and policy state: the YAML model ([`model`]), loading it with line-numbered errors
//! ([`file`]), reloading it on change ([`watch`]) and turning it into per-destination protobuf
//! updates ([`convert`]).

pub mod convert;
pub mod file;
pub mod model;
pub mod watch;

pub use file::{PolicyError, load, parse};
pub use model::{Policy, PolicyFile};
pub use watch::PolicyWatch;
