//! Keeps the route policy current. The file is read once at start (an invalid file stops
//! start-up) and then polled: a valid change is swapped in atomically for new requests, open
//! connections keep flowing; an invalid one is logged with its place and the old policy stays.
//!
//! Every poll reads the disk on the blocking pool, never on the runtime thread: a slow or stuck
//! file system (a hung NFS or FUSE mount, a FIFO) must not stall the connections it serves.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use tracing::{error, info};

use pillion_api::policy::PolicyError;

use super::Policy;
use crate::http::metrics::HttpMetrics;

/// The policy every request reads; swapped whole on reload.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;

const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reads and compiles the file, or the empty policy when there is none.
pub fn load(path: Option<&Path>, metrics: &HttpMetrics) -> Result<Policy, PolicyError> {
    reload(path, metrics, None)
}

/// [`load`], keeping what the `previous` policy's balancers learnt about the endpoints.
fn reload(path: Option<&Path>, metrics: &HttpMetrics, previous: Option<&Policy>) -> Result<Policy, PolicyError> {
    let Some(path) = path else {
        return Ok(Policy::empty(metrics));
    };
    let policy = pillion_api::policy::load(path)?;
    Policy::compile_after(policy, metrics, previous).map_err(|message| PolicyError::Invalid {
        origin: path.display().to_string(),
        message,
    })
}

/// Polls `path` for changes forever.
pub async fn watch(path: PathBuf, shared: SharedPolicy, metrics: Arc<HttpMetrics>) {
    let path = Arc::new(path);
    let mut seen = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || stamp(&path)).await.ok().flatten()
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        let (file, file_metrics, last) = (path.clone(), metrics.clone(), seen);
        let previous = shared.load_full();
        let checked = tokio::task::spawn_blocking(move || {
            let now = stamp(&file);
            let loaded = (now != last).then(|| reload(Some(&file), &file_metrics, Some(&previous)));
            (now, loaded)
        })
        .await;
        let Ok((now, Some(loaded))) = checked else {
            continue;
        };
        seen = now;
        match loaded {
            Ok(policy) => {
                shared.store(Arc::new(policy));
                metrics.config_reloads_ok.inc();
                info!(path = %path.display(), "route config reloaded");
            }
            Err(error) => {
                metrics.config_reloads_failed.inc();
                error!(%error, "route config rejected; the previous config stays in force");
            }
        }
    }
}

/// What tells us the file changed: modification time and length (a rewrite within the same
/// second usually changes the length; editors and ConfigMap updates replace the file anyway).
fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::metrics::Metrics;

    /// The route file is a FIFO nobody writes yet, so opening it for reading blocks. If the
    /// watcher opened it on the runtime thread, this single-threaded runtime would stop, and the
    /// loop below (which needs it to run) could never see the reader and hand it the file.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stuck_file_read_does_not_stall_the_runtime() {
        let dir = std::env::temp_dir().join(format!("pillion-reload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("routes.yaml");
        let _ = std::fs::remove_file(&path);
        let metrics = Metrics::new();
        let shared: SharedPolicy = Arc::new(ArcSwap::from_pointee(Policy::empty(&metrics.http)));
        tokio::spawn(watch(path.clone(), shared, metrics.http.clone()));
        // Let the watcher note that there is no file yet, so the FIFO's appearance is a change.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let handed_over = crate::stuck_file::hand_over(&path, b"routes: []\n").await;
        assert!(handed_over, "the runtime stalled while the watcher read the file");
        let reloaded = tokio::time::timeout(Duration::from_secs(10), async {
            while metrics.http.config_reloads_ok.get() + metrics.http.config_reloads_failed.get() == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(reloaded.is_ok(), "the file was read and judged");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
