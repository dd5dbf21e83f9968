//! The idle policy of a served HTTP/2 connection (HTTP/1's is the header-read timeout).
//!
//! - Keep-alive: a PING every [`KEEPALIVE_INTERVAL`]; one unanswered for [`KEEPALIVE_TIMEOUT`]
//!   closes the connection, so a client that vanished without a FIN does not hold it forever.
//! - Idle close: a connection on which no request has started for the idle timeout
//!   (`PILLION_HTTP_IDLE_TIMEOUT`) is closed gracefully: GOAWAY, and streams in flight (a long
//!   gRPC stream, say) finish first. The check runs once per idle timeout and counts requests
//!   instead of reading the clock per request, so the close comes between one and two idle
//!   timeouts after the last request.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Requests started on one connection.
#[derive(Clone, Debug, Default)]
pub struct RequestCount(Arc<AtomicU64>);

/// A hyper service that counts the requests it is called with.
#[derive(Clone, Debug)]
pub struct Counted<S> {
    inner: S,
    count: RequestCount,
}

impl RequestCount {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Wraps `service` so every request it serves is counted here.
    pub fn count<S>(&self, service: S) -> Counted<S> {
        Counted {
            inner: service,
            count: self.clone(),
        }
    }

    /// Resolves once a whole `idle` period went by without a new request.
    pub async fn idle_for(&self, idle: Duration) {
        let mut seen = self.get();
        loop {
            tokio::time::sleep(idle).await;
            let now = self.get();
            if now == seen {
                return;
            }
            seen = now;
        }
    }
}

impl<S, R> hyper::service::Service<R> for Counted<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.count.0.fetch_add(1, Ordering::Relaxed);
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper::{body::Incoming, server::conn, service::service_fn};
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tokio::time::Instant;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn idle_means_a_whole_period_without_a_new_request() {
        let count = RequestCount::default();
        let service = count.count(service_fn(|_: http::Request<Full<Bytes>>| async {
            Ok::<_, Infallible>(http::Response::new(Full::<Bytes>::default()))
        }));
        let start = Instant::now();
        let busy = {
            let service = service.clone();
            async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_secs(40)).await;
                    let _ = hyper::service::Service::call(&service, http::Request::new(Full::default())).await;
                }
            }
        };
        tokio::join!(busy, count.idle_for(Duration::from_secs(60)));
        // Requests every 40 s kept it busy for 200 s; the first quiet whole period ends it.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(240) && elapsed <= Duration::from_secs(360),
            "{elapsed:?}"
        );
    }

    /// A served HTTP/2 connection as `HttpProxy` serves it: answers, then goes away when idle.
    #[tokio::test(start_paused = true)]
    async fn an_idle_http2_connection_gets_goaway_and_closes() {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let count = RequestCount::default();
        let service = count.count(service_fn(|_: http::Request<Incoming>| async {
            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"ok"))))
        }));
        let served = tokio::spawn(async move {
            let conn = conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(KEEPALIVE_INTERVAL)
                .keep_alive_timeout(KEEPALIVE_TIMEOUT)
                .serve_connection(TokioIo::new(server), service);
            tokio::pin!(conn);
            tokio::select! {
                served = conn.as_mut() => served,
                () = count.idle_for(Duration::from_secs(60)) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        });
        let (mut tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake::<_, Full<Bytes>>(TokioIo::new(client))
            .await
            .unwrap();
        let client_conn = tokio::spawn(conn);
        let rsp = tx.send_request(http::Request::new(Full::default())).await.unwrap();
        assert_eq!(rsp.status(), http::StatusCode::OK);
        let start = Instant::now();
        // The client may drop its end as soon as it reads the GOAWAY: the server's last write can
        // then fail, and that is still the close we wanted.
        let _ = served.await.unwrap();
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(60) && elapsed <= Duration::from_secs(121),
            "{elapsed:?}"
        );
        // The connection is gone for the client too: a new request has nowhere to go.
        let _ = client_conn.await;
        assert!(tx.send_request(http::Request::new(Full::default())).await.is_err());
    }
}
