//! Where committed blobs live: the [`BlobBackend`] seam, and its implementation
//! on the local filesystem, [`FsBlobs`] (which also holds upload sessions'
//! staging files: staging is local whatever the backend).
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

/// A committed blob opened for reading.
pub enum BlobRead {
    /// A local file, which a plain connection can send by `sendfile`.
    File(File),
    /// Bytes from elsewhere (object storage), read in order.
    Stream(Box<dyn io::Read + Send>),
}

impl io::Read for BlobRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::File(f) => io::Read::read(f, buf),
            Self::Stream(r) => r.read(buf),
        }
    }
}

impl std::fmt::Debug for BlobRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(file) => f.debug_tuple("File").field(file).finish(),
            Self::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// Where committed, content-addressed blobs live. Every method is blocking.
///
/// A blob is written once, whole and verified, under its digest: committing a
/// digest that exists already keeps the existing copy, so concurrent commits of
/// the same content are harmless. Visibility to clients is the metadata's
/// business (a row written after `commit` returns), not the backend's.
pub trait BlobBackend: Send + Sync + std::fmt::Debug {
    /// Makes the verified staged file `staged` the blob `digest`, durably; the
    /// staged file is consumed.
    fn commit(&self, staged: &Path, digest: &Digest) -> Result<()>;
    /// Stores `data` as the blob `digest` (manifests, which arrive whole).
    fn write_whole(&self, digest: &Digest, data: &[u8]) -> Result<()>;
    /// Reads a whole blob (manifests only; they are size-limited).
    fn read_whole(&self, digest: &Digest) -> Result<Vec<u8>>;
    /// Opens a blob for reading from its start.
    fn open_blob(&self, digest: &Digest) -> Result<BlobRead>;
    /// Removes a blob; a missing one is not an error.
    fn remove(&self, digest: &Digest) -> Result<()>;
}

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
}

impl BlobBackend for FsBlobs {
    /// fsyncs `staged` and renames it to the blob's place, then fsyncs the directory.
    /// If the blob already exists the staged copy is dropped instead.
    fn commit(&self, staged: &Path, digest: &Digest) -> Result<()> {
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
    fn write_whole(&self, digest: &Digest, data: &[u8]) -> Result<()> {
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
    fn read_whole(&self, digest: &Digest) -> Result<Vec<u8>> {
        fs::read(self.path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::BlobUnknown(digest.clone()),
            _ => StoreError::io(format!("read blob {digest}"), e),
        })
    }

    /// Removes a committed blob; a missing file is not an error.
    fn remove(&self, digest: &Digest) -> Result<()> {
        match fs::remove_file(self.path(digest)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(StoreError::io(format!("remove blob {digest}"), e))
            }
            _ => Ok(()),
        }
    }

    fn open_blob(&self, digest: &Digest) -> Result<BlobRead> {
        File::open(self.path(digest))
            .map(BlobRead::File)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::BlobUnknown(digest.clone()),
                _ => StoreError::io(format!("open blob {digest}"), e),
            })
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(format!("fsync {}", dir.display()), e))
}
