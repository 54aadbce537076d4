//! The metadata database: tables, keys and the manifest/tag/blob-link operations.
//!
//! Keys join parts with `\0`, which no validated name, tag or digest contains and
//! which sorts before every character they may contain, so `"<repo>\0"..="<repo>\x01"`
//! is exactly one repository's range and tags come out in lexical order.

use std::path::Path;

use bytes::Bytes;
use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use slipway_core::{Digest, Reference, RepoName, Tag};

use crate::error::{Result, StoreError, db};
use crate::manifest::{self, ParsedManifest};
use crate::{Store, lock, now_ms};

/// repo -> created (ms)
pub(crate) const REPOS: TableDefinition<&str, u64> = TableDefinition::new("repos");
/// digest -> (size, created ms): every committed blob, manifests included.
pub(crate) const BLOBS: TableDefinition<&str, (u64, u64)> = TableDefinition::new("blobs");
/// repo\0digest -> linked (ms)
pub(crate) const REPO_BLOBS: TableDefinition<&str, u64> = TableDefinition::new("repo_blobs");
/// repo\0digest -> JSON [`ManifestRecord`]
pub(crate) const MANIFESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("manifests");
/// repo\0tag -> digest
pub(crate) const TAGS: TableDefinition<&str, &str> = TableDefinition::new("tags");
/// `repo\0tag` → when the tag last pointed at a new manifest (ms), for retention.
pub(crate) const TAG_TIMES: TableDefinition<&str, u64> = TableDefinition::new("tag_times");
/// repo\0subject\0referrer -> JSON [`ReferrerDescriptor`]
pub(crate) const REFERRERS: TableDefinition<&str, &[u8]> = TableDefinition::new("referrers");
/// upload uuid -> JSON upload record
pub(crate) const UPLOADS: TableDefinition<&str, &[u8]> = TableDefinition::new("uploads");

/// What the database keeps about one manifest in one repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ManifestRecord {
    pub size: u64,
    pub created_ms: u64,
    #[serde(flatten)]
    pub parsed: ParsedManifest,
}

/// A manifest's identity, type and size, as served on GET/HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestMeta {
    /// The digest of the stored bytes.
    pub digest: Digest,
    /// The media type it was pushed with.
    pub media_type: String,
    /// Size in bytes.
    pub size: u64,
}

/// The outcome of a manifest push.
#[derive(Debug, Clone)]
pub struct PutManifest {
    /// Digest of the exact bytes received.
    pub digest: Digest,
    /// The manifest's media type.
    pub media_type: String,
    /// The `subject` it refers to, for the `OCI-Subject` header.
    pub subject: Option<Digest>,
    /// The tag it was pushed under, if any.
    pub tag: Option<Tag>,
}

/// One entry of a referrers index.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ReferrerDescriptor {
    /// The referrer manifest's media type.
    pub media_type: String,
    /// The referrer manifest's digest.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its artifact type.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Its annotations.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

pub(crate) fn key(a: &str, b: &str) -> String {
    format!("{a}\0{b}")
}

pub(crate) fn prefix_range(prefix: &str) -> (String, String) {
    (format!("{prefix}\0"), format!("{prefix}\x01"))
}

pub(crate) fn open_db(path: &Path) -> Result<redb::Database> {
    let database = redb::Database::create(path).map_err(db)?;
    let txn = database.begin_write().map_err(db)?;
    {
        txn.open_table(REPOS).map_err(db)?;
        txn.open_table(BLOBS).map_err(db)?;
        txn.open_table(REPO_BLOBS).map_err(db)?;
        txn.open_table(MANIFESTS).map_err(db)?;
        txn.open_table(TAGS).map_err(db)?;
        txn.open_table(REFERRERS).map_err(db)?;
        txn.open_table(UPLOADS).map_err(db)?;
    }
    txn.commit().map_err(db)?;
    Ok(database)
}

/// Records `repo` in the repositories table if it is new.
fn ensure_repo(txn: &redb::WriteTransaction, repo: &RepoName, now: u64) -> Result<()> {
    let mut repos = txn.open_table(REPOS).map_err(db)?;
    if repos.get(repo.as_str()).map_err(db)?.is_none() {
        repos.insert(repo.as_str(), now).map_err(db)?;
    }
    Ok(())
}

/// Every blob a manifest needs must be linked into `repo`, and every child manifest
/// must be in it.
fn check_references(
    repo: &RepoName,
    parsed: &ParsedManifest,
    links: &impl ReadableTable<&'static str, u64>,
    manifests: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<()> {
    for b in &parsed.blobs {
        if links
            .get(key(repo.as_str(), &b.to_string()).as_str())
            .map_err(db)?
            .is_none()
        {
            return Err(StoreError::ManifestBlobUnknown(b.clone()));
        }
    }
    for m in &parsed.manifests {
        if manifests
            .get(key(repo.as_str(), &m.to_string()).as_str())
            .map_err(db)?
            .is_none()
        {
            return Err(StoreError::ManifestBlobUnknown(m.clone()));
        }
    }
    Ok(())
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db(format!("encode record: {e}")))
}

pub(crate) fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Db(format!("decode record: {e}")))
}

/// Returns a page of sorted keys after `last`, at most `n`.
fn page<'a>(
    items: impl Iterator<Item = Result<String>> + 'a,
    last: Option<&str>,
    n: Option<usize>,
) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for item in items {
        let item = item?;
        if last.is_some_and(|l| item.as_str() <= l) {
            continue;
        }
        if n.is_some_and(|n| out.len() >= n) {
            break;
        }
        out.push(item);
    }
    Ok(out)
}

// === impl Store: metadata ===

impl Store {
    pub(crate) fn sum_blob_sizes(&self) -> Result<u64> {
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(BLOBS).map_err(db)?;
        let mut sum = 0u64;
        for row in t.iter().map_err(db)? {
            let (_, v) = row.map_err(db)?;
            sum = sum.saturating_add(v.value().0);
        }
        Ok(sum)
    }

    /// Size of a blob linked into `repo`. Records the look-up so GC spares the blob
    /// for its grace period (a client that finds a blob will reference it next).
    pub fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let r = self.db.begin_read().map_err(db)?;
        let links = r.open_table(REPO_BLOBS).map_err(db)?;
        if links
            .get(key(repo.as_str(), &digest.to_string()).as_str())
            .map_err(db)?
            .is_none()
        {
            return Err(StoreError::BlobUnknown(digest.clone()));
        }
        let blobs = r.open_table(BLOBS).map_err(db)?;
        let size = blobs
            .get(digest.to_string().as_str())
            .map_err(db)?
            .map(|v| v.value().0)
            .ok_or_else(|| StoreError::BlobUnknown(digest.clone()))?;
        self.touch(digest);
        Ok(size)
    }

    /// Links an existing blob of `from` into `to`. Returns false when `from` does
    /// not have it (the caller then opens a regular upload).
    pub fn mount_blob(&self, from: &RepoName, to: &RepoName, digest: &Digest) -> Result<bool> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            if links
                .get(key(from.as_str(), &d).as_str())
                .map_err(db)?
                .is_none()
            {
                return Ok(false);
            }
            links
                .insert(key(to.as_str(), &d).as_str(), now_ms())
                .map_err(db)?;
            ensure_repo(&txn, to, now_ms())?;
        }
        txn.commit().map_err(db)?;
        self.touch(digest);
        Ok(true)
    }

    /// Unlinks a blob from a repository. The content stays until GC finds nothing
    /// else references it.
    pub fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        let txn = self.db.begin_write().map_err(db)?;
        {
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            if links
                .remove(key(repo.as_str(), &digest.to_string()).as_str())
                .map_err(db)?
                .is_none()
            {
                return Err(StoreError::BlobUnknown(digest.clone()));
            }
        }
        txn.commit().map_err(db)
    }

    /// Records a committed blob and links it into `repo`, in one transaction.
    pub(crate) fn record_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let d = digest.to_string();
        let now = now_ms();
        let txn = self.db.begin_write().map_err(db)?;
        let mut added = 0;
        {
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            if blobs.get(d.as_str()).map_err(db)?.is_none() {
                blobs.insert(d.as_str(), (size, now)).map_err(db)?;
                added = size;
            }
            let mut links = txn.open_table(REPO_BLOBS).map_err(db)?;
            links
                .insert(key(repo.as_str(), &d).as_str(), now)
                .map_err(db)?;
            ensure_repo(&txn, repo, now)?;
        }
        txn.commit().map_err(db)?;
        self.stored_bytes
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        self.touch(digest);
        Ok(())
    }

    /// Stores a manifest: validates it, writes the exact bytes, and records it, its
    /// tag and its referrer entry in one transaction. Every blob (or child manifest)
    /// it references must already be in `repo`.
    pub fn put_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<PutManifest> {
        self.store_manifest(repo, reference, body, content_type, true)
    }

    /// Stores a manifest fetched from the upstream of a pull-through mirror: its
    /// blobs and children are fetched when asked for, so they need not be here
    /// yet. Everything else is as [`Store::put_manifest`].
    pub fn put_mirrored_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: &[u8],
        content_type: Option<&str>,
    ) -> Result<PutManifest> {
        self.store_manifest(repo, reference, body, content_type, false)
    }

    fn store_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
        body: &[u8],
        content_type: Option<&str>,
        check_refs: bool,
    ) -> Result<PutManifest> {
        let parsed = manifest::parse(body, content_type)?;
        let digest = match reference {
            Reference::Digest(expected) => {
                let mut h = slipway_core::Hasher::new(expected.algorithm());
                h.update(body);
                let computed = h.finish();
                if &computed != expected {
                    return Err(StoreError::ManifestDigestMismatch {
                        expected: expected.clone(),
                        computed,
                    });
                }
                computed
            }
            Reference::Tag(_) => Digest::sha256_of(body),
        };
        let d = digest.to_string();
        let size = body.len() as u64;
        let now = now_ms();

        // Check references before writing anything, so a refused push leaves no file.
        if check_refs {
            let r = self.db.begin_read().map_err(db)?;
            let links = r.open_table(REPO_BLOBS).map_err(db)?;
            let manifests = r.open_table(MANIFESTS).map_err(db)?;
            check_references(repo, &parsed, &links, &manifests)?;
        }

        let _guard = self
            .blob_lock
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.blobs.write_whole(&digest, body)?;
        let record = ManifestRecord {
            size,
            created_ms: now,
            parsed,
        };
        let txn = self.db.begin_write().map_err(db)?;
        let mut added = 0;
        {
            // Re-check inside the write transaction: GC may have run since the read.
            let links = txn.open_table(REPO_BLOBS).map_err(db)?;
            let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
            if check_refs {
                check_references(repo, &record.parsed, &links, &manifests)?;
            }
            drop(links);
            manifests
                .insert(key(repo.as_str(), &d).as_str(), json(&record)?.as_slice())
                .map_err(db)?;
            let mut blobs = txn.open_table(BLOBS).map_err(db)?;
            if blobs.get(d.as_str()).map_err(db)?.is_none() {
                blobs.insert(d.as_str(), (size, now)).map_err(db)?;
                added = size;
            }
            if let Reference::Tag(tag) = reference {
                let mut tags = txn.open_table(TAGS).map_err(db)?;
                let k = key(repo.as_str(), tag.as_str());
                // An immutable tag may be pushed again only with the same manifest.
                let moved = tags
                    .get(k.as_str())
                    .map_err(db)?
                    .is_some_and(|v| v.value() != d);
                if moved {
                    self.check_mutable(repo, tag.as_str())?;
                }
                let fresh = moved || tags.get(k.as_str()).map_err(db)?.is_none();
                tags.insert(k.as_str(), d.as_str()).map_err(db)?;
                if fresh {
                    let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
                    times.insert(k.as_str(), now).map_err(db)?;
                }
            }
            if let Some(subject) = &record.parsed.subject {
                let desc = ReferrerDescriptor {
                    media_type: record.parsed.media_type.clone(),
                    digest: digest.clone(),
                    size,
                    artifact_type: record.parsed.artifact_type.clone(),
                    annotations: record.parsed.annotations.clone(),
                };
                let mut refs = txn.open_table(REFERRERS).map_err(db)?;
                refs.insert(
                    format!("{repo}\0{subject}\0{d}").as_str(),
                    json(&desc)?.as_slice(),
                )
                .map_err(db)?;
            }
            ensure_repo(&txn, repo, now)?;
        }
        txn.commit().map_err(db)?;
        self.stored_bytes
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        Ok(PutManifest {
            digest,
            media_type: record.parsed.media_type,
            subject: record.parsed.subject,
            tag: match reference {
                Reference::Tag(t) => Some(t.clone()),
                Reference::Digest(_) => None,
            },
        })
    }

    /// Resolves a tag or digest in `repo` to the manifest's metadata.
    pub fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta> {
        let r = self.db.begin_read().map_err(db)?;
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => {
                let tags = r.open_table(TAGS).map_err(db)?;
                let Some(d) = tags
                    .get(key(repo.as_str(), t.as_str()).as_str())
                    .map_err(db)?
                else {
                    return Err(StoreError::ManifestUnknown(reference.to_string()));
                };
                d.value()
                    .parse()
                    .map_err(|e| StoreError::Db(format!("bad digest in tags table: {e}")))?
            }
        };
        let manifests = r.open_table(MANIFESTS).map_err(db)?;
        let Some(rec) = manifests
            .get(key(repo.as_str(), &digest.to_string()).as_str())
            .map_err(db)?
        else {
            return Err(StoreError::ManifestUnknown(reference.to_string()));
        };
        let rec: ManifestRecord = from_json(rec.value())?;
        Ok(ManifestMeta {
            digest,
            media_type: rec.parsed.media_type,
            size: rec.size,
        })
    }

    /// Fetches a manifest's metadata and exact bytes.
    pub fn get_manifest(
        &self,
        repo: &RepoName,
        reference: &Reference,
    ) -> Result<(ManifestMeta, Bytes)> {
        let meta = self.stat_manifest(repo, reference)?;
        if let Some(b) = self.cached_manifest(&meta.digest) {
            return Ok((meta, b));
        }
        let bytes = Bytes::from(self.blobs.read_whole(&meta.digest)?);
        self.cache_manifest(&meta.digest, bytes.clone());
        Ok((meta, bytes))
    }

    /// Deletes a manifest by digest: the manifest, every tag pointing at it and its
    /// referrer entry. Returns the tags that went with it.
    pub fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
    ) -> Result<(ManifestMeta, Vec<Tag>)> {
        let d = digest.to_string();
        let txn = self.db.begin_write().map_err(db)?;
        let mut removed_tags = Vec::new();
        let meta;
        {
            let mut manifests = txn.open_table(MANIFESTS).map_err(db)?;
            let Some(rec) = manifests
                .remove(key(repo.as_str(), &d).as_str())
                .map_err(db)?
            else {
                return Err(StoreError::ManifestUnknown(d));
            };
            let rec: ManifestRecord = from_json(rec.value())?;
            meta = ManifestMeta {
                digest: digest.clone(),
                media_type: rec.parsed.media_type.clone(),
                size: rec.size,
            };
            let mut tags = txn.open_table(TAGS).map_err(db)?;
            let (lo, hi) = prefix_range(repo.as_str());
            let mut doomed = Vec::new();
            for row in tags.range(lo.as_str()..hi.as_str()).map_err(db)? {
                let (k, v) = row.map_err(db)?;
                if v.value() == d {
                    doomed.push(k.value().to_owned());
                }
            }
            for k in &doomed {
                if let Some((_, t)) = k.split_once('\0') {
                    self.check_mutable(repo, t)?;
                }
            }
            let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
            for k in doomed {
                tags.remove(k.as_str()).map_err(db)?;
                times.remove(k.as_str()).map_err(db)?;
                if let Some(Ok(t)) = k.split_once('\0').map(|(_, t)| t.parse()) {
                    removed_tags.push(t);
                }
            }
            if let Some(subject) = &rec.parsed.subject {
                let mut refs = txn.open_table(REFERRERS).map_err(db)?;
                refs.remove(format!("{repo}\0{subject}\0{d}").as_str())
                    .map_err(db)?;
            }
        }
        txn.commit().map_err(db)?;
        Ok((meta, removed_tags))
    }

    /// Deletes one tag; the manifest stays.
    pub fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Digest> {
        self.check_mutable(repo, tag.as_str())?;
        let txn = self.db.begin_write().map_err(db)?;
        let digest;
        {
            let mut tags = txn.open_table(TAGS).map_err(db)?;
            let Some(v) = tags
                .remove(key(repo.as_str(), tag.as_str()).as_str())
                .map_err(db)?
            else {
                return Err(StoreError::ManifestUnknown(tag.to_string()));
            };
            digest = v
                .value()
                .parse()
                .map_err(|e| StoreError::Db(format!("bad digest in tags table: {e}")))?;
            drop(v);
            let mut times = txn.open_table(TAG_TIMES).map_err(db)?;
            times
                .remove(key(repo.as_str(), tag.as_str()).as_str())
                .map_err(db)?;
        }
        txn.commit().map_err(db)?;
        Ok(digest)
    }

    /// Tags of `repo` in lexical order, after `last`, at most `n`.
    pub fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Vec<String>> {
        let r = self.db.begin_read().map_err(db)?;
        let repos = r.open_table(REPOS).map_err(db)?;
        if repos.get(repo.as_str()).map_err(db)?.is_none() {
            return Err(StoreError::RepoUnknown(repo.clone()));
        }
        let tags = r.open_table(TAGS).map_err(db)?;
        let (lo, hi) = prefix_range(repo.as_str());
        let start = match last {
            Some(l) => key(repo.as_str(), l),
            None => lo,
        };
        let iter = tags
            .range(start.as_str()..hi.as_str())
            .map_err(db)?
            .map(|row| {
                let (k, _) = row.map_err(db)?;
                Ok(k.value()
                    .split_once('\0')
                    .map(|(_, t)| t.to_owned())
                    .unwrap_or_default())
            });
        page(iter, last, n)
    }

    /// Repository names in lexical order, after `last`, at most `n`.
    pub fn list_repos(&self, last: Option<&str>, n: Option<usize>) -> Result<Vec<String>> {
        let r = self.db.begin_read().map_err(db)?;
        let repos = r.open_table(REPOS).map_err(db)?;
        let iter = match last {
            Some(l) => repos.range(l..).map_err(db)?,
            None => repos.range::<&str>(..).map_err(db)?,
        }
        .map(|row| Ok(row.map_err(db)?.0.value().to_owned()));
        page(iter, last, n)
    }

    /// Manifests in `repo` whose subject is `subject`, optionally filtered by
    /// artifact type, in digest order.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerDescriptor>> {
        let r = self.db.begin_read().map_err(db)?;
        let refs = r.open_table(REFERRERS).map_err(db)?;
        let (lo, hi) = prefix_range(&key(repo.as_str(), &subject.to_string()));
        let mut out = Vec::new();
        for row in refs.range(lo.as_str()..hi.as_str()).map_err(db)? {
            let (_, v) = row.map_err(db)?;
            let desc: ReferrerDescriptor = from_json(v.value())?;
            if artifact_type.is_none_or(|t| desc.artifact_type.as_deref() == Some(t)) {
                out.push(desc);
            }
        }
        Ok(out)
    }

    pub(crate) fn db(&self) -> &redb::Database {
        &self.db
    }

    pub(crate) fn forget_cached(&self, digest: &Digest) {
        let mut c = lock(&self.manifest_cache);
        if let Some(b) = c.map.remove(digest) {
            c.bytes -= b.len();
        }
    }
}
