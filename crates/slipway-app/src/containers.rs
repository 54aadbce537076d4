//! The admin API for containers: `/api/v1/containers…`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;
use slipway_core::ErrorKind;
use slipway_runtime::{RunRequest, Runtime};

use slipway_auth::{Action, Kind};

use crate::api_error::ApiError;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

pub(crate) fn router(runtime: Arc<Runtime>) -> Router {
    Router::new()
        .route("/api/v1/containers", axum::routing::get(list).post(create))
        .route(
            "/api/v1/containers/{name}",
            axum::routing::get(inspect).delete(remove),
        )
        .route("/api/v1/containers/{name}/stop", axum::routing::post(stop))
        .route("/api/v1/containers/{name}/logs", axum::routing::get(logs))
        .with_state(runtime)
}

async fn create(
    State(rt): State<Arc<Runtime>>,
    caller: crate::auth::Caller,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: RunRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            ErrorKind::InvalidArgument,
            format!("request body is not a valid run request: {e}"),
        )
    })?;
    let p = crate::auth::principal(&caller);
    let name = req.name.clone().unwrap_or_else(|| "*".into());
    crate::auth::require(&p, Kind::Service, &name, Action::Run)?;
    if let Some(repo) = rt.local_repo(&req.image) {
        crate::auth::require(&p, Kind::Repository, &repo, Action::Pull)?;
    }
    let info = rt.run(req).await?;
    let mut resp = (StatusCode::CREATED, axum::Json(&info)).into_response();
    resp.extensions_mut()
        .insert(crate::auth::AuditTarget(format!("container:{}", info.name)));
    Ok(resp)
}

async fn list(State(rt): State<Arc<Runtime>>, caller: crate::auth::Caller) -> Response {
    let p = crate::auth::principal(&caller);
    let mut list = rt.list();
    list.retain(|c| p.allows(Kind::Service, &c.name, Action::Read));
    axum::Json(list).into_response()
}

async fn inspect(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(rt.inspect(&name)?).into_response())
}

#[derive(Deserialize)]
struct StopQuery {
    grace: Option<String>,
}

async fn stop(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    Query(q): Query<StopQuery>,
) -> Result<Response, ApiError> {
    let grace = q
        .grace
        .map(|g| {
            slipway_core::parse_duration(&g)
                .map_err(|e| ApiError::new(ErrorKind::InvalidArgument, format!("grace: {e}")))
        })
        .transpose()?;
    Ok(axum::Json(rt.stop(&name, grace).await?).into_response())
}

#[derive(Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    Query(q): Query<RemoveQuery>,
) -> Result<Response, ApiError> {
    rt.remove(&name, q.force).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// Streams the log file; with `follow`, keeps streaming until the container is done
/// for good (its supervisor finished) and the file is drained.
async fn logs(
    State(rt): State<Arc<Runtime>>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, ApiError> {
    let path = rt.log_path(&name)?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::new(ErrorKind::NotFound, format!("no log for {name}: {e}")))?;
    if !q.follow {
        return Ok(Body::from_stream(tokio_util_stream(file)).into_response());
    }
    let stream = futures_util::stream::unfold(
        (file, rt, name, 0u64, false),
        |(mut f, rt, name, mut pos, finished)| async move {
            if finished {
                return None;
            }
            let mut buf = vec![0u8; 64 << 10];
            loop {
                // Log rotation truncates the file: start over from its beginning.
                let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
                if len < pos {
                    pos = 0;
                    let _ = f.seek(std::io::SeekFrom::Start(0)).await;
                }
                match f.read(&mut buf).await {
                    Ok(n) if n > 0 => {
                        pos += n as u64;
                        buf.truncate(n);
                        return Some((
                            Ok::<_, std::io::Error>(Bytes::from(buf)),
                            (f, rt, name, pos, false),
                        ));
                    }
                    Ok(_) if rt.is_done(&name) => {
                        return Some((Ok(Bytes::new()), (f, rt, name, pos, true)));
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    Err(e) => return Some((Err(e), (f, rt, name, pos, true))),
                }
            }
        },
    );
    Ok(Body::from_stream(stream).into_response())
}

fn tokio_util_stream(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> {
    futures_util::stream::unfold(file, |mut f| async move {
        let mut buf = vec![0u8; 64 << 10];
        match f.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    })
}
