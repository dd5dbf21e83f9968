//! SPIFFE IDs as the proxy uses them: the one type shared with the control plane (validation,
//! SNI encoding, reading the URI SAN of an X.509-SVID) lives in `pillion-api`.

pub use pillion_api::spiffe::{IdError, SpiffeId};
