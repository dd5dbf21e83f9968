//! The control plane's policy file (`control/src/policy/`): YAML → `PolicyFile` → indexed
//! `Policy` → the `DestinationUpdate` each proxy receives.
//!
//! Input: the file's text. Checks: parsing never panics; every destination of an accepted policy
//! converts to an update that says `known`, names the destination and encodes and decodes as
//! protobuf unchanged; an unknown destination gets `known = false`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pillion_control::{
    policy::{convert::destination_update, model::Authority, parse},
    proto::DestinationUpdate,
};
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = parse(text, "fuzz.yaml") else {
        return;
    };
    for authority in policy.destinations.keys() {
        let update = destination_update(&policy, authority);
        assert!(update.known, "{authority} is in the policy");
        assert_eq!(update.destination, authority.to_string());
        let decoded = DestinationUpdate::decode(update.encode_to_vec().as_slice()).expect("own encoding decodes");
        assert_eq!(decoded, update);
    }
    for port in policy.inbound.keys() {
        let Ok(unknown) = format!("unknown.invalid:{port}").parse::<Authority>() else {
            continue;
        };
        if policy.destinations.contains_key(&unknown) {
            continue;
        }
        let update = destination_update(&policy, &unknown);
        assert!(!update.known);
        assert!(
            update.inbound_authorization.is_some(),
            "port {port} has an inbound entry"
        );
    }
});
