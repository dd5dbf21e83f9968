//! The connection limit: how many connections one direction's listeners serve at once
//! (`PILLION_MAX_CONNECTIONS`), so a flood of connections costs a bounded amount of memory.
//!
//! A connection over the limit is closed at once, with a reset, rather than left waiting in the
//! accept backlog: a client learns immediately that it should back off or go elsewhere (as with
//! Envoy's connection limit), and the connections being served are not slowed by it. Each refusal
//! is counted (`pillion_tcp_connections_refused_total{reason="limit"}`); the log says so at most
//! once per [`LOG_EVERY`], with how many were refused since the last line.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use prometheus_client::metrics::counter::Counter;
use tokio::{
    sync::{OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tracing::warn;

use crate::{accept::Accepted, metrics::Direction, transport};

/// At most one log line per this interval while connections are refused.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// A connection's path holding its permit until it ends; nothing for a refused connection.
pub struct Limited<Fut>(Option<(OwnedSemaphorePermit, Pin<Box<Fut>>)>);

pub struct ConnLimit {
    permits: Arc<Semaphore>,
    max: usize,
    direction: Direction,
    refused: Counter,
    /// When the last line was logged, and refusals since.
    log: Mutex<(Option<Instant>, u64)>,
}

impl ConnLimit {
    pub fn new(max: usize, direction: Direction, refused: Counter) -> Arc<Self> {
        Arc::new(ConnLimit {
            permits: Arc::new(Semaphore::new(max.min(Semaphore::MAX_PERMITS))),
            max,
            direction,
            refused,
            log: Mutex::new((None, 0)),
        })
    }

    /// Wraps a path's `proxy` function: a connection is served while it holds one of the
    /// permits; one that finds none left is closed (reset) before anything is read from it.
    pub fn serve<F, Fut>(self: Arc<Self>, proxy: F) -> impl Fn(Accepted) -> Limited<Fut>
    where
        F: Fn(Accepted) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        // The permit is taken here, as the connection is accepted, not when its task first runs:
        // the count is exact even while the runtime is busy.
        move |conn: Accepted| match self.permits.clone().try_acquire_owned() {
            Ok(permit) => Limited(Some((permit, Box::pin(proxy(conn))))),
            Err(_) => {
                self.refuse(conn);
                Limited(None)
            }
        }
    }

    fn refuse(&self, conn: Accepted) {
        self.refused.inc();
        transport::reset_on_close(&conn.stream);
        if let Some(refused) = self.due_log_line(Instant::now()) {
            warn!(
                direction = self.direction.as_str(),
                limit = self.max,
                refused,
                "connection limit reached (PILLION_MAX_CONNECTIONS): closing new connections"
            );
        }
    }

    /// Counts a refusal; returns how many to report when a log line is due.
    fn due_log_line(&self, now: Instant) -> Option<u64> {
        let mut log = self.log.lock().ok()?;
        log.1 += 1;
        if log.0.is_some_and(|last| now.duration_since(last) < LOG_EVERY) {
            return None;
        }
        let refused = log.1;
        *log = (Some(now), 0);
        Some(refused)
    }
}

impl<Fut: Future<Output = ()>> Future for Limited<Fut> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some((_, proxy)) = self.0.as_mut() else {
            return Poll::Ready(());
        };
        std::task::ready!(proxy.as_mut().poll(cx));
        // Done: the permit goes back now, not whenever this future is dropped.
        self.0 = None;
        Poll::Ready(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use tokio::{
        io::AsyncReadExt,
        net::{TcpListener, TcpStream},
        sync::oneshot,
    };

    use super::*;
    use crate::{
        metrics::{Direction, Metrics},
        transport::OriginalDst,
    };

    /// A client socket and the accepted side, as the accept loop hands it to a path.
    async fn accepted(listener: &TcpListener) -> (TcpStream, Accepted) {
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let dst = OriginalDst(SocketAddr::from(([127, 0, 0, 1], 9)));
        (client, Accepted { stream, peer, dst })
    }

    #[tokio::test]
    async fn connections_over_the_limit_are_closed_and_counted() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics = Metrics::new().tcp(Direction::Inbound);
        let limit = ConnLimit::new(2, Direction::Inbound, metrics.refused_limit.clone());
        // Each served connection is held open until its sender fires.
        let (release_tx, release_rx) = std::sync::mpsc::channel::<oneshot::Receiver<()>>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let serve = limit.serve(move |conn: Accepted| {
            let done = release_rx.lock().unwrap().recv().unwrap();
            async move {
                let _ = done.await;
                drop(conn);
            }
        });
        let mut releases = Vec::new();
        let mut held = Vec::new();
        for _ in 0..2 {
            let (tx, rx) = oneshot::channel();
            release_tx.send(rx).unwrap();
            releases.push(tx);
            let (client, conn) = accepted(&listener).await;
            held.push((client, tokio::spawn(serve(conn))));
        }

        // The third finds no permit: reset at once, counted, the proxy function never called.
        let (mut client, conn) = accepted(&listener).await;
        serve(conn).await;
        let mut buf = [0u8; 1];
        let err = client.read(&mut buf).await.expect_err("a reset");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
        assert_eq!(metrics.refused_limit.get(), 1);

        // One ends: its permit goes back, and the next connection is served.
        releases.remove(0).send(()).unwrap();
        held.remove(0).1.await.unwrap();
        let (tx, rx) = oneshot::channel();
        release_tx.send(rx).unwrap();
        let (_client, conn) = accepted(&listener).await;
        let task = tokio::spawn(serve(conn));
        tx.send(()).unwrap();
        task.await.unwrap();
        assert_eq!(metrics.refused_limit.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_line_is_rate_limited_and_says_how_many() {
        let limit = ConnLimit::new(1, Direction::Outbound, Counter::default());
        let start = Instant::now();
        assert_eq!(limit.due_log_line(start), Some(1));
        for i in 1..1000 {
            assert_eq!(limit.due_log_line(start + Duration::from_millis(i)), None);
        }
        assert_eq!(
            limit.due_log_line(start + LOG_EVERY),
            Some(1000),
            "999 silent ones and this one"
        );
        assert_eq!(limit.due_log_line(start + LOG_EVERY + Duration::from_secs(1)), None);
    }
}
