//! `S3Blobs` against a real S3-compatible server (`s3s-fs`, started by the test).

use std::io::Read as _;

use slipway_core::Digest;
use slipway_s3::{S3Blobs, S3Config};
use slipway_store::{BlobBackend, BlobRead, StoreError};
use slipway_testkit::S3Server;

fn backend(s3: &S3Server, rt: &tokio::runtime::Runtime) -> S3Blobs {
    S3Blobs::new(
        &S3Config {
            endpoint: Some(s3.endpoint.clone()),
            bucket: S3Server::BUCKET.into(),
            region: "us-east-1".into(),
            access_key_id: S3Server::KEYS.0.into(),
            secret_access_key: S3Server::KEYS.1.into(),
            prefix: "reg/".into(),
            redirect: None,
        },
        rt.handle().clone(),
    )
    .expect("backend")
}

fn read_all(b: &S3Blobs, d: &Digest) -> Vec<u8> {
    let mut out = Vec::new();
    match b.open_blob(d).expect("open") {
        BlobRead::Stream(mut r) => r.read_to_end(&mut out).expect("read"),
        BlobRead::File(mut f) => f.read_to_end(&mut out).expect("read"),
    };
    out
}

#[test]
fn blobs_small_and_multipart_are_committed_read_streamed_and_removed() {
    let s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = backend(&s3, &rt);
    let dir = tempfile::tempdir().expect("tmp");

    let small = b"a small blob".to_vec();
    let big: Vec<u8> = (0..20u32 << 20).map(|i| (i % 251) as u8).collect();
    for data in [&small, &big] {
        let d = Digest::sha256_of(data);
        let staged = dir.path().join("staged");
        std::fs::write(&staged, data).expect("stage");
        b.commit(&staged, &d).expect("commit");
        assert!(!staged.exists(), "the staged file is consumed");
        assert!(read_all(&b, &d) == *data, "the same bytes come back");
        // Committing the same digest again keeps the object.
        std::fs::write(&staged, data).expect("stage");
        b.commit(&staged, &d).expect("commit again");
    }
    let hex = Digest::sha256_of(&big).hex().to_owned();
    assert!(
        s3.bucket_dir
            .join(format!("reg/blobs/sha256/{}/{hex}", &hex[..2]))
            .is_file(),
        "objects are named as blob files are"
    );
    let m = Digest::sha256_of(b"{}");
    b.write_whole(&m, b"{}").expect("write whole");
    assert_eq!(b.read_whole(&m).expect("read whole"), b"{}");
    b.remove(&m).expect("remove");
    assert!(matches!(b.read_whole(&m), Err(StoreError::BlobUnknown(_))));
    assert!(matches!(b.open_blob(&m), Err(StoreError::BlobUnknown(_))));
    b.remove(&m).expect("removing a missing blob is fine");
}

#[test]
fn a_stopped_server_is_unavailable_not_an_internal_error() {
    let mut s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let b = backend(&s3, &rt);
    s3.kill();
    let started = std::time::Instant::now();
    let err = b
        .read_whole(&Digest::sha256_of(b"x"))
        .expect_err("no server");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(90),
        "retries are bounded"
    );
}

fn replica(
    s3: &S3Server,
    pg: &slipway_testkit::PgServer,
    rt: &tokio::runtime::Runtime,
) -> (slipway_store::Store, tempfile::TempDir) {
    let local = tempfile::tempdir().expect("tmp");
    let md = slipway_postgres::PgMetadata::open(&pg.url, rt.handle().clone()).expect("pg");
    let store = slipway_store::Store::open_parts(
        local.path(),
        std::sync::Arc::new(backend(s3, rt)),
        std::sync::Arc::new(md),
    )
    .expect("store");
    (store, local)
}

fn objects_under(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                objects_under(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn two_replicas_on_one_bucket_and_database_share_chunked_uploads_and_blobs() {
    let s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
    let pg = slipway_testkit::PgServer::start().expect("postgresql-15 (scripts/test installs it)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (a, _la) = replica(&s3, &pg, &rt);
    let (b, _lb) = replica(&s3, &pg, &rt);
    let r: slipway_core::RepoName = "team/app".parse().expect("repo");

    // Three chunks of 9 MiB, alternating replicas: joined into one multipart object.
    let big: Vec<u8> = (0..27u32 << 20).map(|i| (i % 253) as u8).collect();
    let id = a.start_upload(&r).expect("start").to_string();
    let mut offset = 0;
    for (i, chunk) in big.chunks(9 << 20).enumerate() {
        let s = [&a, &b][i % 2];
        let mut w = s.upload_writer(&r, &id, Some(offset)).expect("writer");
        w.write(chunk).expect("write");
        offset = s.end_chunk(w).expect("end chunk");
    }
    let d = Digest::sha256_of(&big);
    let w = b.upload_writer(&r, &id, None).expect("writer");
    b.finish_upload(&r, w, &d).expect("finish on b");
    let mut back = Vec::new();
    a.open_blob(&d)
        .expect("open on a")
        .read_to_end(&mut back)
        .expect("read");
    assert!(back == big, "the joined blob is the uploaded bytes");

    // One chunk: copied on the server.
    let small = b"one chunk".to_vec();
    let id = b.start_upload(&r).expect("start").to_string();
    // A part no record names, as a replica that died between putting a chunk
    // and recording it leaves: finishing the session removes it too.
    let orphan = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(orphan.path(), b"lost chunk").expect("write");
    let uuid: uuid::Uuid = id.parse().expect("uuid");
    backend(&s3, &rt)
        .put_part(&uuid, &format!("0-{}", uuid::Uuid::new_v4()), orphan.path())
        .expect("orphan part");
    assert_eq!(objects_under(&s3.bucket_dir.join("reg/uploads")), 1);
    let mut w = b.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(&small).expect("write");
    let ds = Digest::sha256_of(&small);
    b.finish_upload(&r, w, &ds).expect("finish");
    assert_eq!(
        a.stat_blob(&r, &ds).expect("visible on a"),
        small.len() as u64
    );
    assert_eq!(
        objects_under(&s3.bucket_dir.join("reg/uploads")),
        0,
        "no part left in the bucket"
    );
}

#[test]
fn object_storage_stopped_mid_upload_is_a_clean_503_and_the_upload_goes_on_after() {
    let mut s3 = S3Server::start().expect("s3s-fs runs (scripts/test installs it)");
    let pg = slipway_testkit::PgServer::start().expect("postgresql-15 (scripts/test installs it)");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (a, _la) = replica(&s3, &pg, &rt);
    let (b, _lb) = replica(&s3, &pg, &rt);
    let r: slipway_core::RepoName = "team/fault".parse().expect("repo");
    let id = a.start_upload(&r).expect("start").to_string();
    let mut w = a.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(b"first ").expect("write");
    assert_eq!(a.end_chunk(w).expect("kept"), 6);

    s3.kill();
    let mut w = a.upload_writer(&r, &id, Some(6)).expect("writer");
    w.write(b"second").expect("write");
    let err = a.end_chunk(w).expect_err("object storage is down");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert_eq!(
        b.upload_offset(&r, &id).expect("offset"),
        6,
        "nothing half-kept"
    );

    s3.restart();
    let mut w = b.upload_writer(&r, &id, Some(6)).expect("writer");
    w.write(b"second").expect("write");
    let d = Digest::sha256_of(b"first second");
    b.finish_upload(&r, w, &d)
        .expect("finish after the restart");
    assert_eq!(a.stat_blob(&r, &d).expect("visible"), 12);
}
