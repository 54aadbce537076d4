//! Slipway's embedded image store: content-addressed blobs plus a transactional
//! metadata database.
//!
//! Entry point: [`Store::open`]. The store implements OCI semantics (repositories,
//! tags, manifests and what they reference, repository→blob links, referrers, upload
//! sessions, garbage collection) over two seams:
//! - a [`BlobBackend`] for content: [`blobs::FsBlobs`], the content-addressed file
//!   tree written only by atomic rename (default), or object storage;
//! - a [`Metadata`] for every index, so listing, referrers and GC never walk the
//!   blobs: [`RedbMetadata`], an embedded [redb](https://docs.rs/redb) file
//!   (default), or a database several replicas share.
//!
//! Every method is blocking; async callers use `spawn_blocking`.
//!
//! **Architecture invariant:** this crate knows the OCI specs, not deployments, and
//! speaks no HTTP.

pub mod blobs;
mod error;
mod gc;
pub mod manifest;
mod meta;
pub mod metadata;
mod redb_meta;
pub mod suite;
mod uploads;

pub use blobs::{BlobBackend, BlobRead};
pub use error::{Result, StoreError};
pub use gc::{GcOptions, GcReport, RetentionOrder, RetentionRule};
pub use manifest::{ManifestError, ParsedManifest};
pub use meta::{ManifestMeta, PutManifest, ReferrerDescriptor};
pub use metadata::Metadata;
pub use redb_meta::RedbMetadata;
pub use uploads::UploadWriter;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use slipway_core::{Digest, RepoName};

use crate::blobs::FsBlobs;

/// The embedded image store. Cheap to share behind an `Arc`.
pub struct Store {
    root: PathBuf,
    /// Upload sessions' staging files (always local).
    staging: FsBlobs,
    /// Committed blobs.
    blobs: Arc<dyn BlobBackend>,
    /// Every index.
    meta: Arc<dyn Metadata>,
    /// Held for reading while a blob is renamed into place and recorded, and for
    /// writing while GC deletes files, so GC never unlinks a blob an upload just
    /// committed.
    blob_lock: RwLock<()>,
    uploads: Arc<Mutex<HashMap<uuid::Uuid, uploads::Live>>>,
    /// Blobs a client recently asked about (HEAD before a manifest push): GC spares
    /// them for the grace period even when nothing references them yet.
    touched: Mutex<HashMap<Digest, u64>>,
    manifest_cache: Mutex<ManifestCache>,
    stored_bytes: AtomicU64,
    /// Which tags may not be moved or deleted.
    immutable: RwLock<Vec<ImmutableRule>>,
}

/// Tags that may be pushed once and never moved or deleted: those of repositories
/// matching `repository` whose names match `tags` (globs: `*` any run, `?` one
/// character).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImmutableRule {
    /// Repository glob, e.g. `prod/*`.
    pub repository: String,
    /// Tag glob; default `*`.
    #[serde(default = "any_tag")]
    pub tags: String,
}

fn any_tag() -> String {
    "*".into()
}

#[derive(Default)]
struct ManifestCache {
    map: HashMap<Digest, Bytes>,
    bytes: usize,
}

/// Manifests are immutable by digest, so caching their bytes is always safe.
const MANIFEST_CACHE_BYTES: usize = 64 << 20;

// === impl Store ===

impl Store {
    /// Opens (or creates) a store in `root`, its blobs there too.
    pub fn open(root: &Path) -> Result<Self> {
        let fs = FsBlobs::open(root)?;
        Self::open_with(root, Arc::new(fs))
    }

    /// Opens (or creates) a store in `root` whose committed blobs live in
    /// `blobs`.
    pub fn open_with(root: &Path, blobs: Arc<dyn BlobBackend>) -> Result<Self> {
        let meta = RedbMetadata::open(&root.join("meta.redb"))?;
        Self::open_parts(root, blobs, Arc::new(meta))
    }

    /// Opens a store whose committed blobs live in `blobs` and whose indexes in
    /// `meta`; `root` holds what stays local (staging files).
    pub fn open_parts(
        root: &Path,
        blobs: Arc<dyn BlobBackend>,
        meta: Arc<dyn Metadata>,
    ) -> Result<Self> {
        let staging = FsBlobs::open(root)?;
        let store = Self {
            root: root.to_owned(),
            staging,
            blobs,
            meta,
            blob_lock: RwLock::new(()),
            uploads: Arc::default(),
            touched: Mutex::default(),
            manifest_cache: Mutex::default(),
            stored_bytes: AtomicU64::new(0),
            immutable: RwLock::default(),
        };
        store
            .stored_bytes
            .store(store.meta.total_blob_bytes()?, Ordering::Relaxed);
        Ok(store)
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Total size of all committed blobs (including manifests).
    pub fn stored_bytes(&self) -> u64 {
        self.stored_bytes.load(Ordering::Relaxed)
    }

    /// Opens a committed blob for reading. Callers check the repository link first
    /// (`stat_blob`); this only reads content by digest. Blocking.
    pub fn open_blob(&self, digest: &Digest) -> Result<BlobRead> {
        self.blobs.open_blob(digest)
    }

    /// Where a client may fetch a committed blob directly, if the backend
    /// redirects (callers check the repository link first). Blocking.
    pub fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>> {
        self.blobs.redirect_url(digest)
    }

    /// Makes the tags `rules` match immutable (replacing earlier rules).
    pub fn set_immutable(&self, rules: Vec<ImmutableRule>) {
        *self
            .immutable
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = rules;
    }

    /// The rule that makes `repo:tag` immutable, if any.
    pub(crate) fn immutable_rule(&self, repo: &RepoName, tag: &str) -> Option<String> {
        self.immutable
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|r| {
                slipway_core::glob::matches(&r.repository, repo.as_str())
                    && slipway_core::glob::matches(&r.tags, tag)
            })
            .map(|r| r.repository.clone())
    }

    /// Refuses a change to `repo:tag` if a rule makes it immutable.
    pub(crate) fn check_mutable(&self, repo: &RepoName, tag: &str) -> Result<()> {
        match self.immutable_rule(repo, tag) {
            Some(rule) => Err(StoreError::TagImmutable {
                repo: repo.clone(),
                tag: tag.to_owned(),
                rule,
            }),
            None => Ok(()),
        }
    }

    fn cached_manifest(&self, digest: &Digest) -> Option<Bytes> {
        lock(&self.manifest_cache).map.get(digest).cloned()
    }

    fn cache_manifest(&self, digest: &Digest, bytes: Bytes) {
        let mut c = lock(&self.manifest_cache);
        if c.bytes + bytes.len() > MANIFEST_CACHE_BYTES {
            c.map.clear();
            c.bytes = 0;
        }
        c.bytes += bytes.len();
        c.map.insert(digest.clone(), bytes);
    }

    fn touch(&self, digest: &Digest) {
        lock(&self.touched).insert(digest.clone(), now_ms());
    }
}

pub(crate) use slipway_core::now_ms;

/// Locks a mutex, recovering from poisoning: every critical section here leaves the
/// data consistent, so a panic elsewhere must not wedge the registry.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
