//! Accepting redirected connections, shared by both directions: socket options, the original
//! destination, loop refusal, and handing each connection to its path as a drain-tracked task.

use std::{
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

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
    /// Inbound: the pod's own addresses, the only original destinations forwarded; anything
    /// else was routed via the pod or aimed at its loopback, and relaying it would make the pod
    /// an open relay. `None` on the outbound side, where any destination is the app's choice.
    pub pod_ips: Option<Arc<[IpAddr]>>,
}

/// Refusals are logged at warn at most once per [`REFUSAL_WARN_PERIOD`] per listener, with how
/// many went unlogged since; the rest at debug. A port scan must not flood the log.
struct RefusalLog {
    next_warn: Instant,
    suppressed: u64,
}

const REFUSAL_WARN_PERIOD: Duration = Duration::from_secs(10);

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
        pod_ips,
    } = settings;
    let mut refusals = RefusalLog {
        next_warn: Instant::now(),
        suppressed: 0,
    };
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
        let dst = match (fixed_target, &pod_ips) {
            // A fixed target is the operator's own choice, not a destination a peer picked.
            (Some(target), _) => Ok(OriginalDst(target)),
            (None, Some(pod_ips)) => match transport::original_dst(&stream) {
                // Addressed to the inbound port itself at a pod address: a peer proxy's opaque
                // transport (docs/opaque.md). The inbound path accepts it or refuses it.
                Err(NoTarget::Loop(dst)) if pod_ips.contains(&dst.ip()) => Ok(OriginalDst(dst)),
                dst => dst.and_then(|dst| transport::check_pod_address(dst, pod_ips)),
            },
            (None, None) => transport::original_dst(&stream),
        };
        let dst = match dst {
            Ok(dst) => dst,
            Err(refusal) => {
                match &refusal {
                    NoTarget::Loop(_) => metrics.refused_loop.inc(),
                    NoTarget::NoOriginalDst(_) => metrics.refused_no_original_dst.inc(),
                    NoTarget::NotPodAddress(_) => metrics.refused_not_pod_address.inc(),
                };
                refusals.log(dir, peer, &refusal);
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

impl RefusalLog {
    fn log(&mut self, dir: &str, peer: SocketAddr, refusal: &NoTarget) {
        match self.warn_now(Instant::now()) {
            Some(suppressed) => warn!(
                direction = dir,
                %peer,
                error = %refusal,
                refused_since_last_warning = suppressed,
                "connection refused (further refusals in the next 10s are logged at debug; all are counted in pillion_tcp_connections_refused_total)"
            ),
            None => debug!(direction = dir, %peer, error = %refusal, "connection refused"),
        }
    }

    /// `Some(refusals logged at debug since the last warning)` when this one is due a warning.
    fn warn_now(&mut self, now: Instant) -> Option<u64> {
        if now < self.next_warn {
            self.suppressed += 1;
            return None;
        }
        self.next_warn = now + REFUSAL_WARN_PERIOD;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_warn_once_per_period_and_count_the_rest() {
        let start = Instant::now();
        let mut log = RefusalLog {
            next_warn: start,
            suppressed: 0,
        };
        assert_eq!(log.warn_now(start), Some(0));
        for i in 1..=500 {
            assert_eq!(log.warn_now(start + Duration::from_millis(i)), None);
        }
        assert_eq!(log.warn_now(start + REFUSAL_WARN_PERIOD), Some(500));
        assert_eq!(log.warn_now(start + REFUSAL_WARN_PERIOD * 3), Some(0));
    }
}
