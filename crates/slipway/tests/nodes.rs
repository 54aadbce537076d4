//! Beyond one machine: the control plane's state in a real etcd (Debian's
//! `etcd-server`, started by the test on loopback ports with its data in a temp dir).

use std::process::Command;
use std::time::Duration;

use slipway_testkit::{Etcd, TestServer, cli, free_port, http_get, poll};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn spec(port: u16) -> String {
    format!(
        "name = \"web\"\nimage = \"hello:1\"\nreplicas = 2\ndrain_timeout = \"2s\"\n[ingress]\nlisten = \"127.0.0.1:{port}\"\n[health.readiness]\nhttp = \"/healthz\"\ninterval = \"100ms\"\n"
    )
}

/// Deploys `web` (2 replicas of hello:1 on `port`) through `s`, asserting success.
fn deploy_web(s: &TestServer, port: u16) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("web.toml");
    std::fs::write(&file, spec(port)).expect("spec");
    let (code, out, err) = cli(BIN, s, &["deploy", &file.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
}

/// A killed control plane's own containers outlive it, as containers do: its
/// data directory, opened again alone, re-adopts them, and they are removed.
fn remove_containers_left_in(data: &std::path::Path) {
    let again = TestServer::start_on(BIN, data, &[]);
    let containers = again.get("/api/v1/containers").json();
    for c in containers.as_array().cloned().unwrap_or_default() {
        let name = c["name"].as_str().unwrap_or_default().to_owned();
        assert_eq!(cli(BIN, &again, &["rm", "-f", &name]).0, 0, "rm {name}");
    }
}

fn etcd_keys(etcd: &Etcd) -> String {
    let out = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([
            &format!("--endpoints=http://{}", etcd.host),
            "get",
            "--prefix",
            "--keys-only",
            "/slipway/",
        ])
        .output()
        .expect("etcdctl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn with_state_in_etcd_a_service_is_recorded_there_and_survives_a_crash_of_the_server() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let mut s = TestServer::start_with(BIN, &["--state", &etcd.url()]);
    slipway_testkit::pack_hello(BIN, &s, "hello:1", "1");
    let port = free_port();
    deploy_web(&s, port);
    assert!(
        etcd_keys(&etcd).contains("/slipway/"),
        "the service's record is in etcd: {:?}",
        etcd_keys(&etcd)
    );
    assert!(
        !s.data.join("state.redb").exists(),
        "no embedded state store beside etcd"
    );
    s.crash_and_restart();
    let st = poll(Duration::from_secs(30), || {
        let st = s.get("/api/v1/services/web").json();
        (st["active"] == 1 && st["instances"].as_array().is_some_and(|i| i.len() == 2))
            .then_some(st)
    })
    .expect("the restarted server loaded the service from etcd");
    assert_eq!(st["revisions"][0]["status"], "active", "{st}");
    let body = poll(Duration::from_secs(10), || {
        http_get(port, "/").filter(|r| r.status == 200)
    })
    .expect("serving again");
    assert!(String::from_utf8_lossy(&body.body).starts_with("hello 1"));
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
    assert!(
        !etcd_keys(&etcd).contains("web"),
        "removal deletes the record from etcd: {:?}",
        etcd_keys(&etcd)
    );
}

#[test]
fn an_unreachable_or_malformed_state_url_stops_serve_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tmp");
    for (url, expect) in [
        (
            format!("etcd://127.0.0.1:{}", free_port()),
            "cannot reach etcd",
        ),
        ("etcd://nowhere".to_owned(), "--state"),
    ] {
        let out = Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--state",
                &url,
                "--data",
            ])
            .arg(dir.path().join("data"))
            .output()
            .expect("runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{url}: serve must not start");
        assert!(err.contains(expect), "{url}: {err}");
    }
}

#[test]
fn when_the_leading_control_plane_is_killed_a_standby_takes_over_its_services() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let url = etcd.url();
    let mut a = TestServer::start_with(BIN, &["--state", &url]);
    slipway_testkit::pack_hello(BIN, &a, "hello:1", "1");
    let port = free_port();
    deploy_web(&a, port);

    // A second control plane on the same etcd stands by: it answers, but not for
    // services, which the leader runs. (Registries are still per server: the
    // same deterministic image goes to its own.)
    let b_dir = tempfile::tempdir().expect("tmp");
    let b = TestServer::start_on(BIN, &b_dir.path().join("data"), &["--state", &url]);
    slipway_testkit::pack_hello(BIN, &b, "hello:1", "1");
    let r = b.get("/api/v1/services/web");
    assert_eq!(r.status, 503, "a standby does not act on services");
    assert!(String::from_utf8_lossy(&r.body).contains("standby"));

    let killed = std::time::Instant::now();
    assert!(!a.signal_and_wait("KILL").success());
    let st = poll(Duration::from_secs(30), || {
        let r = b.get("/api/v1/services/web");
        let st = (r.status == 200).then(|| r.json())?;
        let ready = st["active"] == 1 && st["instances"].as_array().is_some_and(|i| i.len() == 2);
        (ready && http_get(port, "/").is_some_and(|r| r.status == 200)).then_some(st)
    })
    .expect("the standby took over and serves the service");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "taken over in {took:?} (lease TTL 5 s)"
    );
    assert_eq!(st["revisions"][0]["status"], "active", "{st}");
    assert_eq!(cli(BIN, &b, &["service", "rm", "web"]).0, 0);
    remove_containers_left_in(&a.data);
}

#[test]
fn a_rollout_left_by_a_killed_leader_is_rolled_back_by_the_standby() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let url = etcd.url();
    let mut a = TestServer::start_with(BIN, &["--state", &url]);
    let b_dir = tempfile::tempdir().expect("tmp");
    let b = TestServer::start_on(BIN, &b_dir.path().join("data"), &["--state", &url]);
    for s in [&a, &b] {
        slipway_testkit::pack_hello(BIN, s, "hello:1", "1");
    }
    let dir = tempfile::tempdir().expect("tmp");
    let port = free_port();
    let v1 = dir.path().join("v1.toml");
    std::fs::write(&v1, spec(port)).expect("spec");
    assert_eq!(cli(BIN, &a, &["deploy", &v1.display().to_string()]).0, 0);
    // Revision 2 starts instances that take 4 s to listen: the leader dies mid-rollout.
    let v2 = dir.path().join("v2.toml");
    std::fs::write(&v2, spec(port) + "[env]\nHELLO_START_DELAY_MS = \"4000\"\n").expect("spec");
    let (code, _, err) = cli(BIN, &a, &["deploy", "--detach", &v2.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    poll(Duration::from_secs(10), || {
        let st = a.get("/api/v1/services/web").json();
        st["instances"]
            .as_array()
            .is_some_and(|i| i.iter().any(|x| x["revision"] == 2))
            .then_some(())
    })
    .expect("revision 2 started an instance");
    let killed = std::time::Instant::now();
    assert!(!a.signal_and_wait("KILL").success());
    let st = poll(Duration::from_secs(30), || {
        let r = b.get("/api/v1/services/web");
        let st = (r.status == 200).then(|| r.json())?;
        let insts = st["instances"].as_array().cloned().unwrap_or_default();
        (st["active"] == 1 && insts.len() == 2 && insts.iter().all(|i| i["revision"] == 1))
            .then_some(st)
    })
    .expect("the standby rolled revision 2 back and runs revision 1");
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "{took:?}: lease TTL 5 s + 5 s"
    );
    assert_eq!(st["revisions"][1]["status"], "rolled-back", "{st}");
    assert!(
        poll(Duration::from_secs(10), || http_get(port, "/")
            .filter(|r| r.status == 200))
        .is_some(),
        "serving"
    );
    assert_eq!(cli(BIN, &b, &["service", "rm", "web"]).0, 0);
    remove_containers_left_in(&a.data);
}

#[test]
fn after_an_etcd_restart_the_leader_keeps_leading_and_nothing_is_lost() {
    let mut etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let s = TestServer::start_with(BIN, &["--state", &etcd.url()]);
    slipway_testkit::pack_hello(BIN, &s, "hello:1", "1");
    let port = free_port();
    deploy_web(&s, port);
    assert!(etcd.restart(), "etcd restarts");
    // The service is still there and still serves; a change goes through.
    let r = s.get("/api/v1/services/web");
    assert_eq!(r.status, 200, "the leader still leads");
    assert!(http_get(port, "/").is_some_and(|r| r.status == 200));
    let (code, out, err) = poll(Duration::from_secs(20), || {
        let r = cli(BIN, &s, &["scale", "web", "3"]);
        (r.0 == 0).then_some(r)
    })
    .unwrap_or_else(|| cli(BIN, &s, &["scale", "web", "3"]));
    assert_eq!(code, 0, "{out}{err}");
    let st = poll(Duration::from_secs(20), || {
        let st = s.get("/api/v1/services/web").json();
        (st["instances"].as_array().map(Vec::len) == Some(3)).then_some(st)
    })
    .expect("scaled to 3 after the restart");
    assert!(etcd_keys(&etcd).contains("/slipway/"), "{st}");
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

#[test]
fn a_server_is_a_node_that_can_be_listed_cordoned_and_uncordoned() {
    let s = TestServer::start_with(
        BIN,
        &["--node-name", "n1", "--node-labels", "zone=a,disk=ssd"],
    );
    let (code, out, err) = cli(BIN, &s, &["node", "ls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).expect("json");
    let me = &list[0];
    assert_eq!(
        (me["name"].as_str(), me["status"].as_str()),
        (Some("n1"), Some("ready"))
    );
    assert_eq!(me["labels"]["zone"], "a");
    assert_eq!(me["this"], true);
    assert!(me["cpus"].as_f64().is_some_and(|c| c >= 1.0), "{me}");
    assert!(
        me["memory_bytes"].as_u64().is_some_and(|m| m > 1 << 28),
        "{me}"
    );
    let (code, out, _) = cli(BIN, &s, &["node", "cordon", "n1"]);
    assert_eq!((code, out.contains("cordoned")), (0, true), "{out}");
    assert_eq!(s.get("/api/v1/nodes").json()[0]["status"], "cordoned");
    let (code, _, err) = cli(BIN, &s, &["node", "rm", "n1"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("stop it first"),
        "a live node is not forgotten: {err}"
    );
    assert_eq!(cli(BIN, &s, &["node", "uncordon", "n1"]).0, 0);
    assert_eq!(s.get("/api/v1/nodes").json()[0]["status"], "ready");
    let (code, _, err) = cli(BIN, &s, &["node", "cordon", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("no node named"), "{err}");
    let (code, out, _) = cli(BIN, &s, &["node", "ls"]);
    assert_eq!(code, 0);
    assert!(out.contains("n1 *") && out.contains("zone=a"), "{out}");
}

#[test]
fn a_killed_control_planes_node_goes_down_and_can_then_be_removed() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let url = etcd.url();
    // Short heartbeats: down after 0.5 s + 1.5 s + 0.5 s of silence.
    let cfg_dir = tempfile::tempdir().expect("tmp");
    let cfg = cfg_dir.path().join("slipway.toml");
    std::fs::write(
        &cfg,
        "[cluster]\nheartbeat_interval = \"500ms\"\nheartbeat_ttl = \"1500ms\"\ndown_grace = \"500ms\"\n",
    )
    .expect("config");
    let cfg = cfg.display().to_string();
    let mut a = TestServer::start_with(
        BIN,
        &["--state", &url, "--node-name", "a", "--config", &cfg],
    );
    let b_dir = tempfile::tempdir().expect("tmp");
    let b = TestServer::start_on(
        BIN,
        &b_dir.path().join("data"),
        &["--state", &url, "--node-name", "b", "--config", &cfg],
    );
    let status = |name: &str| {
        b.get("/api/v1/nodes").json().as_array().and_then(|l| {
            l.iter()
                .find(|n| n["name"] == name)
                .and_then(|n| n["status"].as_str().map(str::to_owned))
        })
    };
    assert_eq!(
        status("a").as_deref(),
        Some("ready"),
        "nodes see each other"
    );
    assert!(!a.signal_and_wait("KILL").success());
    poll(Duration::from_secs(20), || {
        (status("a").as_deref() == Some("down")).then_some(())
    })
    .expect("a goes down once its heartbeats stop");
    assert_eq!(status("b").as_deref(), Some("ready"));
    assert_eq!(cli(BIN, &b, &["node", "rm", "a"]).0, 0);
    assert_eq!(status("a"), None, "forgotten");
}

const JOIN: &str = "nodes-test-join-token-0123456789";

fn heartbeat(
    s: &TestServer,
    node: &str,
    auth: Option<&str>,
    body: &str,
) -> slipway_testkit::Response {
    let bearer = auth.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(b) = &bearer {
        headers.push(("Authorization", b.as_str()));
    }
    s.request(
        "POST",
        &format!("/api/v1/nodes/{node}/heartbeat"),
        &headers,
        body.as_bytes(),
    )
}

const BEAT: &str = r#"{"address":"127.0.0.1","api":"127.0.0.1:1","labels":{"zone":"a"},"cpus":2.0,"memory_bytes":1073741824,"exits":0}"#;

#[test]
fn heartbeats_need_the_join_token_and_a_well_formed_body_and_the_token_pulls_but_never_pushes() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let s = TestServer::start_secure(BIN, &["--state", &etcd.url(), "--join-token", JOIN]);
    let r = heartbeat(&s, "n1", None, BEAT);
    assert_eq!(r.status, 401, "no token");
    assert_eq!(r.json()["error"]["kind"], "unauthenticated");
    assert_eq!(
        heartbeat(&s, "n1", Some("wrong-token-wrong-token"), BEAT).status,
        401
    );
    let r = heartbeat(&s, "n1", Some(JOIN), "{\"address\":");
    assert_eq!(r.status, 400, "a malformed heartbeat");
    let r = heartbeat(&s, "n1", Some(JOIN), BEAT);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["cordoned"], false);
    let (code, out, err) = cli(BIN, &s, &["node", "ls"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("n1 ") && l.contains("ready") && l.contains("zone=a")),
        "{out}"
    );
    // The join token pulls any image and does nothing else.
    slipway_testkit::pack_hello(BIN, &s, "hello:1", "1");
    let bearer = format!("Bearer {JOIN}");
    let auth = [("Authorization", bearer.as_str())];
    let pulled = s.request("GET", "/v2/hello/manifests/1", &auth, b"");
    assert_eq!(pulled.status, 200, "an agent pulls with the join token");
    let push = s.request("POST", "/v2/hello/blobs/uploads/", &auth, b"");
    assert_eq!(push.status, 403, "but never pushes");
    let admin = s.request("GET", "/api/v1/audit", &auth, b"");
    assert_eq!(admin.status, 403, "nor administers");
    let services = s.request("GET", "/api/v1/services", &auth, b"");
    assert_eq!(services.json(), serde_json::json!([]), "nor sees services");
}

#[test]
fn without_a_join_token_heartbeats_are_refused_and_bad_agent_flags_name_the_flag() {
    let etcd = Etcd::start().expect("etcd starts (apt-get install etcd-server)");
    let s = TestServer::start_with(BIN, &["--state", &etcd.url()]);
    let r = heartbeat(&s, "n1", Some(JOIN), BEAT);
    assert_eq!(r.status, 409, "no join token configured");
    assert_eq!(r.json()["error"]["kind"], "failed_precondition");
    assert!(
        String::from_utf8_lossy(&r.body).contains("--join-token"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let agent = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("agent")
            .args(args)
            .output()
            .expect("runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let base = ["--token", JOIN, "--advertise", "127.0.0.1", "--name", "n1"];
    let (code, err) = agent(&[&["--join", "not a url"][..], &base].concat());
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--join"), "{err}");
    let (code, err) = agent(&[
        "--join",
        "http://127.0.0.1:1",
        "--token",
        "short",
        "--advertise",
        "127.0.0.1",
    ]);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--token"), "{err}");
    let (code, err) = agent(
        &[
            &["--join", "http://127.0.0.1:1", "--name", "a/b"][..],
            &base[..4],
        ]
        .concat(),
    );
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains("--name"), "{err}");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--state",
            &etcd.url(),
            "--join-token",
            "short",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--join-token"));
}

#[test]
fn an_agent_whose_control_planes_are_gone_keeps_serving_its_api_to_the_token_only() {
    let dir = tempfile::tempdir().expect("tmp");
    let ready = dir.path().join("ready");
    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "agent",
            "--join",
            "http://127.0.0.1:1",
            "--token",
            JOIN,
            "--name",
            "n1",
        ])
        .args([
            "--advertise",
            "127.0.0.1",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data")
        .arg(dir.path().join("data"))
        .arg("--ready-file")
        .arg(&ready)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent starts");
    poll(Duration::from_secs(20), || ready.exists().then_some(())).expect("the agent listens");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let bearer = format!("Bearer {JOIN}");
    let r = slipway_testkit::request(
        addr,
        "GET",
        "/agent/v1/instances",
        &[("Authorization", &bearer)],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["Ok"], serde_json::json!([]));
    let r = slipway_testkit::request(addr, "GET", "/agent/v1/instances", &[], b"");
    assert_eq!(r.status, 401, "the agent API needs the join token");
    assert!(child.try_wait().expect("wait").is_none(), "still running");
    let _ = child.kill();
    let _ = child.wait();
}
