//! The admin API's one error shape, `{"error":{"kind","message","field"}}`, with
//! the status derived from the kind (see `slipway_api::error`).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use slipway_api::ErrorBody;
use slipway_core::ErrorKind;

/// An admin API error.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub field: Option<String>,
}

impl ApiError {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            field: None,
        }
    }

    /// A bad request field.
    pub(crate) fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::InvalidArgument,
            message: format!("{field}: {}", message.into()),
            field: Some(field.to_owned()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(slipway_api::status_of(self.kind))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!("{}", self.message);
        }
        (
            status,
            axum::Json(ErrorBody::new(self.kind, self.message, self.field)),
        )
            .into_response()
    }
}

impl From<slipway_runtime::RuntimeError> for ApiError {
    fn from(e: slipway_runtime::RuntimeError) -> Self {
        let message = e.to_string();
        // Runtime messages start with the field they are about ("memory: …").
        let field = matches!(e, slipway_runtime::RuntimeError::InvalidSpec(_))
            .then(|| message.split_once(':').map(|(f, _)| f.trim().to_owned()))
            .flatten()
            .filter(|f| !f.contains(' '));
        Self {
            kind: e.kind(),
            message,
            field,
        }
    }
}

impl From<slipway_controller::CommandError> for ApiError {
    fn from(e: slipway_controller::CommandError) -> Self {
        Self {
            kind: e.kind(),
            field: e.field().map(str::to_owned),
            message: e.to_string(),
        }
    }
}

impl From<slipway_store::StoreError> for ApiError {
    fn from(e: slipway_store::StoreError) -> Self {
        Self::new(e.kind(), e.to_string())
    }
}

/// Unknown `/api/v1` paths answer in the API's shape, not the registry's.
pub(crate) async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        ErrorKind::NotFound,
        format!("no admin API endpoint {}", uri.path()),
    )
}
