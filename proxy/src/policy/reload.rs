//! Keeps the route policy current. The file is read once at start (an invalid file stops
//! start-up) and then polled: a valid change is swapped in atomically for new requests, open
//! connections keep flowing; an invalid one is logged with its place and the old policy stays.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use tracing::{error, info};

use super::{
    Policy,
    file::{FileError, RouteFile},
};
use crate::http::metrics::HttpMetrics;

/// The policy every request reads; swapped whole on reload.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;

const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Reads and compiles the file, or the empty policy when there is none.
pub fn load(path: Option<&Path>, metrics: &HttpMetrics) -> Result<Policy, FileError> {
    let Some(path) = path else {
        return Ok(Policy::empty(metrics));
    };
    let file = RouteFile::read(path)?;
    Policy::compile(file, metrics).map_err(|reason| FileError {
        path: path.display().to_string(),
        reason,
    })
}

/// Polls `path` for changes forever.
pub async fn watch(path: PathBuf, shared: SharedPolicy, metrics: Arc<HttpMetrics>) {
    let mut seen = stamp(&path);
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        match load(Some(&path), &metrics) {
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
