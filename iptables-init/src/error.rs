//! The one error type, written for the operator reading an init container's log: every message
//! is one line that says what went wrong and, where there is one, what to do about it.

use std::{io, path::PathBuf};

use crate::{backend::Backend, family::Family, ruleset::Table};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or environment variable with a value we cannot use.
    #[error("invalid value '{value}' for {flag} ({env}): {reason}")]
    InvalidValue {
        flag: String,
        env: String,
        value: String,
        reason: String,
    },

    /// Any other command-line mistake, already phrased as one line.
    #[error("{0}")]
    Usage(String),

    #[error(
        "IPv6 rules are needed ({why}) but no ip6tables-legacy-save or ip6tables-nft-save is installed; install ip6tables or pass --ipv6 off"
    )]
    Ip6tablesMissing { why: &'static str },

    #[error(
        "IPv6 is enabled in this namespace but not redirected (--ipv6 {mode}), so inbound IPv6 TCP must be refused, and no ip6tables-legacy-save or ip6tables-nft-save is installed; install ip6tables, or disable IPv6 in the pod (net.ipv6.conf.all.disable_ipv6=1)"
    )]
    Ip6tablesMissingForRefusal { mode: &'static str },

    #[error("cannot read /proc/net/if_inet6 to detect IPv6 (pass --ipv6 on or off): {0}")]
    ReadIfInet6(#[source] io::Error),

    #[error("the {backend} backend is unavailable: {reason}")]
    BackendUnavailable { backend: Backend, reason: String },

    #[error("no iptables backend is usable (legacy: {legacy}; nft: {nft})")]
    NoBackend { legacy: String, nft: String },

    #[error(
        "--backend {chosen} was selected but the {other} backend already has {rules} nat rule(s) (see `iptables-{other}-save -t nat` / `ip6tables-{other}-save -t nat`); with rules in both, both are evaluated and the first NAT wins. Remove them first (`pillion-iptables-init --cleanup --backend {other}` removes Pillion's own), or use --backend {other}"
    )]
    BackendConflict {
        chosen: Backend,
        other: Backend,
        rules: usize,
    },

    #[error(
        "both iptables backends have nat rules (legacy: {legacy}, nft: {nft}); with rules in both, both are evaluated and the first NAT wins. Inspect them with `iptables-legacy-save -t nat` and `iptables-nft-save -t nat` (and ip6tables-*), remove one set (`pillion-iptables-init --cleanup --backend <legacy|nft>` removes Pillion's own) and run again"
    )]
    BothBackendsHaveRules { legacy: usize, nft: usize },

    #[error(
        "iptables-legacy needs a writable xtables lock file, and {path} cannot be opened for writing ({source}); set XTABLES_LOCKFILE to a writable path or use --backend nft"
    )]
    LegacyLock { path: PathBuf, source: io::Error },

    #[error("could not run {program}: {source}")]
    Spawn { program: String, source: io::Error },

    #[error("{program} failed ({status}): {stderr}")]
    ToolFailed {
        program: String,
        status: String,
        stderr: String,
    },

    #[error(
        "{program} rejected the {family} rules ({status}): {stderr}; the {family} {table} table is unchanged{hint}"
    )]
    RestoreFailed {
        program: String,
        family: Family,
        table: Table,
        status: String,
        stderr: String,
        hint: &'static str,
    },

    /// A later family failed after earlier ones were applied; `rollback` says how undoing them went.
    #[error("{failure}; {rollback}")]
    PartlyApplied { failure: Box<Error>, rollback: String },

    #[error("{family} validation failed: {reason}")]
    Validation { family: Family, reason: String },
}

impl Error {
    /// 2 for anything wrong on the command line (nothing was touched), 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidValue { .. } | Error::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// A tool's stderr as one line: the messages are short, but multi-line. A line ending in `:`
/// introduces the next one, so it is joined with a space rather than `;`.
pub fn one_line(text: &str) -> String {
    let mut joined = String::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !joined.is_empty() {
            joined.push_str(if joined.ends_with(':') { " " } else { "; " });
        }
        joined.push_str(line);
    }
    if joined.is_empty() {
        "no error output".to_string()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_output_becomes_one_line() {
        let stderr = "iptables-nft-restore v1.8.9 (nf_tables): \nline 6: RULE_APPEND failed\n\nline 7: x\n";
        assert_eq!(
            one_line(stderr),
            "iptables-nft-restore v1.8.9 (nf_tables): line 6: RULE_APPEND failed; line 7: x"
        );
        assert_eq!(one_line("  \n"), "no error output");
    }

    #[test]
    fn usage_errors_exit_2_and_the_rest_exit_1() {
        assert_eq!(Error::Usage("x".into()).exit_code(), 2);
        let bad = Error::InvalidValue {
            flag: "--a".into(),
            env: "A".into(),
            value: "v".into(),
            reason: "r".into(),
        };
        assert_eq!(bad.exit_code(), 2);
        assert_eq!(Error::BothBackendsHaveRules { legacy: 1, nft: 1 }.exit_code(), 1);
    }
}
