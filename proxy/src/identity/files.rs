//! Identity from files: a certificate chain and key written by cert-manager, Vault agent or an
//! operator. Re-read when either file changes; a bad pair is logged and the old one kept.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::{CertError, Held, IdentityStore};
use crate::tls;

const POLL_INTERVAL: Duration = Duration::from_secs(2);

pub fn load(cert: &Path, key: &Path) -> Result<Held, String> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    Held::new(chain, private, &tls::provider()).map_err(|e: CertError| format!("{}: {e}", cert.display()))
}

/// Polls both files and installs a changed pair that loads.
pub async fn watch(store: Arc<IdentityStore>, cert: PathBuf, key: PathBuf) {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    let mut seen = (stamp(&cert), stamp(&key));
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        let now = (stamp(&cert), stamp(&key));
        if now == seen {
            continue;
        }
        seen = now;
        match load(&cert, &key) {
            Ok(held) => store.install(held),
            Err(error) => tracing::warn!(%error, "new certificate files rejected; keeping the current certificate"),
        }
    }
}
