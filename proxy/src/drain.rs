//! Graceful shutdown. One [`Drain`] is shared by the listeners, the connection tasks, the admin
//! server and the signal handler:
//!
//! 1. a signal or `POST /shutdown` calls [`Drain::begin`];
//! 2. accept loops see it and drop their listeners, readiness turns false;
//! 3. [`Drain::wait`] lets tracked connections finish, up to the grace period, then returns so
//!    the process can exit 0 (whatever is still open is closed by exiting).

use std::time::Duration;

use tokio_util::{sync::CancellationToken, task::TaskTracker};

#[derive(Clone, Default)]
pub struct Drain {
    signal: CancellationToken,
    connections: TaskTracker,
}

impl Drain {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts draining; idempotent.
    pub fn begin(&self) {
        self.signal.cancel();
    }

    pub fn is_draining(&self) -> bool {
        self.signal.is_cancelled()
    }

    /// Resolves once draining has begun.
    pub async fn started(&self) {
        self.signal.cancelled().await
    }

    /// Runs a connection task that drain waits for.
    pub fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.connections.spawn(task);
    }

    /// Waits for tracked connections to finish, at most `grace`. Returns how many were still open.
    pub async fn wait(&self, grace: Duration) -> usize {
        self.connections.close();
        match tokio::time::timeout(grace, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.connections.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn waits_for_connections_then_gives_up_at_the_grace_period() {
        let drain = Drain::new();
        drain.spawn(tokio::time::sleep(Duration::from_secs(2)));
        drain.spawn(tokio::time::sleep(Duration::from_secs(60)));
        assert!(!drain.is_draining());
        drain.begin();
        assert!(drain.is_draining());
        let start = tokio::time::Instant::now();
        assert_eq!(drain.wait(Duration::from_secs(5)).await, 1);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn returns_as_soon_as_the_last_connection_ends() {
        let drain = Drain::new();
        drain.spawn(tokio::time::sleep(Duration::from_secs(2)));
        drain.begin();
        let start = tokio::time::Instant::now();
        assert_eq!(drain.wait(Duration::from_secs(30)).await, 0);
        assert_eq!(start.elapsed(), Duration::from_secs(2));
    }
}
