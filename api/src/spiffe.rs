//! SPIFFE names: trust domains, the `spiffe://<td>/ns/<namespace>/sa/<service-account>` workload
//! IDs the control plane issues, and the one [`SpiffeId`] type every part of Pillion uses.
//!
//! Names are validated where they enter (flags, token file, TokenReview answers, policy, peers'
//! certificates) so that nothing a token or a file says can smuggle extra path segments or
//! characters into a certificate's SAN. Kubernetes names rule: a namespace is a DNS label, a
//! service account a DNS subdomain (dots allowed).
//!
//! SNI cannot carry a URI, so a mesh client names the server's identity as a DNS name,
//! `<sa>.<ns>.sa.pillion.<trust-domain>`. The namespace has no dots but the service account may
//! (`web.v2`), so the name is read from the right: the trust domain after the last marker, the
//! namespace as the label before it, the service account as everything before that.
//! [`SpiffeId::to_sni`] refuses only what no DNS name can carry (a label over 63 characters, a name
//! over 253) or what would not read back as the same ID, so every name it gives turns back into
//! exactly its ID. The inbound side terminates TLS only when the SNI is its own identity's name,
//! and the client's verifier turns the SNI back into the SPIFFE ID it must find in the certificate.

use std::{fmt, str::FromStr};

use x509_parser::{extensions::GeneralName, prelude::FromDer};

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

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
/// Cheap to clone (shared text): a pooled connection's key and every request's routing decision
/// carry one.
pub struct SpiffeId(std::sync::Arc<str>);

/// Why a certificate's identity cannot be accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/<path>")]
    Invalid(String),
    #[error("certificate does not parse")]
    BadCertificate,
    #[error("certificate has no SPIFFE URI SAN")]
    NoUri,
    #[error("certificate has {0} URI SANs; an X.509-SVID has exactly one")]
    ManyUris(usize),
    #[error("SPIFFE ID {0} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")]
    NotAWorkload(String),
}

const SNI_MARKER: &str = ".sa.pillion.";

impl SpiffeId {
    /// `spiffe://<trust-domain>/<path>`: a trust domain of lower-case letters, digits, `.`, `-`,
    /// `_`; path segments of letters, digits, `.`, `-`, `_`, none empty, `.` or `..` (the SPIFFE
    /// ID specification's rules); 2048 bytes at most.
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let invalid = || IdError::Invalid(s.into());
        let rest = s.strip_prefix("spiffe://").ok_or_else(invalid)?;
        let (td, path) = rest.split_once('/').ok_or_else(invalid)?;
        let td_ok = !td.is_empty()
            && td.len() <= 255
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = path.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        });
        if td_ok && path_ok && s.len() <= 2048 {
            Ok(SpiffeId(s.into()))
        } else {
            Err(invalid())
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain: what follows `spiffe://`, up to the path.
    pub fn trust_domain(&self) -> &str {
        let rest = self.0.strip_prefix("spiffe://").unwrap_or(&self.0);
        rest.split_once('/').map_or(rest, |(td, _)| td)
    }

    /// `(trust domain, namespace, service account)` for Kubernetes workload IDs.
    fn workload_parts(&self) -> Option<(&str, &str, &str)> {
        let rest = self.0.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut segs = path.split('/');
        match (segs.next(), segs.next(), segs.next(), segs.next(), segs.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((td, ns, sa)),
            _ => None,
        }
    }

    /// The DNS name a mesh client sends as SNI to reach this identity.
    pub fn to_sni(&self) -> Result<String, IdError> {
        let (td, ns, sa) = self
            .workload_parts()
            .ok_or_else(|| IdError::NotAWorkload(self.0.to_string()))?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        let sni = format!("{sa}.{ns}{SNI_MARKER}{td}");
        // DNS: 253 characters at most; and the name must read back as this very ID (a trust
        // domain containing the marker would not).
        let encodable = label_ok(ns)
            && sa.split('.').all(label_ok)
            && sni.len() <= 253
            && SpiffeId::from_sni(&sni).as_ref() == Some(self);
        if encodable {
            Ok(sni)
        } else {
            Err(IdError::NotAWorkload(self.0.to_string()))
        }
    }

    /// The inverse of [`SpiffeId::to_sni`]: read from the right, because a service account may
    /// contain dots and the namespace may not.
    pub fn from_sni(sni: &str) -> Option<Self> {
        let (names, td) = sni.rsplit_once(SNI_MARKER)?;
        let (sa, ns) = names.rsplit_once('.')?;
        SpiffeId::parse(&format!("spiffe://{td}/ns/{ns}/sa/{sa}")).ok()
    }

    /// The identity an X.509-SVID carries: its one and only URI SAN.
    pub fn from_certificate(der: &[u8]) -> Result<Self, IdError> {
        let (_, cert) =
            x509_parser::certificate::X509Certificate::from_der(der).map_err(|_| IdError::BadCertificate)?;
        let uris: Vec<&str> = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(_) => return Err(IdError::BadCertificate),
        };
        match uris.as_slice() {
            [] => Err(IdError::NoUri),
            [one] => SpiffeId::parse(one),
            many => Err(IdError::ManyUris(many.len())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for SpiffeId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        SpiffeId::parse(&s).map_err(|e| e.to_string())
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<Self, IdError> {
        SpiffeId::parse(s)
    }
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

    #[test]
    fn parses_and_rejects() {
        assert!(SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").is_ok());
        for bad in [
            "http://x/y",
            "spiffe://",
            "spiffe://td",
            "spiffe://td/",
            "spiffe://TD/a",
            "spiffe://td/a//b",
            "spiffe://td/a/../b",
            "spiffe://td/a?x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sni_round_trip() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/web").unwrap();
        let sni = id.to_sni().unwrap();
        assert_eq!(sni, "web.default.sa.pillion.cluster.local");
        assert_eq!(SpiffeId::from_sni(&sni), Some(id));
        assert_eq!(SpiffeId::from_sni("example.com"), None);
        assert!(SpiffeId::parse("spiffe://td/custom/path").unwrap().to_sni().is_err());
    }

    #[test]
    fn every_kubernetes_service_account_name_round_trips() {
        // Service accounts are DNS subdomains: dots allowed, even labels that look like ours.
        for sa in [
            "web",
            "web.v2",
            "a.b.c",
            "x.sa.pillion.y",
            "sa.pillion",
            "0-a.b-0",
            &"a".repeat(63),
        ] {
            let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap();
            let sni = id.to_sni().unwrap_or_else(|e| panic!("{sa}: {e}"));
            assert_eq!(SpiffeId::from_sni(&sni), Some(id), "{sa} → {sni}");
            assert!(rustls_pki_types::ServerName::try_from(sni.as_str()).is_ok(), "{sni}");
        }
        // What no DNS name can carry is refused, not mangled.
        for sa in [&"a".repeat(64), "a..b", ".a", "a.", "Web"] {
            let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}"));
            assert!(id.is_err() || id.unwrap().to_sni().is_err(), "{sa}");
        }
        let long = format!(
            "{}.{}",
            "a".repeat(63),
            ["b".repeat(63), "c".repeat(63), "d".repeat(63)].join(".")
        );
        let id = SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{long}")).unwrap();
        assert!(id.to_sni().is_err(), "over 253 characters");
        // A trust domain holding the marker could not be read back: refused.
        let id = SpiffeId::parse("spiffe://x.sa.pillion.y/ns/shop/sa/web").unwrap();
        assert!(id.to_sni().is_err());
    }
}
