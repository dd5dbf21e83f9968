//! The pod template's `pillion.io/` annotations: the per-workload settings of the injector.
//!
//! Values are checked here, with the same rules as pillion-iptables-init and the proxy apply, so
//! a typo fails `pillion-control inject` with the workload's name instead of leaving a pod in
//! `Init:CrashLoopBackOff`. Unknown `pillion.io/` keys are reported, not rejected.

use std::net::IpAddr;

use tracing_subscriber::EnvFilter;
use yaml_serde::{Mapping, Value};

/// `disabled` leaves the workload as it is; `enabled` (or no annotation) injects.
pub const INJECT: &str = "pillion.io/inject";
/// Written by the injector (value: its version); its presence means "already injected".
pub const INJECTED: &str = "pillion.io/injected";
/// Extra inbound ports that reach the application directly (the admin port 4191 always does).
pub const INBOUND_PORTS_TO_IGNORE: &str = "pillion.io/inbound-ports-to-ignore";
/// Destination ports the application reaches directly.
pub const OUTBOUND_PORTS_TO_IGNORE: &str = "pillion.io/outbound-ports-to-ignore";
/// Destination CIDRs the application reaches directly.
pub const OUTBOUND_SUBNETS_TO_IGNORE: &str = "pillion.io/outbound-subnets-to-ignore";
/// The proxy's `PILLION_LOG` for this workload.
pub const PROXY_LOG_LEVEL: &str = "pillion.io/proxy-log-level";
/// Ports (and ranges) this workload's proxy forwards without protocol detection (server-speaks-
/// first protocols); replaces the proxy's default list, as Linkerd's annotation does. The
/// control plane reads it too (as a protocol hint for the pod's callers).
pub const OPAQUE_PORTS: &str = "pillion.io/opaque-ports";
/// Read by the control plane in Kubernetes mode (the pod's inbound default); checked here so a
/// typo is caught at injection.
pub const DEFAULT_INBOUND_POLICY: &str = "pillion.io/default-inbound-policy";
/// IPv6 redirection by pillion-iptables-init: `auto` (the default: when the pod has IPv6), `on`,
/// `off` (inbound IPv6 is then refused, so nothing reaches the app around the proxy).
pub const IPV6: &str = "pillion.io/ipv6";

/// What a pod template's annotations ask for, checked; lists normalised to `a,b,c`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct PodAnnotations {
    pub disabled: bool,
    pub injected: bool,
    pub inbound_ports_to_ignore: Option<String>,
    pub outbound_ports_to_ignore: Option<String>,
    pub outbound_subnets_to_ignore: Option<String>,
    pub proxy_log_level: Option<String>,
    pub ipv6: Option<String>,
    pub opaque_ports: Option<String>,
    /// `pillion.io/` keys we do not know: probably misspelt.
    pub unknown: Vec<String>,
}

/// Reads the annotations of a pod template (`None`: it has none).
pub(super) fn read(annotations: Option<&Mapping>) -> Result<PodAnnotations, String> {
    let mut pod = PodAnnotations::default();
    let Some(annotations) = annotations else {
        return Ok(pod);
    };
    for (key, value) in annotations {
        let Some(key) = key.as_str().filter(|k| k.starts_with("pillion.io/")) else {
            continue;
        };
        let Some(value) = value.as_str() else {
            // `pillion.io/inject: false` is a boolean in YAML; Kubernetes wants strings.
            return Err(format!("annotation {key}: the value must be a string (quote it)"));
        };
        let checked = |result: Result<String, String>| result.map_err(|e| format!("annotation {key}: {e}"));
        match key {
            INJECT => match value {
                "disabled" => pod.disabled = true,
                "enabled" => {}
                other => {
                    return Err(format!(
                        "annotation {key}: '{other}' is neither 'enabled' nor 'disabled'"
                    ));
                }
            },
            INJECTED => pod.injected = true,
            INBOUND_PORTS_TO_IGNORE => pod.inbound_ports_to_ignore = Some(checked(port_list(value))?),
            OUTBOUND_PORTS_TO_IGNORE => pod.outbound_ports_to_ignore = Some(checked(port_list(value))?),
            OUTBOUND_SUBNETS_TO_IGNORE => pod.outbound_subnets_to_ignore = Some(checked(subnet_list(value))?),
            PROXY_LOG_LEVEL => pod.proxy_log_level = Some(checked(log_filter(value))?),
            OPAQUE_PORTS => pod.opaque_ports = Some(checked(port_list(value))?),
            DEFAULT_INBOUND_POLICY => match value {
                "all-unauthenticated" | "all-authenticated" | "cluster-authenticated" | "deny" => {}
                other => {
                    return Err(format!(
                        "annotation {key}: '{other}' is not one of all-unauthenticated, all-authenticated, cluster-authenticated, deny"
                    ));
                }
            },
            IPV6 => match value {
                "auto" | "on" | "off" => pod.ipv6 = Some(value.to_string()),
                other => return Err(format!("annotation {key}: '{other}' is not one of auto, on, off")),
            },
            _ => pod.unknown.push(key.to_string()),
        }
    }
    Ok(pod)
}

/// Whether a mapping of annotations has any `pillion.io/` key.
pub(super) fn any_pillion(annotations: Option<&Mapping>) -> bool {
    annotations.is_some_and(|a| a.keys().filter_map(Value::as_str).any(|k| k.starts_with("pillion.io/")))
}

/// Ports and `first-last` ranges, comma separated (`25,8000-8999`), as pillion-iptables-init
/// reads them: 1-65535, ranges forwards, blanks and empty items ignored, duplicates dropped.
pub(super) fn port_list(value: &str) -> Result<String, String> {
    let port = |p: &str| match p.trim().parse::<u32>() {
        Ok(n @ 1..=65535) => Ok(n),
        Ok(n) => Err(format!("port {n} is out of range (1-65535)")),
        Err(_) => Err(format!("'{}' is not a port", p.trim())),
    };
    let mut items: Vec<String> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let normalised = match item.split_once('-') {
            None => port(item)?.to_string(),
            Some((first, last)) => {
                let (first, last) = (port(first)?, port(last)?);
                if first > last {
                    return Err(format!("range '{item}' starts after its end"));
                }
                format!("{first}-{last}")
            }
        };
        if !items.contains(&normalised) {
            items.push(normalised);
        }
    }
    Ok(items.join(","))
}

/// IPv4 and IPv6 CIDRs or bare addresses, comma separated, written back as given.
pub(super) fn subnet_list(value: &str) -> Result<String, String> {
    let mut items: Vec<&str> = Vec::new();
    for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (addr, prefix) = item.split_once('/').map_or((item, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("'{item}' is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if let Some(prefix) = prefix
            && !prefix.parse::<u8>().is_ok_and(|p| p <= max)
        {
            return Err(format!("'{item}': the prefix length must be a number from 0 to {max}"));
        }
        if !items.contains(&item) {
            items.push(item);
        }
    }
    Ok(items.join(","))
}

/// A tracing filter in EnvFilter syntax, as the proxy's `PILLION_LOG` takes it.
pub(super) fn log_filter(value: &str) -> Result<String, String> {
    let value = value.trim();
    EnvFilter::try_new(value)
        .map(|_| value.to_string())
        .map_err(|e| format!("'{value}' is not a log filter: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, Value)]) -> Mapping {
        pairs.iter().map(|(k, v)| (Value::from(*k), v.clone())).collect()
    }

    #[test]
    fn reads_every_setting() {
        let a = annotations(&[
            ("prometheus.io/scrape", "true".into()),
            (INJECT, "enabled".into()),
            (INBOUND_PORTS_TO_IGNORE, " 9090, 9100-9110,9090 ".into()),
            (OUTBOUND_PORTS_TO_IGNORE, "5432".into()),
            (OUTBOUND_SUBNETS_TO_IGNORE, "169.254.169.254/32, fd00::/8".into()),
            (PROXY_LOG_LEVEL, "warn,pillion_proxy=debug".into()),
            (IPV6, "off".into()),
            (OPAQUE_PORTS, "4222, 9000-9010".into()),
            (DEFAULT_INBOUND_POLICY, "all-authenticated".into()),
            ("pillion.io/proxy-loglevel", "debug".into()),
        ]);
        assert_eq!(
            read(Some(&a)).unwrap(),
            PodAnnotations {
                disabled: false,
                injected: false,
                inbound_ports_to_ignore: Some("9090,9100-9110".into()),
                outbound_ports_to_ignore: Some("5432".into()),
                outbound_subnets_to_ignore: Some("169.254.169.254/32,fd00::/8".into()),
                proxy_log_level: Some("warn,pillion_proxy=debug".into()),
                ipv6: Some("off".into()),
                opaque_ports: Some("4222,9000-9010".into()),
                unknown: vec!["pillion.io/proxy-loglevel".into()],
            }
        );
    }

    #[test]
    fn bad_values_name_the_annotation() {
        for (key, value, expected) in [
            (INJECT, Value::from("disable"), "neither 'enabled' nor 'disabled'"),
            (INJECT, Value::from(false), "must be a string"),
            (INBOUND_PORTS_TO_IGNORE, "80,http".into(), "'http' is not a port"),
            (OUTBOUND_PORTS_TO_IGNORE, "70000".into(), "out of range"),
            (OUTBOUND_PORTS_TO_IGNORE, "90-80".into(), "starts after its end"),
            (OUTBOUND_SUBNETS_TO_IGNORE, "10.0.0.0/33".into(), "from 0 to 32"),
            (OUTBOUND_SUBNETS_TO_IGNORE, "metadata".into(), "not an IP address"),
            (IPV6, "yes".into(), "not one of auto, on, off"),
            (PROXY_LOG_LEVEL, "info,[".into(), "not a log filter"),
            (OPAQUE_PORTS, "redis".into(), "'redis' is not a port"),
            (DEFAULT_INBOUND_POLICY, "allow".into(), "not one of all-unauthenticated"),
        ] {
            let err = read(Some(&annotations(&[(key, value)]))).unwrap_err();
            assert!(
                err.starts_with(&format!("annotation {key}: ")) && err.contains(expected),
                "{err}"
            );
        }
    }
}
