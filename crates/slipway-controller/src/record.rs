//! The one record of a service: what the state store holds and `status` shows.

use serde::{Deserialize, Serialize};
pub use slipway_core::revision::{Outcome, Phase, RevisionStatus};
use slipway_core::service::ServiceSpec;

use crate::Instance;

/// One revision of a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revision {
    /// 1, 2, 3, …
    pub number: u64,
    /// The pinned image it runs.
    pub image: String,
    /// The spec it was deployed with (scaling changes its replicas).
    pub spec: ServiceSpec,
    /// Its fate.
    pub status: RevisionStatus,
    /// Why, for failures.
    pub message: Option<String>,
    /// Creation time, ms since the epoch.
    pub created_ms: u64,
    /// The command that created it.
    #[serde(default)]
    pub command: Option<String>,
}

/// A service's whole state, owned by its actor and persisted through the state
/// store on every change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// The service name.
    pub name: String,
    /// Revisions, oldest first.
    pub revisions: Vec<Revision>,
    /// The revision serving traffic.
    pub active: Option<u64>,
    /// Instances started and not yet retired (any revision).
    pub instances: Vec<Instance>,
    /// Instances that left routing and are being stopped in the background.
    #[serde(default)]
    pub stopping: Vec<Instance>,
    /// What the actor is doing.
    #[serde(default)]
    pub phase: Phase,
    /// Whether rollouts are held (`pause`) until `resume`.
    #[serde(default)]
    pub paused: bool,
    /// The last thing that happened, in one line.
    #[serde(default)]
    pub message: String,
    /// Traffic weights per revision, as last published.
    pub weights: Vec<(u64, u32)>,
}

impl ServiceRecord {
    /// A fresh record for a new service.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            revisions: Vec::new(),
            active: None,
            instances: Vec::new(),
            stopping: Vec::new(),
            phase: Phase::New,
            paused: false,
            message: String::new(),
            weights: Vec::new(),
        }
    }

    /// A revision by number.
    pub fn revision(&self, n: u64) -> Option<&Revision> {
        self.revisions.iter().find(|r| r.number == n)
    }

    /// The active revision.
    pub fn active_revision(&self) -> Option<&Revision> {
        self.active.and_then(|a| self.revision(a))
    }

    /// The spec the service runs: the active revision's, else the newest one's
    /// that was not rejected.
    pub fn spec(&self) -> Option<&ServiceSpec> {
        self.active_revision()
            .or_else(|| {
                self.revisions
                    .iter()
                    .rev()
                    .find(|r| r.status != RevisionStatus::Rejected)
            })
            .map(|r| &r.spec)
    }

    /// The next revision number.
    pub fn next_number(&self) -> u64 {
        self.revisions.last().map_or(1, |r| r.number + 1)
    }

    /// Instances of one revision.
    pub fn instances_of(&self, revision: u64) -> Vec<Instance> {
        self.instances
            .iter()
            .filter(|i| i.revision == revision)
            .cloned()
            .collect()
    }
}
