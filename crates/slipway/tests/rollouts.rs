//! Zero-downtime rollouts through the built-in proxy, with real runc and hello,
//! under continuous load.

#![expect(
    clippy::print_stderr,
    reason = "failed requests are reported for diagnosis"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use slipway_testkit::{TestServer, cli, free_port, hello_bin, http_get, poll};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn pack_hello(s: &TestServer, tag: &str, version: &str) {
    slipway_testkit::pack_hello(BIN, s, tag, version);
}

fn write_spec(dir: &std::path::Path, body: &str) -> String {
    let p = dir.join("svc.toml");
    std::fs::write(&p, body).expect("write spec");
    p.display().to_string()
}

fn deploy(s: &TestServer, file: &str) -> (i32, String) {
    let (code, out, err) = cli(BIN, s, &["deploy", file]);
    (code, format!("{out}{err}"))
}

/// Keep-alive clients hammering the ingress until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

fn one_request(
    conn: &mut Option<BufReader<TcpStream>>,
    port: u16,
) -> Result<(u16, String), String> {
    if conn.is_none() {
        let s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(15)))
            .map_err(|e| e.to_string())?;
        *conn = Some(BufReader::new(s));
    }
    let r = conn.as_mut().ok_or("no connection")?;
    r.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut status = String::new();
    r.read_line(&mut status).map_err(|e| e.to_string())?;
    let code: u16 = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or(format!("bad status line {status:?}"))?;
    let mut len = 0usize;
    let mut chunked = false;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| e.to_string())?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        let h = h.to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        if h.starts_with("transfer-encoding:") && h.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).map_err(|e| e.to_string())?;
            let n = usize::from_str_radix(size.trim(), 16).map_err(|e| e.to_string())?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body).map_err(|e| e.to_string())?;
    }
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

impl Load {
    fn start(port: u16, clients: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed, bodies) =
                    (stop.clone(), ok.clone(), failed.clone(), bodies.clone());
                std::thread::spawn(move || {
                    let mut conn = None;
                    while !stop.load(Ordering::Relaxed) {
                        match one_request(&mut conn, port) {
                            Ok((200, body)) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                let mut b = bodies.lock().expect("lock");
                                if b.len() < 100_000 {
                                    b.push(body);
                                }
                            }
                            Ok((code, body)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("failed request: {code} {body}");
                            }
                            Err(e) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                eprintln!("failed request: {e}");
                                conn = None;
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            bodies,
            threads,
        }
    }

    /// Stops the clients; returns (ok, failed, bodies).
    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        let bodies = self.bodies.lock().expect("lock").clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            bodies,
        )
    }
}

fn spec(port: u16, image: &str, extra: &str) -> String {
    format!(
        "name = \"web\"\nimage = \"{image}\"\nreplicas = 3\ndrain_timeout = \"5s\"\nprogress_deadline = \"20s\"\n{extra}\n[ingress]\nlisten = \"127.0.0.1:{port}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n"
    )
}

fn serving(port: u16) -> String {
    http_get(port, "/")
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .unwrap_or_default()
}

#[test]
fn rolling_update_of_three_replicas_under_load_fails_no_request() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1.0.0", "1.0.0");
    pack_hello(&s, "hello:1.1.0", "1.1.0");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let (code, out) = deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1.0.0", "")));
    assert_eq!(code, 0, "{out}");
    assert!(serving(port).starts_with("hello 1.0.0"));
    let load = Load::start(port, 4);
    poll(Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .expect("load flows");
    let (code, out) = deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1.1.0", "")));
    assert_eq!(code, 0, "{out}");
    poll(Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 400).then_some(())
    })
    .expect("load continues");
    let (ok, failed, bodies) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(
        bodies.iter().any(|b| b.starts_with("hello 1.0.0"))
            && bodies.iter().any(|b| b.starts_with("hello 1.1.0"))
    );
    let status = s.get("/api/v1/services/web").json();
    assert_eq!(status["active"], 2);
    assert_eq!(status["instances"].as_array().map(Vec::len), Some(3));
    assert!(
        status["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["revision"] == 2)
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
    assert_eq!(
        s.get("/api/v1/containers").json(),
        serde_json::json!([]),
        "rm removed every instance"
    );
}

#[test]
fn a_revision_that_fails_readiness_is_rolled_back_without_a_failed_request() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", ""))).0,
        0
    );
    let load = Load::start(port, 4);
    let broken = spec(port, "hello:1", "")
        .replace("progress_deadline = \"20s\"", "progress_deadline = \"3s\"")
        + "[env]\nHELLO_FAIL_HEALTH = \"1\"\n";
    let (code, out) = deploy(&s, &write_spec(dir.path(), &broken));
    assert_eq!(code, 2, "rolled back: {out}");
    assert!(out.contains("never became ready"), "{out}");
    let (ok, failed, _) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    let status = s.get("/api/v1/services/web").json();
    assert_eq!(status["active"], 1);
    assert_eq!(status["revisions"][1]["status"], "rolled-back");
    assert!(
        status["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["revision"] == 1)
    );
    // A revision that crashes at start is rolled back too.
    let crashing = spec(port, "hello:1", "") + "[env]\nHELLO_CRASH_AFTER_MS = \"0\"\n";
    let (code, out) = deploy(&s, &write_spec(dir.path(), &crashing));
    assert_eq!(code, 2, "{out}");
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn canary_returning_errors_is_aborted_by_the_analysis_and_rolled_back() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let canary = "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 50, pause = \"20s\" }, { weight = 100, pause = \"1s\" }]\n[analysis]\nmax_error_rate = 0.05\nmin_requests = 30\n";
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", canary))).0,
        0
    );
    let load = Load::start(port, 4);
    let bad = spec(port, "hello:2", canary) + "[env]\nHELLO_ERROR_RATE = \"0.2\"\n";
    let (code, out) = deploy(&s, &write_spec(dir.path(), &bad));
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("analysis failed: error rate"), "{out}");
    let (_, failed, bodies) = load.finish();
    assert!(
        failed > 0,
        "the canary's injected errors were seen (and counted by the analysis)"
    );
    assert!(
        bodies.iter().any(|b| b.starts_with("hello 2")),
        "the canary got traffic"
    );
    assert!(serving(port).starts_with("hello 1"));
    let status = s.get("/api/v1/services/web").json();
    assert_eq!(status["active"], 1);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn blue_green_switches_at_once_without_failed_requests() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let bg = "[strategy]\ntype = \"blue-green\"\nscale_down_delay = \"1s\"\n";
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", bg))).0,
        0
    );
    let load = Load::start(port, 4);
    let (code, out) = deploy(&s, &write_spec(dir.path(), &spec(port, "hello:2", bg)));
    assert_eq!(code, 0, "{out}");
    let (ok, failed, bodies) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} failed", ok + failed);
    // Once switched, v1 never answers again.
    let first_v2 = bodies
        .iter()
        .position(|b| b.starts_with("hello 2"))
        .expect("v2 served");
    let late_v1 = bodies[first_v2..]
        .iter()
        .filter(|b| b.starts_with("hello 1"))
        .count();
    assert!(
        late_v1 < 8,
        "at most the requests already in flight on each client go to v1 after the switch: {late_v1}"
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn an_open_event_stream_survives_a_rollout() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let extra = "";
    let mut sp =
        spec(port, "hello:1", extra).replace("drain_timeout = \"5s\"", "drain_timeout = \"8s\"");
    assert_eq!(deploy(&s, &write_spec(dir.path(), &sp)).0, 0);
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .write_all(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut reader = BufReader::new(stream);
    let mut ticks = Vec::new();
    let mut line = String::new();
    while ticks.is_empty() {
        line.clear();
        reader.read_line(&mut line).expect("read");
        if line.starts_with("data:") {
            ticks.push(line.clone());
        }
    }
    sp = sp.replace("hello:1", "hello:2");
    let spec_path = write_spec(dir.path(), &sp);
    let deployer = std::thread::spawn({
        let file = spec_path.clone();
        let host = s.host();
        move || {
            std::process::Command::new(BIN)
                .args(["--server", &format!("http://{host}"), "deploy", &file])
                .status()
                .expect("deploy")
        }
    });
    // Ticks keep coming from the same v1 instance while (and after) v2 rolls out.
    while ticks.len() < 5 {
        line.clear();
        reader
            .read_line(&mut line)
            .expect("the stream stays open during the rollout");
        if line.starts_with("data:") {
            ticks.push(line.clone());
        }
    }
    let status = deployer.join().expect("join");
    let instance = |t: &str| t.split_whitespace().nth(3).map(str::to_owned);
    assert!(
        ticks
            .iter()
            .all(|t| instance(t) == instance(&ticks[0]) && t.contains(" 1 ")),
        "{ticks:?}"
    );
    // The rollout waited for the stream's drain, or finished around it; either way it went live.
    assert!(status.success());
    assert!(serving(port).starts_with("hello 2"));
    drop(reader);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn pushes_matching_the_semver_policy_roll_out_and_others_do_not() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1.0.0", "1.0.0");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let sp = spec(port, "hello:1.0.0", "") + "[trigger]\nsemver = \"^1\"\n";
    assert_eq!(deploy(&s, &write_spec(dir.path(), &sp)).0, 0);
    pack_hello(&s, "hello:2.0.0", "2.0.0");
    pack_hello(&s, "hello:1.1.0", "1.1.0");
    let live = poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        (st["active"] == 2 && serving(port).starts_with("hello 1.1.0")).then_some(st)
    })
    .expect("the push of 1.1.0 rolled out by itself");
    // 2.0.0 (pushed first) did not match ^1 and made no revision.
    let images: Vec<String> = live["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .map(|r| r["spec_image"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(images, ["hello:1.0.0", "hello:1.1.0"]);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn a_daemon_killed_mid_rollout_converges_after_restart() {
    let mut s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", ""))).0,
        0
    );
    let slow = spec(port, "hello:1", "") + "[env]\nHELLO_START_DELAY_MS = \"4000\"\n";
    let (code, _, err) = cli(
        BIN,
        &s,
        &["deploy", "--detach", &write_spec(dir.path(), &slow)],
    );
    assert_eq!(code, 0, "{err}");
    poll(Duration::from_secs(10), || {
        let st = s.get("/api/v1/services/web").json();
        st["instances"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x["revision"] == 2))
            .then_some(())
    })
    .expect("revision 2 started an instance");
    s.crash_and_restart();
    let st = poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        let insts = st["instances"].as_array().cloned().unwrap_or_default();
        let stopped = st["stopping"].as_array().is_some_and(Vec::is_empty);
        (st["active"] == 1
            && stopped
            && insts.len() == 3
            && insts.iter().all(|i| i["revision"] == 1))
        .then_some(st)
    })
    .expect("converged back to revision 1 with 3 instances");
    assert_eq!(st["revisions"][1]["status"], "rolled-back");
    assert!(serving(port).starts_with("hello 1"));
    let containers = s.get("/api/v1/containers").json();
    assert_eq!(
        containers.as_array().map(Vec::len),
        Some(3),
        "no revision-2 container was left: {containers}"
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn invalid_specs_are_refused_before_anything_changes() {
    let s = TestServer::start(BIN);
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let cases = [
        (
            spec(port, "hello:1", "").replace("replicas = 3", "replicas = 3\nreplicaz = 2"),
            "unknown field `replicaz`",
        ),
        (
            spec(port, "hello:1", "").replace("\"5s\"", "\"soon\""),
            "line",
        ),
        (
            spec(
                port,
                "hello:1",
                "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 50 }, { weight = 20 }]",
            ),
            "strategy.steps[1].weight",
        ),
        (spec(port, "nothing:here", ""), "not in Slipway's registry"),
    ];
    for (text, want) in cases {
        let (code, out) = deploy(&s, &write_spec(dir.path(), &text));
        assert_ne!(code, 0);
        assert!(out.contains(want), "expected {want:?} in {out}");
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr").port();
    pack_hello(&s, "hello:1", "1");
    let (code, out) = deploy(&s, &write_spec(dir.path(), &spec(busy, "hello:1", "")));
    assert_ne!(code, 0);
    assert!(out.contains("ingress.listen"), "{out}");
    assert_eq!(s.get("/api/v1/services").json(), serde_json::json!([]));
    assert_eq!(s.get("/api/v1/containers").json(), serde_json::json!([]));
}

#[test]
fn a_canary_held_for_an_hour_is_promoted_by_hand() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let canary = "[strategy]\ntype = \"canary\"\nsteps = [{ weight = 50, pause = \"1h\" }]\n";
    let sp = spec(port, "hello:1", canary)
        .replace("progress_deadline = \"20s\"", "progress_deadline = \"2h\"");
    assert_eq!(deploy(&s, &write_spec(dir.path(), &sp)).0, 0);
    let (code, _, err) = cli(BIN, &s, &["service", "promote", "web"]);
    assert!(
        code != 0 && err.contains("no rollout is in progress"),
        "{err}"
    );
    let (code, _, err) = cli(
        BIN,
        &s,
        &[
            "deploy",
            "--detach",
            &write_spec(dir.path(), &sp.replace("hello:1", "hello:2")),
        ],
    );
    assert_eq!(code, 0, "{err}");
    poll(Duration::from_secs(20), || {
        let st = s.get("/api/v1/services/web").json();
        st["weights"]
            .as_array()
            .is_some_and(|w| w.iter().any(|x| x[0] == 2 && x[1] == 50))
            .then_some(())
    })
    .expect("the canary reached 50%");
    let (code, _, err) = cli(BIN, &s, &["service", "pause", "web"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(cli(BIN, &s, &["service", "resume", "web"]).0, 0);
    assert_eq!(cli(BIN, &s, &["service", "promote", "web"]).0, 0);
    poll(Duration::from_secs(20), || {
        (s.get("/api/v1/services/web").json()["active"] == 2).then_some(())
    })
    .expect("promoted");
    assert!(serving(port).starts_with("hello 2"));
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn a_service_on_another_registry_rolls_out_when_polling_finds_a_new_tag() {
    let s = TestServer::start(BIN);
    let dist = slipway_testkit::Distribution::start();
    let remote = dist.as_ref().map(|d| d.host.clone()).unwrap_or_default();
    let pushed = dist.is_some();
    let push = |version: &str| {
        cli(
            BIN,
            &s,
            &[
                "image",
                "pack",
                "-q",
                "--to",
                &remote,
                "--tag",
                &format!("hello:{version}"),
                "--entrypoint",
                "/hello",
                "--env",
                &format!("HELLO_VERSION={version}"),
                &format!("{}:/hello", hello_bin().display()),
            ],
        )
        .0 == 0
    };
    let result = (|| {
        if !(pushed && push("1.0.0")) {
            return Err("Distribution did not take the image".to_owned());
        }
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let port = free_port();
        let sp = spec(port, &format!("{remote}/hello:1.0.0"), "")
            + "[trigger]\nsemver = \"^1\"\npoll_interval = \"300ms\"\n";
        let (code, out) = deploy(&s, &write_spec(dir.path(), &sp));
        if code != 0 {
            return Err(out);
        }
        if !push("1.1.0") {
            return Err("push of 1.1.0 failed".into());
        }
        poll(Duration::from_secs(30), || {
            (s.get("/api/v1/services/web").json()["active"] == 2
                && serving(port).starts_with("hello 1.1.0"))
            .then_some(())
        })
        .ok_or_else(|| format!("no rollout: {}", s.get("/api/v1/services/web").json()))
    })();
    let _ = cli(BIN, &s, &["service", "rm", "web"]);
    drop(dist);
    result.expect("polling the other registry rolled 1.1.0 out");
}

#[test]
fn deploying_an_unchanged_spec_again_creates_no_revision() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let file = write_spec(dir.path(), &spec(free_port(), "hello:1", ""));
    assert_eq!(deploy(&s, &file).0, 0);
    let (code, out) = deploy(&s, &file);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("revision 1 is live"), "{out}");
    let v = s.get("/api/v1/services/web").json();
    assert_eq!(v["revisions"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["active"], 1);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

/// Packs busybox httpd, which ignores SIGTERM as PID 1 (as many real servers
/// do), serving `/www` on `$PORT`; `/healthz` answers 200.
fn pack_httpd(s: &TestServer, tag: &str, body: &str) -> tempfile::TempDir {
    let www = tempfile::tempdir().expect("tmp");
    std::fs::write(www.path().join("index.html"), body).expect("index");
    std::fs::write(www.path().join("healthz"), "ok").expect("healthz");
    let www_input = format!("{}:/www", www.path().display());
    let (code, _, err) = cli(
        BIN,
        s,
        &[
            "image",
            "pack",
            "-q",
            "--tag",
            tag,
            "--entrypoint",
            "/bin/busybox",
            "--entrypoint",
            "sh",
            "--entrypoint=-c",
            "--entrypoint",
            "exec /bin/busybox httpd -f -p $PORT -h /www",
            "/bin/busybox:/bin/busybox",
            &www_input,
        ],
    );
    assert_eq!(code, 0, "pack httpd: {err}");
    www
}

/// Deploys `file` and returns how long the CLI took to see the outcome.
fn timed_deploy(s: &TestServer, file: &str) -> Duration {
    let t = std::time::Instant::now();
    let (code, out) = deploy(s, file);
    assert_eq!(code, 0, "{out}");
    t.elapsed()
}

#[test]
fn a_server_that_ignores_sigterm_rolls_over_as_fast_as_one_that_exits_at_once() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let _w1 = pack_httpd(&s, "httpd:1", "one");
    let _w2 = pack_httpd(&s, "httpd:2", "two");
    let dir = tempfile::tempdir().expect("tmp");
    let hello_port = free_port();
    let hello = |img: &str| spec(hello_port, img, "").replace("name = \"web\"", "name = \"hi\"");
    timed_deploy(&s, &write_spec(dir.path(), &hello("hello:1")));
    let hello_time = timed_deploy(&s, &write_spec(dir.path(), &hello("hello:2")));

    let port = free_port();
    let httpd = |img: &str| spec(port, img, "");
    timed_deploy(&s, &write_spec(dir.path(), &httpd("httpd:1")));
    let load = Load::start(port, 4);
    poll(Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .expect("load flows");
    let httpd_time = timed_deploy(&s, &write_spec(dir.path(), &httpd("httpd:2")));
    let (ok, failed, bodies) = load.finish();
    eprintln!("rolling 3 replicas: hello {hello_time:?}, httpd ignoring SIGTERM {httpd_time:?}");
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    assert!(bodies.iter().any(|b| b == "two"), "the new revision served");
    // Waiting on one dying instance would take the whole stop timeout (10 s,
    // SIGTERM being ignored); the rollout must end well before it. (Comparing
    // with hello's time is too tight on a loaded machine: httpd starts slower.)
    assert!(
        httpd_time < Duration::from_secs(8),
        "the rollout waited on dying processes: {httpd_time:?} (hello's took {hello_time:?})"
    );
    // The old instances are stopped in the background: SIGTERM is ignored, so the
    // stop timeout (10 s) ends each with SIGKILL.
    let st = s.get("/api/v1/services/web").json();
    assert!(
        st["stopping"].as_array().is_some_and(|a| !a.is_empty()),
        "old instances still stopping right after the rollout: {st}"
    );
    poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        st["stopping"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    })
    .expect("the old instances are gone after the stop timeout");
    assert_eq!(
        s.get("/api/v1/containers").json().as_array().map(Vec::len),
        Some(6)
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "hi"]).0, 0);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
    assert_eq!(s.get("/api/v1/containers").json(), serde_json::json!([]));
}

#[test]
fn a_client_killed_during_rollback_still_leaves_a_completed_rollback() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let slow = |img: &str| spec(port, img, "") + "[env]\nHELLO_START_DELAY_MS = \"700\"\n";
    assert_eq!(deploy(&s, &write_spec(dir.path(), &slow("hello:1"))).0, 0);
    assert_eq!(deploy(&s, &write_spec(dir.path(), &slow("hello:2"))).0, 0);
    let mut child = std::process::Command::new(BIN)
        .args([
            "--server",
            &format!("http://{}", s.host()),
            "rollback",
            "web",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    // Kill the client as soon as the server accepted the rollback (Ctrl-C would
    // do the same): its first line says so.
    let mut first = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut first)
        .expect("read");
    child.kill().expect("kill");
    let _ = child.wait();
    let st = poll(Duration::from_secs(60), || {
        let st = s.get("/api/v1/services/web").json();
        (st["active"] == 3 && st["phase"] == "idle").then_some(st)
    })
    .unwrap_or_else(|| {
        panic!(
            "the rollback finished: {}",
            s.get("/api/v1/services/web").json()
        )
    });
    assert_eq!(st["revisions"][2]["spec_image"], "hello:1", "{st}");
    assert!(serving(port).starts_with("hello 1"));
    assert_eq!(st["instances"].as_array().map(Vec::len), Some(3));
    assert_eq!(st["replicas"], 3);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn ingress_changes_take_effect_without_dropping_open_connections() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", ""))).0,
        0
    );
    let st = s.get("/api/v1/services/web").json();
    assert_eq!(st["proxy"]["balance"], "round-robin", "{st}");
    assert_eq!(st["proxy"]["hold_timeout_ms"], 10_000);
    let mut conn = None;
    assert_eq!(one_request(&mut conn, port).expect("request").0, 200);
    let changed = spec(port, "hello:1", "").replace(
        "[ingress]\n",
        "[ingress]\nbalance = \"least-requests\"\nhold_timeout = \"3s\"\n",
    );
    let (code, out) = deploy(&s, &write_spec(dir.path(), &changed));
    assert_eq!(code, 0, "{out}");
    let st = s.get("/api/v1/services/web").json();
    assert_eq!(st["proxy"]["balance"], "least-requests", "{st}");
    assert_eq!(st["proxy"]["hold_timeout_ms"], 3_000);
    // The connection opened before the change still serves.
    assert_eq!(
        one_request(&mut conn, port).expect("same connection").0,
        200
    );
    // The ingress moves to another address: the new one serves, the old one
    // takes no new connections, and the connection opened on it still serves.
    let moved_to = free_port();
    let moved = changed.replace(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{moved_to}"),
    );
    let (code, out) = deploy(&s, &write_spec(dir.path(), &moved));
    assert_eq!(code, 0, "{out}");
    assert!(serving(moved_to).starts_with("hello 1"));
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the old address no longer accepts"
    );
    assert_eq!(
        one_request(&mut conn, port).expect("the old connection").0,
        200
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn sigkill_of_a_replica_every_two_seconds_under_load_fails_no_request() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let (code, out) = deploy(
        &s,
        &write_spec(
            dir.path(),
            &spec(port, "hello:1", "env = { HELLO_SLOW_MS = \"30\" }"),
        ),
    );
    assert_eq!(code, 0, "{out}");
    let load = Load::start(port, 8);
    poll(Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .expect("load flows");
    let mut killed = Vec::new();
    for round in 0..4 {
        // A running instance not killed before, and its process.
        let (id, pid) = poll(Duration::from_secs(20), || {
            let st = s.get("/api/v1/containers").json();
            st.as_array()?.iter().find_map(|c| {
                let id = c["name"].as_str()?.to_owned();
                let pid = c["pid"].as_u64()?;
                (c["status"] == "running" && !killed.contains(&id)).then_some((id, pid))
            })
        })
        .expect("a running instance");
        let before = load.ok.load(Ordering::Relaxed);
        let k = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(k.success(), "round {round}: kill -9 {pid}");
        killed.push(id);
        // Two seconds of load before the next kill.
        poll(Duration::from_secs(10), || {
            (load.ok.load(Ordering::Relaxed) > before + 100).then_some(())
        })
        .expect("load continues");
        std::thread::sleep(Duration::from_secs(2));
    }
    let (ok, failed, _) = load.finish();
    assert_eq!(failed, 0, "{failed} of {} requests failed", ok + failed);
    // Back to 3 ready instances, none of them a killed one.
    poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        let insts = st["instances"].as_array()?.clone();
        (insts.len() == 3
            && insts
                .iter()
                .all(|i| !killed.iter().any(|k| i["id"] == k.as_str())))
        .then_some(())
    })
    .expect("three fresh instances serve");
    let metrics = String::from_utf8_lossy(&s.get("/metrics").body).into_owned();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("slipway_proxy_retries_total{") && !l.ends_with(" 0")),
        "the retries are counted:\n{metrics}"
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn rm_removes_only_containers_and_service_logs_merge_every_instance() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", ""))).0,
        0
    );
    let (code, _, err) = cli(BIN, &s, &["rm", "web"]);
    assert_eq!(code, 5, "no container is named web: {err}");
    assert!(err.contains("no container named \"web\""), "{err}");
    assert_eq!(
        s.get("/api/v1/services/web").json()["active"],
        1,
        "the service stays"
    );
    let (code, out, err) = cli(BIN, &s, &["service", "logs", "web", "--tail", "5"]);
    assert_eq!(code, 0, "{err}");
    let st = s.get("/api/v1/services/web").json();
    for i in st["instances"].as_array().expect("instances") {
        let id = i["id"].as_str().expect("id");
        assert!(out.contains(&format!("{id} | hello ")), "{id} in {out}");
    }
    let (code, out, _) = cli(BIN, &s, &["service", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v[0]["name"], "web");
    let (code, _, err) = cli(BIN, &s, &["service", "status", "nope"]);
    assert_eq!(code, 5, "{err}");
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn a_data_directory_of_the_previous_release_opens_with_its_services_intact() {
    let data = tempfile::tempdir().expect("tmp");
    let digest = {
        let s = TestServer::start_on(BIN, data.path(), &[]);
        slipway_testkit::pack(
            BIN,
            &s,
            "hello:1",
            "/hello",
            &["--env", "HELLO_VERSION=1"],
            &format!("{}:/hello", hello_bin().display()),
        )
    };
    let port = free_port();
    let spec = format!(
        r#"{{"name":"web","image":"hello:1","replicas":2,"env":{{}},"memory":null,"cpus":null,"volumes":[],"ingress":{{"listen":"127.0.0.1:{port}","hold_timeout":"10s","balance":"round-robin"}},"health":{{"readiness":null,"liveness":null,"startup":null}},"strategy":{{"type":"rolling","max_surge":1,"max_unavailable":0}},"drain_timeout":"30s","progress_deadline":"5m","analysis":{{"max_error_rate":0.01,"max_p99":null,"min_requests":20}},"trigger":null,"autoscale":null}}"#
    );
    // Exactly what the previous release wrote: spec and state side by side.
    let legacy = format!(
        r#"{{"spec":{spec},"state":{{"name":"web","revisions":[{{"number":1,"image":"hello@{digest}","spec":{spec},"status":"active","message":null,"created_ms":1}}],"active":1,"instances":[],"phase":"revision 1 is live with 2 instances","weights":[[1,100]]}}}}"#
    );
    std::fs::create_dir_all(data.path().join("services")).expect("mkdir");
    std::fs::write(data.path().join("services/web.json"), legacy).expect("write");
    let s = TestServer::start_on(BIN, data.path(), &[]);
    let st = poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        (st["active"] == 1 && st["instances"].as_array().is_some_and(|i| i.len() == 2))
            .then_some(st)
    })
    .unwrap_or_else(|| panic!("recovered: {}", s.get("/api/v1/services/web").json()));
    assert_eq!(st["revisions"][0]["image"], format!("hello@{digest}"));
    assert!(serving(port).starts_with("hello 1"));
    assert!(data.path().join("services/web.json.migrated").exists());
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

/// The cgroup leaves (runc ids) of this service's containers on one hierarchy.
fn cgroups_of(prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/pids/slipway")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect();
    v.sort();
    v
}

#[test]
fn a_daemon_killed_at_random_moments_converges_every_time_with_nothing_orphaned() {
    let mut s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let svc = |img: &str, replicas: u32| {
        spec(port, img, "")
            .replace("name = \"web\"", "name = \"crashy\"")
            .replace("replicas = 3", &format!("replicas = {replicas}"))
            + "[env]\nHELLO_START_DELAY_MS = \"300\"\n"
    };
    assert_eq!(deploy(&s, &write_spec(dir.path(), &svc("hello:1", 2))).0, 0);
    let mut seen_revisions = 1;
    let mut seen_active = 1;
    // A fixed sequence of moments, spread over the operations' lifetimes.
    let delays = [150u64, 900, 400, 1300, 50, 700, 1100, 250, 600, 1500];
    for (round, delay) in delays.iter().enumerate() {
        let args: Vec<String> = match round % 3 {
            0 => {
                let img = if round % 2 == 0 { "hello:2" } else { "hello:1" };
                let f = write_spec(dir.path(), &svc(img, 2 + (round as u32 % 2)));
                vec!["deploy".into(), "--detach".into(), f]
            }
            1 => vec!["rollback".into(), "crashy".into(), "--detach".into()],
            _ => vec![
                "scale".into(),
                "crashy".into(),
                (1 + round % 4).to_string(),
                "--detach".into(),
            ],
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let _ = cli(BIN, &s, &args);
        // A scenario's moment, not a wait for something: the kill lands wherever
        // the operation is.
        std::thread::sleep(Duration::from_millis(*delay));
        s.crash_and_restart();
        let st = poll(Duration::from_secs(60), || {
            let st = s.get("/api/v1/services/crashy").json();
            let active = st["active"].as_u64()?;
            let want = st["revisions"]
                .as_array()?
                .iter()
                .find(|r| r["number"] == active)?["replicas"]
                .as_u64()?;
            let insts = st["instances"].as_array()?;
            (st["phase"] == "idle"
                && st["stopping"].as_array().is_some_and(Vec::is_empty)
                && insts.len() as u64 == want
                && insts.iter().all(|i| i["revision"] == active))
            .then_some(st)
        })
        .unwrap_or_else(|| {
            panic!(
                "round {round}: did not converge: {}",
                s.get("/api/v1/services/crashy").json()
            )
        });
        let revisions = st["revisions"].as_array().map_or(0, Vec::len);
        let active = st["active"].as_u64().unwrap_or(0);
        assert!(
            revisions >= seen_revisions,
            "round {round}: revisions went backwards"
        );
        assert!(
            active >= seen_active,
            "round {round}: the active revision went backwards"
        );
        (seen_revisions, seen_active) = (revisions, active);
        // Exactly the instances, no orphan container or cgroup.
        let mut ids: Vec<String> = s
            .get("/api/v1/containers")
            .json()
            .as_array()
            .expect("containers")
            .iter()
            .filter(|c| c["name"].as_str().is_some_and(|n| n.starts_with("crashy-")))
            .map(|c| c["id"].as_str().unwrap_or_default().to_owned())
            .collect();
        ids.sort();
        assert_eq!(
            ids.len(),
            st["instances"].as_array().map_or(0, Vec::len),
            "round {round}: {st}"
        );
        if std::path::Path::new("/sys/fs/cgroup/pids/slipway").exists() {
            assert_eq!(
                cgroups_of("crashy-"),
                ids,
                "round {round}: cgroups match containers"
            );
        }
        assert!(
            serving(port).starts_with("hello "),
            "round {round}: serving"
        );
    }
    assert_eq!(cli(BIN, &s, &["service", "rm", "crashy"]).0, 0);
}

#[test]
fn every_admin_api_error_has_one_shape_with_its_kind_and_field() {
    let s = TestServer::start(BIN);
    let json = [("content-type", "application/json")];
    let check = |r: slipway_testkit::Response, status: u16, kind: &str, field: Option<&str>| {
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["error"]["kind"], kind, "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        match field {
            Some(f) => assert_eq!(v["error"]["field"], f, "{v}"),
            None => assert!(v["error"].get("field").is_none(), "{v}"),
        }
    };
    let port = free_port();
    let bad_replicas = format!(
        r#"{{"spec":{{"name":"web","image":"hello:1","replicas":0,"ingress":{{"listen":"127.0.0.1:{port}"}}}}}}"#
    );
    check(
        s.request("POST", "/api/v1/services", &json, bad_replicas.as_bytes()),
        400,
        "invalid_argument",
        Some("replicas"),
    );
    check(s.get("/api/v1/services/nope"), 404, "not_found", None);
    check(
        s.request(
            "POST",
            "/api/v1/services/nope/scale",
            &json,
            br#"{"replicas":0}"#,
        ),
        400,
        "invalid_argument",
        Some("replicas"),
    );
    check(
        s.request("POST", "/api/v1/services/nope/rollback", &json, b"{}"),
        404,
        "not_found",
        None,
    );
    check(s.get("/api/v1/no-such-endpoint"), 404, "not_found", None);
    check(
        s.request(
            "POST",
            "/api/v1/containers",
            &json,
            br#"{"image":"x","memory":"lots"}"#,
        ),
        400,
        "invalid_argument",
        Some("memory"),
    );
    // The events stream filters by service and is NDJSON.
    let r = s.get("/api/v1/events?service=nope");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    assert!(r.body.is_empty(), "nothing happened to nope");
}

#[test]
fn a_revision_without_a_linux_amd64_image_is_rejected_before_anything_starts() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    assert_eq!(s.push_index("hello", "arm", "1", "arm64"), 201);
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    assert_eq!(
        deploy(&s, &write_spec(dir.path(), &spec(port, "hello:1", ""))).0,
        0
    );
    let (code, out) = deploy(&s, &write_spec(dir.path(), &spec(port, "hello:arm", "")));
    assert_eq!(code, 4, "rejected: {out}");
    assert!(
        out.contains("was rejected") && out.contains("linux/amd64"),
        "{out}"
    );
    let st = s.get("/api/v1/services/web").json();
    assert_eq!(st["revisions"][1]["status"], "rejected", "{st}");
    assert_eq!(st["active"], 1);
    assert!(
        st["instances"]
            .as_array()
            .expect("instances")
            .iter()
            .all(|i| i["revision"] == 1)
    );
    assert!(
        serving(port).starts_with("hello 1"),
        "revision 1 still serves"
    );
    let (_, text, _) = cli(BIN, &s, &["status", "web"]);
    assert!(
        text.contains("rejected"),
        "status shows the rejection: {text}"
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn pushes_of_1_2_then_1_1_during_a_rollout_end_on_1_2_with_no_downgrade() {
    let s = TestServer::start(BIN);
    for v in ["1.0.0", "1.0.1"] {
        pack_hello(&s, &format!("hello:{v}"), v);
    }
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let sp = |img: &str| {
        spec(port, img, "") + "[trigger]\nsemver = \"^1\"\n[env]\nHELLO_START_DELAY_MS = \"600\"\n"
    };
    assert_eq!(deploy(&s, &write_spec(dir.path(), &sp("hello:1.0.0"))).0, 0);
    // A slow rollout is in progress when two pipelines finish out of order.
    let (code, _, err) = cli(
        BIN,
        &s,
        &["deploy", "-d", &write_spec(dir.path(), &sp("hello:1.0.1"))],
    );
    assert_eq!(code, 0, "{err}");
    pack_hello(&s, "hello:1.2.0", "1.2.0");
    pack_hello(&s, "hello:1.1.0", "1.1.0");
    let st = poll(Duration::from_secs(60), || {
        let st = s.get("/api/v1/services/web").json();
        let live = st["revisions"]
            .as_array()?
            .iter()
            .find(|r| r["number"] == st["active"])?["spec_image"]
            .as_str()?
            .to_owned();
        (live == "hello:1.2.0" && st["phase"] == "idle").then_some(st)
    })
    .unwrap_or_else(|| panic!("1.2.0 went live: {}", s.get("/api/v1/services/web").json()));
    // Give a stray 1.1.0 the time it would take to show up, then check it never did.
    let later = poll(Duration::from_secs(3), || {
        let v = s.get("/api/v1/services/web").json();
        (v["revisions"] != st["revisions"]).then_some(v)
    });
    assert!(later.is_none(), "nothing came after 1.2.0: {later:?}");
    let images: Vec<&str> = st["revisions"]
        .as_array()
        .expect("revisions")
        .iter()
        .filter_map(|r| r["spec_image"].as_str())
        .collect();
    assert_eq!(images.last(), Some(&"hello:1.2.0"), "{images:?}");
    assert!(
        !images.contains(&"hello:1.1.0"),
        "never downgraded: {images:?}"
    );
    assert!(serving(port).starts_with("hello 1.2.0"));
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn a_deploy_during_a_heal_waits_its_turn_and_succeeds() {
    let s = TestServer::start(BIN);
    pack_hello(&s, "hello:1", "1");
    pack_hello(&s, "hello:2", "2");
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let sp = |img: &str| spec(port, img, "") + "[env]\nHELLO_START_DELAY_MS = \"1500\"\n";
    assert_eq!(deploy(&s, &write_spec(dir.path(), &sp("hello:1"))).0, 0);
    let st = s.get("/api/v1/services/web").json();
    let victim = st["instances"][0]["id"].as_str().expect("id").to_owned();
    let pid = s.get(&format!("/api/v1/containers/{victim}")).json()["pid"]
        .as_u64()
        .expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    poll(Duration::from_secs(20), || {
        (s.get("/api/v1/services/web").json()["phase"] == "healing").then_some(())
    })
    .expect("the heal started");
    let (code, out) = deploy(&s, &write_spec(dir.path(), &sp("hello:2")));
    assert_eq!(
        code, 0,
        "a deploy during a heal is queued, not refused: {out}"
    );
    assert!(out.contains("queued"), "{out}");
    let st = s.get("/api/v1/services/web").json();
    assert_eq!(st["active"], 2, "{st}");
    assert!(serving(port).starts_with("hello 2"));
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn gc_removes_the_snapshots_of_a_removed_service_and_keeps_those_of_recent_revisions() {
    let s = TestServer::start(BIN);
    let dir = tempfile::tempdir().expect("tmp");
    // Three versions whose layers differ (a version file beside the binary).
    let hello = format!("{}:/hello", hello_bin().display());
    for v in 1..=3 {
        let f = dir.path().join(format!("version-{v}"));
        std::fs::write(&f, format!("{v}\n")).expect("write");
        let file = format!("{}:/version", f.display());
        let tag = format!("app:{v}");
        let env = format!("HELLO_VERSION={v}");
        slipway_testkit::pack(BIN, &s, &tag, "/hello", &["--env", &env, &hello], &file);
    }
    let port = free_port();
    for v in 1..=3 {
        let body = spec(port, &format!("app:{v}"), "").replace("replicas = 3", "replicas = 1");
        let (code, out) = deploy(&s, &write_spec(dir.path(), &body));
        assert_eq!(code, 0, "{out}");
    }
    let snapshots = s.data.join("runtime/snapshots/sha256");
    let count = || std::fs::read_dir(&snapshots).expect("snapshots").count();
    assert_eq!(count(), 3, "one snapshot per version");
    // Revisions 1 and 2 may be rolled back to: their snapshots stay.
    let (code, out, err) = cli(BIN, &s, &["gc"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("runtime: freed 0 bytes: 0 unused layer snapshots"),
        "{out}"
    );
    assert_eq!(count(), 3);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
    let (code, out, err) = cli(BIN, &s, &["gc", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("3 unused layer snapshots"), "{out}");
    assert_eq!(count(), 3, "a dry run removes nothing");
    let (code, out, err) = cli(BIN, &s, &["gc", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(
        report["snapshots"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert!(
        report["runtime_bytes_freed"].as_u64().unwrap_or(0) > 0,
        "{report}"
    );
    assert_eq!(count(), 0, "every unpacked layer is gone");
    // The images are still in the registry: deploying again unpacks anew.
    let body = spec(port, "app:3", "").replace("replicas = 3", "replicas = 1");
    let (code, out) = deploy(&s, &write_spec(dir.path(), &body));
    assert_eq!(code, 0, "{out}");
    assert_eq!(count(), 1);
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}
