//! Token authentication: who is asking for a certificate.
//!
//! The identity service trusts only an [`Authenticator`]'s answer; the CSR never names the identity.
//! Two implementations: a token file for standalone use ([`TokenFile`]) and Kubernetes TokenReview
//! for clusters ([`TokenReview`]). [`AnyAuthenticator`] picks one at start-up without boxing;
//! [`CachedAuthenticator`] remembers successes for a minute so reviews do not flood the API server.

pub mod cache;
mod token_file;
mod token_review;

use std::future::Future;

pub use cache::CachedAuthenticator;
pub use token_file::{TokenFile, TokenFileError};
pub use token_review::{TokenReview, TokenReviewConfig, TokenReviewError};

pub use crate::spiffe::WorkloadId;

/// Why a token did not yield an identity.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is unknown, expired, for another audience, or not a service account's.
    #[error("token rejected: {0}")]
    Rejected(String),
    /// The token could not be checked (e.g. the Kubernetes API server is unreachable); retry later.
    #[error("token could not be checked: {0}")]
    Unavailable(String),
}

/// Maps a bearer token to the workload it belongs to.
pub trait Authenticator: Send + Sync + 'static {
    fn authenticate(&self, token: &str) -> impl Future<Output = Result<WorkloadId, AuthError>> + Send;
}

/// The authenticator chosen by configuration. Built once at start-up, so the size difference
/// between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum AnyAuthenticator {
    TokenFile(TokenFile),
    /// Successful reviews are cached: see [`cache`].
    TokenReview(CachedAuthenticator<TokenReview>),
}

impl Authenticator for AnyAuthenticator {
    async fn authenticate(&self, token: &str) -> Result<WorkloadId, AuthError> {
        match self {
            AnyAuthenticator::TokenFile(a) => a.authenticate(token).await,
            AnyAuthenticator::TokenReview(a) => a.authenticate(token).await,
        }
    }
}
