//! The data plane: one reverse proxy per service ingress.
//!
//! The controller publishes whole [`RouteTable`] snapshots; the proxy swaps them
//! atomically and never blocks a request on the controller. Within a table,
//! revisions are chosen by weight and backends within a revision round-robin or by
//! fewest requests in flight.
//!
//! Code map: `routes.rs` (backends, tables, picking), `forward.rs` (one request),
//! `upstream.rs` (pooled backend connections and the body that returns them),
//! `serve.rs` (threads and the connection hand-off), `metrics.rs`.
//!
//! - A backend removed from the table (or marked draining) gets no new requests;
//!   its in-flight count tells the controller when it is idle.
//! - A request that never reached a backend (connect failure, stale pooled
//!   connection) is sent to another one, whatever its method.
//! - Hop-by-hop headers stay on their hop, and the client's HTTP version is kept.
//! - With no backend at all, requests wait (up to the hold timeout) for one.
//! - Upgrades (WebSocket) and streamed bodies (SSE) pass through; an open one keeps
//!   its backend busy until it ends.
//! - `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Request-Id` are set.
//! - Per revision: requests, errors (5xx and failures) and a latency histogram.
//!
//! **Architecture invariant:** this crate knows routes and backends, not
//! deployments.

mod forward;
mod metrics;
mod routes;
mod serve;
mod upstream;

pub use metrics::{BUCKETS_MS, RevisionStats, Stats};
pub use routes::{Backend, Balance, RevisionRoute, RouteTable};

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

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;
pub(crate) type Sender = hyper::client::conn::http1::SendRequest<Body>;
pub(crate) type ClientConn =
    hyper::client::conn::http1::Connection<TokioIo<tokio::net::TcpStream>, Body>;

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
}
