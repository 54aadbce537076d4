//! The PostgreSQL metadata against a real server (Debian's postgresql-15,
//! started by the test as `nobody` in a temp directory).

use std::sync::Arc;

use slipway_postgres::{MIGRATIONS, PgMetadata};
use slipway_store::blobs::FsBlobs;
use slipway_store::{Metadata, Store, StoreError};
use slipway_testkit::PgServer;

fn server() -> PgServer {
    PgServer::start().expect("postgresql-15 is installed (scripts/test installs it)")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

fn store(dir: &std::path::Path, md: PgMetadata) -> Store {
    let blobs = FsBlobs::open(dir).expect("blobs");
    Store::open_parts(dir, Arc::new(blobs), Arc::new(md)).expect("store")
}

#[test]
fn the_postgres_metadata_passes_the_behaviour_suite() {
    let pg = server();
    let rt = runtime();
    let md = PgMetadata::open(&pg.url, rt.handle().clone()).expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path(), md);
    slipway_store::suite::behaviour_suite(&store);
    slipway_store::suite::behaviour_suite(&store);
}

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused() {
    let pg = server();
    let rt = runtime();
    let latest = MIGRATIONS.last().expect("a migration").0;
    let md = PgMetadata::open(&pg.url, rt.handle().clone()).expect("open");
    assert_eq!(md.schema_version().expect("version"), latest);
    // Opening again (another replica) applies nothing and works.
    let again = PgMetadata::open(&pg.url, rt.handle().clone()).expect("open again");
    assert_eq!(again.schema_version().expect("version"), latest);
    assert_eq!(again.total_blob_bytes().expect("sum"), 0);

    // A database written by a newer slipway is refused with a clear message.
    let out = std::process::Command::new(format!("{}/psql", slipway_testkit::POSTGRES_BIN))
        .args([&pg.url, "-c"])
        .arg(format!(
            "INSERT INTO slipway_schema (version) VALUES ({})",
            latest + 1
        ))
        .output()
        .expect("psql");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = PgMetadata::open(&pg.url, rt.handle().clone()).expect_err("newer schema");
    assert!(err.to_string().contains("newer than this slipway"), "{err}");
}

#[test]
fn a_database_restart_is_a_503_while_down_and_reconnects_after() {
    let mut pg = server();
    let rt = runtime();
    let md = PgMetadata::open(&pg.url, rt.handle().clone()).expect("open");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store(dir.path(), md);
    let r: slipway_core::RepoName = "restart/app".parse().expect("repo");
    let id = store.start_upload(&r).expect("upload").to_string();
    let mut w = store.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(b"before the restart").expect("write");
    let d = slipway_core::Digest::sha256_of(b"before the restart");
    store.finish_upload(&r, w, &d).expect("finish");
    pg.stop();
    match store.list_repos(None, None) {
        Err(e @ StoreError::Unavailable(_)) => {
            assert_eq!(e.kind(), slipway_core::ErrorKind::Unavailable);
        }
        other => panic!("expected Unavailable while the database is down, got {other:?}"),
    }
    pg.resume();
    // The pooled connections died with the server: the next call reconnects.
    assert_eq!(
        store.list_repos(None, None).expect("after restart"),
        ["restart/app"]
    );
    assert_eq!(store.stat_blob(&r, &d).expect("blob after restart"), 18);
}

#[test]
fn an_unreachable_database_is_named_at_open() {
    let rt = runtime();
    let port = slipway_testkit::free_port();
    let err = PgMetadata::open(
        &format!("postgres://slipway@127.0.0.1:{port}/postgres"),
        rt.handle().clone(),
    )
    .expect_err("nothing listens");
    assert!(err.to_string().contains("cannot connect"), "{err}");
    let err = PgMetadata::open("mysql://nope", rt.handle().clone()).expect_err("bad url");
    assert!(err.to_string().contains("database URL"), "{err}");
}
