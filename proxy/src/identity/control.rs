//! Identity from the control plane: a key generated in memory (it never leaves the process), a
//! CSR sent with the workload's token, the signed certificate installed in the store.
//!
//! Renewal happens at 70% of the remaining lifetime. A failed renewal is retried with jittered
//! exponential backoff while the current certificate keeps serving, until it expires.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime},
};

use pillion_control_api::proto::{CertifyRequest, identity_client::IdentityClient};
use rcgen::{CertificateParams, DistinguishedName, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tonic::transport::Channel;

use super::{Held, IdentityStore, renewal_delay};
use crate::tls;

const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Keeps the store supplied with certificates for as long as the proxy runs.
pub async fn run(store: Arc<IdentityStore>, channel: Channel, token_file: PathBuf) {
    let mut client = IdentityClient::new(channel);
    let mut failures: u32 = 0;
    loop {
        match certify(&mut client, &token_file).await {
            Ok(held) => {
                failures = 0;
                let delay = renewal_delay(&held, SystemTime::now());
                store.install(held);
                tokio::time::sleep(delay).await;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                let ceiling = Duration::from_millis(500)
                    .saturating_mul(1 << failures.min(8))
                    .min(MAX_BACKOFF);
                let delay = ceiling.mul_f64(0.5 + fastrand::f64() / 2.0);
                let expired = store.current().is_some_and(|held| held.not_after <= SystemTime::now());
                tracing::warn!(%error, retry_in = ?delay, current_expired = expired, "certificate request failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
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
