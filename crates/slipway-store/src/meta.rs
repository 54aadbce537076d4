//! The manifest, tag and blob-link operations of the store, over its
//! [`Metadata`](crate::Metadata).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use slipway_core::{Digest, Reference, RepoName, Tag};

use crate::error::{Result, StoreError};
use crate::manifest;
use crate::metadata::{ManifestRecord, NewManifest, check_references};
use crate::{Store, lock, now_ms};

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

// === impl Store: metadata ===

impl Store {
    /// Size of a blob linked into `repo`. Records the look-up so GC spares the blob
    /// for its grace period (a client that finds a blob will reference it next).
    pub fn stat_blob(&self, repo: &RepoName, digest: &Digest) -> Result<u64> {
        let size = self
            .meta
            .linked_blob(repo, digest)?
            .ok_or_else(|| StoreError::BlobUnknown(digest.clone()))?;
        self.touch(digest);
        if self.meta.shared() {
            self.meta.touch(repo, digest, now_ms())?;
        }
        Ok(size)
    }

    /// Links an existing blob of `from` into `to`. Returns false when `from` does
    /// not have it (the caller then opens a regular upload).
    pub fn mount_blob(&self, from: &RepoName, to: &RepoName, digest: &Digest) -> Result<bool> {
        let mounted = self.meta.mount(from, to, digest, now_ms())?;
        if mounted {
            self.touch(digest);
        }
        Ok(mounted)
    }

    /// Unlinks a blob from a repository. The content stays until GC finds nothing
    /// else references it.
    pub fn delete_blob(&self, repo: &RepoName, digest: &Digest) -> Result<()> {
        if self.meta.unlink(repo, digest)? {
            Ok(())
        } else {
            Err(StoreError::BlobUnknown(digest.clone()))
        }
    }

    /// Records a committed blob and links it into `repo`, in one transaction.
    pub(crate) fn record_blob(&self, repo: &RepoName, digest: &Digest, size: u64) -> Result<()> {
        let added = self.meta.record_blob(repo, digest, size, now_ms())?;
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
        let now = now_ms();

        // Check references before writing anything, so a refused push leaves no
        // blob; the transaction checks again (GC may run in between).
        if check_refs {
            check_references(&parsed, |d, is_manifest| {
                Ok(if is_manifest {
                    self.meta.manifest(repo, d)?.is_some()
                } else {
                    self.meta.linked_blob(repo, d)?.is_some()
                })
            })?;
        }
        if let Reference::Tag(tag) = reference {
            // Fail early (the transaction checks again) when an immutable tag
            // would move, before writing anything.
            if self.meta.tag(repo, tag)?.is_some_and(|old| old != digest) {
                self.check_mutable(repo, tag.as_str())?;
            }
        }

        let record = ManifestRecord {
            size: body.len() as u64,
            created_ms: now,
            parsed,
        };
        let referrer = record.parsed.subject.as_ref().map(|_| ReferrerDescriptor {
            media_type: record.parsed.media_type.clone(),
            digest: digest.clone(),
            size: record.size,
            artifact_type: record.parsed.artifact_type.clone(),
            annotations: record.parsed.annotations.clone(),
        });
        let tag = match reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        let added = {
            let _guard = self
                .blob_lock
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _fence = self.meta.fence(false)?;
            self.blobs.write_whole(&digest, body)?;
            self.meta.put_manifest(
                &NewManifest {
                    repo,
                    digest: &digest,
                    record: &record,
                    tag,
                    referrer,
                    check_refs,
                    now,
                },
                &|t| self.check_mutable(repo, t),
            )?
        };
        self.stored_bytes
            .fetch_add(added, std::sync::atomic::Ordering::Relaxed);
        Ok(PutManifest {
            digest,
            media_type: record.parsed.media_type,
            subject: record.parsed.subject,
            tag: tag.cloned(),
        })
    }

    /// Resolves a tag or digest in `repo` to the manifest's metadata.
    pub fn stat_manifest(&self, repo: &RepoName, reference: &Reference) -> Result<ManifestMeta> {
        let unknown = || StoreError::ManifestUnknown(reference.to_string());
        let digest = match reference {
            Reference::Digest(d) => d.clone(),
            Reference::Tag(t) => self.meta.tag(repo, t)?.ok_or_else(unknown)?,
        };
        let rec = self.meta.manifest(repo, &digest)?.ok_or_else(unknown)?;
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
        let Some((rec, tags)) = self
            .meta
            .delete_manifest(repo, digest, &|t| self.check_mutable(repo, t))?
        else {
            return Err(StoreError::ManifestUnknown(digest.to_string()));
        };
        Ok((
            ManifestMeta {
                digest: digest.clone(),
                media_type: rec.parsed.media_type,
                size: rec.size,
            },
            tags.iter().filter_map(|t| t.parse().ok()).collect(),
        ))
    }

    /// Deletes one tag; the manifest stays.
    pub fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Digest> {
        self.check_mutable(repo, tag.as_str())?;
        self.meta
            .delete_tag(repo, tag)?
            .ok_or_else(|| StoreError::ManifestUnknown(tag.to_string()))
    }

    /// Tags of `repo` in lexical order, after `last`, at most `n`.
    pub fn list_tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Vec<String>> {
        self.meta
            .tags(repo, last, n)?
            .ok_or_else(|| StoreError::RepoUnknown(repo.clone()))
    }

    /// Repository names in lexical order, after `last`, at most `n`.
    pub fn list_repos(&self, last: Option<&str>, n: Option<usize>) -> Result<Vec<String>> {
        self.meta.repos(last, n)
    }

    /// Manifests in `repo` whose subject is `subject`, optionally filtered by
    /// artifact type, in digest order.
    pub fn referrers(
        &self,
        repo: &RepoName,
        subject: &Digest,
        artifact_type: Option<&str>,
    ) -> Result<Vec<ReferrerDescriptor>> {
        let mut all = self.meta.referrers(repo, subject)?;
        all.retain(|d| artifact_type.is_none_or(|t| d.artifact_type.as_deref() == Some(t)));
        Ok(all)
    }

    pub(crate) fn forget_cached(&self, digest: &Digest) {
        let mut c = lock(&self.manifest_cache);
        if let Some(b) = c.map.remove(digest) {
            c.bytes -= b.len();
        }
    }
}
