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
    loop {
        let mut h = String::new();
        r.read_line(&mut h).map_err(|e| e.to_string())?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).map_err(|e| e.to_string())?;
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
        .map(|r| r["spec"]["image"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(images, ["hello:1.0.0", "hello:1.1.0"]);
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
        (st["active"] == 1 && insts.len() == 3 && insts.iter().all(|i| i["revision"] == 1))
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    let (code, _, err) = cli(BIN, &s, &["promote", "web"]);
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
    let (code, _, err) = cli(BIN, &s, &["pause", "web"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(cli(BIN, &s, &["resume", "web"]).0, 0);
    assert_eq!(cli(BIN, &s, &["promote", "web"]).0, 0);
    poll(Duration::from_secs(20), || {
        (s.get("/api/v1/services/web").json()["active"] == 2).then_some(())
    })
    .expect("promoted");
    assert!(serving(port).starts_with("hello 2"));
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
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
    let _ = cli(BIN, &s, &["rm", "web"]);
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
    assert_eq!(cli(BIN, &s, &["rm", "web"]).0, 0);
}
