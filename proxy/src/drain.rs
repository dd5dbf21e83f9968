//! Graceful shutdown. One [`Drain`] is shared by the listeners, the connection tasks, the admin
//! server and the signal handler:
//!
//! 1. a signal or `POST /shutdown` calls [`Drain::begin`];
//! 2. accept loops see it and drop their listeners, readiness turns false;
//! 3. [`Drain::wait`] lets tracked connections finish, up to the grace period, then returns so
//!    the process can exit 0 (whatever is still open is closed by exiting).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio_util::{
    sync::{CancellationToken, WaitForCancellationFutureOwned},
    task::TaskTracker,
};

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

    /// Resolves once draining has begun, like [`Drain::started`], but cheap to poll again: a
    /// connection's serve loop polls it at every wake-up, that is several times per request.
    pub fn signal(&self) -> Started {
        Started {
            token: self.signal.clone(),
            wait: Box::pin(self.signal.clone().cancelled_owned()),
            registered: None,
        }
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

/// See [`Drain::signal`]. After the first poll its waker stays registered with the token, so a
/// later poll with the same waker is one atomic load; another waker registers again.
pub struct Started {
    token: CancellationToken,
    wait: Pin<Box<WaitForCancellationFutureOwned>>,
    registered: Option<Waker>,
}

impl Future for Started {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.token.is_cancelled() {
            return Poll::Ready(());
        }
        if this.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return Poll::Pending;
        }
        let poll = this.wait.as_mut().poll(cx);
        if poll.is_pending() {
            this.registered = Some(cx.waker().clone());
        }
        poll
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

    #[tokio::test]
    async fn signal_wakes_a_task_that_polled_it_before_drain_began() {
        let drain = Drain::new();
        let mut signal = drain.signal();
        // Polled twice with the task's waker: the second poll takes the cheap path.
        assert!(futures_poll(&mut signal).await.is_pending());
        assert!(futures_poll(&mut signal).await.is_pending());
        let waiter = tokio::spawn(signal);
        tokio::task::yield_now().await;
        drain.begin();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("the signal resolves once drain begins")
            .unwrap();
    }

    async fn futures_poll(signal: &mut Started) -> Poll<()> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *signal).poll(cx))).await
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
