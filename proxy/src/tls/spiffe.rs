//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`), how they appear
//! in certificates (exactly one URI SAN), and how they travel in TLS SNI.
//!
//! SNI cannot carry a URI, so a mesh client names the server's identity as a DNS name,
//! `<sa>.<ns>.sa.pillion.<trust-domain>` (Kubernetes names are DNS labels, so this is exact and
//! reversible). The inbound side terminates TLS only when the SNI is its own identity's name,
//! and the client's verifier turns the SNI back into the SPIFFE ID it must find in the certificate.

use std::fmt;

use x509_parser::{extensions::GeneralName, prelude::FromDer};

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

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
    pub fn parse(s: &str) -> Result<Self, IdError> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| IdError::Invalid(s.into()))?;
        let (td, path) = rest.split_once('/').ok_or_else(|| IdError::Invalid(s.into()))?;
        let td_ok = !td.is_empty()
            && td
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
        let path_ok = !path.is_empty()
            && path.split('/').all(|seg| !seg.is_empty() && seg != "." && seg != "..")
            && path.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._~/".contains(&b));
        if td_ok && path_ok && !s.contains('?') && !s.contains('#') {
            Ok(SpiffeId(s.to_string()))
        } else {
            Err(IdError::Invalid(s.into()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
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
            .ok_or_else(|| IdError::NotAWorkload(self.0.clone()))?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        };
        if label_ok(ns) && label_ok(sa) {
            Ok(format!("{sa}.{ns}{SNI_MARKER}{td}"))
        } else {
            Err(IdError::NotAWorkload(self.0.clone()))
        }
    }

    /// The inverse of [`SpiffeId::to_sni`].
    pub fn from_sni(sni: &str) -> Option<Self> {
        let (names, td) = sni.split_once(SNI_MARKER)?;
        let (sa, ns) = names.split_once('.')?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
