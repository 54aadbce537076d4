//! The one listener's router: `/v2` (registry), `/api/v1` (admin), `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use slipway_registry::{Registry, RouteLabel};
use slipway_store::GcOptions;

use crate::metrics::AppMetrics;
use crate::tasks;

#[derive(Clone)]
pub(crate) struct AppState {
    pub registry: Registry,
    pub runtime: Arc<slipway_runtime::Runtime>,
    pub services: Arc<crate::services::Services>,
    pub nodes: Arc<crate::nodes::Nodes>,
    pub metrics: Arc<AppMetrics>,
    /// The one metrics registry `/metrics` renders.
    pub prometheus: Arc<prometheus_client::registry::Registry>,
    pub gc: slipway_store::GcOptions,
    pub snapshot_gc: slipway_runtime::SnapshotGcOptions,
    pub gate: Arc<crate::auth::Gate>,
    /// This node's agent API, with etcd and a join token.
    pub agent: Option<crate::agent::AgentState>,
    /// Pull-through mirrors in front of the registry.
    pub mirrors: Arc<crate::mirror::Mirrors>,
}

pub(crate) fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/api/v1/gc", axum::routing::post(run_gc))
        .route("/api/v1/status", axum::routing::get(status))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(state.clone())
        .merge(crate::containers::router(state.runtime.clone()))
        .merge(crate::services::router(state.services.clone()))
        .merge(crate::nodes::router(
            state.nodes.clone(),
            state.services.clone(),
        ))
        .merge(crate::auth::router(state.gate.clone()))
        .merge(crate::auth::secrets_router(
            state.gate.clone(),
            state.services.clone(),
        ))
        .route(
            "/api/v1/{*rest}",
            axum::routing::any(crate::api_error::not_found),
        );
    let admin = match state.agent.clone() {
        Some(agent) => admin.merge(crate::agent::router(agent)),
        None => admin,
    };
    // The registry router is a catch-all: it serves /v2 and answers every other
    // unknown path with OCI error JSON.
    let registry = slipway_registry::router(state.registry.clone()).layer(
        axum::middleware::from_fn_with_state(state.mirrors.clone(), crate::mirror::layer),
    );
    admin
        .fallback_service(registry)
        .layer(axum::middleware::from_fn_with_state(
            state.gate.clone(),
            crate::auth::gate,
        ))
        .layer(axum::middleware::from_fn_with_state(state, count_requests))
}

async fn count_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().as_str().to_owned();
    let path_label = match req.uri().path() {
        "/metrics" => "metrics",
        p if p.starts_with("/api/") => "admin",
        _ => "other",
    };
    let resp = next.run(req).await;
    let label = resp
        .extensions()
        .get::<RouteLabel>()
        .map_or(path_label, |l| l.0);
    state.metrics.record(label, &method, resp.status().as_u16());
    resp
}

async fn metrics(State(state): State<AppState>) -> Response {
    let text = crate::metrics::render(&state.prometheus);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response()
}

async fn status(State(state): State<AppState>) -> Response {
    axum::Json(slipway_api::ServerStatus {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        data_dir: state.registry.store().root().display().to_string(),
        stored_bytes: state.registry.store().stored_bytes(),
    })
    .into_response()
}

#[derive(Deserialize)]
struct GcQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn run_gc(State(state): State<AppState>, Query(q): Query<GcQuery>) -> Response {
    let opts = GcOptions {
        dry_run: q.dry_run,
        ..state.gc.clone()
    };
    let registry = tasks::gc_once(
        state.registry.store(),
        &state.metrics,
        &state.services,
        opts,
    )
    .await;
    // Asked for, unused snapshots go now, whatever their grace.
    let snapshot_opts = slipway_runtime::SnapshotGcOptions {
        grace: Duration::ZERO,
        dry_run: q.dry_run,
        ..state.snapshot_gc.clone()
    };
    let snapshots =
        match tasks::snapshot_gc_once(&state.runtime, &state.services, &snapshot_opts).await {
            Ok(r) => r,
            Err(e) => return crate::api_error::ApiError::from(e).into_response(),
        };
    match registry {
        Ok(report) => axum::Json(slipway_api::GcReport {
            dry_run: report.dry_run,
            blobs: report
                .blobs
                .into_iter()
                .map(|(d, n)| (d.to_string(), n))
                .collect(),
            manifests: report
                .manifests
                .into_iter()
                .map(|(r, d)| (r, d.to_string()))
                .collect(),
            tags: report
                .tags
                .into_iter()
                .map(|(r, t, d)| (r, t, d.to_string()))
                .collect(),
            bytes_freed: report.bytes_freed,
            snapshots: snapshots.removed,
            runtime_bytes_freed: snapshots.bytes_freed,
        })
        .into_response(),
        Err(e) => crate::api_error::ApiError::from(e).into_response(),
    }
}
