//! The policy: one YAML schema for the proxy's route file (`PILLION_CONFIG`) and the control
//! plane's policy file, one model ([`model`]), one validator (every value is checked as it is
//! deserialised, so errors carry a line and column: [`parse`]), and the mapping to and from the
//! `DestinationUpdate`s the control plane streams ([`convert`]). A policy that arrives over the
//! wire is validated by the same rules as one read from a file.

pub mod convert;
pub mod model;
pub mod parse;

pub use model::{Policy, PolicyFile};
pub use parse::{PolicyError, load, parse};

#[cfg(test)]
mod validation_table;
