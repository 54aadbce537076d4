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

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto` and (when absent) `X-Request-Id`
/// on a request forwarded through hyper's client (upgrades).
fn set_forwarding_headers(proxy: &Proxy, h: &mut http::HeaderMap, peer: SocketAddr) {
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
            proxy.boot,
            proxy.ids.fetch_add(1, Ordering::Relaxed)
        ))
    {
        h.insert("x-request-id", v);
    }
}

/// Bodies up to this size are read before the request goes out, so that the
/// request can be sent again.
const REPLAY_MAX: u64 = 64 << 10;

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
        if req.headers().contains_key(header::UPGRADE) {
            set_forwarding_headers(&self, req.headers_mut(), peer);
            return Ok(self.upgrade(req, revision, backend, start).await);
        }
        // The client's hop keeps its own version whatever the backend speaks.
        let client_version = req.version();
        let (parts, body) = req.into_parts();
        let retryable = self.retries(&parts.method);
        let mut out = match self.outgoing(&parts, body, peer).await {
            Ok(out) => out,
            Err(e) => {
                return Ok(text(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the request body: {e}"),
                ));
            }
        };
        let second = start.duration_since(self.started).as_secs();
        self.budget.request(second);
        let mut tried = Vec::new();
        loop {
            backend.in_flight.fetch_add(1, Ordering::AcqRel);
            let guard = InFlight(backend.clone());
            match Self::forward(&backend, &mut out).await {
                Ok((mut rparts, framing, keep_alive, up)) => {
                    rparts.version = client_version;
                    self.stats(revision)
                        .record(rparts.status.is_server_error(), start.elapsed());
                    // The in-flight guard lives as long as the response body streams; the
                    // connection goes back to the pool once the body has ended.
                    let body = UpstreamBody::new(up, framing, keep_alive, guard);
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
                    // A request that never left goes on to the next backend (up to
                    // 8: a dead machine may take several at once); one that was
                    // sent is tried on at most 3.
                    let next = if tried.len() < 3 || (failure.unsent && tried.len() < 8) {
                        self.pick(pinned, &tried)
                    } else {
                        None
                    };
                    if let Some((r, b)) = next {
                        // A request that was never sent can go to another backend,
                        // whatever its method: nothing of it reached the failed one.
                        // One that was sent goes again only if it may (idempotent,
                        // body kept) and the budget allows.
                        let again = failure.unsent
                            || (retryable
                                && !failure.answered
                                && out.stream.is_none()
                                && self.budget.try_retry(second));
                        if again {
                            if !failure.unsent {
                                self.stats(revision).record_retried(start.elapsed());
                            }
                            revision = r;
                            backend = b;
                            continue;
                        }
                    }
                    self.stats(revision).record(true, start.elapsed());
                    return Ok(text(StatusCode::BAD_GATEWAY, "backend failed"));
                }
            }
        }
    }

    /// The request as it goes to backends: an HTTP/1.1 head in origin form with
    /// the forwarding headers set and hop-by-hop headers left on the client's hop,
    /// followed by the body when it is small enough to keep (none, or a known
    /// length up to [`REPLAY_MAX`]); a larger or unknown-length body is streamed.
    async fn outgoing(
        &self,
        parts: &http::request::Parts,
        body: Incoming,
        peer: SocketAddr,
    ) -> Result<Outgoing, hyper::Error> {
        use hyper::body::Body as _;
        use std::fmt::Write as _;
        let h = &parts.headers;
        let had_length = h.contains_key(header::CONTENT_LENGTH);
        let (kept, stream) = if body.is_end_stream() {
            (Some(Bytes::new()), None)
        } else if body.size_hint().exact().is_some_and(|n| n <= REPLAY_MAX) {
            (Some(body.collect().await?.to_bytes()), None)
        } else {
            let chunked = !had_length;
            (None, Some(StreamBody { body, chunked }))
        };
        let kept_len = kept.as_ref().map_or(0, Bytes::len);
        let mut m = bytes::BytesMut::with_capacity(512 + kept_len);
        m.extend_from_slice(parts.method.as_str().as_bytes());
        m.extend_from_slice(b" ");
        m.extend_from_slice(
            parts
                .uri
                .path_and_query()
                .map_or("/", http::uri::PathAndQuery::as_str)
                .as_bytes(),
        );
        m.extend_from_slice(b" HTTP/1.1\r\n");
        // HTTP/1 backends get a Host header (h2 clients send an authority instead).
        if !h.contains_key(header::HOST)
            && let Some(a) = parts.uri.authority()
        {
            m.extend_from_slice(b"host: ");
            m.extend_from_slice(a.as_str().as_bytes());
            m.extend_from_slice(b"\r\n");
        }
        let named: Vec<&[u8]> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| list_tokens(v.as_bytes()))
            .collect();
        for (name, value) in h {
            let n = name.as_str().as_bytes();
            // Forwarding headers are written below; kept bodies get their own
            // length, streamed chunked ones none.
            if is_hop_by_hop(n)
                || named.iter().any(|t| t.eq_ignore_ascii_case(n))
                || name == header::EXPECT
                || n == b"x-forwarded-proto"
                || n == b"x-forwarded-for"
                || (name == header::CONTENT_LENGTH && (kept.is_some() || !had_length))
            {
                continue;
            }
            m.extend_from_slice(n);
            m.extend_from_slice(b": ");
            m.extend_from_slice(value.as_bytes());
            m.extend_from_slice(b"\r\n");
        }
        // Every earlier hop, then this one, in one header.
        m.extend_from_slice(b"x-forwarded-for: ");
        for prev in h.get_all("x-forwarded-for") {
            m.extend_from_slice(prev.as_bytes());
            m.extend_from_slice(b", ");
        }
        let _ = write!(m, "{}\r\n", peer.ip());
        m.extend_from_slice(b"x-forwarded-proto: http\r\n");
        if !h.contains_key("x-request-id") {
            let _ = write!(
                m,
                "x-request-id: {:x}-{:x}\r\n",
                self.boot,
                self.ids.fetch_add(1, Ordering::Relaxed)
            );
        }
        if kept_len > 0 || (kept.is_some() && had_length) {
            let _ = write!(m, "content-length: {kept_len}\r\n");
        }
        if stream.as_ref().is_some_and(|s| s.chunked) {
            m.extend_from_slice(b"transfer-encoding: chunked\r\n");
        }
        m.extend_from_slice(b"\r\n");
        if let Some(kept) = kept {
            m.extend_from_slice(&kept);
        }
        Ok(Outgoing {
            message: m.freeze(),
            stream,
            head_only: parts.method == http::Method::HEAD,
        })
    }

    /// Sends `out` to `backend` over one of its idle connections, or a new one,
    /// and reads the response head.
    pub(crate) async fn forward(
        backend: &Backend,
        out: &mut Outgoing,
    ) -> Result<(http::response::Parts, Framing, bool, Upstream), Failure> {
        let mut up = loop {
            match backend.take_idle() {
                // An idle connection is ready at once unless the backend closed it.
                Some(mut up) => {
                    if up.alive() {
                        break up;
                    }
                }
                None => match Upstream::connect(backend.addr).await {
                    Ok(up) => break up,
                    Err(message) => {
                        return Err(Failure {
                            unsent: true,
                            message,
                            answered: false,
                            fresh: true,
                        });
                    }
                },
            }
        };
        let (parts, framing, keep_alive) = up.exchange(out).await?;
        Ok((parts, framing, keep_alive, up))
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
        Response::from_parts(p, b.map_err(Into::into).boxed())
    }
}
