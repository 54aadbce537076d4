use std::io;

use slipway_core::{Digest, ErrorKind, RepoName};

use crate::manifest::ManifestError;

/// The result type of every store operation.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The blob is not linked into the repository.
    #[error("blob {0} is not known in this repository")]
    BlobUnknown(Digest),
    /// No manifest with that tag or digest in the repository.
    #[error("manifest {0} is not known in this repository")]
    ManifestUnknown(String),
    /// The repository has no content.
    #[error("repository {0} is not known")]
    RepoUnknown(RepoName),
    /// The upload session does not exist (never did, finished, cancelled or purged).
    #[error("upload session {0} is not known")]
    UploadUnknown(String),
    /// Another request is writing to the same upload session.
    #[error("upload session {0} is in use by another request")]
    UploadBusy(String),
    /// A chunk did not start at the session's current offset.
    #[error("chunk starts at byte {got} but the upload is at byte {expected}")]
    UploadOffset {
        /// Bytes received so far.
        expected: u64,
        /// Where the chunk claimed to start.
        got: u64,
    },
    /// The uploaded content does not hash to the digest the client gave.
    #[error("content digest is {computed}, not {expected}")]
    DigestMismatch {
        /// What the client said.
        expected: Digest,
        /// What the bytes hash to.
        computed: Digest,
    },
    /// The manifest body is invalid.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// The manifest was pushed by digest and the bytes hash to something else.
    #[error("manifest bytes hash to {computed}, not to the digest {expected} in the URL")]
    ManifestDigestMismatch {
        /// The digest in the URL.
        expected: Digest,
        /// What the bytes hash to.
        computed: Digest,
    },
    /// A manifest references a blob or child manifest missing from the repository.
    #[error("manifest references {0}, which is not in this repository: push it first")]
    ManifestBlobUnknown(Digest),
    /// The tag is immutable: it may be pushed again only with the same manifest,
    /// and never deleted.
    #[error(
        "tag {repo}:{tag} is immutable (registry rule repository = {rule:?}): push a new tag instead"
    )]
    TagImmutable {
        /// The repository.
        repo: RepoName,
        /// The tag.
        tag: String,
        /// The repository glob of the rule that makes it immutable.
        rule: String,
    },
    /// Where blobs live cannot be reached now (object storage failing past its
    /// retries): worth retrying later.
    #[error("{0}")]
    Unavailable(String),
    /// The disk is full.
    #[error("storage is full: {0}")]
    StorageFull(io::Error),
    /// Any other I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The metadata database failed.
    #[error("metadata database: {0}")]
    Db(String),
}

// === impl StoreError ===

impl StoreError {
    /// How this error is classified.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::BlobUnknown(_)
            | Self::ManifestUnknown(_)
            | Self::RepoUnknown(_)
            | Self::UploadUnknown(_) => ErrorKind::NotFound,
            Self::UploadBusy(_) | Self::UploadOffset { .. } => ErrorKind::FailedPrecondition,
            Self::DigestMismatch { .. }
            | Self::Manifest(_)
            | Self::ManifestDigestMismatch { .. }
            | Self::ManifestBlobUnknown(_) => ErrorKind::InvalidArgument,
            Self::StorageFull(_) => ErrorKind::ResourceExhausted,
            Self::TagImmutable { .. } => ErrorKind::PermissionDenied,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::Io { .. } | Self::Db(_) => ErrorKind::Internal,
        }
    }

    /// Wraps an I/O error with context, recognising a full disk.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        if is_enospc(&source) {
            Self::StorageFull(source)
        } else {
            Self::Io {
                context: context.into(),
                source,
            }
        }
    }
}

fn is_enospc(e: &io::Error) -> bool {
    // ENOSPC (28) and EDQUOT (122) both mean "no room to write".
    matches!(e.raw_os_error(), Some(28 | 122))
}

/// Converts any redb error, recognising a full disk underneath it.
pub(crate) fn db<E: Into<redb::Error>>(e: E) -> StoreError {
    match e.into() {
        redb::Error::Io(io) if is_enospc(&io) => StoreError::StorageFull(io),
        other => StoreError::Db(other.to_string()),
    }
}
