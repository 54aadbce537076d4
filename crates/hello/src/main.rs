//! `hello`: the workload Slipway's demos and tests run.
//!
//! - `GET /` answers `hello <version> from <instance>`; `GET /healthz` answers `ok`;
//!   `GET /events` is a server-sent event stream (one `tick` a second) for testing
//!   long-lived connections through rollouts.
//! - Listens on `$PORT` (default 8080). `$HELLO_VERSION` names the version.
//! - On SIGTERM it stops accepting, lets in-flight requests finish, and exits 0.
//!
//! Fault switches, all from the environment:
//! - `HELLO_FAIL_HEALTH=1`: `/healthz` answers 500.
//! - `HELLO_ERROR_RATE=0.2`: that fraction of `GET /` answers 500.
//! - `HELLO_START_DELAY_MS=2000`: wait before listening.
//! - `HELLO_CRASH_AFTER_MS=5000`: exit with status 3 after that long.
//! - `HELLO_SLOW_MS=200`: delay every `GET /`.
//! - `HELLO_ALLOC_MB=128`: allocate and touch that much memory at start (OOM tests).

#![expect(clippy::print_stderr, reason = "a workload logs to its stderr")]

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

struct Faults {
    fail_health: bool,
    error_rate: f64,
    slow: Duration,
}

struct App {
    version: String,
    instance: String,
    faults: Faults,
    counter: AtomicU64,
}

fn env_ms(name: &str) -> Option<Duration> {
    std::env::var(name)
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).boxed());
    *r.status_mut() = status;
    r
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let n = app.counter.fetch_add(1, Ordering::Relaxed);
    Ok(match req.uri().path() {
        "/healthz" if app.faults.fail_health => {
            text(StatusCode::INTERNAL_SERVER_ERROR, "unhealthy\n".into())
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/events" => {
            let (version, instance) = (app.version.clone(), app.instance.clone());
            let stream = futures_util::stream::unfold(0u64, move |i| {
                let line = format!("event: tick\ndata: {i} {version} {instance}\n\n");
                async move {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), i + 1))
                }
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                "content-type",
                hyper::header::HeaderValue::from_static("text/event-stream"),
            );
            r
        }
        "/" => {
            if !app.faults.slow.is_zero() {
                tokio::time::sleep(app.faults.slow).await;
            }
            // Deterministic error spacing: every k-th request fails for rate 1/k.
            #[expect(
                clippy::cast_precision_loss,
                clippy::cast_possible_truncation,
                clippy::cast_sign_loss,
                reason = "small counters"
            )]
            let failing = app.faults.error_rate > 0.0
                && ((n as f64 * app.faults.error_rate).floor() as u64)
                    != (((n + 1) as f64 * app.faults.error_rate).floor() as u64);
            if failing {
                text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("injected error from {}\n", app.instance),
                )
            } else {
                text(
                    StatusCode::OK,
                    format!("hello {} from {}\n", app.version, app.instance),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    })
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8080);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let app = Arc::new(App {
        version: std::env::var("HELLO_VERSION").unwrap_or_else(|_| "dev".into()),
        instance: std::env::var("HELLO_INSTANCE").unwrap_or_else(|_| format!("{pid:x}{nanos:08x}")),
        faults: Faults {
            fail_health: std::env::var("HELLO_FAIL_HEALTH").is_ok_and(|v| v == "1" || v == "true"),
            error_rate: std::env::var("HELLO_ERROR_RATE")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
            slow: env_ms("HELLO_SLOW_MS").unwrap_or_default(),
        },
        counter: AtomicU64::new(0),
    });
    if let Some(mb) = std::env::var("HELLO_ALLOC_MB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut hog = vec![0u8; mb << 20];
        for i in (0..hog.len()).step_by(4096) {
            hog[i] = 1;
        }
        eprintln!("hello: holding {mb} MiB");
        std::mem::forget(hog);
    }
    if let Some(d) = env_ms("HELLO_START_DELAY_MS") {
        tokio::time::sleep(d).await;
    }
    if let Some(d) = env_ms("HELLO_CRASH_AFTER_MS") {
        tokio::spawn(async move {
            tokio::time::sleep(d).await;
            eprintln!("hello: crashing as asked");
            std::process::exit(3);
        });
    }
    let listener = match TcpListener::bind(("0.0.0.0", port)).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    eprintln!(
        "hello {} ({}) listening on :{port}",
        app.version, app.instance
    );
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hello: cannot handle SIGTERM: {e}");
            std::process::exit(1);
        }
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let app = app.clone();
                let svc = hyper::service::service_fn(move |req| handle(app.clone(), req));
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(conn);
            }
            _ = term.recv() => break,
        }
    }
    drop(listener);
    eprintln!("hello: SIGTERM, draining");
    // Open event streams never end on their own; give in-flight requests 10 s.
    let _ = tokio::time::timeout(Duration::from_secs(10), graceful.shutdown()).await;
    eprintln!("hello: bye");
}
