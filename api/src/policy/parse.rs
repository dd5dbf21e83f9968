//! Reading the policy file: YAML → [`PolicyFile`] → indexed [`Policy`], with errors that say where.
//!
//! Every value is validated during deserialization, so a mistake is reported as
//! `policy.yaml:12:18: destinations[0].endpoints[1].address: invalid socket address syntax`.

use std::path::Path;

use super::model::{Policy, PolicyFile};

/// A policy file that cannot be used; the previous policy (if any) stays in force.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{origin}:{line}:{column}: {message}")]
    Syntax {
        origin: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

/// Reads and parses the policy file at `path`.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|e| PolicyError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses policy YAML; `origin` names the source in errors. An empty document is an empty policy.
pub fn parse(text: &str, origin: &str) -> Result<Policy, PolicyError> {
    let file: PolicyFile = if text.trim().is_empty() {
        PolicyFile::default()
    } else {
        yaml_serde::from_str(text).map_err(|e| match e.location() {
            Some(loc) => PolicyError::Syntax {
                origin: origin.to_string(),
                line: loc.line(),
                column: loc.column(),
                message: strip_location(&e.to_string()),
            },
            None => PolicyError::Invalid {
                origin: origin.to_string(),
                message: e.to_string(),
            },
        })?
    };
    Policy::from_file(file).map_err(|message| PolicyError::Invalid {
        origin: origin.to_string(),
        message,
    })
}

/// The YAML error's text ends with " at line L column C", which the error's prefix already says.
fn strip_location(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests;
