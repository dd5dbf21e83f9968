//! A token bucket: bounds how much `Certify` work (token reviews, signatures) the control plane
//! takes on per second, whoever asks.
//!
//! One bucket for the whole server, behind a mutex held for a few arithmetic operations: a
//! certificate request costs a TokenReview round trip and a signature, so the lock is never the
//! bottleneck. Time is tokio's, so tests can pause it.

use std::sync::Mutex;

use tokio::time::Instant;

/// `rate` permits per second, at most `burst` saved up.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` and `burst` are at least 1.
    pub fn new(rate: u32, burst: u32) -> Self {
        let burst = f64::from(burst.max(1));
        TokenBucket {
            rate: f64::from(rate.max(1)),
            burst,
            state: Mutex::new(State {
                tokens: burst,
                last: Instant::now(),
            }),
        }
    }

    /// Takes one permit if there is one.
    pub fn try_acquire(&self) -> bool {
        // A poisoned lock only means another thread panicked mid-update of two numbers: keep going.
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(state.last).as_secs_f64();
        state.tokens = (state.tokens + elapsed * self.rate).min(self.burst);
        state.last = now;
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_then_rate() {
        let bucket = TokenBucket::new(10, 20);
        assert_eq!((0..30).filter(|_| bucket.try_acquire()).count(), 20);
        assert!(!bucket.try_acquire());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!((0..30).filter(|_| bucket.try_acquire()).count(), 5);
        // Idle for long: never more than the burst.
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!((0..100).filter(|_| bucket.try_acquire()).count(), 20);
    }
}
