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
