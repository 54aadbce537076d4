//! Behaviour of the embedded store, driven through its public API on a temp dir.

use std::time::Duration;

use slipway_core::{Digest, Reference, RepoName, media};
use slipway_store::{GcOptions, Store, StoreError};

fn repo(s: &str) -> RepoName {
    s.parse().expect("valid repo")
}

fn push_blob(store: &Store, r: &RepoName, data: &[u8]) -> Digest {
    let id = store.start_upload(r).expect("start").to_string();
    let mut w = store.upload_writer(r, &id, Some(0)).expect("writer");
    w.write(data).expect("write");
    let d = Digest::sha256_of(data);
    store.finish_upload(r, w, &d).expect("finish");
    d
}

fn image_manifest(config: &Digest, layers: &[&Digest], subject: Option<&Digest>) -> Vec<u8> {
    let layers: Vec<String> = layers
        .iter()
        .map(|l| format!(r#"{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{l}","size":1}}"#))
        .collect();
    let subject = subject
        .map(|s| {
            format!(
                r#","subject":{{"mediaType":"{}","digest":"{s}","size":1}}"#,
                media::OCI_MANIFEST
            )
        })
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{}]{subject}}}"#,
        media::OCI_MANIFEST,
        layers.join(",")
    )
    .into_bytes()
}

fn no_grace(delete_untagged: bool) -> GcOptions {
    GcOptions {
        delete_untagged,
        grace: Duration::ZERO,
        ..GcOptions::default()
    }
}

#[test]
fn chunked_upload_commits_blob_only_on_matching_digest() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("a/b");
    let id = store.start_upload(&r).expect("start").to_string();
    {
        let mut w = store.upload_writer(&r, &id, Some(0)).expect("writer");
        w.write(b"hello ").expect("write");
    }
    assert_eq!(store.upload_offset(&r, &id).expect("offset"), 6);
    assert!(matches!(
        store.upload_writer(&r, &id, Some(3)),
        Err(StoreError::UploadOffset {
            expected: 6,
            got: 3
        })
    ));
    let mut w = store.upload_writer(&r, &id, Some(6)).expect("writer");
    w.write(b"world").expect("write");
    let wrong = Digest::sha256_of(b"other");
    assert!(matches!(
        store.finish_upload(&r, w, &wrong),
        Err(StoreError::DigestMismatch { .. })
    ));
    // The failed session is gone and nothing became visible.
    assert!(matches!(
        store.upload_offset(&r, &id),
        Err(StoreError::UploadUnknown(_))
    ));
    assert!(
        store
            .stat_blob(&r, &Digest::sha256_of(b"hello world"))
            .is_err()
    );

    let d = push_blob(&store, &r, b"hello world");
    assert_eq!(store.stat_blob(&r, &d).expect("stat"), 11);
    assert_eq!(
        {
            let mut v = Vec::new();
            std::io::Read::read_to_end(&mut store.open_blob(&d).expect("open"), &mut v)
                .expect("read");
            v
        },
        b"hello world"
    );
}

#[test]
fn blob_in_one_repository_is_invisible_in_another_until_mounted() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let (a, b) = (repo("a"), repo("b"));
    let d = push_blob(&store, &a, b"shared");
    assert!(matches!(
        store.stat_blob(&b, &d),
        Err(StoreError::BlobUnknown(_))
    ));
    assert!(
        !store
            .mount_blob(&b, &a, &Digest::sha256_of(b"nope"))
            .expect("mount")
    );
    assert!(store.mount_blob(&a, &b, &d).expect("mount"));
    assert_eq!(store.stat_blob(&b, &d).expect("stat"), 6);
    assert_eq!(store.stored_bytes(), 6, "content is stored once");
}

#[test]
fn upload_session_resumes_after_reopen() {
    let dir = tempfile::tempdir().expect("tmp");
    let r = repo("r");
    let id = {
        let store = Store::open(dir.path()).expect("open");
        let id = store.start_upload(&r).expect("start").to_string();
        let mut w = store.upload_writer(&r, &id, None).expect("writer");
        w.write(b"part one ").expect("write");
        id
    };
    let store = Store::open(dir.path()).expect("reopen");
    assert_eq!(store.upload_offset(&r, &id).expect("offset"), 9);
    let mut w = store.upload_writer(&r, &id, Some(9)).expect("writer");
    w.write(b"part two").expect("write");
    let d = Digest::sha256_of(b"part one part two");
    assert_eq!(store.finish_upload(&r, w, &d).expect("finish"), 17);
}

#[test]
fn manifest_push_requires_referenced_blobs_and_keeps_exact_bytes() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app");
    let config = push_blob(&store, &r, b"{}");
    let missing = Digest::sha256_of(b"missing layer");
    let body = image_manifest(&config, &[&missing], None);
    let tag = Reference::parse("v1").expect("tag");
    assert!(matches!(
        store.put_manifest(&r, &tag, &body, Some(media::OCI_MANIFEST)),
        Err(StoreError::ManifestBlobUnknown(d)) if d == missing
    ));
    let layer = push_blob(&store, &r, b"missing layer");
    // Whitespace is kept: the digest is over the bytes as received.
    let mut body = image_manifest(&config, &[&layer], None);
    body.extend_from_slice(b"\n  ");
    let put = store
        .put_manifest(&r, &tag, &body, Some(media::OCI_MANIFEST))
        .expect("put");
    assert_eq!(put.digest, Digest::sha256_of(&body));
    let (meta, bytes) = store.get_manifest(&r, &tag).expect("get");
    assert_eq!(meta.digest, put.digest);
    assert_eq!(&bytes[..], &body[..]);
    let by_digest = Reference::Digest(Digest::sha256_of(b"other bytes"));
    assert!(matches!(
        store.put_manifest(&r, &by_digest, &body, None),
        Err(StoreError::ManifestDigestMismatch { .. })
    ));
}

#[test]
fn tags_and_catalog_page_in_lexical_order() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let config = Digest::sha256_of(b"{}");
    for name in ["zeta", "alpha", "mid/x"] {
        let r = repo(name);
        push_blob(&store, &r, b"{}");
        let body = image_manifest(&config, &[], None);
        for t in ["b", "a", "c", "B"] {
            store
                .put_manifest(&r, &Reference::parse(t).expect("tag"), &body, None)
                .expect("put");
        }
    }
    let r = repo("zeta");
    assert_eq!(
        store.list_tags(&r, None, None).expect("tags"),
        ["B", "a", "b", "c"]
    );
    assert_eq!(
        store.list_tags(&r, Some("a"), Some(1)).expect("tags"),
        ["b"]
    );
    assert_eq!(
        store.list_tags(&r, None, Some(0)).expect("tags"),
        Vec::<String>::new()
    );
    assert!(matches!(
        store.list_tags(&repo("nope"), None, None),
        Err(StoreError::RepoUnknown(_))
    ));
    assert_eq!(
        store.list_repos(None, Some(2)).expect("repos"),
        ["alpha", "mid/x"]
    );
    assert_eq!(
        store.list_repos(Some("mid/x"), None).expect("repos"),
        ["zeta"]
    );
}

#[test]
fn referrers_are_indexed_filtered_and_removed_with_their_manifest() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app");
    let config = push_blob(&store, &r, b"{}");
    let subject = Digest::sha256_of(b"not pushed yet");
    let body = image_manifest(&config, &[], Some(&subject));
    let put = store
        .put_manifest(
            &r,
            &Reference::Digest(Digest::sha256_of(&body)),
            &body,
            None,
        )
        .expect("put");
    assert_eq!(put.subject.as_ref(), Some(&subject));
    let refs = store.referrers(&r, &subject, None).expect("referrers");
    assert_eq!(refs.len(), 1);
    assert_eq!(refs[0].digest, put.digest);
    assert!(
        store
            .referrers(&r, &subject, Some("application/x-none"))
            .expect("filtered")
            .is_empty()
    );
    store.delete_manifest(&r, &put.digest).expect("delete");
    assert!(
        store
            .referrers(&r, &subject, None)
            .expect("referrers")
            .is_empty()
    );
}

#[test]
fn deleting_a_tag_keeps_the_manifest_and_deleting_a_manifest_drops_its_tags() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app");
    let config = push_blob(&store, &r, b"{}");
    let body = image_manifest(&config, &[], None);
    let v1 = Reference::parse("v1").expect("tag");
    let v2 = Reference::parse("v2").expect("tag");
    let put = store.put_manifest(&r, &v1, &body, None).expect("put");
    store.put_manifest(&r, &v2, &body, None).expect("put");
    store
        .delete_tag(&r, &"v1".parse().expect("tag"))
        .expect("delete tag");
    assert!(store.stat_manifest(&r, &v1).is_err());
    assert!(
        store
            .stat_manifest(&r, &Reference::Digest(put.digest.clone()))
            .is_ok()
    );
    let (_, tags) = store.delete_manifest(&r, &put.digest).expect("delete");
    assert_eq!(
        tags.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["v2"]
    );
    assert!(store.stat_manifest(&r, &v2).is_err());
}

#[test]
fn gc_removes_only_unreferenced_blobs_and_untagged_manifests_when_asked() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app");
    let config = push_blob(&store, &r, b"{}");
    let layer = push_blob(&store, &r, b"layer");
    let orphan = push_blob(&store, &r, b"orphan");
    let tagged = image_manifest(&config, &[&layer], None);
    store
        .put_manifest(&r, &Reference::parse("v1").expect("tag"), &tagged, None)
        .expect("put");
    let untagged_layer = push_blob(&store, &r, b"old layer");
    let untagged = image_manifest(&config, &[&untagged_layer], None);
    let old = store
        .put_manifest(
            &r,
            &Reference::Digest(Digest::sha256_of(&untagged)),
            &untagged,
            None,
        )
        .expect("put");

    // With a grace period everything recent survives.
    let report = store
        .gc(&GcOptions {
            delete_untagged: true,
            grace: Duration::from_secs(600),
            ..GcOptions::default()
        })
        .expect("gc");
    assert!(report.blobs.is_empty() && report.manifests.is_empty());

    let dry = store
        .gc(&GcOptions {
            dry_run: true,
            ..no_grace(false)
        })
        .expect("gc");
    assert_eq!(
        dry.blobs.iter().map(|b| &b.0).collect::<Vec<_>>(),
        [&orphan]
    );
    assert!(
        store.open_blob(&orphan).is_ok(),
        "a dry run deletes nothing"
    );

    let report = store.gc(&no_grace(false)).expect("gc");
    assert_eq!(
        report.blobs.iter().map(|b| &b.0).collect::<Vec<_>>(),
        [&orphan]
    );
    assert_eq!(report.bytes_freed, 6);
    assert!(store.open_blob(&orphan).is_err());
    assert!(store.stat_blob(&r, &untagged_layer).is_ok());

    let report = store.gc(&no_grace(true)).expect("gc");
    assert_eq!(report.manifests.len(), 1);
    assert_eq!(report.manifests[0].1, old.digest);
    let freed: Vec<_> = report.blobs.iter().map(|b| b.0.clone()).collect();
    assert!(freed.contains(&untagged_layer) && freed.contains(&old.digest));
    assert!(store.stat_blob(&r, &layer).is_ok() && store.stat_blob(&r, &config).is_ok());
    assert!(
        store
            .get_manifest(&r, &Reference::parse("v1").expect("tag"))
            .is_ok()
    );
}

#[test]
fn abandoned_uploads_are_purged_after_their_age() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app");
    let id = store.start_upload(&r).expect("start").to_string();
    std::fs::write(dir.path().join("uploads/stray-file"), b"x").expect("write");
    assert_eq!(
        store
            .purge_uploads(Duration::from_secs(3600))
            .expect("purge"),
        0
    );
    assert_eq!(store.purge_uploads(Duration::ZERO).expect("purge"), 2);
    assert!(matches!(
        store.upload_offset(&r, &id),
        Err(StoreError::UploadUnknown(_))
    ));
    assert_eq!(
        std::fs::read_dir(dir.path().join("uploads"))
            .expect("ls")
            .count(),
        0
    );
}

#[test]
fn an_immutable_tag_is_pushed_again_only_with_the_same_manifest_and_is_never_deleted() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    store.set_immutable(vec![slipway_store::ImmutableRule {
        repository: "prod/*".into(),
        tags: "v*".into(),
    }]);
    let r = repo("prod/web");
    let c1 = push_blob(&store, &r, b"{\"a\":1}");
    let c2 = push_blob(&store, &r, b"{\"a\":2}");
    let (one, two) = (
        image_manifest(&c1, &[], None),
        image_manifest(&c2, &[], None),
    );
    let v1 = Reference::parse("v1").expect("tag");
    let put = store.put_manifest(&r, &v1, &one, None).expect("first push");
    store
        .put_manifest(&r, &v1, &one, None)
        .expect("the same manifest again");
    let refused = store.put_manifest(&r, &v1, &two, None);
    assert!(
        matches!(&refused, Err(StoreError::TagImmutable { tag, rule, .. }) if tag == "v1" && rule == "prod/*"),
        "{refused:?}"
    );
    assert_eq!(
        store.stat_manifest(&r, &v1).expect("stat").digest,
        put.digest,
        "the tag did not move"
    );
    assert!(matches!(
        store.delete_tag(&r, &"v1".parse().expect("tag")),
        Err(StoreError::TagImmutable { .. })
    ));
    assert!(matches!(
        store.delete_manifest(&r, &put.digest),
        Err(StoreError::TagImmutable { .. })
    ));
    assert!(
        store
            .stat_manifest(&r, &Reference::Digest(put.digest.clone()))
            .is_ok()
    );
    // Tags and repositories the rule does not name move freely.
    let latest = Reference::parse("latest").expect("tag");
    store.put_manifest(&r, &latest, &one, None).expect("latest");
    store
        .put_manifest(&r, &latest, &two, None)
        .expect("latest moves");
    let dev = repo("dev/web");
    let c3 = push_blob(&store, &dev, b"{\"a\":1}");
    let c4 = push_blob(&store, &dev, b"{\"a\":2}");
    store
        .put_manifest(&dev, &v1, &image_manifest(&c3, &[], None), None)
        .expect("dev v1");
    store
        .put_manifest(&dev, &v1, &image_manifest(&c4, &[], None), None)
        .expect("dev v1 moves");
}

/// Pushes one manifest per tag (each with its own config) into `r`; their digests.
fn push_tagged(store: &Store, r: &RepoName, tags: &[&str]) -> Vec<Digest> {
    tags.iter()
        .map(|t| {
            let config = push_blob(store, r, format!("{{\"tag\":\"{t}\"}}").as_bytes());
            let body = image_manifest(&config, &[], None);
            let tag = Reference::parse(t).expect("tag");
            store
                .put_manifest(r, &tag, &body, None)
                .expect("put")
                .digest
        })
        .collect()
}

fn tags_of(store: &Store, r: &RepoName) -> Vec<String> {
    store.list_tags(r, None, None).expect("tags")
}

#[test]
fn retention_keeps_the_newest_kept_immutable_and_running_tags_and_removes_the_rest_with_their_manifests()
 {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    let r = repo("app/web");
    let digests = push_tagged(&store, &r, &["t1", "t2", "t3", "t4", "t5", "stable"]);
    let rule = slipway_store::RetentionRule {
        repository: "app/*".into(),
        keep_last: 2,
        order: slipway_store::RetentionOrder::Pushed,
        keep_tags: Some("stable".into()),
    };
    let opts = GcOptions {
        retention: vec![rule],
        protected: [digests[0].clone()].into_iter().collect(),
        ..no_grace(false)
    };
    let dry = store
        .gc(&GcOptions {
            dry_run: true,
            ..opts.clone()
        })
        .expect("dry run");
    let mut would: Vec<&str> = dry.tags.iter().map(|(_, t, _)| t.as_str()).collect();
    would.sort_unstable();
    assert_eq!(
        would,
        ["t2", "t3"],
        "t5 and t4 newest, t1 runs, stable kept"
    );
    assert_eq!(tags_of(&store, &r).len(), 6, "a dry run changes nothing");
    let report = store.gc(&opts).expect("gc");
    assert_eq!(report.tags.len(), 2);
    assert_eq!(tags_of(&store, &r), ["stable", "t1", "t4", "t5"]);
    for d in &digests[1..3] {
        assert!(
            store
                .stat_manifest(&r, &Reference::Digest(d.clone()))
                .is_err(),
            "the manifests retention left untagged go"
        );
    }
    assert_eq!(report.manifests.len(), 2);
    assert_eq!(report.blobs.len(), 4, "their manifests and configs");
}

#[test]
fn semver_retention_ranks_by_version_and_keeps_other_tags_and_immutable_ones() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Store::open(dir.path()).expect("open");
    store.set_immutable(vec![slipway_store::ImmutableRule {
        repository: "lib/*".into(),
        tags: "v1.0.0".into(),
    }]);
    let r = repo("lib/x");
    push_tagged(
        &store,
        &r,
        &["v1.0.0", "v2.0.0", "v1.5.0", "1.4.0", "latest"],
    );
    let opts = GcOptions {
        retention: vec![slipway_store::RetentionRule {
            repository: "lib/*".into(),
            keep_last: 1,
            order: slipway_store::RetentionOrder::Semver,
            keep_tags: None,
        }],
        ..no_grace(false)
    };
    store.gc(&opts).expect("gc");
    assert_eq!(tags_of(&store, &r), ["latest", "v1.0.0", "v2.0.0"]);
}

/// Committed blobs in memory: a second backend, to show the store keeps nothing
/// committed anywhere else.
#[derive(Debug, Default)]
struct MemBlobs(std::sync::Mutex<std::collections::HashMap<Digest, Vec<u8>>>);

impl slipway_store::BlobBackend for MemBlobs {
    fn commit(&self, staged: &std::path::Path, digest: &Digest) -> slipway_store::Result<()> {
        let bytes = std::fs::read(staged).map_err(|e| StoreError::io("read staged", e))?;
        let _ = std::fs::remove_file(staged);
        self.0
            .lock()
            .expect("lock")
            .entry(digest.clone())
            .or_insert(bytes);
        Ok(())
    }
    fn write_whole(&self, digest: &Digest, data: &[u8]) -> slipway_store::Result<()> {
        self.0
            .lock()
            .expect("lock")
            .entry(digest.clone())
            .or_insert_with(|| data.to_vec());
        Ok(())
    }
    fn read_whole(&self, digest: &Digest) -> slipway_store::Result<Vec<u8>> {
        self.0
            .lock()
            .expect("lock")
            .get(digest)
            .cloned()
            .ok_or_else(|| StoreError::BlobUnknown(digest.clone()))
    }
    fn open_blob(&self, digest: &Digest) -> slipway_store::Result<slipway_store::BlobRead> {
        let bytes = self.read_whole(digest)?;
        Ok(slipway_store::BlobRead::Stream(Box::new(
            std::io::Cursor::new(bytes),
        )))
    }
    fn remove(&self, digest: &Digest) -> slipway_store::Result<()> {
        self.0.lock().expect("lock").remove(digest);
        Ok(())
    }
}

#[test]
fn every_committed_blob_and_manifest_goes_through_the_blob_backend() {
    let dir = tempfile::tempdir().expect("tmp");
    let mem = std::sync::Arc::new(MemBlobs::default());
    let store = Store::open_with(dir.path(), mem.clone()).expect("open");
    let r = repo("app");
    let layer = push_blob(&store, &r, b"layer bytes");
    let config = push_blob(&store, &r, b"{}");
    let body = image_manifest(&config, &[&layer], None);
    let put = store
        .put_manifest(&r, &Reference::parse("v1").expect("tag"), &body, None)
        .expect("put");
    assert_eq!(
        mem.0.lock().expect("lock").len(),
        3,
        "two blobs and the manifest"
    );
    assert!(
        !dir.path().join("blobs/sha256").exists()
            || std::fs::read_dir(dir.path().join("blobs/sha256"))
                .expect("dir")
                .next()
                .is_none(),
        "nothing committed on the local disk"
    );
    let mut read = Vec::new();
    std::io::Read::read_to_end(&mut store.open_blob(&layer).expect("open"), &mut read)
        .expect("read");
    assert_eq!(read, b"layer bytes");
    let (_, bytes) = store
        .get_manifest(&r, &Reference::Digest(put.digest.clone()))
        .expect("manifest");
    assert_eq!(&bytes[..], &body[..]);
    store.delete_manifest(&r, &put.digest).expect("delete");
    store.gc(&no_grace(false)).expect("gc");
    assert!(
        mem.0.lock().expect("lock").is_empty(),
        "GC removes from the backend"
    );
}

/// A backend whose first commit fails, as object storage past its retries.
#[derive(Debug, Default)]
struct FlakyBlobs {
    failed: std::sync::atomic::AtomicBool,
    inner: MemBlobs,
}

impl slipway_store::BlobBackend for FlakyBlobs {
    fn commit(&self, staged: &std::path::Path, digest: &Digest) -> slipway_store::Result<()> {
        if !self.failed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("object storage is down".into()));
        }
        self.inner.commit(staged, digest)
    }
    fn write_whole(&self, digest: &Digest, data: &[u8]) -> slipway_store::Result<()> {
        self.inner.write_whole(digest, data)
    }
    fn read_whole(&self, digest: &Digest) -> slipway_store::Result<Vec<u8>> {
        self.inner.read_whole(digest)
    }
    fn open_blob(&self, digest: &Digest) -> slipway_store::Result<slipway_store::BlobRead> {
        self.inner.open_blob(digest)
    }
    fn remove(&self, digest: &Digest) -> slipway_store::Result<()> {
        self.inner.remove(digest)
    }
}

#[test]
fn an_upload_whose_commit_failed_can_be_finished_again_with_nothing_visible_before() {
    let dir = tempfile::tempdir().expect("tmp");
    let store =
        Store::open_with(dir.path(), std::sync::Arc::new(FlakyBlobs::default())).expect("open");
    let r = repo("app");
    let data = b"the layer";
    let d = Digest::sha256_of(data);
    let id = store.start_upload(&r).expect("start").to_string();
    let mut w = store.upload_writer(&r, &id, Some(0)).expect("writer");
    w.write(data).expect("write");
    let failed = store.finish_upload(&r, w, &d);
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    assert!(store.stat_blob(&r, &d).is_err(), "nothing half-visible");
    assert_eq!(
        store
            .upload_offset(&r, &id)
            .expect("the session is still there"),
        data.len() as u64
    );
    let w = store.upload_writer(&r, &id, None).expect("not busy");
    store
        .finish_upload(&r, w, &d)
        .expect("finished the second time");
    assert_eq!(store.stat_blob(&r, &d).expect("visible"), data.len() as u64);
}

#[test]
fn the_redb_metadata_passes_the_behaviour_suite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("open");
    slipway_store::suite::behaviour_suite(&store);
    slipway_store::suite::behaviour_suite(&store);
}
