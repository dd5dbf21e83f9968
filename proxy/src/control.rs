//! The channel to the control plane, and what is known about it.
//!
//! Two gRPC channels to one address, because the proxy's credentials change over its life:
//!
//! - **identity** (`Certify`): server-authenticated TLS. The proxy holds no certificate yet; it must
//!   know who it gives its token to, so the control plane's certificate is checked against the
//!   trust anchors and its SPIFFE ID against `PILLION_CONTROL_IDENTITY` before a byte is sent.
//! - **discovery** (`Watch`): mutual TLS with the workload certificate, so the control plane knows
//!   which workload asks and tells it only what is its business. It dials lazily, so the first
//!   connection happens after the first certificate is held (discovery waits for readiness).
//!
//! Plaintext exists only because an operator asked for it (`PILLION_CONTROL_PLAINTEXT=true`, local
//! development): then nothing is verified and `/config` says so.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::{ClientConfig, pki_types::ServerName};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::{config::ControlChannel, identity::IdentityStore, tls};

/// Connect (TCP and TLS) within this; the control plane is in the cluster.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The two channels, and the status `/config` and `/identity` show.
pub struct ControlPlane {
    pub identity: Channel,
    pub discovery: Channel,
    pub status: Arc<ControlStatus>,
}

/// What the proxy knows about its control plane.
#[derive(Debug)]
pub struct ControlStatus {
    pub address: String,
    /// `None` in plaintext mode.
    pub expected: Option<tls::spiffe::SpiffeId>,
    /// Unix seconds of the last handshake that proved `expected`; 0 = never.
    last_verified: AtomicU64,
    /// The last connection failure, for operators (cleared by a verified handshake).
    last_error: Mutex<Option<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("PILLION_CONTROL_ADDR {0}: {1}")]
    Address(String, String),
    #[error("control channel TLS: {0}")]
    Tls(#[from] tls::TlsError),
}

impl ControlPlane {
    /// Builds both channels (lazily connected) for `address` as `security` says.
    pub fn new(address: &str, security: &ControlChannel, store: &Arc<IdentityStore>) -> Result<Self, ControlError> {
        let endpoint = Endpoint::from_shared(address.to_string())
            .map_err(|e| ControlError::Address(address.to_string(), e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT);
        let expected = match security {
            ControlChannel::Tls { identity } => Some(identity.clone()),
            ControlChannel::None | ControlChannel::Plaintext => None,
        };
        let status = Arc::new(ControlStatus {
            address: address.to_string(),
            expected: expected.clone(),
            last_verified: AtomicU64::new(0),
            last_error: Mutex::new(None),
        });
        let Some(expected) = expected else {
            let channel = endpoint.connect_lazy();
            return Ok(ControlPlane {
                identity: channel.clone(),
                discovery: channel,
                status,
            });
        };
        let verified = {
            let status = status.clone();
            Arc::new(move |_: &tls::spiffe::SpiffeId| status.verified()) as tls::verify::OnVerified
        };
        let connector = |client_cert: bool| -> Result<TlsConnector, ControlError> {
            Ok(TlsConnector {
                config: tls::control_client(store.clone(), expected.clone(), client_cert, Some(verified.clone()))?,
                status: status.clone(),
            })
        };
        Ok(ControlPlane {
            identity: endpoint.connect_with_connector_lazy(connector(false)?),
            discovery: endpoint.connect_with_connector_lazy(connector(true)?),
            status,
        })
    }
}

impl ControlStatus {
    fn verified(&self) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.last_verified.store(now, Ordering::Relaxed);
        *self.lock_error() = None;
    }

    fn failed(&self, error: &str) {
        *self.lock_error() = Some(error.to_string());
    }

    fn lock_error(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        // A panic while holding this lock cannot leave an Option<String> inconsistent.
        self.last_error.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The status as `/config` and `/identity` show it.
    pub fn to_json(&self) -> Value {
        let verified_at = self.last_verified.load(Ordering::Relaxed);
        json!({
            "address": self.address,
            "security": if self.expected.is_some() { "tls" } else { "plaintext" },
            "expected_identity": self.expected.as_ref().map(|id| id.as_str()),
            "verified_identity": (verified_at > 0).then(|| self.expected.as_ref().map(|id| id.as_str())).flatten(),
            "last_verified": (verified_at > 0).then_some(verified_at),
            "last_error": self.lock_error().clone(),
        })
    }
}

/// TCP, then TLS with the given configuration: tonic's connector for the control channel.
#[derive(Clone)]
struct TlsConnector {
    config: Arc<ClientConfig>,
    status: Arc<ControlStatus>,
}

type Connecting =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, BoxError>> + Send>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let config = self.config.clone();
        let status = self.status.clone();
        Box::pin(async move {
            let result = connect(uri, config).await;
            if let Err(e) = &result {
                tracing::warn!(error = %e, "control plane connection failed");
                status.failed(&e.to_string());
            }
            result
        })
    }
}

async fn connect(
    uri: Uri,
    config: Arc<ClientConfig>,
) -> Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, BoxError> {
    let host = uri.host().ok_or("control plane address without a host")?;
    let port = uri.port_u16().unwrap_or(443);
    // `[::1]` in a URI is `::1` to the resolver and to rustls.
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let _ = tcp.set_nodelay(true);
    // The name is only sent as SNI; the certificate is checked against the expected SPIFFE ID.
    let name = ServerName::try_from(host).map_err(|e| format!("control plane host: {e}"))?;
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    Ok(TokioIo::new(tls))
}
