//! The mutating admission webhook: `POST /inject` over HTTPS, answering `AdmissionReview`s.
//!
//! ```text
//! tls         the serving certificate from mounted files, re-read when they change
//! namespaces  a pod's namespace's pillion.io/inject annotation, from the API server
//! review      AdmissionReview → decision → JSONPatch, through the same injector as the CLI
//! ```
//!
//! Every request is bounded: its body (Kubernetes objects are at most ~1.5 MiB), the TLS handshake
//! and the whole exchange. A slow or hostile client costs a task and a timer, never a hang of the
//! API server's call, whose own timeout (`timeoutSeconds`) is shorter still.

mod namespaces;
mod review;
mod tls;

use std::{convert::Infallible, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use namespaces::Namespaces;
pub use review::{BadReview, admit};
pub use tls::{CertificateFiles, TlsError};

use crate::inject::InjectOptions;

/// Largest AdmissionReview read: a Pod is at most ~1.5 MiB (etcd's limit), plus the envelope.
const MAX_REVIEW_BYTES: usize = 4 * 1024 * 1024;
/// TLS handshake plus one review; the API server gives up sooner (timeoutSeconds).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Where the webhook configuration sends reviews.
pub const PATH: &str = "/inject";

/// What every request needs.
pub struct Webhook {
    pub options: InjectOptions,
    pub namespaces: Namespaces,
}

/// Serves `listener` until `shutdown`; each connection in its own task.
pub async fn serve(listener: TcpListener, tls: CertificateFiles, webhook: Arc<Webhook>, shutdown: CancellationToken) {
    let acceptor = tls.acceptor();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning on the error.
                    tracing::warn!(error = %e, "webhook: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let webhook = webhook.clone();
        tokio::spawn(async move {
            let exchange = async {
                let stream = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
                let service = hyper::service::service_fn(move |request| {
                    let webhook = webhook.clone();
                    async move { Ok::<_, Infallible>(handle(request, &webhook).await) }
                });
                auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                    .map_err(|e| e.to_string())
            };
            match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "webhook connection ended"),
                Err(_) => tracing::debug!(%peer, "webhook connection closed after {EXCHANGE_TIMEOUT:?}"),
            }
        });
    }
}

async fn handle(request: Request<Incoming>, webhook: &Webhook) -> Response<Full<Bytes>> {
    if request.uri().path() != PATH {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    if request.method() != Method::POST {
        let mut response = text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n");
        response
            .headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
        return response;
    }
    let body = match Limited::new(request.into_body(), MAX_REVIEW_BYTES).collect().await {
        Ok(body) => body.to_bytes(),
        Err(e) => {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("cannot read the review (at most {MAX_REVIEW_BYTES} bytes): {e}\n"),
            );
        }
    };
    match admit(&body, &webhook.namespaces, &webhook.options).await {
        Ok(review) => {
            let mut response = Response::new(Full::new(Bytes::from(review.to_string())));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            response
        }
        Err(e) => {
            tracing::warn!(error = %e, "webhook: unanswerable review");
            text(StatusCode::BAD_REQUEST, &format!("{e}\n"))
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain"));
    response
}

/// Where the webhook listens and what it serves with (from `pillion-control serve`'s flags).
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}
