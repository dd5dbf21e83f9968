//! The policy model (`api/src/policy/`), as the control plane serves it: YAML → `PolicyFile` →
//! indexed `Policy` → the `DestinationUpdate` each proxy receives → the model again, as the proxy
//! reads it.
//!
//! Input: the file's text. Checks: parsing never panics; every destination of an accepted policy
//! converts to an update that says `known`, names the destination, encodes and decodes as protobuf
//! unchanged, and reads back (under the same validation) as the very destination it came from; an
//! unknown destination gets `known = false`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pillion_api::{
    policy::{
        convert::{destination_from_update, destination_update},
        model::Authority,
        parse,
    },
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
        let back = destination_from_update(&decoded).expect("an accepted destination reads back");
        assert_eq!(back.as_ref(), policy.destinations.get(authority), "{authority} survives the wire");
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
