//! Identity from files: a certificate chain and key written by cert-manager, Vault agent or an
//! operator. Re-read when either file changes; a bad pair is logged and the old one kept.
//! The polling reads run on the blocking pool, never on the runtime thread.

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

type Stamps = (Option<(SystemTime, u64)>, Option<(SystemTime, u64)>);

/// Polls both files and installs a changed pair that loads.
pub async fn watch(store: Arc<IdentityStore>, cert: PathBuf, key: PathBuf) {
    let files = Arc::new((cert, key));
    let mut seen = {
        let files = files.clone();
        tokio::task::spawn_blocking(move || stamps(&files.0, &files.1))
            .await
            .ok()
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    loop {
        tick.tick().await;
        let (pair, last) = (files.clone(), seen);
        let checked = tokio::task::spawn_blocking(move || {
            let now = stamps(&pair.0, &pair.1);
            let loaded = (Some(now) != last).then(|| load(&pair.0, &pair.1));
            (now, loaded)
        })
        .await;
        let Ok((now, Some(loaded))) = checked else {
            continue;
        };
        seen = Some(now);
        match loaded {
            Ok(held) => store.install(held),
            Err(error) => tracing::warn!(%error, "new certificate files rejected; keeping the current certificate"),
        }
    }
}

/// What tells us a file changed: modification time and length. Blocking: call off the runtime.
fn stamps(cert: &Path, key: &Path) -> Stamps {
    let stamp = |p: &Path| -> Option<(SystemTime, u64)> {
        let meta = std::fs::metadata(p).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    (stamp(cert), stamp(key))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::metrics::gauge::Gauge;

    use super::*;

    /// The certificate file becomes a FIFO nobody writes yet, so opening it blocks: were it read
    /// on the runtime thread, this single-threaded runtime could not run the loop that finds the
    /// reader and hands it the bytes.
    #[tokio::test(flavor = "current_thread")]
    async fn a_stuck_certificate_read_does_not_stall_the_runtime() {
        let dir = std::env::temp_dir().join(format!("pillion-certfiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        let _ = std::fs::remove_file(&cert);
        std::fs::write(&key, b"not a key").unwrap();
        let ca = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let pem = params.self_signed(&ca).unwrap().pem();
        let (roots, der) = tls::trust_anchors(pem.as_bytes(), "test").unwrap();
        let store = Arc::new(IdentityStore::new(roots, &der, "files", Gauge::default()));
        tokio::spawn(watch(store, cert.clone(), key.clone()));
        // Let the watcher note that there is no certificate yet, so the FIFO is a change.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let handed_over = crate::stuck_file::hand_over(&cert, pem.as_bytes()).await;
        assert!(
            handed_over,
            "the runtime stalled while the watcher read the certificate"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
