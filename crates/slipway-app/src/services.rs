//! Services: wiring the controller to the runtime (instances), the proxy (traffic)
//! and HTTP/TCP/exec probes; the `/api/v1/services` API; image-driven triggers;
//! persistence and recovery.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use slipway_controller::{
    Controller, Event, Instance, Instances, Outcome, Prober, ServiceState, Traffic, TrafficStats,
};
use slipway_core::ErrorKind;
use slipway_core::service::{Probe, ServiceSpec};
use slipway_proxy::{Backend, Balance, Proxy, RevisionRoute, RouteTable};
use slipway_registry::{Action, RegistryEvent};
use slipway_runtime::{RunRequest, Runtime, Status};
use slipway_store::Store;
use tokio::sync::{broadcast, watch};

use crate::containers::ApiError;

// === adapters ===

/// Instances are containers of the runtime, on a port Slipway picks.
struct RuntimeInstances {
    runtime: Arc<Runtime>,
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

#[async_trait]
impl Instances for RuntimeInstances {
    async fn start(
        &self,
        spec: &ServiceSpec,
        revision: u64,
        image: &str,
    ) -> Result<Instance, String> {
        let port = free_port()?;
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let name = format!("{}-r{revision}-{suffix}", spec.name);
        let mut labels = std::collections::BTreeMap::new();
        labels.insert("slipway.service".to_owned(), spec.name.clone());
        labels.insert("slipway.revision".to_owned(), revision.to_string());
        let req = RunRequest {
            image: image.to_owned(),
            name: Some(name.clone()),
            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            port: Some(port),
            memory: spec.memory.clone(),
            cpus: spec.cpus,
            volumes: spec.volumes.clone(),
            labels,
            ..RunRequest::default()
        };
        let info = self.runtime.run(req).await.map_err(|e| e.to_string())?;
        if info.status != Status::Running {
            let _ = self.runtime.remove(&name, true).await;
            return Err(format!(
                "instance {name} exited at start ({})",
                info.message
                    .unwrap_or_else(|| format!("exit code {:?}", info.exit_code))
            ));
        }
        Ok(Instance {
            id: name,
            revision,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    async fn stop(&self, instance: &Instance, grace: Duration) {
        let _ = self.runtime.stop(&instance.id, Some(grace)).await;
        if let Err(e) = self.runtime.remove(&instance.id, true).await {
            tracing::warn!(instance = %instance.id, "cannot remove instance: {e}");
        }
    }

    async fn alive(&self, instance: &Instance) -> bool {
        self.runtime
            .inspect(&instance.id)
            .is_ok_and(|i| i.status == Status::Running)
    }
}

/// HTTP, TCP and exec checks.
struct Probes {
    runtime: Arc<Runtime>,
}

async fn http_ok(addr: SocketAddr, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: slipway-probe\r\nConnection: close\r\n\r\n"
    );
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    s.read_exact(&mut buf).await.is_ok()
        && (buf.starts_with(b"HTTP/1.1 2")
            || buf.starts_with(b"HTTP/1.1 3")
            || buf.starts_with(b"HTTP/1.0 2"))
}

#[async_trait]
impl Prober for Probes {
    async fn check(&self, instance: &Instance, probe: &Probe) -> bool {
        if let Some(path) = &probe.http {
            http_ok(instance.addr, path).await
        } else if let Some(argv) = &probe.exec {
            self.runtime
                .exec(&instance.id, argv)
                .await
                .is_ok_and(|c| c == 0)
        } else {
            tokio::net::TcpStream::connect(instance.addr).await.is_ok()
        }
    }
}

/// The proxy as the controller's data plane; keeps backend identity across tables
/// so in-flight counts survive republishing.
struct ProxyTraffic {
    proxy: Arc<Proxy>,
    backends: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
}

impl Traffic for ProxyTraffic {
    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]) {
        let mut known = self
            .backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let table = RouteTable {
            revisions: routes
                .iter()
                .map(|(rev, weight, insts)| RevisionRoute {
                    revision: *rev,
                    weight: *weight,
                    backends: insts
                        .iter()
                        .map(|i| {
                            known
                                .entry(i.addr)
                                .or_insert_with(|| Backend::new(i.addr))
                                .clone()
                        })
                        .collect(),
                })
                .collect(),
        };
        // Forget backends that left and have nothing in flight.
        let published: Vec<SocketAddr> = routes
            .iter()
            .flat_map(|(_, _, i)| i.iter().map(|i| i.addr))
            .collect();
        known.retain(|addr, b| published.contains(addr) || b.in_flight() > 0);
        self.proxy.set_routes(table);
    }

    fn in_flight(&self, instance: &Instance) -> u64 {
        self.backends
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&instance.addr)
            .map_or(0, |b| b.in_flight())
    }

    fn stats(&self, revision: u64) -> TrafficStats {
        let s = self.proxy.stats(revision).snapshot();
        TrafficStats {
            requests: s.requests,
            errors: s.errors,
            p99_ms: s.p99_ms(),
        }
    }
}

// === manager ===

struct Service {
    controller: Arc<tokio::sync::Mutex<Controller>>,
    control: Arc<slipway_controller::Control>,
    state: Arc<Mutex<ServiceState>>,
    spec: Arc<Mutex<ServiceSpec>>,
    proxy: Arc<Proxy>,
    stop_proxy: watch::Sender<bool>,
    /// How recent deploys ended, by revision: a deploy's follower finds its own
    /// even when a newer revision started meanwhile.
    outcomes: Mutex<BTreeMap<u64, Outcome>>,
}

impl Service {
    /// The controller, when no rollout holds it; changes that must not interleave
    /// with a rollout (deploy, rollback, scale) go through here.
    fn idle_controller(
        &self,
        name: &str,
    ) -> Result<tokio::sync::OwnedMutexGuard<Controller>, ApiError> {
        self.controller.clone().try_lock_owned().map_err(|_| {
            ApiError(
                ErrorKind::FailedPrecondition,
                format!("{name}: a rollout is already in progress"),
            )
        })
    }
}

/// All services of this daemon.
pub(crate) struct Services {
    dir: PathBuf,
    runtime: Arc<Runtime>,
    store: Arc<Store>,
    local_hosts: Vec<String>,
    map: Mutex<HashMap<String, Arc<Service>>>,
    events: broadcast::Sender<Event>,
    recent: Mutex<Vec<Event>>,
    /// Rollouts asked for by triggers (pushes, polls), started by one worker.
    triggered: tokio::sync::mpsc::UnboundedSender<ServiceSpec>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(ErrorKind::InvalidArgument, msg.into())
}

impl Services {
    pub(crate) fn new(
        dir: PathBuf,
        runtime: Arc<Runtime>,
        store: Arc<Store>,
        local_hosts: Vec<String>,
    ) -> Arc<Self> {
        let _ = std::fs::create_dir_all(&dir);
        let (events, _) = broadcast::channel(1024);
        let (triggered, trigger_rx) = tokio::sync::mpsc::unbounded_channel();
        let me = Arc::new(Self {
            dir,
            runtime,
            store,
            local_hosts,
            map: Mutex::default(),
            events,
            recent: Mutex::default(),
            triggered,
        });
        let rx = me.events.subscribe();
        tokio::spawn(me.clone().keep_recent(rx));
        tokio::spawn(me.clone().trigger_worker(trigger_rx));
        me
    }

    /// Deploys what triggers asked for, waiting out a rollout in progress.
    async fn trigger_worker(
        self: Arc<Self>,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<ServiceSpec>,
    ) {
        while let Some(spec) = rx.recv().await {
            let me = self.clone();
            tokio::spawn(async move {
                for _ in 0..600 {
                    match me.deploy(spec.clone(), None).await {
                        Ok((name, n)) => {
                            tracing::info!(service = %name, revision = n, image = %spec.image, "trigger started a rollout");
                            return;
                        }
                        Err(ApiError(ErrorKind::FailedPrecondition, _)) => {
                            tokio::time::sleep(Duration::from_secs(1)).await
                        }
                        Err(e) => {
                            tracing::error!(service = %spec.name, "triggered rollout refused: {}", e.1);
                            return;
                        }
                    }
                }
            });
        }
    }

    async fn keep_recent(self: Arc<Self>, mut rx: broadcast::Receiver<Event>) {
        while let Ok(e) = rx.recv().await {
            let mut r = lock(&self.recent);
            r.push(e);
            let excess = r.len().saturating_sub(500);
            r.drain(..excess);
        }
    }

    fn persist(&self, name: &str) {
        let Some(svc) = lock(&self.map).get(name).cloned() else {
            return;
        };
        // Under the state lock, like the controller's own writes, so they stay ordered.
        let state = lock(&svc.state);
        write_state(&self.dir, &lock(&svc.spec), &state);
    }

    /// Pins `image` to a digest when it lives in the embedded store.
    /// Pins `image` to a digest: from the embedded store, or asked of the remote
    /// registry it names.
    async fn pin(&self, image: &str) -> Result<String, ApiError> {
        let r = slipway_image::ImageRef::parse(image).map_err(|e| bad(format!("image: {e}")))?;
        if let Some(host) = r.host.as_ref().filter(|h| !self.local_hosts.contains(h)) {
            let digest = remote_digest(host, r.repo.as_str(), &r.reference.to_string())
                .await
                .map_err(|e| ApiError(ErrorKind::NotFound, format!("image: {image}: {e}")))?;
            return Ok(format!("{host}/{}@{digest}", r.repo));
        }
        let meta = self
            .store
            .stat_manifest(&r.repo, &r.reference)
            .map_err(|e| {
                ApiError(
                    ErrorKind::NotFound,
                    format!("image: {image} is not in Slipway's registry: {e}"),
                )
            })?;
        Ok(format!("{}@{}", r.repo, meta.digest))
    }

    /// Polls another registry for a service whose image lives there: a moved tag,
    /// or a new tag matching the trigger, rolls out.
    async fn poll_loop(self: Arc<Self>, svc: Arc<Service>) {
        let mut stop = svc.stop_proxy.subscribe();
        loop {
            let spec = lock(&svc.spec).clone();
            let Some(trigger) = spec.trigger.clone() else {
                return;
            };
            tokio::select! {
                () = tokio::time::sleep(trigger.poll_interval.0) => {}
                _ = stop.changed() => return,
            }
            let Ok(r) = slipway_image::ImageRef::parse(&spec.image) else {
                return;
            };
            let Some(host) = r.host.clone().filter(|h| !self.local_hosts.contains(h)) else {
                return;
            };
            let (current_images, running_tag) = {
                let st = lock(&svc.state);
                let rev = st
                    .active
                    .and_then(|a| st.revisions.iter().find(|x| x.number == a).cloned());
                // The live revision and the newest one (which may be rolling out):
                // finding either's digest again is no change.
                let images: Vec<String> = rev
                    .iter()
                    .chain(st.revisions.last())
                    .map(|x| x.image.clone())
                    .collect();
                (images, rev.map(|x| x.spec.image))
            };
            let candidate = match (&trigger.tag, &trigger.semver, &trigger.regex) {
                (Some(tag), _, _) => Some(tag.clone()),
                _ => {
                    let client = slipway_image::client::RegistryClient::new(&host);
                    let Ok(tags) = client.tags(r.repo.as_str()).await else {
                        continue;
                    };
                    let mut best: Option<String> = None;
                    for t in tags
                        .iter()
                        .filter(|t| trigger_matches(&trigger, t, running_tag.as_deref()))
                    {
                        let better = match (&best, &trigger.semver) {
                            (None, _) => true,
                            (Some(b), Some(_)) => parse_version(t) > parse_version(b),
                            (Some(b), None) => t > b,
                        };
                        if better {
                            best = Some(t.clone());
                        }
                    }
                    best
                }
            };
            let Some(tag) = candidate else { continue };
            let Ok(digest) = remote_digest(&host, r.repo.as_str(), &tag).await else {
                continue;
            };
            if current_images.iter().any(|i| i.ends_with(&digest)) {
                continue;
            }
            let mut next = spec.clone();
            next.image = format!("{host}/{}:{tag}", r.repo);
            tracing::info!(service = %spec.name, "{} changed; rolling out", next.image);
            let _ = self.triggered.send(next);
        }
    }

    async fn create(
        self: &Arc<Self>,
        spec: &ServiceSpec,
        state: ServiceState,
    ) -> Result<Arc<Service>, ApiError> {
        let listener = tokio::net::TcpListener::bind(spec.ingress.listen)
            .await
            .map_err(|e| {
                ApiError(
                    ErrorKind::FailedPrecondition,
                    format!(
                        "ingress.listen: cannot listen on {}: {e}",
                        spec.ingress.listen
                    ),
                )
            })?;
        let balance = match spec.ingress.balance {
            slipway_core::service::BalanceKind::RoundRobin => Balance::RoundRobin,
            slipway_core::service::BalanceKind::LeastRequests => Balance::LeastRequests,
        };
        let proxy = Proxy::new(spec.ingress.hold_timeout.0, balance);
        let (stop_proxy, stop_rx) = watch::channel(false);
        tokio::spawn(proxy.clone().serve(listener, stop_rx));
        let traffic = Arc::new(ProxyTraffic {
            proxy: proxy.clone(),
            backends: Mutex::default(),
        });
        let spec_cell = Arc::new(Mutex::new(spec.clone()));
        let (dir, cell) = (self.dir.clone(), spec_cell.clone());
        let ctl = Controller::new(
            state,
            Arc::new(RuntimeInstances {
                runtime: self.runtime.clone(),
            }),
            Arc::new(Probes {
                runtime: self.runtime.clone(),
            }),
            traffic,
            self.events.clone(),
        )
        .with_persist(Arc::new(move |state: &ServiceState| {
            write_state(&dir, &lock(&cell), state);
        }));
        let svc = Arc::new(Service {
            control: ctl.control(),
            state: ctl.state(),
            controller: Arc::new(tokio::sync::Mutex::new(ctl)),
            spec: spec_cell,
            proxy,
            stop_proxy,
            outcomes: Mutex::default(),
        });
        lock(&self.map).insert(spec.name.clone(), svc.clone());
        tokio::spawn(self.clone().heal_loop(spec.name.clone(), svc.clone()));
        tokio::spawn(self.clone().poll_loop(svc.clone()));
        Ok(svc)
    }

    async fn heal_loop(self: Arc<Self>, name: String, svc: Arc<Service>) {
        let mut stop = svc.stop_proxy.subscribe();
        loop {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
            // Only between rollouts: a rollout holds the controller.
            if let Ok(mut ctl) = svc.controller.try_lock() {
                ctl.heal_once().await;
                ctl.autoscale_once().await;
                drop(ctl);
                self.persist(&name);
            }
        }
    }

    /// Creates or updates a service and starts the rollout in the background.
    pub(crate) async fn deploy(
        self: &Arc<Self>,
        spec: ServiceSpec,
        image_override: Option<String>,
    ) -> Result<(String, u64), ApiError> {
        let image = self
            .pin(image_override.as_deref().unwrap_or(&spec.image))
            .await?;
        let existing = lock(&self.map).get(&spec.name).cloned();
        let svc = match existing {
            Some(svc) => {
                let old = lock(&svc.spec).clone();
                if old.ingress.listen != spec.ingress.listen {
                    return Err(ApiError(
                        ErrorKind::FailedPrecondition,
                        format!(
                            "ingress.listen: the service listens on {}; remove it to change the address",
                            old.ingress.listen
                        ),
                    ));
                }
                svc
            }
            None => {
                self.create(&spec, Controller::empty_state(&spec.name))
                    .await?
            }
        };
        let mut ctl = svc.idle_controller(&spec.name)?;
        let (number, unchanged) = {
            let st = lock(&svc.state);
            let newest = st.revisions.last();
            // The same spec and image as the live revision: nothing to roll out (as
            // `kubectl apply` of an unchanged manifest). After a rollback the newest
            // revision is not the live one, so deploying it again does retry.
            let unchanged = newest
                .filter(|r| st.active == Some(r.number) && r.spec == spec && r.image == image);
            (
                unchanged.map_or_else(|| newest.map_or(1, |r| r.number + 1), |r| r.number),
                unchanged.is_some(),
            )
        };
        if unchanged {
            lock(&svc.outcomes)
                .entry(number)
                .or_insert_with(|| Outcome::Done);
            return Ok((spec.name, number));
        }
        *lock(&svc.spec) = spec.clone();
        let me = self.clone();
        let name = spec.name.clone();
        let svc2 = svc.clone();
        tokio::spawn(async move {
            let outcome = ctl.deploy(spec, image).await;
            drop(ctl);
            {
                let mut outcomes = lock(&svc2.outcomes);
                outcomes.insert(number, outcome);
                while outcomes.len() > 20 {
                    outcomes.pop_first();
                }
            }
            me.persist(&name);
        });
        Ok((
            svc.state.lock().map(|s| s.name.clone()).unwrap_or_default(),
            number,
        ))
    }

    fn get(&self, name: &str) -> Result<Arc<Service>, ApiError> {
        lock(&self.map)
            .get(name)
            .cloned()
            .ok_or_else(|| ApiError(ErrorKind::NotFound, format!("no service named {name:?}")))
    }

    fn describe(svc: &Service) -> serde_json::Value {
        let state = lock(&svc.state).clone();
        let spec = lock(&svc.spec).clone();
        let stats: Vec<serde_json::Value> = svc
            .proxy
            .all_stats()
            .into_iter()
            .map(|(rev, s)| serde_json::json!({"revision": rev, "requests": s.requests, "errors": s.errors, "p99_ms": s.p99_ms()}))
            .collect();
        let outcomes = lock(&svc.outcomes).clone();
        serde_json::json!({
            "name": state.name,
            "ingress": spec.ingress.listen,
            "replicas": spec.replicas,
            "active": state.active,
            "phase": state.phase,
            "weights": state.weights,
            "instances": state.instances,
            "revisions": state.revisions,
            "traffic": stats,
            "last_deploy": outcomes.iter().next_back().map(|(n, o)| serde_json::json!({"revision": n, "result": o})),
            "deploys": outcomes.iter().map(|(n, o)| serde_json::json!({"revision": n, "result": o})).collect::<Vec<_>>(),
        })
    }

    /// Loads persisted services and converges them after a restart.
    pub(crate) async fn recover(self: &Arc<Self>) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(&p) else {
                continue;
            };
            let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let (Ok(spec), Ok(state)) = (
                serde_json::from_value::<ServiceSpec>(doc["spec"].clone()),
                serde_json::from_value::<ServiceState>(doc["state"].clone()),
            ) else {
                tracing::error!(file = %p.display(), "unreadable service state; skipped");
                continue;
            };
            match self.create(&spec, state).await {
                Ok(svc) => {
                    // Containers of this service that its state does not know were being
                    // started when the daemon died: remove them first.
                    let known: Vec<String> = lock(&svc.state)
                        .instances
                        .iter()
                        .map(|i| i.id.clone())
                        .collect();
                    for c in self.runtime.list() {
                        if c.spec.labels.get("slipway.service") == Some(&spec.name)
                            && !known.contains(&c.name)
                        {
                            tracing::info!(container = %c.name, "removing an instance left by an interrupted rollout");
                            let _ = self.runtime.remove(&c.name, true).await;
                        }
                    }
                    svc.controller.lock().await.recover().await;
                    self.persist(&spec.name);
                }
                Err(e) => tracing::error!(service = %spec.name, "cannot recover service: {}", e.1),
            }
        }
    }

    /// Rolls out pushes that match a service's trigger.
    pub(crate) async fn watch_registry(
        self: Arc<Self>,
        mut rx: broadcast::Receiver<RegistryEvent>,
    ) {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let (Action::Push, Some(tag)) = (ev.action, ev.tag.clone()) else {
                continue;
            };
            let candidates: Vec<Arc<Service>> = lock(&self.map).values().cloned().collect();
            for svc in candidates {
                let spec = lock(&svc.spec).clone();
                let Some(trigger) = &spec.trigger else {
                    continue;
                };
                let Ok(r) = slipway_image::ImageRef::parse(&spec.image) else {
                    continue;
                };
                if r.repo.as_str() != ev.repository {
                    continue;
                }
                let current_tag = {
                    let st = lock(&svc.state);
                    st.active.and_then(|a| {
                        st.revisions
                            .iter()
                            .find(|x| x.number == a)
                            .map(|x| x.spec.image.clone())
                    })
                };
                if !trigger_matches(trigger, &tag, current_tag.as_deref()) {
                    continue;
                }
                let mut next = spec.clone();
                next.image = format!("{}:{tag}", ev.repository);
                let _ = self.triggered.send(next);
            }
        }
    }

    /// Appends per-service, per-revision proxy metrics in Prometheus text form.
    pub(crate) fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write;
        // One snapshot per scrape, so the three families agree with each other.
        let stats: Vec<(String, u64, slipway_proxy::Stats)> = lock(&self.map)
            .iter()
            .flat_map(|(name, svc)| {
                svc.proxy
                    .all_stats()
                    .into_iter()
                    .map(|(rev, st)| (name.clone(), rev, st))
            })
            .collect();
        for (family, help, value) in [
            (
                "slipway_proxy_requests_total",
                "Requests through a service's proxy, by revision.",
                (|st| st.requests) as fn(&slipway_proxy::Stats) -> u64,
            ),
            (
                "slipway_proxy_errors_total",
                "5xx answers and failed requests, by revision.",
                |st| st.errors,
            ),
        ] {
            let _ = writeln!(out, "# HELP {family} {help}\n# TYPE {family} counter");
            for (name, rev, st) in &stats {
                let _ = writeln!(
                    out,
                    "{family}{{service=\"{name}\",revision=\"{rev}\"}} {}",
                    value(st)
                );
            }
        }
        out.push_str("# HELP slipway_proxy_request_duration_seconds Latency through the proxy, by revision.\n# TYPE slipway_proxy_request_duration_seconds histogram\n");
        for (name, rev, st) in &stats {
            let mut cumulative = 0;
            for (i, le) in slipway_proxy::BUCKETS_MS.iter().enumerate() {
                cumulative += st.buckets[i];
                let le = if *le == u64::MAX {
                    "+Inf".to_owned()
                } else {
                    format!("{}", *le as f64 / 1000.0)
                };
                let _ = writeln!(
                    out,
                    "slipway_proxy_request_duration_seconds_bucket{{service=\"{name}\",revision=\"{rev}\",le=\"{le}\"}} {cumulative}"
                );
            }
            let _ = writeln!(
                out,
                "slipway_proxy_request_duration_seconds_count{{service=\"{name}\",revision=\"{rev}\"}} {}",
                st.requests
            );
        }
    }

    pub(crate) async fn shutdown(&self) {
        for svc in lock(&self.map).values() {
            svc.stop_proxy.send_replace(true);
        }
    }
}

/// The digest a remote registry serves for `repo:reference`.
async fn remote_digest(host: &str, repo: &str, reference: &str) -> Result<String, String> {
    let client = slipway_image::client::RegistryClient::new(host);
    let (_, bytes) = client
        .get_manifest(repo, reference)
        .await
        .map_err(|e| e.to_string())?;
    Ok(slipway_core::Digest::sha256_of(&bytes).to_string())
}

fn parse_version(tag: &str) -> Option<semver::Version> {
    semver::Version::parse(tag.trim_start_matches('v')).ok()
}

/// Writes `<dir>/<name>.json` atomically (temp file, then rename).
fn write_state(dir: &std::path::Path, spec: &ServiceSpec, state: &ServiceState) {
    let doc = serde_json::json!({ "spec": spec, "state": state });
    let path = dir.join(format!("{}.json", state.name));
    let tmp = dir.join(format!("{}.json.tmp", state.name));
    let written = serde_json::to_vec_pretty(&doc)
        .ok()
        .is_some_and(|b| std::fs::write(&tmp, b).is_ok() && std::fs::rename(&tmp, &path).is_ok());
    if !written {
        tracing::error!(service = %state.name, "cannot persist service state");
    }
}

/// Whether a pushed `tag` should roll out, given the tag the service runs now.
fn trigger_matches(
    t: &slipway_core::service::Trigger,
    tag: &str,
    current_image: Option<&str>,
) -> bool {
    if let Some(exact) = &t.tag {
        return exact == tag;
    }
    if let Some(re) = &t.regex {
        return regex::Regex::new(&format!("^(?:{re})$")).is_ok_and(|r| r.is_match(tag));
    }
    if let Some(range) = &t.semver {
        let (Ok(req), Ok(v)) = (
            semver::VersionReq::parse(range),
            semver::Version::parse(tag.trim_start_matches('v')),
        ) else {
            return false;
        };
        if !req.matches(&v) {
            return false;
        }
        // Never downgrade: only a version above the running one rolls out.
        let current = current_image
            .and_then(|i| i.rsplit_once(':'))
            .and_then(|(_, t)| semver::Version::parse(t.trim_start_matches('v')).ok());
        return current.is_none_or(|c| v > c);
    }
    false
}

// === API ===

pub(crate) fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/api/v1/services", axum::routing::get(list).post(deploy))
        .route(
            "/api/v1/services/{name}",
            axum::routing::get(status).delete(remove),
        )
        .route(
            "/api/v1/services/{name}/rollback",
            axum::routing::post(rollback),
        )
        .route("/api/v1/services/{name}/scale", axum::routing::post(scale))
        .route(
            "/api/v1/services/{name}/{verb}",
            axum::routing::post(control),
        )
        .route("/api/v1/events", axum::routing::get(events))
        .with_state(services)
}

async fn deploy(State(s): State<Arc<Services>>, body: Bytes) -> Result<Response, ApiError> {
    let text =
        std::str::from_utf8(&body).map_err(|_| bad("the service spec must be UTF-8 TOML"))?;
    let spec = ServiceSpec::from_toml(text).map_err(|e| bad(e.to_string()))?;
    let (name, revision) = s.deploy(spec, None).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"service": name, "revision": revision})),
    )
        .into_response())
}

async fn list(State(s): State<Arc<Services>>) -> Response {
    let all: Vec<Arc<Service>> = lock(&s.map).values().cloned().collect();
    let mut v: Vec<serde_json::Value> = all.iter().map(|svc| Services::describe(svc)).collect();
    v.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    axum::Json(v).into_response()
}

async fn status(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let svc = s.get(&name)?;
    Ok(axum::Json(Services::describe(&svc)).into_response())
}

async fn remove(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let svc = s.get(&name)?;
    let mut ctl = svc.controller.lock().await;
    ctl.remove().await;
    drop(ctl);
    svc.stop_proxy.send_replace(true);
    lock(&s.map).remove(&name);
    let _ = std::fs::remove_file(s.dir.join(format!("{name}.json")));
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct RollbackQuery {
    to: Option<u64>,
}

async fn rollback(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
    Query(q): Query<RollbackQuery>,
) -> Result<Response, ApiError> {
    let svc = s.get(&name)?;
    let mut ctl = svc.idle_controller(&name)?;
    let outcome = ctl.rollback(q.to).await;
    drop(ctl);
    s.persist(&name);
    Ok(axum::Json(serde_json::json!({"result": outcome})).into_response())
}

/// `promote`, `abort`, `pause` or `resume` the rollout in progress.
async fn control(
    State(s): State<Arc<Services>>,
    Path((name, verb)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let svc = s.get(&name)?;
    if svc.controller.try_lock().is_ok() {
        return Err(ApiError(
            ErrorKind::FailedPrecondition,
            format!("{name}: no rollout is in progress"),
        ));
    }
    match verb.as_str() {
        "promote" => svc.control.promote(),
        "abort" => svc.control.abort(),
        "pause" => svc.control.pause(),
        "resume" => svc.control.resume(),
        other => {
            return Err(ApiError(
                ErrorKind::NotFound,
                format!("unknown action {other:?}: use promote, abort, pause or resume"),
            ));
        }
    }
    Ok(axum::Json(serde_json::json!({"service": name, "action": verb})).into_response())
}

#[derive(Deserialize)]
struct ScaleQuery {
    replicas: u32,
}

async fn scale(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
    Query(q): Query<ScaleQuery>,
) -> Result<Response, ApiError> {
    if q.replicas == 0 || q.replicas > 100 {
        return Err(bad("replicas: must be between 1 and 100"));
    }
    let svc = s.get(&name)?;
    let mut ctl = svc.idle_controller(&name)?;
    ctl.scale(q.replicas)
        .await
        .map_err(|e| ApiError(ErrorKind::FailedPrecondition, e))?;
    drop(ctl);
    lock(&svc.spec).replicas = q.replicas;
    s.persist(&name);
    Ok(axum::Json(Services::describe(&svc)).into_response())
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
}

/// Recent events as JSON lines; with `follow`, new ones as they happen.
async fn events(State(s): State<Arc<Services>>, Query(q): Query<EventsQuery>) -> Response {
    let rx = s.events.subscribe();
    let recent: Vec<Event> = lock(&s.recent).clone();
    let mut text = String::new();
    for e in &recent {
        text.push_str(&serde_json::to_string(e).unwrap_or_default());
        text.push('\n');
    }
    if !q.follow {
        return text.into_response();
    }
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(text)) });
    let tail = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    return Some((
                        Ok(Bytes::from(format!(
                            "{}\n",
                            serde_json::to_string(&e).unwrap_or_default()
                        ))),
                        rx,
                    ));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    Body::from_stream(head.chain(tail)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triggers_match_exact_tags_regexes_and_semver_without_downgrading() {
        let t = |tag: Option<&str>, semver: Option<&str>, regex: Option<&str>| {
            slipway_core::service::Trigger {
                tag: tag.map(str::to_owned),
                semver: semver.map(str::to_owned),
                regex: regex.map(str::to_owned),
                poll_interval: slipway_core::service::Dur(Duration::from_secs(30)),
            }
        };
        assert!(trigger_matches(
            &t(Some("stable"), None, None),
            "stable",
            None
        ));
        assert!(!trigger_matches(
            &t(Some("stable"), None, None),
            "latest",
            None
        ));
        assert!(trigger_matches(
            &t(None, Some("^1"), None),
            "1.4.0",
            Some("hello:1.2.0")
        ));
        assert!(!trigger_matches(
            &t(None, Some("^1"), None),
            "2.0.0",
            Some("hello:1.2.0")
        ));
        assert!(
            !trigger_matches(&t(None, Some("^1"), None), "1.1.0", Some("hello:1.2.0")),
            "never downgrades"
        );
        assert!(!trigger_matches(
            &t(None, Some("^1"), None),
            "not-a-version",
            None
        ));
        assert!(trigger_matches(
            &t(None, None, Some(r"release-\d+")),
            "release-42",
            None
        ));
        assert!(!trigger_matches(
            &t(None, None, Some(r"release-\d+")),
            "xrelease-42",
            None
        ));
    }
}
