//! The nodes: every `slipway serve` is one, recorded under `nodes/<name>` in the
//! control plane's state store (its name, address, labels and capacity, whether it
//! is cordoned, and its last heartbeat). With etcd the record is refreshed every
//! `[cluster] heartbeat_interval`, and a node whose heartbeat is older than
//! `heartbeat_ttl + down_grace` is `down`; with the embedded store the only node is
//! this process.
//!
//! One owner per record: a node writes its own heartbeat; cordon, uncordon and
//! removal are compare-and-swap writes on the same record, retried on a conflict
//! with the heartbeat.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slipway_api::nodes::{NodeInfo, NodeStatus};
use slipway_controller::{StateError, StateStore, Versioned};
use slipway_core::ErrorKind;
use tokio::sync::watch;

use crate::api_error::ApiError;

/// What is stored of a node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NodeRecord {
    name: String,
    address: String,
    labels: BTreeMap<String, String>,
    cpus: f64,
    memory_bytes: u64,
    #[serde(default)]
    cordoned: bool,
    heartbeat_ms: u64,
}

/// What this node's services ask of it: their instances, and what those ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    pub(crate) instances: u32,
    pub(crate) asked: slipway_controller::schedule::Resources,
}

/// The nodes, from the state store; this process's own among them.
pub(crate) struct Nodes {
    state: Arc<dyn StateStore>,
    name: String,
    /// How often this node heartbeats.
    interval: Duration,
    /// A node whose last heartbeat is older than this is down.
    down_after: Duration,
}

fn key(name: &str) -> String {
    format!("nodes/{name}")
}

fn unavailable(e: &StateError) -> ApiError {
    ApiError::new(ErrorKind::Unavailable, e.to_string())
}

/// Memory of this machine, from `/proc/meminfo`.
fn memory_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

impl Nodes {
    /// Records this process as node `name` (keeping a cordon set earlier) and,
    /// when `heartbeats`, refreshes the record until `stop` fires.
    pub(crate) async fn register(
        state: Arc<dyn StateStore>,
        name: &str,
        address: String,
        labels: BTreeMap<String, String>,
        heartbeats: bool,
        timing: crate::config::ClusterSection,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Self>> {
        let nodes = Arc::new(Self {
            state,
            name: name.to_owned(),
            interval: timing.heartbeat_interval.0,
            down_after: timing.heartbeat_ttl.0 + timing.down_grace.0,
        });
        #[expect(clippy::cast_precision_loss, reason = "a core count")]
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let fresh = NodeRecord {
            name: name.to_owned(),
            address,
            labels,
            cpus,
            memory_bytes: memory_total(),
            cordoned: false,
            heartbeat_ms: slipway_core::now_ms(),
        };
        nodes
            .update(name, |old| {
                Some(NodeRecord {
                    cordoned: old.is_some_and(|o| o.cordoned),
                    ..fresh.clone()
                })
            })
            .await
            .map_err(|e| anyhow::anyhow!("cannot record node {name}: {e}"))?;
        if heartbeats {
            tokio::spawn(nodes.clone().heartbeat(stop));
        }
        Ok(nodes)
    }

    async fn heartbeat(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                () = tokio::time::sleep(self.interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            let beat = self
                .update(&self.name, |old| {
                    old.map(|o| NodeRecord {
                        heartbeat_ms: slipway_core::now_ms(),
                        ..o
                    })
                })
                .await;
            if let Err(e) = beat {
                tracing::warn!(node = %self.name, "heartbeat: {e}");
            }
        }
    }

    /// Reads a node's record, changes it with `f` (`None`: delete it), and writes
    /// it back with a compare-and-swap, again on a conflict.
    async fn update(
        &self,
        name: &str,
        f: impl Fn(Option<NodeRecord>) -> Option<NodeRecord>,
    ) -> Result<Option<NodeRecord>, StateError> {
        loop {
            let current = self.state.get(&key(name)).await?;
            let old = current
                .as_ref()
                .and_then(|v| serde_json::from_slice::<NodeRecord>(&v.value).ok());
            let version = current.as_ref().map(|v| v.version);
            let new = f(old);
            let written = match (&new, version) {
                (Some(rec), v) => {
                    let bytes = serde_json::to_vec(rec).unwrap_or_default();
                    self.state.put(&key(name), bytes, v).await.map(|_| ())
                }
                (None, Some(v)) => self.state.delete(&key(name), v).await,
                (None, None) => Ok(()),
            };
            match written {
                Ok(()) => return Ok(new),
                Err(StateError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn info(&self, v: &Versioned, now: u64, usage: Usage) -> Option<NodeInfo> {
        let r: NodeRecord = serde_json::from_slice(&v.value).ok()?;
        let this = r.name == self.name;
        // This process is alive whatever its record says (it may not heartbeat).
        let age = if this {
            0
        } else {
            now.saturating_sub(r.heartbeat_ms)
        };
        let down = u128::from(age) > self.down_after.as_millis();
        let status = if down {
            NodeStatus::Down
        } else if r.cordoned {
            NodeStatus::Cordoned
        } else {
            NodeStatus::Ready
        };
        let usage = if this { usage } else { Usage::default() };
        Some(NodeInfo {
            name: r.name,
            address: r.address,
            labels: r.labels,
            cpus: r.cpus,
            memory_bytes: r.memory_bytes,
            #[expect(clippy::cast_precision_loss, reason = "thousandths of a core")]
            allocated_cpus: usage.asked.millicpu as f64 / 1000.0,
            allocated_memory_bytes: usage.asked.memory,
            instances: usage.instances,
            status,
            heartbeat_age_ms: age,
            this,
        })
    }

    /// Every node, by name; `usage` is what this node's services ask for.
    pub(crate) async fn list(&self, usage: Usage) -> Result<Vec<NodeInfo>, ApiError> {
        let now = slipway_core::now_ms();
        let all = self
            .state
            .load_all("nodes/")
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(all
            .iter()
            .filter_map(|v| self.info(v, now, usage))
            .collect())
    }

    /// Cordons or uncordons node `name`.
    pub(crate) async fn set_cordoned(
        &self,
        name: &str,
        cordoned: bool,
        usage: Usage,
    ) -> Result<NodeInfo, ApiError> {
        let updated = self
            .update(name, |old| old.map(|o| NodeRecord { cordoned, ..o }))
            .await
            .map_err(|e| unavailable(&e))?;
        if updated.is_none() {
            return Err(not_found(name));
        }
        Ok(self.one(name, usage).await?.1)
    }

    /// Node `name` as stored (with its version) and as shown.
    async fn one(&self, name: &str, usage: Usage) -> Result<(Versioned, NodeInfo), ApiError> {
        let v = self
            .state
            .get(&key(name))
            .await
            .map_err(|e| unavailable(&e))?
            .ok_or_else(|| not_found(name))?;
        let info = self
            .info(&v, slipway_core::now_ms(), usage)
            .ok_or_else(|| not_found(name))?;
        Ok((v, info))
    }

    /// Forgets node `name`, which must be down.
    pub(crate) async fn remove(&self, name: &str) -> Result<(), ApiError> {
        let (v, info) = self.one(name, Usage::default()).await?;
        if info.status != NodeStatus::Down {
            return Err(ApiError::new(
                ErrorKind::FailedPrecondition,
                format!(
                    "node {name} is {} (heartbeat {} ms ago): stop it first; a node is removed once it has been down for {} s",
                    info.status.as_str(),
                    info.heartbeat_age_ms,
                    self.down_after.as_secs()
                ),
            ));
        }
        match self.state.delete(&key(name), v.version).await {
            Ok(()) => Ok(()),
            Err(e) => Err(unavailable(&e)),
        }
    }
}

fn not_found(name: &str) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no node named {name:?}; see `slipway node ls`"),
    )
}

/// What the node routes need.
#[derive(Clone)]
struct NodeRoutes {
    nodes: Arc<Nodes>,
    services: Arc<crate::services::Services>,
}

/// `GET /api/v1/nodes`, `POST /api/v1/nodes/{name}/cordon|uncordon`,
/// `DELETE /api/v1/nodes/{name}`.
pub(crate) fn router(nodes: Arc<Nodes>, services: Arc<crate::services::Services>) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::response::IntoResponse;
    async fn list(State(s): State<NodeRoutes>) -> axum::response::Response {
        match s.nodes.list(s.services.usage()).await {
            Ok(list) => axum::Json(list).into_response(),
            Err(e) => e.into_response(),
        }
    }
    async fn cordon(
        State(s): State<NodeRoutes>,
        Path((name, verb)): Path<(String, String)>,
    ) -> axum::response::Response {
        let cordoned = match verb.as_str() {
            "cordon" => true,
            "uncordon" => false,
            _ => {
                return ApiError::new(
                    ErrorKind::NotFound,
                    format!("no node action {verb:?}: use cordon or uncordon"),
                )
                .into_response();
            }
        };
        match s
            .nodes
            .set_cordoned(&name, cordoned, s.services.usage())
            .await
        {
            Ok(info) => axum::Json(info).into_response(),
            Err(e) => e.into_response(),
        }
    }
    async fn remove(
        State(s): State<NodeRoutes>,
        Path(name): Path<String>,
    ) -> axum::response::Response {
        match s.nodes.remove(&name).await {
            Ok(()) => axum::http::StatusCode::NO_CONTENT.into_response(),
            Err(e) => e.into_response(),
        }
    }
    axum::Router::new()
        .route("/api/v1/nodes", axum::routing::get(list))
        .route("/api/v1/nodes/{name}", axum::routing::delete(remove))
        .route("/api/v1/nodes/{name}/{verb}", axum::routing::post(cordon))
        .with_state(NodeRoutes { nodes, services })
}
