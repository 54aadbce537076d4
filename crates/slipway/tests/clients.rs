//! Real clients against the real binary: skopeo, podman and the oras Python client.
//! Images are built locally from busybox-static with umoci; nothing is downloaded.

use std::process::Command;

use slipway_testkit::{TestServer, busybox_layout, podman, run, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");

fn skopeo(args: &[&str]) -> String {
    run(Command::new("skopeo").args(args))
}

#[test]
fn skopeo_copies_in_and_out_with_identical_digests_and_deletes() {
    let s = TestServer::start(BIN);
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = busybox_layout(tmp.path(), "v1");
    let src = format!("oci:{}:v1", layout.display());
    let dst = format!("docker://{}/tools/busybox:v1", s.host());
    skopeo(&["copy", "--dest-tls-verify=false", &src, &dst]);

    let local_digest = skopeo(&["inspect", "--raw", &src]);
    let remote_raw = skopeo(&["inspect", "--raw", "--tls-verify=false", &dst]);
    assert_eq!(
        sha256(local_digest.as_bytes()),
        sha256(remote_raw.as_bytes()),
        "manifest bytes are kept exactly"
    );
    let info: serde_json::Value =
        serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", &dst])).expect("json");
    assert_eq!(info["Digest"], sha256(remote_raw.as_bytes()));
    assert_eq!(info["RepoTags"], serde_json::json!(["v1"]));

    let out = tmp.path().join("out");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dst,
        &format!("oci:{}:v1", out.display()),
    ]);
    let back = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", out.display())]);
    assert_eq!(back, remote_raw, "the image comes back byte for byte");
    // Every layer blob came back with the same digest.
    let m: serde_json::Value = serde_json::from_str(&back).expect("json");
    for l in m["layers"].as_array().expect("layers") {
        let d = l["digest"].as_str().expect("digest");
        let hex = d.trim_start_matches("sha256:");
        let data = std::fs::read(out.join("blobs/sha256").join(hex)).expect("blob");
        assert_eq!(sha256(&data), d);
    }

    skopeo(&["delete", "--tls-verify=false", &dst]);
    assert_eq!(s.get("/v2/tools/busybox/manifests/v1").status, 404);
}

#[test]
fn podman_pushes_and_pulls() {
    let s = TestServer::start(BIN);
    let tmp = tempfile::tempdir().expect("tmp");
    let layout = busybox_layout(tmp.path(), "v1");
    // Seed the registry with skopeo, pull it into podman, push it back under a new name.
    let seed = format!("{}/seed/busybox:v1", s.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.display()),
        &format!("docker://{seed}"),
    ]);
    let proot = tmp.path().join("podman");
    podman(&proot, &["pull", "-q", "--tls-verify=false", &seed]);
    let target = format!("{}/pod/busybox:v1", s.host());
    podman(&proot, &["tag", &seed, &target]);
    podman(&proot, &["push", "-q", "--tls-verify=false", &target]);
    assert_eq!(
        s.get("/v2/pod/busybox/tags/list").json()["tags"],
        serde_json::json!(["v1"])
    );
    podman(&proot, &["rmi", "-a", "-f"]);
    podman(&proot, &["pull", "-q", "--tls-verify=false", &target]);
    let images = podman(&proot, &["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(images.contains(&target), "{images}");
    let out = podman(
        &proot,
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
            &target,
            "/bin/busybox",
            "cat",
            "/hello.txt",
        ],
    );
    assert_eq!(out, "generated for v1\n");
    podman(&proot, &["rmi", "-a", "-f"]);
}

#[test]
fn oras_pushes_an_artifact_with_a_subject_and_lists_referrers() {
    let s = TestServer::start(BIN);
    let (subject, body) = s.push_image("art/app", "v1", b"{}", &[b"layer"]);
    let work = tempfile::tempdir().expect("tmp");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/oras_referrers.py"
    );
    let out = run(Command::new("python3")
        .arg(script)
        .args([&s.host(), "art/app", &subject, &body.len().to_string()])
        .arg(work.path()));
    let j: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    let all = j["all"]["manifests"].as_array().expect("manifests");
    assert_eq!(all.len(), 1, "{j}");
    assert_eq!(
        all[0]["artifactType"],
        "application/vnd.example.sbom.config"
    );
    assert_eq!(j["filtered"]["manifests"].as_array().map(Vec::len), Some(1));
    assert_eq!(j["filters_applied"], "artifactType");
}
