//! `/api/v1/services` and `/api/v1/events`: services, their revisions, commands and
//! what happened.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
pub use slipway_core::revision::{Outcome, Phase, RevisionStatus};
pub use slipway_core::service::ServiceSpec;

/// `POST /api/v1/services`: create or update a service. The body may also be the
/// spec as TOML (`Content-Type: application/toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    /// The service spec.
    pub spec: ServiceSpec,
}

/// `POST /api/v1/services/{name}/rollback`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RollbackRequest {
    /// The revision to go back to (default: the one before the active revision).
    #[serde(default)]
    pub to: Option<u64>,
}

/// `POST /api/v1/services/{name}/scale`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleRequest {
    /// Instances, 1-100.
    pub replicas: u32,
}

/// 202 Accepted: the command is the service's to finish; follow it through
/// `/api/v1/events?service=NAME&follow=true` until an event with its id carries an
/// outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAccepted {
    /// The service.
    pub service: String,
    /// The command's id.
    pub command: String,
    /// The revision it started, when it started one at once.
    #[serde(default)]
    pub revision: Option<u64>,
    /// Whether it waits behind an operation in progress.
    #[serde(default)]
    pub queued: bool,
    /// A deploy of what is already live: nothing to do.
    #[serde(default)]
    pub unchanged: bool,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// Container name.
    pub id: String,
    /// The revision it runs.
    pub revision: u64,
    /// Where it listens.
    pub addr: SocketAddr,
}

/// One revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevisionView {
    /// 1, 2, 3, …
    pub number: u64,
    /// The pinned image.
    pub image: String,
    /// The image as the spec named it.
    pub spec_image: String,
    /// Instances it asks for.
    pub replicas: u32,
    /// Its fate.
    pub status: RevisionStatus,
    /// Why, for failures and rejections.
    #[serde(default)]
    pub message: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// The command that created it.
    #[serde(default)]
    pub command: Option<String>,
}

/// A revision's live traffic through the ingress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficView {
    /// The revision.
    pub revision: u64,
    /// Requests.
    pub requests: u64,
    /// 5xx and failed requests.
    pub errors: u64,
    /// 99th percentile latency (bucket upper bound), ms.
    pub p99_ms: u64,
}

/// `GET /api/v1/services/{name}` (and each item of `GET /api/v1/services`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// The name.
    pub name: String,
    /// The image as the live spec names it.
    pub image: String,
    /// Where its ingress listens.
    pub ingress: SocketAddr,
    /// The ingress as its proxy runs now (`None` before it first listened).
    #[serde(default)]
    pub proxy: Option<ProxyView>,
    /// Instances the live spec asks for.
    pub replicas: u32,
    /// The revision serving traffic.
    pub active: Option<u64>,
    /// What its controller is doing.
    pub phase: Phase,
    /// Whether rollouts are held until `resume`.
    pub paused: bool,
    /// The last thing that happened.
    pub message: String,
    /// Traffic weights per revision, as last published.
    pub weights: Vec<(u64, u32)>,
    /// Instances in routing or starting.
    pub instances: Vec<InstanceView>,
    /// Instances being stopped.
    pub stopping: Vec<InstanceView>,
    /// Revisions, oldest first.
    pub revisions: Vec<RevisionView>,
    /// Live traffic per revision.
    pub traffic: Vec<TrafficView>,
}

/// A service's proxy as it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyView {
    /// Balancing within a revision.
    pub balance: slipway_core::service::BalanceKind,
    /// How long a request waits for a ready backend, ms.
    pub hold_timeout_ms: u64,
}

/// One line of `GET /api/v1/events` (NDJSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// The service.
    pub service: String,
    /// The revision concerned, if any.
    #[serde(default)]
    pub revision: Option<u64>,
    /// The command it belongs to, if any.
    #[serde(default)]
    pub command: Option<String>,
    /// What happened.
    pub message: String,
    /// Set on a command's last event: how it ended.
    #[serde(default)]
    pub outcome: Option<Outcome>,
}
