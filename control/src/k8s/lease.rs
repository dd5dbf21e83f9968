//! Which replica writes route status: the holder of a coordination.k8s.io/v1 Lease
//! ([`LEASE_NAME`] in the control plane's namespace), as client-go's leader election does it.
//! Every replica watches and serves; only this decides who writes.
//!
//! The holder renews every [`RETRY_PERIOD`]. Another replica takes the Lease over once its
//! record (holder, renew time, version) has not changed for the Lease's duration *as measured on
//! its own clock since it last saw a change*, so clock skew between nodes does not matter. Every
//! write carries the `resourceVersion` it read, so of two replicas racing for it one gets 409 and
//! stays a follower. A holder that cannot renew for [`RENEW_DEADLINE`] (shorter than the
//! duration) stops writing before anyone else may start. On shutdown the holder gives the Lease
//! up, so a rolling update does not wait for it to expire.

use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The Lease's name, in the namespace the control plane runs in.
pub const LEASE_NAME: &str = "pillion-control-status";
/// How long a Lease not renewed stays its holder's.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the holder renews, and a follower looks.
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);
/// A holder that could not renew for this long stops writing (before others may take over).
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);

/// One replica's part in the election.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's `holderIdentity`: unique among the replicas.
    pub identity: String,
    pub duration: Duration,
}

/// What the Lease read says this replica should do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Ours: renew it.
    Renew,
    /// Free, given up, or expired: take it.
    Acquire,
    /// Someone else's, still valid.
    Follow,
}

/// The record last seen of someone else's Lease, and when (on our clock) it last changed.
#[derive(Default)]
pub struct Observed {
    record: Option<(Option<String>, Option<Timestamp>, Option<String>)>,
    since: Option<Instant>,
}

impl LeaseConfig {
    /// In `namespace`, with this host's name and a random suffix (two processes on one host, or
    /// a restarted container, are still told apart).
    pub fn new(namespace: &str) -> LeaseConfig {
        LeaseConfig {
            namespace: namespace.to_string(),
            name: LEASE_NAME.to_string(),
            identity: format!("{}_{}", hostname(), random_suffix()),
            duration: LEASE_DURATION,
        }
    }
}

/// The pod's name (its hostname), else the machine's.
fn hostname() -> String {
    std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "pillion-control".to_string())
}

fn random_suffix() -> String {
    use aws_lc_rs::rand::SecureRandom;
    let mut bytes = [0u8; 4];
    // Only uniqueness is at stake: the process id does if the system has no randomness.
    match aws_lc_rs::rand::SystemRandom::new().fill(&mut bytes) {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Err(_) => std::process::id().to_string(),
    }
}

impl Observed {
    /// Decides from a Lease read now; `now` is our monotonic clock.
    pub fn decide(&mut self, spec: &LeaseSpec, resource_version: Option<String>, me: &str, now: Instant) -> Decision {
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        if holder.as_deref() == Some(me) {
            return Decision::Renew;
        }
        let record = (holder.clone(), spec.renew_time.as_ref().map(|t| t.0), resource_version);
        if self.record.as_ref() != Some(&record) {
            self.record = Some(record);
            self.since = Some(now);
        }
        let duration = spec
            .lease_duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map_or(LEASE_DURATION, Duration::from_secs);
        let unchanged_for = now.saturating_duration_since(self.since.unwrap_or(now));
        if holder.is_none() || unchanged_for >= duration {
            Decision::Acquire
        } else {
            Decision::Follow
        }
    }
}

/// Takes part in the election until `shutdown`, then gives the Lease up if held (a task of
/// `tasks`, which the process waits for); the receiver says whether this replica holds the Lease
/// (and may write status).
pub fn elect(
    client: Client,
    config: LeaseConfig,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tasks.spawn(run(Api::namespaced(client, &config.namespace), config, tx, shutdown));
    rx
}

async fn run(api: Api<Lease>, config: LeaseConfig, leader: watch::Sender<bool>, shutdown: CancellationToken) {
    tracing::info!(lease = %format!("{}/{}", config.namespace, config.name), identity = %config.identity, "competing for the route-status Lease");
    let mut observed = Observed::default();
    let mut renewed: Option<Instant> = None;
    loop {
        match try_acquire_or_renew(&api, &config, &mut observed).await {
            Ok(true) => {
                renewed = Some(Instant::now());
                if !*leader.borrow() {
                    tracing::info!(identity = %config.identity, "holding the route-status Lease: this replica writes route status");
                    leader.send_replace(true);
                }
            }
            Ok(false) => {
                if *leader.borrow() {
                    tracing::warn!(identity = %config.identity, "the route-status Lease was taken over; no longer writing route status");
                    leader.send_replace(false);
                }
                renewed = None;
            }
            Err(e) => {
                tracing::warn!(lease = %config.name, error = %e, "cannot read or write the route-status Lease; retrying");
                if renewed.is_some_and(|r| r.elapsed() >= RENEW_DEADLINE) {
                    tracing::warn!("route-status Lease not renewed in time; no longer writing route status");
                    leader.send_replace(false);
                    renewed = None;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PERIOD) => {}
            _ = shutdown.cancelled() => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        // Best effort: a Lease not given up expires after its duration anyway.
        match tokio::time::timeout(Duration::from_secs(2), release(&api, &config)).await {
            Ok(Ok(())) => tracing::info!("route-status Lease given up"),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot give up the route-status Lease"),
            Err(_) => tracing::debug!("giving up the route-status Lease timed out"),
        }
    }
}

/// `Ok(true)`: this replica holds the Lease now.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    config: &LeaseConfig,
    observed: &mut Observed,
) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    let duration = i32::try_from(config.duration.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(config.name.clone()),
                namespace: Some(config.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(config.identity.clone()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now.clone()),
                renew_time: Some(now),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica created it first.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let decision = observed.decide(&spec, lease.resource_version(), &config.identity, Instant::now());
    if decision == Decision::Follow {
        return Ok(false);
    }
    let acquiring = decision == Decision::Acquire;
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(config.identity.clone()),
        lease_duration_seconds: Some(duration),
        acquire_time: if acquiring {
            Some(now.clone())
        } else {
            spec.acquire_time
        },
        renew_time: Some(now),
        lease_transitions: Some(
            spec.lease_transitions.unwrap_or(0) + i32::from(acquiring && spec.holder_identity.is_some()),
        ),
        ..spec
    });
    // The version read is the precondition: of two replicas taking it over, one gets 409.
    match api.replace(&config.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, config: &LeaseConfig) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&config.name).await? else {
        return Ok(());
    };
    let mut spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() != Some(config.identity.as_str()) {
        return Ok(());
    }
    // client-go's release: no holder, and a duration of 1 s for readers that check only it.
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    lease.spec = Some(spec);
    api.replace(&config.name, &PostParams::default(), &lease).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: Option<&str>, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).unwrap())),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn ours_is_renewed_and_a_free_one_is_taken() {
        let now = Instant::now();
        let mut observed = Observed::default();
        assert_eq!(observed.decide(&spec(Some("me"), 1), None, "me", now), Decision::Renew);
        assert_eq!(observed.decide(&spec(None, 1), None, "me", now), Decision::Acquire);
        assert_eq!(observed.decide(&spec(Some(""), 1), None, "me", now), Decision::Acquire);
    }

    #[test]
    fn anothers_is_taken_only_once_unchanged_for_its_duration_on_our_clock() {
        let start = Instant::now();
        let mut observed = Observed::default();
        let rv = |v: &str| Some(v.to_string());
        // Its renew time may be far in the past by our clock (skew): only changes count.
        assert_eq!(
            observed.decide(&spec(Some("other"), 1), rv("7"), "me", start),
            Decision::Follow
        );
        let later = start + Duration::from_secs(10);
        assert_eq!(
            observed.decide(&spec(Some("other"), 1), rv("7"), "me", later),
            Decision::Follow
        );
        // Renewed: the wait starts again.
        assert_eq!(
            observed.decide(&spec(Some("other"), 2), rv("8"), "me", later),
            Decision::Follow
        );
        let expired = later + Duration::from_secs(14);
        assert_eq!(
            observed.decide(&spec(Some("other"), 2), rv("8"), "me", expired),
            Decision::Follow
        );
        let expired = later + Duration::from_secs(15);
        assert_eq!(
            observed.decide(&spec(Some("other"), 2), rv("8"), "me", expired),
            Decision::Acquire
        );
    }

    #[test]
    fn identities_differ_between_processes_on_one_host() {
        let a = LeaseConfig::new("pillion-system");
        let b = LeaseConfig::new("pillion-system");
        assert_ne!(a.identity, b.identity);
        assert_eq!(a.name, "pillion-control-status");
    }
}
