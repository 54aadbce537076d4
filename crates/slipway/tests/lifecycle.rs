//! The daemon's lifecycle and operations: shutdown, crashes, TLS, config, GC,
//! webhooks, metrics and a full disk.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use slipway_testkit::{TestServer, Tmpfs, open_request, poll, read_response, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn slipway(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run slipway")
}

#[test]
fn version_flag_prints_the_version() {
    let out = slipway(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("slipway {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn config_check_accepts_a_valid_file_and_names_the_bad_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "listen = \"127.0.0.1:5999\"\n[gc]\ninterval = \"1h\"\ngrace_period = \"10m\"\n",
    )
    .expect("write");
    let out = slipway(&["config", "check", good.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("is valid") && stdout.contains("every 1h"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[gc]\ngrace_period = \"ten minutes\"\n").expect("write");
    let out = slipway(&["config", "check", bad.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("line 2") && stderr.contains("grace_period"),
        "{stderr}"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "lisen = \"x\"\n").expect("write");
    let out = slipway(&["config", "check", unknown.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `lisen`"));
}

#[test]
fn sigterm_lets_an_in_flight_upload_finish_then_exits_zero() {
    let mut s = TestServer::start(BIN);
    let r = s.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    let loc = r.header("location").expect("location").to_owned();
    let data = vec![9u8; 2_000_000];
    let mut stream = open_request(
        s.addr,
        "PATCH",
        &loc,
        &[("Content-Length", "2000000")],
        &data[..1_000_000],
    );
    // Wait until the server is inside the request (bytes are landing).
    poll(Duration::from_secs(10), || {
        (staged_bytes(&s)? > 0).then_some(())
    })
    .expect("upload in progress");
    let pid = s.pid();
    let killer = std::thread::spawn(move || {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill")
    });
    assert!(killer.join().expect("join").success());
    stream.write_all(&data[1_000_000..]).expect("rest of body");
    let r = read_response(stream, "PATCH");
    assert_eq!(r.status, 202, "in-flight request completed");
    let status = s.signal_and_wait("0");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        s.log().iter().any(|l| l.contains("stopped")),
        "{:?}",
        s.log()
    );
}

#[test]
fn kill_nine_during_uploads_never_exposes_partial_or_corrupt_content() {
    let mut s = TestServer::start(BIN);
    for round in 0..5u8 {
        // A finished image, so there is something to check.
        let layer: Vec<u8> = (0..200_000u32)
            .map(|i| u8::try_from((i * 7 + u32::from(round)) % 251).unwrap_or(0))
            .collect();
        s.push_image(
            "crash/app",
            &format!("r{round}"),
            format!("{{\"round\":{round}}}").as_bytes(),
            &[&layer],
        );
        // Uploads in flight at the moment of the kill: monolithic, chunked and a manifest.
        let big = vec![round; 3_000_000];
        let digest = sha256(&big);
        let mono = open_request(
            s.addr,
            "POST",
            &format!("/v2/crash/app/blobs/uploads/?digest={digest}"),
            &[("Content-Length", "3000000")],
            &big[..1_500_000],
        );
        let r = s.request("POST", "/v2/crash/app/blobs/uploads/", &[], b"");
        let loc = r.header("location").expect("location").to_owned();
        let chunk = open_request(
            s.addr,
            "PATCH",
            &loc,
            &[("Content-Length", "3000000")],
            &big[..700_000],
        );
        poll(Duration::from_secs(10), || {
            let staged = staged_bytes(&s)?;
            (staged >= 100_000).then_some(())
        })
        .expect("uploads in progress");
        s.crash_and_restart();
        drop((mono, chunk));
        assert!(
            s.request("HEAD", &format!("/v2/crash/app/blobs/{digest}"), &[], b"")
                .status
                == 404,
            "partial blob is invisible"
        );
        verify_store(&s);
    }
}

/// Bytes sitting in upload staging files.
fn staged_bytes(s: &TestServer) -> Option<u64> {
    Some(
        std::fs::read_dir(s.data.join("uploads"))
            .ok()?
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum(),
    )
}

/// Every visible manifest's references exist, and every visible blob hashes to its digest.
fn verify_store(s: &TestServer) {
    let repos = s.get("/v2/_catalog").json();
    for repo in repos["repositories"].as_array().expect("repos") {
        let repo = repo.as_str().expect("str");
        let tags = s.get(&format!("/v2/{repo}/tags/list")).json();
        for tag in tags["tags"].as_array().expect("tags") {
            let m = s.get(&format!(
                "/v2/{repo}/manifests/{}",
                tag.as_str().expect("str")
            ));
            assert_eq!(m.status, 200);
            assert_eq!(
                Some(sha256(&m.body).as_str()),
                m.header("docker-content-digest")
            );
            let mj = m.json();
            let mut refs = vec![mj["config"]["digest"].clone()];
            refs.extend(
                mj["layers"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|l| l["digest"].clone()),
            );
            for d in refs {
                let d = d.as_str().expect("digest");
                let b = s.get(&format!("/v2/{repo}/blobs/{d}"));
                assert_eq!(b.status, 200, "{d} referenced by {repo} is missing");
                assert_eq!(sha256(&b.body), d, "blob {d} is corrupt");
            }
        }
    }
    // Every file in the blob tree is complete.
    for alg in std::fs::read_dir(s.data.join("blobs"))
        .expect("blobs")
        .flatten()
    {
        for prefix in std::fs::read_dir(alg.path()).expect("prefix").flatten() {
            for f in std::fs::read_dir(prefix.path()).expect("files").flatten() {
                let data = std::fs::read(f.path()).expect("read");
                assert_eq!(
                    sha256(&data),
                    format!("sha256:{}", f.file_name().to_string_lossy())
                );
            }
        }
    }
}

#[test]
fn tls_serves_the_registry_over_https() {
    let dir = tempfile::tempdir().expect("tmp");
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // A server certificate, not a CA: rustls refuses a CA as the end entity.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let s = TestServer::start_with(
        BIN,
        &[
            "--tls-cert",
            cert.to_str().expect("utf8"),
            "--tls-key",
            key.to_str().expect("utf8"),
        ],
    );
    assert!(s.log().iter().any(|l| l.contains("listening on https://")));
    let out = Command::new("curl")
        .args(["-sS", "--cacert"])
        .arg(&cert)
        .args([
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            &format!("https://{}/v2/", s.host()),
        ])
        .output()
        .expect("curl");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "200 2",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The CLI speaks https too, trusting the CA it is given (flag or environment).
    let server = format!("https://{}", s.host());
    let out = Command::new(BIN)
        .args(["--server", &server, "--ca-file"])
        .arg(&cert)
        .args(["service", "ls", "-o", "json"])
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "[]");
    let out = Command::new(BIN)
        .args(["--server", &server, "ps"])
        .env("SLIPWAY_CA_FILE", &cert)
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(BIN)
        .args(["--server", &server, "service", "ls"])
        .env_remove("SLIPWAY_CA_FILE")
        .output()
        .expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(69),
        "an untrusted certificate: {err}"
    );
    assert!(
        err.contains("cannot reach slipway") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

#[test]
fn gc_cli_reports_then_frees_unreferenced_blobs() {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("slipway.toml");
    std::fs::write(
        &cfg,
        "[gc]\ngrace_period = \"0s\"\ndelete_untagged = true\n",
    )
    .expect("write");
    let s = TestServer::start_with(BIN, &["--config", cfg.to_str().expect("utf8")]);
    let (keep, _) = s.push_image("gc/app", "keep", b"{\"keep\":1}", &[b"kept layer"]);
    let (drop_digest, _) = s.push_image("gc/app", "drop", b"{\"drop\":1}", &[b"dropped layer"]);
    assert_eq!(
        s.request("DELETE", "/v2/gc/app/manifests/drop", &[], b"")
            .status,
        202
    );
    let server = format!("http://{}", s.host());

    let dry = slipway(&["gc", "--dry-run", "--json", "--server", &server]);
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&dry.stdout).expect("json");
    assert_eq!(report["manifests"][0][1], drop_digest);
    assert_eq!(
        report["blobs"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    assert_eq!(
        s.request(
            "HEAD",
            &format!("/v2/gc/app/blobs/{}", sha256(b"dropped layer")),
            &[],
            b""
        )
        .status,
        200,
        "dry run deleted nothing"
    );

    let real = slipway(&["gc", "--server", &server]);
    assert!(real.status.success());
    let text = String::from_utf8_lossy(&real.stdout);
    assert!(
        text.contains("freed") && text.contains("3 blobs, 1 untagged manifests"),
        "{text}"
    );
    assert_eq!(
        s.request(
            "HEAD",
            &format!("/v2/gc/app/blobs/{}", sha256(b"dropped layer")),
            &[],
            b""
        )
        .status,
        404
    );
    assert_eq!(s.get(&format!("/v2/gc/app/manifests/{keep}")).status, 200);
    assert_eq!(
        s.request(
            "HEAD",
            &format!("/v2/gc/app/blobs/{}", sha256(b"kept layer")),
            &[],
            b""
        )
        .status,
        200
    );

    let unreachable = slipway(&["gc", "--server", "http://127.0.0.1:1"]);
    assert!(!unreachable.status.success());
    assert!(String::from_utf8_lossy(&unreachable.stderr).contains("is `slipway serve` running?"));
}

#[test]
fn webhooks_receive_push_and_delete_events_with_retries() {
    let hook = TcpListener::bind("127.0.0.1:0").expect("bind");
    let hook_addr = hook.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = dir.path().join("slipway.toml");
    std::fs::write(&cfg, format!("[[webhooks]]\nurl = \"http://{hook_addr}/events\"\ntimeout = \"2s\"\nmax_attempts = 3\n")).expect("write");
    let s = TestServer::start_with(BIN, &["--config", cfg.to_str().expect("utf8")]);
    let (digest, _) = s.push_image("hooked/app", "v1", b"{}", &[]);

    // First delivery attempt is refused with a 500; the retry must arrive.
    hook.set_nonblocking(false).expect("blocking");
    let mut bodies = Vec::new();
    for attempt in 0..2 {
        let (conn, _) = hook.accept().expect("accept");
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        let mut len = 0usize;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).expect("read");
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().expect("len");
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).expect("body");
        bodies.push(body);
        let status = if attempt == 0 {
            "500 Internal Server Error"
        } else {
            "200 OK"
        };
        let mut conn = conn;
        conn.write_all(
            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("reply");
    }
    assert_eq!(bodies[0], bodies[1], "the retry carries the same event");
    let j: serde_json::Value = serde_json::from_slice(&bodies[1]).expect("json");
    let e = &j["events"][0];
    assert_eq!(e["action"], "push");
    assert_eq!(e["repository"], "hooked/app");
    assert_eq!(e["tag"], "v1");
    assert_eq!(e["digest"], digest);
    assert_eq!(
        e["media_type"],
        "application/vnd.oci.image.manifest.v1+json"
    );
}

#[test]
fn metrics_report_requests_bytes_uploads_and_storage() {
    let s = TestServer::start(BIN);
    s.push_image("m/app", "v1", b"{}", &[b"twelve bytes"]);
    s.get("/v2/m/app/manifests/v1");
    s.get("/v2/m/app/manifests/missing");
    let r = s.get("/metrics");
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    for needle in [
        "slipway_http_requests_total{route=\"manifest\",method=\"GET\",status=\"200\"} 1",
        "slipway_http_requests_total{route=\"manifest\",method=\"GET\",status=\"404\"} 1",
        "slipway_http_requests_total{route=\"blob_upload\",method=\"POST\",status=\"201\"} 2",
        "slipway_registry_upload_request_duration_seconds_count 2",
        "slipway_registry_bytes_received_total",
        "slipway_registry_bytes_sent_total",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let stored: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("slipway_registry_stored_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("stored bytes gauge");
    assert!(
        stored >= 14,
        "config + layer + manifest are counted: {stored}"
    );
    // One registry in the OpenMetrics text format: every family has its HELP
    // and TYPE, and the exposition ends with # EOF.
    let ct = r
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    assert!(ct.starts_with("application/openmetrics-text"), "{ct}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for family in [
        "slipway_http_requests",
        "slipway_registry_upload_request_duration_seconds",
        "slipway_registry_stored_bytes",
        "slipway_gc_runs",
        "slipway_proxy_requests",
        "slipway_proxy_retries",
        "slipway_proxy_request_duration_seconds",
    ] {
        assert!(typed.contains(&family), "no TYPE for {family} in\n{text}");
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}"
        );
    }
}

#[test]
fn full_disk_answers_507_and_keeps_serving_without_corruption() {
    let dir = tempfile::tempdir().expect("tmp");
    let mnt = dir.path().join("small");
    let _tmpfs = Tmpfs::mount(&mnt, "3m");
    let s = TestServer::start_on(BIN, &mnt.join("data"), &[]);
    let small = s.push_blob("disk/app", b"fits");
    let big = vec![3u8; 4 * 1024 * 1024];
    let r = s.request(
        "POST",
        &format!("/v2/disk/app/blobs/uploads/?digest={}", sha256(&big)),
        &[],
        &big,
    );
    assert_eq!(r.status, 507, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.json()["errors"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("storage is full"))
    );
    assert_eq!(
        s.request(
            "HEAD",
            &format!("/v2/disk/app/blobs/{}", sha256(&big)),
            &[],
            b""
        )
        .status,
        404
    );
    // Space is given back and the registry still works.
    assert_eq!(
        s.request("HEAD", &format!("/v2/disk/app/blobs/{small}"), &[], b"")
            .status,
        200
    );
    s.push_blob("disk/app", b"still works");
    drop(s);
}

#[test]
fn a_client_whose_output_reader_went_away_exits_141_without_a_panic() {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("empty.toml");
    std::fs::write(&file, "").expect("config");
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&file)
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .expect("runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(141), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}
