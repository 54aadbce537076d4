//! OCI error responses: every failure leaves as `{"errors":[{code,message,detail}]}`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use slipway_core::{DigestError, NameError, ReferenceError};
use slipway_store::{ManifestError, StoreError};

/// An OCI distribution error code with its HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// BLOB_UNKNOWN, 404.
    BlobUnknown,
    /// BLOB_UPLOAD_INVALID.
    BlobUploadInvalid,
    /// BLOB_UPLOAD_UNKNOWN, 404.
    BlobUploadUnknown,
    /// DIGEST_INVALID, 400.
    DigestInvalid,
    /// MANIFEST_BLOB_UNKNOWN, 400.
    ManifestBlobUnknown,
    /// MANIFEST_INVALID, 400.
    ManifestInvalid,
    /// MANIFEST_UNKNOWN, 404.
    ManifestUnknown,
    /// NAME_INVALID, 400.
    NameInvalid,
    /// NAME_UNKNOWN, 404.
    NameUnknown,
    /// SIZE_INVALID, 400.
    SizeInvalid,
    /// UNSUPPORTED.
    Unsupported,
    /// TAG_INVALID, 400.
    TagInvalid,
    /// PAGINATION_NUMBER_INVALID, 400 (Distribution's code for a bad `n`).
    PaginationNumberInvalid,
    /// UNKNOWN: the registry's own failure.
    Unknown,
    /// UNAUTHORIZED, 401: no valid credentials.
    Unauthorized,
    /// DENIED, 403: the principal may not do this.
    Denied,
    /// TOOMANYREQUESTS, 429.
    TooManyRequests,
    /// UNAVAILABLE, 503 (as Distribution): storage or the database cannot be
    /// reached now; retry.
    Unavailable,
}

/// A registry error: a code, a status, a message and optional detail.
#[derive(Debug)]
pub struct RegistryError {
    /// OCI code.
    pub code: Code,
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable message.
    pub message: String,
    /// Extra headers (e.g. `Range` on a 416).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

/// Handler result.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

// === impl Code ===

impl Code {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BlobUnknown => "BLOB_UNKNOWN",
            Self::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Self::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Self::DigestInvalid => "DIGEST_INVALID",
            Self::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Self::ManifestInvalid => "MANIFEST_INVALID",
            Self::ManifestUnknown => "MANIFEST_UNKNOWN",
            Self::NameInvalid => "NAME_INVALID",
            Self::NameUnknown => "NAME_UNKNOWN",
            Self::SizeInvalid => "SIZE_INVALID",
            Self::Unsupported => "UNSUPPORTED",
            Self::TagInvalid => "TAG_INVALID",
            Self::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Self::Unknown => "UNKNOWN",
            Self::Unauthorized => "UNAUTHORIZED",
            Self::Denied => "DENIED",
            Self::TooManyRequests => "TOOMANYREQUESTS",
            Self::Unavailable => "UNAVAILABLE",
        }
    }

    fn default_status(self) -> StatusCode {
        match self {
            Self::BlobUnknown
            | Self::BlobUploadUnknown
            | Self::ManifestUnknown
            | Self::NameUnknown => StatusCode::NOT_FOUND,
            Self::Unknown => StatusCode::INTERNAL_SERVER_ERROR,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Denied => StatusCode::FORBIDDEN,
            Self::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

// === impl RegistryError ===

impl RegistryError {
    /// An error with the code's usual status.
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            status: code.default_status(),
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// Overrides the status.
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Adds a header.
    pub fn with_header(mut self, name: header::HeaderName, value: &str) -> Self {
        if let Ok(v) = HeaderValue::from_str(value) {
            self.headers.push((name, v));
        }
        self
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code.as_str(), status = %self.status, "{}", self.message);
        } else {
            tracing::debug!(code = self.code.as_str(), status = %self.status, "{}", self.message);
        }
        let body = serde_json::json!({
            "errors": [{
                "code": self.code.as_str(),
                "message": self.message,
                "detail": {},
            }]
        });
        let mut resp = (self.status, axum::Json(body)).into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

impl From<StoreError> for RegistryError {
    fn from(e: StoreError) -> Self {
        let msg = e.to_string();
        let code = match &e {
            StoreError::BlobUnknown(_) => Code::BlobUnknown,
            StoreError::ManifestUnknown(_) => Code::ManifestUnknown,
            StoreError::RepoUnknown(_) => Code::NameUnknown,
            StoreError::UploadUnknown(_) => Code::BlobUploadUnknown,
            StoreError::UploadBusy(_) => {
                return Self::new(Code::BlobUploadInvalid, msg).with_status(StatusCode::CONFLICT);
            }
            StoreError::UploadOffset { expected, .. } => {
                return Self::new(Code::BlobUploadInvalid, msg)
                    .with_status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .with_header(header::RANGE, &range_header(*expected));
            }
            StoreError::DigestMismatch { .. } | StoreError::ManifestDigestMismatch { .. } => {
                Code::DigestInvalid
            }
            StoreError::Manifest(ManifestError::UnsupportedMediaType(_)) => {
                return Self::new(Code::ManifestInvalid, msg)
                    .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE);
            }
            StoreError::Manifest(ManifestError::Invalid(_)) => Code::ManifestInvalid,
            StoreError::ManifestBlobUnknown(_) => Code::ManifestBlobUnknown,
            StoreError::TagImmutable { .. } => Code::Denied,
            StoreError::Unavailable(_) => {
                return Self::new(Code::Unavailable, msg).with_header(header::RETRY_AFTER, "5");
            }
            StoreError::StorageFull(_) => {
                return Self::new(Code::Unknown, msg).with_status(StatusCode::INSUFFICIENT_STORAGE);
            }
            StoreError::Io { .. } | StoreError::Db(_) => Code::Unknown,
        };
        Self::new(code, msg)
    }
}

impl From<NameError> for RegistryError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::Tag(_) => Self::new(Code::TagInvalid, e.to_string()),
            _ => Self::new(Code::NameInvalid, e.to_string()),
        }
    }
}

impl From<DigestError> for RegistryError {
    fn from(e: DigestError) -> Self {
        Self::new(Code::DigestInvalid, e.to_string())
    }
}

impl From<ReferenceError> for RegistryError {
    fn from(e: ReferenceError) -> Self {
        match e {
            ReferenceError::Digest(d) => d.into(),
            ReferenceError::Tag(t) => t.into(),
        }
    }
}

/// The `Range` header value for an upload holding `offset` bytes.
pub fn range_header(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}
