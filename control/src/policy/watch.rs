//! Reloading the policy file: poll its metadata every interval, parse a changed file, and publish
//! a valid one to every open `Watch` stream through a `tokio::sync::watch` channel.
//!
//! Polling (default 1 s) rather than inotify: it works the same for Kubernetes ConfigMap volumes,
//! whose updates swap a symlink, and costs one `stat` per second. An invalid file is logged with
//! its line and reason and ignored; the previous policy stays in force until a valid file appears.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{PolicyError, load, model::Policy};

/// The current policy, shared with the discovery service.
#[derive(Clone)]
pub struct PolicyWatch {
    rx: watch::Receiver<Arc<Policy>>,
}

/// What is compared between polls to notice a rewrite.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
}

impl PolicyWatch {
    /// A policy that never changes (no file configured, or tests).
    pub fn fixed(policy: Policy) -> Self {
        let (tx, rx) = watch::channel(Arc::new(policy));
        // Dropping the sender keeps the last value readable; receivers simply never see a change.
        drop(tx);
        PolicyWatch { rx }
    }

    /// Loads `path` now (an error here is a start-up error) and re-reads it when it changes, until
    /// `shutdown` is cancelled.
    pub fn load_and_watch(path: PathBuf, interval: Duration, shutdown: CancellationToken) -> Result<Self, PolicyError> {
        let stamp = stamp(&path);
        let policy = load(&path)?;
        let (tx, rx) = watch::channel(Arc::new(policy));
        tokio::spawn(poll(path, interval, stamp, tx, shutdown));
        Ok(PolicyWatch { rx })
    }

    /// A policy published by another source (the Kubernetes index) through `rx`.
    pub fn from_receiver(rx: watch::Receiver<Arc<Policy>>) -> Self {
        PolicyWatch { rx }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Policy>> {
        self.rx.clone()
    }

    pub fn current(&self) -> Arc<Policy> {
        self.rx.borrow().clone()
    }
}

async fn poll(
    path: PathBuf,
    interval: Duration,
    mut last: Option<Stamp>,
    tx: watch::Sender<Arc<Policy>>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = stamp(&path);
        if now == last {
            continue;
        }
        last = now;
        if now.is_none() {
            tracing::warn!(path = %path.display(), "policy file is gone; keeping the current policy");
            continue;
        }
        match load(&path) {
            Ok(policy) => {
                let changed = tx.send_if_modified(|current| {
                    if **current == policy {
                        return false;
                    }
                    *current = Arc::new(policy);
                    true
                });
                if changed {
                    tracing::info!(path = %path.display(), "policy reloaded");
                }
            }
            Err(e) => tracing::error!("{e}; keeping the previous policy"),
        }
    }
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
    })
}
