//! `/api/v1/services…` and `/api/v1/events`: every mutation is a command for the
//! service's actor, answered 202 as soon as it is accepted; its work finishes
//! whatever happens to the request.

use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slipway_api::services::{CommandAccepted, DeployRequest, RollbackRequest, ScaleRequest};
use slipway_controller::{Accepted, Command};
use slipway_core::service::ServiceSpec;
use tokio::sync::broadcast;

use slipway_auth::{Action, Kind};

use super::Services;
use crate::api_error::ApiError;

pub(crate) fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/api/v1/services", axum::routing::get(list).post(deploy))
        .route(
            "/api/v1/services/{name}",
            axum::routing::get(status).delete(remove),
        )
        .route(
            "/api/v1/services/{name}/rollback",
            axum::routing::post(rollback),
        )
        .route("/api/v1/services/{name}/scale", axum::routing::post(scale))
        .route(
            "/api/v1/services/{name}/logs",
            axum::routing::get(super::logs::logs),
        )
        .route(
            "/api/v1/services/{name}/{verb}",
            axum::routing::post(control),
        )
        .route("/api/v1/events", axum::routing::get(events))
        .layer(axum::middleware::from_fn_with_state(
            services.clone(),
            standby,
        ))
        .with_state(services)
}

/// A standby control plane (another one leads, on etcd) answers service routes
/// 503 naming why, rather than acting on services it does not run.
async fn standby(
    State(s): State<Arc<Services>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if s.is_leading() {
        return next.run(req).await;
    }
    ApiError::new(
        slipway_core::ErrorKind::Unavailable,
        format!(
            "this control plane is a standby: another one leads the control planes on etcd; send service commands to it (a standby takes over within {}s if the leader dies)",
            s.lease_ttl().as_secs()
        ),
    )
    .into_response()
}

fn accepted(service: &str, a: Accepted) -> Response {
    (
        StatusCode::ACCEPTED,
        axum::Json(CommandAccepted {
            service: service.to_owned(),
            command: a.command,
            revision: a.revision,
            queued: a.queued,
            unchanged: a.unchanged,
        }),
    )
        .into_response()
}

/// A JSON body, or defaults for an empty one.
fn json_body<T: serde::de::DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            slipway_core::ErrorKind::InvalidArgument,
            format!("the request body is not valid JSON for this endpoint: {e}"),
        )
    })
}

fn spec_error(e: slipway_core::service::SpecError) -> ApiError {
    match e {
        slipway_core::service::SpecError::Invalid { field, message } => {
            ApiError::invalid(&field, message)
        }
        e @ slipway_core::service::SpecError::Parse(_) => {
            ApiError::new(slipway_core::ErrorKind::InvalidArgument, e.to_string())
        }
    }
}

/// `POST /api/v1/services`: a [`DeployRequest`] as JSON, or the spec as TOML.
async fn deploy(
    State(s): State<Arc<Services>>,
    caller: crate::auth::Caller,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    let spec = if json {
        let req: DeployRequest = serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(
                slipway_core::ErrorKind::InvalidArgument,
                format!("the request body is not a valid deploy request: {e}"),
            )
        })?;
        req.spec.validate().map_err(spec_error)?;
        req.spec
    } else {
        let text = std::str::from_utf8(&body).map_err(|_| {
            ApiError::new(
                slipway_core::ErrorKind::InvalidArgument,
                "the service spec must be UTF-8 TOML (or JSON with Content-Type: application/json)",
            )
        })?;
        ServiceSpec::from_toml(text).map_err(spec_error)?
    };
    let mut spec = spec;
    s.pin_secrets(&mut spec)
        .map_err(|e| ApiError::invalid("secrets", e))?;
    let name = spec.name.clone();
    let p = crate::auth::principal(&caller);
    crate::auth::require(&p, Kind::Service, &name, Action::Deploy)?;
    if let Some(repo) = s.runtime.local_repo(&spec.image) {
        crate::auth::require(&p, Kind::Repository, &repo, Action::Pull)?;
    }
    let a = s.deploy(spec).await?;
    let mut resp = accepted(&name, a);
    resp.extensions_mut()
        .insert(crate::auth::AuditTarget(format!("service:{name}")));
    Ok(resp)
}

async fn list(State(s): State<Arc<Services>>, caller: crate::auth::Caller) -> Response {
    let p = crate::auth::principal(&caller);
    let mut list = s.list();
    list.retain(|svc| p.allows(Kind::Service, &svc.name, Action::Read));
    axum::Json(list).into_response()
}

async fn status(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.status(&name)?).into_response())
}

async fn remove(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let a = s.send(&name, Command::Remove).await?;
    Ok(accepted(&name, a))
}

async fn rollback(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: RollbackRequest = json_body(&body)?;
    let a = s.send(&name, Command::Rollback(req.to)).await?;
    Ok(accepted(&name, a))
}

async fn scale(
    State(s): State<Arc<Services>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: ScaleRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid("replicas", format!("send {{\"replicas\": N}} ({e})")))?;
    if req.replicas == 0 || req.replicas > 100 {
        return Err(ApiError::invalid("replicas", "must be between 1 and 100"));
    }
    let a = s.send(&name, Command::Scale(req.replicas)).await?;
    Ok(accepted(&name, a))
}

/// `promote`, `abort`, `pause` or `resume`.
async fn control(
    State(s): State<Arc<Services>>,
    Path((name, verb)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let command = match verb.as_str() {
        "promote" => Command::Promote,
        "abort" => Command::Abort,
        "pause" => Command::Pause,
        "resume" => Command::Resume,
        other => {
            return Err(ApiError::new(
                slipway_core::ErrorKind::NotFound,
                format!("unknown action {other:?}: use promote, abort, pause or resume"),
            ));
        }
    };
    let a = s.send(&name, command).await?;
    Ok(accepted(&name, a))
}

#[derive(Deserialize)]
struct EventsQuery {
    #[serde(default)]
    follow: bool,
    service: Option<String>,
}

fn line(e: &slipway_api::services::Event) -> Bytes {
    let mut v = serde_json::to_vec(e).unwrap_or_default();
    v.push(b'\n');
    Bytes::from(v)
}

/// Recent events as NDJSON; with `follow`, new ones as they happen; with
/// `service`, only that service's.
async fn events(
    State(s): State<Arc<Services>>,
    caller: crate::auth::Caller,
    Query(q): Query<EventsQuery>,
) -> Response {
    let (recent, rx) = s.hub.subscribe();
    let p = crate::auth::principal(&caller);
    let wanted = move |e: &slipway_api::services::Event| {
        q.service.as_ref().is_none_or(|n| *n == e.service)
            && p.allows(Kind::Service, &e.service, Action::Read)
    };
    let head: Vec<u8> = recent
        .iter()
        .filter(|e| wanted(e))
        .flat_map(|e| line(e).to_vec())
        .collect();
    let ndjson = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !q.follow {
        return (ndjson, head).into_response();
    }
    let head =
        futures_util::stream::once(async move { Ok::<_, std::io::Error>(Bytes::from(head)) });
    let tail = futures_util::stream::unfold((rx, wanted), |(mut rx, wanted)| async move {
        loop {
            match rx.recv().await {
                Ok(e) if wanted(&e) => return Some((Ok(line(&e)), (rx, wanted))),
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    use futures_util::StreamExt;
    (ndjson, Body::from_stream(head.chain(tail))).into_response()
}
