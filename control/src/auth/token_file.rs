//! Standalone authentication: a YAML file mapping tokens to workloads.
//!
//! ```yaml
//! - token: 3f1c...            # any opaque string, at least 16 characters
//!   namespace: default
//!   serviceAccount: web
//! ```
//!
//! Tokens are compared in constant time so response timing does not reveal how much of a guess matched.

use std::path::Path;

use serde::Deserialize;

use super::{AuthError, Authenticator, WorkloadId};

/// Shortest token accepted in the file: guessable tokens would make identities guessable.
const MIN_TOKEN_LEN: usize = 16;

/// Tokens loaded from a token file.
#[derive(Debug)]
pub struct TokenFile {
    entries: Vec<(Vec<u8>, WorkloadId)>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read token file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("token file {path}: {reason}")]
    Invalid { path: String, reason: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    token: String,
    namespace: String,
    service_account: String,
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<Self, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| TokenFileError::Invalid {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses the file's text; the error names the entry and, for YAML errors, the line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: Vec<Entry> = yaml_serde::from_str(text).map_err(|e| e.to_string())?;
        let mut entries: Vec<(Vec<u8>, WorkloadId)> = Vec::with_capacity(raw.len());
        for (i, e) in raw.into_iter().enumerate() {
            if e.token.len() < MIN_TOKEN_LEN {
                return Err(format!("[{i}]: token is shorter than {MIN_TOKEN_LEN} characters"));
            }
            let id = WorkloadId::new(&e.namespace, &e.service_account).map_err(|err| format!("[{i}]: {err}"))?;
            if entries.iter().any(|(t, _)| t == e.token.as_bytes()) {
                return Err(format!("[{i}]: the same token appears twice"));
            }
            entries.push((e.token.into_bytes(), id));
        }
        Ok(TokenFile { entries })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl Authenticator for TokenFile {
    async fn authenticate(&self, token: &str) -> Result<WorkloadId, AuthError> {
        // Every entry is compared, so the time taken does not depend on where a match is.
        let mut found = None;
        for (t, id) in &self.entries {
            if constant_time_eq(t, token.as_bytes()) {
                found = Some(id);
            }
        }
        found
            .cloned()
            .ok_or_else(|| AuthError::Rejected("not in the token file".to_string()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "
- token: aaaaaaaaaaaaaaaaaaaaaaaa
  namespace: default
  serviceAccount: web
- token: bbbbbbbbbbbbbbbbbbbbbbbb
  namespace: prod
  serviceAccount: api
";

    #[tokio::test]
    async fn known_tokens_map_to_their_workload() {
        let file = TokenFile::parse(FILE).unwrap();
        assert_eq!(file.len(), 2);
        let id = file.authenticate("bbbbbbbbbbbbbbbbbbbbbbbb").await.unwrap();
        assert_eq!(id, WorkloadId::new("prod", "api").unwrap());
        assert!(matches!(
            file.authenticate("cccccccccccccccccccccccc").await,
            Err(AuthError::Rejected(_))
        ));
        assert!(matches!(file.authenticate("").await, Err(AuthError::Rejected(_))));
    }

    #[test]
    fn bad_files_are_refused_with_a_reason() {
        let short = "- {token: abc, namespace: default, serviceAccount: web}";
        assert!(TokenFile::parse(short).unwrap_err().contains("shorter"));
        let bad_ns = "- {token: aaaaaaaaaaaaaaaaaaaa, namespace: Default, serviceAccount: web}";
        assert!(TokenFile::parse(bad_ns).unwrap_err().contains("namespace"));
        let dup = "- {token: aaaaaaaaaaaaaaaaaaaa, namespace: a, serviceAccount: b}\n- {token: aaaaaaaaaaaaaaaaaaaa, namespace: c, serviceAccount: d}";
        assert!(TokenFile::parse(dup).unwrap_err().contains("twice"));
        let typo = "- token: aaaaaaaaaaaaaaaaaaaa\n  namespace: a\n  serviceaccount: b\n";
        let err = TokenFile::parse(typo).unwrap_err();
        assert!(err.contains("line 3"), "{err}");
    }
}
