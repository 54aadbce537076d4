//! Forwarding one request: forwarding headers, hop-by-hop headers, the pooled
//! backend connection, retries of unsent requests, and upgrades.

use super::*;
use crate::upstream::*;

pub(crate) struct InFlight(pub(crate) Arc<Backend>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The request's URI re-aimed at `backend`, keeping path and query.
pub(crate) fn backend_uri(backend: &Backend, uri: &http::Uri) -> http::Uri {
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
pub(crate) fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    let hop = |n: &http::header::HeaderName| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRAILER
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n.as_str() == "keep-alive"
            || n.as_str() == "proxy-connection"
    };
    // The common case: nothing to strip, decided in one pass without hashing.
    if !h.keys().any(hop) {
        return;
    }
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

/// Bodies up to this size are kept so that the request can be sent again.
const REPLAY_MAX: u64 = 64 << 10;

/// A request's head and body, kept to send it again to another backend.
pub(crate) struct Replay {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Replay {
    /// The body to send first and, when the request can be replayed (no body, or
    /// one of known length up to [`REPLAY_MAX`], read here), what replays it.
    async fn keep(
        parts: &http::request::Parts,
        body: Incoming,
    ) -> Result<(Body, Option<Self>), hyper::Error> {
        use hyper::body::Body as _;
        let bytes = if body.is_end_stream() {
            Bytes::new()
        } else if body.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX) {
            body.collect().await?.to_bytes()
        } else {
            return Ok((body.boxed(), None));
        };
        let replay = Self {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            version: parts.version,
            headers: parts.headers.clone(),
            body: bytes,
        };
        Ok((replay.body(), Some(replay)))
    }

    fn body(&self) -> Body {
        Full::new(self.body.clone())
            .map_err(|never| match never {})
            .boxed()
    }

    /// The request again.
    fn request(&self) -> Request<Body> {
        let mut r = Request::new(self.body());
        *r.method_mut() = self.method.clone();
        *r.uri_mut() = self.uri.clone();
        *r.version_mut() = self.version;
        *r.headers_mut() = self.headers.clone();
        r
    }
}

pub(crate) fn text(status: StatusCode, msg: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{msg}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}

impl Proxy {
    pub(crate) async fn handle(
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
        // What it takes to send the request again after a backend failed it: its
        // head and, when small, its body.
        let (body, replay) = if self.retries(&parts.method) {
            match Replay::keep(&parts, body).await {
                Ok(v) => v,
                Err(e) => {
                    return Ok(text(
                        StatusCode::BAD_REQUEST,
                        &format!("reading the request body: {e}"),
                    ));
                }
            }
        } else {
            (body.boxed(), None)
        };
        let mut req = Request::from_parts(parts, body);
        let second = start.duration_since(self.started).as_secs();
        self.budget.request(second);
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
                    if failure.fresh && backend.eject() {
                        tracing::info!(backend = %backend.addr, "backend failed a new connection; out of routing until its readiness probe passes: {}", failure.message);
                        self.ejections.send_modify(|n| *n += 1);
                    }
                    let next = if tried.len() < 3 {
                        self.pick(pinned, &tried)
                    } else {
                        None
                    };
                    if let Some((r, b)) = next {
                        // A request that was never sent can go to another backend,
                        // whatever its method: nothing of it reached the failed one.
                        // One that was sent goes again only if it may (idempotent,
                        // body kept) and the budget allows.
                        let again = match failure.unsent {
                            Some(unsent) => Some(unsent),
                            None => match &replay {
                                Some(replay) if self.budget.try_retry(second) => {
                                    self.stats(revision).record_retried(start.elapsed());
                                    Some(replay.request())
                                }
                                _ => None,
                            },
                        };
                        if let Some(again) = again {
                            revision = r;
                            backend = b;
                            req = again;
                            continue;
                        }
                    }
                    self.stats(revision).record(true, start.elapsed());
                    return Ok(text(StatusCode::BAD_GATEWAY, "backend failed"));
                }
            }
        }
    }

    /// Sends `req` to `backend` over one of its idle connections, or a new one.
    pub(crate) async fn forward(
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
                            fresh: false,
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
                    fresh: true,
                });
            }
        };
        match up.send(req).await {
            Ok(resp) => Ok((resp, up)),
            Err(mut e) => Err(Failure {
                unsent: e.take_message(),
                message: e.into_error().to_string(),
                fresh: true,
            }),
        }
    }

    pub(crate) async fn upgrade(
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
}
