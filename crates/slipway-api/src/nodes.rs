//! `/api/v1/nodes`: the machines that run instances, as the control plane sees them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a node takes new instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NodeStatus {
    /// Heartbeating and schedulable.
    Ready,
    /// Up, but takes no new instances (`node cordon`).
    Cordoned,
    /// No heartbeat within the node TTL: its instances are not counted on.
    Down,
}

impl NodeStatus {
    /// The word `node ls` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Cordoned => "cordoned",
            Self::Down => "down",
        }
    }
}

/// `GET /api/v1/nodes` (a list of these), and the answer of cordon/uncordon.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Its name (`--node-name`, default the host name).
    pub name: String,
    /// Where its instances are reached.
    pub address: String,
    /// Its labels, matched by `[placement] constraints`.
    pub labels: BTreeMap<String, String>,
    /// Cores it has.
    pub cpus: f64,
    /// Memory it has, bytes.
    pub memory_bytes: u64,
    /// Cores its instances ask for.
    pub allocated_cpus: f64,
    /// Memory its instances ask for, bytes.
    pub allocated_memory_bytes: u64,
    /// Instances of services on it.
    pub instances: u32,
    /// Ready, cordoned or down.
    pub status: NodeStatus,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: u64,
    /// Whether it is the node of the answering control plane.
    pub this: bool,
}
