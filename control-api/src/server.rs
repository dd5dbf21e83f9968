//! Wires the Identity and Discovery services onto one gRPC listener.
//!
//! Plaintext gRPC for now: certificates are public and the token is a bearer secret, so deploy it
//! on a network the workloads already trust (in-cluster Service) until control-plane TLS lands.
//! Shutdown: cancelling the token stops accepting, ends every Watch stream, and lets in-flight
//! Certify calls finish.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    auth::Authenticator,
    ca::CertificateAuthority,
    discovery_service::DiscoveryService,
    identity_service::IdentityService,
    policy::PolicyWatch,
    proto::{discovery_server::DiscoveryServer, identity_server::IdentityServer},
};

/// Everything the services need, loaded and validated before the listener is bound.
pub struct ControlPlane<A> {
    pub ca: Arc<CertificateAuthority>,
    pub authenticator: Arc<A>,
    pub policy: PolicyWatch,
}

/// Serves both services on `listener` until `shutdown` is cancelled.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    plane: ControlPlane<A>,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let identity = IdentityService::new(plane.ca, plane.authenticator);
    let discovery = DiscoveryService::new(plane.policy, shutdown.clone());
    Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(DiscoveryServer::new(discovery))
        // TCP_NODELAY: tonic sets it only on listeners it binds itself. Without it, a response
        // written after an unacknowledged segment (the SETTINGS ack) waits for the client's
        // delayed ACK: 40 ms added to every certificate and to every discovery update.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown.cancelled_owned(),
        )
        .await
}
