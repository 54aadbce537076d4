//! The controller's traits, implemented with the real parts: instances are runc
//! containers of the runtime on ports from a range Slipway owns, probes are HTTP,
//! TCP or exec checks, the ingress is the built-in proxy, images are pinned through
//! the embedded store or a remote registry, and the gate checks the platform.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use slipway_controller::{
    Candidate, Gate, Images, Instance, InstanceError, InstanceSpec, InstanceState, Instances,
    Prober, Traffic, TrafficStats,
};
use slipway_core::ErrorKind;
use slipway_core::service::{BalanceKind, Ingress, Probe};
use slipway_proxy::{Backend, Balance, Pool, Proxy, RevisionRoute, RouteTable};
use slipway_runtime::{RunRequest, Runtime, RuntimeError, Status};
use slipway_store::Store;
use tokio::sync::watch;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// === ports ===

/// Instance ports: handed out from a range outside the kernel's ephemeral range
/// (so no outgoing connection, the proxy's included, can hold one), and tracked
/// until the instance is gone. Nothing is probed by binding.
pub(crate) struct Ports {
    first: u16,
    last: u16,
    state: Mutex<(u16, BTreeSet<u16>)>,
}

impl Ports {
    /// Ports `first..=last`, starting at a random place so two daemons on one host
    /// rarely reach for the same port first.
    pub(crate) fn new(first: u16, last: u16) -> Self {
        let span = u32::from(last - first) + 1;
        let offset = uuid::Uuid::new_v4().as_u128() % u128::from(span);
        let cursor = first + u16::try_from(offset).unwrap_or(0);
        Self {
            first,
            last,
            state: Mutex::new((cursor, BTreeSet::new())),
        }
    }

    /// A free port, now taken.
    pub(crate) fn take(&self) -> Option<u16> {
        let mut g = lock(&self.state);
        let (cursor, used) = &mut *g;
        let span = u32::from(self.last - self.first) + 1;
        for _ in 0..span {
            let p = *cursor;
            *cursor = if p == self.last { self.first } else { p + 1 };
            if used.insert(p) {
                return Some(p);
            }
        }
        None
    }

    /// Marks a port as taken (an instance found at startup).
    pub(crate) fn mark(&self, port: u16) {
        lock(&self.state).1.insert(port);
    }

    /// Gives a port back.
    pub(crate) fn release(&self, port: u16) {
        lock(&self.state).1.remove(&port);
    }
}

/// Parses `FIRST-LAST`.
pub(crate) fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} must be FIRST-LAST, e.g. 20000-29999");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let (a, b): (u16, u16) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a == 0 || a > b {
        return Err(bad());
    }
    Ok((a, b))
}

/// The kernel's ephemeral port range, if it can be read.
pub(crate) fn ephemeral_range() -> Option<(u16, u16)> {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(|p| p.parse::<u16>().ok());
    Some((it.next()??, it.next()??))
}

// === instances ===

/// Instances are containers of the runtime, on ports Slipway hands out.
pub(crate) struct RuntimeInstances {
    pub runtime: Arc<Runtime>,
    pub ports: Arc<Ports>,
    pub secrets: Arc<dyn super::SecretValues>,
}

const LABEL_SERVICE: &str = "slipway.service";
const LABEL_REVISION: &str = "slipway.revision";

fn instance_error(e: &RuntimeError) -> InstanceError {
    let m = e.to_string();
    match e {
        RuntimeError::ImageNotFound(_)
        | RuntimeError::NoPlatform(_)
        | RuntimeError::ImageInvalid(_)
        | RuntimeError::Unpack(_)
            if e.kind() != ErrorKind::ResourceExhausted =>
        {
            InstanceError::Image(m)
        }
        RuntimeError::InvalidSpec(_) => InstanceError::Invalid(m),
        RuntimeError::Runc(slipway_runtime::runc::RuncError::Missing(_)) => {
            InstanceError::Unreachable(m)
        }
        _ if e.kind() == ErrorKind::ResourceExhausted => InstanceError::Capacity(m),
        _ => InstanceError::Failed(m),
    }
}

#[async_trait]
impl Instances for RuntimeInstances {
    async fn start(&self, spec: &InstanceSpec) -> Result<Instance, InstanceError> {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..6];
        let name = format!("{}-r{}-{suffix}", spec.service, spec.revision);
        // A port some other process took is skipped (and kept off the list).
        for _ in 0..8 {
            let port = self.ports.take().ok_or_else(|| {
                InstanceError::Capacity("every port of services.port_range is in use".into())
            })?;
            let mut labels = std::collections::BTreeMap::new();
            labels.insert(LABEL_SERVICE.to_owned(), spec.service.clone());
            labels.insert(LABEL_REVISION.to_owned(), spec.revision.to_string());
            let req = RunRequest {
                image: spec.image.clone(),
                name: Some(name.clone()),
                env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                port: Some(port),
                memory: spec.memory.clone(),
                cpus: spec.cpus,
                volumes: spec.volumes.clone(),
                labels,
                stop_signal: spec.stop_signal.clone(),
                cap_add: spec.cap_add.clone(),
                cap_drop: spec.cap_drop.clone(),
                userns: spec.userns,
                ..RunRequest::default()
            };
            let mut secrets = slipway_runtime::Secrets::default();
            for name in &spec.secrets {
                let v = self
                    .secrets
                    .value(name, &spec.service)
                    .map_err(InstanceError::Invalid)?;
                secrets.files.push((name.clone(), v));
            }
            for (var, name) in &spec.secret_env {
                let v = self
                    .secrets
                    .value(name, &spec.service)
                    .map_err(InstanceError::Invalid)?;
                secrets.env.push((var.clone(), v));
            }
            let info = match self.runtime.run_with(req, secrets).await {
                Ok(info) => info,
                Err(RuntimeError::PortInUse(p)) => {
                    tracing::warn!(
                        port = p,
                        "an instance port is held by another process; skipping it"
                    );
                    continue;
                }
                Err(e) => {
                    self.ports.release(port);
                    return Err(instance_error(&e));
                }
            };
            if info.status != Status::Running {
                if let Err(e) = self.runtime.remove(&name, true).await {
                    tracing::warn!(instance = %name, "cannot remove a failed instance: {e}");
                }
                self.ports.release(port);
                return Err(InstanceError::Failed(format!(
                    "instance {name} exited at start ({})",
                    info.message
                        .unwrap_or_else(|| format!("exit code {:?}", info.exit_code))
                )));
            }
            return Ok(Instance {
                id: name,
                revision: spec.revision,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            });
        }
        Err(InstanceError::Capacity(
            "no free port in services.port_range after 8 tries".into(),
        ))
    }

    async fn stop(&self, instance: &Instance, grace: Duration) -> Result<(), InstanceError> {
        let result = match self.runtime.stop(&instance.id, Some(grace)).await {
            Ok(_) => self.runtime.remove(&instance.id, true).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) | Err(RuntimeError::NotFound(_)) => {
                self.ports.release(instance.addr.port());
                Ok(())
            }
            Err(e) => Err(instance_error(&e)),
        }
    }

    async fn state(&self, instance: &Instance) -> InstanceState {
        match self.runtime.inspect(&instance.id) {
            Ok(i) => match i.status {
                Status::Running | Status::Created | Status::Restarting => InstanceState::Running,
                Status::Exited | Status::Stopped => InstanceState::Exited,
            },
            Err(_) => InstanceState::Exited,
        }
    }

    fn exits(&self) -> Option<watch::Receiver<u64>> {
        Some(self.runtime.exits())
    }

    async fn list(&self, service: &str) -> Result<Vec<Instance>, InstanceError> {
        Ok(self.listed(Some(service)))
    }
}

impl RuntimeInstances {
    /// Every instance of every service on this node.
    pub(crate) fn list_all(&self) -> Vec<Instance> {
        self.listed(None)
    }

    fn listed(&self, service: Option<&str>) -> Vec<Instance> {
        self.runtime
            .list()
            .into_iter()
            .filter(|c| {
                c.spec
                    .labels
                    .get(LABEL_SERVICE)
                    .is_some_and(|s| service.is_none_or(|want| s == want))
            })
            .map(|c| Instance {
                revision: c
                    .spec
                    .labels
                    .get(LABEL_REVISION)
                    .and_then(|r| r.parse().ok())
                    .unwrap_or(0),
                addr: SocketAddr::from(([127, 0, 0, 1], c.spec.port.unwrap_or(0))),
                id: c.name,
            })
            .collect()
    }

    /// Marks the ports of every service instance that exists as taken.
    pub(crate) fn adopt_ports(&self) {
        for c in self.runtime.list() {
            if c.spec.labels.contains_key(LABEL_SERVICE)
                && let Some(p) = c.spec.port
            {
                self.ports.mark(p);
            }
        }
    }
}

// === probes ===

/// HTTP, TCP and exec checks.
pub(crate) struct Probes {
    pub runtime: Arc<Runtime>,
}

/// Whether a status line is HTTP/1.x with a 2xx or 3xx code.
fn status_ok(head: &[u8]) -> bool {
    head.len() >= 12
        && head.starts_with(b"HTTP/1.")
        && head[8] == b' '
        && matches!(head[9], b'2' | b'3')
        && head[10].is_ascii_digit()
        && head[11].is_ascii_digit()
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
    s.read_exact(&mut buf).await.is_ok() && status_ok(&buf)
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

// === traffic ===

/// The proxy as a service's ingress. It binds on the first admitted revision and
/// keeps backend identity across tables, so in-flight counts survive republishing.
/// Every ingress is served by the one pool of serving threads.
pub(crate) struct ProxyTraffic {
    pool: Arc<Pool>,
    proxy: Mutex<Option<Bound>>,
    backends: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
    /// With etcd: the table as stored for the other control planes, and the
    /// writer that stores it (`Some(None)` deletes it).
    shared: Mutex<Option<(super::routes::RouteDoc, RouteSink)>>,
}

type RouteSink = watch::Sender<Option<Option<super::routes::RouteDoc>>>;

/// A listening ingress: its proxy, the address it accepts on, and what stops
/// that accept loop.
struct Bound {
    proxy: Arc<Proxy>,
    listen: SocketAddr,
    stop: watch::Sender<bool>,
}

fn balance(b: BalanceKind) -> Balance {
    match b {
        BalanceKind::RoundRobin => Balance::RoundRobin,
        BalanceKind::LeastRequests => Balance::LeastRequests,
    }
}

impl ProxyTraffic {
    /// An ingress not listening yet, served by `pool`.
    pub(crate) fn new(pool: Arc<Pool>) -> Self {
        Self {
            pool,
            proxy: Mutex::default(),
            backends: Mutex::default(),
            shared: Mutex::default(),
        }
    }

    /// Stores every change of this ingress through `sink`, for the other
    /// control planes.
    pub(crate) fn share(&self, sink: RouteSink) {
        *lock(&self.shared) = Some((super::routes::RouteDoc::default(), sink));
    }

    /// Stops storing changes (this process stops; the others keep serving the
    /// stored table).
    pub(crate) fn unshare(&self) {
        lock(&self.shared).take();
    }

    fn store(&self, change: impl FnOnce(&mut super::routes::RouteDoc)) {
        if let Some((doc, sink)) = lock(&self.shared).as_mut() {
            change(doc);
            sink.send_replace(Some(Some(doc.clone())));
        }
    }

    /// Closes the ingress of a service whose actor ended without removing it
    /// (a refused first deploy, which may have bound nothing at all).
    pub(crate) fn close_if_unused(&self) {
        Traffic::close(self);
    }

    /// The proxy, once bound.
    pub(crate) fn proxy(&self) -> Option<Arc<Proxy>> {
        lock(&self.proxy).as_ref().map(|b| b.proxy.clone())
    }

    fn accept(&self, proxy: &Arc<Proxy>, listener: tokio::net::TcpListener) -> watch::Sender<bool> {
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(proxy.clone().serve(self.pool.clone(), listener, stop_rx));
        stop
    }
}

#[async_trait]
impl Traffic for ProxyTraffic {
    async fn configure(&self, ingress: &Ingress) -> Result<(), String> {
        let bind = |addr: SocketAddr| async move {
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {addr}: {e}"))
        };
        let current = lock(&self.proxy)
            .as_ref()
            .map(|b| (b.proxy.clone(), b.listen));
        let proxy = match current {
            Some((proxy, listen)) => {
                if listen != ingress.listen {
                    // Listen on the new address first: if it cannot be had, the
                    // old one keeps serving. Then stop accepting on the old one;
                    // its open connections carry on until they end.
                    let listener = bind(ingress.listen).await?;
                    let stop = self.accept(&proxy, listener);
                    let old = lock(&self.proxy).replace(Bound {
                        proxy: proxy.clone(),
                        listen: ingress.listen,
                        stop,
                    });
                    if let Some(old) = old {
                        old.stop.send_replace(true);
                    }
                }
                proxy
            }
            None => {
                let listener = bind(ingress.listen).await?;
                let proxy = Proxy::new(ingress.hold_timeout.0, balance(ingress.balance));
                let stop = self.accept(&proxy, listener);
                *lock(&self.proxy) = Some(Bound {
                    proxy: proxy.clone(),
                    listen: ingress.listen,
                    stop,
                });
                proxy
            }
        };
        proxy.configure(ingress.hold_timeout.0, balance(ingress.balance));
        proxy.set_retry_methods(&ingress.retry_methods);
        self.store(|d| d.ingress = Some(ingress.clone()));
        Ok(())
    }

    fn publish(&self, routes: &[(u64, u32, Vec<Instance>)]) {
        self.store(|d| {
            d.revisions = routes
                .iter()
                .map(|(rev, w, insts)| (*rev, *w, insts.iter().map(|i| i.addr).collect()))
                .collect();
        });
        let Some(proxy) = self.proxy() else {
            return;
        };
        let mut known = lock(&self.backends);
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
        proxy.set_routes(table);
    }

    fn in_flight(&self, instance: &Instance) -> u64 {
        lock(&self.backends)
            .get(&instance.addr)
            .map_or(0, |b| b.in_flight())
    }

    fn stats(&self, revision: u64) -> TrafficStats {
        let Some(proxy) = self.proxy() else {
            return TrafficStats::default();
        };
        let s = proxy.stats(revision).snapshot();
        TrafficStats {
            requests: s.requests,
            errors: s.errors,
            p99_ms: s.p99_ms(),
        }
    }

    fn retain_stats(&self, keep: &[u64]) {
        if let Some(p) = self.proxy() {
            p.retain_stats(keep);
        }
    }

    fn ejections(&self) -> Option<watch::Receiver<u64>> {
        self.proxy().map(|p| p.ejections())
    }

    fn ejected(&self) -> Vec<SocketAddr> {
        self.proxy()
            .map(|p| p.ejected().iter().map(|b| b.addr).collect())
            .unwrap_or_default()
    }

    fn readmit(&self, addr: SocketAddr) {
        if let Some(b) = lock(&self.backends).get(&addr) {
            b.readmit();
        }
    }

    fn close(&self) {
        if let Some((_, sink)) = lock(&self.shared).as_ref() {
            sink.send_replace(Some(None));
        }
        if let Some(b) = lock(&self.proxy).take() {
            b.stop.send_replace(true);
            b.proxy.close();
        }
    }
}

// === images ===

/// Pins images: from the embedded store, or asked of the registry they name.
pub(crate) struct StoreImages {
    pub store: Arc<Store>,
    pub local_hosts: Vec<String>,
}

impl StoreImages {
    fn remote_host(&self, r: &slipway_image::ImageRef) -> Option<String> {
        r.host.clone().filter(|h| !self.local_hosts.contains(h))
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

#[async_trait]
impl Images for StoreImages {
    async fn pin(&self, image: &str) -> Result<String, InstanceError> {
        let r = slipway_image::ImageRef::parse(image)
            .map_err(|e| InstanceError::Invalid(format!("image: {e}")))?;
        if let Some(host) = self.remote_host(&r) {
            let digest = remote_digest(&host, r.repo.as_str(), &r.reference.to_string())
                .await
                .map_err(|e| InstanceError::Image(format!("{image}: {e}")))?;
            return Ok(format!("{host}/{}@{digest}", r.repo));
        }
        let store = self.store.clone();
        let (repo, reference) = (r.repo.clone(), r.reference.clone());
        let meta = tokio::task::spawn_blocking(move || store.stat_manifest(&repo, &reference))
            .await
            .map_err(|e| InstanceError::Failed(e.to_string()))?
            .map_err(|e| {
                InstanceError::Image(format!("{image} is not in Slipway's registry: {e}"))
            })?;
        Ok(format!("{}@{}", r.repo, meta.digest))
    }

    fn is_remote(&self, image: &str) -> bool {
        slipway_image::ImageRef::parse(image)
            .ok()
            .and_then(|r| self.remote_host(&r))
            .is_some()
    }

    async fn tags(&self, image: &str) -> Result<Vec<String>, String> {
        let r = slipway_image::ImageRef::parse(image).map_err(|e| e.to_string())?;
        let host = self
            .remote_host(&r)
            .ok_or_else(|| format!("{image} is in Slipway's own registry"))?;
        slipway_image::client::RegistryClient::new(&host)
            .tags(r.repo.as_str())
            .await
            .map_err(|e| e.to_string())
    }
}

// === image source ===

/// The runtime reads images of the embedded registry straight from the store (no
/// HTTP), and only what the repository links: a blob pushed to another repository
/// is not readable through this one.
pub(crate) struct StoreSource(pub Arc<Store>);

fn source_error(e: slipway_store::StoreError) -> slipway_runtime::image::SourceError {
    use slipway_runtime::image::SourceError;
    match e.kind() {
        ErrorKind::NotFound => SourceError::NotFound(e.to_string()),
        _ => SourceError::Io(
            "read the store".into(),
            std::io::Error::other(e.to_string()),
        ),
    }
}

#[async_trait]
impl slipway_runtime::image::ImageSource for StoreSource {
    async fn manifest(
        &self,
        repo: &slipway_core::RepoName,
        reference: &slipway_core::Reference,
    ) -> Result<(String, Vec<u8>), slipway_runtime::image::SourceError> {
        let (store, repo, reference) = (self.0.clone(), repo.clone(), reference.clone());
        tokio::task::spawn_blocking(move || store.get_manifest(&repo, &reference))
            .await
            .map_err(|e| {
                slipway_runtime::image::SourceError::Io(
                    "store task".into(),
                    std::io::Error::other(e),
                )
            })?
            .map(|(meta, bytes)| (meta.media_type, bytes.to_vec()))
            .map_err(source_error)
    }

    async fn blob(
        &self,
        repo: &slipway_core::RepoName,
        digest: &slipway_core::Digest,
    ) -> Result<Vec<u8>, slipway_runtime::image::SourceError> {
        let (store, repo, digest) = (self.0.clone(), repo.clone(), digest.clone());
        tokio::task::spawn_blocking(move || {
            store.stat_blob(&repo, &digest).map_err(source_error)?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(
                &mut store.open_blob(&digest).map_err(source_error)?,
                &mut bytes,
            )
            .map_err(|e| {
                slipway_runtime::image::SourceError::Io(format!("read blob {digest}"), e)
            })?;
            Ok(bytes)
        })
        .await
        .map_err(|e| {
            slipway_runtime::image::SourceError::Io("store task".into(), std::io::Error::other(e))
        })?
    }

    async fn layer(
        &self,
        repo: &slipway_core::RepoName,
        digest: &slipway_core::Digest,
        cache: &std::path::Path,
    ) -> Result<slipway_runtime::image::LayerBlob, slipway_runtime::image::SourceError> {
        let (store, repo, digest) = (self.0.clone(), repo.clone(), digest.clone());
        let cache = cache.to_owned();
        tokio::task::spawn_blocking(move || {
            store.stat_blob(&repo, &digest).map_err(source_error)?;
            match store.open_blob(&digest).map_err(source_error)? {
                slipway_store::BlobRead::File(file) => {
                    Ok(slipway_runtime::image::LayerBlob { file, temp: None })
                }
                // Blobs elsewhere are downloaded first, as a remote registry's are.
                slipway_store::BlobRead::Stream(mut r) => {
                    let io = |e| {
                        slipway_runtime::image::SourceError::Io(format!("download {digest}"), e)
                    };
                    std::fs::create_dir_all(&cache).map_err(io)?;
                    let path = cache.join(format!("{}.{}", digest.hex(), uuid::Uuid::new_v4()));
                    let copied = std::fs::File::create(&path)
                        .and_then(|mut f| std::io::copy(&mut r, &mut f))
                        .and_then(|_| std::fs::File::open(&path));
                    match copied {
                        Ok(file) => Ok(slipway_runtime::image::LayerBlob {
                            file,
                            temp: Some(path),
                        }),
                        Err(e) => {
                            let _ = std::fs::remove_file(&path);
                            Err(io(e))
                        }
                    }
                }
            }
        })
        .await
        .map_err(|e| {
            slipway_runtime::image::SourceError::Io("store task".into(), std::io::Error::other(e))
        })?
    }
}

// === gates ===

/// The one gate today: the image must resolve to a linux/amd64 manifest.
pub(crate) struct PlatformGate {
    pub runtime: Arc<Runtime>,
}

#[async_trait]
impl Gate for PlatformGate {
    async fn admit(&self, c: &Candidate<'_>) -> Result<(), String> {
        slipway_runtime::security::capabilities(&c.spec.cap_add, &c.spec.cap_drop)
            .map_err(|e| e.to_string())?;
        self.runtime
            .resolve(c.image)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_handed_out_once_until_released() {
        let p = Ports::new(20_000, 20_002);
        let mut got: Vec<u16> = (0..3).filter_map(|_| p.take()).collect();
        got.sort_unstable();
        assert_eq!(got, [20_000, 20_001, 20_002]);
        assert_eq!(p.take(), None, "the range is exhausted");
        p.release(20_001);
        assert_eq!(p.take(), Some(20_001));
        assert_eq!(parse_range("20000-29999"), Ok((20_000, 29_999)));
        assert!(parse_range("300-200").is_err());
        assert!(parse_range("x").is_err());
    }

    #[test]
    fn probe_status_lines_accept_http_1_0_and_1_1_with_2xx_or_3xx() {
        assert!(status_ok(b"HTTP/1.1 200"));
        assert!(status_ok(b"HTTP/1.0 204"));
        assert!(status_ok(b"HTTP/1.0 301"));
        assert!(!status_ok(b"HTTP/1.1 404"));
        assert!(!status_ok(b"HTTP/1.1 500"));
        assert!(!status_ok(b"SSH-2.0-Open"));
    }
}
