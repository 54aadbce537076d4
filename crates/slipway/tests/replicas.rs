//! Two registry replicas on one bucket (`s3s-fs`) and one PostgreSQL database,
//! through the real binary and real clients: anything pushed through one is
//! pulled through the other, uploads move between them, GC on one is safe
//! against pushes on the other, and a replica killed mid-upload loses nothing
//! the other cannot finish.

use std::io::Write as _;
use std::process::Command;
use std::time::Duration;

use slipway_testkit::{SharedRegistry, TestServer, cli, podman, poll, run, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn skopeo(args: &[&str]) -> String {
    run(Command::new("skopeo").args(args))
}

#[test]
fn skopeo_podman_and_oras_push_through_one_replica_and_pull_through_the_other() {
    let r = SharedRegistry::start(BIN, "");
    let tmp = tempfile::tempdir().expect("tmp");

    // skopeo: in through A, out through B, digests checked by skopeo.
    let layout = slipway_testkit::busybox_layout(tmp.path(), "v1");
    skopeo(&[
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{}/tools/busybox:v1", r.a.host()),
    ]);
    let digest_a = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{}/tools/busybox:v1", r.a.host()),
    ]);
    let digest_b = skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{}/tools/busybox:v1", r.b.host()),
    ]);
    assert_eq!(digest_a.trim(), digest_b.trim());
    skopeo(&[
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{}/tools/busybox:v1", r.b.host()),
        &format!("oci:{}:back", tmp.path().join("back").display()),
    ]);

    // podman: pull from B, push under a new name through B, pull it through A.
    let proot = tmp.path().join("podman");
    let seed = format!("{}/tools/busybox:v1", r.b.host());
    podman(&proot, &["pull", "-q", "--tls-verify=false", &seed]);
    let target = format!("{}/team/busybox:podman", r.b.host());
    podman(&proot, &["tag", &seed, &target]);
    podman(&proot, &["push", "-q", "--tls-verify=false", &target]);
    podman(&proot, &["rmi", "-a", "-f"]);
    let via_a = format!("{}/team/busybox:podman", r.a.host());
    podman(&proot, &["pull", "-q", "--tls-verify=false", &via_a]);
    let images = podman(&proot, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.contains("team/busybox:podman"), "{images}");
    podman(&proot, &["rmi", "-a", "-f"]);

    // oras: an artifact with a subject pushed through A, its referrers
    // listed through B.
    let (subject, body) = r.a.push_image("art/app", "v1", b"{}", &[b"layer"]);
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/oras_referrers.py"
    );
    let out = run(Command::new("python3")
        .arg(script)
        .args([&r.a.host(), "art/app", &subject, &body.len().to_string()])
        .arg(tmp.path()));
    assert!(out.contains("artifactType"), "{out}");
    let refs = r.b.get(&format!("/v2/art/app/referrers/{subject}")).json();
    assert_eq!(
        refs["manifests"].as_array().map(Vec::len),
        Some(1),
        "{refs}"
    );

    // The catalog and tags are the same through both.
    for s in [&r.a, &r.b] {
        let cat = s.get("/v2/_catalog").json();
        let repos: Vec<&str> = cat["repositories"]
            .as_array()
            .expect("repositories")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(repos, ["art/app", "team/busybox", "tools/busybox"]);
    }
}

#[test]
fn a_chunked_upload_alternates_replicas_chunk_by_chunk() {
    let r = SharedRegistry::start(BIN, "");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
    let post = r.a.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    assert_eq!(post.status, 202);
    let loc = post.header("location").expect("location").to_owned();
    let mut at = 0usize;
    for (i, chunk) in data.chunks(700_000).enumerate() {
        let s = [&r.a, &r.b][i % 2];
        let range = format!("{at}-{}", at + chunk.len() - 1);
        let p = s.request("PATCH", &loc, &[("Content-Range", &range)], chunk);
        assert_eq!(p.status, 202, "{}", String::from_utf8_lossy(&p.body));
        assert_eq!(
            p.header("range"),
            Some(format!("0-{}", at + chunk.len() - 1).as_str())
        );
        at += chunk.len();
        // The other replica sees the session where this one left it.
        let other = [&r.b, &r.a][i % 2];
        let st = other.request("GET", &loc, &[], b"");
        assert_eq!(
            (st.status, st.header("range")),
            (204, Some(range_end(at).as_str()))
        );
    }
    let digest = sha256(&data);
    let put =
        r.b.request("PUT", &format!("{loc}?digest={digest}"), &[], b"");
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    assert!(r.a.get(&format!("/v2/app/blobs/{digest}")).body == data);
    // The finished session is gone on both.
    for s in [&r.a, &r.b] {
        assert_eq!(s.request("GET", &loc, &[], b"").status, 404);
    }
}

fn range_end(len: usize) -> String {
    format!("0-{}", len - 1)
}

#[test]
fn a_replica_killed_mid_upload_leaves_the_session_for_the_other_to_finish() {
    let mut r = SharedRegistry::start(BIN, "");
    let first = vec![7u8; 1 << 20];
    let second = vec![9u8; 1 << 20];
    let post = r.a.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    let loc = post.header("location").expect("location").to_owned();
    let p =
        r.a.request("PATCH", &loc, &[("Content-Range", "0-1048575")], &first);
    assert_eq!(p.status, 202);

    // A second chunk is half sent to A when A is killed.
    let mut conn = std::net::TcpStream::connect(r.a.addr).expect("connect");
    write!(
        conn,
        "PATCH {loc} HTTP/1.1\r\nHost: x\r\nContent-Range: 1048576-2097151\r\nContent-Length: 1048576\r\n\r\n"
    )
    .expect("head");
    conn.write_all(&second[..300_000]).expect("half a body");
    r.a.signal_and_wait("KILL");
    drop(conn);

    // B has the session at the last chunk A kept, and finishes it.
    let st = r.b.request("GET", &loc, &[], b"");
    assert_eq!((st.status, st.header("range")), (204, Some("0-1048575")));
    let p = r.b.request(
        "PATCH",
        &loc,
        &[("Content-Range", "1048576-2097151")],
        &second,
    );
    assert_eq!(p.status, 202, "{}", String::from_utf8_lossy(&p.body));
    let whole = [first, second].concat();
    let digest = sha256(&whole);
    let put =
        r.b.request("PUT", &format!("{loc}?digest={digest}"), &[], b"");
    assert_eq!(put.status, 201, "{}", String::from_utf8_lossy(&put.body));
    assert!(r.b.get(&format!("/v2/app/blobs/{digest}")).body == whole);
}

/// Pushes images with fresh content through `s` until `stop`; returns what
/// it pushed: (repo, tag, manifest digest, blob digests).
fn push_until(s: &TestServer, stop: &std::sync::atomic::AtomicBool) -> Vec<(String, Vec<String>)> {
    let mut pushed = Vec::new();
    let mut i = 0u32;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) || i < 5 {
        let config = format!("{{\"n\":{i}}}").into_bytes();
        let layer = format!("layer {i} pushed while GC runs").into_bytes();
        let (m, _) = s.push_image("busy/app", &format!("t{i}"), &config, &[&layer]);
        pushed.push((m, vec![sha256(&config), sha256(&layer)]));
        i += 1;
    }
    pushed
}

#[test]
fn gc_on_one_replica_while_the_other_receives_pushes_deletes_nothing_referenced() {
    let r = SharedRegistry::start(BIN, "[gc]\ngrace_period = \"1s\"\n");
    // Garbage: blobs no manifest references, pushed before the grace period.
    let garbage: Vec<String> = (0..5)
        .map(|i| r.b.push_blob("busy/app", format!("garbage {i}").as_bytes()))
        .collect();
    // Wait (polling GC's dry run) until the grace period has passed for them.
    let due = poll(Duration::from_secs(20), || {
        let (code, out, _) = cli(BIN, &r.a, &["gc", "--dry-run"]);
        (code == 0 && garbage.iter().all(|g| out.contains(g.as_str()))).then_some(())
    });
    assert!(due.is_some(), "the garbage never became due");

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (pushed, runs) = std::thread::scope(|scope| {
        let pusher = scope.spawn(|| push_until(&r.b, &stop));
        let mut runs = 0;
        for _ in 0..8 {
            let (code, out, err) = cli(BIN, &r.a, &["gc"]);
            assert_eq!(code, 0, "gc failed: {out}{err}");
            runs += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (pusher.join().expect("pusher"), runs)
    });
    assert_eq!(runs, 8);
    assert!(pushed.len() >= 5);
    // Every image pushed during the GCs is whole, through both replicas.
    for (manifest, blobs) in &pushed {
        for s in [&r.a, &r.b] {
            assert_eq!(
                s.get(&format!("/v2/busy/app/manifests/{manifest}")).status,
                200
            );
            for b in blobs {
                let got = s.get(&format!("/v2/busy/app/blobs/{b}"));
                assert_eq!(got.status, 200, "blob {b} of {manifest} is gone");
                assert_eq!(sha256(&got.body), *b);
            }
        }
    }
    // The garbage is gone, from the database and the bucket.
    for g in &garbage {
        assert_eq!(r.b.get(&format!("/v2/busy/app/blobs/{g}")).status, 404);
        let hex = g.trim_start_matches("sha256:");
        assert!(
            !r.s3
                .bucket_dir
                .join(format!("reg/blobs/sha256/{}/{hex}", &hex[..2]))
                .exists(),
            "garbage object {g} left in the bucket"
        );
    }
}

#[test]
fn blob_gets_redirect_to_a_presigned_url_when_configured() {
    let r = SharedRegistry::start(BIN, "");
    // The replicas above do not redirect: start one that does.
    let text = std::fs::read_to_string(&r.config).expect("config");
    let cfg = r.config.with_file_name("redirect.toml");
    std::fs::write(
        &cfg,
        text.replace("[storage]\n", "[storage]\nredirect = \"5m\"\n"),
    )
    .expect("write");
    let s = TestServer::start_with(BIN, &["--config", &cfg.display().to_string()]);
    let d = s.push_blob("app", b"served by object storage");
    let got = s.get(&format!("/v2/app/blobs/{d}"));
    assert_eq!(got.status, 307);
    let url = got.header("location").expect("location").to_owned();
    assert!(url.starts_with(&r.s3.endpoint), "{url}");
    assert!(url.contains("X-Amz-Signature="), "{url}");
    // The presigned URL serves the bytes, also in ranges, without the replica.
    let out = run(Command::new("curl").args(["-sf", &url]));
    assert_eq!(out, "served by object storage");
    let out = run(Command::new("curl").args(["-sf", "-r", "10-15", &url]));
    assert_eq!(out, "object");
    // HEAD still answers from the replica; a blob not in the repository is 404.
    assert_eq!(
        s.request("HEAD", &format!("/v2/app/blobs/{d}"), &[], b"")
            .status,
        200
    );
    assert_eq!(s.get(&format!("/v2/other/blobs/{d}")).status, 404);
}

#[test]
fn with_the_database_restarted_replicas_answer_503_meanwhile_and_reconnect() {
    let mut r = SharedRegistry::start(BIN, "");
    let (m, _) = r.a.push_image("db/app", "v1", b"{}", &[b"before"]);
    r.pg.stop();
    for s in [&r.a, &r.b] {
        let got = s.get("/v2/db/app/manifests/v1");
        assert_eq!(got.status, 503, "{}", String::from_utf8_lossy(&got.body));
        assert_eq!(got.error_code(), "UNAVAILABLE");
        assert!(got.header("retry-after").is_some());
    }
    r.pg.resume();
    // Both replicas reconnect on their next request; nothing was lost.
    for s in [&r.a, &r.b] {
        let got = s.get("/v2/db/app/manifests/v1");
        assert_eq!(got.status, 200);
        assert_eq!(sha256(&got.body), m);
    }
    r.b.push_image("db/app", "v2", b"{}", &[b"after"]);
    assert_eq!(r.a.get("/v2/db/app/manifests/v2").status, 200);
}
