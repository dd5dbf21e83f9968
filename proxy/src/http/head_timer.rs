//! The timer hyper's HTTP/1 server runs its header-read timeout on: one per client connection.
//!
//! hyper arms that timeout afresh for every request head. With hyper-util's `TokioTimer` each
//! arming is a new tokio timer, registered in the runtime's timer wheel when first polled and
//! removed again when the head arrives: about 600 instructions per request (callgrind,
//! benches/compare/instructions.sh). This timer keeps one tokio `Sleep` per connection and moves
//! its deadline instead. Moving a registered deadline later is a single atomic update in tokio,
//! and the timer stays registered between requests; if it expires meanwhile it wakes the
//! connection once, which costs a poll and nothing else.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::time::Sleep;

type Slot = Arc<Mutex<Option<Pin<Box<Sleep>>>>>;

/// Create one per connection: the connection's heads share its `Sleep`.
#[derive(Clone, Default)]
pub struct HeadTimer {
    idle: Slot,
}

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let sleep = match self.idle.lock().ok().and_then(|mut idle| idle.take()) {
            Some(mut sleep) => {
                sleep.as_mut().reset(deadline);
                sleep
            }
            None => Box::pin(tokio::time::sleep_until(deadline)),
        };
        Box::pin(HeadSleep {
            sleep: Some(sleep),
            idle: self.idle.clone(),
        })
    }
}

/// Lends the connection's `Sleep` to hyper and gives it back when hyper drops it.
struct HeadSleep {
    sleep: Option<Pin<Box<Sleep>>>,
    idle: Slot,
}

impl Future for HeadSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.get_mut().sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeadSleep {}

impl Drop for HeadSleep {
    fn drop(&mut self) {
        if let (Some(sleep), Ok(mut idle)) = (self.sleep.take(), self.idle.lock()) {
            *idle = Some(sleep);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real time, short durations: hyper computes deadlines from `std::time::Instant`, which a
    //! paused tokio clock would not move. Only "not before the deadline" is asserted tightly.
    use super::*;
    use hyper::rt::Timer;

    const NEVER: Duration = Duration::from_secs(20);

    #[tokio::test]
    async fn a_reused_timer_fires_at_each_new_deadline_earlier_or_later() {
        let timer = HeadTimer::default();
        let start = Instant::now();
        timer.sleep(Duration::from_millis(50)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));

        // Armed far out, dropped (the head arrived), then armed nearer: the kept timer moves back.
        drop(timer.sleep(Duration::from_secs(3600)));
        let start = Instant::now();
        tokio::time::timeout(NEVER, timer.sleep(Duration::from_millis(60)))
            .await
            .expect("the nearer deadline applies");
        assert!(start.elapsed() >= Duration::from_millis(60));
    }

    #[tokio::test]
    async fn a_timer_that_expired_while_idle_waits_out_the_next_deadline() {
        let timer = HeadTimer::default();
        drop(timer.sleep(Duration::from_millis(10)));
        tokio::time::sleep(Duration::from_millis(40)).await;
        let start = Instant::now();
        timer.sleep(Duration::from_millis(50)).await;
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
