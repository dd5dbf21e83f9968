//! Kubernetes authentication: each token is checked by the API server with a `TokenReview`.
//!
//! The control plane authenticates to the API server like any in-cluster client: the API server's CA
//! and the control plane's own service-account token from the standard mount, re-read on every call
//! because projected tokens rotate. The reviewed token must belong to a service account
//! (`system:serviceaccount:<ns>:<sa>`); with audiences configured, the API server must confirm one.
//!
//! A plain hyper client over rustls (already in the tree for the proxy) is all a single JSON POST needs;
//! a general HTTP client would add a second TLS and connection stack for nothing.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use serde::Deserialize;
use serde_json::json;

use super::{AuthError, Authenticator, WorkloadId};

/// Largest TokenReview response read; a real one is a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Where and how to reach the API server.
#[derive(Clone, Debug)]
pub struct TokenReviewConfig {
    /// Base URL of the API server, `https://host:port`.
    pub api_server: Uri,
    /// PEM bundle that signs the API server's certificate.
    pub ca_file: PathBuf,
    /// The control plane's own bearer token (re-read on each review).
    pub token_file: PathBuf,
    /// Audiences the reviewed token must be valid for; empty = the API server's default.
    pub audiences: Vec<String>,
    /// Limit for one review, connection included.
    pub timeout: Duration,
}

/// Authenticates tokens against the Kubernetes API server.
pub struct TokenReview {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    token_file: PathBuf,
    audiences: Vec<String>,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenReviewError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("API server CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("API server URL `{0}` must be https://host[:port]")]
    Url(String),
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
    /// Builds the HTTPS client. The CA and token files must be readable now, so a broken mount is a
    /// start-up error rather than a failure on the first workload's request.
    pub fn new(config: TokenReviewConfig) -> Result<Self, TokenReviewError> {
        let https = config.api_server.scheme_str() == Some("https") && config.api_server.host().is_some();
        if !https {
            return Err(TokenReviewError::Url(config.api_server.to_string()));
        }
        let base = config.api_server.to_string();
        let endpoint: Uri = format!(
            "{}/apis/authentication.k8s.io/v1/tokenreviews",
            base.trim_end_matches('/')
        )
        .parse()
        .map_err(|_| TokenReviewError::Url(base.clone()))?;

        let ca_path = config.ca_file.display().to_string();
        let ca_pem = std::fs::read(&config.ca_file).map_err(|source| TokenReviewError::Read {
            what: "API server CA file",
            path: ca_path.clone(),
            source,
        })?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| TokenReviewError::Ca {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
            roots.add(cert).map_err(|e| TokenReviewError::Ca {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(TokenReviewError::Ca {
                path: ca_path,
                reason: "no certificate found".to_string(),
            });
        }
        std::fs::read(&config.token_file).map_err(|source| TokenReviewError::Read {
            what: "service account token file",
            path: config.token_file.display().to_string(),
            source,
        })?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TokenReviewError::Ca {
                path: ca_path,
                reason: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(TokenReview {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            token_file: config.token_file,
            audiences: config.audiences,
            timeout: config.timeout,
        })
    }

    async fn review(&self, token: &str) -> Result<ReviewStatus, AuthError> {
        let bearer = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| AuthError::Unavailable(format!("cannot read {}: {e}", self.token_file.display())))?;
        let mut spec = json!({ "token": token });
        if !self.audiences.is_empty() {
            spec["audiences"] = json!(self.audiences);
        }
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": spec,
        });
        let request = Request::builder()
            .method(Method::POST)
            .uri(self.endpoint.clone())
            .header(header::AUTHORIZATION, format!("Bearer {}", bearer.trim()))
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::ACCEPT, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;

        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| AuthError::Unavailable(format!("API server: {}", error_chain(&e))))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| AuthError::Unavailable(format!("API server response: {e}")))?
                .to_bytes();
            Ok::<_, AuthError>((status, body))
        };
        let (status, body) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| AuthError::Unavailable(format!("API server did not answer within {:?}", self.timeout)))??;
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

/// hyper-util's errors hide the cause (e.g. the TLS failure) one or two levels down.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
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

    #[test]
    fn url_must_be_https() {
        let config = TokenReviewConfig {
            api_server: "http://127.0.0.1:6443".parse().unwrap(),
            ca_file: "/nonexistent".into(),
            token_file: "/nonexistent".into(),
            audiences: vec![],
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(TokenReview::new(config), Err(TokenReviewError::Url(_))));
    }
}
