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
    ruleset::NatRuleset,
};

const NAME: &str = "pillion-iptables-init";

/// One backend's nat tables as read at start, per family; `Err` says why a table is unreadable.
struct Snapshot {
    backend: Backend,
    tables: Vec<(Family, Result<String, String>)>,
}

/// What to do to one family's nat table in one backend.
struct Plan {
    backend: Backend,
    family: Family,
    /// The table before we touch it, to roll back to if a later family fails.
    saved: String,
    /// The restore input, or `None` when there is nothing to change.
    input: Option<String>,
}

impl Snapshot {
    fn take(backend: Backend, families: &[Family]) -> Snapshot {
        let tables = families
            .iter()
            .map(|&family| {
                let program = backend.save_program(family);
                let table = if backend::find_program(&program).is_none() {
                    Err(format!("{program} is not installed"))
                } else if backend == Backend::Legacy && backend::legacy_nat_exists(family) == Some(false) {
                    // No table, no rules; and reading it would create it.
                    Ok(backend::EMPTY_NAT.to_string())
                } else {
                    backend::save_nat(backend, family).map_err(|e| e.to_string())
                };
                (family, table)
            })
            .collect();
        Snapshot { backend, tables }
    }

    fn observed(&self) -> Observed {
        let rules = self.readable().map(|(_, t)| NatRuleset::parse(t).rule_count()).sum();
        let unavailable = self.tables.iter().find_map(|(_, t)| t.as_ref().err().cloned());
        Observed { rules, unavailable }
    }

    fn readable(&self) -> impl Iterator<Item = (Family, &str)> {
        self.tables.iter().filter_map(|(f, t)| Some((*f, t.as_deref().ok()?)))
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
    let families = families(&config)?;
    let snapshots = Backend::ALL.map(|backend| Snapshot::take(backend, &families));

    let plans = match config.action {
        Action::Install => {
            let [legacy, nft] = &snapshots;
            let backend = backend::choose(config.backend, &legacy.observed(), &nft.observed())?;
            let snapshot = if backend == Backend::Legacy { legacy } else { nft };
            snapshot
                .readable()
                .map(|(family, saved)| Plan {
                    backend,
                    family,
                    saved: saved.to_string(),
                    input: Some(rules::install(&config.policy, family, &NatRuleset::parse(saved))),
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
        println!("{NAME}: {}", outcome(plan, &config));
    }

    if config.validate {
        for plan in &plans {
            let proved = validate::validate(plan.backend, plan.family, &config.policy)?;
            println!("{NAME}: validated {proved}");
        }
    }
    Ok(())
}

/// IPv4 always; IPv6 as `--ipv6` says. `auto` means "the pod has a global IPv6 address" when
/// installing, but "IPv6 exists at all" when cleaning up, so an earlier `--ipv6 on` is undone.
fn families(config: &Config) -> Result<Vec<Family>, Error> {
    let ip6tables_installed = Backend::ALL
        .iter()
        .any(|b| backend::find_program(&b.save_program(Family::V6)).is_some());
    let if_inet6 = || ipv6::read_if_inet6().map_err(Error::ReadIfInet6);
    let (want_v6, why) = match (config.ipv6, config.action) {
        (Ipv6Mode::Off, _) => (false, ""),
        (Ipv6Mode::On, _) => (true, "--ipv6 on"),
        (Ipv6Mode::Auto, Action::Install) => (
            if_inet6()?.is_some_and(|t| ipv6::has_global_address(&t)),
            "the namespace has a global IPv6 address and --ipv6 is auto",
        ),
        (Ipv6Mode::Auto, Action::Cleanup) => (if_inet6()?.is_some() && ip6tables_installed, ""),
    };
    if want_v6 && !ip6tables_installed {
        return Err(Error::Ip6tablesMissing { why });
    }
    Ok(if want_v6 {
        vec![Family::V4, Family::V6]
    } else {
        vec![Family::V4]
    })
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
        plans.extend(snapshot.readable().map(|(family, saved)| Plan {
            backend: snapshot.backend,
            family,
            saved: saved.to_string(),
            input: cleanup::uninstall(&NatRuleset::parse(saved)),
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
        let Plan { backend, family, .. } = plan;
        match &plan.input {
            Some(input) => {
                let args = backend.restore_args().join(" ");
                println!("# {family} nat table: {} {args}", backend.restore_program(*family));
                print!("{input}");
            }
            None => println!("# {family} nat table ({backend}): nothing to change"),
        }
    }
}

/// Applies each plan in turn. Each is atomic on its own; if a later one fails, the earlier ones
/// are rolled back to their saved tables so the namespace is left as it was found.
fn apply(plans: &[Plan]) -> Result<(), Error> {
    for (i, plan) in plans.iter().enumerate() {
        let Some(input) = &plan.input else { continue };
        if let Err(failure) = backend::restore(plan.backend, plan.family, input, true) {
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
        let name = format!("{} ({})", plan.family, plan.backend);
        if let Err(e) = backend::restore(plan.backend, plan.family, &plan.saved, false) {
            return format!(
                "rolling back the {name} nat table also failed: {e}; run again to reconcile, or \
                 with --cleanup to remove Pillion's rules"
            );
        }
        restored.push(name);
    }
    format!(
        "the {} nat table was restored to its previous state",
        restored.join(" and ")
    )
}

fn outcome(plan: &Plan, config: &Config) -> String {
    let Plan { backend, family, .. } = plan;
    match (config.action, plan.input.is_some()) {
        (Action::Install, _) => format!(
            "{family} rules installed with iptables-{backend}: inbound TCP to port {}, outbound TCP \
             to port {}",
            config.policy.inbound_port, config.policy.outbound_port
        ),
        (Action::Cleanup, true) => format!("{family} rules removed from iptables-{backend}"),
        (Action::Cleanup, false) => format!("no {family} rules of ours in iptables-{backend}"),
    }
}
