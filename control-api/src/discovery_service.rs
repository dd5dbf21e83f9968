//! The `Discovery` gRPC service: one server stream per watched destination.
//!
//! Each stream sends the destination's complete state at once and again whenever a policy reload
//! changes *that destination's* state; reloads that leave it equal send nothing. Streams end when
//! the server shuts down, so graceful shutdown is not held up by watchers that never hang up.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    policy::{Policy, PolicyWatch, convert::destination_update, model::Authority},
    proto::{DestinationUpdate, WatchRequest, discovery_server::Discovery},
};

/// Serves destination watches from the current policy.
pub struct DiscoveryService {
    policy: PolicyWatch,
    shutdown: CancellationToken,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<DestinationUpdate, Status>> + Send>>;

struct StreamState {
    destination: Authority,
    policy: watch::Receiver<Arc<Policy>>,
    last: Option<DestinationUpdate>,
    shutdown: CancellationToken,
}

impl DiscoveryService {
    pub fn new(policy: PolicyWatch, shutdown: CancellationToken) -> Self {
        DiscoveryService { policy, shutdown }
    }
}

#[tonic::async_trait]
impl Discovery for DiscoveryService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<WatchRequest>) -> Result<Response<Self::WatchStream>, Status> {
        let requested = request.into_inner().destination;
        let destination: Authority = requested
            .parse()
            .map_err(|e: String| Status::invalid_argument(format!("destination: {e}")))?;
        tracing::debug!(%destination, "watch opened");
        let state = StreamState {
            destination,
            policy: self.policy.subscribe(),
            last: None,
            shutdown: self.shutdown.clone(),
        };
        let stream = futures_util::stream::unfold(state, next_update);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Waits for the destination's state to differ from what was last sent; `None` ends the stream.
async fn next_update(mut s: StreamState) -> Option<(Result<DestinationUpdate, Status>, StreamState)> {
    loop {
        let update = destination_update(&s.policy.borrow_and_update(), &s.destination);
        if s.last.as_ref() != Some(&update) {
            s.last = Some(update.clone());
            return Some((Ok(update), s));
        }
        tokio::select! {
            changed = s.policy.changed() => {
                if changed.is_err() {
                    // The policy can no longer change (fixed policy): keep the stream open, idle,
                    // until shutdown, so the proxy does not reconnect in a loop.
                    s.shutdown.cancelled().await;
                    return None;
                }
            }
            _ = s.shutdown.cancelled() => return None,
        }
    }
}
