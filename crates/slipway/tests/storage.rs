//! Registry blobs in S3-compatible object storage (`s3s-fs`, started by the
//! test), through the real binary and real clients.

use std::process::Command;

use slipway_testkit::{S3Server, TestServer, cli};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn objects(dir: &std::path::Path) -> usize {
    fn walk(d: &std::path::Path, n: &mut usize) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, n);
            } else if !p.to_string_lossy().contains(".s3s") {
                *n += 1;
            }
        }
    }
    let mut n = 0;
    walk(dir, &mut n);
    n
}

#[test]
fn with_blobs_in_s3_clients_push_pull_and_run_images_and_gc_deletes_the_objects() {
    let mut s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        format!("[gc]\ngrace_period = \"0s\"\n{}", s3.storage_config("reg/")),
    )
    .expect("config");
    let s = TestServer::start_with(BIN, &["--config", &config.display().to_string()]);
    let layout = slipway_testkit::busybox_layout(dir.path(), "s3");
    slipway_testkit::run(Command::new("skopeo").args([
        "copy",
        "-q",
        "--dest-tls-verify=false",
        &format!("oci:{}:s3", layout.display()),
        &format!("docker://{}/busybox:s3", s.host()),
    ]));
    let stored = objects(&s3.bucket_dir.join("reg/blobs"));
    assert!(
        stored >= 3,
        "config, layer and manifest are objects: {stored}"
    );
    assert_eq!(
        objects(&s.data.join("blobs")),
        0,
        "nothing committed on the local disk"
    );
    // Pulled back whole (skopeo checks every digest), and run from it.
    slipway_testkit::run(Command::new("skopeo").args([
        "copy",
        "-q",
        "--src-tls-verify=false",
        &format!("docker://{}/busybox:s3", s.host()),
        &format!("oci:{}:back", dir.path().join("back").display()),
    ]));
    let (code, out, err) = cli(
        BIN,
        &s,
        &[
            "run",
            "--name",
            "froms3",
            "busybox:s3",
            "--",
            "/bin/busybox",
            "cat",
            "/hello.txt",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "generated for s3\n");
    assert_eq!(cli(BIN, &s, &["rm", "-f", "froms3"]).0, 0);
    // A second image, deleted and collected: its objects leave the bucket.
    slipway_testkit::pack_busybox(BIN, &s, "tmp:1", &["--env", "ONLY_HERE=1"]);
    let before = objects(&s3.bucket_dir.join("reg/blobs"));
    let head = s.request("HEAD", "/v2/tmp/manifests/1", &[], b"");
    let tmp = head
        .header("docker-content-digest")
        .expect("digest")
        .to_owned();
    assert_eq!(
        s.request("DELETE", &format!("/v2/tmp/manifests/{tmp}"), &[], b"")
            .status,
        202
    );
    let (code, out, err) = cli(BIN, &s, &["gc"]);
    assert_eq!(code, 0, "{err}");
    let after = objects(&s3.bucket_dir.join("reg/blobs"));
    assert!(
        after < before,
        "gc deleted objects: {before} -> {after}\n{out}"
    );
    // The object store goes away: reads answer a clean 503 that says to retry.
    let manifest = s.get("/v2/busybox/manifests/s3").json();
    let layer = manifest["layers"][0]["digest"]
        .as_str()
        .expect("layer")
        .to_owned();
    s3.kill();
    let r = s.request("GET", &format!("/v2/busybox/blobs/{layer}"), &[], b"");
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("retry-after"), Some("5"));
    assert_eq!(r.error_code(), "UNAVAILABLE");
}
