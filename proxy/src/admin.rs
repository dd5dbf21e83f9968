//! The admin server (`PILLION_ADMIN_ADDR`): probes for the kubelet, metrics for Prometheus, and
//! a few operator controls. It keeps serving while the proxy drains, so `/ready` can say 503.
//!
//! Mutating endpoints (`PUT /log-level`, `POST /shutdown`) answer only loopback peers: the port
//! is reachable from the whole cluster, the operator reaches it through `kubectl port-forward`
//! or `kubectl exec`.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::{
    config::Config, control::ControlStatus, drain::Drain, exposition, identity::IdentityStore, logging::LogLevel,
    metrics::Metrics,
};

/// What the admin endpoints read and control.
pub struct Admin {
    pub config: Config,
    pub identity: Option<Arc<IdentityStore>>,
    /// The control channel's state, when there is a control plane.
    pub control: Option<Arc<ControlStatus>>,
    pub metrics: Arc<Metrics>,
    pub listeners_bound: Readiness,
    pub drain: Drain,
    pub log: LogLevel,
}

/// Set once every proxy listener is bound.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn get(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

const MAX_BODY: usize = 4 * 1024;

pub async fn serve(listener: TcpListener, admin: Arc<Admin>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(conn) => conn,
            Err(error) => {
                warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req, peer).await) }
            });
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                debug!(%peer, %error, "admin connection failed");
            }
        });
    }
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let path = req.uri().path();
        // HEAD is answered wherever GET is: hyper sends the head (with Content-Length) and drops
        // the body.
        let method = match req.method() {
            &Method::HEAD => &Method::GET,
            method => method,
        };
        match (method, path) {
            (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
            (&Method::GET, "/ready") => {
                if self.is_ready() {
                    text(StatusCode::OK, "ready\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                }
            }
            (&Method::GET, "/metrics") => {
                let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
                let openmetrics = exposition::wants_openmetrics(accept);
                // Encoding takes milliseconds with many routes: off the data-path thread.
                let metrics = self.metrics.clone();
                let encoded = tokio::task::spawn_blocking(move || {
                    let encoded = metrics.encode();
                    if openmetrics {
                        encoded
                    } else {
                        exposition::to_text_0_0_4(&encoded)
                    }
                });
                let encoded = match encoded.await {
                    Ok(encoded) => encoded,
                    Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "metrics encoding failed\n"),
                };
                let content_type = if openmetrics {
                    exposition::OPENMETRICS
                } else {
                    exposition::TEXT_0_0_4
                };
                let mut rsp = Response::new(Full::new(Bytes::from(encoded)));
                rsp.headers_mut()
                    .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
                rsp
            }
            (&Method::GET, "/log-level") => text_owned(StatusCode::OK, format!("{}\n", self.log.current())),
            (&Method::PUT, "/log-level") => {
                if !is_loopback(peer) {
                    return text(StatusCode::FORBIDDEN, "log level can only be changed from localhost\n");
                }
                let body = match read_body(req).await {
                    Ok(body) => body,
                    Err(rsp) => return rsp,
                };
                match self.log.set(&body) {
                    Ok(()) => {
                        info!(filter = body.trim(), "log level changed");
                        empty(StatusCode::NO_CONTENT)
                    }
                    Err(e) => text_owned(StatusCode::BAD_REQUEST, format!("{e}\n")),
                }
            }
            (&Method::POST, "/shutdown") => {
                if !is_loopback(peer) {
                    return text(StatusCode::FORBIDDEN, "shutdown can only be requested from localhost\n");
                }
                info!(%peer, "shutdown requested through the admin server");
                self.drain.begin();
                text(StatusCode::OK, "shutting down\n")
            }
            (&Method::GET, "/config") => {
                let body = json!({
                    "config": &self.config,
                    "log": self.log.current(),
                    "control_plane": match &self.control {
                        // Values are spelt as in `/identity`'s `source` and the config's.
                        Some(status) => {
                            let mut state = status.to_json();
                            state["mode"] = json!("control-plane");
                            state
                        }
                        None => json!({ "mode": "standalone" }),
                    },
                    "identity": self.identity.as_ref().map(|store| json!({
                        "source": store.source,
                        "certificate_held": store.has_certificate(),
                        "certificate_valid": store.has_valid_certificate(SystemTime::now()),
                    })),
                    "draining": self.drain.is_draining(),
                });
                let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
                rsp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                rsp
            }
            (&Method::GET, "/identity") => self.identity(),
            (_, "/live" | "/ready" | "/metrics" | "/config" | "/identity") => method_not_allowed("GET, HEAD"),
            (_, "/log-level") => method_not_allowed("GET, HEAD, PUT"),
            (_, "/shutdown") => method_not_allowed("POST"),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    /// Listeners bound, a certificate held and not expired (when identity is configured), not
    /// draining. An expired identity cannot secure traffic: the pod leaves its Services' endpoints
    /// until a renewal succeeds.
    fn is_ready(&self) -> bool {
        self.listeners_bound.get()
            && self
                .identity
                .as_ref()
                .is_none_or(|store| store.has_valid_certificate(SystemTime::now()))
            && !self.drain.is_draining()
    }

    fn identity(&self) -> Response<Full<Bytes>> {
        let Some(store) = &self.identity else {
            return text(StatusCode::NOT_FOUND, "no identity is configured\n");
        };
        let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let held = store.current();
        let body = json!({
            "source": store.source,
            "spiffe_id": held.as_ref().map(|h| h.id.as_str()),
            "sni": held.as_ref().map(|h| h.sni.as_str()),
            "not_before": held.as_ref().map(|h| unix(h.not_before)),
            "not_after": held.as_ref().map(|h| unix(h.not_after)),
            "expires_in_seconds": held.as_ref().map(|h| h.not_after.duration_since(SystemTime::now()).map_or(0, |d| d.as_secs())),
            "expired": held.as_ref().map(|h| h.not_after <= SystemTime::now()),
            "trust_anchor_sha256": store.trust_anchor_fingerprints(),
            "control_plane": self.control.as_ref().map(|status| status.to_json()),
        });
        let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
        rsp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        rsp
    }
}

/// Reads a small UTF-8 body, or the response to send instead.
async fn read_body(req: Request<Incoming>) -> Result<String, Response<Full<Bytes>>> {
    let body = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| text(StatusCode::PAYLOAD_TOO_LARGE, "body too large or unreadable\n"))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|_| text(StatusCode::BAD_REQUEST, "body is not UTF-8\n"))
}

fn is_loopback(peer: SocketAddr) -> bool {
    match peer {
        SocketAddr::V4(v4) => v4.ip().is_loopback(),
        SocketAddr::V6(v6) => v6.ip().is_loopback() || v6.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    with_status(status, Bytes::from_static(body.as_bytes()))
}

/// 405 with the `Allow` header RFC 9110 requires.
fn method_not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    rsp.headers_mut()
        .insert(header::ALLOW, header::HeaderValue::from_static(allow));
    rsp
}

fn text_owned(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    with_status(status, Bytes::from(body))
}

fn empty(status: StatusCode) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::new()));
    *rsp.status_mut() = status;
    rsp
}

fn with_status(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(body));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_includes_mapped_ipv4() {
        assert!(is_loopback("127.0.0.1:1".parse().unwrap()));
        assert!(is_loopback("[::1]:1".parse().unwrap()));
        assert!(is_loopback("[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1:1".parse().unwrap()));
        assert!(!is_loopback("[::ffff:10.0.0.1]:1".parse().unwrap()));
    }
}
