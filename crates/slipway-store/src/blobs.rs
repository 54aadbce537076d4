//! The content-addressed blob tree on the local filesystem.
//!
//! Layout under the data directory:
//! - `blobs/<alg>/<first two hex>/<hex>`: committed content, immutable;
//! - `uploads/<uuid>`: staging files of upload sessions.
//!
//! A blob becomes visible only by an atomic rename of a fully written and fsync'd
//! staging file whose digest was verified, so a crash never exposes a partial blob.
//! Paths are built only from a validated [`Digest`] or a UUID the store generated.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use slipway_core::Digest;

use crate::error::{Result, StoreError};

/// The blob tree rooted at a data directory.
#[derive(Debug, Clone)]
pub struct FsBlobs {
    blobs: PathBuf,
    uploads: PathBuf,
}

// === impl FsBlobs ===

impl FsBlobs {
    /// Creates the directories under `root` if needed.
    pub fn open(root: &Path) -> Result<Self> {
        let blobs = root.join("blobs");
        let uploads = root.join("uploads");
        for d in [&blobs, &uploads] {
            fs::create_dir_all(d)
                .map_err(|e| StoreError::io(format!("create {}", d.display()), e))?;
        }
        Ok(Self { blobs, uploads })
    }

    /// Where the committed blob lives (it may not exist).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        let hex = digest.hex();
        self.blobs
            .join(digest.algorithm().as_str())
            .join(&hex[..2])
            .join(hex)
    }

    /// Where an upload session stages its bytes. `id` must be a store-generated UUID.
    pub fn staging_path(&self, id: &uuid::Uuid) -> PathBuf {
        self.uploads.join(id.to_string())
    }

    /// The staging directory (for purging orphans).
    pub fn uploads_dir(&self) -> &Path {
        &self.uploads
    }

    /// fsyncs `staged` and renames it to the blob's place, then fsyncs the directory.
    /// If the blob already exists the staged copy is dropped instead.
    pub fn commit(&self, staged: &Path, digest: &Digest) -> Result<()> {
        let dest = self.path(digest);
        if dest.exists() {
            let _ = fs::remove_file(staged);
            return Ok(());
        }
        File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("fsync staged blob", e))?;
        let dir = dest.parent().unwrap_or(&self.blobs);
        fs::create_dir_all(dir).map_err(|e| StoreError::io("create blob directory", e))?;
        fs::rename(staged, &dest).map_err(|e| StoreError::io("move blob into place", e))?;
        sync_dir(dir)
    }

    /// Writes `data` as the blob `digest` (used for manifests, which arrive whole).
    pub fn write_whole(&self, digest: &Digest, data: &[u8]) -> Result<()> {
        if self.path(digest).exists() {
            return Ok(());
        }
        let staged = self.staging_path(&uuid::Uuid::new_v4());
        let res = File::create(&staged)
            .and_then(|mut f| f.write_all(data))
            .map_err(|e| StoreError::io("write manifest", e))
            .and_then(|()| self.commit(&staged, digest));
        if res.is_err() {
            let _ = fs::remove_file(&staged);
        }
        res
    }

    /// Reads a whole blob into memory (manifests only; they are size-limited).
    pub fn read_whole(&self, digest: &Digest) -> Result<Vec<u8>> {
        fs::read(self.path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobUnknown(digest.clone()),
            _ => StoreError::io(format!("read blob {digest}"), e),
        })
    }

    /// Removes a committed blob; a missing file is not an error.
    pub fn remove(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io(format!("remove blob {digest}"), e))
            }
            _ => Ok(()),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))
}
