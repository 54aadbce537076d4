//! Every exit code of `slipway`, in one table (the README lists the same).

use slipway_api::ClientError;
use slipway_api::services::Outcome;
use slipway_core::ErrorKind;

/// How `slipway` exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// It worked.
    Ok = 0,
    /// It failed (a cause not listed below).
    Error = 1,
    /// The revision was rolled back: the previous one serves again.
    RolledBack = 2,
    /// The revision failed with nothing to roll back to.
    Failed = 3,
    /// A deploy gate refused the revision.
    Rejected = 4,
    /// What the command names does not exist.
    NotFound = 5,
    /// Not now: the service or container is not in a state that allows it.
    Conflict = 6,
    /// The command line is wrong (sysexits `EX_USAGE`).
    Usage = 64,
    /// The input is invalid: a spec, a flag's value (sysexits `EX_DATAERR`).
    Invalid = 65,
    /// The server cannot be reached or is unavailable (sysexits `EX_UNAVAILABLE`).
    Unavailable = 69,
    /// Not logged in, or the credentials were refused (sysexits `EX_NOPERM`).
    Denied = 77,
    /// The configuration is invalid (sysexits `EX_CONFIG`).
    Config = 78,
}

impl Exit {
    /// The table, for `--help` and the README.
    pub const TABLE: [(Self, &'static str); 12] = [
        (Self::Ok, "success"),
        (Self::Error, "failure not listed below"),
        (Self::RolledBack, "the revision was rolled back"),
        (Self::Failed, "the revision failed, nothing to roll back to"),
        (Self::Rejected, "a deploy gate refused the revision"),
        (Self::NotFound, "what the command names does not exist"),
        (Self::Conflict, "not allowed in the current state"),
        (Self::Usage, "bad command line"),
        (Self::Invalid, "invalid spec or value"),
        (Self::Unavailable, "server unreachable or unavailable"),
        (Self::Denied, "not logged in, or not allowed"),
        (Self::Config, "invalid configuration"),
    ];

    /// The code of an error kind.
    pub fn of_kind(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::NotFound => Self::NotFound,
            ErrorKind::AlreadyExists | ErrorKind::FailedPrecondition => Self::Conflict,
            ErrorKind::InvalidArgument => Self::Invalid,
            ErrorKind::Unavailable => Self::Unavailable,
            ErrorKind::ResourceExhausted | ErrorKind::Internal => Self::Error,
            ErrorKind::Unauthenticated | ErrorKind::PermissionDenied => Self::Denied,
        }
    }

    /// The code of a failed command.
    pub fn of_error(e: &anyhow::Error) -> Self {
        if e.downcast_ref::<slipway_app::config::ConfigError>()
            .is_some()
        {
            return Self::Config;
        }
        if let Some(c) = e.downcast_ref::<ClientError>() {
            return Self::of_kind(c.kind());
        }
        if e.downcast_ref::<slipway_core::service::SpecError>()
            .is_some()
        {
            return Self::Invalid;
        }
        Self::Error
    }

    /// The code of a command's outcome.
    pub fn of_outcome(o: &Outcome) -> Self {
        match o {
            Outcome::Done => Self::Ok,
            Outcome::RolledBack(_) => Self::RolledBack,
            Outcome::Failed(_) => Self::Failed,
            Outcome::Rejected(_) => Self::Rejected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_code_once() {
        let mut codes: Vec<u8> = Exit::TABLE.iter().map(|(e, _)| *e as u8).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), Exit::TABLE.len());
        assert_eq!(Exit::of_kind(ErrorKind::NotFound), Exit::NotFound);
        assert_eq!(
            Exit::of_outcome(&Outcome::RolledBack("x".into())),
            Exit::RolledBack
        );
    }
}
