//! The [`Metadata`] seam: every index of the store (repositories, blobs,
//! repository links, manifests, tags, referrers, upload sessions) behind one
//! trait, so one machine keeps them in redb ([`crate::RedbMetadata`]) and
//! several replicas share them in PostgreSQL (`slipway-postgres`).
//!
//! The trait speaks in whole registry operations, each one transaction, not in
//! tables: what must be atomic (a manifest with its tag, time and referrer entry;
//! a GC's mark and sweep) is atomic in every implementation. The store keeps the
//! logic that is the same everywhere (parsing, digests, immutability rules, what
//! GC removes); implementations keep rows.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use slipway_core::{Digest, RepoName, Tag};

use crate::error::{Result, StoreError};
use crate::manifest::ParsedManifest;
use crate::meta::ReferrerDescriptor;

/// What the database keeps about one manifest in one repository.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestRecord {
    /// Size of its bytes.
    pub size: u64,
    /// When it was first stored in this repository (ms since the epoch).
    pub created_ms: u64,
    /// What it references.
    #[serde(flatten)]
    pub parsed: ParsedManifest,
}

/// A manifest to record, with everything that goes in its transaction.
#[derive(Debug)]
pub struct NewManifest<'a> {
    /// The repository.
    pub repo: &'a RepoName,
    /// The digest of its bytes (already written to the blob backend).
    pub digest: &'a Digest,
    /// The record.
    pub record: &'a ManifestRecord,
    /// The tag it is pushed under, if any.
    pub tag: Option<&'a Tag>,
    /// Its entry in its subject's referrers, if it has a subject.
    pub referrer: Option<ReferrerDescriptor>,
    /// Whether every blob and child manifest must already be in `repo`
    /// (false for a pull-through mirror, which fetches them when asked).
    pub check_refs: bool,
    /// Now (ms).
    pub now: u64,
}

/// Called inside a transaction before a tag is moved or deleted; an error
/// (an immutable tag) aborts the transaction.
pub type TagCheck<'a> = &'a dyn Fn(&str) -> Result<()>;

/// Everything GC decides from, read in its transaction.
#[derive(Debug, Default)]
pub struct GcSnapshot {
    /// `(repo, digest)` → record.
    pub manifests: HashMap<(String, String), ManifestRecord>,
    /// Every tag.
    pub tags: Vec<TagRow>,
    /// Every blob: `(digest, size, created ms)`.
    pub blobs: Vec<(String, u64, u64)>,
    /// Every repository link: `(repo, digest, ms)`, the time it was made or
    /// (shared metadata) a client last looked the blob up through it.
    pub links: Vec<(String, String, u64)>,
    /// Every repository: `(name, created ms)`.
    pub repos: Vec<(String, u64)>,
}

/// One tag, as GC sees it.
#[derive(Debug, Clone)]
pub struct TagRow {
    /// The repository.
    pub repo: String,
    /// The tag.
    pub tag: String,
    /// The manifest it points at.
    pub digest: String,
    /// When it last moved (ms), if recorded.
    pub pushed_ms: Option<u64>,
}

/// What a GC run removes, applied in the transaction that read its snapshot.
#[derive(Debug, Default, Clone)]
pub struct GcChanges {
    /// Tags: `(repo, tag)`.
    pub tags: Vec<(String, String)>,
    /// Manifests: `(repo, digest, subject)`; their referrer entries go too.
    pub manifests: Vec<(String, String, Option<String>)>,
    /// Blobs by digest.
    pub blobs: Vec<String>,
    /// Repository links: `(repo, digest)`.
    pub links: Vec<(String, String)>,
    /// Repositories.
    pub repos: Vec<String>,
}

/// Decides a GC from its snapshot (called inside the transaction).
pub type GcPlanner<'a> = &'a mut dyn FnMut(&GcSnapshot) -> Result<GcChanges>;

/// Held while blobs are written and recorded (shared) or deleted by GC
/// (exclusive), across every replica sharing the metadata.
pub trait Fence: Send {}

impl Fence for () {}

/// The store's indexes. Every method is blocking and is one transaction.
pub trait Metadata: Send + Sync + std::fmt::Debug {
    /// Whether several replicas share this metadata: upload sessions then keep
    /// their bytes and hash state in shared storage, not in one replica.
    fn shared(&self) -> bool {
        false
    }
    /// Sum of every committed blob's size.
    fn total_blob_bytes(&self) -> Result<u64>;
    /// The size of a blob if it is linked into `repo`.
    fn linked_blob(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>>;
    /// Links a blob of `from` into `to`; false when `from` does not have it.
    fn mount(&self, from: &RepoName, to: &RepoName, digest: &Digest, now: u64) -> Result<bool>;
    /// Records that a client looked up a linked blob (it is about to reference
    /// it), so GC on any replica spares it for the grace period. Metadata one
    /// process owns may skip this: the store remembers look-ups itself.
    fn touch(&self, repo: &RepoName, digest: &Digest, now: u64) -> Result<()> {
        let _ = (repo, digest, now);
        Ok(())
    }
    /// Unlinks a blob from `repo`; false when it was not linked.
    fn unlink(&self, repo: &RepoName, digest: &Digest) -> Result<bool>;
    /// Records a committed blob and links it into `repo`. Returns the bytes
    /// added to the store (0 when the blob was known already).
    fn record_blob(&self, repo: &RepoName, digest: &Digest, size: u64, now: u64) -> Result<u64>;
    /// Records a manifest, its tag (checking `check` before moving one), its
    /// tag's push time and its referrer entry. Returns the bytes added.
    fn put_manifest(&self, m: &NewManifest<'_>, check: TagCheck<'_>) -> Result<u64>;
    /// The digest a tag points at.
    fn tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;
    /// A manifest's record in `repo`.
    fn manifest(&self, repo: &RepoName, digest: &Digest) -> Result<Option<ManifestRecord>>;
    /// Removes a manifest, every tag pointing at it (each checked with `check`
    /// first) and its referrer entry. Returns its record and the removed tags.
    fn delete_manifest(
        &self,
        repo: &RepoName,
        digest: &Digest,
        check: TagCheck<'_>,
    ) -> Result<Option<(ManifestRecord, Vec<String>)>>;
    /// Removes a tag; returns what it pointed at.
    fn delete_tag(&self, repo: &RepoName, tag: &Tag) -> Result<Option<Digest>>;
    /// Tags of `repo` in lexical order after `last`, at most `n`; `None` when
    /// the repository is unknown.
    fn tags(
        &self,
        repo: &RepoName,
        last: Option<&str>,
        n: Option<usize>,
    ) -> Result<Option<Vec<String>>>;
    /// Repository names in lexical order after `last`, at most `n`.
    fn repos(&self, last: Option<&str>, n: Option<usize>) -> Result<Vec<String>>;
    /// Referrers of `subject` in `repo`, in digest order.
    fn referrers(&self, repo: &RepoName, subject: &Digest) -> Result<Vec<ReferrerDescriptor>>;

    /// Creates an upload session's record.
    fn insert_upload(&self, id: &str, record: &[u8]) -> Result<()>;
    /// An upload session's record.
    fn upload(&self, id: &str) -> Result<Option<Vec<u8>>>;
    /// Replaces an upload session's record if it is still `expected`; false
    /// when another request changed (or removed) it first.
    fn swap_upload(&self, id: &str, expected: &[u8], new: &[u8]) -> Result<bool>;
    /// Removes an upload session's record.
    fn remove_upload(&self, id: &str) -> Result<()>;
    /// Every upload session's record.
    fn uploads(&self) -> Result<Vec<(String, Vec<u8>)>>;

    /// Runs one GC: reads a snapshot, asks `plan` what goes, and (unless
    /// `dry_run`) removes it, all in one transaction that concurrent writers
    /// cannot interleave with.
    fn gc(&self, plan: GcPlanner<'_>, dry_run: bool) -> Result<GcChanges>;
    /// Held while a blob is written to the backend and recorded (`exclusive`
    /// false), or while GC deletes blobs (`exclusive` true): every replica
    /// sharing this metadata waits on the same fence. A single-process
    /// implementation may return `()`: the store's own lock covers it.
    fn fence(&self, exclusive: bool) -> Result<Box<dyn Fence>>;
}

/// Encodes a record as JSON.
pub fn to_json<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| StoreError::Db(format!("encode record: {e}")))
}

/// Decodes a JSON record.
pub fn from_json<T: for<'a> Deserialize<'a>>(b: &[u8]) -> Result<T> {
    serde_json::from_slice(b).map_err(|e| StoreError::Db(format!("decode record: {e}")))
}

/// Parses a digest read from the database.
pub fn parse_digest(s: &str) -> Result<Digest> {
    s.parse()
        .map_err(|e| StoreError::Db(format!("bad digest in database: {e}")))
}

/// Every blob and child manifest `parsed` references must be linked into the
/// repository: `linked(digest, is_manifest)` says whether one is.
pub fn check_references(
    parsed: &ParsedManifest,
    mut linked: impl FnMut(&Digest, bool) -> Result<bool>,
) -> Result<()> {
    for b in &parsed.blobs {
        if !linked(b, false)? {
            return Err(StoreError::ManifestBlobUnknown(b.clone()));
        }
    }
    for m in &parsed.manifests {
        if !linked(m, true)? {
            return Err(StoreError::ManifestBlobUnknown(m.clone()));
        }
    }
    Ok(())
}
