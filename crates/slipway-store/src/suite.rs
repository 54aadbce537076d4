//! The behaviour every [`Metadata`](crate::Metadata) must show under a
//! [`Store`]: each implementation's tests open a store over it and call
//! [`behaviour_suite`]. Repository names are unique per call, so a shared
//! database may run it more than once.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use slipway_core::{Digest, Reference, RepoName, media};

use crate::{GcOptions, ImmutableRule, RetentionRule, Store, StoreError};

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn push_blob(store: &Store, r: &RepoName, data: &[u8]) -> Digest {
    let id = store.start_upload(r).unwrap().to_string();
    let mut w = store.upload_writer(r, &id, Some(0)).unwrap();
    w.write(data).unwrap();
    let d = Digest::sha256_of(data);
    store.finish_upload(r, w, &d).unwrap();
    d
}

fn manifest(config: &Digest, layer: &Digest, subject: Option<&Digest>) -> Vec<u8> {
    let subject = subject
        .map(|s| {
            format!(
                r#","subject":{{"mediaType":"{}","digest":"{s}","size":1}}"#,
                media::OCI_MANIFEST
            )
        })
        .unwrap_or_default();
    format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config}","size":1}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer}","size":1}}]{subject}}}"#,
        media::OCI_MANIFEST
    )
    .into_bytes()
}

fn tag(t: &str) -> Reference {
    Reference::Tag(t.parse().unwrap())
}

/// Runs every check against `store` (whose immutable rules it replaces).
pub fn behaviour_suite(store: &Store) {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let ns = &run[..12];
    let a = repo(&format!("suite{ns}/a"));
    let b = repo(&format!("suite{ns}/b"));

    // Blobs: linked per repository, mounted, unlinked.
    let config = push_blob(store, &a, format!("config {ns}").as_bytes());
    let layer = push_blob(store, &a, format!("layer {ns}").as_bytes());
    assert_eq!(store.stat_blob(&a, &layer).unwrap(), 6 + ns.len() as u64);
    assert!(matches!(
        store.stat_blob(&b, &layer),
        Err(StoreError::BlobUnknown(_))
    ));
    assert!(store.mount_blob(&a, &b, &layer).unwrap());
    assert!(
        !store
            .mount_blob(&b, &a, &Digest::sha256_of(b"nowhere"))
            .unwrap()
    );
    store.delete_blob(&b, &layer).unwrap();
    assert!(matches!(
        store.stat_blob(&b, &layer),
        Err(StoreError::BlobUnknown(_))
    ));

    // Manifests need their blobs in the repository, keep exact bytes.
    let body = manifest(&config, &layer, None);
    assert!(matches!(
        store.put_manifest(&b, &tag("v1"), &body, Some(media::OCI_MANIFEST)),
        Err(StoreError::ManifestBlobUnknown(_))
    ));
    let put = store
        .put_manifest(&a, &tag("v1"), &body, Some(media::OCI_MANIFEST))
        .unwrap();
    let (meta, bytes) = store.get_manifest(&a, &tag("v1")).unwrap();
    assert_eq!(
        (meta.digest.clone(), bytes.to_vec()),
        (put.digest.clone(), body.clone())
    );
    assert_eq!(
        store
            .stat_manifest(&a, &Reference::Digest(put.digest.clone()))
            .unwrap()
            .size,
        body.len() as u64
    );

    // Tags page in byte order.
    for t in ["v1.10", "v1.9", "V2", "latest", "v1.9-rc"] {
        store
            .put_manifest(&a, &tag(t), &body, Some(media::OCI_MANIFEST))
            .unwrap();
    }
    assert_eq!(
        store.list_tags(&a, None, None).unwrap(),
        ["V2", "latest", "v1", "v1.10", "v1.9", "v1.9-rc"]
    );
    assert_eq!(
        store.list_tags(&a, Some("v1"), Some(2)).unwrap(),
        ["v1.10", "v1.9"]
    );
    assert!(matches!(
        store.list_tags(&repo(&format!("suite{ns}/none")), None, None),
        Err(StoreError::RepoUnknown(_))
    ));
    let after = format!("suite{ns}/");
    let page = store.list_repos(Some(&after), Some(2)).unwrap();
    assert_eq!(page, [a.to_string(), b.to_string()]);

    // Referrers: indexed, filtered, removed with their manifest.
    let sig_body = {
        let mut m: serde_json::Value =
            serde_json::from_slice(&manifest(&config, &layer, Some(&put.digest))).unwrap();
        m["artifactType"] = "application/vnd.example.sig".into();
        serde_json::to_vec(&m).unwrap()
    };
    let sig = store
        .put_manifest(
            &a,
            &Reference::Digest(Digest::sha256_of(&sig_body)),
            &sig_body,
            Some(media::OCI_MANIFEST),
        )
        .unwrap();
    assert_eq!(sig.subject.as_ref(), Some(&put.digest));
    let refs = store.referrers(&a, &put.digest, None).unwrap();
    assert_eq!(refs.len(), 1);
    assert_eq!(
        refs[0].artifact_type.as_deref(),
        Some("application/vnd.example.sig")
    );
    assert!(
        store
            .referrers(&a, &put.digest, Some("other/type"))
            .unwrap()
            .is_empty()
    );

    // Immutable tags: pushed again only with the same manifest, never deleted
    // or moved, also through a manifest delete.
    store.set_immutable(vec![ImmutableRule {
        repository: a.to_string(),
        tags: "v1*".into(),
    }]);
    store
        .put_manifest(&a, &tag("v1"), &body, Some(media::OCI_MANIFEST))
        .unwrap();
    assert!(matches!(
        store.put_manifest(&a, &tag("v1"), &sig_body, Some(media::OCI_MANIFEST)),
        Err(StoreError::TagImmutable { .. })
    ));
    assert!(matches!(
        store.delete_tag(&a, &"v1".parse().unwrap()),
        Err(StoreError::TagImmutable { .. })
    ));
    assert!(matches!(
        store.delete_manifest(&a, &put.digest),
        Err(StoreError::TagImmutable { .. })
    ));
    assert_eq!(
        store.stat_manifest(&a, &tag("v1")).unwrap().digest,
        put.digest
    );
    store.set_immutable(Vec::new());

    // Deleting a tag keeps the manifest; deleting the manifest drops its tags
    // and its referrer entries.
    assert_eq!(
        store.delete_tag(&a, &"latest".parse().unwrap()).unwrap(),
        put.digest
    );
    assert!(store.stat_manifest(&a, &tag("latest")).is_err());
    let (_, gone) = store.delete_manifest(&a, &sig.digest).unwrap();
    assert!(gone.is_empty());
    assert!(store.referrers(&a, &put.digest, None).unwrap().is_empty());

    // Upload sessions: offsets, order, cancel.
    let id = store.start_upload(&a).unwrap().to_string();
    let mut w = store.upload_writer(&a, &id, Some(0)).unwrap();
    w.write(b"abc").unwrap();
    assert_eq!(store.end_chunk(w).unwrap(), 3);
    assert_eq!(store.upload_offset(&a, &id).unwrap(), 3);
    assert!(matches!(
        store.upload_writer(&a, &id, Some(1)),
        Err(StoreError::UploadOffset { .. })
    ));
    assert!(matches!(
        store.upload_offset(&b, &id),
        Err(StoreError::UploadUnknown(_))
    ));
    store.cancel_upload(&a, &id).unwrap();
    assert!(matches!(
        store.upload_offset(&a, &id),
        Err(StoreError::UploadUnknown(_))
    ));

    // Retention and GC: the newest tags stay, the rest go with what only they
    // referenced; a referenced blob stays.
    let c = repo(&format!("suite{ns}/c"));
    let cfg_c = push_blob(store, &c, format!("cfg c {ns}").as_bytes());
    let mut digests = Vec::new();
    for i in 0..3 {
        let l = push_blob(store, &c, format!("layer c{i} {ns}").as_bytes());
        let m = manifest(&cfg_c, &l, None);
        let p = store
            .put_manifest(&c, &tag(&format!("t{i}")), &m, Some(media::OCI_MANIFEST))
            .unwrap();
        digests.push((l, p.digest));
        std::thread::sleep(Duration::from_millis(2)); // distinct push times
    }
    let orphan = push_blob(store, &b, format!("orphan {ns}").as_bytes());
    let report = store
        .gc(&GcOptions {
            grace: Duration::ZERO,
            retention: vec![RetentionRule {
                repository: c.to_string(),
                keep_last: 1,
                order: crate::RetentionOrder::Pushed,
                keep_tags: None,
            }],
            ..GcOptions::default()
        })
        .unwrap();
    let mut removed: Vec<&str> = report
        .tags
        .iter()
        .filter(|t| t.0 == c.as_str())
        .map(|t| t.1.as_str())
        .collect();
    removed.sort_unstable();
    assert_eq!(removed, ["t0", "t1"]);
    assert_eq!(store.list_tags(&c, None, None).unwrap(), ["t2"]);
    let freed: Vec<&Digest> = report.blobs.iter().map(|b| &b.0).collect();
    assert!(freed.contains(&&digests[0].0) && freed.contains(&&digests[1].0));
    assert!(freed.contains(&&orphan));
    assert!(!freed.contains(&&digests[2].0) && !freed.contains(&&cfg_c));
    assert!(!freed.contains(&&layer) && !freed.contains(&&config));
    assert!(store.stat_blob(&c, &digests[2].0).is_ok());
    assert!(matches!(
        store.stat_blob(&c, &digests[0].0),
        Err(StoreError::BlobUnknown(_))
    ));
    assert!(store.open_blob(&digests[0].0).is_err());
    assert!(store.get_manifest(&a, &tag("v1")).is_ok());
}
