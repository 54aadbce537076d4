//! The proxy against small real HTTP backends on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use slipway_proxy::{Backend, Balance, Pool, Proxy, RevisionRoute, RouteTable};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// A backend answering `GET /` with its name and echoing the forwarding headers;
/// `/slow` waits 300 ms.
async fn backend(name: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut r = BufReader::new(s);
                loop {
                    let mut first = String::new();
                    if r.read_line(&mut first).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut headers = String::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                        let lower = h.to_ascii_lowercase();
                        if lower.starts_with("x-forwarded-for")
                            || lower.starts_with("x-request-id")
                            || lower.starts_with("x-forwarded-proto")
                        {
                            headers.push_str(h.trim());
                            headers.push(';');
                        }
                    }
                    if first.contains("/slow") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let body = format!("{name}|{headers}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if r.get_mut().write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn start(hold: Duration) -> (Arc<Proxy>, SocketAddr, tokio::sync::watch::Sender<bool>) {
    start_on(&Pool::new(2).expect("pool"), hold).await
}

async fn start_on(
    pool: &Arc<Pool>,
    hold: Duration,
) -> (Arc<Proxy>, SocketAddr, tokio::sync::watch::Sender<bool>) {
    let proxy = Proxy::new(hold, Balance::RoundRobin);
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(proxy.clone().serve(pool.clone(), l, rx));
    (proxy, addr, tx)
}

async fn get(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (code, body)
}

fn table(revs: &[(u64, u32, &[Arc<Backend>])]) -> RouteTable {
    RouteTable {
        revisions: revs
            .iter()
            .map(|(r, w, b)| RevisionRoute {
                revision: *r,
                weight: *w,
                backends: b.to_vec(),
            })
            .collect(),
    }
}

#[tokio::test]
async fn weights_split_traffic_and_the_revision_header_pins_it() {
    let (a, b) = (
        Backend::new(backend("a").await),
        Backend::new(backend("b").await),
    );
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[
        (1, 80, std::slice::from_ref(&a)),
        (2, 20, std::slice::from_ref(&b)),
    ]));
    let mut counts = [0u32; 2];
    for _ in 0..400 {
        let (code, body) = get(addr, "/", "").await;
        assert_eq!(code, 200);
        counts[usize::from(body.starts_with('b'))] += 1;
    }
    assert!(
        (60..=100).contains(&counts[1]),
        "20% weight gave {counts:?}"
    );
    for _ in 0..20 {
        assert!(
            get(addr, "/", "X-Slipway-Revision: 2\r\n")
                .await
                .1
                .starts_with('b')
        );
        assert!(
            get(addr, "/", "Cookie: theme=dark; slipway-revision=1\r\n")
                .await
                .1
                .starts_with('a')
        );
    }
    assert_eq!(
        proxy.stats(1).snapshot().requests + proxy.stats(2).snapshot().requests,
        440
    );
}

#[tokio::test]
async fn forwarding_headers_are_set() {
    let a = Backend::new(backend("a").await);
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, &[a])]));
    let (_, body) = get(
        addr,
        "/",
        "X-Forwarded-For: 10.0.0.9\r\nX-Request-Id: keep-me\r\n",
    )
    .await;
    assert!(
        body.contains("x-forwarded-for: 10.0.0.9, 127.0.0.1"),
        "{body}"
    );
    assert!(
        body.contains("x-forwarded-proto: http") && body.contains("x-request-id: keep-me"),
        "{body}"
    );
    let (_, body) = get(addr, "/", "").await;
    assert!(
        body.to_ascii_lowercase().contains("x-request-id: "),
        "a request id is generated: {body}"
    );
}

#[tokio::test]
async fn draining_backends_get_no_new_requests_and_count_in_flight() {
    let (a, b) = (
        Backend::new(backend("a").await),
        Backend::new(backend("b").await),
    );
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, &[a.clone(), b.clone()])]));
    // A slow request lands on one of them; it stays in flight while that one drains.
    let slow = tokio::spawn(async move { get(addr, "/slow", "").await });
    let busy = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if a.in_flight() + b.in_flight() == 1 {
                return if a.in_flight() == 1 {
                    a.clone()
                } else {
                    b.clone()
                };
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("in flight");
    busy.drain();
    let other = if Arc::ptr_eq(&busy, &a) { "b" } else { "a" };
    for _ in 0..10 {
        assert!(get(addr, "/", "").await.1.starts_with(other));
    }
    assert_eq!(
        slow.await.expect("join").0,
        200,
        "the draining backend finished its request"
    );
    assert_eq!(busy.in_flight(), 0);
}

#[tokio::test]
async fn get_is_retried_on_another_backend_after_a_connect_failure() {
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let a = Backend::new(backend("a").await);
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, &[Backend::new(dead), a])]));
    for _ in 0..10 {
        let (code, body) = get(addr, "/", "").await;
        assert_eq!((code, body.starts_with('a')), (200, true));
    }
}

#[tokio::test]
async fn requests_wait_for_a_backend_then_fail_with_503_after_the_hold() {
    let (proxy, addr, _stop) = start(Duration::from_millis(600)).await;
    let waiting = tokio::spawn(async move { get(addr, "/", "").await });
    // The backend shows up while the request is held (or just before it arrives).
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set_routes(table(&[(1, 100, &[Backend::new(backend("late").await)])]));
    let (code, body) = waiting.await.expect("join");
    assert_eq!(code, 200);
    assert!(body.starts_with("late"), "{body}");

    proxy.set_routes(RouteTable::default());
    let t0 = std::time::Instant::now();
    let (code, _) = get(addr, "/", "").await;
    assert_eq!(code, 503);
    assert!(
        t0.elapsed() >= Duration::from_millis(550),
        "held for the hold timeout first"
    );
}

#[tokio::test]
async fn websocket_upgrades_pass_through_and_keep_the_backend_busy() {
    // A backend that accepts the upgrade and then echoes bytes.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let backend_addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        let mut r = BufReader::new(s);
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).await.unwrap_or(0) == 0 || h == "\r\n" {
                break;
            }
        }
        let mut s = r.into_inner();
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n").await.expect("101");
        let mut buf = [0u8; 64];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    });
    let b = Backend::new(backend_addr);
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, std::slice::from_ref(&b))]));
    let mut c = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").await.expect("handshake");
    let mut r = BufReader::new(c);
    let mut status = String::new();
    r.read_line(&mut status).await.expect("status");
    assert!(status.contains("101"), "{status}");
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.expect("header");
        if h == "\r\n" {
            break;
        }
    }
    let mut c = r.into_inner();
    c.write_all(b"ping").await.expect("send");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).await.expect("echo");
    assert_eq!(&buf, b"ping");
    assert_eq!(
        b.in_flight(),
        1,
        "an open upgraded connection keeps its backend busy"
    );
    drop(c);
    tokio::time::timeout(Duration::from_secs(5), async {
        while b.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("released when the connection ends");
}

/// A hyper backend that answers every request with its body echoed back in two
/// chunks (a streamed, chunked response), counting the connections it accepts.
async fn echo_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use http_body_util::{BodyExt, StreamBody};
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let svc = hyper::service::service_fn(
                |req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = req.into_body().collect().await?.to_bytes();
                    let half = body.len() / 2;
                    let frames = [body.slice(..half), body.slice(half..)]
                        .map(|b| Ok::<_, hyper::Error>(hyper::body::Frame::data(b)));
                    let stream = futures_util::stream::iter(frames);
                    Ok::<_, hyper::Error>(hyper::Response::new(StreamBody::new(stream)))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn request_bodies_and_streamed_responses_pass_through_on_reused_backend_connections() {
    use http_body_util::{BodyExt, Full};
    let (backend_addr, accepted) = echo_backend().await;
    let b = Backend::new(backend_addr);
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, std::slice::from_ref(&b))]));
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    for round in 0u8..5 {
        // Larger than any socket or hyper buffer, so the body streams both ways.
        let payload: Vec<u8> = (0..(1 << 20))
            .map(|i: u32| (i % 251) as u8 ^ round)
            .collect();
        let req = hyper::Request::post("/echo")
            .header("host", "x")
            .body(Full::new(bytes::Bytes::from(payload.clone())))
            .expect("request");
        client.ready().await.expect("ready");
        let resp = client.send_request(req).await.expect("response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body == payload[..], "round {round}: the echo differs");
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests reuse one backend connection"
    );
    assert_eq!(b.in_flight(), 0);
    assert_eq!(proxy.stats(1).snapshot().requests, 5);
}

#[tokio::test]
async fn a_closed_proxy_releases_its_port_and_finishes_open_requests() {
    let a = Backend::new(backend("a").await);
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, std::slice::from_ref(&a))]));
    let slow = tokio::spawn(get(addr, "/slow", ""));
    // The slow request is in flight once the backend counts it.
    tokio::time::timeout(Duration::from_secs(5), async {
        while a.in_flight() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("request reached the backend");
    proxy.close();
    let (code, body) = slow.await.expect("join");
    assert_eq!((code, body.starts_with('a')), (200, true));
    tokio::time::timeout(Duration::from_secs(5), async {
        while std::net::TcpListener::bind(addr).is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the port is free again");
}

/// Reads one request head; `false` when the connection ended first.
async fn read_head(r: &mut BufReader<TcpStream>) -> bool {
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).await.unwrap_or(0) == 0 {
            return false;
        }
        if h == "\r\n" {
            return true;
        }
    }
}

/// A loopback listener running `serve` on each connection it accepts.
async fn accept_each<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(BufReader<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(serve(BufReader::new(s)));
        }
    });
    addr
}

/// A backend that speaks HTTP/1.0 and closes every connection after one answer,
/// as busybox httpd does.
async fn closing_backend() -> SocketAddr {
    accept_each(|mut r| async move {
        read_head(&mut r).await;
        let _ = r
            .get_mut()
            .write_all(b"HTTP/1.0 200 OK\r\nConnection: close\r\nKeep-Alive: timeout=5\r\nContent-Length: 2\r\n\r\nok")
            .await;
    })
    .await
}

#[tokio::test]
async fn a_backend_that_closes_its_connection_does_not_close_the_clients() {
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    let b = Backend::new(closing_backend().await);
    proxy.set_routes(table(&[(1, 100, &[b])]));
    let mut s = BufReader::new(TcpStream::connect(addr).await.expect("connect"));
    for round in 0..3 {
        s.get_mut()
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            assert!(
                s.read_line(&mut line).await.expect("read") > 0,
                "round {round}: the client connection was closed"
            );
            if line == "\r\n" {
                break;
            }
            head.push(line.to_ascii_lowercase());
        }
        assert!(head[0].starts_with("http/1.1 200"), "{head:?}");
        assert!(
            !head
                .iter()
                .any(|h| h.starts_with("connection:") || h.starts_with("keep-alive:")),
            "hop-by-hop headers stay on their hop: {head:?}"
        );
        let mut body = [0u8; 2];
        s.read_exact(&mut body).await.expect("body");
        assert_eq!(&body, b"ok");
    }
}

/// A hyper backend answering 200 with the request's method, counting requests.
async fn counting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let count = count.clone();
            let svc =
                hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let count = count.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let method = req.method().to_string();
                        let _ = req.into_body().collect().await?;
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        Ok::<_, hyper::Error>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(method),
                        )))
                    }
                });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    (addr, seen)
}

/// Sends `method path` with `body` on a new connection; the status (0 when the
/// connection ended without one).
async fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out).await;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

/// A backend that accepts, reads the whole request head and closes without
/// answering (a process dying mid-request); it counts the requests it took.
async fn aborting_backend() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = seen.clone();
    let addr = accept_each(move |mut r| {
        let count = count.clone();
        async move {
            if read_head(&mut r).await {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // Dropping the stream closes it with nothing written.
        }
    })
    .await;
    (addr, seen)
}

#[tokio::test]
async fn a_get_that_a_backend_drops_is_answered_by_another_and_counted_as_a_retry() {
    let (bad, bad_seen) = aborting_backend().await;
    let (good, good_seen) = counting_backend().await;
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    let dropping = Backend::new(bad);
    proxy.set_routes(table(&[(1, 100, &[dropping.clone(), Backend::new(good)])]));
    for _ in 0..6 {
        let (code, _) = get(addr, "/", "").await;
        assert_eq!(code, 200, "every GET is answered");
    }
    assert_eq!(
        bad_seen.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the dropping backend left routing after its first failure"
    );
    assert!(dropping.is_ejected());
    assert_eq!(
        proxy.ejected().iter().map(|b| b.addr).collect::<Vec<_>>(),
        vec![bad]
    );
    assert_eq!(good_seen.load(std::sync::atomic::Ordering::SeqCst), 6);
    let stats = proxy.stats(1).snapshot();
    assert_eq!(
        (stats.requests, stats.errors, stats.retries),
        (7, 1, 1),
        "the failed attempt the client never saw counts as an error and a retry"
    );
    // Readmitted, it gets requests again.
    dropping.readmit();
    for _ in 0..4 {
        assert_eq!(get(addr, "/", "").await.0, 200);
    }
    assert_eq!(bad_seen.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_post_that_a_backend_drops_is_not_sent_again_and_fails_cleanly() {
    let (bad, bad_seen) = aborting_backend().await;
    let (good, good_seen) = counting_backend().await;
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    let dropping = Backend::new(bad);
    proxy.set_routes(table(&[(1, 100, &[dropping.clone(), Backend::new(good)])]));
    let mut failed = 0;
    for _ in 0..10 {
        dropping.readmit();
        let before = good_seen.load(std::sync::atomic::Ordering::SeqCst);
        let dropped = bad_seen.load(std::sync::atomic::Ordering::SeqCst);
        let (code, _) = request(addr, "POST", "/echo", "pay once").await;
        if bad_seen.load(std::sync::atomic::Ordering::SeqCst) > dropped {
            assert_eq!(code, 502, "a POST the backend dropped fails");
            assert_eq!(
                good_seen.load(std::sync::atomic::Ordering::SeqCst),
                before,
                "and is not sent again"
            );
            failed += 1;
        } else {
            assert_eq!(code, 200);
        }
    }
    assert!(failed > 0, "some POSTs reached the dropping backend");
    // A PUT is retried once the ingress says PUT is idempotent.
    proxy.set_retry_methods(&["GET", "PUT"]);
    for _ in 0..4 {
        dropping.readmit();
        assert_eq!(request(addr, "PUT", "/echo", "same twice").await.0, 200);
    }
}

#[tokio::test]
async fn when_every_backend_fails_the_budget_caps_the_retries() {
    let mut backends = Vec::new();
    let mut counters = Vec::new();
    for _ in 0..3 {
        let (a, seen) = aborting_backend().await;
        backends.push(Backend::new(a));
        counters.push(seen);
    }
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;
    proxy.set_routes(table(&[(1, 100, &backends)]));
    let requests = 200;
    for _ in 0..requests {
        assert_eq!(get(addr, "/", "").await.0, 502);
    }
    let attempts: usize = counters
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .sum();
    // 10 + 20% of 200 retries at most, though each request could try 3 backends.
    assert!(
        attempts <= requests + 10 + requests / 5,
        "{attempts} attempts for {requests} requests"
    );
    assert!(attempts > requests, "some were retried: {attempts}");
    let stats = proxy.stats(1).snapshot();
    assert_eq!(stats.retries as usize, attempts - requests);
}

/// A backend streaming `tick` lines every 20 ms until the client goes away.
async fn ticking_backend() -> SocketAddr {
    accept_each(|mut r| async move {
        read_head(&mut r).await;
        let s = r.get_mut();
        if s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        while s.write_all(b"5\r\ntick\n\r\n").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}

/// Reads `n` tick lines of a stream.
async fn ticks(s: &mut BufReader<TcpStream>, n: usize) {
    let mut seen = 0;
    while seen < n {
        let mut line = String::new();
        assert!(
            s.read_line(&mut line).await.expect("read") > 0,
            "the stream ended"
        );
        if line == "tick\n" {
            seen += 1;
        }
    }
}

fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("tasks")
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .count()
}

#[tokio::test]
async fn two_hundred_ingresses_share_one_pool_and_changing_one_leaves_anothers_stream_open() {
    let before = threads_named("slipway-proxy");
    let pool = Pool::new(2).expect("pool");
    let hello = Backend::new(backend("hello").await);
    let mut ingresses = Vec::new();
    for _ in 0..200 {
        let (proxy, addr, stop) = start_on(&pool, Duration::from_secs(1)).await;
        proxy.set_routes(table(&[(1, 100, std::slice::from_ref(&hello))]));
        ingresses.push((proxy, addr, stop));
    }
    for (_, addr, _) in &ingresses {
        assert_eq!(get(*addr, "/", "").await.0, 200);
    }
    assert_eq!(
        threads_named("slipway-proxy") - before,
        2,
        "200 ingresses are served by the pool's two threads"
    );

    // An open stream through ingress 0.
    let streaming = Backend::new(ticking_backend().await);
    let (a, a_addr, _) = &ingresses[0];
    a.set_routes(table(&[(1, 100, std::slice::from_ref(&streaming))]));
    let mut s = BufReader::new(TcpStream::connect(a_addr).await.expect("connect"));
    s.get_mut()
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("write");
    tokio::time::timeout(Duration::from_secs(5), ticks(&mut s, 3))
        .await
        .expect("the stream flows");

    // Ingress 1 is reconfigured, re-routed, moved and closed; ingress 0's own
    // settings change too.
    let (b, b_addr, b_stop) = &ingresses[1];
    b.configure(Duration::from_millis(10), Balance::LeastRequests);
    b.set_retry_methods(&["GET"]);
    b.set_routes(RouteTable::default());
    b_stop.send_replace(true);
    b.close();
    a.configure(Duration::from_secs(2), Balance::LeastRequests);
    tokio::time::timeout(Duration::from_secs(5), async {
        while TcpStream::connect(b_addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("ingress 1 stopped listening");
    tokio::time::timeout(Duration::from_secs(5), ticks(&mut s, 10))
        .await
        .expect("ingress 0's stream kept flowing");
    assert_eq!(a.open_connections(), 1);
    assert_eq!(get(ingresses[2].1, "/", "").await.0, 200);
}

/// A raw backend answering every request head with `answer`, then closing when
/// `close` is set.
async fn raw_backend(answer: &'static [u8], close: bool) -> SocketAddr {
    accept_each(move |mut r| async move {
        while read_head(&mut r).await {
            if r.get_mut().write_all(answer).await.is_err() || close {
                return;
            }
        }
    })
    .await
}

/// Sends `req` through the proxy at `addr` on a new hyper client connection.
async fn send_through(
    addr: SocketAddr,
    req: hyper::Request<http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>>,
) -> (hyper::http::response::Parts, bytes::Bytes) {
    use http_body_util::BodyExt;
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut client, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let resp = client.send_request(req).await.expect("response");
    let (parts, body) = resp.into_parts();
    (parts, body.collect().await.expect("body").to_bytes())
}

/// `method /` with no body.
fn bodiless(
    method: hyper::Method,
) -> hyper::Request<http_body_util::combinators::BoxBody<bytes::Bytes, std::io::Error>> {
    use http_body_util::{BodyExt, Empty};
    hyper::Request::builder()
        .method(method)
        .uri("/")
        .header("host", "x")
        .body(Empty::new().map_err(|never| match never {}).boxed())
        .expect("request")
}

#[tokio::test]
async fn chunked_uploads_head_requests_interim_answers_and_close_delimited_bodies_pass_through() {
    use http_body_util::{BodyExt, StreamBody};
    let (proxy, addr, _stop) = start(Duration::from_secs(1)).await;

    // A request body of unknown length goes to the backend chunked, whole.
    let (echo, _) = echo_backend().await;
    proxy.set_routes(table(&[(1, 100, &[Backend::new(echo)])]));
    let pieces: Vec<bytes::Bytes> = (0u8..40)
        .map(|i| bytes::Bytes::from(vec![i; 5000]))
        .collect();
    let expected: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
    let stream = futures_util::stream::iter(
        pieces
            .into_iter()
            .map(|p| Ok::<_, std::io::Error>(hyper::body::Frame::data(p))),
    );
    let req = hyper::Request::post("/echo")
        .header("host", "x")
        .body(StreamBody::new(stream).boxed())
        .expect("request");
    let (parts, body) = send_through(addr, req).await;
    assert_eq!(parts.status, 200);
    assert!(body == expected[..], "the chunked upload arrived whole");

    // HEAD: the length of what a GET would get, and no body.
    let head = raw_backend(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", false).await;
    proxy.set_routes(table(&[(2, 100, &[Backend::new(head)])]));
    let (parts, body) = send_through(addr, bodiless(hyper::Method::HEAD)).await;
    assert_eq!(parts.headers["content-length"], "5");
    assert!(body.is_empty());

    // An interim 100 Continue before the answer is skipped.
    let interim = raw_backend(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        false,
    )
    .await;
    proxy.set_routes(table(&[(3, 100, &[Backend::new(interim)])]));
    let (parts, body) = send_through(addr, bodiless(hyper::Method::GET)).await;
    assert_eq!((parts.status.as_u16(), &body[..]), (200, &b"ok"[..]));

    // A body delimited by the backend closing arrives whole.
    let closing = raw_backend(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", true).await;
    proxy.set_routes(table(&[(4, 100, &[Backend::new(closing)])]));
    let (parts, body) = send_through(addr, bodiless(hyper::Method::GET)).await;
    assert_eq!(
        (parts.status.as_u16(), &body[..]),
        (200, &b"until the end"[..])
    );

    // A malformed answer is a 502, not a hang or a broken client connection.
    let garbage = raw_backend(b"SPEAKING NONSENSE\r\n\r\n", true).await;
    proxy.set_routes(table(&[(5, 100, &[Backend::new(garbage)])]));
    let (code, _) = get(addr, "/", "").await;
    assert_eq!(code, 502);
}
