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
    /// Where its agent API listens (`host:port`); `None` for a control plane
    /// that runs no agent API (no join token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api: Option<String>,
    /// How many instance exits its agent has seen.
    #[serde(default)]
    exits: u64,
}

/// A node as the cluster's instances see it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct NodeView {
    pub(crate) name: String,
    /// The address its instances are reached at.
    pub(crate) address: String,
    pub(crate) api: Option<String>,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) cpus: f64,
    pub(crate) memory_bytes: u64,
    pub(crate) status: NodeStatus,
    pub(crate) exits: u64,
    /// This process.
    pub(crate) this: bool,
}

/// What this node's services ask of it: their instances, and what those ask for.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Usage {
    pub(crate) instances: u32,
    pub(crate) asked: slipway_controller::schedule::Resources,
}

/// What the services ask of each node, by node name.
pub(crate) type Usages = std::collections::HashMap<String, Usage>;

/// The nodes, from the state store; this process's own among them.
pub(crate) struct Nodes {
    state: Arc<dyn StateStore>,
    name: String,
    /// The cluster's join token, which agents' heartbeats must carry.
    join_token: Option<Arc<str>>,
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
pub(crate) fn memory_total() -> u64 {
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
    #[expect(clippy::too_many_arguments, reason = "the node's whole identity")]
    pub(crate) async fn register(
        state: Arc<dyn StateStore>,
        name: &str,
        address: String,
        api: Option<String>,
        labels: BTreeMap<String, String>,
        heartbeats: bool,
        runs_instances: bool,
        timing: crate::config::ClusterSection,
        join_token: Option<Arc<str>>,
        stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Arc<Self>> {
        let nodes = Arc::new(Self {
            state,
            join_token,
            name: name.to_owned(),
            interval: timing.heartbeat_interval.0,
            down_after: timing.heartbeat_ttl.0 + timing.down_grace.0,
        });
        let fresh = NodeRecord {
            name: name.to_owned(),
            address,
            labels,
            cpus: crate::agent::cpu_count(),
            memory_bytes: memory_total(),
            cordoned: false,
            heartbeat_ms: slipway_core::now_ms(),
            api,
            exits: 0,
        };
        // A control plane that runs no instances is no node.
        if !runs_instances {
            return Ok(nodes);
        }
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

    /// The name of this process's node.
    pub(crate) fn this(&self) -> &str {
        &self.name
    }

    /// Takes an agent's heartbeat: its record is written (created, or refreshed
    /// keeping its cordon) with the time it arrived.
    pub(crate) async fn beat(
        &self,
        name: &str,
        beat: crate::agent::Beat,
    ) -> Result<crate::agent::BeatReply, ApiError> {
        if !slipway_core::placement::valid_label(name) || name.contains('/') || name == self.name {
            return Err(ApiError::new(
                ErrorKind::InvalidArgument,
                format!(
                    "{name:?} cannot name an agent's node: use lowercase letters, digits, '.', '-' and '_', and not a control plane's name"
                ),
            ));
        }
        let written = self
            .update(name, |old| {
                Some(NodeRecord {
                    name: name.to_owned(),
                    address: beat.address.clone(),
                    labels: beat.labels.clone(),
                    cpus: beat.cpus,
                    memory_bytes: beat.memory_bytes,
                    cordoned: old.is_some_and(|o| o.cordoned),
                    heartbeat_ms: slipway_core::now_ms(),
                    api: Some(beat.api.clone()),
                    exits: beat.exits,
                })
            })
            .await
            .map_err(|e| unavailable(&e))?;
        Ok(crate::agent::BeatReply {
            cordoned: written.is_some_and(|r| r.cordoned),
        })
    }

    /// Whether a request carries the cluster's join token.
    fn joins(&self, headers: &http::HeaderMap) -> Result<(), ApiError> {
        match &self.join_token {
            None => Err(ApiError::new(
                ErrorKind::FailedPrecondition,
                "this control plane takes no agents: start it with --join-token (or [cluster] join_token) and give agents the same token",
            )),
            Some(t) if crate::agent::rpc::bearer_is(headers, t) => Ok(()),
            Some(_) => Err(ApiError::new(
                ErrorKind::Unauthenticated,
                "a node's heartbeat must carry the cluster's join token as a bearer token (slipway agent --token)",
            )),
        }
    }

    /// Every node as the cluster's instances see it.
    pub(crate) async fn views(&self) -> Result<Vec<NodeView>, StateError> {
        let now = slipway_core::now_ms();
        let all = self.state.load_all("nodes/").await?;
        Ok(all
            .iter()
            .filter_map(|v| {
                let r: NodeRecord = serde_json::from_slice(&v.value).ok()?;
                let this = r.name == self.name;
                let (_, status) = self.age_status(&r, now);
                Some(NodeView {
                    name: r.name,
                    address: r.address,
                    api: r.api,
                    labels: r.labels,
                    cpus: r.cpus,
                    memory_bytes: r.memory_bytes,
                    status,
                    exits: r.exits,
                    this,
                })
            })
            .collect())
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

    /// How long ago a node last heartbeat, and so its status.
    fn age_status(&self, r: &NodeRecord, now: u64) -> (u64, NodeStatus) {
        // This process is alive whatever its record says (it may not heartbeat).
        let age = if r.name == self.name {
            0
        } else {
            now.saturating_sub(r.heartbeat_ms)
        };
        let status = if u128::from(age) > self.down_after.as_millis() {
            NodeStatus::Down
        } else if r.cordoned {
            NodeStatus::Cordoned
        } else {
            NodeStatus::Ready
        };
        (age, status)
    }

    fn info(&self, v: &Versioned, now: u64, usage: &Usages) -> Option<NodeInfo> {
        let r: NodeRecord = serde_json::from_slice(&v.value).ok()?;
        let this = r.name == self.name;
        let (age, status) = self.age_status(&r, now);
        let usage = usage.get(&r.name).copied().unwrap_or_default();
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

    /// Every node, by name; `usage` is what the services ask of each.
    pub(crate) async fn list(&self, usage: &Usages) -> Result<Vec<NodeInfo>, ApiError> {
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
        usage: &Usages,
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
    async fn one(&self, name: &str, usage: &Usages) -> Result<(Versioned, NodeInfo), ApiError> {
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
        let (v, info) = self.one(name, &Usages::new()).await?;
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

/// `GET /api/v1/nodes`, `POST /api/v1/nodes/{name}/drain|cordon|uncordon`,
/// `DELETE /api/v1/nodes/{name}`.
pub(crate) fn router(nodes: Arc<Nodes>, services: Arc<crate::services::Services>) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::response::IntoResponse;
    async fn list(State(s): State<NodeRoutes>) -> axum::response::Response {
        match s.nodes.list(&s.services.usage()).await {
            Ok(list) => axum::Json(list).into_response(),
            Err(e) => e.into_response(),
        }
    }
    async fn cordon(
        State(s): State<NodeRoutes>,
        Path((name, verb)): Path<(String, String)>,
    ) -> axum::response::Response {
        let cordoned = match verb.as_str() {
            "cordon" | "drain" => true,
            "uncordon" => false,
            _ => {
                return ApiError::new(
                    ErrorKind::NotFound,
                    format!("no node action {verb:?}: use drain, cordon or uncordon"),
                )
                .into_response();
            }
        };
        if verb == "drain" && !s.services.is_leading() {
            return ApiError::new(
                ErrorKind::Unavailable,
                "this control plane is a standby: drain through the leading one",
            )
            .into_response();
        }
        match s
            .nodes
            .set_cordoned(&name, cordoned, &s.services.usage())
            .await
        {
            Ok(info) => {
                if verb == "drain" {
                    s.services.drain_node(&name).await;
                }
                axum::Json(info).into_response()
            }
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
    async fn heartbeat(
        State(s): State<NodeRoutes>,
        Path(name): Path<String>,
        headers: http::HeaderMap,
        body: axum::body::Bytes,
    ) -> axum::response::Response {
        if let Err(e) = s.nodes.joins(&headers) {
            return e.into_response();
        }
        let beat: crate::agent::Beat = match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return ApiError::new(ErrorKind::InvalidArgument, format!("heartbeat: {e}"))
                    .into_response();
            }
        };
        match s.nodes.beat(&name, beat).await {
            Ok(reply) => axum::Json(reply).into_response(),
            Err(e) => e.into_response(),
        }
    }
    axum::Router::new()
        .route(
            "/api/v1/nodes/{name}/heartbeat",
            axum::routing::post(heartbeat),
        )
        .route("/api/v1/nodes", axum::routing::get(list))
        .route("/api/v1/nodes/{name}", axum::routing::delete(remove))
        .route("/api/v1/nodes/{name}/{verb}", axum::routing::post(cordon))
        .with_state(NodeRoutes { nodes, services })
}
