//! SPIFFE names: trust domains and the `spiffe://<td>/ns/<namespace>/sa/<service-account>` workload
//! IDs this control plane issues.
//!
//! Names are validated where they enter (flags, token file, TokenReview answers) so that nothing a
//! token or a file says can smuggle extra path segments or characters into a certificate's SAN.

use std::{fmt, str::FromStr};

/// A SPIFFE trust domain, e.g. `cluster.local`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TrustDomain(String);

/// The Kubernetes-style identity a token vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WorkloadId {
    pub namespace: String,
    pub service_account: String,
}

/// A name that cannot be part of a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidName(String);

impl TrustDomain {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE ID of `workload` in this trust domain.
    pub fn spiffe_id(&self, workload: &WorkloadId) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.0, workload.namespace, workload.service_account
        )
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidName;

    /// SPIFFE allows lower-case letters, digits, `.`, `-` and `_` in a trust domain.
    fn from_str(s: &str) -> Result<Self, InvalidName> {
        let valid = !s.is_empty()
            && s.len() <= 255
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'));
        if valid {
            Ok(TrustDomain(s.to_string()))
        } else {
            Err(InvalidName(format!(
                "`{s}` is not a trust domain (lower-case letters, digits, `.`, `-`, `_`)"
            )))
        }
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl WorkloadId {
    /// Checks both names the way Kubernetes does: a namespace is a DNS label, a service account a
    /// DNS subdomain.
    pub fn new(namespace: &str, service_account: &str) -> Result<Self, InvalidName> {
        if !is_dns_name(namespace, 63, false) {
            return Err(InvalidName(format!("`{namespace}` is not a valid namespace name")));
        }
        if !is_dns_name(service_account, 253, true) {
            return Err(InvalidName(format!(
                "`{service_account}` is not a valid service account name"
            )));
        }
        Ok(WorkloadId {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }
}

impl fmt::Display for WorkloadId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// RFC 1123 label (`dots = false`) or subdomain (`dots = true`), lower case.
fn is_dns_name(s: &str, max: usize, dots: bool) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.is_empty() || s.len() > max {
        return false;
    }
    if dots { s.split('.').all(label_ok) } else { label_ok(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_format() {
        let td: TrustDomain = "cluster.local".parse().unwrap();
        let id = WorkloadId::new("default", "web").unwrap();
        assert_eq!(td.spiffe_id(&id), "spiffe://cluster.local/ns/default/sa/web");
    }

    #[test]
    fn names_that_could_forge_a_path_are_refused() {
        assert!(WorkloadId::new("default/sa/admin", "x").is_err());
        assert!(WorkloadId::new("default", "web/../admin").is_err());
        assert!(WorkloadId::new("Default", "web").is_err());
        assert!(WorkloadId::new("", "web").is_err());
        assert!(WorkloadId::new("kube-system", "pillion.proxy").is_ok());
        assert!("Cluster.Local".parse::<TrustDomain>().is_err());
        assert!("".parse::<TrustDomain>().is_err());
    }
}
