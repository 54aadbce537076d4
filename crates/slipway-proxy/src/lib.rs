//! The data plane: one reverse proxy per service ingress, all served by one
//! [`Pool`] of threads.
//!
//! The controller publishes whole [`RouteTable`] snapshots; the proxy swaps them
//! atomically and never blocks a request on the controller. Within a table,
//! revisions are chosen by weight and backends within a revision round-robin or by
//! fewest requests in flight.
//!
//! Code map: `routes.rs` (backends, tables, picking), `forward.rs` (one request),
//! `upstream.rs` (the HTTP/1.1 client for backends: pooled connections, response
//! heads, and the response body that reads the socket and returns its connection),
//! `serve.rs` (the shared pool, accept loops and the connection hand-off),
//! `budget.rs` (the retry budget), `metrics.rs`.
//!
//! - A backend removed from the table (or marked draining) gets no new requests;
//!   its in-flight count tells the controller when it is idle.
//! - A request that never reached a backend (connect failure, stale pooled
//!   connection) is sent to another one, whatever its method.
//! - A request that reached a backend which then failed before answering (reset,
//!   closed) is sent to another one when its method is in the ingress's retry
//!   methods (GET, HEAD, OPTIONS by default) and its body was small enough to
//!   keep (64 KiB), within the retry budget (20% of the last 10 s's requests,
//!   plus 10). The failed attempt counts as an error and a retry of its revision.
//! - A backend whose fresh connection fails leaves routing at once (passive
//!   health) until [`Backend::readmit`]; when every backend has failed, they are
//!   used anyway rather than refusing every request.
//! - Hop-by-hop headers stay on their hop, and the client's HTTP version is kept.
//! - With no backend at all, requests wait (up to the hold timeout) for one.
//! - Upgrades (WebSocket) and streamed bodies (SSE) pass through; an open one keeps
//!   its backend busy until it ends.
//! - `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Request-Id` are set.
//! - Per revision: requests, errors (5xx and failures) and a latency histogram.
//!
//! **Architecture invariant:** this crate knows routes and backends, not
//! deployments.

mod budget;
mod forward;
mod metrics;
mod routes;
mod serve;
mod upstream;

pub use metrics::{BUCKETS_MS, RevisionStats, Stats};
pub use routes::{Backend, Balance, RevisionRoute, RouteTable};
pub use serve::Pool;

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

pub(crate) type Body = BoxBody<Bytes, upstream::BoxError>;

/// A running proxy.
pub struct Proxy {
    pub(crate) table: RwLock<Arc<RouteTable>>,
    pub(crate) changed: watch::Sender<u64>,
    pub(crate) counter: AtomicU64,
    pub(crate) client: Client<HttpConnector, Body>,
    /// How long a request waits for a backend, ms; changed in place.
    pub(crate) hold_ms: AtomicU64,
    /// 0: round robin, 1: least requests; changed in place.
    pub(crate) balance: std::sync::atomic::AtomicU8,
    pub(crate) stats: RwLock<HashMap<u64, Arc<RevisionStats>>>,
    /// Request ids are `<boot>-<counter>`: unique per process run, no syscall.
    pub(crate) boot: u64,
    pub(crate) ids: AtomicU64,
    /// Set by [`Proxy::close`]: accept loops end and connections shut down.
    pub(crate) closed: watch::Sender<bool>,
    /// Connections open on this proxy.
    pub(crate) open: Arc<AtomicUsize>,
    /// Methods sent again after a backend failed them (bit per method, see
    /// [`method_bit`]); changed in place.
    pub(crate) retry_methods: std::sync::atomic::AtomicU8,
    pub(crate) budget: budget::RetryBudget,
    /// The origin of the budget's seconds.
    pub(crate) started: tokio::time::Instant,
    /// Bumped whenever a backend is ejected.
    pub(crate) ejections: watch::Sender<u64>,
}

/// The bit of a retryable method in [`Proxy::set_retry_methods`]'s mask.
pub(crate) fn method_bit(m: &http::Method) -> u8 {
    match *m {
        http::Method::GET => 1,
        http::Method::HEAD => 2,
        http::Method::OPTIONS => 4,
        http::Method::PUT => 8,
        http::Method::DELETE => 16,
        _ => 0,
    }
}

/// Header that pins a request to a revision (previews, A/B tests).
pub const REVISION_HEADER: &str = "x-slipway-revision";
/// Cookie that pins a request to a revision.
pub const REVISION_COOKIE: &str = "slipway-revision";

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
            closed: watch::channel(false).0,
            open: Arc::default(),
            retry_methods: std::sync::atomic::AtomicU8::new(1 | 2 | 4),
            budget: budget::RetryBudget::default(),
            started: tokio::time::Instant::now(),
            ejections: watch::channel(0).0,
        })
    }

    /// Sets the methods sent again to another backend after one failed them
    /// before answering. Names other than GET, HEAD, OPTIONS, PUT and DELETE
    /// are ignored: other methods are not idempotent.
    pub fn set_retry_methods<S: AsRef<str>>(&self, methods: &[S]) {
        let mask = methods
            .iter()
            .filter_map(|m| http::Method::from_bytes(m.as_ref().as_bytes()).ok())
            .fold(0, |acc, m| acc | method_bit(&m));
        self.retry_methods.store(mask, Ordering::Relaxed);
    }

    pub(crate) fn retries(&self, m: &http::Method) -> bool {
        let bit = method_bit(m);
        bit != 0 && self.retry_methods.load(Ordering::Relaxed) & bit != 0
    }

    /// Bumped whenever a request failure takes a backend out of routing; see
    /// [`Proxy::ejected`].
    pub fn ejections(&self) -> watch::Receiver<u64> {
        self.ejections.subscribe()
    }

    /// Backends of the current table that failed and wait to be readmitted.
    pub fn ejected(&self) -> Vec<Arc<Backend>> {
        let table = self.routes();
        let mut out: Vec<Arc<Backend>> = Vec::new();
        for b in table.revisions.iter().flat_map(|r| &r.backends) {
            if b.is_ejected() && !out.iter().any(|o| Arc::ptr_eq(o, b)) {
                out.push(b.clone());
            }
        }
        out
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
}
