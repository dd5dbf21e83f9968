//! The HTTP path of a connection, once detection said HTTP/1 or HTTP/2.
//!
//! hyper serves the client connection; every request goes down one stack of tower layers, each
//! with one job, outermost first:
//!
//! ```text
//! route → metrics → authz → errors → timeout(request) → retry → balance
//!       → timeout(backendRequest) → upstream
//! ```
//!
//! - `route` picks the route (and backend) from the live policy;
//! - `metrics` records every answer, synthetic ones included, so it sits above `authz` and `errors`;
//! - `authz` answers 403 on a connection the port's authorization policy denies;
//! - `errors` turns proxy failures into synthetic responses with `pillion-proxy-error`;
//! - the request timeout covers all attempts, the backend-request timeout one attempt;
//! - `balance` picks each attempt's endpoint of a balanced destination and learns from its outcome;
//! - `upstream` sends on a pooled connection in the client's protocol.

pub mod authz;
pub mod balance;
pub mod body;
pub mod errors;
pub mod framing;
pub mod head_timer;
pub mod idle;
pub mod metrics;
pub mod retry;
pub mod route;
pub mod timeout;
pub mod upstream;

#[cfg(test)]
mod tests;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper::{body::Incoming, server::conn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::{Service, ServiceBuilder};
use tracing::debug;

use crate::{
    counted_io::CountedIo,
    drain::Drain,
    metrics::{Direction, TcpMetrics},
    policy::reload::SharedPolicy,
};
use body::RequestBody;
use upstream::{Pool, Upstream, Version};

pub type ProxyRequest = http::Request<body::RequestBody>;
pub type ProxyResponse = http::Response<body::ResponseBody>;
/// The future every layer returns. A layer with nothing to do for a request hands back its inner
/// layer's future as it is, rather than boxing it again.
pub type ResponseFuture<E = errors::ProxyError> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ProxyResponse, E>> + Send>>;

#[derive(Clone, Copy, Debug)]
pub struct HttpSettings {
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub access_log: bool,
}

/// Everything the HTTP path of one direction shares across connections.
pub struct HttpProxy {
    pub direction: Direction,
    pub policy: SharedPolicy,
    pub pool: Arc<Pool>,
    pub settings: HttpSettings,
    pub drain: Drain,
    /// The direction's TCP counters: an HTTP connection's bytes count like an opaque one's.
    pub tcp: TcpMetrics,
}

impl HttpProxy {
    /// Serves one client connection until it closes, or until drain asks it to finish.
    pub async fn serve<I>(
        &self,
        io: I,
        version: Version,
        dst: SocketAddr,
        peer: SocketAddr,
        authz: Option<Arc<authz::ConnectionAuthz>>,
        dst_handle: Option<crate::discovery::Handle>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let io = CountedIo::new(io, self.tcp.read_bytes.clone(), self.tcp.write_bytes.clone());
        // Outbound, the control plane's policy governs too; the connection holds its handles.
        let discovery = match self.direction {
            Direction::Outbound => self.pool.discovery().cloned(),
            Direction::Inbound => None,
        }
        .map(|discovery| Arc::new(route::ConnDiscovery::new(discovery, dst, dst_handle)));
        let stack = ServiceBuilder::new()
            .layer(route::RouteLayer::new(
                self.policy.clone(),
                self.direction,
                dst,
                discovery,
            ))
            .layer(metrics::MetricsLayer {
                access_log: self.settings.access_log,
            })
            .layer(authz::AuthzLayer { check: authz })
            .layer(errors::ErrorLayer)
            .layer(timeout::TimeoutLayer(timeout::Scope::Request))
            .layer(retry::RetryLayer)
            .layer(balance::BalanceLayer)
            .layer(timeout::TimeoutLayer(timeout::Scope::Attempt))
            .service(Upstream::new(
                self.pool.clone(),
                version,
                self.direction == Direction::Inbound,
            ));
        // HTTP/1 only: how the framing guard learns whether an upgrade request switched.
        let upgrades = (version == Version::Http1).then(framing::UpgradeWatch::default);
        let guard_upgrades = upgrades.clone();
        let service = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            if let Some(upgrades) = &upgrades {
                upstream::admit_upgrade(&mut req, upgrades);
            }
            let mut stack = stack.clone();
            stack.call(req.map(RequestBody::Incoming))
        });
        let served = match version {
            Version::Http1 => {
                let guard = framing::FramingGuard::with_upgrades(
                    io,
                    self.settings.max_header_bytes,
                    guard_upgrades.unwrap_or_default(),
                );
                let io = TokioIo::new(guard);
                let conn = conn::http1::Builder::new()
                    .writev(false)
                    .timer(head_timer::HeadTimer::default())
                    .header_read_timeout(self.settings.idle_timeout)
                    .max_buf_size(self.settings.max_header_bytes)
                    .serve_connection(io, service)
                    .with_upgrades();
                tokio::pin!(conn);
                let mut drain = self.drain.signal();
                tokio::select! {
                    biased;
                    served = conn.as_mut() => served,
                    () = &mut drain => {
                        // HTTP/1: close after the response in flight (or now, if idle).
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
            Version::Http2 => {
                let io = TokioIo::new(io);
                let requests = idle::RequestCount::default();
                let conn = conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_header_list_size(self.settings.max_header_bytes as u32)
                    .adaptive_window(true)
                    .keep_alive_interval(idle::KEEPALIVE_INTERVAL)
                    .keep_alive_timeout(idle::KEEPALIVE_TIMEOUT)
                    .serve_connection(io, requests.count(service));
                tokio::pin!(conn);
                let mut drain = self.drain.signal();
                tokio::select! {
                    biased;
                    served = conn.as_mut() => served,
                    () = &mut drain => {
                        // HTTP/2: GOAWAY, let streams in flight finish.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                    () = requests.idle_for(self.settings.idle_timeout) => {
                        // No new request for the idle timeout: the same graceful close.
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                }
            }
        };
        if let Err(error) = served {
            debug!(direction = self.direction.as_str(), %peer, %error, "HTTP connection ended with an error");
        }
    }
}
