//! Kubernetes authentication: each token is checked by the API server with a `TokenReview`.
//!
//! The reviewed token must belong to a service account (`system:serviceaccount:<ns>:<sa>`); with
//! audiences configured, the API server must confirm one. How the API server is reached (its CA,
//! our own rotating token) is [`KubeApi`]'s business.

use std::{sync::Arc, time::Duration};

use http::{StatusCode, Uri};
use serde::Deserialize;
use serde_json::json;

use super::{AuthError, Authenticator, WorkloadId};
pub use crate::kube_api::KubeApiError as TokenReviewError;
use crate::kube_api::{KubeApi, KubeApiConfig};

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// Where and how to reach the API server.
#[derive(Clone, Debug)]
pub struct TokenReviewConfig {
    /// Base URL of the API server, `https://host:port`.
    pub api_server: Uri,
    /// PEM bundle that signs the API server's certificate.
    pub ca_file: std::path::PathBuf,
    /// The control plane's own bearer token (re-read on each review).
    pub token_file: std::path::PathBuf,
    /// Audiences the reviewed token must be valid for; empty = the API server's default.
    pub audiences: Vec<String>,
    /// Limit for one review, connection included.
    pub timeout: Duration,
}

/// Authenticates tokens against the Kubernetes API server.
pub struct TokenReview {
    api: Arc<KubeApi>,
    audiences: Vec<String>,
}

#[derive(Deserialize)]
struct ReviewResponse {
    #[serde(default)]
    status: ReviewStatus,
}

#[derive(Default, Deserialize)]
struct ReviewStatus {
    #[serde(default)]
    authenticated: bool,
    #[serde(default)]
    user: ReviewUser,
    #[serde(default)]
    audiences: Vec<String>,
    #[serde(default)]
    error: String,
}

#[derive(Default, Deserialize)]
struct ReviewUser {
    #[serde(default)]
    username: String,
}

impl TokenReview {
    /// Builds the HTTPS client; the CA and token files must be readable now.
    pub fn new(config: TokenReviewConfig) -> Result<Self, TokenReviewError> {
        let api = KubeApi::new(&KubeApiConfig {
            api_server: config.api_server,
            ca_file: config.ca_file,
            token_file: config.token_file,
            timeout: config.timeout,
        })?;
        Ok(Self::with_api(api, config.audiences))
    }

    /// Reviews tokens through an existing API client (shared with the admission webhook).
    pub fn with_api(api: Arc<KubeApi>, audiences: Vec<String>) -> Self {
        TokenReview { api, audiences }
    }

    async fn review(&self, token: &str) -> Result<ReviewStatus, AuthError> {
        let mut spec = json!({ "token": token });
        if !self.audiences.is_empty() {
            spec["audiences"] = json!(self.audiences);
        }
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
        });
        let (status, body) = self
            .api
            .post_json(TOKEN_REVIEWS, &body)
            .await
            .map_err(AuthError::Unavailable)?;
        if status != StatusCode::CREATED && status != StatusCode::OK {
            // 401/403 here mean *our* credentials are wrong, not the workload's: report as unavailable.
            return Err(AuthError::Unavailable(format!(
                "API server answered {status} to the TokenReview"
            )));
        }
        let review: ReviewResponse = serde_json::from_slice(&body)
            .map_err(|e| AuthError::Unavailable(format!("unreadable TokenReview response: {e}")))?;
        Ok(review.status)
    }
}

impl Authenticator for TokenReview {
    async fn authenticate(&self, token: &str) -> Result<WorkloadId, AuthError> {
        let status = self.review(token).await?;
        if !status.authenticated {
            let why = if status.error.is_empty() {
                "not authenticated"
            } else {
                &status.error
            };
            return Err(AuthError::Rejected(format!("TokenReview: {why}")));
        }
        if !self.audiences.is_empty() && !status.audiences.iter().any(|a| self.audiences.contains(a)) {
            return Err(AuthError::Rejected(format!(
                "token is not for audience {}",
                self.audiences.join(", ")
            )));
        }
        service_account(&status.user.username)
    }
}

/// `system:serviceaccount:<namespace>:<name>` → the workload; any other user is refused.
fn service_account(username: &str) -> Result<WorkloadId, AuthError> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| AuthError::Rejected(format!("`{username}` is not a service account")))?;
    let (namespace, name) = rest
        .split_once(':')
        .ok_or_else(|| AuthError::Rejected(format!("`{username}` is not a service account")))?;
    WorkloadId::new(namespace, name).map_err(|e| AuthError::Rejected(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_service_accounts_become_workloads() {
        assert_eq!(
            service_account("system:serviceaccount:default:web").unwrap(),
            WorkloadId::new("default", "web").unwrap()
        );
        assert!(service_account("admin").is_err());
        assert!(service_account("system:serviceaccount:default").is_err());
        assert!(service_account("system:serviceaccount:default:web:extra").is_err());
    }
}
