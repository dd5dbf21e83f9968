//! Identity from the control plane: a key generated in memory (it never leaves the process), a
//! CSR sent with the workload's token, the signed certificate installed in the store.
//!
//! The certificate is checked before it is installed ([`check`](super::check)): a refused one is
//! logged and counted, and the current certificate keeps serving. Renewal happens at 70% of the
//! remaining lifetime. A failed or refused renewal is retried with jittered exponential backoff
//! (never less than a quarter second, so an expired identity never spins) while the current
//! certificate keeps serving, until it expires.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use pillion_api::proto::{CertifyRequest, identity_client::IdentityClient};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::UnixTime;

use super::{Held, IdentityStore, check, renewal_delay};
use crate::tls::{self, spiffe::SpiffeId};

/// What an issued certificate must satisfy beyond chaining to the trust anchors.
pub struct Expectations {
    /// `PILLION_IDENTITY_SPIFFE_ID`: the only identity this proxy accepts for itself.
    pub identity: Option<SpiffeId>,
    /// Counts refused certificates.
    pub rejected: Counter,
}

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps the store supplied with certificates for as long as the proxy runs.
pub async fn run(store: Arc<IdentityStore>, channel: Channel, token_file: PathBuf, expect: Expectations) {
    let mut client = IdentityClient::new(channel);
    let mut failures: u32 = 0;
    let provider = tls::provider();
    loop {
        let issued = certify(&mut client, &token_file).await.and_then(|held| {
            check::vouched_for(
                &held,
                &store.trust_anchors(),
                expect.identity.as_ref(),
                &provider,
                UnixTime::now(),
            )
            .map(|()| held)
            .map_err(|refused| {
                expect.rejected.inc();
                format!("issued certificate refused: {refused}")
            })
        });
        match issued {
            Ok(held) => {
                failures = 0;
                let delay = renewal_delay(&held, SystemTime::now());
                store.install(held);
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let delay = retry_delay(failures);
                let expired = store.current().is_some_and(|held| held.not_after <= SystemTime::now());
                tracing::warn!(%error, retry_in = ?delay, current_expired = expired, "certificate request failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Back-off after `failures` failed or refused requests in a row: 0.5 s doubling to 30 s, with
/// jitter (half to all of it) so a fleet of proxies does not retry in step. Never below 0.25 s.
fn retry_delay(failures: u32) -> Duration {
    let ceiling = Duration::from_millis(500)
        .saturating_mul(1 << failures.min(8))
        .min(MAX_BACKOFF);
    ceiling.mul_f64(0.5 + fastrand::f64() / 2.0)
}

async fn certify(client: &mut IdentityClient<Channel>, token_file: &PathBuf) -> Result<Held, String> {
    // Async read: the token sits on a projected volume, which must not stall the runtime thread.
    let token = tokio::fs::read_to_string(token_file)
        .await
        .map_err(|e| format!("token file {}: {e}", token_file.display()))?;
    let key = KeyPair::generate().map_err(|e| format!("generating a key: {e}"))?;
    let mut params = CertificateParams::default();
    // The CA takes the identity from the token; the CSR only proves possession of the key.
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| format!("building the CSR: {e}"))?;
    let response = client
        .certify(CertifyRequest {
            token: token.trim().to_string(),
            csr_der: csr.der().to_vec(),
        })
        .await
        .map_err(|status| format!("{}: {}", status.code(), status.message()))?
        .into_inner();
    let mut chain = vec![CertificateDer::from(response.leaf_der)];
    chain.extend(response.chain_der.into_iter().map(CertificateDer::from));
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    Held::new(chain, private, &tls::provider()).map_err(|e| format!("issued certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_and_never_spin() {
        for failures in [1, 2, 5, 8, 100, u32::MAX] {
            for _ in 0..100 {
                let delay = retry_delay(failures);
                assert!(delay >= Duration::from_millis(250), "{failures}: {delay:?}");
                assert!(delay <= MAX_BACKOFF, "{failures}: {delay:?}");
            }
        }
        assert!(retry_delay(8) >= MAX_BACKOFF / 2);
    }
}
