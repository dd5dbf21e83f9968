//! SPIFFE IDs (`spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`), how they appear
//! in certificates (exactly one URI SAN), and how they travel in TLS SNI.
//!
//! SNI cannot carry a URI, so a mesh client names the server's identity as a DNS name,
//! `<sa>.<ns>.sa.pillion.<trust-domain>`. A namespace is a DNS label; a service account is a DNS
//! subdomain and may contain dots (`web.v2`), so the name is read from the right: the trust domain
//! after the last marker, the namespace as the label before it, the service account as everything
//! before that. [`SpiffeId::to_sni`] refuses only what no DNS name can carry (a label over 63
//! characters, a name over 253) or what would not read back as the same ID, so every name it
//! gives turns back into exactly its ID. The inbound side terminates TLS only when the SNI is its
//! own identity's name, and the client's verifier turns the SNI back into the SPIFFE ID it must
//! find in the certificate.

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
            Err(IdError::NotAWorkload(self.0.clone()))
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
            assert!(rustls::pki_types::ServerName::try_from(sni.as_str()).is_ok(), "{sni}");
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
