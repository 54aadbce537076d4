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

    /// A URL a client may fetch the blob from directly (a presigned object
    /// URL), when the backend is set to redirect; `None` serves it here.
    fn redirect_url(&self, digest: &Digest) -> Result<Option<String>> {
        let _ = digest;
        Ok(None)
    }

    /// Keeps one chunk of upload session `upload` as its part `name` (a name
    /// the store generated), durably; `staged` is consumed. Used when several
    /// replicas share the store, so any of them can go on with the session; a
    /// backend that cannot keep parts serves one machine only.
    fn put_part(&self, upload: &uuid::Uuid, name: &str, staged: &Path) -> Result<()> {
        let _ = (upload, name, staged);
        Err(no_parts())
    }
    /// Opens a part of an upload session.
    fn open_part(&self, upload: &uuid::Uuid, name: &str) -> Result<BlobRead> {
        let _ = (upload, name);
        Err(no_parts())
    }
    /// Makes the concatenation of `parts`, in order, the blob `digest` (the
    /// store verified the digest); the parts stay until [`Self::remove_parts`].
    fn commit_parts(&self, upload: &uuid::Uuid, parts: &[String], digest: &Digest) -> Result<()> {
        let _ = (upload, parts, digest);
        Err(no_parts())
    }
    /// Removes parts of an upload session; missing ones are not an error.
    fn remove_parts(&self, upload: &uuid::Uuid, parts: &[String]) -> Result<()> {
        let _ = (upload, parts);
        Ok(())
    }
}

fn no_parts() -> StoreError {
    StoreError::Db(
        "this blob backend keeps no upload parts: it cannot serve shared metadata".into(),
    )
}

/// Whether `name` is a part name the store generates: `<offset>-<uuid>`.
pub fn valid_part_name(name: &str) -> bool {
    name.split_once('-').is_some_and(|(offset, id)| {
        !offset.is_empty()
            && offset.bytes().all(|b| b.is_ascii_digit())
            && uuid::Uuid::parse_str(id).is_ok_and(|u| u.hyphenated().to_string() == id)
    })
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

    /// Where a shared upload session keeps its parts.
    fn parts_dir(&self, upload: &uuid::Uuid) -> PathBuf {
        self.uploads.join(format!("{upload}.parts"))
    }

    fn part_path(&self, upload: &uuid::Uuid, name: &str) -> Result<PathBuf> {
        if !valid_part_name(name) {
            return Err(StoreError::Db(format!("invalid upload part name {name:?}")));
        }
        Ok(self.parts_dir(upload).join(name))
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

    fn put_part(&self, upload: &uuid::Uuid, name: &str, staged: &Path) -> Result<()> {
        let dest = self.part_path(upload, name)?;
        let dir = self.parts_dir(upload);
        fs::create_dir_all(&dir).map_err(|e| StoreError::io("create upload parts directory", e))?;
        File::open(staged)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io("fsync upload part", e))?;
        fs::rename(staged, &dest).map_err(|e| StoreError::io("move upload part into place", e))?;
        sync_dir(&dir)
    }

    fn open_part(&self, upload: &uuid::Uuid, name: &str) -> Result<BlobRead> {
        File::open(self.part_path(upload, name)?)
            .map(BlobRead::File)
            .map_err(|e| StoreError::io(format!("open upload part {name}"), e))
    }

    fn commit_parts(&self, upload: &uuid::Uuid, parts: &[String], digest: &Digest) -> Result<()> {
        if self.path(digest).exists() {
            return Ok(());
        }
        let staged = self.staging_path(&uuid::Uuid::new_v4());
        let res = (|| {
            let mut out =
                File::create(&staged).map_err(|e| StoreError::io("create staged blob", e))?;
            for p in parts {
                let mut part = self.open_part(upload, p)?;
                io::copy(&mut part, &mut out)
                    .map_err(|e| StoreError::io("join upload parts", e))?;
            }
            drop(out);
            self.commit(&staged, digest)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&staged);
        }
        res
    }

    fn remove_parts(&self, upload: &uuid::Uuid, parts: &[String]) -> Result<()> {
        for p in parts {
            match fs::remove_file(self.part_path(upload, p)?) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(StoreError::io("remove upload part", e));
                }
                _ => {}
            }
        }
        let _ = fs::remove_dir(self.parts_dir(upload));
        Ok(())
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
