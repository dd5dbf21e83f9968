//! The policy the control plane serves: the shared model, validation and protocol mapping come
//! from `pillion-api` (the proxy reads its route file with the same code); reloading the file on
//! change ([`watch`]) is the control plane's own.

pub mod watch;

pub use pillion_api::policy::{Policy, PolicyError, PolicyFile, convert, load, model, parse};
pub use watch::PolicyWatch;
