//! A short-lived cache of successful authentications, so that a proxy renewing its certificate,
//! or many replicas of one workload starting at once, do not each cost an API-server call.
//!
//! Keyed by the SHA-256 of the token: the tokens themselves are never kept. Only successes are
//! cached; a rejected or unchecked token is asked about again (the certify rate limit bounds how
//! often). An entry lives `ttl` (60 s by default), so a revoked token still authenticates for at
//! most that long. The cache holds at most `max_entries`; when full of live entries, new
//! successes are simply not cached.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use aws_lc_rs::digest::{SHA256, digest};
use tokio::time::Instant;

use super::{AuthError, Authenticator, WorkloadId};

pub const DEFAULT_TTL: Duration = Duration::from_secs(60);
pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

/// `inner`, remembered for `ttl` per successful token.
pub struct CachedAuthenticator<A> {
    inner: A,
    ttl: Duration,
    max_entries: usize,
    entries: Mutex<HashMap<[u8; 32], (WorkloadId, Instant)>>,
}

impl<A> CachedAuthenticator<A> {
    pub fn new(inner: A, ttl: Duration, max_entries: usize) -> Self {
        CachedAuthenticator {
            inner,
            ttl,
            max_entries,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn lookup(&self, key: &[u8; 32]) -> Option<WorkloadId> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries
            .get(key)
            .filter(|(_, expires)| *expires > Instant::now())
            .map(|(id, _)| id.clone())
    }

    fn remember(&self, key: [u8; 32], workload: WorkloadId) {
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() >= self.max_entries {
            entries.retain(|_, (_, expires)| *expires > now);
        }
        if entries.len() < self.max_entries || entries.contains_key(&key) {
            entries.insert(key, (workload, now + self.ttl));
        }
    }
}

impl<A: Authenticator> Authenticator for CachedAuthenticator<A> {
    async fn authenticate(&self, token: &str) -> Result<WorkloadId, AuthError> {
        let mut key = [0u8; 32];
        key.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
        if let Some(workload) = self.lookup(&key) {
            return Ok(workload);
        }
        let workload = self.inner.authenticate(token).await?;
        self.remember(key, workload.clone());
        Ok(workload)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// `good-*` tokens are default/web; counts every call.
    struct Counting(AtomicUsize);

    impl Authenticator for Counting {
        async fn authenticate(&self, token: &str) -> Result<WorkloadId, AuthError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            if token.starts_with("good-") {
                Ok(WorkloadId::new("default", "web").unwrap())
            } else {
                Err(AuthError::Rejected("no".into()))
            }
        }
    }

    fn calls(c: &CachedAuthenticator<Counting>) -> usize {
        c.inner.0.load(Ordering::Relaxed)
    }

    #[tokio::test(start_paused = true)]
    async fn successes_are_cached_for_the_ttl_failures_never() {
        let cache = CachedAuthenticator::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60), 10);
        cache.authenticate("good-a").await.unwrap();
        cache.authenticate("good-a").await.unwrap();
        assert_eq!(calls(&cache), 1);
        assert!(cache.authenticate("bad").await.is_err());
        assert!(cache.authenticate("bad").await.is_err());
        assert_eq!(calls(&cache), 3);
        tokio::time::advance(Duration::from_secs(61)).await;
        cache.authenticate("good-a").await.unwrap();
        assert_eq!(calls(&cache), 4);
        // The token itself is not what is stored.
        let entries = cache.entries.lock().unwrap();
        assert!(entries.keys().all(|k| !k.starts_with(b"good-a")));
    }

    #[tokio::test(start_paused = true)]
    async fn bounded() {
        let cache = CachedAuthenticator::new(Counting(AtomicUsize::new(0)), Duration::from_secs(60), 3);
        for i in 0..10 {
            cache.authenticate(&format!("good-{i}")).await.unwrap();
        }
        assert_eq!(cache.entries.lock().unwrap().len(), 3);
        // Expired entries make room again.
        tokio::time::advance(Duration::from_secs(61)).await;
        cache.authenticate("good-new").await.unwrap();
        assert_eq!(cache.entries.lock().unwrap().len(), 1);
    }
}
