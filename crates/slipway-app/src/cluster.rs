//! Instances across nodes, for control planes on etcd: the controller's
//! `Instances` and `Prober` over every node's agent API (this process's own node
//! directly), with the scheduler placing each new instance.
//!
//! An instance's id names its node: `CONTAINER@NODE`; its address is the node's
//! advertised address and the instance's port, so every control plane's proxy
//! reaches it. A node past its heartbeat TTL and grace is down: its instances
//! count as exited (healing replaces them elsewhere, and they leave routing), and
//! when it comes back, what it still runs that no service routes is stopped.
//!
//! One owner per piece of state: node records are the nodes' own (heartbeats);
//! what runs where is the agents'; which instances a service routes is its
//! record's. This module keeps only a view of the nodes (refreshed every 250 ms)
//! and a tally of what it placed, for the scheduler.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use http::Method;
use slipway_api::nodes::NodeStatus;
use slipway_controller::schedule::{self, Demand, Resources, Scheduler};
use slipway_controller::{Instance, InstanceError, InstanceSpec, InstanceState, Instances, Prober};
use slipway_core::service::Probe;
use tokio::sync::watch;

use crate::agent::rpc::{Rpc, RpcError};
use crate::agent::{ProbeCall, StartCall, StopCall};
use crate::nodes::{NodeView, Nodes};
use crate::services::{Probes, RuntimeInstances, SecretValues};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// How often the view of the nodes is refreshed.
const REFRESH: Duration = Duration::from_millis(250);

/// An instance id's container and node (`None`: an id from before nodes, this
/// process's own).
pub(crate) fn split(id: &str) -> (&str, Option<&str>) {
    match id.rsplit_once('@') {
        Some((c, n)) => (c, Some(n)),
        None => (id, None),
    }
}

/// What was placed on a node, for the scheduler.
#[derive(Debug, Clone)]
struct Placed {
    service: String,
    node: String,
    resources: Resources,
}

/// Whether this control plane leads and, if so, whether a service routes an
/// instance (by id).
pub(crate) type Routed = Arc<dyn Fn(&str) -> Option<bool> + Send + Sync>;

/// The instances of every node.
pub(crate) struct Cluster {
    nodes: Arc<Nodes>,
    local: Arc<RuntimeInstances>,
    probes: Arc<Probes>,
    secrets: Arc<dyn SecretValues>,
    rpc: Rpc,
    view: Mutex<HashMap<String, NodeView>>,
    placed: Mutex<HashMap<String, Placed>>,
    exits: watch::Sender<u64>,
    routed: OnceLock<Routed>,
    /// This, for the tasks it spawns.
    me: std::sync::Weak<Cluster>,
}

fn unreachable(e: &RpcError) -> InstanceError {
    InstanceError::Unreachable(e.to_string())
}

impl Cluster {
    pub(crate) fn new(
        nodes: Arc<Nodes>,
        local: Arc<RuntimeInstances>,
        probes: Arc<Probes>,
        secrets: Arc<dyn SecretValues>,
        token: &str,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            nodes,
            local,
            probes,
            secrets,
            rpc: Rpc::new(token),
            view: Mutex::default(),
            placed: Mutex::default(),
            exits: watch::channel(0).0,
            routed: OnceLock::new(),
        })
    }

    /// Tells the cluster which instances the services route (set once).
    pub(crate) fn set_routed(&self, routed: Routed) {
        let _ = self.routed.set(routed);
    }

    /// Counts an instance a recovered record routes, for the scheduler.
    pub(crate) fn note(&self, id: &str, service: &str, resources: Resources) {
        let node = match split(id).1 {
            Some(n) => n.to_owned(),
            None => self.nodes.this().to_owned(),
        };
        lock(&self.placed).insert(
            id.to_owned(),
            Placed {
                service: service.to_owned(),
                node,
                resources,
            },
        );
    }

    fn bump(&self) {
        self.exits.send_modify(|n| *n += 1);
    }

    /// Refreshes the view of the nodes every 250 ms until `stop`, waking the
    /// services' healing when a node goes down or comes back or an agent saw an
    /// instance exit; a node that comes back has its stale instances stopped.
    pub(crate) fn monitor(self: &Arc<Self>, mut stop: watch::Receiver<bool>) {
        let this = self.clone();
        let mut local_exits = self.local.runtime.exits();
        tokio::spawn(async move {
            loop {
                this.refresh().await;
                tokio::select! {
                    () = tokio::time::sleep(REFRESH) => {}
                    r = local_exits.changed() => {
                        if r.is_ok() {
                            this.bump();
                        }
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        });
    }

    /// Reads the nodes again; wakes healing when one went down or came back.
    pub(crate) async fn refresh(&self) {
        let views = match self.nodes.views().await {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!("cannot read the nodes: {e}");
                return;
            }
        };
        let mut changed = false;
        let mut back = Vec::new();
        {
            let mut view = lock(&self.view);
            let fresh: HashMap<String, NodeView> =
                views.into_iter().map(|v| (v.name.clone(), v)).collect();
            for (name, old) in view.iter() {
                match fresh.get(name) {
                    None => changed = true,
                    Some(new) => {
                        let was_down = old.status == NodeStatus::Down;
                        let is_down = new.status == NodeStatus::Down;
                        if was_down != is_down || old.exits != new.exits {
                            changed = true;
                        }
                        if was_down != is_down {
                            if is_down {
                                tracing::warn!(node = %name, "node is down: its instances are replaced elsewhere");
                            } else {
                                tracing::info!(node = %name, "node is back");
                                back.push(new.clone());
                            }
                        }
                    }
                }
            }
            if fresh.keys().any(|k| !view.contains_key(k)) {
                changed = true;
            }
            *view = fresh;
        }
        if changed {
            self.bump();
        }
        for node in back {
            if let Some(this) = self.me.upgrade() {
                tokio::spawn(async move { this.stop_stale(&node).await });
            }
        }
    }

    /// Stops what a node that came back runs and no service routes (replaced
    /// while it was down). Only the leader does this.
    async fn stop_stale(&self, node: &NodeView) {
        let Some(routed) = self.routed.get() else {
            return;
        };
        if routed("").is_none() {
            return;
        }
        let Ok(all) = self.list_on(node, None).await else {
            return;
        };
        for inst in all {
            if routed(&inst.id) == Some(false) {
                tracing::info!(node = %node.name, instance = %inst.id, "stopping a stale instance of a node that came back");
                if let Err(e) = self.stop(&inst, Duration::from_secs(5)).await {
                    tracing::warn!(instance = %inst.id, "cannot stop a stale instance: {e}");
                }
            }
        }
    }

    fn node(&self, name: &str) -> Option<NodeView> {
        lock(&self.view).get(name).cloned()
    }

    /// The node's view, refreshed first if it is not known yet.
    async fn node_fresh(&self, name: &str) -> Option<NodeView> {
        if let Some(n) = self.node(name) {
            return Some(n);
        }
        self.refresh().await;
        self.node(name)
    }

    /// An instance of this node as the cluster names it.
    fn qualify(node: &NodeView, inst: Instance) -> Instance {
        let ip = node
            .address
            .parse::<std::net::IpAddr>()
            .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
        Instance {
            id: format!("{}@{}", inst.id, node.name),
            revision: inst.revision,
            addr: SocketAddr::new(ip, inst.addr.port()),
        }
    }

    /// An instance as its own node names it.
    fn on_node(inst: &Instance) -> Instance {
        Instance {
            id: split(&inst.id).0.to_owned(),
            revision: inst.revision,
            addr: SocketAddr::from(([127, 0, 0, 1], inst.addr.port())),
        }
    }

    fn url(node: &NodeView, path: &str) -> Result<String, InstanceError> {
        node.api
            .as_ref()
            .map(|api| format!("http://{api}{path}"))
            .ok_or_else(|| {
                InstanceError::Unreachable(format!(
                    "node {} has no agent API (a control plane started without --join-token)",
                    node.name
                ))
            })
    }

    async fn list_on(
        &self,
        node: &NodeView,
        service: Option<&str>,
    ) -> Result<Vec<Instance>, InstanceError> {
        let found = if node.this {
            match service {
                Some(s) => self.local.list(s).await?,
                None => self.local.list_all(),
            }
        } else {
            let query = service.map_or_else(String::new, |s| format!("?service={s}"));
            let url = Self::url(node, &format!("/agent/v1/instances{query}"))?;
            self.rpc
                .call::<Result<Vec<Instance>, InstanceError>>(
                    Method::GET,
                    &url,
                    None::<&()>,
                    Duration::from_secs(5),
                )
                .await
                .map_err(|e| unreachable(&e))??
        };
        Ok(found.into_iter().map(|i| Self::qualify(node, i)).collect())
    }

    /// Picks a node for one instance of `spec` and reserves room on it.
    fn place(&self, spec: &InstanceSpec, reservation: &str) -> Result<NodeView, InstanceError> {
        let demand = Demand {
            service: spec.service.clone(),
            resources: Resources::of(spec.cpus, spec.memory.as_deref()),
            constraints: spec
                .placement
                .parsed_constraints()
                .map_err(InstanceError::Invalid)?,
            max_per_node: spec.placement.max_per_node,
            strategy: spec.placement.strategy,
        };
        let view = lock(&self.view);
        let mut placed = lock(&self.placed);
        let nodes: Vec<schedule::NodeInfo> = view
            .values()
            .filter(|n| n.this || n.api.is_some())
            .map(|n| schedule::NodeInfo {
                name: n.name.clone(),
                labels: n.labels.clone(),
                capacity: Resources {
                    #[expect(
                        clippy::cast_possible_truncation,
                        clippy::cast_sign_loss,
                        reason = "cores to thousandths"
                    )]
                    millicpu: (n.cpus * 1000.0) as u64,
                    memory: n.memory_bytes,
                },
                allocated: Resources::default(),
                status: match n.status {
                    NodeStatus::Ready => schedule::NodeStatus::Ready,
                    NodeStatus::Cordoned => schedule::NodeStatus::Cordoned,
                    NodeStatus::Down => schedule::NodeStatus::Down,
                },
            })
            .collect();
        if nodes.is_empty() {
            return Err(InstanceError::Capacity(
                "no node can run instances: start `slipway agent --join …` on a node".into(),
            ));
        }
        let mut scheduler = Scheduler::new(nodes);
        for p in placed.values() {
            scheduler.record(&p.service, &p.node, p.resources);
        }
        let name = scheduler
            .place(&demand)
            .map_err(|u| InstanceError::Capacity(format!("pending: {u}")))?;
        placed.insert(
            reservation.to_owned(),
            Placed {
                service: spec.service.clone(),
                node: name.clone(),
                resources: demand.resources,
            },
        );
        view.get(&name)
            .cloned()
            .ok_or_else(|| InstanceError::Capacity(format!("node {name} left")))
    }

    /// Whether instance `id` runs on another node than this process's.
    pub(crate) fn is_remote(&self, id: &str) -> bool {
        split(id).1.is_some_and(|n| n != self.nodes.this())
    }

    /// An instance's log on its agent from byte `from` on (from 0 if the log
    /// was rotated since): where the bytes start, and the bytes.
    pub(crate) async fn read_log(&self, id: &str, from: u64) -> Option<(u64, Vec<u8>)> {
        let (container, node) = split(id);
        let node = self.node(node?)?;
        let url = Self::url(
            &node,
            &format!("/agent/v1/instances/{container}/logs?from={from}"),
        )
        .ok()?;
        let part: crate::agent::LogPart = self
            .rpc
            .call(Method::GET, &url, None::<&()>, Duration::from_secs(5))
            .await
            .ok()?;
        Some((part.from, part.bytes))
    }

    fn secret_values(
        &self,
        spec: &InstanceSpec,
    ) -> Result<BTreeMap<String, Vec<u8>>, InstanceError> {
        let mut out = BTreeMap::new();
        for name in spec.secrets.iter().chain(spec.secret_env.values()) {
            let v = self
                .secrets
                .value(name, &spec.service)
                .map_err(InstanceError::Invalid)?;
            out.insert(name.clone(), v);
        }
        Ok(out)
    }
}

#[async_trait]
impl Instances for Cluster {
    async fn start(&self, spec: &InstanceSpec) -> Result<Instance, InstanceError> {
        if lock(&self.view).is_empty() {
            self.refresh().await;
        }
        let reservation = format!("pending-{}", uuid::Uuid::new_v4().simple());
        let node = self.place(spec, &reservation)?;
        let started = if node.this {
            self.local.start(spec).await
        } else {
            match (
                self.secret_values(spec),
                Self::url(&node, "/agent/v1/instances"),
            ) {
                (Ok(secrets), Ok(url)) => {
                    let call = StartCall {
                        spec: spec.clone(),
                        secrets,
                    };
                    // Pulling the image may take a while.
                    self.rpc
                        .call::<Result<Instance, InstanceError>>(
                            Method::POST,
                            &url,
                            Some(&call),
                            Duration::from_secs(600),
                        )
                        .await
                        .map_err(|e| unreachable(&e))
                        .and_then(|r| r)
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            }
        };
        let mut placed = lock(&self.placed);
        let reserved = placed.remove(&reservation);
        let inst = Self::qualify(&node, started?);
        if let Some(p) = reserved {
            placed.insert(inst.id.clone(), p);
        }
        Ok(inst)
    }

    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), InstanceError> {
        let (_, node) = split(&instance.id);
        let Some(node) = node else {
            return self.local.stop(instance, grace).await;
        };
        let result = match self.node_fresh(node).await {
            // A node that is gone or down stops its stale instances when it
            // comes back.
            None => Ok(()),
            Some(n) if n.status == NodeStatus::Down => Ok(()),
            Some(n) if n.this => self.local.stop(&Cluster::on_node(instance), grace).await,
            Some(n) => {
                let url = Cluster::url(
                    &n,
                    &format!("/agent/v1/instances/{}/stop", split(&instance.id).0),
                )?;
                let call = StopCall {
                    grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
                };
                self.rpc
                    .call::<Result<(), InstanceError>>(
                        Method::POST,
                        &url,
                        Some(&call),
                        grace + Duration::from_secs(15),
                    )
                    .await
                    .map_err(|e| unreachable(&e))
                    .and_then(|r| r)
            }
        };
        if result.is_ok() {
            lock(&self.placed).remove(&instance.id);
        }
        result
    }

    async fn state(&self, instance: &Instance) -> InstanceState {
        let (container, node) = split(&instance.id);
        let Some(node) = node else {
            return self.local.state(instance).await;
        };
        match self.node_fresh(node).await {
            None => InstanceState::Exited,
            Some(n) if n.status == NodeStatus::Down => InstanceState::Exited,
            Some(n) if n.this => self.local.state(&Cluster::on_node(instance)).await,
            Some(n) => {
                let Ok(url) = Cluster::url(&n, &format!("/agent/v1/instances/{container}")) else {
                    return InstanceState::Unknown;
                };
                self.rpc
                    .call::<InstanceState>(Method::GET, &url, None::<&()>, Duration::from_secs(3))
                    .await
                    .unwrap_or(InstanceState::Unknown)
            }
        }
    }

    async fn list(&self, service: &str) -> Result<Vec<Instance>, InstanceError> {
        if lock(&self.view).is_empty() {
            self.refresh().await;
        }
        let nodes: Vec<NodeView> = lock(&self.view)
            .values()
            .filter(|n| n.status != NodeStatus::Down && (n.this || n.api.is_some()))
            .cloned()
            .collect();
        let mut out = Vec::new();
        for node in nodes {
            match self.list_on(&node, Some(service)).await {
                Ok(found) => out.extend(found),
                Err(e) => tracing::warn!(node = %node.name, "cannot list instances: {e}"),
            }
        }
        Ok(out)
    }

    fn exits(&self) -> Option<watch::Receiver<u64>> {
        Some(self.exits.subscribe())
    }
}

#[async_trait]
impl Prober for Cluster {
    async fn check(&self, instance: &Instance, probe: &Probe) -> bool {
        let (container, node) = split(&instance.id);
        let Some(node) = node else {
            return self.probes.check(instance, probe).await;
        };
        match self.node(node) {
            None => false,
            Some(n) if n.status == NodeStatus::Down => false,
            Some(n) if n.this => self.probes.check(&Cluster::on_node(instance), probe).await,
            Some(n) => {
                let Ok(url) = Cluster::url(&n, "/agent/v1/probe") else {
                    return false;
                };
                let call = ProbeCall {
                    instance: Instance {
                        id: container.to_owned(),
                        ..Cluster::on_node(instance)
                    },
                    probe: probe.clone(),
                };
                self.rpc
                    .call::<bool>(
                        Method::POST,
                        &url,
                        Some(&call),
                        probe.timeout.0 + Duration::from_secs(1),
                    )
                    .await
                    .unwrap_or(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_id_names_its_node_after_the_last_at_sign() {
        assert_eq!(
            split("web-r1-abc123@node-2"),
            ("web-r1-abc123", Some("node-2"))
        );
        assert_eq!(split("web-r1-abc123"), ("web-r1-abc123", None));
    }
}
