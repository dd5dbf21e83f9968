//! A small client of the Kubernetes API server: one JSON request at a time, authenticated like any
//! in-cluster client (the API server's CA, the control plane's own service-account token).
//!
//! TokenReview (authentication) and the admission webhook's Namespace lookups share it, so there is
//! one place that knows how to reach the API server. The token is re-read on every call because
//! projected tokens rotate. A general Kubernetes client would add a second TLS and connection stack
//! for two request shapes.

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

/// Largest response body read; TokenReviews and Namespaces are a few KiB.
const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Where and how to reach the API server.
#[derive(Clone, Debug)]
pub struct KubeApiConfig {
    /// Base URL of the API server, `https://host:port`.
    pub api_server: Uri,
    /// PEM bundle that signs the API server's certificate.
    pub ca_file: PathBuf,
    /// The control plane's own bearer token (re-read on each call).
    pub token_file: PathBuf,
    /// Limit for one call, connection included.
    pub timeout: Duration,
}

/// An HTTPS client bound to one API server.
pub struct KubeApi {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token_file: PathBuf,
    timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeApiError {
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

impl KubeApi {
    /// Builds the HTTPS client. The CA and token files must be readable now, so a broken mount is a
    /// start-up error rather than a failure on the first request.
    pub fn new(config: &KubeApiConfig) -> Result<Arc<Self>, KubeApiError> {
        let https = config.api_server.scheme_str() == Some("https") && config.api_server.host().is_some();
        if !https {
            return Err(KubeApiError::Url(config.api_server.to_string()));
        }
        let ca_path = config.ca_file.display().to_string();
        let ca_pem = std::fs::read(&config.ca_file).map_err(|source| KubeApiError::Read {
            what: "API server CA file",
            path: ca_path.clone(),
            source,
        })?;
        let ca_error = |reason: String| KubeApiError::Ca {
            path: ca_path.clone(),
            reason,
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| ca_error(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(ca_error("no certificate found".to_string()));
        }
        std::fs::read(&config.token_file).map_err(|source| KubeApiError::Read {
            what: "service account token file",
            path: config.token_file.display().to_string(),
            source,
        })?;

        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ca_error(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .build();
        Ok(Arc::new(KubeApi {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: config.api_server.to_string().trim_end_matches('/').to_string(),
            token_file: config.token_file.clone(),
            timeout: config.timeout,
        }))
    }

    /// `GET path`: the status and the body (at most 256 KiB).
    pub async fn get(&self, path: &str) -> Result<(StatusCode, Bytes), String> {
        self.call(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body: the status and the response body.
    pub async fn post_json(&self, path: &str, body: &serde_json::Value) -> Result<(StatusCode, Bytes), String> {
        self.call(Method::POST, path, Some(body.to_string())).await
    }

    async fn call(&self, method: Method, path: &str, body: Option<String>) -> Result<(StatusCode, Bytes), String> {
        let bearer = tokio::fs::read_to_string(&self.token_file)
            .await
            .map_err(|e| format!("cannot read {}: {e}", self.token_file.display()))?;
        let uri: Uri = format!("{}{path}", self.base)
            .parse()
            .map_err(|e| format!("API server path {path}: {e}"))?;
        let mut request = Request::builder()
            .method(method)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", bearer.trim()))
            .header(header::ACCEPT, "application/json");
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("API server: {}", error_chain(&e)))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| format!("API server response: {e}"))?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| format!("API server did not answer within {:?}", self.timeout))?
    }
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
    fn url_must_be_https() {
        let config = KubeApiConfig {
            api_server: "http://127.0.0.1:6443".parse().unwrap(),
            ca_file: "/nonexistent".into(),
            token_file: "/nonexistent".into(),
            timeout: Duration::from_secs(1),
        };
        assert!(matches!(KubeApi::new(&config), Err(KubeApiError::Url(_))));
    }
}
