//! Configuration: flags and `PILLION_INIT_*` environment variables → one validated [`Config`].
//!
//! Everything an operator can get wrong is checked here, before any iptables tool runs, so a bad
//! value is a one-line error naming the flag, its variable and the value, with exit code 2 (the
//! contract). Clap parses; this module turns clap's multi-line errors into that one line and adds
//! the checks that span several flags.

use clap::{
    CommandFactory, Parser, ValueEnum,
    builder::BoolishValueParser,
    error::{ContextKind, ContextValue, ErrorKind},
};

use crate::{
    cidr::{Cidr, parse_cidrs},
    error::Error,
    ports::{PortRange, parse_port, parse_port_ranges},
};

/// What the rules redirect and what they leave alone; the only input of the rule generator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedirectPolicy {
    pub inbound_port: u16,
    pub outbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: Option<u32>,
    pub inbound_ports_to_ignore: Vec<PortRange>,
    pub outbound_ports_to_ignore: Vec<PortRange>,
    /// Both families; each family's rules take only their own.
    pub outbound_subnets_to_ignore: Vec<Cidr>,
}

/// The validated settings: the single source of truth passed down from `main`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub policy: RedirectPolicy,
    pub ipv6: Ipv6Mode,
    pub backend: BackendChoice,
    pub action: Action,
    pub dry_run: bool,
    pub validate: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Install,
    Cleanup,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Ipv6Mode {
    /// IPv6 redirects when the namespace has a global IPv6 address.
    Auto,
    /// IPv6 redirects always; an error if ip6tables is not installed.
    On,
    /// No IPv6 redirects (inbound IPv6 TCP is refused if the pod has IPv6).
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendChoice {
    /// The backend that already has nat rules; with none anywhere, nft if available.
    Auto,
    /// iptables-legacy (x_tables).
    Legacy,
    /// iptables-nft (nf_tables).
    Nft,
}

/// Command-line surface; every flag can also come from its environment variable.
#[derive(Debug, Parser)]
#[command(
    name = "pillion-iptables-init",
    version,
    about = "Installs Pillion's traffic-redirect rules (nat table, PILLION_* chains) in the \
             current network namespace",
    long_about = None
)]
struct Args {
    /// Port of the proxy's inbound listener; TCP entering the pod is redirected here.
    #[arg(long, env = "PILLION_INIT_INBOUND_PORT", default_value = "4143", value_name = "PORT",
          value_parser = parse_port)]
    inbound_port: u16,

    /// Port of the proxy's outbound listener; TCP leaving the app is redirected here.
    #[arg(long, env = "PILLION_INIT_OUTBOUND_PORT", default_value = "4140", value_name = "PORT",
          value_parser = parse_port)]
    outbound_port: u16,

    /// UID the proxy runs as; its own connections are never redirected.
    #[arg(long, env = "PILLION_INIT_PROXY_UID", default_value = "2102", value_name = "UID")]
    proxy_uid: u32,

    /// GID the proxy runs as; when set, connections of this group are not redirected either.
    #[arg(long, env = "PILLION_INIT_PROXY_GID", value_name = "GID")]
    proxy_gid: Option<u32>,

    /// Inbound ports that go straight to the app: ports and ranges, e.g. `4190,4191,9000-9100`.
    #[arg(long, env = "PILLION_INIT_INBOUND_PORTS_TO_IGNORE", default_value = "4191",
          value_name = "PORTS", value_parser = parse_port_list)]
    inbound_ports_to_ignore: PortList,

    /// Outbound destination ports that bypass the proxy: ports and ranges, e.g. `25,8000-8999`.
    #[arg(long, env = "PILLION_INIT_OUTBOUND_PORTS_TO_IGNORE", default_value = "",
          value_name = "PORTS", value_parser = parse_port_list, hide_default_value = true)]
    outbound_ports_to_ignore: PortList,

    /// Outbound destination subnets that bypass the proxy: IPv4 and IPv6 CIDRs, comma separated;
    /// each family's rules get only the subnets of that family.
    #[arg(long, env = "PILLION_INIT_OUTBOUND_SUBNETS_TO_IGNORE", default_value = "",
          value_name = "CIDRS", value_parser = parse_cidr_list, hide_default_value = true)]
    outbound_subnets_to_ignore: CidrList,

    /// Redirect IPv6 (ip6tables) too: `auto` does when the namespace has a global IPv6 address.
    /// Where IPv6 is not redirected but the pod has IPv6 (even link-local), inbound IPv6 TCP is
    /// refused instead, so nothing reaches the app around the proxy.
    #[arg(
        long,
        env = "PILLION_INIT_IPV6",
        value_enum,
        default_value = "auto",
        value_name = "MODE"
    )]
    ipv6: Ipv6Mode,

    /// Which iptables backend to use. `auto` picks the one that already has nat rules, else nft
    /// when available. Refuses if the other backend has nat rules: both would be evaluated.
    #[arg(
        long,
        env = "PILLION_INIT_BACKEND",
        value_enum,
        default_value = "auto",
        value_name = "BACKEND"
    )]
    backend: BackendChoice,

    /// Print the exact iptables-restore input for each family and change nothing.
    #[arg(long, env = "PILLION_INIT_DRY_RUN", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    dry_run: bool,

    /// Remove every PILLION_* chain and the jumps into them; foreign rules are left intact.
    #[arg(long, env = "PILLION_INIT_CLEANUP", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    cleanup: bool,

    /// After applying, prove redirection works and exit non-zero if not. Outbound: a TCP probe to
    /// a documentation address (TTL 1) must arrive at a listener on the outbound port with its
    /// original destination intact. Inbound: traffic generated inside the namespace never passes
    /// PREROUTING, so the live ruleset is read back and checked (PREROUTING jumps to
    /// PILLION_PREROUTING, which ends by redirecting to the inbound port), and the inbound port
    /// must be free to bind.
    #[arg(long, env = "PILLION_INIT_VALIDATE", value_parser = BoolishValueParser::new(),
          action = clap::ArgAction::SetTrue)]
    validate: bool,
}

/// Newtypes so clap stores a parsed list as one value rather than treating `Vec` as repeats.
#[derive(Clone, Debug)]
struct PortList(Vec<PortRange>);

#[derive(Clone, Debug)]
struct CidrList(Vec<Cidr>);

fn parse_port_list(s: &str) -> Result<PortList, String> {
    parse_port_ranges(s).map(PortList)
}

fn parse_cidr_list(s: &str) -> Result<CidrList, String> {
    parse_cidrs(s).map(CidrList)
}

impl Config {
    /// Parses the process's arguments and environment. `Ok(None)` means help or version was
    /// printed and the process should exit 0.
    pub fn from_env() -> Result<Option<Config>, Error> {
        Config::parse_from(std::env::args_os())
    }

    fn parse_from<I, T>(args: I) -> Result<Option<Config>, Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        match Args::try_parse_from(args) {
            Ok(args) => Config::try_from(args).map(Some),
            Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => {
                // Help and version go to stdout as clap formats them.
                let _ = e.print();
                Ok(None)
            }
            Err(e) => Err(one_line(&e)),
        }
    }
}

impl TryFrom<Args> for Config {
    type Error = Error;

    fn try_from(args: Args) -> Result<Config, Error> {
        if args.inbound_port == args.outbound_port {
            return Err(invalid(
                "outbound-port",
                args.outbound_port.to_string(),
                "must differ from --inbound-port (PILLION_INIT_INBOUND_PORT)",
            ));
        }
        if args.validate && args.dry_run {
            return Err(conflict("validate", "dry-run"));
        }
        if args.validate && args.cleanup {
            return Err(conflict("validate", "cleanup"));
        }
        Ok(Config {
            policy: RedirectPolicy {
                inbound_port: args.inbound_port,
                outbound_port: args.outbound_port,
                proxy_uid: args.proxy_uid,
                proxy_gid: args.proxy_gid,
                inbound_ports_to_ignore: args.inbound_ports_to_ignore.0,
                outbound_ports_to_ignore: args.outbound_ports_to_ignore.0,
                outbound_subnets_to_ignore: args.outbound_subnets_to_ignore.0,
            },
            ipv6: args.ipv6,
            backend: args.backend,
            action: if args.cleanup { Action::Cleanup } else { Action::Install },
            dry_run: args.dry_run,
            validate: args.validate,
        })
    }
}

/// `--flag (PILLION_INIT_FLAG)` for a long flag name without dashes.
fn flag_and_env(long: &str) -> (String, String) {
    let env = Args::command()
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("PILLION_INIT_{}", long.replace('-', "_").to_uppercase()));
    (format!("--{long}"), env)
}

fn invalid(long: &str, value: String, reason: &str) -> Error {
    let (flag, env) = flag_and_env(long);
    Error::InvalidValue {
        flag,
        env,
        value,
        reason: reason.to_string(),
    }
}

fn conflict(first: &str, second: &str) -> Error {
    let (a, a_env) = flag_and_env(first);
    let (b, b_env) = flag_and_env(second);
    Error::Usage(format!("{a} ({a_env}) cannot be combined with {b} ({b_env})"))
}

/// Clap's error as one line. Bad values get the contract's shape (flag, variable, value,
/// reason); anything else (unknown flag, missing value) keeps clap's first line.
fn one_line(err: &clap::Error) -> Error {
    let context = |kind| match err.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    if matches!(err.kind(), ErrorKind::ValueValidation | ErrorKind::InvalidValue) {
        let long = context(ContextKind::InvalidArg)
            .and_then(|arg| Some(arg.split_whitespace().next()?.strip_prefix("--")?.to_string()));
        if let (Some(long), Some(value)) = (long, context(ContextKind::InvalidValue)) {
            let reason = match err.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!("expected one of {}", valid.join(", ")),
                // The value parser's own message.
                _ => std::error::Error::source(err)
                    .map(ToString::to_string)
                    .unwrap_or_else(|| "invalid value".to_string()),
            };
            return invalid(&long, value, &reason);
        }
    }
    let rendered = err.render().to_string();
    let first = rendered.lines().next().unwrap_or("invalid arguments");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    Error::Usage(format!("{first} (see --help)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let argv = std::iter::once("pillion-iptables-init").chain(args.iter().copied());
        match Config::parse_from(argv) {
            Ok(Some(config)) => Ok(config),
            Ok(None) => Err("help".to_string()),
            Err(e) => {
                assert_eq!(e.exit_code(), 2, "{e}");
                Err(e.to_string())
            }
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.policy.inbound_port, 4143);
        assert_eq!(c.policy.outbound_port, 4140);
        assert_eq!(c.policy.proxy_uid, 2102);
        assert_eq!(c.policy.proxy_gid, None);
        assert_eq!(
            c.policy.inbound_ports_to_ignore,
            vec![PortRange {
                first: 4191,
                last: 4191
            }]
        );
        assert!(c.policy.outbound_ports_to_ignore.is_empty());
        assert!(c.policy.outbound_subnets_to_ignore.is_empty());
        assert_eq!(c.ipv6, Ipv6Mode::Auto);
        assert_eq!(c.backend, BackendChoice::Auto);
        assert_eq!(c.action, Action::Install);
        assert!(!c.dry_run && !c.validate);
    }

    #[test]
    fn everything_set() {
        let c = parse(&[
            "--inbound-port=15006",
            "--outbound-port=15001",
            "--proxy-uid=1337",
            "--proxy-gid=1338",
            "--inbound-ports-to-ignore=4190,9000-9100",
            "--outbound-ports-to-ignore=25",
            "--outbound-subnets-to-ignore=10.0.0.0/8,fd00::/8",
            "--ipv6=on",
            "--backend=legacy",
            "--cleanup",
            "--dry-run",
        ])
        .unwrap();
        assert_eq!(c.policy.proxy_gid, Some(1338));
        assert_eq!(c.policy.inbound_ports_to_ignore.len(), 2);
        assert_eq!(c.policy.outbound_subnets_to_ignore.len(), 2);
        assert_eq!(
            (c.ipv6, c.backend, c.action),
            (Ipv6Mode::On, BackendChoice::Legacy, Action::Cleanup)
        );
        assert!(c.dry_run);
    }

    #[test]
    fn bad_port_names_flag_variable_value_and_reason() {
        assert_eq!(
            parse(&["--inbound-port", "abc"]).unwrap_err(),
            "invalid value 'abc' for --inbound-port (PILLION_INIT_INBOUND_PORT): \
             invalid digit found in string"
        );
        assert_eq!(
            parse(&["--outbound-port=0"]).unwrap_err(),
            "invalid value '0' for --outbound-port (PILLION_INIT_OUTBOUND_PORT): \
             port 0 is out of range (1-65535)"
        );
    }

    #[test]
    fn bad_lists_and_enums_are_one_line() {
        assert_eq!(
            parse(&["--inbound-ports-to-ignore=9100-9000"]).unwrap_err(),
            "invalid value '9100-9000' for --inbound-ports-to-ignore \
             (PILLION_INIT_INBOUND_PORTS_TO_IGNORE): '9100-9000': range starts at 9100, after its end 9000"
        );
        assert_eq!(
            parse(&["--outbound-subnets-to-ignore=10.0.0.0/33"]).unwrap_err(),
            "invalid value '10.0.0.0/33' for --outbound-subnets-to-ignore \
             (PILLION_INIT_OUTBOUND_SUBNETS_TO_IGNORE): '10.0.0.0/33': prefix length '33' must be \
             a number from 0 to 32"
        );
        assert_eq!(
            parse(&["--ipv6=maybe"]).unwrap_err(),
            "invalid value 'maybe' for --ipv6 (PILLION_INIT_IPV6): expected one of auto, on, off"
        );
        assert_eq!(
            parse(&["--proxy-gid=-1"]).unwrap_err(),
            "invalid value '-1' for --proxy-gid (PILLION_INIT_PROXY_GID): -1 is not in 0..=4294967295"
        );
    }

    #[test]
    fn cross_flag_conflicts_are_usage_errors() {
        assert_eq!(
            parse(&["--inbound-port=4140"]).unwrap_err(),
            "invalid value '4140' for --outbound-port (PILLION_INIT_OUTBOUND_PORT): \
             must differ from --inbound-port (PILLION_INIT_INBOUND_PORT)"
        );
        assert!(parse(&["--validate", "--dry-run"]).unwrap_err().contains("--validate"));
        assert!(parse(&["--validate", "--cleanup"]).unwrap_err().contains("--cleanup"));
    }

    #[test]
    fn other_clap_errors_are_one_line() {
        let e = parse(&["--bogus"]).unwrap_err();
        assert!(e.contains("--bogus") && !e.contains('\n'), "{e}");
        let e = parse(&["--inbound-port"]).unwrap_err();
        assert!(e.contains("--inbound-port") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn every_flag_has_its_variable() {
        for arg in Args::command().get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if matches!(long, "help" | "version") {
                continue;
            }
            let expected = format!("PILLION_INIT_{}", long.replace('-', "_").to_uppercase());
            assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(expected.as_str()));
        }
    }

    #[test]
    fn clap_definition_is_consistent() {
        Args::command().debug_assert();
    }
}
