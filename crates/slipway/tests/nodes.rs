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
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("web.toml");
    let port = free_port();
    std::fs::write(&file, spec(port)).expect("spec");
    let (code, out, err) = cli(BIN, &s, &["deploy", &file.display().to_string()]);
    assert_eq!(code, 0, "{out}{err}");
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
