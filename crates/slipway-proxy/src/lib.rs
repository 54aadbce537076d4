//! The data plane: one reverse proxy per service ingress.
//!
//! The controller publishes whole [`RouteTable`] snapshots; the proxy swaps them
//! atomically and never blocks a request on the controller. Within a table,
//! revisions are chosen by weight and backends within a revision round-robin.
//!
//! - A backend removed from the table (or marked draining) gets no new requests;
//!   its in-flight count tells the controller when it is idle.
//! - GET and HEAD are retried on another backend after a connection failure.
//! - With no backend at all, requests wait (up to the hold timeout) for one.
//! - Upgrades (WebSocket) and streamed bodies (SSE) pass through; an open one keeps
//!   its backend busy until it ends.
//! - `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Request-Id` are set.
//! - Per revision: requests, errors (5xx and failures) and a latency histogram.
//!
//! **Architecture invariant:** this crate knows routes and backends, not
//! deployments.

mod metrics;

pub use metrics::{BUCKETS_MS, RevisionStats, Stats};

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, hyper::Error>;
type Sender = hyper::client::conn::http1::SendRequest<Body>;
type ClientConn = hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Body>;

/// Why forwarding failed, with the request when it was never sent.
struct Failure {
    unsent: Option<Request<Body>>,
    message: String,
}

/// One HTTP/1 connection to a backend. It has no task of its own: whoever uses it
/// drives it, first the request handler until the response head arrives, then the
/// response body as the client reads it. That saves a task wake-up and a channel hop
/// per request, the largest per-request cost after the kernel's.
struct Upstream {
    sender: Sender,
    conn: ClientConn,
}

impl Upstream {
    /// Polls the connection; `true` once it has closed (or failed) for good.
    fn drive(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        std::pin::Pin::new(&mut self.conn).poll(cx).is_ready()
    }

    /// Opens a connection to `addr`, ready for a request.
    async fn connect(addr: SocketAddr) -> Result<Self, String> {
        let stream = match tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(format!("connect: {e}")),
            Err(_) => return Err("connect timed out".into()),
        };
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut up = Self { sender, conn };
        if !up.ready().await {
            return Err("connection closed before the request".into());
        }
        Ok(up)
    }

    /// Waits until the connection can take a request; `false` when it has closed.
    async fn ready(&mut self) -> bool {
        std::future::poll_fn(|cx| {
            if self.drive(cx) {
                return std::task::Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` and drives the connection until the response head arrives.
    async fn send(
        &mut self,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, hyper::client::conn::TrySendError<Request<Body>>> {
        let mut response = std::pin::pin!(self.sender.try_send_request(req));
        let mut closed = false;
        std::future::poll_fn(|cx| {
            // After the connection ends, the response future resolves on its own.
            if !closed {
                closed = self.drive(cx);
            }
            response.as_mut().poll(cx)
        })
        .await
    }
}

/// The current thread's id, without touching its `Thread` handle's refcount.
fn this_thread() -> std::thread::ThreadId {
    thread_local!(static ID: std::thread::ThreadId = std::thread::current().id());
    ID.with(|id| *id)
}

/// One instance the proxy can send requests to.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    authority: http::uri::Authority,
    in_flight: AtomicU64,
    draining: AtomicBool,
    /// Idle connections, each with its last response fully read, tagged with the
    /// proxy thread whose I/O driver owns the socket.
    idle: std::sync::Mutex<Vec<(std::thread::ThreadId, Upstream)>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Upstream")
    }
}

impl Backend {
    /// A backend at `addr`.
    pub fn new(addr: SocketAddr) -> Arc<Self> {
        let authority = addr
            .to_string()
            .parse()
            .unwrap_or_else(|_| http::uri::Authority::from_static("127.0.0.1"));
        Arc::new(Self {
            addr,
            authority,
            in_flight: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            idle: std::sync::Mutex::default(),
        })
    }

    /// The most recently used idle connection of this thread.
    fn take_idle(&self) -> Option<Upstream> {
        let me = this_thread();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = idle.iter().rposition(|(t, _)| *t == me)?;
        Some(idle.swap_remove(i).1)
    }

    fn put_idle(&self, up: Upstream) {
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if idle.len() < 1024 {
            idle.push((this_thread(), up));
        }
    }

    /// Requests (and open streams or upgrades) currently being served.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Stops new requests from reaching this backend.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether it is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// One revision's share of traffic.
#[derive(Debug, Clone)]
pub struct RevisionRoute {
    /// Revision number.
    pub revision: u64,
    /// Relative weight (0 = no traffic unless forced by header).
    pub weight: u32,
    /// Its ready backends.
    pub backends: Vec<Arc<Backend>>,
}

/// What the proxy routes by: a snapshot published by the controller.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    /// Revisions with their weights and backends.
    pub revisions: Vec<RevisionRoute>,
}

/// Balancing within a revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Balance {
    /// Each backend in turn.
    #[default]
    RoundRobin = 0,
    /// The backend with the fewest requests in flight.
    LeastRequests = 1,
}

/// A running proxy.
pub struct Proxy {
    table: RwLock<Arc<RouteTable>>,
    changed: watch::Sender<u64>,
    counter: AtomicU64,
    client: Client<HttpConnector, Body>,
    /// How long a request waits for a backend, ms; changed in place.
    hold_ms: AtomicU64,
    /// 0: round robin, 1: least requests; changed in place.
    balance: std::sync::atomic::AtomicU8,
    stats: RwLock<HashMap<u64, Arc<RevisionStats>>>,
    /// Request ids are `<boot>-<counter>`: unique per process run, no syscall.
    boot: u64,
    ids: AtomicU64,
}

/// Header that pins a request to a revision (previews, A/B tests).
pub const REVISION_HEADER: &str = "x-slipway-revision";
/// Cookie that pins a request to a revision.
pub const REVISION_COOKIE: &str = "slipway-revision";

struct InFlight(Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The request's URI re-aimed at `backend`, keeping path and query.
fn backend_uri(backend: &Backend, uri: &http::Uri) -> http::Uri {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(backend.authority.clone());
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    http::Uri::from_parts(parts).unwrap_or_default()
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and the headers
/// it names, `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`,
/// `Transfer-Encoding` and `Upgrade`. hyper frames each hop's body itself.
fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    if let Some(listed) = h.get(header::CONNECTION).cloned()
        && let Ok(listed) = listed.to_str()
    {
        for name in listed.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            h.remove(name);
        }
    }
    for name in [
        header::CONNECTION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        h.remove(name);
    }
    h.remove("keep-alive");
    h.remove("proxy-connection");
}

fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

impl Proxy {
    /// A proxy holding requests up to `hold` when no backend is ready.
    pub fn new(hold: Duration, balance: Balance) -> Arc<Self> {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(http);
        Arc::new(Self {
            table: RwLock::new(Arc::new(RouteTable::default())),
            changed: watch::channel(0).0,
            counter: AtomicU64::new(0),
            client,
            hold_ms: AtomicU64::new(u64::try_from(hold.as_millis()).unwrap_or(u64::MAX)),
            balance: std::sync::atomic::AtomicU8::new(balance as u8),
            stats: RwLock::default(),
            boot: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| {
                    u64::try_from(d.as_nanos() & u128::from(u64::MAX)).unwrap_or(0)
                }),
            ids: AtomicU64::new(0),
        })
    }

    /// Changes the hold timeout and the balancing of the running proxy; open
    /// connections and requests in flight are untouched.
    pub fn configure(&self, hold: Duration, balance: Balance) {
        self.hold_ms.store(
            u64::try_from(hold.as_millis()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        self.balance.store(balance as u8, Ordering::Relaxed);
    }

    /// The current hold timeout and balancing.
    pub fn settings(&self) -> (Duration, Balance) {
        let balance = match self.balance.load(Ordering::Relaxed) {
            1 => Balance::LeastRequests,
            _ => Balance::RoundRobin,
        };
        (
            Duration::from_millis(self.hold_ms.load(Ordering::Relaxed)),
            balance,
        )
    }

    /// Forgets the counters of revisions not in `keep`, so they do not grow with
    /// every revision ever deployed.
    pub fn retain_stats(&self, keep: &[u64]) {
        self.stats
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|r, _| keep.contains(r));
    }

    /// Swaps in a new route table. Backends that left it should be drained by the
    /// caller, which waits for their in-flight count to reach zero.
    pub fn set_routes(&self, table: RouteTable) {
        {
            let mut stats = self
                .stats
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for r in &table.revisions {
                stats.entry(r.revision).or_default();
            }
        }
        *self
            .table
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(table);
        self.changed.send_modify(|v| *v += 1);
    }

    /// The current table.
    pub fn routes(&self) -> Arc<RouteTable> {
        self.table
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Counters of one revision (created on first use).
    pub fn stats(&self, revision: u64) -> Arc<RevisionStats> {
        if let Some(s) = self
            .stats
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&revision)
        {
            return s.clone();
        }
        self.stats
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(revision)
            .or_default()
            .clone()
    }

    /// Counters of every revision seen.
    pub fn all_stats(&self) -> Vec<(u64, Stats)> {
        let stats = self
            .stats
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<_> = stats.iter().map(|(r, s)| (*r, s.snapshot())).collect();
        v.sort_by_key(|(r, _)| *r);
        v
    }

    fn pinned_revision(req: &Request<Incoming>) -> Option<u64> {
        if let Some(v) = req
            .headers()
            .get(REVISION_HEADER)
            .and_then(|v| v.to_str().ok())
        {
            return v.trim().parse().ok();
        }
        req.headers()
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|c| c.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == REVISION_COOKIE).then(|| v.parse().ok())?
            })
    }

    /// Picks a backend, skipping `avoid`; `None` when nothing is available.
    fn pick(&self, pinned: Option<u64>, avoid: &[SocketAddr]) -> Option<(u64, Arc<Backend>)> {
        let table = self.routes();
        let usable = |r: &RevisionRoute| {
            r.backends
                .iter()
                .any(|b| !b.is_draining() && !avoid.contains(&b.addr))
        };
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let rev = match pinned.and_then(|p| {
            table
                .revisions
                .iter()
                .find(|r| r.revision == p && usable(r))
        }) {
            Some(r) => r,
            None => {
                let total: u64 = table
                    .revisions
                    .iter()
                    .filter(|r| usable(r))
                    .map(|r| u64::from(r.weight))
                    .sum();
                if total == 0 {
                    table.revisions.iter().find(|r| usable(r))?
                } else {
                    // Weighted choice spread evenly over a cycle of `total` requests.
                    let mut point = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 16) % total;
                    let mut chosen = None;
                    for r in table.revisions.iter().filter(|r| usable(r)) {
                        let w = u64::from(r.weight);
                        if point < w {
                            chosen = Some(r);
                            break;
                        }
                        point -= w;
                    }
                    chosen?
                }
            }
        };
        // No allocation on this path: count, then walk to the chosen one.
        let usable_backend = |b: &&Arc<Backend>| !b.is_draining() && !avoid.contains(&b.addr);
        let b = match self.settings().1 {
            Balance::RoundRobin => {
                let count = rev.backends.iter().filter(usable_backend).count();
                rev.backends
                    .iter()
                    .filter(usable_backend)
                    .nth(usize::try_from(n).unwrap_or(0) % count.max(1))?
            }
            Balance::LeastRequests => rev
                .backends
                .iter()
                .filter(usable_backend)
                .min_by_key(|b| b.in_flight())?,
        };
        Some((rev.revision, (*b).clone()))
    }

    async fn wait_for_backend(&self, pinned: Option<u64>) -> Option<(u64, Arc<Backend>)> {
        if let Some(p) = self.pick(pinned, &[]) {
            return Some(p);
        }
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.settings().0;
        loop {
            if let Some(p) = self.pick(pinned, &[]) {
                return Some(p);
            }
            // Re-check at least every 50 ms: a draining flag flips without a table change.
            let step = tokio::time::sleep(Duration::from_millis(50));
            tokio::select! {
                _ = rx.changed() => {}
                () = step => {}
                () = tokio::time::sleep_until(deadline) => return self.pick(pinned, &[]),
            }
        }
    }

    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Infallible> {
        let start = tokio::time::Instant::now();
        let pinned = Self::pinned_revision(&req);
        let Some((mut revision, mut backend)) = self.wait_for_backend(pinned).await else {
            return Ok(text(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend"));
        };
        // Forwarding headers.
        let h = req.headers_mut();
        let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(prev) => format!("{prev}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&xff) {
            h.insert("x-forwarded-for", v);
        }
        h.insert("x-forwarded-proto", HeaderValue::from_static("http"));
        if !h.contains_key("x-request-id")
            && let Ok(v) = HeaderValue::from_str(&format!(
                "{:x}-{:x}",
                self.boot,
                self.ids.fetch_add(1, Ordering::Relaxed)
            ))
        {
            h.insert("x-request-id", v);
        }
        let upgrade = req.headers().contains_key(header::UPGRADE);
        if upgrade {
            return Ok(self.upgrade(req, revision, backend, start).await);
        }
        let authority = req.uri().authority().cloned();
        let (mut parts, body) = req.into_parts();
        // HTTP/1 backends get origin-form URIs and a Host header (h2 clients send none).
        if !parts.headers.contains_key(header::HOST)
            && let Some(a) = authority
                .as_ref()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, a);
        }
        parts.uri = parts
            .uri
            .path_and_query()
            .cloned()
            .map_or_else(|| http::Uri::from_static("/"), http::Uri::from);
        strip_hop_by_hop(&mut parts.headers);
        // The client's hop keeps its own version whatever the backend speaks.
        let client_version = parts.version;
        let mut req = Request::from_parts(parts, body.boxed());
        let mut tried = Vec::new();
        loop {
            backend.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(backend.clone());
            match Self::forward(&backend, req).await {
                Ok((resp, upstream)) => {
                    let (mut rparts, rbody) = resp.into_parts();
                    // The backend closing its connection says nothing about the
                    // client's: hop-by-hop headers stay on their hop.
                    strip_hop_by_hop(&mut rparts.headers);
                    rparts.version = client_version;
                    self.stats(revision)
                        .record(rparts.status.is_server_error(), start.elapsed());
                    // The in-flight guard lives as long as the response body streams; the
                    // connection goes back to the pool once the body has ended.
                    let body = GuardedBody {
                        inner: rbody,
                        upstream: Some(upstream),
                        guard,
                    };
                    return Ok(Response::from_parts(rparts, body.boxed()));
                }
                Err(failure) => {
                    drop(guard);
                    tried.push(backend.addr);
                    tracing::debug!(backend = %backend.addr, "proxy request failed: {}", failure.message);
                    // A request that was never sent can go to another backend, whatever
                    // its method: nothing of it reached the failed one.
                    if let Some(unsent) = failure.unsent
                        && tried.len() < 3
                        && let Some((r, b)) = self.pick(pinned, &tried)
                    {
                        revision = r;
                        backend = b;
                        req = unsent;
                        continue;
                    }
                    self.stats(revision).record(true, start.elapsed());
                    return Ok(text(StatusCode::BAD_GATEWAY, "backend failed"));
                }
            }
        }
    }

    /// Sends `req` to `backend` over one of its idle connections, or a new one.
    async fn forward(
        backend: &Backend,
        mut req: Request<Body>,
    ) -> Result<(Response<Incoming>, Upstream), Failure> {
        while let Some(mut up) = backend.take_idle() {
            // An idle connection is ready at once unless the backend closed it.
            if !up.ready().await {
                continue;
            }
            match up.send(req).await {
                Ok(resp) => return Ok((resp, up)),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent, // a stale connection: try the next one
                    None => {
                        return Err(Failure {
                            unsent: None,
                            message: e.into_error().to_string(),
                        });
                    }
                },
            }
        }
        let mut up = match Upstream::connect(backend.addr).await {
            Ok(up) => up,
            Err(message) => {
                return Err(Failure {
                    unsent: Some(req),
                    message,
                });
            }
        };
        match up.send(req).await {
            Ok(resp) => Ok((resp, up)),
            Err(mut e) => Err(Failure {
                unsent: e.take_message(),
                message: e.into_error().to_string(),
            }),
        }
    }

    async fn upgrade(
        &self,
        mut req: Request<Incoming>,
        revision: u64,
        backend: Arc<Backend>,
        start: tokio::time::Instant,
    ) -> Response<Body> {
        backend.in_flight.fetch_add(1, Ordering::AcqRel);
        let guard = InFlight(backend.clone());
        let client_upgrade = hyper::upgrade::on(&mut req);
        let (parts, _) = req.into_parts();
        let mut out = Request::from_parts(
            parts.clone(),
            Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed(),
        );
        *out.uri_mut() = backend_uri(&backend, &parts.uri);
        let mut resp = match self.client.request(out).await {
            Ok(r) => r,
            Err(_) => {
                self.stats(revision).record(true, start.elapsed());
                return text(StatusCode::BAD_GATEWAY, "backend failed");
            }
        };
        self.stats(revision)
            .record(resp.status().is_server_error(), start.elapsed());
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let backend_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                let _guard = guard;
                if let (Ok(c), Ok(b)) = (client_upgrade.await, backend_upgrade.await) {
                    let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
                }
            });
        }
        let (p, b) = resp.into_parts();
        Response::from_parts(p, b.boxed())
    }

    /// Serves on `listener` until `shutdown` fires, then lets open requests finish
    /// (up to 5 s).
    ///
    /// Connections are served by one single-threaded runtime per core. A
    /// connection and its backend connections stay on one thread, so no request
    /// crosses threads (the model of HAProxy and pingora); with the shared
    /// work-stealing pool, wake-ups between workers cost every request. This loop
    /// accepts and hands each connection to the thread with the fewest open ones,
    /// which keeps the cores evenly loaded (a shared accept is first come, first
    /// served, and often left one thread with most of the connections).
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
        let mut workers = Vec::new();
        let mut done = Vec::new();
        for i in 0..threads {
            match self.clone().spawn_worker(i) {
                Ok((worker, finished)) => {
                    workers.push(worker);
                    done.push(finished);
                }
                Err(e) => tracing::error!("proxy: cannot start serving thread {i}: {e}"),
            }
        }
        loop {
            let (stream, peer) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(_) => { tokio::time::sleep(Duration::from_millis(20)).await; continue; }
                },
                _ = shutdown.changed() => break,
            };
            let Ok(mut stream) = stream.into_std() else {
                continue;
            };
            // A thread that ended (it cannot, short of a bug) leaves the rotation
            // rather than swallowing every connection it would be handed.
            loop {
                let Some(worker) = workers
                    .iter()
                    .min_by_key(|w| w.open.load(Ordering::Relaxed))
                else {
                    tracing::error!("proxy: no serving thread left");
                    break;
                };
                worker.open.fetch_add(1, Ordering::Relaxed);
                match worker.tx.send((stream, peer)) {
                    Ok(()) => break,
                    Err(tokio::sync::mpsc::error::SendError((back, _))) => {
                        stream = back;
                        workers.retain(|w| !w.tx.is_closed());
                    }
                }
            }
            if workers.is_empty() {
                break;
            }
        }
        drop(listener);
        drop(workers); // closes the hand-off channels: each thread drains and ends
        for finished in done {
            let _ = finished.await;
        }
    }

    /// Starts serving thread `i`; the receiver resolves when it has ended.
    fn spawn_worker(
        self: Arc<Self>,
        i: usize,
    ) -> std::io::Result<(Worker, tokio::sync::oneshot::Receiver<()>)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (finished_tx, finished) = tokio::sync::oneshot::channel();
        let open = Arc::new(AtomicUsize::new(0));
        let count = open.clone();
        std::thread::Builder::new()
            .name(format!("slipway-proxy-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
                    while let Some((stream, peer)) = rx.recv().await {
                        self.clone()
                            .serve_connection(stream, peer, &graceful, &count);
                    }
                    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
                });
                drop(finished_tx);
            })?;
        Ok((Worker { tx, open }, finished))
    }

    fn serve_connection(
        self: Arc<Self>,
        stream: std::net::TcpStream,
        peer: SocketAddr,
        graceful: &hyper_util::server::graceful::GracefulShutdown,
        open: &Arc<AtomicUsize>,
    ) {
        let open = OpenConnection(open.clone());
        let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        let svc = hyper::service::service_fn(move |req| self.clone().handle(req, peer));
        let conn = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _open = open;
            let _ = conn.await;
        });
    }
}

/// A serving thread: where to hand it connections, and how many it has open.
struct Worker {
    tx: tokio::sync::mpsc::UnboundedSender<(std::net::TcpStream, SocketAddr)>,
    open: Arc<AtomicUsize>,
}

/// Counts a connection as open on its thread until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its backend counted as busy until it ends, and drives
/// the backend connection that delivers it. Once the body has ended, the connection
/// goes back to the backend's idle list.
struct GuardedBody {
    inner: Incoming,
    upstream: Option<Upstream>,
    guard: InFlight,
}

impl GuardedBody {
    fn release(&mut self) {
        if let Some(up) = self.upstream.take() {
            self.guard.0.put_idle(up);
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        // The server stops polling once `is_end_stream` says so; a body read to its
        // end leaves its connection ready for the next request. One dropped half-way
        // (the client went away) takes its connection with it.
        if hyper::body::Body::is_end_stream(&self.inner) {
            self.release();
        }
    }
}

impl hyper::body::Body for GuardedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(up) = this.upstream.as_mut()
            && up.drive(cx)
        {
            // Closed: what it read is already in `inner`; it cannot be reused.
            this.upstream = None;
        }
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) {
            this.release();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
