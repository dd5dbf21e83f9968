//! pillion-iptables-init: installs the rules that send a pod's TCP through the Pillion proxy.
//!
//! The run reads top to bottom: flags → validated config → which families (IPv4, IPv6) → read
//! both backends' nat tables → choose a backend → generate the restore input per family (a
//! pure function of config and current state) → print it (`--dry-run`) or apply it, one atomic
//! `COMMIT` per family → optionally prove it works (`--validate`).
//!
//! Exit codes: 0 success (also help/version, and cleanup with nothing to remove); 2 a bad flag
//! or variable, nothing touched; 1 anything else, with a one-line reason on stderr.

mod backend;
mod cidr;
mod cleanup;
mod config;
mod error;
mod family;
#[cfg(test)]
mod golden;
mod guard;
mod ipv6;
mod ports;
mod rules;
mod ruleset;
mod validate;

use std::process::ExitCode;

use crate::{
    backend::{Backend, Observed},
    config::{Action, BackendChoice, Config, Ipv6Mode},
    error::Error,
    family::Family,
    ruleset::{Ruleset, Table},
};

const NAME: &str = "pillion-iptables-init";

/// What this run does with IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ipv6Plan {
    /// No IPv6 beyond loopback in this namespace (or, cleaning up, no ip6tables): nothing.
    Absent,
    /// Redirect IPv6 like IPv4, and remove a refusal an earlier run left. Cleaning up: remove
    /// ours from both IPv6 tables.
    Redirect,
    /// IPv6 is not redirected: refuse inbound IPv6 TCP (filter table), and remove redirects an
    /// earlier run left (nat table), so nothing reaches the app around the proxy.
    Refuse,
}

/// One backend's tables as read at start; `Err` says why a table is unreadable.
struct Snapshot {
    backend: Backend,
    tables: Vec<(Family, Table, Result<String, String>)>,
}

/// What to do to one table of one family in one backend.
struct Plan {
    backend: Backend,
    family: Family,
    table: Table,
    /// The table before we touch it, to roll back to if a later one fails.
    saved: String,
    /// The restore input, or `None` when there is nothing to change.
    input: Option<String>,
}

impl Snapshot {
    fn take(backend: Backend, tables: &[(Family, Table)]) -> Snapshot {
        let tables = tables
            .iter()
            .map(|&(family, table)| {
                let program = backend.save_program(family);
                let saved = if backend::find_program(&program).is_none() {
                    Err(format!("{program} is not installed"))
                } else if backend == Backend::Legacy && backend::legacy_table_exists(family, table) == Some(false) {
                    // No table, no rules; and reading it would create it.
                    Ok(backend::empty_table(table))
                } else {
                    backend::save(backend, family, table).map_err(|e| e.to_string())
                };
                (family, table, saved)
            })
            .collect();
        Snapshot { backend, tables }
    }

    /// Backend choice counts nat rules only: the filter table of any host has foreign rules,
    /// and only NAT in both backends makes redirection ambiguous.
    fn observed(&self) -> Observed {
        let rules = self
            .readable()
            .filter(|(_, table, _)| *table == Table::Nat)
            .map(|(_, _, t)| Ruleset::parse(t).rule_count())
            .sum();
        let unavailable = self.tables.iter().find_map(|(_, _, t)| t.as_ref().err().cloned());
        Observed { rules, unavailable }
    }

    fn readable(&self) -> impl Iterator<Item = (Family, Table, &str)> {
        self.tables
            .iter()
            .filter_map(|(f, table, t)| Some((*f, *table, t.as_deref().ok()?)))
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{NAME}: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn run() -> Result<(), Error> {
    let Some(config) = Config::from_env()? else {
        return Ok(()); // help or version was printed
    };
    let v6 = ipv6_plan(&config)?;
    let mut tables = vec![(Family::V4, Table::Nat)];
    if v6 != Ipv6Plan::Absent {
        tables.extend([(Family::V6, Table::Nat), (Family::V6, Table::Filter)]);
    }
    let snapshots = Backend::ALL.map(|backend| Snapshot::take(backend, &tables));

    let plans = match config.action {
        Action::Install => {
            let [legacy, nft] = &snapshots;
            let backend = backend::choose(config.backend, &legacy.observed(), &nft.observed())?;
            let snapshot = if backend == Backend::Legacy { legacy } else { nft };
            snapshot
                .readable()
                .map(|(family, table, saved)| Plan {
                    backend,
                    family,
                    table,
                    saved: saved.to_string(),
                    input: install_input(&config, v6, family, table, saved),
                })
                .collect()
        }
        Action::Cleanup => cleanup_plans(config.backend, &snapshots)?,
    };

    if config.dry_run {
        print_plans(&plans);
        return Ok(());
    }
    if plans.iter().any(|p| p.backend == Backend::Legacy && p.input.is_some()) {
        backend::check_legacy_lock()?;
    }
    apply(&plans)?;
    for plan in &plans {
        if let Some(line) = outcome(plan, &config, v6) {
            println!("{NAME}: {line}");
        }
    }

    if config.validate {
        for plan in &plans {
            let proved = match (plan.family, plan.table, v6) {
                (Family::V4, Table::Nat, _) | (Family::V6, Table::Nat, Ipv6Plan::Redirect) => {
                    validate::validate(plan.backend, plan.family, &config.policy)?
                }
                (Family::V6, Table::Filter, Ipv6Plan::Refuse) => validate::validate_refusal(plan.backend)?,
                _ => continue,
            };
            println!("{NAME}: validated {proved}");
        }
    }
    Ok(())
}

/// The restore input for one table when installing, or `None` when it needs no change.
fn install_input(config: &Config, v6: Ipv6Plan, family: Family, table: Table, saved: &str) -> Option<String> {
    let existing = Ruleset::parse_table(saved, table);
    let redirected = family == Family::V4 || v6 == Ipv6Plan::Redirect;
    match (table, redirected) {
        (Table::Nat, true) => Some(rules::install(&config.policy, family, &existing)),
        (Table::Filter, false) => Some(guard::install(&config.policy, &existing)),
        // The other purpose's rules, left by an earlier run with the other --ipv6 choice.
        (Table::Nat | Table::Filter, _) => cleanup::uninstall(&existing, table),
    }
}

/// IPv4 is always redirected; IPv6 as `--ipv6` says, and refused where it is not redirected.
/// `auto` means "the pod has a global IPv6 address" when installing, but "IPv6 exists at all"
/// when cleaning up, so an earlier `--ipv6 on` is undone.
fn ipv6_plan(config: &Config) -> Result<Ipv6Plan, Error> {
    let ip6tables_installed = Backend::ALL
        .iter()
        .any(|b| backend::find_program(&b.save_program(Family::V6)).is_some());
    let if_inet6 = || ipv6::read_if_inet6().map_err(Error::ReadIfInet6);
    if config.action == Action::Cleanup {
        let present = match config.ipv6 {
            Ipv6Mode::Off => false,
            Ipv6Mode::On => true,
            Ipv6Mode::Auto => if_inet6()?.is_some() && ip6tables_installed,
        };
        return Ok(if present { Ipv6Plan::Redirect } else { Ipv6Plan::Absent });
    }
    let addresses = match config.ipv6 {
        Ipv6Mode::On => None,
        Ipv6Mode::Auto | Ipv6Mode::Off => if_inet6()?,
    };
    let (redirect, why) = match config.ipv6 {
        Ipv6Mode::On => (true, "--ipv6 on"),
        Ipv6Mode::Off => (false, ""),
        Ipv6Mode::Auto => (
            addresses.as_deref().is_some_and(ipv6::has_global_address),
            "the namespace has a global IPv6 address and --ipv6 is auto",
        ),
    };
    if redirect {
        if !ip6tables_installed {
            return Err(Error::Ip6tablesMissing { why });
        }
        return Ok(Ipv6Plan::Redirect);
    }
    // Not redirected: can a neighbour reach the pod over IPv6 at all (even link-local)?
    if !addresses.as_deref().is_some_and(ipv6::has_non_loopback_address) {
        return Ok(Ipv6Plan::Absent);
    }
    if !ip6tables_installed {
        let mode = if config.ipv6 == Ipv6Mode::Off { "off" } else { "auto" };
        return Err(Error::Ip6tablesMissingForRefusal { mode });
    }
    Ok(Ipv6Plan::Refuse)
}

/// Cleanup ignores the both-backends conflict (cleaning one up is how it gets resolved). An
/// explicit backend is cleaned alone; `auto` cleans every backend that can be read.
fn cleanup_plans(choice: BackendChoice, snapshots: &[Snapshot; 2]) -> Result<Vec<Plan>, Error> {
    let mut plans = Vec::new();
    for snapshot in snapshots {
        let selected = match choice {
            BackendChoice::Auto => true,
            BackendChoice::Legacy => snapshot.backend == Backend::Legacy,
            BackendChoice::Nft => snapshot.backend == Backend::Nft,
        };
        if !selected {
            continue;
        }
        if choice != BackendChoice::Auto
            && let Some(reason) = snapshot.observed().unavailable
        {
            return Err(Error::BackendUnavailable {
                backend: snapshot.backend,
                reason,
            });
        }
        plans.extend(snapshot.readable().map(|(family, table, saved)| Plan {
            backend: snapshot.backend,
            family,
            table,
            saved: saved.to_string(),
            input: cleanup::uninstall(&Ruleset::parse_table(saved, table), table),
        }));
    }
    if plans.is_empty() {
        let [legacy, nft] = snapshots
            .each_ref()
            .map(|s| s.observed().unavailable.unwrap_or_default());
        return Err(Error::NoBackend { legacy, nft });
    }
    Ok(plans)
}

fn print_plans(plans: &[Plan]) {
    for plan in plans {
        let Plan {
            backend, family, table, ..
        } = plan;
        match &plan.input {
            Some(input) => {
                let args = backend.restore_args().join(" ");
                println!("# {family} {table} table: {} {args}", backend.restore_program(*family));
                print!("{input}");
            }
            None => println!("# {family} {table} table ({backend}): nothing to change"),
        }
    }
}

/// Applies each plan in turn. Each is atomic on its own; if a later one fails, the earlier ones
/// are rolled back to their saved tables so the namespace is left as it was found.
fn apply(plans: &[Plan]) -> Result<(), Error> {
    for (i, plan) in plans.iter().enumerate() {
        let Some(input) = &plan.input else { continue };
        if let Err(failure) = backend::restore(plan.backend, plan.family, plan.table, input, true) {
            let done: Vec<&Plan> = plans[..i].iter().filter(|p| p.input.is_some()).collect();
            if done.is_empty() {
                return Err(failure);
            }
            return Err(Error::PartlyApplied {
                failure: Box::new(failure),
                rollback: roll_back(&done),
            });
        }
    }
    Ok(())
}

fn roll_back(done: &[&Plan]) -> String {
    let mut restored = Vec::new();
    for plan in done.iter().rev() {
        let name = format!("{} ({}) {}", plan.family, plan.backend, plan.table);
        if let Err(e) = backend::restore(plan.backend, plan.family, plan.table, &plan.saved, false) {
            return format!(
                "rolling back the {name} table also failed: {e}; run again to reconcile, or \
                 with --cleanup to remove Pillion's rules"
            );
        }
        restored.push(name);
    }
    match restored.len() {
        1 => format!("the {} table was restored to its previous state", restored[0]),
        _ => format!(
            "the {} tables were restored to their previous state",
            restored.join(" and ")
        ),
    }
}

fn outcome(plan: &Plan, config: &Config, v6: Ipv6Plan) -> Option<String> {
    let Plan {
        backend,
        family,
        table,
        input,
        ..
    } = plan;
    let changed = input.is_some();
    let redirected = *family == Family::V4 || v6 == Ipv6Plan::Redirect;
    Some(match (config.action, table, redirected, changed) {
        (Action::Install, Table::Nat, true, _) => format!(
            "{family} rules installed with iptables-{backend}: inbound TCP to port {}, outbound TCP \
             to port {}",
            config.policy.inbound_port, config.policy.outbound_port
        ),
        (Action::Install, Table::Filter, false, _) => format!(
            "{family} is not redirected: inbound {family} TCP is refused with ip6tables-{backend} \
             (except loopback and the inbound ports to ignore)"
        ),
        (Action::Install, Table::Nat, false, true) => {
            format!("{family} redirects of an earlier run removed from iptables-{backend}")
        }
        (Action::Install, Table::Filter, true, true) => {
            format!("the refusal of inbound {family} of an earlier run removed from ip6tables-{backend}")
        }
        (Action::Install, _, _, false) => return None,
        (Action::Cleanup, Table::Nat, _, true) => format!("{family} rules removed from iptables-{backend}"),
        (Action::Cleanup, Table::Nat, _, false) => format!("no {family} rules of ours in iptables-{backend}"),
        (Action::Cleanup, Table::Filter, _, true) => {
            format!("{family} refusal of inbound TCP removed from ip6tables-{backend}")
        }
        (Action::Cleanup, Table::Filter, _, false) => return None,
    })
}
