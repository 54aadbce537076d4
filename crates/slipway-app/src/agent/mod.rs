//! The node agent: `slipway agent --join URL --token T --name N --advertise ADDR`
//! runs a service's instances on its node through the runtime, on behalf of the
//! control planes. It is the far side of the controller's `Instances` seam: start,
//! stop, state, list, logs, stats and probes over `/agent/v1/…` (JSON, the join
//! token as bearer). It heartbeats to the control planes with its capacity and a
//! count of its instances' exits, pulls images from their registry with the join
//! token, and keeps its instances running when no control plane answers (as
//! kubelet does): it registers again when one does.
//!
//! Every `slipway serve` on etcd serves the same routes for its own node, so a
//! control plane that runs instances is reached the same way.

pub(crate) mod rpc;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::extract::{Path, Query, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use slipway_controller::{Instance, InstanceError, InstanceSpec, InstanceState, Instances, Prober};
use slipway_core::ErrorKind;
use slipway_core::service::Probe;
use slipway_runtime::Runtime;

use crate::api_error::ApiError;
use crate::services::{Ports, Probes, RuntimeInstances, SecretValues};

/// A node's heartbeat: who it is, where it is reached, what it has.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Beat {
    /// The address instances are reached at (`ADDR:port`).
    pub address: String,
    /// Where its agent API listens (`host:port`).
    pub api: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Cores.
    pub cpus: f64,
    /// Memory, bytes.
    pub memory_bytes: u64,
    /// How many instance exits it has seen (a change wakes the services' healing).
    pub exits: u64,
}

/// The control plane's answer to a heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BeatReply {
    /// Whether the node is cordoned.
    pub cordoned: bool,
}

/// Start one instance.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StartCall {
    pub spec: InstanceSpec,
    /// The values of the secrets it uses, by name.
    pub secrets: BTreeMap<String, Vec<u8>>,
}

/// Stop one instance.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StopCall {
    pub grace_ms: u64,
}

/// Run one check on the node.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ProbeCall {
    pub instance: Instance,
    pub probe: Probe,
}

/// A piece of an instance's log.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct LogPart {
    /// The offset of its first byte in the log.
    pub from: u64,
    /// The bytes (at most 1 MiB).
    pub bytes: Vec<u8>,
}

/// What `/agent/v1/instances/{id}/stats` reports.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct InstanceStats {
    pub pid: Option<u32>,
    pub rss_bytes: u64,
    pub cpu_ms: u64,
}

/// The secret values a start call carried.
struct Given(BTreeMap<String, Vec<u8>>);

impl SecretValues for Given {
    fn version(&self, name: &str, _service: &str) -> Result<u64, String> {
        Err(format!("secret {name}: versions are the control plane's"))
    }
    fn value(&self, name: &str, _service: &str) -> Result<Vec<u8>, String> {
        self.0
            .get(name)
            .cloned()
            .ok_or_else(|| format!("secret {name} was not sent with the instance"))
    }
}

/// What the agent routes need.
#[derive(Clone)]
pub(crate) struct AgentState {
    pub runtime: Arc<Runtime>,
    pub ports: Arc<Ports>,
    pub token: Arc<str>,
}

impl AgentState {
    fn instances(&self, secrets: BTreeMap<String, Vec<u8>>) -> RuntimeInstances {
        RuntimeInstances {
            runtime: self.runtime.clone(),
            ports: self.ports.clone(),
            secrets: Arc::new(Given(secrets)),
        }
    }
}

async fn require_token(State(token): State<Arc<str>>, req: Request, next: Next) -> Response {
    if rpc::bearer_is(req.headers(), &token) {
        next.run(req).await
    } else {
        ApiError::new(
            ErrorKind::Unauthenticated,
            "the agent API needs the cluster's join token as a bearer token",
        )
        .into_response()
    }
}

/// `/agent/v1/…`: a node's instances, for the control planes.
pub(crate) fn router(state: AgentState) -> axum::Router {
    use axum::routing::{get, post};
    let token = state.token.clone();
    axum::Router::new()
        .route("/agent/v1/instances", get(list).post(start))
        .route("/agent/v1/instances/{id}", get(state_of))
        .route("/agent/v1/instances/{id}/stop", post(stop))
        .route("/agent/v1/instances/{id}/logs", get(logs))
        .route("/agent/v1/instances/{id}/stats", get(stats))
        .route("/agent/v1/probe", post(probe))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(token, require_token))
}

async fn start(State(s): State<AgentState>, axum::Json(call): axum::Json<StartCall>) -> Response {
    let r: Result<Instance, InstanceError> = s.instances(call.secrets).start(&call.spec).await;
    axum::Json(r).into_response()
}

async fn stop(
    State(s): State<AgentState>,
    Path(id): Path<String>,
    axum::Json(call): axum::Json<StopCall>,
) -> Response {
    let instance = Instance {
        id,
        revision: 0,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let port = s
        .runtime
        .inspect(&instance.id)
        .ok()
        .and_then(|c| c.spec.port);
    let instance = Instance {
        addr: SocketAddr::from(([127, 0, 0, 1], port.unwrap_or(0))),
        ..instance
    };
    let r = s
        .instances(BTreeMap::new())
        .stop(&instance, Duration::from_millis(call.grace_ms))
        .await;
    axum::Json(r).into_response()
}

async fn state_of(State(s): State<AgentState>, Path(id): Path<String>) -> Response {
    let instance = Instance {
        id,
        revision: 0,
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let st: InstanceState = s.instances(BTreeMap::new()).state(&instance).await;
    axum::Json(st).into_response()
}

#[derive(Deserialize)]
struct ListQuery {
    service: Option<String>,
}

async fn list(State(s): State<AgentState>, Query(q): Query<ListQuery>) -> Response {
    let instances = s.instances(BTreeMap::new());
    let r = match q.service {
        Some(service) => instances.list(&service).await,
        None => Ok(instances.list_all()),
    };
    axum::Json(r).into_response()
}

async fn probe(State(s): State<AgentState>, axum::Json(call): axum::Json<ProbeCall>) -> Response {
    let probes = Probes {
        runtime: s.runtime.clone(),
    };
    let ok = tokio::time::timeout(
        call.probe.timeout.0,
        probes.check(&call.instance, &call.probe),
    )
    .await
    .unwrap_or(false);
    axum::Json(ok).into_response()
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    from: u64,
}

/// At most this much of a log per call.
const LOG_PART: u64 = 1 << 20;

async fn logs(
    State(s): State<AgentState>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let path = match s.runtime.log_path(&id) {
        Ok(p) => p,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let read = async {
        let mut f = tokio::fs::File::open(&path).await?;
        let len = f.metadata().await?.len();
        // Rotation truncates the log: a reader past its end starts over.
        let from = if q.from > len { 0 } else { q.from };
        f.seek(std::io::SeekFrom::Start(from)).await?;
        let mut bytes = Vec::new();
        f.take(LOG_PART).read_to_end(&mut bytes).await?;
        Ok::<_, std::io::Error>(LogPart { from, bytes })
    };
    match read.await {
        Ok(part) => axum::Json(part).into_response(),
        Err(e) => {
            ApiError::new(ErrorKind::NotFound, format!("no log for {id}: {e}")).into_response()
        }
    }
}

async fn stats(State(s): State<AgentState>, Path(id): Path<String>) -> Response {
    let info = match s.runtime.inspect(&id) {
        Ok(i) => i,
        Err(e) => return ApiError::from(e).into_response(),
    };
    axum::Json(info.pid.map_or_else(InstanceStats::default, process_stats)).into_response()
}

/// Resident memory and cpu time of a process, from `/proc`.
fn process_stats(pid: u32) -> InstanceStats {
    let rss_bytes = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024);
    // Fields 14 and 15 (utime, stime) after the command's closing parenthesis.
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let f: Vec<u64> = rest
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            Some(f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0))
        })
        .unwrap_or(0);
    // USER_HZ is 100 on Linux.
    InstanceStats {
        pid: Some(pid),
        rss_bytes,
        cpu_ms: ticks * 10,
    }
}

/// What `slipway agent` runs with.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// Control planes' base URLs (`http://host:port`), tried in turn.
    pub join: Vec<String>,
    /// The cluster's join token.
    pub token: String,
    /// This node's name.
    pub name: String,
    /// The address instances are reached at.
    pub advertise: IpAddr,
    /// Labels for placement constraints.
    pub labels: BTreeMap<String, String>,
    /// Where the agent API listens.
    pub listen: SocketAddr,
    /// Data directory.
    pub data_dir: PathBuf,
    /// The OCI runtime binary.
    pub runtime_binary: String,
    /// Ports handed to instances.
    pub port_range: (u16, u16),
    /// How often it heartbeats.
    pub heartbeat_interval: Duration,
}

/// Parses `--join URL[,URL…]` into base URLs.
pub fn parse_join(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let base = part.strip_prefix("http://").unwrap_or(part);
        if part.starts_with("https://") {
            return Err(format!(
                "--join {part}: https is not supported by agents yet; give the control plane's http:// address"
            ));
        }
        let base = base.trim_end_matches('/');
        if base.is_empty() || base.contains('/') || !base.contains(':') {
            return Err(format!(
                "--join {part:?} must be a control plane's HOST:PORT or http://HOST:PORT"
            ));
        }
        out.push(format!("http://{base}"));
    }
    if out.is_empty() {
        return Err("--join needs at least one control plane, e.g. http://10.0.0.1:5000".into());
    }
    Ok(out)
}

/// The registries of the control planes, tried in turn.
struct JoinSource(Vec<slipway_runtime::image::RemoteSource>);

impl JoinSource {
    /// `f` of the first registry that answers it; else the last one's error.
    async fn first<'a, T, Fut>(
        &'a self,
        f: impl Fn(&'a slipway_runtime::image::RemoteSource) -> Fut,
    ) -> Result<T, slipway_runtime::image::SourceError>
    where
        Fut: std::future::Future<Output = Result<T, slipway_runtime::image::SourceError>>,
    {
        let mut last = None;
        for s in &self.0 {
            match f(s).await {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            slipway_runtime::image::SourceError::NotFound("no control plane to pull from".into())
        }))
    }
}

#[async_trait::async_trait]
impl slipway_runtime::image::ImageSource for JoinSource {
    async fn manifest(
        &self,
        repo: &slipway_core::RepoName,
        reference: &slipway_core::Reference,
    ) -> Result<(String, Vec<u8>), slipway_runtime::image::SourceError> {
        self.first(|s| s.manifest(repo, reference)).await
    }
    async fn blob(
        &self,
        repo: &slipway_core::RepoName,
        digest: &slipway_core::Digest,
    ) -> Result<Vec<u8>, slipway_runtime::image::SourceError> {
        self.first(|s| s.blob(repo, digest)).await
    }
    async fn layer(
        &self,
        repo: &slipway_core::RepoName,
        digest: &slipway_core::Digest,
        cache: &std::path::Path,
    ) -> Result<slipway_runtime::image::LayerBlob, slipway_runtime::image::SourceError> {
        self.first(|s| s.layer(repo, digest, cache)).await
    }
}

/// Cores of this machine.
pub(crate) fn cpu_count() -> f64 {
    #[expect(clippy::cast_precision_loss, reason = "a core count")]
    let n = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    n
}

/// Runs `slipway agent` until `shutdown` resolves; its instances keep running.
pub async fn agent(
    settings: AgentSettings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(SocketAddr),
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&settings.data_dir).with_context(|| {
        format!(
            "cannot create data directory {}",
            settings.data_dir.display()
        )
    })?;
    let mut cfg = slipway_runtime::RuntimeConfig::new(settings.data_dir.join("runtime"));
    cfg.binary = settings.runtime_binary.clone();
    let source = JoinSource(
        settings
            .join
            .iter()
            .map(|base| {
                slipway_runtime::image::RemoteSource::with_token(base, Some(settings.token.clone()))
            })
            .collect(),
    );
    let runtime =
        Runtime::open(cfg, Arc::new(source)).context("cannot open the container runtime")?;
    match runtime.recover().await {
        Ok(0) => {}
        Ok(n) => tracing::info!(containers = n, "recovered containers"),
        Err(e) => tracing::error!("cannot recover containers: {e}"),
    }
    let ports = Arc::new(Ports::new(settings.port_range.0, settings.port_range.1));
    let state = AgentState {
        runtime: runtime.clone(),
        ports,
        token: Arc::from(settings.token.as_str()),
    };
    state.instances(BTreeMap::new()).adopt_ports();
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {}: pick another with --listen",
                settings.listen
            )
        })?;
    let addr = listener.local_addr()?;
    let beat = Beat {
        address: settings.advertise.to_string(),
        api: SocketAddr::new(settings.advertise, addr.port()).to_string(),
        labels: settings.labels.clone(),
        cpus: cpu_count(),
        memory_bytes: crate::nodes::memory_total(),
        exits: 0,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let beats = tokio::spawn(heartbeat(settings.clone(), beat, runtime.clone(), stop_rx));
    tracing::info!(node = %settings.name, "agent listening on {addr}; joining {}", settings.join.join(","));
    on_ready(addr);
    let served = axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = stop_tx.send(true);
    let _ = beats.await;
    // Instances keep running; the next agent re-adopts them.
    runtime.detach();
    served.context("the agent API failed")
}

/// Heartbeats to the control planes until `stop`: a failure moves to the next
/// one, and the node registers again with whichever answers.
async fn heartbeat(
    settings: AgentSettings,
    mut beat: Beat,
    runtime: Arc<Runtime>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let rpc = rpc::Rpc::new(&settings.token);
    let mut exits = runtime.exits();
    let mut which = 0usize;
    let mut connected = None::<bool>;
    loop {
        beat.exits = *exits.borrow_and_update();
        let base = &settings.join[which % settings.join.len()];
        let url = format!("{base}/api/v1/nodes/{}/heartbeat", settings.name);
        let timeout = settings.heartbeat_interval.max(Duration::from_secs(1));
        match rpc
            .call::<BeatReply>(http::Method::POST, &url, Some(&beat), timeout)
            .await
        {
            Ok(_) => {
                if connected != Some(true) {
                    tracing::info!(control_plane = %base, "registered with the control plane");
                }
                connected = Some(true);
            }
            Err(e) => {
                if connected != Some(false) {
                    tracing::warn!(
                        "heartbeat: {e}; instances keep running; trying the control planes again"
                    );
                }
                connected = Some(false);
                which += 1;
            }
        }
        let closed = tokio::select! {
            () = tokio::time::sleep(settings.heartbeat_interval) => false,
            // An instance exited: tell the control plane now.
            r = exits.changed() => r.is_err(),
            _ = stop.wait_for(|s| *s) => return,
        };
        if closed {
            tokio::time::sleep(settings.heartbeat_interval).await;
        }
    }
}
