//! The control plane of services: one actor per service owns its [`ServiceRecord`],
//! takes every change as a command on its queue, and moves the service from one
//! revision to the next with the spec's strategy, rolling back by itself when the new
//! revision fails to start, to become ready, or its live traffic breaks the analysis
//! limits.
//!
//! Every effect goes through a trait: [`Instances`] (start/stop processes),
//! [`Prober`] (health checks), [`Traffic`] (the ingress: routes, in-flight counts,
//! per-revision stats), [`Images`] (pinning tags, listing remote tags), [`Gate`]
//! (admitting a revision) and [`StateStore`] (where records persist). Time is
//! `tokio::time`, so every path is tested deterministically with fakes under paused
//! time.
//!
//! **Architecture invariant:** this crate depends on no other Slipway crate but
//! `slipway-core`.

mod actor;
mod engine;
mod record;
pub mod schedule;
pub mod state;
pub mod trigger;

pub use actor::{Accepted, Command, CommandError, Service, ServiceDeps, spawn};
pub use record::{Outcome, Phase, Revision, RevisionStatus, ServiceRecord};
pub use state::{StateError, StateStore, Versioned};

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use slipway_core::service::{Ingress, Probe, ServiceSpec};

/// One running instance of a revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Runtime id (container name).
    pub id: String,
    /// Revision it runs.
    pub revision: u64,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// What one instance of a revision runs: built once per revision from its spec and
/// pinned image, and all an [`Instances`] implementation needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    /// The service.
    pub service: String,
    /// The revision.
    pub revision: u64,
    /// The pinned image reference (`repo@sha256:…`).
    pub image: String,
    /// Environment.
    pub env: BTreeMap<String, String>,
    /// Memory limit, e.g. `64m`.
    pub memory: Option<String>,
    /// CPU limit.
    pub cpus: Option<f64>,
    /// Named volumes `NAME:/path`.
    pub volumes: Vec<String>,
    /// Signal that asks the process to stop (default: the image's `StopSignal`,
    /// else SIGTERM).
    pub stop_signal: Option<String>,
    /// Time between the stop signal and SIGKILL.
    pub stop_timeout: Duration,
    /// Variables set from secrets: variable → secret name.
    pub secret_env: BTreeMap<String, String>,
    /// Secrets mounted at `/run/secrets/NAME`.
    pub secrets: Vec<String>,
    /// Capabilities added to the default set.
    pub cap_add: Vec<String>,
    /// Capabilities dropped from it.
    pub cap_drop: Vec<String>,
    /// Run in a user namespace.
    pub userns: bool,
    /// Where it may run (nodes, spread or binpack), when there are several nodes.
    #[serde(default)]
    pub placement: slipway_core::placement::Placement,
}

impl InstanceSpec {
    /// The instance spec of `revision` of `spec` running `image`.
    pub fn of(spec: &ServiceSpec, revision: u64, image: &str) -> Self {
        Self {
            service: spec.name.clone(),
            revision,
            image: image.to_owned(),
            env: spec
                .env
                .iter()
                .filter_map(|(k, v)| match v {
                    slipway_core::service::EnvValue::Plain(v) => Some((k.clone(), v.clone())),
                    slipway_core::service::EnvValue::Secret { .. } => None,
                })
                .collect(),
            secret_env: spec
                .env
                .iter()
                .filter_map(|(k, v)| match v {
                    slipway_core::service::EnvValue::Secret { secret } => {
                        Some((k.clone(), secret.clone()))
                    }
                    slipway_core::service::EnvValue::Plain(_) => None,
                })
                .collect(),
            secrets: spec.secrets.clone(),
            memory: spec.memory.clone(),
            cpus: spec.cpus,
            volumes: spec.volumes.clone(),
            stop_signal: spec.stop_signal.clone(),
            stop_timeout: spec.stop_timeout.0,
            cap_add: spec.cap_add.clone(),
            cap_drop: spec.cap_drop.clone(),
            userns: spec.userns,
            placement: spec.placement.clone(),
        }
    }
}

/// Why an instance could not be started or reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "message")]
pub enum InstanceError {
    /// No room: ports, memory, cpu or disk.
    #[error("no capacity: {0}")]
    Capacity(String),
    /// The image cannot be run (missing, no linux/amd64 variant, corrupt).
    #[error("image: {0}")]
    Image(String),
    /// The spec cannot be run as given.
    #[error("invalid: {0}")]
    Invalid(String),
    /// Whatever runs instances cannot be reached (a node agent, later).
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The instance started and exited at once, or another runtime failure.
    #[error("{0}")]
    Failed(String),
}

/// What is known of an instance's process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InstanceState {
    /// Running.
    Running,
    /// Exited (or gone).
    Exited,
    /// Cannot be told now (e.g. its node is unreachable): never a reason to
    /// replace it.
    Unknown,
}

/// Starting and stopping instances.
#[async_trait]
pub trait Instances: Send + Sync {
    /// Starts one instance; the implementation picks its address.
    async fn start(&self, spec: &InstanceSpec) -> Result<Instance, InstanceError>;
    /// Stops and removes an instance: its stop signal, then SIGKILL after `grace`.
    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), InstanceError>;
    /// The state of its process.
    async fn state(&self, instance: &Instance) -> InstanceState;
    /// Every instance of `service` that exists, known to the record or not.
    async fn list(&self, service: &str) -> Result<Vec<Instance>, InstanceError>;
    /// Changes whenever an instance's process may have exited, so that healing
    /// runs on the event rather than on a short timer; `None` when the
    /// implementation cannot tell (healing then polls).
    fn exits(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Running health checks.
#[async_trait]
pub trait Prober: Send + Sync {
    /// One check of `probe` against `instance`.
    async fn check(&self, instance: &Instance, probe: &Probe) -> bool;
}

/// Counters of one revision's live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrafficStats {
    /// Requests.
    pub requests: u64,
    /// 5xx and failed requests.
    pub errors: u64,
    /// 99th percentile latency (bucket upper bound), ms.
    pub p99_ms: u64,
}

/// A service's ingress, as the controller sees it.
#[async_trait]
pub trait Traffic: Send + Sync {
    /// Listens as `ingress` says (binding on first use), or applies its balance
    /// and hold timeout to the ingress already listening, without touching open
    /// connections.
    async fn configure(&self, ingress: &Ingress) -> Result<(), String>;
    /// Publishes the routes: for each revision, its weight and ready instances.
    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]);
    /// Requests in flight on an instance (it was unpublished or is being drained).
    fn in_flight(&self, instance: &Instance) -> u64;
    /// Counters of a revision since it was first published.
    fn stats(&self, revision: u64) -> TrafficStats;
    /// Forgets the counters of revisions not in `keep`.
    fn retain_stats(&self, keep: &[u64]);
    /// Changes whenever the ingress takes an instance out of routing because it
    /// failed requests (passive health); `None` before it listens.
    fn ejections(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
    /// Instances (by address) the ingress took out of routing after failures;
    /// each returns with [`Traffic::readmit`] once its readiness probe passes.
    fn ejected(&self) -> Vec<SocketAddr> {
        Vec::new()
    }
    /// Puts an instance taken out of routing back in.
    fn readmit(&self, _addr: SocketAddr) {}
    /// Stops listening (the service is removed).
    fn close(&self);
}

/// Image references: pinning and, for images in other registries, their tags.
#[async_trait]
pub trait Images: Send + Sync {
    /// The reference pinned to the digest it names now (`repo@sha256:…`).
    async fn pin(&self, image: &str) -> Result<String, InstanceError>;
    /// Whether the image lives in another registry (triggers poll it).
    fn is_remote(&self, image: &str) -> bool;
    /// The tags of the image's repository in its registry.
    async fn tags(&self, image: &str) -> Result<Vec<String>, String>;
}

/// A revision asking to start.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    /// The service.
    pub service: &'a str,
    /// The revision number it would get.
    pub revision: u64,
    /// Its pinned image.
    pub image: &'a str,
    /// Its spec.
    pub spec: &'a ServiceSpec,
}

/// Decides whether a revision may start; called on every path that starts one
/// (deploy, trigger, rollback), before the ingress binds or any instance starts.
#[async_trait]
pub trait Gate: Send + Sync {
    /// `Err(reason)` refuses it; it is recorded as `rejected` with the reason.
    async fn admit(&self, candidate: &Candidate<'_>) -> Result<(), String>;
}

/// Something that happened, for `slipway events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// Service name.
    pub service: String,
    /// Revision concerned, if any.
    pub revision: Option<u64>,
    /// The command it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// What happened.
    pub message: String,
    /// Set on the last event of a command: how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<Outcome>,
}
