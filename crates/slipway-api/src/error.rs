//! The one error shape of `/api/v1`: `{"error":{"kind","message","field"}}`, with
//! the HTTP status derived from the kind.

use serde::{Deserialize, Serialize};
use slipway_core::ErrorKind;

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// The kind, as [`ErrorKind::as_str`] names it (`not_found`, …).
    pub kind: String,
    /// What is wrong and how to fix it.
    pub message: String,
    /// The request field it is about, dotted (`ingress.listen`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl ErrorBody {
    /// An error body of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>, field: Option<String>) -> Self {
        Self {
            error: ErrorDetail {
                kind: kind.as_str().to_owned(),
                message: message.into(),
                field,
            },
        }
    }
}

/// The HTTP status for an error kind.
pub fn status_of(kind: ErrorKind) -> u16 {
    match kind {
        ErrorKind::NotFound => 404,
        ErrorKind::AlreadyExists | ErrorKind::FailedPrecondition => 409,
        ErrorKind::InvalidArgument => 400,
        ErrorKind::ResourceExhausted => 507,
        ErrorKind::Unavailable => 503,
        ErrorKind::Internal => 500,
        ErrorKind::Unauthenticated => 401,
        ErrorKind::PermissionDenied => 403,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_wire_name_and_has_a_status() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_name(k.as_str()), k);
            assert!((400..600).contains(&status_of(k)));
        }
        let body = ErrorBody::new(ErrorKind::InvalidArgument, "bad", Some("replicas".into()));
        assert_eq!(
            serde_json::to_string(&body).expect("json"),
            r#"{"error":{"kind":"invalid_argument","message":"bad","field":"replicas"}}"#
        );
    }
}
