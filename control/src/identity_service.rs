//! The `Identity` gRPC service: token → workload, CSR → certificate for exactly that workload.
//!
//! Order matters: the rate limit comes first (every call, good or bogus, costs a permit, so a flood
//! of bad tokens cannot become a flood of API-server calls), then the token is checked before the
//! CSR is even parsed, so an unauthenticated caller learns nothing about what the CA would accept.
//! No client certificate is needed: a proxy calls this to get its first one. Every refusal is
//! logged with the peer address.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::{
    auth::{AuthError, Authenticator},
    ca::{CertificateAuthority, CsrError, SignError},
    proto::{CertifyRequest, CertifyResponse, identity_server::Identity},
    rate_limit::TokenBucket,
    tls::{ControlPeer, PeerIdentity},
};

/// Signs workload certificates for authenticated callers.
pub struct IdentityService<A> {
    ca: Arc<CertificateAuthority>,
    authenticator: Arc<A>,
    limit: TokenBucket,
}

impl<A> IdentityService<A> {
    pub fn new(ca: Arc<CertificateAuthority>, authenticator: Arc<A>, limit: TokenBucket) -> Self {
        IdentityService {
            ca,
            authenticator,
            limit,
        }
    }
}

#[tonic::async_trait]
impl<A: Authenticator> Identity for IdentityService<A> {
    async fn certify(&self, request: Request<CertifyRequest>) -> Result<Response<CertifyResponse>, Status> {
        let caller = ControlPeer::of(&request);
        let peer = caller.addr();
        if !self.limit.try_acquire() {
            tracing::warn!(%peer, "certify refused: over the certify rate limit");
            return Err(Status::resource_exhausted("too many certificate requests; retry later"));
        }
        let CertifyRequest { token, csr_der } = request.into_inner();

        if token.is_empty() {
            tracing::warn!(%peer, "certify refused: no token");
            return Err(Status::unauthenticated("a token is required"));
        }
        let workload = match self.authenticator.authenticate(&token).await {
            Ok(w) => w,
            Err(AuthError::Rejected(reason)) => {
                tracing::warn!(%peer, %reason, "certify refused: token rejected");
                return Err(Status::unauthenticated("token rejected"));
            }
            Err(AuthError::Unavailable(reason)) => {
                tracing::error!(%peer, %reason, "certify failed: cannot check the token");
                return Err(Status::unavailable("cannot check the token now; retry later"));
            }
        };

        let svid = match self.ca.sign(&workload, &csr_der) {
            Ok(svid) => svid,
            Err(e) => {
                tracing::warn!(%peer, %workload, error = %e, "certify refused");
                return Err(match e {
                    SignError::Csr(CsrError::CaRequested) => Status::permission_denied(e.to_string()),
                    SignError::Csr(_) => Status::invalid_argument(e.to_string()),
                    SignError::Internal(_) => Status::internal("signing failed"),
                });
            }
        };
        let valid_until = svid.not_after.unix_timestamp();
        let client_certificate = match &caller.identity {
            PeerIdentity::Verified(id) => id.as_str(),
            PeerIdentity::Anonymous => "none",
            PeerIdentity::Plaintext => "plaintext",
        };
        tracing::info!(%peer, spiffe_id = %svid.spiffe_id, valid_until, client_certificate, "certificate issued");
        Ok(Response::new(CertifyResponse {
            leaf_der: svid.leaf.to_vec(),
            chain_der: svid.chain.iter().map(|c| c.to_vec()).collect(),
            valid_until,
            spiffe_id: svid.spiffe_id,
        }))
    }
}
