//! The demo's configuration files: the control plane's policy and the proxies' route file.
//!
//! The policy says which addresses are meshed (an endpoint with the server's SPIFFE ID, so the
//! client's proxy originates mTLS), their routes (the client's proxy applies them, as it would
//! the same YAML in its own file), and who may call the server's ports (the client's ID only).
//! The route file names the same routes for the server's proxy, whose inbound side routes by its
//! own file; the routes become the `route` label of the HTTP metrics on both sides.

use std::net::SocketAddr;

/// The routes of the server's HTTP port, as (name, match) for the report's order.
pub const ROUTES: [(&str, &str); 3] = [
    ("hello", "{ path: { type: Exact, value: /hello } }"),
    ("api", "{ path: { type: PathPrefix, value: /api } }"),
    ("grpc-echo", "{ path: { type: PathPrefix, value: /pillion.test.Echo } }"),
];

/// `meshed` addresses are endpoints with `server_id`; `inbound_ports` admit `client_id` only.
pub fn policy(meshed: &[SocketAddr], inbound_ports: &[u16], server_id: &str, client_id: &str) -> String {
    let mut yaml = String::from("destinations:\n");
    for addr in meshed {
        yaml.push_str(&format!(
            "  - destination: {addr}\n    endpoints: [{{ address: {addr}, identity: {server_id} }}]\n"
        ));
        yaml.push_str(&routes_of());
    }
    yaml.push_str("inbound:\n");
    for port in inbound_ports {
        yaml.push_str(&format!(
            "  - port: {port}\n    authorization: {{ allow: [{client_id}] }}\n"
        ));
    }
    yaml
}

/// The route file: [`ROUTES`] for each of `destinations`.
pub fn routes(destinations: &[SocketAddr]) -> String {
    let mut yaml = String::from("destinations:\n");
    for destination in destinations {
        yaml.push_str(&format!("  - destination: {destination}\n"));
        yaml.push_str(&routes_of());
    }
    yaml
}

/// The `routes:` of one destination entry (routes only ever apply to HTTP, so a TCP port's entry
/// may carry them too).
fn routes_of() -> String {
    let mut yaml = String::from("    routes:\n");
    for (name, matches) in ROUTES {
        yaml.push_str(&format!(
            "      - name: {name}\n        matches: [{matches}]\n        timeouts: {{ request: 5s }}\n"
        ));
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_lists_endpoints_and_authorization() {
        let addr: SocketAddr = "10.42.0.20:8080".parse().unwrap();
        let yaml = policy(&[addr], &[8080], "spiffe://td/ns/a/sa/s", "spiffe://td/ns/a/sa/c");
        let routes = routes_of();
        assert_eq!(
            yaml,
            "destinations:
  - destination: 10.42.0.20:8080
    endpoints: [{ address: 10.42.0.20:8080, identity: spiffe://td/ns/a/sa/s }]
"
            .to_string()
                + &routes
                + "inbound:
  - port: 8080
    authorization: { allow: [spiffe://td/ns/a/sa/c] }
"
        );
    }

    #[test]
    fn routes_are_named_per_destination() {
        let yaml = routes(&["127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap()]);
        assert_eq!(yaml.matches("name: hello").count(), 2);
        assert!(yaml.contains("destination: 127.0.0.1:2\n"));
    }
}
