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

/// Two stores over one database and one blob directory: two replicas.
fn replicas(
    pg: &PgServer,
    rt: &tokio::runtime::Runtime,
    shared: &std::path::Path,
) -> [(Store, tempfile::TempDir); 2] {
    std::array::from_fn(|_| {
        let local = tempfile::tempdir().expect("tempdir");
        let md = PgMetadata::open(&pg.url, rt.handle().clone()).expect("open");
        let blobs = FsBlobs::open(shared).expect("blobs");
        let s = Store::open_parts(local.path(), Arc::new(blobs), Arc::new(md)).expect("store");
        (s, local)
    })
}

#[test]
fn a_chunked_upload_alternates_replicas_chunk_by_chunk_and_finishes_on_either() {
    let pg = server();
    let rt = runtime();
    let shared = tempfile::tempdir().expect("tempdir");
    let [(a, _da), (b, _db)] = replicas(&pg, &rt, shared.path());
    let r: slipway_core::RepoName = "shared/app".parse().expect("repo");
    let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let id = a.start_upload(&r).expect("start").to_string();
    let mut offset = 0u64;
    for (i, chunk) in data.chunks(7_000).enumerate() {
        let s = if i % 2 == 0 { &a } else { &b };
        assert_eq!(s.upload_offset(&r, &id).expect("offset"), offset);
        let mut w = s.upload_writer(&r, &id, Some(offset)).expect("writer");
        w.write(chunk).expect("write");
        offset = s.end_chunk(w).expect("end chunk");
    }
    assert_eq!(offset, data.len() as u64);
    // A chunk that starts at the wrong offset is refused on either replica.
    assert!(matches!(
        a.upload_writer(&r, &id, Some(3)),
        Err(StoreError::UploadOffset { .. })
    ));

    let d = slipway_core::Digest::sha256_of(&data);
    let w = b.upload_writer(&r, &id, None).expect("writer");
    assert_eq!(
        b.finish_upload(&r, w, &d).expect("finish"),
        data.len() as u64
    );
    // Visible through the other replica at once, byte for byte.
    assert_eq!(a.stat_blob(&r, &d).expect("stat"), data.len() as u64);
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut a.open_blob(&d).expect("open"), &mut back).expect("read");
    assert_eq!(back, data);
    // The session and its parts are gone.
    assert!(matches!(
        a.upload_offset(&r, &id),
        Err(StoreError::UploadUnknown(_))
    ));
    let left: Vec<_> = std::fs::read_dir(shared.path().join("uploads"))
        .expect("uploads dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "parts left behind: {left:?}");
}

#[test]
fn a_chunk_lost_with_its_replica_leaves_the_session_at_its_last_kept_byte() {
    let pg = server();
    let rt = runtime();
    let shared = tempfile::tempdir().expect("tempdir");
    let [(a, _da), (b, _db)] = replicas(&pg, &rt, shared.path());
    let r: slipway_core::RepoName = "shared/lost".parse().expect("repo");
    let id = a.start_upload(&r).expect("start").to_string();
    let mut w = a.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(b"kept ").expect("write");
    assert_eq!(a.end_chunk(w).expect("end"), 5);
    // Replica a dies mid-chunk: its writer never ends the chunk.
    let mut w = a.upload_writer(&r, &id, Some(5)).expect("writer");
    w.write(b"lost bytes").expect("write");
    drop(w);
    // Two requests race for the same offset on both replicas: one wins.
    let mut w1 = b.upload_writer(&r, &id, Some(5)).expect("writer 1");
    let mut w2 = a.upload_writer(&r, &id, Some(5)).expect("writer 2");
    w1.write(b"and more").expect("write");
    w2.write(b"XXXXXXXX").expect("write");
    assert_eq!(b.end_chunk(w1).expect("first wins"), 13);
    assert!(matches!(a.end_chunk(w2), Err(StoreError::UploadBusy(_))));
    let d = slipway_core::Digest::sha256_of(b"kept and more");
    let w = a.upload_writer(&r, &id, Some(13)).expect("writer");
    a.finish_upload(&r, w, &d).expect("finish");
    assert_eq!(b.stat_blob(&r, &d).expect("stat"), 13);
}

#[test]
fn a_blob_looked_up_through_one_replica_is_spared_by_gc_on_the_other() {
    let pg = server();
    let rt = runtime();
    let shared = tempfile::tempdir().expect("tempdir");
    let [(a, _da), (b, _db)] = replicas(&pg, &rt, shared.path());
    let r: slipway_core::RepoName = "shared/touch".parse().expect("repo");
    let id = a.start_upload(&r).expect("start").to_string();
    let mut w = a.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(b"an unreferenced layer").expect("write");
    let d = slipway_core::Digest::sha256_of(b"an unreferenced layer");
    a.finish_upload(&r, w, &d).expect("finish");
    let gc = |dry_run| slipway_store::GcOptions {
        dry_run,
        grace: std::time::Duration::from_secs(1),
        ..slipway_store::GcOptions::default()
    };
    // Wait (polling a dry run) until the blob is past its grace on replica a.
    let due = || {
        slipway_testkit::poll(std::time::Duration::from_secs(10), || {
            let rep = a.gc(&gc(true)).expect("dry run");
            rep.blobs.iter().any(|(x, _)| x == &d).then_some(())
        })
    };
    assert!(due().is_some(), "never due");
    // A client looks it up through b (as before referencing it in a manifest).
    assert_eq!(b.stat_blob(&r, &d).expect("stat"), 21);
    let rep = a.gc(&gc(false)).expect("gc");
    assert!(
        !rep.blobs.iter().any(|(x, _)| x == &d),
        "removed a blob just looked up on b"
    );
    assert!(a.stat_blob(&r, &d).is_ok());
    // Once the grace has passed again, it goes.
    assert!(due().is_some(), "never due again");
    let rep = a.gc(&gc(false)).expect("gc");
    assert!(rep.blobs.iter().any(|(x, _)| x == &d));
}
