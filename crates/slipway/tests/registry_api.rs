//! Raw-HTTP tests of every registry endpoint and every bad-input case, against the
//! real `slipway serve` binary.

use std::process::Command;
use std::time::Duration;

use slipway_testkit::{TestServer, cli, open_request, read_response, sha256};

const BIN: &str = env!("CARGO_BIN_EXE_slipway");
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn base_endpoint_announces_the_api_version(s: &TestServer) {
    for m in ["GET", "HEAD"] {
        let r = s.request(m, "/v2/", &[], b"");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("docker-distribution-api-version"),
            Some("registry/2.0")
        );
    }
    let r = s.request("POST", "/v2/", &[], b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.error_code(), "UNSUPPORTED");
}

fn unknown_routes_and_methods_get_oci_errors(s: &TestServer) {
    let r = s.get("/nowhere");
    assert_eq!((r.status, r.error_code().as_str()), (404, "UNSUPPORTED"));
    let r = s.get("/v2/app/unknown/thing");
    assert_eq!((r.status, r.error_code().as_str()), (404, "UNSUPPORTED"));
    let r = s.request("PATCH", "/v2/app/manifests/v1", &[], b"");
    assert_eq!((r.status, r.error_code().as_str()), (405, "UNSUPPORTED"));
    assert!(r.header("allow").is_some_and(|a| a.contains("PUT")));
}

fn monolithic_push_then_get_head_and_ranges(s: &TestServer) {
    let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let digest = s.push_blob("team/app", &data);
    let r = s.request("HEAD", &format!("/v2/team/app/blobs/{digest}"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("10000"));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    let r = s.get(&format!("/v2/team/app/blobs/{digest}"));
    assert_eq!((r.status, r.body.as_slice()), (200, data.as_slice()));

    let r = s.request(
        "GET",
        &format!("/v2/team/app/blobs/{digest}"),
        &[("Range", "bytes=100-199")],
        b"",
    );
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 100-199/10000"));
    assert_eq!(r.body, &data[100..200]);
    let r = s.request(
        "GET",
        &format!("/v2/team/app/blobs/{digest}"),
        &[("Range", "bytes=-10")],
        b"",
    );
    assert_eq!((r.status, r.body.as_slice()), (206, &data[9990..]));
    let r = s.request(
        "GET",
        &format!("/v2/team/app/blobs/{digest}"),
        &[("Range", "bytes=20000-")],
        b"",
    );
    assert_eq!(r.status, 416);
    assert_eq!(r.header("content-range"), Some("bytes */10000"));
}

fn chunked_upload_with_status_out_of_order_chunk_and_final_put(s: &TestServer) {
    let r = s.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    assert_eq!(r.status, 202);
    let loc = r.header("location").expect("location").to_owned();
    let uuid = r.header("docker-upload-uuid").expect("uuid").to_owned();
    assert!(loc.ends_with(&uuid));

    let r = s.request(
        "PATCH",
        &loc,
        &[
            ("Content-Range", "0-4"),
            ("Content-Type", "application/octet-stream"),
        ],
        b"hello",
    );
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-4"));

    // Out of order: starts at 10 instead of 5.
    let r = s.request("PATCH", &loc, &[("Content-Range", "10-14")], b"xxxxx");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (416, "BLOB_UPLOAD_INVALID")
    );
    assert_eq!(r.header("range"), Some("0-4"));
    // Beyond its range: declares 3 bytes, sends 5.
    let r = s.request("PATCH", &loc, &[("Content-Range", "5-7")], b" worl");
    assert_eq!(r.status, 416);

    let r = s.request("GET", &loc, &[], b"");
    assert_eq!(r.status, 204);
    let offset_end: u64 = r
        .header("range")
        .expect("range")
        .split('-')
        .nth(1)
        .expect("end")
        .parse()
        .expect("num");
    // Resume from wherever the server says the session is.
    let have = offset_end + 1;
    let full = b"hello world!";
    let rest = &full[usize::try_from(have).expect("fits")..];
    let r = s.request(
        "PATCH",
        &loc,
        &[(
            "Content-Range",
            &format!("{have}-{}", have + rest.len() as u64 - 2),
        )],
        &rest[..rest.len() - 1],
    );
    assert_eq!(r.status, 202, "{:?}", String::from_utf8_lossy(&r.body));
    let digest = sha256(full);
    // The final PUT carries the last byte.
    let r = s.request(
        "PUT",
        &format!("{loc}?digest={digest}"),
        &[],
        &full[full.len() - 1..],
    );
    assert_eq!(r.status, 201, "{:?}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
    assert_eq!(s.get(&format!("/v2/app/blobs/{digest}")).body, full);

    // The finished session is gone.
    let r = s.request("PUT", &format!("{loc}?digest={digest}"), &[], b"");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
    let r = s.request("PATCH", "/v2/app/blobs/uploads/not-a-uuid", &[], b"x");
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (404, "BLOB_UPLOAD_UNKNOWN")
    );
}

fn digest_mismatch_is_refused_and_nothing_becomes_visible(s: &TestServer) {
    let wrong = sha256(b"something else");
    let r = s.request(
        "POST",
        &format!("/v2/app/blobs/uploads/?digest={wrong}"),
        &[],
        b"payload",
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(
        s.request("HEAD", &format!("/v2/app/blobs/{wrong}"), &[], b"")
            .status,
        404
    );
    let real = sha256(b"payload");
    assert_eq!(
        s.request("HEAD", &format!("/v2/app/blobs/{real}"), &[], b"")
            .status,
        404
    );
    let r = s.request(
        "POST",
        "/v2/app/blobs/uploads/?digest=sha256:nothex",
        &[],
        b"payload",
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    // Upload session cancelled with DELETE.
    let r = s.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    let loc = r.header("location").expect("location").to_owned();
    assert_eq!(s.request("DELETE", &loc, &[], b"").status, 204);
    assert_eq!(s.request("GET", &loc, &[], b"").status, 404);
}

fn cross_repository_mount_links_or_falls_back_to_an_upload(s: &TestServer) {
    let digest = s.push_blob("src/repo", b"layer bytes");
    assert_eq!(
        s.request("HEAD", &format!("/v2/dst/blobs/{digest}"), &[], b"")
            .status,
        404,
        "not readable through another repo"
    );
    let r = s.request(
        "POST",
        &format!("/v2/dst/blobs/uploads/?mount={digest}&from=src/repo"),
        &[],
        b"",
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        r.header("location"),
        Some(format!("/v2/dst/blobs/{digest}").as_str())
    );
    assert_eq!(
        s.request("HEAD", &format!("/v2/dst/blobs/{digest}"), &[], b"")
            .status,
        200
    );
    let missing = sha256(b"never pushed");
    let r = s.request(
        "POST",
        &format!("/v2/dst/blobs/uploads/?mount={missing}&from=src/repo"),
        &[],
        b"",
    );
    assert_eq!(r.status, 202);
    assert!(
        r.header("location")
            .is_some_and(|l| l.contains("/blobs/uploads/"))
    );
}

fn manifests_by_tag_and_digest_with_exact_bytes(s: &TestServer) {
    let (digest, body) = s.push_image("app", "v1", b"{}", &[b"layer one"]);
    for reference in ["v1", digest.as_str()] {
        let r = s.request(
            "GET",
            &format!("/v2/app/manifests/{reference}"),
            &[("Accept", OCI_MANIFEST)],
            b"",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, body);
        assert_eq!(r.header("content-type"), Some(OCI_MANIFEST));
        assert_eq!(r.header("docker-content-digest"), Some(digest.as_str()));
        let h = s.request("HEAD", &format!("/v2/app/manifests/{reference}"), &[], b"");
        assert_eq!(h.status, 200);
        assert_eq!(
            h.header("content-length"),
            Some(body.len().to_string().as_str())
        );
    }
    // Pushing by digest with whitespace keeps the bytes and their digest.
    let mut spaced = body.clone();
    spaced.extend_from_slice(b"\n\n");
    let d2 = sha256(&spaced);
    let r = s.request(
        "PUT",
        &format!("/v2/app/manifests/{d2}"),
        &[("Content-Type", OCI_MANIFEST)],
        &spaced,
    );
    assert_eq!(r.status, 201);
    assert_eq!(s.get(&format!("/v2/app/manifests/{d2}")).body, spaced);
    let r = s.request(
        "PUT",
        &format!("/v2/app/manifests/{digest}"),
        &[("Content-Type", OCI_MANIFEST)],
        &spaced,
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "DIGEST_INVALID"));
    assert_eq!(
        s.get("/v2/app/manifests/v9").error_code(),
        "MANIFEST_UNKNOWN"
    );
}

fn index_docker_and_artifact_manifests_are_accepted(s: &TestServer) {
    let (child, body) = s.push_image("app", "amd64", b"{}", &[b"l"]);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{child}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        body.len()
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/multi",
        &[("Content-Type", OCI_INDEX)],
        index.as_bytes(),
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    let docker_list = index.replace(
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/dlist",
        &[(
            "Content-Type",
            "application/vnd.docker.distribution.manifest.list.v2+json",
        )],
        docker_list.as_bytes(),
    );
    assert_eq!(r.status, 201);
    // An index whose child is missing.
    let bad_index = index.replace(&child, &sha256(b"nope"));
    let r = s.request(
        "PUT",
        "/v2/app/manifests/bad",
        &[("Content-Type", OCI_INDEX)],
        bad_index.as_bytes(),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );

    let cfg = s.push_blob(
        "app",
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let docker = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{cfg}","size":5}},"layers":[]}}"#
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/docker",
        &[(
            "Content-Type",
            "application/vnd.docker.distribution.manifest.v2+json",
        )],
        docker.as_bytes(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        s.get("/v2/app/manifests/docker").header("content-type"),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );

    let empty = s.push_blob("app", b"{}");
    let artifact = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","artifactType":"application/vnd.example.thing","config":{{"mediaType":"application/vnd.oci.empty.v1+json","digest":"{empty}","size":2}},"layers":[],"subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{child}","size":{}}}}}"#,
        body.len()
    );
    let r = s.request(
        "PUT",
        &format!("/v2/app/manifests/{}", sha256(artifact.as_bytes())),
        &[("Content-Type", OCI_MANIFEST)],
        artifact.as_bytes(),
    );
    assert_eq!(r.status, 201);
    assert_eq!(r.header("oci-subject"), Some(child.as_str()));
    let refs = s.get(&format!("/v2/app/referrers/{child}"));
    assert_eq!(refs.status, 200);
    assert_eq!(refs.header("content-type"), Some(OCI_INDEX));
    let j = refs.json();
    assert_eq!(
        j["manifests"][0]["artifactType"],
        "application/vnd.example.thing"
    );
    assert_eq!(j["manifests"][0]["digest"], sha256(artifact.as_bytes()));
    let filtered = s.get(&format!(
        "/v2/app/referrers/{child}?artifactType=application/other"
    ));
    assert_eq!(filtered.header("oci-filters-applied"), Some("artifactType"));
    assert_eq!(
        filtered.json()["manifests"].as_array().map(Vec::len),
        Some(0)
    );
    // No referrers is an empty index, not a 404.
    let none = s.get(&format!("/v2/elsewhere/referrers/{child}"));
    assert_eq!(none.status, 200);
    assert_eq!(none.json()["manifests"].as_array().map(Vec::len), Some(0));
}

fn bad_manifests_get_precise_errors(s: &TestServer) {
    let r = s.request(
        "PUT",
        "/v2/app/manifests/v1",
        &[("Content-Type", OCI_MANIFEST)],
        b"{not json",
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_INVALID")
    );
    let missing = sha256(b"absent");
    let m = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{missing}","size":1}},"layers":[]}}"#
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/v1",
        &[("Content-Type", OCI_MANIFEST)],
        m.as_bytes(),
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (400, "MANIFEST_BLOB_UNKNOWN")
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/v1",
        &[("Content-Type", "text/plain")],
        br#"{"schemaVersion":2}"#,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (415, "MANIFEST_INVALID")
    );
    let big = vec![b' '; 4 * 1024 * 1024 + 1];
    let r = s.request(
        "PUT",
        "/v2/app/manifests/v1",
        &[("Content-Type", OCI_MANIFEST)],
        &big,
    );
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (413, "MANIFEST_INVALID")
    );
    let r = s.request(
        "PUT",
        "/v2/app/manifests/-bad-tag",
        &[("Content-Type", OCI_MANIFEST)],
        m.as_bytes(),
    );
    assert_eq!((r.status, r.error_code().as_str()), (400, "TAG_INVALID"));
    // Reading or deleting a reference that cannot exist is a missing manifest.
    for method in ["GET", "HEAD", "DELETE"] {
        for reference in [".INVALID", "-bad-tag", "sha256:zz"] {
            let r = s.request(method, &format!("/v2/app/manifests/{reference}"), &[], b"");
            assert_eq!(r.status, 404, "{method} {reference}");
            if method != "HEAD" {
                assert_eq!(r.error_code(), "MANIFEST_UNKNOWN", "{method} {reference}");
            }
        }
    }
    // Nothing of the above became a repository.
    assert_eq!(
        s.get("/v2/_catalog").json()["repositories"]
            .as_array()
            .map(Vec::len),
        Some(0)
    );
}

fn hostile_names_and_digests_never_reach_the_filesystem(s: &TestServer) {
    let cases = [
        ("/v2/../../etc/manifests/v1", "NAME_INVALID"),
        ("/v2/%2e%2e/%2e%2e/etc/manifests/v1", "NAME_INVALID"),
        ("/v2/app/%2e%2e/x/tags/list", "NAME_INVALID"),
        ("/v2//abs/manifests/v1", "NAME_INVALID"),
        ("/v2/UPPER/manifests/v1", "NAME_INVALID"),
        (
            "/v2/app/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd",
            "DIGEST_INVALID",
        ),
        ("/v2/app/blobs/sha256:../../../etc/passwd", "UNSUPPORTED"),
        (
            "/v2/app/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            "DIGEST_INVALID",
        ),
        ("/v2/app/manifests/..", "MANIFEST_UNKNOWN"),
        (
            "/v2/app/blobs/uploads/..%2f..%2fmeta.redb",
            "BLOB_UPLOAD_UNKNOWN",
        ),
        ("/v2/app/referrers/sha256:zz", "DIGEST_INVALID"),
    ];
    for (path, code) in cases {
        let r = s.get(path);
        assert_eq!(r.error_code(), code, "{path}");
        assert!(r.status == 400 || r.status == 404, "{path}: {}", r.status);
    }
    assert_eq!(s.get("/v2/").status, 200, "server keeps serving");
}

fn tags_and_catalog_paginate_with_link_headers(s: &TestServer) {
    for t in ["c", "a", "b", "d"] {
        s.push_image("one", t, b"{}", &[]);
    }
    s.push_image("two/x", "v", b"{}", &[]);
    let r = s.get("/v2/one/tags/list");
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b", "c", "d"]));
    assert!(r.header("link").is_none());
    let r = s.get("/v2/one/tags/list?n=2");
    assert_eq!(r.json()["tags"], serde_json::json!(["a", "b"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/one/tags/list?n=2&last=b>; rel=\"next\"")
    );
    let r = s.get("/v2/one/tags/list?n=2&last=b");
    assert_eq!(r.json()["tags"], serde_json::json!(["c", "d"]));
    assert!(r.header("link").is_none());
    assert_eq!(s.get("/v2/one/tags/list?n=x").status, 400);
    assert_eq!(s.get("/v2/nothing/tags/list").error_code(), "NAME_UNKNOWN");
    let r = s.get("/v2/_catalog?n=1");
    assert_eq!(r.json()["repositories"], serde_json::json!(["one"]));
    assert_eq!(
        r.header("link"),
        Some("</v2/_catalog?n=1&last=one>; rel=\"next\"")
    );
    assert_eq!(
        s.get("/v2/_catalog?n=1&last=one").json()["repositories"],
        serde_json::json!(["two/x"])
    );
}

fn deletes_remove_only_what_they_name(s: &TestServer) {
    let (digest, _) = s.push_image("app", "v1", b"{}", &[b"layer"]);
    let r = s.request(
        "PUT",
        "/v2/app/manifests/v2",
        &[("Content-Type", OCI_MANIFEST)],
        &s.get("/v2/app/manifests/v1").body,
    );
    assert_eq!(r.status, 201);
    assert_eq!(
        s.request("DELETE", "/v2/app/manifests/v1", &[], b"").status,
        202
    );
    assert_eq!(s.get("/v2/app/manifests/v1").status, 404);
    assert_eq!(
        s.get("/v2/app/manifests/v2").status,
        200,
        "only the tag went"
    );
    assert_eq!(
        s.request("DELETE", &format!("/v2/app/manifests/{digest}"), &[], b"")
            .status,
        202
    );
    assert_eq!(s.get(&format!("/v2/app/manifests/{digest}")).status, 404);
    assert_eq!(
        s.get("/v2/app/manifests/v2").status,
        404,
        "tags of a deleted manifest go too"
    );
    assert_eq!(
        s.request("DELETE", &format!("/v2/app/manifests/{digest}"), &[], b"")
            .error_code(),
        "MANIFEST_UNKNOWN"
    );
    let layer = sha256(b"layer");
    assert_eq!(
        s.request("DELETE", &format!("/v2/app/blobs/{layer}"), &[], b"")
            .status,
        202
    );
    assert_eq!(
        s.request("HEAD", &format!("/v2/app/blobs/{layer}"), &[], b"")
            .status,
        404
    );
    assert_eq!(
        s.request("DELETE", &format!("/v2/app/blobs/{layer}"), &[], b"")
            .error_code(),
        "BLOB_UNKNOWN"
    );
}

fn client_disconnect_mid_upload_leaves_a_resumable_session(s: &TestServer) {
    let r = s.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    let loc = r.header("location").expect("location").to_owned();
    let first = vec![7u8; 300_000];
    let stream = open_request(
        s.addr,
        "PATCH",
        &loc,
        &[("Content-Length", "1000000")],
        &first,
    );
    drop(stream); // hang up 300 kB into a 1 MB chunk
    let offset = slipway_testkit::poll(std::time::Duration::from_secs(10), || {
        let r = s.request("GET", &loc, &[], b"");
        // Wait until the server has written everything it received before the hang-up.
        (r.status == 204 && r.header("range") == Some("0-299999")).then(|| "0-299999".to_owned())
    })
    .expect("session still known");
    let have: usize = offset
        .split('-')
        .nth(1)
        .expect("end")
        .parse::<usize>()
        .expect("num")
        + 1;
    assert!(have <= first.len());
    let mut full = first[..have].to_vec();
    full.extend_from_slice(b"tail");
    let digest = sha256(&full);
    let r = s.request(
        "PUT",
        &format!("{loc}?digest={digest}"),
        &[("Content-Range", &format!("{have}-{}", have + 3))],
        b"tail",
    );
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(s.get(&format!("/v2/app/blobs/{digest}")).body, full);
}

#[test]
fn streamed_patch_with_chunked_encoding_is_accepted() {
    use std::io::Write as _;
    let s = TestServer::start(BIN);
    let r = s.request("POST", "/v2/app/blobs/uploads/", &[], b"");
    let loc = r.header("location").expect("location").to_owned();
    // Chunked transfer encoding without Content-Range, as docker sends.
    let mut stream = open_request(
        s.addr,
        "PATCH",
        &loc,
        &[("Transfer-Encoding", "chunked")],
        b"",
    );
    let data = vec![1u8; 200_000];
    for part in data.chunks(30_000) {
        write!(stream, "{:x}\r\n", part.len()).expect("write");
        stream.write_all(part).expect("write");
        stream.write_all(b"\r\n").expect("write");
    }
    stream.write_all(b"0\r\n\r\n").expect("write");
    let r = read_response(stream, "PATCH");
    assert_eq!(r.status, 202);
    assert_eq!(r.header("range"), Some("0-199999"));
    let r = s.request("PUT", &format!("{loc}?digest={}", sha256(&data)), &[], b"");
    assert_eq!(r.status, 201);
}

/// Reads one HTTP/1.1 response with a Content-Length body from `r`.
fn read_one(r: &mut std::io::BufReader<std::net::TcpStream>) -> (u16, Vec<u8>) {
    use std::io::{BufRead, Read};
    let mut status = String::new();
    r.read_line(&mut status).expect("status");
    let code = status
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header");
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; len];
    r.read_exact(&mut body).expect("body");
    (code, body)
}

#[test]
fn large_blobs_arrive_intact_by_sendfile_whole_in_ranges_and_back_to_back() {
    use std::io::Write;
    let s = TestServer::start(BIN);
    // Not a multiple of any buffer size, with no repeating pattern.
    let data: Vec<u8> = (0..3_333_337u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let digest = s.push_blob("zc/app", &data);
    let small = s.push_blob("zc/app", b"small blobs are streamed");
    let path = format!("/v2/zc/app/blobs/{digest}");
    let stream = std::net::TcpStream::connect(s.host()).expect("connect");
    let mut r = std::io::BufReader::new(stream);
    let asks = [
        (None, &data[..]),
        (Some("bytes=1000-2000999"), &data[1000..2_001_000]),
        (Some("bytes=-70000"), &data[data.len() - 70_000..]),
        (None, &data[..]),
    ];
    // All four on one keep-alive connection, the last two pipelined.
    for (i, (range, want)) in asks.iter().enumerate() {
        if i == 3 {
            break; // sent with the third
        }
        let extra = range.map_or(String::new(), |r| format!("Range: {r}\r\n"));
        r.get_mut()
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
            .expect("write");
        if i == 2 {
            let extra = "";
            r.get_mut()
                .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
                .expect("write");
        }
        let (code, body) = read_one(&mut r);
        assert_eq!(code, if range.is_some() { 206 } else { 200 }, "request {i}");
        assert!(body == *want, "request {i}: {} bytes differ", body.len());
    }
    let (code, body) = read_one(&mut r);
    assert_eq!(code, 200);
    assert_eq!(sha256(&body), digest, "the pipelined one");
    // A small blob on the same connection, then the large one again.
    r.get_mut()
        .write_all(format!("GET /v2/zc/app/blobs/{small} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("write");
    assert!(
        read_one(&mut r).1 == b"small blobs are streamed",
        "the small blob"
    );
    r.get_mut()
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .expect("write");
    assert_eq!(sha256(&read_one(&mut r).1), digest);
    // HEAD has no body, and curl agrees on the bytes.
    let h = s.request("HEAD", &path, &[], b"");
    assert_eq!(h.header("content-length"), Some("3333337"));
    let out = std::process::Command::new("curl")
        .args(["-sf", &format!("http://{}{path}", s.host())])
        .output()
        .expect("curl");
    assert!(out.status.success());
    assert_eq!(sha256(&out.stdout), digest);
    // They went by sendfile: six large bodies, none through user space.
    let m = String::from_utf8_lossy(&s.get("/metrics").body).into_owned();
    let zero_copy: u64 = m
        .lines()
        .find_map(|l| l.strip_prefix("slipway_registry_bytes_sent_zero_copy_total "))
        .and_then(|v| v.parse().ok())
        .expect("the zero-copy counter");
    assert_eq!(zero_copy, 4 * 3_333_337 + 2_000_000 + 70_000);
}

#[test]
fn an_immutable_tag_refuses_a_new_manifest_and_deletion_with_denied() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        "[[registry.immutable]]\nrepository = \"prod/*\"\ntags = \"v*\"\n",
    )
    .expect("config");
    let s = TestServer::start_with(BIN, &["--config", &config.display().to_string()]);
    let (digest, _) = s.push_image("prod/web", "v1", b"{\"v\":1}", &[b"one"]);
    // The same manifest again is fine; another one under the tag is not.
    s.push_image("prod/web", "v1", b"{\"v\":1}", &[b"one"]);
    let c2 = s.push_blob("prod/web", b"{\"v\":2}");
    let other = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{c2}","size":7}},"layers":[]}}"#
    );
    let r = s.request(
        "PUT",
        "/v2/prod/web/manifests/v1",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        other.as_bytes(),
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.error_code(), "DENIED");
    assert!(
        String::from_utf8_lossy(&r.body).contains("immutable"),
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    let head = s.request("HEAD", "/v2/prod/web/manifests/v1", &[], b"");
    assert_eq!(head.header("docker-content-digest"), Some(digest.as_str()));
    for path in [
        "/v2/prod/web/manifests/v1",
        &format!("/v2/prod/web/manifests/{digest}"),
    ] {
        let r = s.request("DELETE", path, &[], b"");
        assert_eq!(r.status, 403, "DELETE {path}");
        assert_eq!(r.error_code(), "DENIED");
    }
    // Other tags move.
    s.push_image("prod/web", "latest", b"{\"v\":1}", &[b"one"]);
    let r = s.request(
        "PUT",
        "/v2/prod/web/manifests/latest",
        &[("Content-Type", "application/vnd.oci.image.manifest.v1+json")],
        other.as_bytes(),
    );
    assert_eq!(r.status, 201);
}

#[test]
fn retention_removes_old_tags_on_gc_but_never_what_a_service_runs_and_dry_run_shows_it_first() {
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        "[[registry.retention]]\nrepository = \"app/*\"\nkeep_last = 1\n",
    )
    .expect("config");
    let s = TestServer::start_with(BIN, &["--config", &config.display().to_string()]);
    for (tag, version) in [
        ("app/web:v1", "1"),
        ("app/web:v2", "2"),
        ("app/web:v3", "3"),
    ] {
        slipway_testkit::pack_hello(BIN, &s, tag, version);
    }
    // A service runs v1, the oldest.
    let spec = dir.path().join("web.toml");
    std::fs::write(
        &spec,
        format!(
            "name = \"web\"\nimage = \"app/web:v1\"\nreplicas = 1\n[ingress]\nlisten = \"127.0.0.1:{}\"\n",
            slipway_testkit::free_port()
        ),
    )
    .expect("spec");
    let (code, _, err) = cli(BIN, &s, &["deploy", &spec.display().to_string()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = cli(BIN, &s, &["gc", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("tag app/web:v2"), "{out}");
    assert!(
        !out.contains("app/web:v1") && !out.contains("app/web:v3 "),
        "{out}"
    );
    let tags = s.get("/v2/app/web/tags/list").json();
    assert_eq!(
        tags["tags"],
        serde_json::json!(["v1", "v2", "v3"]),
        "a dry run removes nothing"
    );
    let (code, out, err) = cli(BIN, &s, &["gc"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1 tags by retention"), "{out}");
    let tags = s.get("/v2/app/web/tags/list").json();
    assert_eq!(
        tags["tags"],
        serde_json::json!(["v1", "v3"]),
        "v3 newest, v1 runs"
    );
    assert_eq!(cli(BIN, &s, &["service", "rm", "web"]).0, 0);
}

/// Packs hello as `repo:tag` reporting `version` straight into another registry.
fn pack_hello_into(s: &TestServer, host: &str, reference: &str, version: &str) -> String {
    let env = format!("HELLO_VERSION={version}");
    let input = format!("{}:/hello", slipway_testkit::hello_bin().display());
    let (code, out, err) = cli(
        BIN,
        s,
        &[
            "image",
            "pack",
            "-q",
            "--to",
            host,
            "--tag",
            reference,
            "--entrypoint",
            "/hello",
            "--env",
            &env,
            &input,
        ],
    );
    assert_eq!(code, 0, "pack into {host}: {err}");
    out.trim().to_owned()
}

#[test]
fn a_mirror_pulls_through_from_distribution_revalidates_tags_and_serves_its_copy_when_upstream_is_gone()
 {
    let dist = slipway_testkit::Distribution::start().expect("Distribution starts");
    let dir = tempfile::tempdir().expect("tmp");
    let config = dir.path().join("slipway.toml");
    std::fs::write(
        &config,
        format!(
            "[[registry.mirror]]\nprefix = \"hub\"\nupstream = \"{}\"\nrevalidate = \"1s\"\n",
            dist.host
        ),
    )
    .expect("config");
    let s = TestServer::start_with(BIN, &["--config", &config.display().to_string()]);
    let v1 = pack_hello_into(&s, &dist.host, "tools/hello:1", "1");
    // Nothing of it is here until someone pulls.
    assert_eq!(s.get("/v2/hub/tools/hello/tags/list").status, 404);
    let out = dir.path().join("out");
    let copy = |to: &str| {
        slipway_testkit::run(Command::new("skopeo").args([
            "copy",
            "-q",
            "--src-tls-verify=false",
            &format!("docker://{}/hub/tools/hello:1", s.host()),
            &format!("oci:{}:{to}", out.display()),
        ]))
    };
    copy("first");
    let head = s.request("HEAD", "/v2/hub/tools/hello/manifests/1", &[], b"");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("docker-content-digest"), Some(v1.as_str()));
    // A new push upstream shows once the copy is older than `revalidate`.
    let v2 = pack_hello_into(&s, &dist.host, "tools/hello:1", "2");
    assert_ne!(v1, v2);
    slipway_testkit::poll(Duration::from_secs(10), || {
        let h = s.request("HEAD", "/v2/hub/tools/hello/manifests/1", &[], b"");
        (h.header("docker-content-digest") == Some(v2.as_str())).then_some(())
    })
    .expect("the tag was revalidated");
    copy("second");
    // Mirrored repositories are read-only.
    let push = s.request("POST", "/v2/hub/tools/hello/blobs/uploads/", &[], b"");
    assert_eq!(push.status, 403);
    assert_eq!(push.error_code(), "DENIED");
    // The upstream goes away: what was pulled still is.
    drop(dist);
    copy("third");
    let by_digest = s.request(
        "GET",
        &format!("/v2/hub/tools/hello/manifests/{v2}"),
        &[],
        b"",
    );
    assert_eq!(by_digest.status, 200);
    // Something never pulled is a clean error naming the upstream.
    let missing = s.request("GET", "/v2/hub/tools/other/manifests/1", &[], b"");
    assert_eq!(
        missing.status,
        502,
        "{}",
        String::from_utf8_lossy(&missing.body)
    );
    assert!(String::from_utf8_lossy(&missing.body).contains("upstream"));
}

/// Each check runs on one machine, and on replica B of two sharing a bucket
/// and a PostgreSQL database (replica A up beside it).
macro_rules! on_one_machine_and_on_a_replica {
    ($($name:ident),* $(,)?) => {
        mod one_machine {
            $(
                #[test]
                fn $name() {
                    super::$name(&slipway_testkit::TestServer::start(super::BIN));
                }
            )*
        }
        mod replica {
            $(
                #[test]
                fn $name() {
                    let r = slipway_testkit::SharedRegistry::start(super::BIN, "");
                    super::$name(&r.b);
                }
            )*
        }
    };
}

on_one_machine_and_on_a_replica!(
    base_endpoint_announces_the_api_version,
    unknown_routes_and_methods_get_oci_errors,
    monolithic_push_then_get_head_and_ranges,
    chunked_upload_with_status_out_of_order_chunk_and_final_put,
    digest_mismatch_is_refused_and_nothing_becomes_visible,
    cross_repository_mount_links_or_falls_back_to_an_upload,
    manifests_by_tag_and_digest_with_exact_bytes,
    index_docker_and_artifact_manifests_are_accepted,
    bad_manifests_get_precise_errors,
    hostile_names_and_digests_never_reach_the_filesystem,
    tags_and_catalog_paginate_with_link_headers,
    deletes_remove_only_what_they_name,
    client_disconnect_mid_upload_leaves_a_resumable_session,
);
