//! Services: one controller actor per service (in `slipway-controller`), wired to
//! the real parts (`adapters.rs`), persisted in the embedded state store
//! (`state.rs`), served over `/api/v1/services` (`api.rs`), with image triggers from
//! registry pushes, recovery after a restart, and the migration of data
//! directories written by earlier releases (`legacy.rs`).

mod adapters;
mod api;
mod legacy;
mod logs;
mod routes;
mod state;

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_api::services::{InstanceView, RevisionView, ServiceStatus, TrafficView};
use slipway_controller::{
    Command, CommandError, Event, Service, ServiceDeps, ServiceRecord, StateStore,
};
use slipway_core::service::ServiceSpec;
use slipway_registry::{Action, RegistryEvent};
use slipway_runtime::Runtime;
use slipway_store::Store;
use tokio::sync::broadcast;

pub(crate) use adapters::{
    Ports, Probes, RuntimeInstances, StoreSource, ephemeral_range, parse_range,
};
pub(crate) use api::router;

use adapters::{PlatformGate, ProxyTraffic, StoreImages};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A service known to this daemon: the handle on its actor and its ingress.
#[derive(Clone)]
struct Entry {
    svc: Service,
    traffic: Arc<ProxyTraffic>,
}

/// Secret values for instances and versions for revisions (the auth database).
pub(crate) trait SecretValues: Send + Sync {
    /// The current version of `name`, if `service` may use it.
    fn version(&self, name: &str, service: &str) -> Result<u64, String>;
    /// The current value of `name`, if `service` may use it.
    fn value(&self, name: &str, service: &str) -> Result<Vec<u8>, String>;
}

/// Whether a push by `principal` may roll out `service` (the deploy gate of
/// triggers): the pusher must be allowed to deploy it and to pull `repo`.
pub(crate) trait PushPolicy: Send + Sync {
    fn admit(&self, principal: Option<&str>, service: &str, repo: &str) -> Result<(), String>;
}

/// Recent events and their live stream, behind one lock so a reader that takes
/// the recent ones and subscribes misses nothing in between.
pub(crate) struct Hub {
    recent: Mutex<VecDeque<slipway_api::services::Event>>,
    tx: broadcast::Sender<slipway_api::services::Event>,
}

const RECENT_EVENTS: usize = 1000;

impl Hub {
    fn publish(&self, e: Event) {
        let e = slipway_api::services::Event {
            at_ms: e.at_ms,
            service: e.service,
            revision: e.revision,
            command: e.command,
            message: e.message,
            outcome: e.outcome,
        };
        let mut recent = lock(&self.recent);
        if recent.len() == RECENT_EVENTS {
            recent.pop_front();
        }
        recent.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    /// The recent events and a receiver of every later one.
    pub(crate) fn subscribe(
        &self,
    ) -> (
        Vec<slipway_api::services::Event>,
        broadcast::Receiver<slipway_api::services::Event>,
    ) {
        let recent = lock(&self.recent);
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }
}

/// All services of this daemon.
pub(crate) struct Services {
    map: Mutex<HashMap<String, Entry>>,
    runtime: Arc<Runtime>,
    /// Instances: this node's runtime, or every node's with etcd.
    instances: Arc<dyn slipway_controller::Instances>,
    probes: Arc<dyn slipway_controller::Prober>,
    /// The nodes' instances, with etcd.
    cluster: Option<Arc<crate::cluster::Cluster>>,
    /// On a standby: the ingresses it serves from the stored route tables.
    followed: Mutex<HashMap<String, Arc<ProxyTraffic>>>,
    /// This node's name.
    node: String,
    images: Arc<StoreImages>,
    gate: Arc<PlatformGate>,
    state: Arc<dyn StateStore>,
    events: broadcast::Sender<Event>,
    pub(crate) hub: Arc<Hub>,
    secrets: Arc<dyn SecretValues>,
    /// The serving threads every ingress shares.
    pool: Arc<slipway_proxy::Pool>,
    /// Whether this control plane runs the services (always, but for a standby
    /// of an etcd-backed control plane that another process leads).
    leading: std::sync::atomic::AtomicBool,
    /// The leader's lease TTL, ms (for messages).
    lease_ms: std::sync::atomic::AtomicU64,
}

impl Services {
    /// Wires the adapters around `state`; with `cluster` (the nodes and the
    /// join token), instances run on every node.
    #[expect(clippy::too_many_arguments, reason = "the wiring of every part")]
    pub(crate) fn open(
        state: Arc<dyn StateStore>,
        runtime: Arc<Runtime>,
        store: Arc<Store>,
        local_hosts: Vec<String>,
        ports: Arc<Ports>,
        secrets: Arc<dyn SecretValues>,
        node: &str,
        cluster: Option<(Arc<crate::nodes::Nodes>, Option<Arc<str>>)>,
    ) -> anyhow::Result<Arc<Self>> {
        let (events, rx) = broadcast::channel(4096);
        let hub = Arc::new(Hub {
            recent: Mutex::default(),
            tx: broadcast::channel(4096).0,
        });
        tokio::spawn(forward(rx, hub.clone()));
        let local = Arc::new(RuntimeInstances {
            runtime: runtime.clone(),
            ports,
            secrets: secrets.clone(),
        });
        local.adopt_ports();
        let probes = Arc::new(Probes {
            runtime: runtime.clone(),
        });
        let cluster = cluster.map(|(nodes, token)| {
            crate::cluster::Cluster::new(
                nodes,
                local.clone(),
                probes.clone(),
                secrets.clone(),
                token.as_deref().unwrap_or(""),
            )
        });
        let (instances, probes): (
            Arc<dyn slipway_controller::Instances>,
            Arc<dyn slipway_controller::Prober>,
        ) = match &cluster {
            Some(c) => (c.clone(), c.clone()),
            None => (local, probes),
        };
        let pool = slipway_proxy::Pool::for_this_machine()
            .map_err(|e| anyhow::anyhow!("cannot start the proxy's serving threads: {e}"))?;
        let services = Arc::new(Self {
            pool,
            leading: std::sync::atomic::AtomicBool::new(true),
            lease_ms: std::sync::atomic::AtomicU64::new(5000),
            map: Mutex::default(),
            probes,
            cluster,
            followed: Mutex::default(),
            node: node.to_owned(),
            gate: Arc::new(PlatformGate {
                runtime: runtime.clone(),
            }),
            images: Arc::new(StoreImages { store, local_hosts }),
            instances,
            runtime,
            state,
            events,
            hub,
            secrets,
        });
        if let Some(c) = &services.cluster {
            let weak = Arc::downgrade(&services);
            c.set_routed(Arc::new(move |id| {
                weak.upgrade().and_then(|s| s.routes_instance(id))
            }));
        }
        Ok(services)
    }

    /// Asks every service with instances on `node` to move them elsewhere.
    pub(crate) async fn drain_node(&self, node: &str) {
        // Its replacements must see it cordoned.
        if let Some(c) = &self.cluster {
            c.refresh().await;
        }
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        for e in entries {
            let ids: Vec<String> = e
                .svc
                .record()
                .instances
                .iter()
                .filter(|i| crate::cluster::split(&i.id).1.unwrap_or(&self.node) == node)
                .map(|i| i.id.clone())
                .collect();
            if ids.is_empty() {
                continue;
            }
            if let Err(err) = e.svc.send(Command::Replace(ids)).await {
                tracing::warn!(service = %e.svc.name(), "cannot move instances off {node}: {err}");
            }
        }
    }

    /// The nodes' instances, with etcd.
    pub(crate) fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.as_ref()
    }

    /// `None` on a standby; else whether a service routes (or is stopping)
    /// instance `id`.
    fn routes_instance(&self, id: &str) -> Option<bool> {
        if !self.is_leading() {
            return None;
        }
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        Some(entries.iter().any(|e| {
            let r = e.svc.record();
            r.instances.iter().chain(&r.stopping).any(|i| i.id == id)
        }))
    }

    /// The control-plane state store: etcd when `endpoints` are given (with the
    /// etcd store itself, to campaign for leadership), else `<data_dir>/state.redb`.
    pub(crate) async fn state_store(
        data_dir: &Path,
        endpoints: &[String],
    ) -> anyhow::Result<(Arc<dyn StateStore>, Option<slipway_etcd::EtcdState>)> {
        if endpoints.is_empty() {
            let path = data_dir.join("state.redb");
            let state = tokio::task::spawn_blocking(move || state::RedbState::open(&path))
                .await?
                .map_err(|e| anyhow::anyhow!("cannot open the state store: {e}"))?;
            return Ok((Arc::new(state), None));
        }
        let state = slipway_etcd::EtcdState::connect(endpoints, "/slipway/")
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot reach etcd at {}: {e} (is etcd running there? check --state)",
                    endpoints.join(",")
                )
            })?;
        tracing::info!(endpoints = %endpoints.join(","), "control-plane state in etcd");
        Ok((Arc::new(state.clone()), Some(state)))
    }

    /// The leader's lease TTL: how soon a standby takes over.
    pub(crate) fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether this control plane runs the services now.
    pub(crate) fn is_leading(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks this control plane as running the services, or as a standby.
    pub(crate) fn set_leading(&self, leading: bool) {
        self.leading
            .store(leading, std::sync::atomic::Ordering::Release);
    }

    /// Waits until this process leads the control planes sharing `etcd`, then
    /// loads and runs every service; the receiver fires if leadership is lost
    /// afterwards (the process must then stop: another control plane runs the
    /// services).
    pub(crate) fn lead_then_recover(
        self: &Arc<Self>,
        etcd: slipway_etcd::EtcdState,
        ttl: Duration,
        id: String,
        legacy_dir: std::path::PathBuf,
    ) -> tokio::sync::watch::Receiver<bool> {
        let (lost_tx, lost_rx) = tokio::sync::watch::channel(false);
        self.set_leading(false);
        self.lease_ms.store(
            u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
        let this = self.clone();
        tokio::spawn(async move {
            tracing::info!("standby: campaigning to lead the control planes on etcd");
            let leader = loop {
                match etcd.lead("control-plane", &id, ttl).await {
                    Ok(l) => break l,
                    Err(e) => {
                        tracing::warn!("campaign for leadership: {e}; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            tracing::info!("leading the control planes: loading and running the services");
            this.set_leading(true);
            this.recover(&legacy_dir).await;
            let mut lost = leader.lost();
            let _ = lost.wait_for(|l| *l).await;
            this.set_leading(false);
            let _ = lost_tx.send(true);
        });
        lost_rx
    }

    /// Pins the version of every secret `spec` uses (checking that each exists
    /// and that the service may use it), so a changed value is a new revision.
    pub(crate) fn pin_secrets(&self, spec: &mut ServiceSpec) -> Result<(), String> {
        spec.secret_versions.clear();
        for name in spec.secret_refs() {
            let v = self.secrets.version(&name, &spec.name)?;
            spec.secret_versions.insert(name, v);
        }
        Ok(())
    }

    /// Rolls every service that uses secret `name` to a revision with its new
    /// version; returns the services.
    pub(crate) async fn roll_secret(self: &Arc<Self>, name: &str) -> Vec<String> {
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        let mut rolled = Vec::new();
        for e in entries {
            let record = e.svc.record();
            let Some(mut spec) = record.spec().cloned() else {
                continue;
            };
            if !spec.secret_refs().contains(name) {
                continue;
            }
            // Keep the image the service runs now.
            if let Some(active) = record.active_revision() {
                spec.image = active.spec.image.clone();
            }
            if let Err(why) = self.pin_secrets(&mut spec) {
                tracing::warn!(service = %spec.name, "secret {name} changed but cannot roll: {why}");
                continue;
            }
            let service = spec.name.clone();
            match self.deploy(spec).await {
                Ok(_) => rolled.push(service),
                Err(e) => {
                    tracing::warn!(%service, "secret {name} changed but the deploy was refused: {e}")
                }
            }
        }
        rolled
    }

    /// The services whose spec uses secret `name`.
    pub(crate) fn users_of_secret(&self, name: &str) -> Vec<String> {
        lock(&self.map)
            .values()
            .filter_map(|e| {
                let r = e.svc.record();
                r.spec()
                    .is_some_and(|s| s.secret_refs().contains(name))
                    .then(|| e.svc.name().to_owned())
            })
            .collect()
    }

    fn deps(&self, traffic: Arc<ProxyTraffic>) -> ServiceDeps {
        ServiceDeps {
            instances: self.instances.clone(),
            prober: self.probes.clone(),
            traffic,
            images: self.images.clone(),
            gate: self.gate.clone(),
            store: self.state.clone(),
            events: self.events.clone(),
        }
    }

    /// A new actor for `record`, not yet known to the map.
    fn spawn_entry(&self, record: ServiceRecord, version: Option<u64>, recover: bool) -> Entry {
        let traffic = self
            .take_followed(&record.name)
            .unwrap_or_else(|| Arc::new(ProxyTraffic::new(self.pool.clone())));
        // With etcd, the other control planes serve this ingress too.
        if self.cluster.is_some() {
            traffic.share(routes::writer(self.state.clone(), record.name.clone()));
        }
        let svc = slipway_controller::spawn(record, version, self.deps(traffic.clone()), recover);
        Entry { svc, traffic }
    }

    /// Forgets a service once its actor has ended (removed, or a new service whose
    /// first deploy was refused).
    fn forget_when_gone(self: &Arc<Self>, entry: Entry) {
        let me = self.clone();
        tokio::spawn(async move {
            entry.svc.gone().await;
            entry.traffic.close_if_unused();
            let mut map = lock(&me.map);
            if map
                .get(entry.svc.name())
                .is_some_and(|e| Arc::ptr_eq(&e.traffic, &entry.traffic))
            {
                map.remove(entry.svc.name());
            }
        });
    }

    /// Starts the actor of a recovered service.
    fn start(self: &Arc<Self>, record: ServiceRecord, version: Option<u64>) {
        let name = record.name.clone();
        let entry = self.spawn_entry(record, version, true);
        lock(&self.map).insert(name, entry.clone());
        self.forget_when_gone(entry);
    }

    /// Creates or updates a service: the command goes to its actor.
    pub(crate) async fn deploy(
        self: &Arc<Self>,
        spec: ServiceSpec,
    ) -> Result<slipway_controller::Accepted, CommandError> {
        // A new service's actor that refused its first deploy ends; retry once.
        for _ in 0..3 {
            // Looked up and created under one lock: two deploys of a new service
            // never make two owners.
            let (entry, created) = {
                let mut map = lock(&self.map);
                match map.get(&spec.name) {
                    Some(e) if !e.svc.is_gone() => (e.clone(), false),
                    _ => {
                        let e = self.spawn_entry(ServiceRecord::new(&spec.name), None, false);
                        map.insert(spec.name.clone(), e.clone());
                        (e, true)
                    }
                }
            };
            if created {
                self.forget_when_gone(entry.clone());
            }
            match entry
                .svc
                .send(Command::Deploy(Box::new(spec.clone())))
                .await
            {
                Err(CommandError::Gone) => continue,
                other => return other,
            }
        }
        Err(CommandError::Unavailable(format!(
            "{}: the service is being removed; try again",
            spec.name
        )))
    }

    fn get(&self, name: &str) -> Result<Entry, CommandError> {
        lock(&self.map)
            .get(name)
            .filter(|e| !e.svc.is_gone())
            .cloned()
            .ok_or_else(|| CommandError::NotFound(format!("no service named {name:?}")))
    }

    /// Sends a command to an existing service.
    pub(crate) async fn send(
        &self,
        name: &str,
        command: Command,
    ) -> Result<slipway_controller::Accepted, CommandError> {
        self.get(name)?.svc.send(command).await
    }

    /// Every service's status, by name.
    pub(crate) fn list(&self) -> Vec<ServiceStatus> {
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        let mut v: Vec<ServiceStatus> = entries.iter().filter_map(describe).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// One service's status.
    pub(crate) fn status(&self, name: &str) -> Result<ServiceStatus, CommandError> {
        describe(&self.get(name)?)
            .ok_or_else(|| CommandError::NotFound(format!("no service named {name:?}")))
    }

    /// A service's record.
    pub(crate) fn record(&self, name: &str) -> Result<ServiceRecord, CommandError> {
        Ok(self.get(name)?.svc.record())
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Loads every record and converges each service after a restart; data
    /// directories of earlier releases are migrated first.
    pub(crate) async fn recover(self: &Arc<Self>, legacy_dir: &Path) {
        legacy::migrate(legacy_dir, self.state.as_ref()).await;
        let records = match self.state.load_all("services/").await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot load services: {e}");
                return;
            }
        };
        for v in records {
            match serde_json::from_slice::<ServiceRecord>(&v.value) {
                Ok(record) => {
                    tracing::info!(service = %record.name, "recovering");
                    if let Some(c) = &self.cluster {
                        for i in &record.instances {
                            if let Some(rev) = record.revision(i.revision) {
                                c.note(
                                    &i.id,
                                    &record.name,
                                    slipway_controller::schedule::Resources::of(
                                        rev.spec.cpus,
                                        rev.spec.memory.as_deref(),
                                    ),
                                );
                            }
                        }
                    }
                    self.start(record, Some(v.version));
                }
                Err(e) => tracing::error!(key = %v.key, "unreadable service record; skipped: {e}"),
            }
        }
    }

    /// Offers pushes to the services whose trigger wants them.
    pub(crate) async fn watch_registry(
        self: Arc<Self>,
        mut rx: broadcast::Receiver<RegistryEvent>,
        policy: Arc<dyn PushPolicy>,
    ) {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!("missed {n} registry events");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let (Action::Push, Some(tag)) = (ev.action, ev.tag.clone()) else {
                continue;
            };
            let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
            for e in entries {
                let service = e.svc.name().to_owned();
                let admit = || policy.admit(ev.principal.as_deref(), &service, &ev.repository);
                match e.svc.offer_push_if(&ev.repository, &tag, admit) {
                    Ok(true) => {
                        tracing::info!(%service, repository = %ev.repository, %tag, "push matches the trigger");
                    }
                    Ok(false) => {}
                    Err(why) => {
                        tracing::info!(%service, repository = %ev.repository, %tag, "push not rolled out: {why}");
                        self.hub.publish(Event {
                            at_ms: slipway_core::now_ms(),
                            service,
                            revision: None,
                            command: None,
                            message: format!(
                                "push of {}:{tag} not rolled out: {why}",
                                ev.repository
                            ),
                            outcome: None,
                        });
                    }
                }
            }
        }
    }

    /// How many of a service's newest revisions keep their images' snapshots
    /// (for rollback).
    const RECENT_REVISIONS: usize = 5;

    /// The images (manifest digests) of every service's recent revisions: their
    /// snapshots stay, so a rollback starts without unpacking.
    pub(crate) fn recent_images(&self) -> Vec<slipway_core::Digest> {
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        let mut out = Vec::new();
        for e in entries {
            let r = e.svc.record();
            for rev in r
                .revisions
                .iter()
                .rev()
                .filter(|v| v.status != slipway_controller::RevisionStatus::Rejected)
                .take(Self::RECENT_REVISIONS)
            {
                if let Some(d) = rev
                    .image
                    .rsplit_once('@')
                    .and_then(|(_, d)| d.parse::<slipway_core::Digest>().ok())
                {
                    out.push(d);
                }
            }
        }
        out
    }

    /// Every ingress's per-revision counters, one snapshot, for `/metrics`.
    pub(crate) fn proxy_stats(&self) -> Vec<(String, u64, slipway_proxy::Stats)> {
        let entries: Vec<(String, Entry)> = lock(&self.map)
            .iter()
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect();
        let mut stats: Vec<(String, u64, slipway_proxy::Stats)> = entries
            .iter()
            .filter_map(|(name, e)| e.traffic.proxy().map(|p| (name, p)))
            .flat_map(|(name, p)| {
                p.all_stats()
                    .into_iter()
                    .map(|(rev, st)| (name.clone(), rev, st))
            })
            .collect();
        stats.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        stats
    }

    /// What the services ask of each node: their instances (in
    /// routing or being started) and those instances' cpus and memory limits.
    pub(crate) fn usage(&self) -> crate::nodes::Usages {
        let entries: Vec<Entry> = lock(&self.map).values().cloned().collect();
        let mut all = crate::nodes::Usages::new();
        for e in entries {
            let record = e.svc.record();
            for i in &record.instances {
                let Some(spec) = record.revision(i.revision).map(|r| &r.spec) else {
                    continue;
                };
                let r =
                    slipway_controller::schedule::Resources::of(spec.cpus, spec.memory.as_deref());
                let node = crate::cluster::split(&i.id).1.unwrap_or(&self.node);
                let u = all.entry(node.to_owned()).or_default();
                u.instances += 1;
                u.asked.millicpu += r.millicpu;
                u.asked.memory += r.memory;
            }
        }
        all
    }

    /// Stops every ingress; instances keep running for the next daemon.
    pub(crate) fn shutdown(&self) {
        let entries: Vec<Entry> = lock(&self.map).drain().map(|(_, e)| e).collect();
        for e in entries {
            // The stored table stays: the other control planes keep serving it.
            e.traffic.unshare();
            slipway_controller::Traffic::close(e.traffic.as_ref());
        }
        let followed: Vec<Arc<ProxyTraffic>> =
            lock(&self.followed).drain().map(|(_, t)| t).collect();
        for t in followed {
            slipway_controller::Traffic::close(t.as_ref());
        }
    }
}

/// Forwards the controllers' events into the hub.
async fn forward(mut rx: broadcast::Receiver<Event>, hub: Arc<Hub>) {
    loop {
        match rx.recv().await {
            Ok(e) => hub.publish(e),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!("the event hub missed {n} events");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

fn view(i: &slipway_controller::Instance) -> InstanceView {
    InstanceView {
        id: i.id.clone(),
        revision: i.revision,
        addr: i.addr,
    }
}

/// A service's status as the API shows it; `None` before its first revision.
fn describe(e: &Entry) -> Option<ServiceStatus> {
    let r = e.svc.record();
    // A new service whose only revision was rejected still shows, with that spec.
    let spec = r
        .spec()
        .or_else(|| r.revisions.last().map(|x| &x.spec))?
        .clone();
    let traffic = e
        .traffic
        .proxy()
        .map(|p| p.all_stats())
        .unwrap_or_default()
        .into_iter()
        .map(|(revision, s)| TrafficView {
            revision,
            requests: s.requests,
            errors: s.errors,
            p99_ms: s.p99_ms(),
        })
        .collect();
    Some(ServiceStatus {
        name: r.name.clone(),
        image: spec.image.clone(),
        ingress: spec.ingress.listen,
        proxy: e.traffic.proxy().map(|p| {
            let (hold, balance) = p.settings();
            slipway_api::services::ProxyView {
                balance: match balance {
                    slipway_proxy::Balance::RoundRobin => {
                        slipway_core::service::BalanceKind::RoundRobin
                    }
                    slipway_proxy::Balance::LeastRequests => {
                        slipway_core::service::BalanceKind::LeastRequests
                    }
                },
                hold_timeout_ms: u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            }
        }),
        replicas: spec.replicas,
        active: r.active,
        phase: r.phase,
        paused: r.paused,
        message: r.message.clone(),
        weights: r.weights.clone(),
        instances: r.instances.iter().map(view).collect(),
        stopping: r.stopping.iter().map(view).collect(),
        revisions: r
            .revisions
            .iter()
            .map(|x| RevisionView {
                number: x.number,
                image: x.image.clone(),
                spec_image: x.spec.image.clone(),
                replicas: x.spec.replicas,
                status: x.status,
                message: x.message.clone(),
                created_ms: x.created_ms,
                command: x.command.clone(),
            })
            .collect(),
        traffic,
    })
}
