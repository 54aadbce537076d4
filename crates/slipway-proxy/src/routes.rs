//! What the proxy routes by: backends, revisions with their weights, route tables,
//! and picking a backend for a request.

use super::*;
use crate::upstream::*;

/// One instance the proxy can send requests to.
#[derive(Debug)]
pub struct Backend {
    /// Where it listens.
    pub addr: SocketAddr,
    pub(crate) authority: http::uri::Authority,
    pub(crate) in_flight: AtomicU64,
    pub(crate) draining: AtomicBool,
    /// Set when a request to it failed at the connection level (refused, reset,
    /// closed before answering): it gets no requests until readmitted (after its
    /// readiness probe passes), unless no other backend is left.
    pub(crate) ejected: AtomicBool,
    /// Idle connections, each with its last response fully read, tagged with the
    /// proxy thread whose I/O driver owns the socket.
    pub(crate) idle: std::sync::Mutex<Vec<(std::thread::ThreadId, Upstream)>>,
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
            ejected: AtomicBool::new(false),
            idle: std::sync::Mutex::default(),
        })
    }

    /// The most recently used idle connection of this thread.
    pub(crate) fn take_idle(&self) -> Option<Upstream> {
        let me = this_thread();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let i = idle.iter().rposition(|(t, _)| *t == me)?;
        Some(idle.swap_remove(i).1)
    }

    pub(crate) fn put_idle(&self, up: Upstream) {
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

    /// Whether a failed connection took it out of routing.
    pub fn is_ejected(&self) -> bool {
        self.ejected.load(Ordering::Acquire)
    }

    /// Takes it out of routing after a connection-level failure; `true` if it was
    /// in. Its idle connections are dropped: they lead to the same failure.
    pub(crate) fn eject(&self) -> bool {
        let first = !self.ejected.swap(true, Ordering::AcqRel);
        if first {
            self.idle
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|(t, _)| *t != this_thread());
        }
        first
    }

    /// Puts an ejected backend back into routing (its readiness probe passed).
    pub fn readmit(&self) {
        self.ejected.store(false, Ordering::Release);
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

impl Proxy {
    pub(crate) fn pinned_revision(req: &Request<Incoming>) -> Option<u64> {
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
    /// Ejected backends are skipped while any other is left (when all are
    /// ejected, routing to them beats refusing every request: Envoy's panic
    /// mode).
    pub(crate) fn pick(
        &self,
        pinned: Option<u64>,
        avoid: &[SocketAddr],
    ) -> Option<(u64, Arc<Backend>)> {
        self.pick_among(pinned, avoid, false)
            .or_else(|| self.pick_among(pinned, avoid, true))
    }

    fn pick_among(
        &self,
        pinned: Option<u64>,
        avoid: &[SocketAddr],
        ejected_too: bool,
    ) -> Option<(u64, Arc<Backend>)> {
        let table = self.routes();
        let ok = |b: &Backend| {
            !b.is_draining() && (ejected_too || !b.is_ejected()) && !avoid.contains(&b.addr)
        };
        let usable = |r: &RevisionRoute| r.backends.iter().any(|b| ok(b));
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
        let usable_backend = |b: &&Arc<Backend>| ok(b);
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

    pub(crate) async fn wait_for_backend(
        &self,
        pinned: Option<u64>,
    ) -> Option<(u64, Arc<Backend>)> {
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
}
