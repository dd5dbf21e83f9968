//! Wires the Identity and Discovery services onto one gRPC listener, over TLS by default.
//!
//! The path of a connection: TCP accept (bounded number of handshakes in flight) → TLS handshake
//! in its own task, with a timeout, so a slow or silent client holds up nobody else → a bounded
//! channel of established streams → tonic. Each stream carries the [`ControlPeer`] it proved,
//! which tonic puts into every request's extensions. `--plaintext` skips the handshake.
//!
//! Limits, per connection: concurrent HTTP/2 streams (a proxy holds one Watch per destination it
//! follows, so this must stay above the proxy's `PILLION_DISCOVERY_MAX_DESTINATIONS`, 1000 by
//! default), pending reset streams (the HTTP/2 rapid-reset attack), requests in flight, header and
//! message sizes; for the whole server, `Certify` calls per second (see the identity service).
//!
//! Shutdown: cancelling the token stops accepting, ends every Watch stream, and lets in-flight
//! Certify calls finish.

use std::{sync::Arc, time::Duration};

use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    auth::Authenticator,
    ca::CertificateAuthority,
    discovery_service::DiscoveryService,
    identity_service::IdentityService,
    policy::PolicyWatch,
    proto::{discovery_server::DiscoveryServer, identity_server::IdentityServer},
    rate_limit::TokenBucket,
    tls::{self, ControlStream, ServerIdentity},
};

/// Largest gRPC message accepted: a CSR is at most 16 KiB, a token a few KiB.
const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest header block accepted from a client.
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;
/// Back-off after a failed `accept` (e.g. out of file descriptors), so the loop does not spin.
const ACCEPT_ERROR_DELAY: Duration = Duration::from_millis(100);

/// Everything the services need, loaded and validated before the listener is bound.
pub struct ControlPlane<A> {
    pub ca: Arc<CertificateAuthority>,
    pub authenticator: Arc<A>,
    pub policy: PolicyWatch,
    pub transport: Transport,
    pub limits: Limits,
}

/// How the listener talks.
pub enum Transport {
    /// TLS 1.3 with the control plane's own certificate; client certificates optional.
    Tls(Arc<ServerIdentity>),
    /// Plaintext HTTP/2: no server authentication, no caller identity. Local development only.
    Plaintext,
}

/// The listener's and the services' bounds.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Longest a TLS handshake may take.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; further connections wait in the kernel's backlog.
    pub max_handshakes: usize,
    /// Established connections waiting for the gRPC server to take them.
    pub accept_queue: usize,
    /// Concurrent HTTP/2 streams per connection (one per Watch, one per Certify in flight).
    pub max_concurrent_streams: u32,
    /// Streams reset by the client before being handled, per connection (rapid reset).
    pub max_pending_accept_reset_streams: usize,
    /// Requests being handled at once per connection; further ones wait.
    pub concurrency_per_connection: usize,
    /// `Certify` calls allowed per second, server-wide...
    pub certify_per_second: u32,
    /// ...and how many may come at once after a quiet period.
    pub certify_burst: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            accept_queue: 64,
            max_concurrent_streams: 1100,
            max_pending_accept_reset_streams: 20,
            concurrency_per_connection: 64,
            certify_per_second: 50,
            certify_burst: 100,
        }
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Transport(#[from] tonic::transport::Error),
}

/// Serves both services on `listener` until `shutdown` is cancelled.
pub async fn serve<A: Authenticator>(
    listener: TcpListener,
    plane: ControlPlane<A>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let acceptor = match &plane.transport {
        Transport::Tls(identity) => {
            let config = tls::server_config(&plane.ca, identity.clone()).map_err(ServeError::Tls)?;
            tokio::spawn(identity.clone().renew(shutdown.clone()));
            Some(TlsAcceptor::from(config))
        }
        Transport::Plaintext => None,
    };
    let limits = plane.limits;
    let (established, incoming) = mpsc::channel(limits.accept_queue.max(1));
    tokio::spawn(accept(
        listener,
        acceptor,
        plane.ca.trust_domain().clone(),
        established,
        limits.clone(),
        shutdown.clone(),
    ));

    let limit = TokenBucket::new(limits.certify_per_second, limits.certify_burst);
    let identity = IdentityService::new(plane.ca, plane.authenticator, limit);
    let discovery = DiscoveryService::new(plane.policy, shutdown.clone());
    Server::builder()
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_accept_reset_streams))
        .concurrency_limit_per_connection(limits.concurrency_per_connection)
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES)
        .add_service(IdentityServer::new(identity).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .add_service(DiscoveryServer::new(discovery).max_decoding_message_size(MAX_MESSAGE_BYTES))
        .serve_with_incoming_shutdown(ReceiverStream::new(incoming), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

type Established = mpsc::Sender<Result<ControlStream, std::io::Error>>;

/// Accepts until shutdown; each TLS handshake runs in its own task under a permit.
async fn accept(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    trust_domain: crate::spiffe::TrustDomain,
    established: Established,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let handshakes = Arc::new(Semaphore::new(limits.max_handshakes.max(1)));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = handshakes.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_DELAY).await;
                    continue;
                }
            },
        };
        set_nodelay(&tcp);
        let Some(acceptor) = &acceptor else {
            if established.send(Ok(ControlStream::plain(tcp, addr))).await.is_err() {
                return;
            }
            continue;
        };
        let (acceptor, trust_domain, established) = (acceptor.clone(), trust_domain.clone(), established.clone());
        let timeout = limits.handshake_timeout;
        tokio::spawn(async move {
            // Held until the stream is queued: a full queue slows handshakes, not memory.
            let _permit = permit;
            let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => match ControlStream::tls(tls, addr, &trust_domain) {
                    Ok(s) => s,
                    Err(reason) => {
                        tracing::debug!(peer = %addr, %reason, "client certificate refused");
                        return;
                    }
                },
                Ok(Err(e)) => {
                    // Debug only: anyone who can connect could otherwise fill the log.
                    tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %addr, "TLS handshake timed out");
                    return;
                }
            };
            tracing::debug!(peer = %addr, identity = ?stream.peer().identity, "control connection established");
            let _ = established.send(Ok(stream)).await;
        });
    }
}

/// TCP_NODELAY: without it, a response written after an unacknowledged segment (the SETTINGS ack)
/// waits for the client's delayed ACK: 40 ms added to every certificate and discovery update.
fn set_nodelay(tcp: &TcpStream) {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::debug!(error = %e, "cannot set TCP_NODELAY");
    }
}
