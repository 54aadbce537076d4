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
}
