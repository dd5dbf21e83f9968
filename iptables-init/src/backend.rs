//! The two iptables backends (legacy x_tables and nf_tables): choosing one, and running its
//! `*-save` and `*-restore` tools.
//!
//! Choice is a pure function of how many real nat rules each backend holds: an empty table
//! proves nothing, because merely listing a legacy table creates it. Rules in both backends are
//! refused, since the kernel evaluates both and the first NAT wins, which makes redirection
//! depend on hook order nobody chose.

use std::{
    fmt,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use crate::{
    config::BackendChoice,
    error::{Error, one_line},
    family::Family,
    ruleset::Table,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Legacy,
    Nft,
}

/// What reading one backend's nat tables found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    /// Real rules (`-A` lines) across the families that could be read.
    pub rules: usize,
    /// Why the backend cannot be used for every family needed, if it cannot.
    pub unavailable: Option<String>,
}

/// Where the tools usually live, for images whose PATH lacks the sbin directories.
const FALLBACK_DIRS: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// How long iptables-legacy-restore waits for another holder of the xtables lock.
const LEGACY_LOCK_WAIT: &str = "--wait=10";

impl Backend {
    pub const ALL: [Backend; 2] = [Backend::Legacy, Backend::Nft];

    pub fn save_program(self, family: Family) -> String {
        format!("{}-{self}-save", family.tool())
    }

    pub fn restore_program(self, family: Family) -> String {
        format!("{}-{self}-restore", family.tool())
    }

    /// The restore command line that applies our input on top of the live table.
    pub fn restore_args(self) -> &'static [&'static str] {
        match self {
            Backend::Legacy => &["--noflush", LEGACY_LOCK_WAIT],
            Backend::Nft => &["--noflush"],
        }
    }

    fn other(self) -> Backend {
        match self {
            Backend::Legacy => Backend::Nft,
            Backend::Nft => Backend::Legacy,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Legacy => "legacy",
            Backend::Nft => "nft",
        })
    }
}

/// Picks the backend to install into, or explains why none may be used.
pub fn choose(choice: BackendChoice, legacy: &Observed, nft: &Observed) -> Result<Backend, Error> {
    let observed = |b: Backend| if b == Backend::Legacy { legacy } else { nft };
    if legacy.rules > 0 && nft.rules > 0 {
        return Err(Error::BothBackendsHaveRules {
            legacy: legacy.rules,
            nft: nft.rules,
        });
    }
    let chosen = match choice {
        BackendChoice::Legacy => Backend::Legacy,
        BackendChoice::Nft => Backend::Nft,
        BackendChoice::Auto if legacy.rules > 0 => Backend::Legacy,
        BackendChoice::Auto if nft.rules > 0 => Backend::Nft,
        BackendChoice::Auto if nft.unavailable.is_none() => Backend::Nft,
        BackendChoice::Auto if legacy.unavailable.is_none() => Backend::Legacy,
        BackendChoice::Auto => {
            return Err(Error::NoBackend {
                legacy: legacy.unavailable.clone().unwrap_or_default(),
                nft: nft.unavailable.clone().unwrap_or_default(),
            });
        }
    };
    if let Some(reason) = &observed(chosen).unavailable {
        return Err(Error::BackendUnavailable {
            backend: chosen,
            reason: reason.clone(),
        });
    }
    let other = chosen.other();
    match observed(other).rules {
        0 => Ok(chosen),
        rules => Err(Error::BackendConflict { chosen, other, rules }),
    }
}

/// The tool's full path, searching PATH and then the usual sbin directories.
pub fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What `*-save -t <table>` prints for a table with nothing in it.
pub fn empty_table(table: Table) -> String {
    format!("*{table}\nCOMMIT\n")
}

/// Whether this namespace has a legacy `table` at all, from the kernel's list of loaded
/// x_tables; `None` when that list cannot be read. Asking `iptables-legacy-save` would create
/// the table, after which every `iptables-nft` listing warns about legacy tables.
pub fn legacy_table_exists(family: Family, table: Table) -> Option<bool> {
    let names = match family {
        Family::V4 => "/proc/net/ip_tables_names",
        Family::V6 => "/proc/net/ip6_tables_names",
    };
    let names = std::fs::read_to_string(names).ok()?;
    Some(names.lines().any(|name| name.trim() == table.name()))
}

/// `<family>-<backend>-save -t nat`: the live nat table as text.
pub fn save_nat(backend: Backend, family: Family) -> Result<String, Error> {
    save(backend, family, Table::Nat)
}

/// `<family>-<backend>-save -t <table>`: the live table as text.
pub fn save(backend: Backend, family: Family, table: Table) -> Result<String, Error> {
    let program = backend.save_program(family);
    let output = command(&program)?
        .args(["-t", table.name()])
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    if !output.status.success() {
        return Err(Error::ToolFailed {
            program,
            status: output.status.to_string(),
            stderr: one_line(&String::from_utf8_lossy(&output.stderr)),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Feeds `input` (one `table`) to `<family>-<backend>-restore`; `noflush` false replaces the
/// whole table (used only to roll back to a saved copy). The tool applies each `COMMIT`
/// atomically, so on error the table is as it was.
pub fn restore(backend: Backend, family: Family, table: Table, input: &str, noflush: bool) -> Result<(), Error> {
    let program = backend.restore_program(family);
    let mut cmd = command(&program)?;
    if noflush {
        cmd.args(backend.restore_args());
    } else if backend == Backend::Legacy {
        cmd.arg(LEGACY_LOCK_WAIT);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A write error means the tool exited early; its status and stderr say why.
        let _ = stdin.write_all(input.as_bytes());
    }
    let output = child.wait_with_output().map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = one_line(&String::from_utf8_lossy(&output.stderr));
    let hint = if backend == Backend::Legacy && stderr.contains("lock") {
        " (iptables-legacy needs a writable xtables lock file: set XTABLES_LOCKFILE to a writable path)"
    } else {
        ""
    };
    Err(Error::RestoreFailed {
        program,
        family,
        table,
        status: output.status.to_string(),
        stderr,
        hint,
    })
}

/// iptables-legacy-restore serialises on a lock file (`XTABLES_LOCKFILE`, default
/// `/run/xtables.lock`) and fails when it cannot create it, e.g. on a read-only /run. Checking
/// first turns its terse failure into an instruction.
pub fn check_legacy_lock() -> Result<(), Error> {
    let path = std::env::var_os("XTABLES_LOCKFILE")
        .filter(|p| !p.is_empty())
        .map_or_else(|| PathBuf::from("/run/xtables.lock"), PathBuf::from);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map(drop)
        .map_err(|source| Error::LegacyLock { path, source })
}

fn command(program: &str) -> Result<Command, Error> {
    let path = find_program(program).ok_or_else(|| Error::Spawn {
        program: program.to_string(),
        source: std::io::Error::new(std::io::ErrorKind::NotFound, "not found in PATH"),
    })?;
    Ok(Command::new(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(n: usize) -> Observed {
        Observed {
            rules: n,
            unavailable: None,
        }
    }

    fn missing() -> Observed {
        Observed {
            rules: 0,
            unavailable: Some("iptables-nft-save not found".to_string()),
        }
    }

    #[test]
    fn auto_with_no_rules_anywhere_prefers_nft() {
        assert_eq!(choose(BackendChoice::Auto, &rules(0), &rules(0)).unwrap(), Backend::Nft);
        assert_eq!(
            choose(BackendChoice::Auto, &rules(0), &missing()).unwrap(),
            Backend::Legacy
        );
        assert!(matches!(
            choose(BackendChoice::Auto, &missing(), &missing()),
            Err(Error::NoBackend { .. })
        ));
    }

    #[test]
    fn auto_follows_the_backend_that_has_rules() {
        assert_eq!(
            choose(BackendChoice::Auto, &rules(3), &rules(0)).unwrap(),
            Backend::Legacy
        );
        assert_eq!(choose(BackendChoice::Auto, &rules(0), &rules(7)).unwrap(), Backend::Nft);
    }

    #[test]
    fn rules_in_both_backends_are_refused_whatever_the_choice() {
        for choice in [BackendChoice::Auto, BackendChoice::Legacy, BackendChoice::Nft] {
            assert!(matches!(
                choose(choice, &rules(1), &rules(2)),
                Err(Error::BothBackendsHaveRules { legacy: 1, nft: 2 })
            ));
        }
    }

    #[test]
    fn an_explicit_choice_refuses_rules_in_the_other_backend() {
        assert_eq!(choose(BackendChoice::Nft, &rules(0), &rules(5)).unwrap(), Backend::Nft);
        let err = choose(BackendChoice::Nft, &rules(2), &rules(0)).unwrap_err();
        assert!(matches!(
            err,
            Error::BackendConflict {
                chosen: Backend::Nft,
                other: Backend::Legacy,
                rules: 2
            }
        ));
        assert!(err.to_string().contains("--backend legacy"), "{err}");
        assert!(matches!(
            choose(BackendChoice::Legacy, &rules(0), &rules(1)),
            Err(Error::BackendConflict {
                chosen: Backend::Legacy,
                ..
            })
        ));
    }

    #[test]
    fn an_explicit_choice_must_be_available() {
        assert!(matches!(
            choose(BackendChoice::Nft, &rules(0), &missing()),
            Err(Error::BackendUnavailable {
                backend: Backend::Nft,
                ..
            })
        ));
        // A backend with rules but missing tools for a needed family cannot be used either.
        let partial = Observed {
            rules: 4,
            unavailable: Some("ip6tables-legacy-save missing".into()),
        };
        assert!(matches!(
            choose(BackendChoice::Auto, &partial, &rules(0)),
            Err(Error::BackendUnavailable {
                backend: Backend::Legacy,
                ..
            })
        ));
    }

    #[test]
    fn tool_names_follow_family_and_backend() {
        assert_eq!(Backend::Nft.save_program(Family::V4), "iptables-nft-save");
        assert_eq!(Backend::Legacy.restore_program(Family::V6), "ip6tables-legacy-restore");
    }
}
