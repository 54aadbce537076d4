//! The rollout engine: turns a [`ServiceSpec`] into healthy instances and moves a
//! service from one revision to the next with the spec's strategy, rolling back by
//! itself when the new revision fails to start, to become ready, or its live traffic
//! breaks the analysis limits.
//!
//! Every effect goes through a trait: [`Instances`] (start/stop processes),
//! [`Prober`] (health checks) and [`Traffic`] (publish routes, read in-flight counts
//! and per-revision stats). Time is `tokio::time`, so rollouts are tested
//! deterministically with fakes under paused time.
//!
//! **Architecture invariant:** this crate depends only on `slipway-core`.

mod rollout;

pub use rollout::{Control, Controller, Outcome, Revision, RevisionStatus, ServiceState};

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use slipway_core::service::{Probe, ServiceSpec};

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

/// Starting and stopping instances.
#[async_trait]
pub trait Instances: Send + Sync {
    /// Starts one instance of `revision` running `image` (a pinned reference).
    async fn start(
        &self,
        spec: &ServiceSpec,
        revision: u64,
        image: &str,
    ) -> Result<Instance, String>;
    /// Stops and removes an instance: SIGTERM, then SIGKILL after `grace`.
    async fn stop(&self, instance: &Instance, grace: Duration);
    /// Whether its process is still running.
    async fn alive(&self, instance: &Instance) -> bool;
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

/// The data plane, as the controller sees it.
pub trait Traffic: Send + Sync {
    /// Publishes the routes: for each revision, its weight and ready instances.
    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]);
    /// Requests in flight on an instance (it was unpublished or is being drained).
    fn in_flight(&self, instance: &Instance) -> u64;
    /// Counters of a revision since `since` was taken (`None`: since the start).
    fn stats(&self, revision: u64) -> TrafficStats;
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
    /// What happened.
    pub message: String,
}
