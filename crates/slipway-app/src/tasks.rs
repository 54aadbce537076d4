//! Background work: periodic GC, purging abandoned uploads, webhook delivery.
//! Every task takes a shutdown watch and returns when it fires.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use slipway_registry::RegistryEvent;
use slipway_store::{GcOptions, GcReport, Store, StoreError};
use tokio::sync::{broadcast, watch};

use crate::config::WebhookConfig;
use crate::metrics::AppMetrics;

/// One garbage collection of `store`, counted in `metrics`.
pub(crate) async fn gc_once(
    store: &Arc<Store>,
    metrics: &AppMetrics,
    services: &crate::services::Services,
    opts: GcOptions,
) -> Result<GcReport, StoreError> {
    // Retention never takes a tag from what a service runs or may roll back to.
    let opts = GcOptions {
        protected: services.recent_images().into_iter().collect(),
        ..opts
    };
    let store = store.clone();
    let report = tokio::task::spawn_blocking(move || store.gc(&opts))
        .await
        .map_err(|e| StoreError::Db(format!("gc task failed: {e}")))??;
    if !report.dry_run {
        metrics.gc_runs.inc();
        metrics.gc_freed_bytes.inc_by(report.bytes_freed);
    }
    tracing::info!(
        dry_run = report.dry_run,
        blobs = report.blobs.len(),
        manifests = report.manifests.len(),
        tags = report.tags.len(),
        bytes = report.bytes_freed,
        "garbage collection finished"
    );
    Ok(report)
}

/// One collection of unused layer snapshots; `grace` overrides the configured
/// one (`slipway gc` collects every unused snapshot at once).
pub(crate) async fn snapshot_gc_once(
    runtime: &slipway_runtime::Runtime,
    services: &crate::services::Services,
    opts: &slipway_runtime::SnapshotGcOptions,
) -> Result<slipway_runtime::SnapshotGcReport, slipway_runtime::RuntimeError> {
    let opts = slipway_runtime::SnapshotGcOptions {
        keep_images: services.recent_images(),
        ..opts.clone()
    };
    let report = runtime.collect_snapshots(&opts).await?;
    if !report.removed.is_empty() {
        tracing::info!(
            snapshots = report.removed.len(),
            bytes = report.bytes_freed,
            pressure = report.pressure,
            "removed unused layer snapshots"
        );
    }
    Ok(report)
}

/// Collects unused layer snapshots every minute: those past their grace, and
/// more while the data disk is past its high-water mark.
pub(crate) async fn snapshot_gc_loop(
    runtime: Arc<slipway_runtime::Runtime>,
    services: Arc<crate::services::Services>,
    opts: slipway_runtime::SnapshotGcOptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = snapshot_gc_once(&runtime, &services, &opts).await {
                    tracing::warn!("snapshot collection: {e}");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

pub(crate) async fn gc_loop(
    store: Arc<Store>,
    metrics: Arc<AppMetrics>,
    services: Arc<crate::services::Services>,
    opts: GcOptions,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await; // the first tick is immediate; wait a whole interval first
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(e) = gc_once(&store, &metrics, &services, opts.clone()).await {
                    tracing::error!("periodic garbage collection failed: {e}");
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

pub(crate) async fn purge_loop(
    store: Arc<Store>,
    max_age: Duration,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let s = store.clone();
                match tokio::task::spawn_blocking(move || s.purge_uploads(max_age)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => tracing::info!(removed = n, "purged abandoned uploads"),
                    Ok(Err(e)) => tracing::error!("purging uploads failed: {e}"),
                    Err(e) => tracing::error!("purge task failed: {e}"),
                }
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// Delivers every event to every webhook as a JSON POST, retrying with exponential
/// backoff (0.5s, 1s, 2s, … capped at 30s) up to the hook's `max_attempts`.
pub(crate) async fn webhook_loop(
    hooks: Vec<WebhookConfig>,
    mut events: broadcast::Receiver<RegistryEvent>,
    metrics: Arc<AppMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.changed() => return,
        };
        let event = match event {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(
                    dropped = n,
                    "webhook delivery fell behind; events were dropped"
                );
                metrics.webhook_failures.inc_by(n);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let body = match serde_json::to_vec(&serde_json::json!({ "events": [event] })) {
            Ok(b) => Bytes::from(b),
            Err(_) => continue,
        };
        for hook in &hooks {
            let (client, hook, body, metrics, shutdown) = (
                client.clone(),
                hook.clone(),
                body.clone(),
                metrics.clone(),
                shutdown.clone(),
            );
            tokio::spawn(deliver(client, hook, body, metrics, shutdown));
        }
    }
}

async fn deliver(
    client: Client<HttpConnector, Full<Bytes>>,
    hook: WebhookConfig,
    body: Bytes,
    metrics: Arc<AppMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=hook.max_attempts {
        let req = http::Request::post(&hook.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()));
        let Ok(req) = req else { return };
        let outcome = tokio::time::timeout(hook.timeout.0, client.request(req)).await;
        match outcome {
            Ok(Ok(resp)) if resp.status().is_success() => {
                metrics.webhook_deliveries.inc();
                return;
            }
            Ok(Ok(resp)) => {
                tracing::warn!(url = %hook.url, attempt, status = %resp.status(), "webhook refused event")
            }
            Ok(Err(e)) => tracing::warn!(url = %hook.url, attempt, "webhook delivery failed: {e}"),
            Err(_) => tracing::warn!(url = %hook.url, attempt, "webhook delivery timed out"),
        }
        if attempt == hook.max_attempts {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => break,
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    metrics.webhook_failures.inc();
    tracing::error!(url = %hook.url, "webhook event dropped after {} attempts", hook.max_attempts);
}
