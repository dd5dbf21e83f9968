//! Discovery: which destinations are meshed, with which identity, and the control plane's
//! inbound authorization, from `Discovery.Watch` streams kept open per destination.
//!
//! The first lookup of a destination opens its stream and waits briefly for the first answer;
//! later lookups read the latest state without waiting. When the control plane is unreachable
//! the last known state stays in force (and streams reconnect with backoff), so traffic keeps
//! flowing on what was already known.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use pillion_control_api::proto::{WatchRequest, discovery_client::DiscoveryClient};
use tokio::sync::watch;
use tonic::transport::Channel;

use crate::{authz::Authorization, tls::spiffe::SpiffeId};

/// What the control plane says about one `ip:port`.
#[derive(Clone, Debug, Default)]
pub struct Target {
    /// The identity its certificate must carry; `None` = not meshed, plaintext.
    pub identity: Option<SpiffeId>,
    pub authorization: Option<Authorization>,
}

pub struct Discovery {
    client: DiscoveryClient<Channel>,
    watches: Mutex<HashMap<SocketAddr, watch::Receiver<Option<Arc<Target>>>>>,
    first_answer_wait: Duration,
}

impl Discovery {
    pub fn new(channel: Channel, first_answer_wait: Duration) -> Self {
        Discovery {
            client: DiscoveryClient::new(channel),
            watches: Mutex::default(),
            first_answer_wait,
        }
    }

    /// The latest state for `addr`, waiting for the first answer at most `first_answer_wait`.
    pub async fn lookup(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        let mut rx = {
            let mut watches = self.watches.lock().ok()?;
            watches
                .entry(addr)
                .or_insert_with(|| {
                    let (tx, rx) = watch::channel(None);
                    tokio::spawn(follow(self.client.clone(), addr, tx));
                    rx
                })
                .clone()
        };
        if rx.borrow().is_none() {
            let _ = tokio::time::timeout(self.first_answer_wait, rx.wait_for(Option::is_some)).await;
        }
        rx.borrow().clone()
    }

    /// The latest state for `addr` without waiting; `None` until the control plane has answered
    /// (or when nobody asked about `addr` yet).
    pub fn latest(&self, addr: SocketAddr) -> Option<Arc<Target>> {
        let watches = self.watches.lock().ok()?;
        watches.get(&addr)?.borrow().clone()
    }
}

/// Follows one destination's stream for the life of the process, reconnecting on failure.
async fn follow(mut client: DiscoveryClient<Channel>, addr: SocketAddr, tx: watch::Sender<Option<Arc<Target>>>) {
    let destination = addr.to_string();
    let mut failures = 0u32;
    loop {
        let stream = client.watch(WatchRequest {
            destination: destination.clone(),
        });
        match stream.await {
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(update)) => {
                            failures = 0;
                            let identity = update
                                .endpoints
                                .iter()
                                .find(|e| e.address.parse::<SocketAddr>().ok() == Some(addr))
                                .and_then(|e| SpiffeId::parse(&e.identity).ok());
                            let authorization = update
                                .inbound_authorization
                                .as_ref()
                                .and_then(Authorization::from_proto);
                            tx.send_replace(Some(Arc::new(Target {
                                identity,
                                authorization,
                            })));
                        }
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%destination, %status, "discovery stream failed");
                            break;
                        }
                    }
                }
            }
            Err(status) => tracing::debug!(%destination, %status, "discovery watch failed"),
        }
        failures = failures.saturating_add(1);
        let delay = Duration::from_millis(250)
            .saturating_mul(1 << failures.min(6))
            .min(Duration::from_secs(10));
        tokio::time::sleep(delay.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
    }
}
