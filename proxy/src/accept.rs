//! Accepting redirected connections, shared by both directions: socket options, the original
//! destination, loop refusal, and handing each connection to its path as a drain-tracked task.

use std::{future::Future, net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::{
    drain::Drain,
    metrics::{Direction, TcpMetrics},
    transport::{self, NoTarget, OriginalDst},
};

/// A connection ready for a proxy path: we know who sent it and where it was going.
pub struct Accepted {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub dst: OriginalDst,
}

/// How one listener accepts.
pub struct AcceptSettings {
    pub direction: Direction,
    pub metrics: TcpMetrics,
    pub keepalive: Duration,
    /// Send every connection here instead of its original destination: for running without
    /// iptables (a VM, a laptop, a benchmark), where there is no original destination to read.
    pub fixed_target: Option<SocketAddr>,
}

/// Accepts until draining begins, then drops the listener so the kernel refuses new connections.
pub async fn serve<F, Fut>(listener: TcpListener, settings: AcceptSettings, drain: Drain, proxy: F)
where
    F: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let AcceptSettings {
        direction,
        metrics,
        keepalive,
        fixed_target,
    } = settings;
    let dir = direction.as_str();
    loop {
        let accepted = tokio::select! {
            biased;
            () = drain.started() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(error) => {
                // Usually EMFILE/ENFILE: back off briefly instead of spinning on the error.
                warn!(direction = dir, %error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.opened.inc();
        let dst = match fixed_target {
            Some(target) => Ok(OriginalDst(target)),
            None => transport::original_dst(&stream),
        };
        let dst = match dst {
            Ok(dst) => dst,
            Err(refusal) => {
                match &refusal {
                    NoTarget::Loop(_) => metrics.refused_loop.inc(),
                    NoTarget::NoOriginalDst(_) => metrics.refused_no_original_dst.inc(),
                };
                warn!(direction = dir, %peer, error = %refusal, "connection refused");
                continue;
            }
        };
        if let Err(error) = transport::set_stream_options(&stream, keepalive) {
            debug!(direction = dir, %peer, %error, "peer gone before forwarding");
            continue;
        }
        let open = metrics.open.clone();
        open.inc();
        let conn = proxy(Accepted { stream, peer, dst });
        drain.spawn(async move {
            conn.await;
            open.dec();
        });
    }
    debug!(direction = dir, "listener closed for drain");
}
