/// How an error is classified, once, where it is raised.
///
/// Each crate's error type exposes `fn kind(&self) -> ErrorKind`; the registry maps a
/// kind to an OCI error code and the admin API maps it to a status. The set mirrors
/// containerd's errdefs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// The thing already exists and may not be replaced.
    AlreadyExists,
    /// The caller's input is malformed.
    InvalidArgument,
    /// The input is well-formed but the system is not in a state to accept it.
    FailedPrecondition,
    /// A resource ran out: disk space, quota.
    ResourceExhausted,
    /// A dependency is temporarily unavailable; retrying may work.
    Unavailable,
    /// A bug or an unexpected I/O failure.
    Internal,
    /// No valid credentials were given.
    Unauthenticated,
    /// The caller is known but not allowed to do this.
    PermissionDenied,
}

impl ErrorKind {
    /// Every kind, for tables and tests.
    pub const ALL: [Self; 9] = [
        Self::NotFound,
        Self::AlreadyExists,
        Self::InvalidArgument,
        Self::FailedPrecondition,
        Self::ResourceExhausted,
        Self::Unavailable,
        Self::Internal,
        Self::Unauthenticated,
        Self::PermissionDenied,
    ];

    /// The kind's name on the wire (`not_found`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::AlreadyExists => "already_exists",
            Self::InvalidArgument => "invalid_argument",
            Self::FailedPrecondition => "failed_precondition",
            Self::ResourceExhausted => "resource_exhausted",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
            Self::Unauthenticated => "unauthenticated",
            Self::PermissionDenied => "permission_denied",
        }
    }

    /// The kind a wire name stands for; unknown names are `Internal`.
    pub fn from_name(name: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .unwrap_or(Self::Internal)
    }
}
